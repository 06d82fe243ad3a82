//! The engine: the [`Conduit`] the daemon and `fluidcloud relocate` use. It owns the
//! journal and the open providers, plans each request, and drives every relocation in a
//! task of its own (see [`super::executor`]). At start it resumes or rolls back what a crash
//! interrupted and makes sure every service is deployed where it is placed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::executor;
use super::journal::{Journal, JournalError, RelocationRecord, StepState};
use super::plan::{self, Plan, PlanError};
use super::progress::{Board, Observer, Tee};
use super::shared::{CancelRefused, Shared};
use super::{Conduit, ConduitError, Relocation, RelocationRequest, RelocationState};
use crate::config::Config;
use crate::providers::Provider;
use crate::telemetry::Metrics;

pub struct Engine {
    inner: Arc<Shared>,
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
        let board = Arc::new(Board::default());
        let observer: Arc<dyn Observer> = match observer {
            Some(o) => Arc::new(Tee(board.clone(), o)),
            None => board.clone(),
        };
        Ok(Engine {
            inner: Arc::new(Shared::new(config, journal, metrics, Some(observer), board)),
        })
    }

    /// Takes a new configuration: later plans and deployments use it. Relocations under way
    /// keep the plan they started with.
    pub fn set_config(&self, config: Arc<Config>) {
        // A provider whose definition is unchanged stays open (its apps stay supervised);
        // the others are opened again from the new definition.
        let new = config.clone();
        let same = move |old: &Config, name: &str| {
            let json = |c: &Config| c.providers.get(name).map(serde_json::to_value);
            matches!((json(old), json(&new)), (Some(Ok(a)), Some(Ok(b))) if a == b)
        };
        self.inner.set_config(config, same);
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
            .under_way()
            .into_iter()
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

    /// Makes `service` present on `provider` (see [`crate::migrators::deploy::ensure`]).
    pub async fn deploy(
        &self,
        service: &str,
        provider: &str,
    ) -> Result<crate::migrators::deploy::DeployReport, crate::migrators::deploy::DeployError> {
        let config = self.inner.config();
        let spec = config.services.get(service).ok_or_else(|| {
            crate::migrators::deploy::DeployError::Component {
                service: service.to_string(),
                component: "service".to_string(),
                message: "it is not in the configuration".to_string(),
            }
        })?;
        let p = self.inner.provider(provider)?;
        let homes = self.inner.bucket_homes(spec)?;
        self.ensure(p.as_ref(), &homes, &config, spec).await
    }

    async fn ensure(
        &self,
        at: &dyn Provider,
        homes: &crate::migrators::deploy::BucketHomes,
        config: &Config,
        spec: &crate::model::ServiceSpec,
    ) -> Result<crate::migrators::deploy::DeployReport, crate::migrators::deploy::DeployError> {
        let journal = &self.inner.journal;
        let known = journal.deployed(&spec.name, at.name()).unwrap_or_default();
        let report = crate::migrators::deploy::ensure(at, homes, config, spec, &known).await;
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
    pub fn plan(&self, service: &str, to: &str) -> Result<Plan, PlanError> {
        let config = self.inner.config();
        let from = self
            .placements()
            .get(service)
            .cloned()
            .or_else(|| config.services.get(service).map(|s| s.provider.clone()))
            .ok_or_else(|| PlanError::UnknownService(service.to_string()))?;
        plan::plan(&config, service, &from, to)
    }

    /// Runs one relocation in this task, to its end: completed after the grace period,
    /// rolled back, or failed. Used by `fluidcloud relocate`.
    pub async fn run(&self, request: RelocationRequest) -> Result<RelocationRecord, ConduitError> {
        let id = self.accept(&request)?;
        self.inner.start(&id);
        executor::drive(self.inner.clone(), id.clone(), false).await;
        self.inner.finish(&id);
        self.inner
            .journal
            .get(&id)
            .ok()
            .flatten()
            .ok_or_else(|| ConduitError::Refused(format!("relocation {id} vanished")))
    }

    /// The relocations that have not ended, without their steps.
    fn under_way(&self) -> Vec<Relocation> {
        self.summaries_of(self.inner.journal.unfinished_summaries())
    }

    fn summaries_of(&self, read: Result<Vec<RelocationRecord>, JournalError>) -> Vec<Relocation> {
        match read {
            Ok(records) => records.into_iter().map(|r| self.to_relocation(r)).collect(),
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                Vec::new()
            }
        }
    }

    /// The journal record of one relocation.
    pub fn record(&self, id: &str) -> Option<RelocationRecord> {
        self.inner.journal.get(id).ok().flatten()
    }

    fn accept(&self, request: &RelocationRequest) -> Result<String, ConduitError> {
        if self
            .under_way()
            .iter()
            .any(|r| r.request.service == request.service)
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
        if !self.inner.start(&id) {
            return;
        }
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            executor::drive(inner.clone(), id.clone(), resumed).await;
            inner.finish(&id);
        });
    }

    fn to_relocation(&self, r: RelocationRecord) -> Relocation {
        Relocation {
            progress: self.inner.board.of(&r.id),
            id: r.id,
            request: r.request,
            state: r.state,
            submitted_at: r.created_at,
            updated_at: r.updated_at,
            detail: r.detail,
            steps: r.steps,
        }
    }

    /// Why relocation `record` can no longer be cancelled, if it cannot.
    fn too_late(&self, record: &RelocationRecord) -> Option<String> {
        let committed = record
            .steps
            .iter()
            .any(|s| s.name == "commit" && s.state != StepState::Pending);
        match record.state {
            s if s.is_final() => Some(format!("it has ended ({})", s.as_str())),
            RelocationState::Grace => Some(format!(
                "`{}` was committed to `{}`, which has taken over; relocate it back instead",
                record.request.service, record.request.to
            )),
            RelocationState::RollingBack => Some("it is rolling back already".into()),
            _ if committed => Some(format!(
                "its commit has begun: `{}` is taking over; relocate it back afterwards",
                record.request.to
            )),
            _ => None,
        }
    }

    fn cancel_now(&self, id: &str) -> Result<Relocation, ConduitError> {
        let record = self
            .inner
            .journal
            .get(id)
            .ok()
            .flatten()
            .ok_or_else(|| ConduitError::Unknown(id.to_string()))?;
        let refuse = |reason: String| ConduitError::NotCancellable {
            id: id.to_string(),
            reason,
        };
        if let Some(reason) = self.too_late(&record) {
            return Err(refuse(reason));
        }
        match self.inner.cancel(id) {
            Ok(()) => {}
            Err(CancelRefused::NotHere) => {
                return Err(refuse(
                    "it is not being driven by this process; it resumes or rolls back when the daemon that owns it restarts".into(),
                ))
            }
            Err(CancelRefused::Committing) => {
                return Err(refuse(format!(
                    "its commit has begun: `{}` is taking over; relocate it back afterwards",
                    record.request.to
                )))
            }
        }
        tracing::warn!(
            "Relocation {id}: cancelled by an operator; `{}` rolls back to `{}`.",
            record.request.service,
            record.request.from
        );
        Ok(self.to_relocation(record))
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
            .map(|r| self.to_relocation(r))
            .ok_or_else(|| ConduitError::Refused(format!("relocation {id} vanished")))
    }

    fn relocation(&self, id: &str) -> Option<Relocation> {
        self.record(id).map(|r| self.to_relocation(r))
    }

    fn cancel(&self, id: &str) -> Result<Relocation, ConduitError> {
        let result = self.cancel_now(id);
        if let Some(m) = &self.inner.metrics {
            let label = match &result {
                Ok(_) => "accepted",
                Err(ConduitError::Unknown(_)) => "unknown",
                Err(_) => "refused",
            };
            m.relocation_cancels.with_label_values(&[label]).inc();
        }
        result
    }

    fn plan(&self, service: &str, to: &str) -> Result<Plan, PlanError> {
        Engine::plan(self, service, to)
    }

    fn relocations(&self) -> Vec<Relocation> {
        match self.inner.journal.list() {
            Ok(records) => records.into_iter().map(|r| self.to_relocation(r)).collect(),
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                Vec::new()
            }
        }
    }

    fn summaries_since(&self, since: DateTime<Utc>) -> Vec<Relocation> {
        self.summaries_of(self.inner.journal.summaries_since(since))
    }

    fn last_relocations(&self) -> BTreeMap<String, DateTime<Utc>> {
        self.inner.journal.last_by_service().unwrap_or_else(|e| {
            tracing::error!("Cannot read the relocation journal: {e}.");
            BTreeMap::new()
        })
    }

    fn recent(
        &self,
        limit: usize,
        before: Option<&str>,
        keep: &dyn Fn(&Relocation) -> bool,
    ) -> Result<Vec<Relocation>, ConduitError> {
        // Newest first, a page at a time, so that however long the history only a page of
        // summaries and the relocations picked are in memory.
        const PAGE: usize = 256;
        let mut picked = Vec::new();
        let mut after: Option<(DateTime<Utc>, String)> = match before {
            None => None,
            Some(id) => match self.inner.journal.get(id) {
                Ok(Some(r)) => Some((r.created_at, r.id)),
                Ok(None) => return Err(ConduitError::Unknown(id.to_string())),
                Err(e) => return Err(journal_unreadable(e)),
            },
        };
        while picked.len() < limit {
            let page = match self
                .inner
                .journal
                .summaries_page(after.as_ref().map(|(t, id)| (*t, id.as_str())), PAGE)
            {
                Ok(page) => page,
                // A page cut short would read as the start of the history.
                Err(e) => return Err(journal_unreadable(e)),
            };
            let Some(last) = page.last() else { break };
            after = Some((last.created_at, last.id.clone()));
            let full = page.len() == PAGE;
            for r in page {
                if picked.len() == limit {
                    break;
                }
                let r = self.to_relocation(r);
                if keep(&r) {
                    match self.inner.journal.get(&r.id) {
                        Ok(Some(full)) => picked.push(self.to_relocation(full)),
                        Ok(None) => {}
                        Err(e) => return Err(journal_unreadable(e)),
                    }
                }
            }
            if !full {
                break;
            }
        }
        picked.reverse();
        Ok(picked)
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

/// A read of the journal that failed, logged and returned: the caller answers with an error
/// rather than with what it could read.
fn journal_unreadable(e: JournalError) -> ConduitError {
    tracing::error!("Cannot read the relocation journal: {e}.");
    ConduitError::Journal(e.to_string())
}
