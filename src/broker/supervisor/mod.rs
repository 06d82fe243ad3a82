//! The supervisor: one task that owns the Broker's state. Scheduler jobs, pollers, the
//! evaluation worker, the API and signals only send it messages; it answers, updates the
//! state and publishes the market snapshot through a `watch` channel (swap, don't lock).
//!
//! Its parts: `messages` (what it hears and answers, and the [`BrokerHandle`]),
//! `jobs` (the cron jobs and the pollers, one worker per feed), `evaluation` (policies
//! against the market), `outcomes` (rails, modes, the conduit), `operator` (approvals and
//! relocations by hand), `costs` (the cost series),
//! `views` (what the API shows), `loader` ([`Loaded`], one configuration checked) and
//! `replay` ([`Replay`], the same broker driven by hand in simulated time).
//! Where a service runs is the relocation journal's to say: the supervisor reads it through
//! a [`PlacementBook`] and never writes it down itself.

mod costs;
mod evaluation;
mod jobs;
mod loader;
mod messages;
mod operator;
mod outcomes;
mod replay;
mod views;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;

pub use evaluation::{evaluate_all, Evaluation, FreshPrices};
pub use jobs::{Job, Stopped, SHUTDOWN_BOUND};
pub use loader::{compile_policies, Loaded, Policies};
pub use messages::{
    ApiError, BrokerHandle, Command, DecisionQuery, PollResult, Readiness, RelocationQuery,
};
pub use replay::{RecordingConduit, Replay};
pub use views::{ActiveRelocation, ServiceStatus};

use super::clock::Clock;
use super::decisions::{DecisionLog, DecisionLogError};
use super::state::{PersistedState, StateFile};
use crate::conduit::{Conduit, ConduitError};
use crate::config::{Config, ConfigErrors};
use crate::model::{MarketSnapshot, PlacementBook, Placements, ServiceSpec, SourceStatus};
use crate::telemetry::Metrics;
use costs::CostSeries;
use jobs::{feeds, Poller};
use outcomes::{log_key, LogKey};

/// Why the Broker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot create the {what} {}: {source}", path.display())]
    CreateDir {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    DecisionLog(#[from] DecisionLogError),
    #[error("cannot build the HTTP client of the pollers: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("the job scheduler failed: {0}")]
    Scheduler(#[from] JobSchedulerError),
}

pub struct Supervisor {
    loaded: Loaded,
    market: Arc<MarketSnapshot>,
    /// When each provider's prices were last polled afresh: the news the `confirmations`
    /// rail waits for.
    fresh_prices: FreshPrices,
    market_tx: watch::Sender<Arc<MarketSnapshot>>,
    commands_tx: mpsc::Sender<Command>,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    conduit: Arc<dyn Conduit>,
    /// Where services run, as the journal says; read again before each use.
    book: Arc<dyn PlacementBook>,
    placements: Placements,
    client: reqwest::Client,
    /// Jobs running now: an evaluation, polls.
    busy: BTreeSet<Job>,
    polled_once: BTreeSet<Job>,
    /// Feeds that had good data at least once: readiness waits for every one of them.
    had_data: BTreeSet<Job>,
    /// Feeds that asked (`Retry-After`) not to be polled before a time.
    not_before: BTreeMap<Job, DateTime<Utc>>,
    evaluated_once: bool,
    scheduler: Option<JobScheduler>,
    /// One poller per feed of the configuration in force.
    pollers: BTreeMap<Job, Poller>,
    /// The pollers' and the evaluations' tasks, joined at shutdown.
    tasks: JoinSet<()>,
    /// Fired by the daemon to stop.
    shutdown: CancellationToken,
    /// Stops the workers: a child of `shutdown`, and each poller's token a child of it, so
    /// the supervisor stopping on its own (a `Shutdown` command) stops only its own.
    workers: CancellationToken,
    log: DecisionLog,
    state_file: StateFile,
    state: PersistedState,
    /// The state as last written: a tick that changed nothing writes (and syncs) nothing.
    saved_state: PersistedState,
    /// Last logged (outcome, target, rail, policy hash) by service, to log changes only.
    last_logged: BTreeMap<String, LogKey>,
    last_costs: BTreeMap<String, Evaluation>,
    /// The label values of each service's cost series as last exported, so that a series
    /// whose provider or currency changed is removed rather than left at its old value.
    cost_series: BTreeMap<String, CostSeries>,
    /// When the relocations of the current window were submitted, read from the journal at
    /// each tick (plus this tick's own submissions): budgets count only relocations that exist.
    relocation_starts: Vec<DateTime<Utc>>,
    notify: bool,
    /// The time every rail reads.
    clock: Arc<dyn Clock>,
}

/// What the supervisor is given to work with.
pub struct Seams {
    pub conduit: Arc<dyn Conduit>,
    /// Where services run: the relocation journal.
    pub placements: Arc<dyn PlacementBook>,
    pub metrics: Arc<Metrics>,
    /// Fired to stop the supervisor and its workers.
    pub shutdown: CancellationToken,
    /// Whether systemd listens to `sd_notify`.
    pub notify: bool,
    /// The time the rails read: the system clock, or a simulated one to replay a feed.
    pub clock: Arc<dyn Clock>,
}

impl Supervisor {
    /// Builds the supervisor for a validated configuration. Fails when the state directory
    /// or the decision log is unusable.
    pub fn new(loaded: Loaded, seams: Seams) -> Result<(Supervisor, BrokerHandle), BrokerError> {
        let create = |what: String, path: PathBuf| {
            std::fs::create_dir_all(&path).map_err(|source| BrokerError::CreateDir {
                what,
                path,
                source,
            })
        };
        let state_dir = loaded.config.daemon.state_dir.clone();
        create("state directory".into(), state_dir.clone())?;
        create("cache directory".into(), loaded.config.cache_dir())?;
        // A local provider is a directory; make sure it exists so its benchmark can run.
        for p in loaded.config.providers.values() {
            if let (crate::model::Driver::Local, Some(root)) = (p.driver, &p.root) {
                create(format!("directory of provider `{}`", p.name), root.clone())?;
            }
        }
        let log = DecisionLog::open(&loaded.config.decision_log_path())?;
        let state_file = StateFile::new(&state_dir);
        let state = state_file.load();
        let (commands_tx, commands) = mpsc::channel(1024);
        let mut market = MarketSnapshot::default();
        loaded.refresh_regions(&mut market);
        let market = Arc::new(market);
        let (market_tx, market_rx) = watch::channel(market.clone());
        let client = reqwest::Client::builder()
            .user_agent(concat!("fluidcloud/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let handle = BrokerHandle {
            commands: commands_tx.clone(),
            market: market_rx,
            metrics: seams.metrics.clone(),
        };
        let mut s = Supervisor {
            loaded,
            market,
            fresh_prices: FreshPrices::new(),
            market_tx,
            commands_tx,
            commands,
            metrics: seams.metrics,
            conduit: seams.conduit,
            book: seams.placements,
            placements: Placements::default(),
            client,
            busy: BTreeSet::new(),
            polled_once: BTreeSet::new(),
            had_data: BTreeSet::new(),
            not_before: BTreeMap::new(),
            evaluated_once: false,
            scheduler: None,
            pollers: BTreeMap::new(),
            tasks: JoinSet::new(),
            workers: seams.shutdown.child_token(),
            shutdown: seams.shutdown,
            log,
            state_file,
            saved_state: state.clone(),
            state,
            last_logged: BTreeMap::new(),
            last_costs: BTreeMap::new(),
            cost_series: BTreeMap::new(),
            relocation_starts: Vec::new(),
            notify: seams.notify,
            clock: seams.clock,
        };
        s.refresh_placements();
        s.init_series();
        s.seed_last_logged();
        Ok((s, handle))
    }

    /// Writes the state if it changed since it was last written.
    fn save_state(&mut self) {
        if self.state == self.saved_state {
            return;
        }
        match self.state_file.save(&self.state) {
            Ok(()) => self.saved_state = self.state.clone(),
            Err(e) => tracing::error!("Cannot save the broker state: {e}."),
        }
    }

    fn config(&self) -> &Config {
        &self.loaded.config
    }

    /// Reads where services run from the journal; on a failure the last answer stands.
    fn refresh_placements(&mut self) {
        match self.book.placements() {
            Ok(p) => self.placements = p,
            Err(e) => tracing::error!("{e}; the placements read before are used."),
        }
    }

    fn init_series(&mut self) {
        let feeds = feeds(self.config());
        for f in &feeds {
            self.metrics.init_source(&f.job.to_string());
        }
        self.metrics.ticks_skipped.with_label_values(&["evaluate"]);
        for p in self.config().policies.keys() {
            self.metrics.init_policy(p);
        }
        // Keep the freshness of sources that still exist; start new ones empty.
        let mut market = (*self.market).clone();
        let keep: BTreeSet<String> = feeds.iter().map(|f| f.job.to_string()).collect();
        market.sources.retain(|k, _| keep.contains(k));
        for f in feeds {
            let name = f.job.to_string();
            market
                .sources
                .entry(name.clone())
                .and_modify(|st| st.max_age_secs = f.max_age_secs)
                .or_insert_with(|| SourceStatus::new(name, f.max_age_secs));
        }
        let providers: BTreeSet<_> = self.config().providers.keys().cloned().collect();
        market.offers.retain(|k, _| providers.contains(k));
        market.io.retain(|k, _| providers.contains(k));
        market.price_shocks.retain(|k, _| providers.contains(k));
        self.fresh_prices.retain(|k, _| providers.contains(k));
        let priced: BTreeSet<_> = self
            .config()
            .providers
            .values()
            .filter(|p| p.pricing.is_some())
            .map(|p| p.name.clone())
            .collect();
        self.state.prices.retain(|k, _| priced.contains(k));
        self.loaded.refresh_regions(&mut market);
        self.publish(market);
    }

    fn seed_last_logged(&mut self) {
        for d in self.log.recent() {
            self.last_logged.insert(d.service.clone(), log_key(d));
        }
    }

    fn publish(&mut self, market: MarketSnapshot) {
        let market = Arc::new(market);
        self.market = market.clone();
        self.market_tx.send_replace(market);
    }

    /// Runs until the shutdown token fires or a shutdown command comes; returns once the
    /// scheduler has stopped and every worker has ended (or, past `SHUTDOWN_BOUND`, been
    /// aborted), saying how they ended.
    pub async fn run(mut self) -> Result<Stopped, BrokerError> {
        if let Err(e) = self.start_scheduler().await {
            self.stop_workers(SHUTDOWN_BOUND).await;
            return Err(e);
        }
        self.sync_pollers();
        tracing::info!(
            "The broker is running with {} providers, {} services and {} policies.",
            self.config().providers.len(),
            self.config().services.len(),
            self.config().policies.len()
        );
        // Poll everything once at start so decisions do not wait for the first schedule.
        for f in feeds(self.config()) {
            self.start_poll(f.job);
        }
        let mut watchdog_usec = 0u64;
        let watchdog = self.notify && sd_notify::watchdog_enabled(false, &mut watchdog_usec);
        let period = if watchdog {
            Duration::from_micros(watchdog_usec / 2)
        } else {
            Duration::from_secs(3600)
        };
        let mut heartbeat = tokio::time::interval(period);
        let shutdown = self.shutdown.clone();
        loop {
            let cmd = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = self.commands.recv() => c,
                _ = heartbeat.tick() => {
                    // Reached only when the supervisor loop turns: a stuck supervisor stops
                    // the pings and systemd restarts the daemon.
                    if watchdog {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                    continue;
                }
            };
            let Some(cmd) = cmd else { break };
            match cmd {
                Command::Shutdown => break,
                other => self.handle(other).await,
            }
        }
        let stopped = self.stop_workers(SHUTDOWN_BOUND).await;
        tracing::info!(
            "The broker has stopped; {} of its workers ended, {} were aborted.",
            stopped.joined,
            stopped.abandoned
        );
        Ok(stopped)
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Tick(Job::Evaluate) => self.start_evaluation(),
            Command::Tick(job) => self.start_poll(job),
            Command::PollDone {
                job,
                started,
                result,
            } => self.finish_poll(job, started, result),
            Command::EvaluationDone(evals, fresh) => self.apply(evals, &fresh),
            Command::Services(reply) => {
                self.refresh_placements();
                let _ = reply.send(self.services());
            }
            Command::Decisions { query, reply } => {
                let _ = reply.send(self.decisions(&query));
            }
            Command::Relocations { query, reply } => {
                let keep = |r: &crate::conduit::Relocation| query.keeps(r);
                let page = self
                    .conduit
                    .recent(query.limit(), query.before.as_deref(), &keep)
                    .map_err(|e| match e {
                        ConduitError::Unknown(_) => ApiError::NotFound(e.to_string()),
                        _ => ApiError::Internal(e.to_string()),
                    });
                let _ = reply.send(page);
            }
            Command::Relocation { id, reply } => {
                let _ = reply.send(self.conduit.relocation(&id));
            }
            Command::Cancel { id, reply } => {
                let _ = reply.send(self.conduit.cancel(&id).map_err(|e| match e {
                    ConduitError::Unknown(_) => ApiError::NotFound(e.to_string()),
                    _ => ApiError::Conflict(e.to_string()),
                }));
            }
            Command::Approve { id, approve, reply } => {
                let _ = reply.send(self.answer_pending(&id, approve));
            }
            Command::Trigger {
                service,
                to,
                reason,
                force,
                reply,
            } => {
                let _ = reply.send(self.trigger(&service, &to, reason, force));
            }
            Command::Reload(reply) => {
                let r = self.reload().await;
                let _ = reply.send(r);
            }
            Command::Ready(reply) => {
                let _ = reply.send(self.readiness());
            }
            Command::Shutdown => {}
        }
    }

    async fn reload(&mut self) -> Result<(), ConfigErrors> {
        if self.notify {
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Reloading,
                    sd_notify::NotifyState::monotonic_usec_now()
                        .unwrap_or(sd_notify::NotifyState::MonotonicUsec(0)),
                ],
            );
        }
        let path = self.config().path.clone();
        let result = Loaded::from_file(&path).and_then(|l| l.reloadable_over(self.config()));
        let outcome = match result {
            Ok(loaded) => {
                self.loaded = loaded;
                self.refresh_placements();
                self.conduit.configure(self.loaded.config.clone());
                self.init_series();
                if let Err(e) = self.start_scheduler().await {
                    tracing::error!("The scheduler did not restart after the reload: {e}.");
                }
                self.sync_pollers();
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!("Reloaded the configuration from {}.", path.display());
                for f in feeds(self.config()) {
                    if !self.polled_once.contains(&f.job) {
                        self.start_poll(f.job);
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    "The new configuration was refused; the running one stays in force:\n{e}"
                );
                Err(e)
            }
        };
        if self.notify {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
        outcome
    }
}

/// Where `service` runs: where the journal placed it, while that provider is configured;
/// else where its configuration puts it.
fn placed_at<'a>(config: &Config, placements: &'a Placements, service: &'a ServiceSpec) -> &'a str {
    let at = placements.provider_of(&service.name, &service.provider);
    if config.providers.contains_key(at) {
        at
    } else {
        &service.provider
    }
}
