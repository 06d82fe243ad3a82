//! The engine: the [`Conduit`] the daemon and `fluidcloud relocate` use. It owns the
//! journal and the open providers, plans each request, and drives every relocation in a
//! task of its own (see [`super::executor`]). At start it resumes or rolls back what a crash
//! interrupted and makes sure every service is deployed where it is placed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use super::executor::{self, Observer};
use super::journal::{Journal, JournalError, RelocationRecord};
use super::plan::{self, Plan};
use super::{Conduit, ConduitError, Relocation, RelocationRequest};
use crate::config::Config;
use crate::providers::{self, Provider, ProviderError};
use crate::telemetry::Metrics;

pub struct Engine {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub config: RwLock<Arc<Config>>,
    pub journal: Journal,
    providers: Mutex<BTreeMap<String, Arc<dyn Provider>>>,
    pub metrics: Option<Arc<Metrics>>,
    pub observer: Option<Arc<dyn Observer>>,
    /// Relocations with a live task in this process.
    running: Mutex<BTreeSet<String>>,
    runtime: tokio::runtime::Handle,
}

impl Inner {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The provider of that name, opened on first use and kept open (a local provider
    /// supervises its apps for as long as it is open).
    /// The providers holding the buckets of `spec` that stay where they are when it moves.
    pub fn bucket_homes(
        &self,
        spec: &crate::config::ServiceSpec,
    ) -> Result<super::deploy::BucketHomes, ProviderError> {
        spec.components
            .iter()
            .filter(|c| c.kind == crate::model::ComponentKind::Bucket && c.keep_at_source)
            .map(|c| {
                let home = c.home.as_deref().unwrap_or(&spec.provider);
                Ok((c.name.clone(), self.provider(home)?))
            })
            .collect()
    }

    pub fn provider(&self, name: &str) -> Result<Arc<dyn Provider>, ProviderError> {
        let mut open = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = open.get(name) {
            return Ok(p.clone());
        }
        let config = self.config();
        let spec = config
            .providers
            .get(name)
            .ok_or_else(|| ProviderError::Setup {
                provider: name.to_string(),
                reason: "it is not in the configuration".to_string(),
            })?;
        let _guard = self.runtime.enter();
        let p = providers::open(spec)?;
        open.insert(name.to_string(), p.clone());
        Ok(p)
    }

    /// The directory of a relocation's working files (staging images, manifests).
    pub fn work_dir(&self, id: &str) -> PathBuf {
        self.config().daemon.state_dir.join("relocations").join(id)
    }
}

impl Engine {
    /// Opens the journal in the configuration's state directory. Call from inside a tokio
    /// runtime.
    pub fn open(
        config: Arc<Config>,
        metrics: Option<Arc<Metrics>>,
        observer: Option<Arc<dyn Observer>>,
    ) -> Result<Engine, JournalError> {
        let _ = std::fs::create_dir_all(&config.daemon.state_dir);
        let path = config.daemon.state_dir.join("journal.sqlite");
        let journal = Journal::open(&path)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                config: RwLock::new(config),
                journal,
                providers: Mutex::new(BTreeMap::new()),
                metrics,
                observer,
                running: Mutex::new(BTreeSet::new()),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }

    /// Takes a new configuration: later plans and deployments use it. Relocations under way
    /// keep the plan they started with.
    pub fn set_config(&self, config: Arc<Config>) {
        let old = std::mem::replace(
            &mut *self.inner.config.write().unwrap_or_else(|e| e.into_inner()),
            config.clone(),
        );
        // A provider whose definition is unchanged stays open (its apps stay supervised);
        // the others are opened again from the new definition.
        let same = |name: &str| {
            let json = |c: &Config| c.providers.get(name).map(serde_json::to_value);
            matches!((json(&old), json(&config)), (Some(Ok(a)), Some(Ok(b))) if a == b)
        };
        self.inner
            .providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| same(name));
        self.open_providers();
    }

    /// Opens every configured provider, so local apps are supervised again, and logs the
    /// ones that cannot be opened (the daemon keeps running without them).
    pub fn open_providers(&self) {
        let names: Vec<String> = self.inner.config().providers.keys().cloned().collect();
        for name in names {
            if let Err(e) = self.inner.provider(&name) {
                tracing::warn!("Cannot open provider `{name}`: {e}.");
            }
        }
    }

    /// Resumes, rolls back or finishes the grace period of every relocation a previous
    /// process left unfinished. Returns how many it picked up.
    pub fn resume_unfinished(&self) -> usize {
        let unfinished = match self.inner.journal.unfinished() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                return 0;
            }
        };
        let n = unfinished.len();
        for r in unfinished {
            tracing::info!(
                "Picking up relocation {} of `{}` ({} → {}), left {}.",
                r.id,
                r.request.service,
                r.request.from,
                r.request.to,
                r.state.as_str()
            );
            self.spawn(r.id, true);
        }
        n
    }

    /// Makes sure every service not being relocated is deployed where it is placed:
    /// missing volumes and buckets are created, configuration files written from their
    /// templates, apps started. Problems are logged per service.
    pub async fn deploy_all(&self) {
        let config = self.inner.config();
        let placements = self.placements();
        let busy: BTreeSet<String> = self
            .relocations()
            .into_iter()
            .filter(|r| r.state.is_active())
            .map(|r| r.request.service)
            .collect();
        for (name, spec) in &config.services {
            if busy.contains(name) {
                continue;
            }
            let at = placements.get(name).unwrap_or(&spec.provider).clone();
            let provider = match self.inner.provider(&at) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("Cannot deploy `{name}` on `{at}`: {e}.");
                    continue;
                }
            };
            let homes = match self.inner.bucket_homes(spec) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("Cannot deploy `{name}` on `{at}`: {e}.");
                    continue;
                }
            };
            match self.ensure(provider.as_ref(), &homes, &config, spec).await {
                Ok(report) if report.changed() => {
                    tracing::info!("Deployed `{name}` on `{at}`: {report}.")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("Cannot deploy `{name}` on `{at}`: {e}."),
            }
        }
    }

    /// Makes `service` present on `provider` (see [`super::deploy::ensure`]).
    pub async fn deploy(
        &self,
        service: &str,
        provider: &str,
    ) -> Result<super::deploy::DeployReport, super::deploy::DeployError> {
        let config = self.inner.config();
        let spec =
            config
                .services
                .get(service)
                .ok_or_else(|| super::deploy::DeployError::Component {
                    service: service.to_string(),
                    component: "service".to_string(),
                    message: "it is not in the configuration".to_string(),
                })?;
        let p = self.inner.provider(provider)?;
        let homes = self.inner.bucket_homes(spec)?;
        self.ensure(p.as_ref(), &homes, &config, spec).await
    }

    async fn ensure(
        &self,
        at: &dyn Provider,
        homes: &super::deploy::BucketHomes,
        config: &Config,
        spec: &crate::config::ServiceSpec,
    ) -> Result<super::deploy::DeployReport, super::deploy::DeployError> {
        let journal = &self.inner.journal;
        let known = journal.deployed(&spec.name, at.name()).unwrap_or_default();
        let report = super::deploy::ensure(at, homes, config, spec, &known).await;
        // Once deployed, every volume of the service exists there.
        if report.is_ok() && at.capabilities().block {
            for v in spec.components.iter().filter(|c| {
                matches!(
                    c.kind,
                    crate::model::ComponentKind::Volume | crate::model::ComponentKind::Vm
                )
            }) {
                let _ = journal.set_deployed(&spec.name, at.name(), &format!("volume:{}", v.name));
            }
        }
        report
    }

    /// The downtime of a relocation's cutover, once its health check passed.
    pub fn downtime(&self, record: &RelocationRecord) -> Option<std::time::Duration> {
        let plan: Plan = serde_json::from_value(self.inner.journal.plan(&record.id).ok()??).ok()?;
        super::executor::downtime(&plan, record)
    }

    /// Plans a relocation without running it.
    pub fn plan(&self, service: &str, to: &str) -> Result<Plan, plan::PlanError> {
        let config = self.inner.config();
        let from = self
            .placements()
            .get(service)
            .cloned()
            .or_else(|| config.services.get(service).map(|s| s.provider.clone()))
            .ok_or_else(|| plan::PlanError::UnknownService(service.to_string()))?;
        plan::plan(&config, service, &from, to)
    }

    /// Runs one relocation in this task, to its end: completed after the grace period,
    /// rolled back, or failed. Used by `fluidcloud relocate`.
    pub async fn run(&self, request: RelocationRequest) -> Result<RelocationRecord, ConduitError> {
        let id = self.accept(&request)?;
        executor::drive(self.inner.clone(), id.clone(), false).await;
        self.inner
            .journal
            .get(&id)
            .ok()
            .flatten()
            .ok_or_else(|| ConduitError::Refused(format!("relocation {id} vanished")))
    }

    /// The journal record of one relocation.
    pub fn record(&self, id: &str) -> Option<RelocationRecord> {
        self.inner.journal.get(id).ok().flatten()
    }

    fn accept(&self, request: &RelocationRequest) -> Result<String, ConduitError> {
        if self
            .relocations()
            .iter()
            .any(|r| r.request.service == request.service && r.state.is_active())
        {
            return Err(ConduitError::AlreadyRelocating(request.service.clone()));
        }
        let plan = plan::plan(
            &self.inner.config(),
            &request.service,
            &request.from,
            &request.to,
        )
        .map_err(|e| ConduitError::Refused(e.to_string()))?;
        let names = plan.step_names();
        let journal = &self.inner.journal;
        let record = journal
            .create(request, &names)
            .map_err(|e| ConduitError::Refused(e.to_string()))?;
        journal
            .set_plan(
                &record.id,
                &serde_json::to_value(&plan).expect("plan serialises"),
            )
            .map_err(|e| ConduitError::Refused(e.to_string()))?;
        Ok(record.id)
    }

    fn spawn(&self, id: String, resumed: bool) {
        {
            let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(id.clone()) {
                return;
            }
        }
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            executor::drive(inner.clone(), id.clone(), resumed).await;
            inner
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }
}

fn to_relocation(r: RelocationRecord) -> Relocation {
    Relocation {
        id: r.id,
        request: r.request,
        state: r.state,
        submitted_at: r.created_at,
        updated_at: r.updated_at,
        detail: r.detail,
        steps: r.steps,
    }
}

impl Conduit for Engine {
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError> {
        let id = self.accept(&request)?;
        self.spawn(id.clone(), false);
        self.inner
            .journal
            .get(&id)
            .ok()
            .flatten()
            .map(to_relocation)
            .ok_or_else(|| ConduitError::Refused(format!("relocation {id} vanished")))
    }

    fn relocations(&self) -> Vec<Relocation> {
        match self.inner.journal.list() {
            Ok(records) => records.into_iter().map(to_relocation).collect(),
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                Vec::new()
            }
        }
    }

    fn active(&self) -> usize {
        match self.inner.journal.unfinished() {
            Ok(r) => r.iter().filter(|r| r.state.holds_slot()).count(),
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                0
            }
        }
    }

    fn configure(&self, config: Arc<Config>) {
        self.set_config(config);
    }

    fn placements(&self) -> BTreeMap<String, String> {
        self.inner.journal.placements().unwrap_or_else(|e| {
            tracing::error!("Cannot read placements from the relocation journal: {e}.");
            BTreeMap::new()
        })
    }
}
