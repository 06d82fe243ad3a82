//! What the engine and every relocation task share: the configuration, the journal, the
//! open providers, the observers, and the relocations this process drives with their
//! cancel tokens. It sits below both the engine (which creates it and spawns the tasks) and
//! the executor (which drives one relocation with it), so neither has to reach up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use super::journal::Journal;
use super::progress::{Board, Observer};
use crate::config::Config;
use crate::providers::{self, Provider, ProviderError};
use crate::telemetry::Metrics;

/// Why a cancel was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    /// No task of this process drives the relocation.
    NotHere,
    /// Its commit has begun: too late.
    Committing,
}

pub(super) struct Shared {
    pub config: RwLock<Arc<Config>>,
    pub journal: Journal,
    providers: Mutex<BTreeMap<String, Arc<dyn Provider>>>,
    pub metrics: Option<Arc<Metrics>>,
    pub observer: Option<Arc<dyn Observer>>,
    /// The live progress of the transfers running in this process.
    pub board: Arc<Board>,
    /// Relocations with a live task in this process, and how to cancel each.
    running: Mutex<BTreeMap<String, Running>>,
    runtime: tokio::runtime::Handle,
}

/// A relocation driven by this process.
struct Running {
    /// Cancelled by an operator's cancel.
    cancel: CancellationToken,
    /// Its commit has begun: too late to cancel.
    committing: bool,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        journal: Journal,
        metrics: Option<Arc<Metrics>>,
        observer: Option<Arc<dyn Observer>>,
        board: Arc<Board>,
    ) -> Self {
        Shared {
            config: RwLock::new(config),
            journal,
            providers: Mutex::new(BTreeMap::new()),
            metrics,
            observer,
            board,
            running: Mutex::new(BTreeMap::new()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Takes a new configuration; keeps open the providers for which `keep` holds.
    pub fn set_config(&self, config: Arc<Config>, keep: impl Fn(&Config, &str) -> bool) {
        let old = std::mem::replace(
            &mut *self.config.write().unwrap_or_else(|e| e.into_inner()),
            config,
        );
        self.providers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(&old, name));
    }

    /// Runs `task` on the conduit's runtime.
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(task);
    }

    /// Registers relocation `id` as driven by this process; false when it is already.
    pub fn start(&self, id: &str) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.contains_key(id) {
            return false;
        }
        running.insert(
            id.to_string(),
            Running {
                cancel: CancellationToken::new(),
                committing: false,
            },
        );
        true
    }

    pub fn finish(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The token an operator's cancel of relocation `id` trips.
    pub fn cancel_token(&self, id: &str) -> CancellationToken {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|r| r.cancel.clone())
            .unwrap_or_default()
    }

    /// Called right before the commit: false when the relocation was cancelled (it must roll
    /// back); from then on a cancel is refused.
    pub fn begin_commit(&self, id: &str) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get_mut(id) {
            Some(r) if r.cancel.is_cancelled() => false,
            Some(r) => {
                r.committing = true;
                true
            }
            None => true,
        }
    }

    /// Trips the cancel of relocation `id`, unless it is not driven here or its commit has
    /// begun.
    pub fn cancel(&self, id: &str) -> Result<(), CancelRefused> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get(id) {
            None => Err(CancelRefused::NotHere),
            Some(r) if r.committing => Err(CancelRefused::Committing),
            Some(r) => {
                r.cancel.cancel();
                Ok(())
            }
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The providers holding the buckets of `spec` that stay where they are when it moves.
    pub fn bucket_homes(
        &self,
        spec: &crate::model::ServiceSpec,
    ) -> Result<crate::migrators::deploy::BucketHomes, ProviderError> {
        crate::migrators::deploy::bucket_homes(spec, |name| self.provider(name))
    }

    /// The provider of that name, opened on first use and kept open (a local provider
    /// supervises its apps for as long as it is open).
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
