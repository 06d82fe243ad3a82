//! The supervisor: one task that owns the Broker's state. Scheduler jobs, pollers, the
//! evaluation worker, the API and signals only send it messages; it answers, updates the
//! state and publishes the market snapshot through a `watch` channel (swap, don't lock).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};

use super::decisions::{Decision, DecisionLog, Outcome, ProposedPlan};
use super::guard::{self, Proposal, RailVerdict};
use super::state::{PersistedState, StateFile};
use super::{benchmarks, pricing, regions, shock};
use crate::conduit::{Conduit, ConduitError, RelocationRequest};
use crate::config::{Config, ConfigErrors, Mode};
use crate::model::{bounded_reason, MarketSnapshot, SourceStatus, Verdict, MAX_REASON_BYTES};
use crate::policy::context::{DecisionContext, Market};
use crate::policy::{Limits, Policy};
use crate::telemetry::Metrics;

/// Policies compiled for one configuration, by policy name.
pub type Policies = BTreeMap<String, Arc<Policy>>;

/// Work the scheduler asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    Evaluate,
    Poll(String),
}

impl Job {
    pub fn name(&self) -> &str {
        match self {
            Job::Evaluate => "evaluate",
            Job::Poll(s) => s,
        }
    }
}

/// Messages to the supervisor.
pub enum Command {
    Tick(Job),
    PollDone {
        source: String,
        started: Instant,
        result: PollResult,
    },
    EvaluationDone(Vec<Evaluation>),
    Services(oneshot::Sender<Vec<ServiceStatus>>),
    Decisions {
        query: DecisionQuery,
        reply: oneshot::Sender<Vec<Decision>>,
    },
    Relocations(oneshot::Sender<Vec<crate::conduit::Relocation>>),
    Relocation {
        id: String,
        reply: oneshot::Sender<Option<crate::conduit::Relocation>>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<crate::conduit::Relocation, ApiError>>,
    },
    Approve {
        id: String,
        approve: bool,
        reply: oneshot::Sender<Result<Decision, ApiError>>,
    },
    Trigger {
        service: String,
        to: String,
        reason: Option<String>,
        force: bool,
        reply: oneshot::Sender<Result<Decision, ApiError>>,
    },
    Reload(oneshot::Sender<Result<(), ConfigErrors>>),
    Ready(oneshot::Sender<Readiness>),
    Shutdown,
}

/// Outcome of one poll.
pub enum PollResult {
    Pricing(Result<pricing::PollOutcome, pricing::PricingError>),
    Benchmark(Result<crate::model::IoFigures, benchmarks::BenchmarkError>),
}

/// One service's policy evaluation, before the guard rails.
#[derive(Clone)]
pub struct Evaluation {
    pub service: String,
    pub policy: String,
    pub policy_hash: String,
    pub input_digest: String,
    pub provider: String,
    pub verdict: Result<Verdict, String>,
    pub current_monthly_cost: Option<f64>,
    pub currency: String,
    /// Monthly cost and migration cost of the cheapest fitting offer, by provider.
    pub targets: BTreeMap<String, (f64, f64)>,
    /// The flavor of that offer, by provider: what a relocation there would run on.
    pub target_flavors: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DecisionQuery {
    pub service: Option<String>,
    pub outcome: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub waiting_for: Vec<String>,
}

/// A service as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub provider: String,
    pub policy: String,
    pub mode: Mode,
    pub pinned: bool,
    pub monthly_cost: Option<f64>,
    pub currency: String,
    pub best_alternative: Option<String>,
    pub best_alternative_monthly_cost: Option<f64>,
    pub placed_since: Option<DateTime<Utc>>,
    pub streak_target: Option<String>,
    pub streak: u32,
    pub last_decision: Option<String>,
    pub last_outcome: Option<Outcome>,
    pub pending_decision: Option<String>,
    /// Where the pending decision would move the service.
    pub pending_target: Option<String>,
    /// The relocation of the service in progress (queued, running, rolling back, or in its
    /// grace period).
    pub relocation: Option<ActiveRelocation>,
}

/// A service's relocation in progress, as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveRelocation {
    pub id: String,
    pub to: String,
    pub state: crate::conduit::RelocationState,
    /// The step or steps running now, or what the state means.
    pub detail: String,
}

/// The handle the rest of the daemon holds.
#[derive(Clone)]
pub struct BrokerHandle {
    pub commands: mpsc::Sender<Command>,
    pub market: watch::Receiver<Arc<MarketSnapshot>>,
    pub metrics: Arc<Metrics>,
}

impl BrokerHandle {
    /// Sends a request and waits for its answer; `None` when the broker has stopped.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// Compiles every policy of `config`; all errors at once.
pub fn compile_policies(config: &Config) -> Result<Policies, ConfigErrors> {
    let limits = Limits::from(&config.broker);
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.policies {
        let compiled = std::fs::read_to_string(&spec.file)
            .map_err(|e| format!("cannot read the policy file: {e}"))
            .and_then(|source| {
                Policy::compile(name.clone(), &source, &limits).map_err(|e| e.to_string())
            });
        match compiled {
            Ok(p) => {
                out.insert(name.clone(), Arc::new(p));
            }
            Err(e) => errors.push(crate::config::ConfigError {
                file: spec.file.clone(),
                location: None,
                key: format!("policies.{name}"),
                message: e,
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads the region table of a configuration (shipped table plus the configured file).
fn region_table(config: &Config) -> Result<regions::RegionTable, ConfigErrors> {
    let base = regions::RegionTable::builtin();
    match &config.regions_file {
        None => Ok(base),
        Some(path) => regions::RegionTable::load(path)
            .map(|t| base.merged(&t))
            .map_err(|e| {
                ConfigErrors(vec![crate::config::ConfigError {
                    file: path.clone(),
                    location: None,
                    key: "regions.file".into(),
                    message: e.to_string(),
                }])
            }),
    }
}

/// Everything that comes from one configuration file.
/// A configuration with everything it names read and checked: the one way `check`, the
/// daemon's start and a reload load a file, so "valid" means the same to all three.
pub struct Loaded {
    config: Arc<Config>,
    policies: Arc<Policies>,
    regions: regions::RegionTable,
}

impl Loaded {
    /// Reads and validates the file, compiles its policies, reads its region table and
    /// checks the API token the daemon would read; every problem at once.
    pub fn from_file(path: &std::path::Path) -> Result<Loaded, ConfigErrors> {
        Config::load(path).and_then(Loaded::load)
    }

    fn load(config: Config) -> Result<Loaded, ConfigErrors> {
        let mut all = Vec::new();
        let policies = compile_policies(&config).map_err(|e| all.extend(e.0));
        let regions = region_table(&config).map_err(|e| all.extend(e.0));
        if let Err(e) = crate::api::check_token(&config) {
            all.push(crate::config::ConfigError {
                file: config.path.clone(),
                location: None,
                key: "daemon.api_token_file".into(),
                message: e.to_string(),
            });
        }
        match (policies, regions) {
            (Ok(p), Ok(r)) if all.is_empty() => Ok(Loaded {
                config: Arc::new(config),
                policies: Arc::new(p),
                regions: r,
            }),
            _ => Err(ConfigErrors(all)),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn policies(&self) -> usize {
        self.policies.len()
    }
}

pub struct Supervisor {
    loaded: Loaded,
    market: Arc<MarketSnapshot>,
    market_tx: watch::Sender<Arc<MarketSnapshot>>,
    commands_tx: mpsc::Sender<Command>,
    commands: mpsc::Receiver<Command>,
    metrics: Arc<Metrics>,
    conduit: Arc<dyn Conduit>,
    client: reqwest::Client,
    busy: BTreeSet<String>,
    polled_once: BTreeSet<String>,
    /// Sources that had good data at least once: readiness waits for every one of them.
    had_data: BTreeSet<String>,
    /// Sources that asked (`Retry-After`) not to be polled before a time.
    not_before: BTreeMap<String, Instant>,
    evaluated_once: bool,
    scheduler: Option<JobScheduler>,
    log: DecisionLog,
    state_file: StateFile,
    state: PersistedState,
    /// Last logged (outcome, target, rail, policy hash) by service, to log changes only.
    last_logged: BTreeMap<String, (Outcome, Option<String>, Option<String>, String)>,
    last_costs: BTreeMap<String, Evaluation>,
    /// The label values of each service's cost series as last exported, so that a series
    /// whose provider or currency changed is removed rather than left at its old value.
    cost_series: BTreeMap<String, CostSeries>,
    /// When the relocations of the current window were submitted, read from the journal at
    /// each tick (plus this tick's own submissions): budgets count only relocations that exist.
    relocation_starts: Vec<DateTime<Utc>>,
    notify: bool,
}

impl Supervisor {
    /// Builds the supervisor for a validated configuration. Fails when a policy does not
    /// compile or the state directory is unusable.
    pub fn new(
        loaded: Loaded,
        conduit: Arc<dyn Conduit>,
        metrics: Arc<Metrics>,
        notify: bool,
    ) -> anyhow::Result<(Supervisor, BrokerHandle)> {
        let state_dir = &loaded.config.daemon.state_dir;
        std::fs::create_dir_all(state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the state directory {}: {e}",
                state_dir.display()
            )
        })?;
        std::fs::create_dir_all(loaded.config.cache_dir()).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the cache directory {}: {e}",
                loaded.config.cache_dir().display()
            )
        })?;
        // A local provider is a directory; make sure it exists so its benchmark can run.
        for p in loaded.config.providers.values() {
            if let (crate::config::Driver::Local, Some(root)) = (p.driver, &p.root) {
                std::fs::create_dir_all(root).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot create the directory {} of provider `{}`: {e}",
                        root.display(),
                        p.name
                    )
                })?;
            }
        }
        let log = DecisionLog::open(&loaded.config.decision_log_path())?;
        let state_file = StateFile::new(state_dir);
        let state = state_file.load();
        let (commands_tx, commands) = mpsc::channel(1024);
        let mut market = MarketSnapshot::default();
        refresh_regions(&mut market, &loaded);
        let market = Arc::new(market);
        let (market_tx, market_rx) = watch::channel(market.clone());
        let client = reqwest::Client::builder()
            .user_agent(concat!("fluidcloud/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let handle = BrokerHandle {
            commands: commands_tx.clone(),
            market: market_rx,
            metrics: metrics.clone(),
        };
        let mut s = Supervisor {
            loaded,
            market,
            market_tx,
            commands_tx,
            commands,
            metrics,
            conduit,
            client,
            busy: BTreeSet::new(),
            polled_once: BTreeSet::new(),
            had_data: BTreeSet::new(),
            not_before: BTreeMap::new(),
            evaluated_once: false,
            scheduler: None,
            log,
            state_file,
            state,
            last_logged: BTreeMap::new(),
            last_costs: BTreeMap::new(),
            cost_series: BTreeMap::new(),
            relocation_starts: Vec::new(),
            notify,
        };
        s.apply_placements();
        s.init_series();
        s.seed_last_logged();
        Ok((s, handle))
    }

    fn config(&self) -> &Config {
        &self.loaded.config
    }

    fn sources(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (name, p) in &self.config().providers {
            if let Some(s) = &p.pricing {
                out.push((format!("pricing:{name}"), s.max_age.as_secs()));
            }
            if let Some(b) = &p.benchmark {
                out.push((format!("benchmark:{name}"), b.max_age.as_secs()));
            }
        }
        out
    }

    fn init_series(&mut self) {
        let sources = self.sources();
        for (s, _) in &sources {
            self.metrics.init_source(s);
        }
        self.metrics.ticks_skipped.with_label_values(&["evaluate"]);
        for p in self.config().policies.keys() {
            self.metrics.init_policy(p);
        }
        // Keep the freshness of sources that still exist; start new ones empty.
        let mut market = (*self.market).clone();
        let keep: BTreeSet<_> = sources.iter().map(|(s, _)| s.clone()).collect();
        market.sources.retain(|k, _| keep.contains(k));
        for (s, max_age) in sources {
            market
                .sources
                .entry(s.clone())
                .and_modify(|st| st.max_age_secs = max_age)
                .or_insert_with(|| SourceStatus::new(s, max_age));
        }
        let providers: BTreeSet<_> = self.config().providers.keys().cloned().collect();
        market.offers.retain(|k, _| providers.contains(k));
        market.io.retain(|k, _| providers.contains(k));
        market.price_shocks.retain(|k, _| providers.contains(k));
        let priced: BTreeSet<_> = self
            .config()
            .providers
            .values()
            .filter(|p| p.pricing.is_some())
            .map(|p| p.name.clone())
            .collect();
        self.state.prices.retain(|k, _| priced.contains(k));
        refresh_regions(&mut market, &self.loaded);
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

    async fn start_scheduler(&mut self) -> anyhow::Result<()> {
        if let Some(mut old) = self.scheduler.take() {
            let _ = old.shutdown().await;
        }
        let sched = JobScheduler::new().await?;
        let mut jobs = vec![(
            Job::Evaluate,
            self.config().broker.evaluate_schedule.clone(),
        )];
        for (name, p) in &self.config().providers {
            if let Some(s) = &p.pricing {
                jobs.push((Job::Poll(format!("pricing:{name}")), s.schedule.clone()));
            }
            if let Some(b) = &p.benchmark {
                jobs.push((Job::Poll(format!("benchmark:{name}")), b.schedule.clone()));
            }
        }
        for (job, schedule) in jobs {
            let tx = self.commands_tx.clone();
            let metrics = self.metrics.clone();
            let cron = CronJob::new_async(schedule.as_str(), move |_id, _sched| {
                let tx = tx.clone();
                let job = job.clone();
                let metrics = metrics.clone();
                Box::pin(async move {
                    // The scheduler only sends ticks; a full queue means the supervisor is
                    // far behind, and the tick is dropped and counted.
                    if tx.try_send(Command::Tick(job.clone())).is_err() {
                        metrics.ticks_skipped.with_label_values(&[job.name()]).inc();
                    }
                })
            })?;
            sched.add(cron).await?;
        }
        sched.start().await?;
        self.scheduler = Some(sched);
        Ok(())
    }

    /// Runs until a shutdown command; returns after the scheduler has stopped.
    pub async fn run(mut self) -> anyhow::Result<()> {
        self.start_scheduler().await?;
        tracing::info!(
            "The broker is running with {} providers, {} services and {} policies.",
            self.config().providers.len(),
            self.config().services.len(),
            self.config().policies.len()
        );
        // Poll everything once at start so decisions do not wait for the first schedule.
        for (s, _) in self.sources() {
            self.start_poll(s);
        }
        let mut watchdog_usec = 0u64;
        let watchdog = self.notify && sd_notify::watchdog_enabled(false, &mut watchdog_usec);
        let period = if watchdog {
            std::time::Duration::from_micros(watchdog_usec / 2)
        } else {
            std::time::Duration::from_secs(3600)
        };
        let mut heartbeat = tokio::time::interval(period);
        loop {
            let cmd = tokio::select! {
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
        if let Some(mut s) = self.scheduler.take() {
            let _ = s.shutdown().await;
        }
        tracing::info!("The broker has stopped.");
        Ok(())
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Tick(Job::Evaluate) => self.start_evaluation(),
            Command::Tick(Job::Poll(s)) => self.start_poll(s),
            Command::PollDone {
                source,
                started,
                result,
            } => self.finish_poll(source, started, result),
            Command::EvaluationDone(evals) => self.apply(evals),
            Command::Services(reply) => {
                self.apply_placements();
                let _ = reply.send(self.services());
            }
            Command::Decisions { query, reply } => {
                let _ = reply.send(self.decisions(&query));
            }
            Command::Relocations(reply) => {
                let _ = reply.send(self.conduit.relocations());
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

    /// Ready once every source has had good data (a poll that only failed is not enough:
    /// decisions would lack that provider) and one evaluation ran.
    fn readiness(&self) -> Readiness {
        let mut waiting_for: Vec<String> = self
            .sources()
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| !self.had_data.contains(s))
            .collect();
        if !self.evaluated_once && !self.config().services.is_empty() {
            waiting_for.push("evaluate".into());
        }
        Readiness {
            ready: waiting_for.is_empty(),
            waiting_for,
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
        let result = Loaded::from_file(&path).and_then(|l| self.needs_restart(l));
        let outcome = match result {
            Ok(loaded) => {
                self.loaded = loaded;
                self.apply_placements();
                self.conduit.configure(self.loaded.config.clone());
                self.init_series();
                if let Err(e) = self.start_scheduler().await {
                    tracing::error!("The scheduler did not restart after the reload: {e}.");
                }
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!("Reloaded the configuration from {}.", path.display());
                for (s, _) in self.sources() {
                    if !self.polled_once.contains(&s) {
                        self.start_poll(s);
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

    /// Refuses a configuration whose changes only a restart can apply.
    fn needs_restart(&self, loaded: Loaded) -> Result<Loaded, ConfigErrors> {
        let (old, new) = (&self.config().daemon, &loaded.config.daemon);
        let mut errors = Vec::new();
        let mut changed = |key: &str, from: String, to: String| {
            if from != to {
                errors.push(crate::config::ConfigError {
                    file: loaded.config.path.clone(),
                    location: None,
                    key: key.into(),
                    message: format!(
                        "changed from {from} to {to}, which needs a restart of the daemon; the running configuration stays in force"
                    ),
                });
            }
        };
        changed(
            "daemon.listen",
            old.listen.to_string(),
            new.listen.to_string(),
        );
        changed(
            "daemon.state_dir",
            old.state_dir.display().to_string(),
            new.state_dir.display().to_string(),
        );
        let token_file = |d: &crate::config::DaemonSettings| match &d.api_token_file {
            Some(p) => p.display().to_string(),
            None => "(none)".into(),
        };
        changed("daemon.api_token_file", token_file(old), token_file(new));
        changed(
            "daemon.log_format",
            format!("{:?}", old.log_format).to_lowercase(),
            format!("{:?}", new.log_format).to_lowercase(),
        );
        if errors.is_empty() {
            Ok(loaded)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn start_poll(&mut self, source: String) {
        if let Some(until) = self.not_before.get(&source) {
            if Instant::now() < *until {
                // Logged once, when the source asked; every skipped tick is counted.
                self.metrics
                    .polls_deferred
                    .with_label_values(&[&source])
                    .inc();
                tracing::debug!("Skipping a tick of {source}: it asked to be polled later.");
                return;
            }
            self.not_before.remove(&source);
        }
        if self.busy.contains(&source) {
            self.metrics
                .ticks_skipped
                .with_label_values(&[&source])
                .inc();
            tracing::warn!("Skipping a tick of {source}: the previous poll is still running.");
            return;
        }
        let Some((kind, provider)) = source.split_once(':') else {
            return;
        };
        let Some(p) = self.config().providers.get(provider).cloned() else {
            return;
        };
        self.busy.insert(source.clone());
        self.metrics.poll_runs.with_label_values(&[&source]).inc();
        let tx = self.commands_tx.clone();
        let started = Instant::now();
        let client = self.client.clone();
        let cache = self.config().cache_dir();
        let kind = kind.to_string();
        tokio::spawn(async move {
            let result = match (kind.as_str(), &p.pricing, &p.benchmark) {
                ("pricing", Some(src), _) => {
                    PollResult::Pricing(pricing::poll(&p.name, src, &client, &cache).await)
                }
                (_, _, Some(b)) => PollResult::Benchmark(benchmarks::measure(b).await),
                _ => return,
            };
            let _ = tx
                .send(Command::PollDone {
                    source,
                    started,
                    result,
                })
                .await;
        });
    }

    fn finish_poll(&mut self, source: String, started: Instant, result: PollResult) {
        self.busy.remove(&source);
        self.polled_once.insert(source.clone());
        let m = &self.metrics;
        m.poll_duration
            .with_label_values(&[&source])
            .observe(started.elapsed().as_secs_f64());
        let provider = source
            .split_once(':')
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        if !self.config().providers.contains_key(&provider) {
            return; // removed by a reload while it ran
        }
        let now = Utc::now();
        let mut market = (*self.market).clone();
        let status = market
            .sources
            .entry(source.clone())
            .or_insert_with(|| SourceStatus::new(source.clone(), 86_400));
        status.last_attempt = Some(now);
        status.retry_after = None;
        let mut retry_after = None;
        let error = match result {
            PollResult::Pricing(Ok(out)) => {
                m.rows_rejected
                    .with_label_values(&[&source])
                    .inc_by(out.rejected.len() as u64);
                status.records = out.offers.len();
                m.market_offers
                    .with_label_values(&[&provider])
                    .set(out.offers.len() as i64);
                if let Some(src) = self
                    .loaded
                    .config
                    .providers
                    .get(&provider)
                    .and_then(|p| p.pricing.as_ref())
                {
                    let watch = self.state.prices.entry(provider.clone()).or_default();
                    let shocks = shock::observe(
                        &provider,
                        watch,
                        &out.offers,
                        !out.from_cache,
                        src.max_price_drop_ratio,
                        src.price_drop_confirmations,
                    );
                    // A cached copy saw nothing new: the shocks known stay as they were.
                    if !out.from_cache {
                        if shocks.is_empty() {
                            market.price_shocks.remove(&provider);
                        } else {
                            market.price_shocks.insert(provider.clone(), shocks);
                        }
                    }
                }
                market.offers.insert(provider.clone(), Arc::new(out.offers));
                None
            }
            PollResult::Benchmark(Ok(io)) => {
                status.records = 1;
                market.io.insert(provider.clone(), io);
                None
            }
            PollResult::Pricing(Err(e)) => {
                // Rows refused by a poll that failed because of them are refused rows too.
                m.rows_rejected
                    .with_label_values(&[&source])
                    .inc_by(e.rejected_rows());
                retry_after = e.retry_after();
                Some(e.to_string())
            }
            PollResult::Benchmark(Err(e)) => Some(e.to_string()),
        };
        match error {
            None => {
                self.had_data.insert(source.clone());
                status.last_success = Some(now);
                status.stale = false;
                status.last_error = None;
                m.poll_last_success
                    .with_label_values(&[&source])
                    .set(now.timestamp_millis() as f64 / 1000.0);
                m.data_stale.with_label_values(&[&source]).set(0);
                tracing::info!("Polled {source}: {} records.", status.records);
            }
            Some(e) => {
                m.poll_errors.with_label_values(&[&source]).inc();
                status.stale = status.last_success.is_some();
                status.last_error = Some(e.clone());
                m.data_stale.with_label_values(&[&source]).set(1);
                tracing::warn!("Polling {source} failed; the last good data is kept: {e}");
                if let Some(asked) = retry_after {
                    // Bounded: a feed must not silence itself for longer than its data
                    // stays usable, nor for more than an hour.
                    let wait = asked
                        .min(pricing::MAX_RETRY_AFTER)
                        .min(std::time::Duration::from_secs(status.max_age_secs));
                    if !wait.is_zero() {
                        self.not_before
                            .insert(source.clone(), Instant::now() + wait);
                        let until = now + chrono::Duration::from_std(wait).unwrap_or_default();
                        status.retry_after = Some(until);
                        tracing::warn!(
                            "{source} asked to be polled again in {} s; its scheduled polls are skipped until {until} ({} s).",
                            asked.as_secs(),
                            wait.as_secs()
                        );
                    }
                }
            }
        }
        market.taken_at = Some(now);
        self.publish(market);
    }

    /// Where relocations moved services overrides the configuration's `provider`, which
    /// only says where a service starts.
    fn apply_placements(&mut self) {
        let placements = self.conduit.placements();
        let config = &self.loaded.config;
        let moved: Vec<(&String, &String)> = placements
            .iter()
            .filter(|(s, p)| {
                config
                    .services
                    .get(*s)
                    .is_some_and(|spec| &spec.provider != *p && config.providers.contains_key(*p))
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        let mut patched = (**config).clone();
        for (service, provider) in moved {
            if let Some(spec) = patched.services.get_mut(service) {
                spec.provider = provider.clone();
            }
        }
        self.loaded.config = Arc::new(patched);
    }

    fn start_evaluation(&mut self) {
        self.apply_placements();
        if self.busy.contains("evaluate") {
            self.metrics
                .ticks_skipped
                .with_label_values(&["evaluate"])
                .inc();
            tracing::warn!("Skipping an evaluation tick: the previous one is still running.");
            return;
        }
        self.busy.insert("evaluate".into());
        let config = self.loaded.config.clone();
        let policies = self.loaded.policies.clone();
        let market = self.market.clone();
        let metrics = self.metrics.clone();
        let tx = self.commands_tx.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let evals = evaluate_all(&config, &policies, &market, &metrics, Utc::now());
            metrics
                .policy_tick_duration
                .observe(started.elapsed().as_secs_f64());
            let _ = tx.blocking_send(Command::EvaluationDone(evals));
        });
    }

    /// Applies guard rails and modes to one tick's evaluations, logs and acts.
    fn apply(&mut self, evals: Vec<Evaluation>) {
        self.busy.remove("evaluate");
        self.apply_placements();
        self.evaluated_once = true;
        let now = Utc::now();
        let window_start = now
            - chrono::Duration::from_std(self.config().broker.relocation_window)
                .unwrap_or(chrono::Duration::MAX);
        let total = evals.len();
        let config = self.loaded.config.clone();
        let mut passed: Vec<Decision> = Vec::new();
        let relocations = self.conduit.relocations();
        self.remember_relocations(&relocations, window_start);
        let relocating: BTreeSet<String> = relocations
            .into_iter()
            .filter(|r| r.state.is_active())
            .map(|r| r.request.service)
            .collect();
        let mut decisions: Vec<Decision> = Vec::new();

        for ev in evals {
            let Some(service) = config.services.get(&ev.service) else {
                continue;
            };
            let Some(policy) = config.policies.get(&ev.policy) else {
                continue;
            };
            self.last_costs.insert(ev.service.clone(), ev.clone());
            // Placement memory follows the configured provider.
            let memory = self.state.services.entry(ev.service.clone()).or_default();
            if memory.provider != service.provider {
                memory.provider = service.provider.clone();
                memory.placed_since = Some(now);
                memory.streak_target = None;
                memory.streak = 0;
            }
            let mut d = Decision {
                id: String::new(),
                time: now,
                service: ev.service.clone(),
                policy: ev.policy.clone(),
                policy_hash: ev.policy_hash.clone(),
                input_digest: ev.input_digest.clone(),
                mode: policy.mode.as_str().into(),
                provider: ev.provider.clone(),
                verdict: None,
                outcome: Outcome::Stay,
                suppressed_by: None,
                rails: Vec::new(),
                current_monthly_cost: ev.current_monthly_cost,
                target_monthly_cost: None,
                migration_cost: None,
                refers_to: None,
                error: None,
                plan: None,
            };
            self.metrics
                .policy_evaluations
                .with_label_values(&[
                    ev.policy.as_str(),
                    if ev.verdict.is_ok() { "ok" } else { "error" },
                ])
                .inc();
            export_costs(&self.metrics, &mut self.cost_series, &ev);
            match &ev.verdict {
                Err(e) => {
                    memory.observe(None);
                    d.outcome = Outcome::Error;
                    d.error = Some(e.clone());
                }
                Ok(v @ Verdict::Stay { .. }) => {
                    memory.observe(None);
                    d.verdict = Some(v.clone());
                }
                Ok(
                    v @ Verdict::Relocate {
                        provider: target,
                        compulsory,
                        ..
                    },
                ) => {
                    d.verdict = Some(v.clone());
                    let streak = memory.observe(Some(target));
                    let memory = memory.clone();
                    let figures = ev.targets.get(target).copied();
                    let target_known = if target == &service.provider {
                        Err(format!("the policy asked to move to `{target}`, where the service already runs"))
                    } else if !config.providers.contains_key(target) {
                        Err(format!(
                            "the policy named `{target}`, which is not a configured provider"
                        ))
                    } else if figures.is_none() {
                        Err(format!("`{target}` has no offer that fits the service"))
                    } else {
                        Ok(())
                    };
                    let (target_cost, migration) = figures.unwrap_or((f64::NAN, f64::NAN));
                    d.target_monthly_cost = figures.map(|f| f.0);
                    d.migration_cost = figures.map(|f| f.1);
                    let active = relocating.len();
                    let already = relocating.contains(&ev.service);
                    let proposal = Proposal {
                        target,
                        compulsory: *compulsory,
                        pinned: service.pinned,
                        target_known,
                        current_monthly_cost: ev.current_monthly_cost.unwrap_or(f64::NAN),
                        target_monthly_cost: target_cost,
                        migration_cost: migration,
                        stale_sources: self.stale_sources(&[&service.provider, target], now),
                        target_shock: self.target_shock(target, &ev),
                        streak,
                        memory: &memory,
                        active_relocations: active,
                        relocations_in_window: self.relocation_starts.len(),
                        already_relocating: already,
                    };
                    d.rails = guard::judge(&proposal, policy, &config.broker, now);
                    if let Some(r) = guard::first_refusal(&d.rails) {
                        d.outcome = Outcome::Suppressed;
                        d.suppressed_by = Some(r.rail.clone());
                    } else {
                        d.outcome = match policy.mode {
                            Mode::Audit => Outcome::Audited,
                            Mode::Approve => Outcome::PendingApproval,
                            Mode::Enforce => Outcome::Submitted,
                        };
                        if d.outcome == Outcome::PendingApproval {
                            // The operator approves a plan, not a wish: one the conduit
                            // cannot make does not wait for anybody.
                            match self.conduit.plan(&d.service, target) {
                                Ok(plan) => {
                                    d.plan = Some(ProposedPlan::new(
                                        &plan,
                                        policy.expected_downtime.as_secs_f64(),
                                        d.migration_cost,
                                        d.target_monthly_cost,
                                    ))
                                }
                                Err(e) => {
                                    d.outcome = Outcome::Suppressed;
                                    d.suppressed_by = Some("conduit_refused".into());
                                    d.rails.push(RailVerdict {
                                        rail: "conduit_refused".into(),
                                        passed: false,
                                        detail: format!("no plan can be made: {e}"),
                                    });
                                    decisions.push(d);
                                    continue;
                                }
                            }
                        }
                        passed.push(d);
                        continue;
                    }
                }
            }
            decisions.push(d);
        }
        // A service that is no longer configured has no cost to export.
        let metrics = &self.metrics;
        self.cost_series.retain(|service, series| {
            let keep = config.services.contains_key(service);
            if !keep {
                series.remove_unless_in(metrics, service, &CostSeries::default());
            }
            keep
        });

        // The safety belt: a tick that would move too much at once moves nothing.
        let limit = (config.broker.max_relocations_percent / 100.0 * total as f64).ceil() as usize;
        let moving = passed
            .iter()
            .filter(|d| d.outcome != Outcome::Audited)
            .count();
        if moving > limit.max(1) {
            tracing::error!(
                "This tick would relocate {moving} of {total} services, more than {}%; none is relocated.",
                config.broker.max_relocations_percent
            );
            for d in &mut passed {
                d.rails.push(RailVerdict {
                    rail: "max_relocations_percent".into(),
                    passed: false,
                    detail: format!(
                        "{moving} of {total} services would move in one tick, at most {}% allowed",
                        config.broker.max_relocations_percent
                    ),
                });
                d.outcome = Outcome::Suppressed;
                d.suppressed_by = Some("max_relocations_percent".into());
            }
        }
        let max_active = config.broker.max_concurrent_relocations as usize;
        let max_window = config.broker.max_relocations_per_window as usize;
        for mut d in passed {
            if d.outcome == Outcome::Submitted {
                // Every service was judged against the budgets as they stood at the start of
                // the tick; the ones submitted earlier in this tick count too.
                let active = self.conduit.active();
                let refusal = if active >= max_active {
                    Some((
                        "concurrency_budget",
                        format!("{active} relocations in progress after this tick's earlier submissions, at most {max_active}"),
                    ))
                } else if self.relocation_starts.len() >= max_window {
                    Some((
                        "window_budget",
                        format!(
                            "{} relocations in the window after this tick's earlier submissions, at most {max_window}",
                            self.relocation_starts.len()
                        ),
                    ))
                } else {
                    // The relocation takes the decision's id: the id is given before the
                    // conduit sees the request, and the decision is logged under it.
                    d.id = self.log.next_id(now);
                    self.submit(&d, "policy").err().map(|e| match e {
                        ConduitError::AlreadyRelocating(_) => ("already_relocating", e.to_string()),
                        _ => ("conduit_refused", e.to_string()),
                    })
                };
                if let Some((rail, detail)) = refusal {
                    d.outcome = Outcome::Suppressed;
                    d.suppressed_by = Some(rail.into());
                    d.rails.push(RailVerdict {
                        rail: rail.into(),
                        passed: false,
                        detail,
                    });
                }
            }
            decisions.push(d);
        }
        for d in decisions {
            self.record(d, now);
        }
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!("Cannot save the broker state: {e}.");
        }
        self.metrics
            .relocations_active
            .set(self.conduit.active() as i64);
    }

    /// Takes the window budget and each service's last relocation from the relocations the
    /// conduit really holds, never from what was asked of it.
    fn remember_relocations(
        &mut self,
        relocations: &[crate::conduit::Relocation],
        window_start: DateTime<Utc>,
    ) {
        self.relocation_starts = relocations
            .iter()
            .map(|r| r.submitted_at)
            .filter(|t| *t >= window_start)
            .collect();
        let mut last: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
        for r in relocations {
            let t = last.entry(&r.request.service).or_insert(r.submitted_at);
            *t = (*t).max(r.submitted_at);
        }
        for service in last.keys() {
            self.state
                .services
                .entry((*service).to_string())
                .or_default();
        }
        // A last relocation the journal does not hold never happened.
        for (service, m) in &mut self.state.services {
            m.last_relocation = last.get(service.as_str()).copied();
        }
    }

    /// Counts, logs (when it says something new) and remembers one decision.
    fn record(&mut self, mut d: Decision, now: DateTime<Utc>) {
        self.metrics
            .decisions
            .with_label_values(&[d.outcome.as_str()])
            .inc();
        if let Some(r) = &d.suppressed_by {
            self.metrics.suppressions.with_label_values(&[r]).inc();
        }
        let key = log_key(&d);
        let streak_progress = d.suppressed_by.as_deref() == Some("confirmations");
        // A decision that already has its id was handed to the conduit under it: it is
        // always logged, so every relocation has its decision.
        if d.id.is_empty() {
            if self.last_logged.get(&d.service) == Some(&key) && !streak_progress {
                return;
            }
            d.id = self.log.next_id(now);
        }
        match d.outcome {
            Outcome::PendingApproval => {
                self.state.pending.insert(d.service.clone(), d.id.clone());
            }
            Outcome::Stay | Outcome::Suppressed | Outcome::Error => {
                // A pending decision the policy no longer stands behind is withdrawn.
                if let Some(old) = self.state.pending.remove(&d.service) {
                    tracing::info!(
                        "Withdrawing pending decision {old} of {}: the policy no longer asks for it.",
                        d.service
                    );
                }
            }
            _ => {}
        }
        match d.outcome {
            Outcome::Error => tracing::warn!(
                "Decision {} for {}: the evaluation failed: {}",
                d.id,
                d.service,
                d.reason()
            ),
            o => tracing::info!(
                "Decision {} for {}: {} ({}).",
                d.id,
                d.service,
                o.as_str(),
                d.reason()
            ),
        }
        self.last_logged.insert(d.service.clone(), key);
        if let Err(e) = self.log.append(d) {
            tracing::error!("{e}");
        }
    }

    /// Why the offer a relocation to `target` would run on is in market shock, if it is.
    fn target_shock(&self, target: &str, ev: &Evaluation) -> Option<String> {
        let flavor = ev.target_flavors.get(target)?;
        let shock = self.market.price_shocks.get(target)?.get(flavor)?;
        Some(shock::describe(target, flavor, shock))
    }

    fn stale_sources(&self, providers: &[&str], now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        for p in providers {
            for kind in ["pricing", "benchmark"] {
                let name = format!("{kind}:{p}");
                if let Some(st) = self.market.sources.get(&name) {
                    if st.too_old(now) {
                        out.push(match st.age_secs(now) {
                            Some(a) => format!("{name} is {a:.0}s old (max {}s)", st.max_age_secs),
                            None => format!("{name} has no data yet"),
                        });
                    }
                } else if kind == "pricing" {
                    out.push(format!("{name} is not configured"));
                }
            }
        }
        out
    }

    fn submit(&mut self, d: &Decision, origin: &str) -> Result<(), ConduitError> {
        let Some(Verdict::Relocate {
            provider, reason, ..
        }) = &d.verdict
        else {
            return Err(ConduitError::Refused(
                "the decision is not a relocation".into(),
            ));
        };
        let req = RelocationRequest {
            decision_id: request_id(d),
            service: d.service.clone(),
            from: d.provider.clone(),
            to: provider.clone(),
            reason: reason.clone(),
            origin: origin.into(),
        };
        match self.conduit.submit(req) {
            Ok(_) => {
                self.metrics
                    .relocations_requested
                    .with_label_values(&[origin])
                    .inc();
                self.relocation_starts.push(Utc::now());
                let m = self.state.services.entry(d.service.clone()).or_default();
                m.last_relocation = Some(Utc::now());
                m.streak_target = None;
                m.streak = 0;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "Decision {} for {}: the conduit did not take the relocation: {e}.",
                    request_id(d),
                    d.service
                );
                self.metrics
                    .relocations_refused
                    .with_label_values(&[origin])
                    .inc();
                Err(e)
            }
        }
    }

    fn answer_pending(&mut self, id: &str, approve: bool) -> Result<Decision, ApiError> {
        let Some(original) = self.log.get(id).cloned() else {
            return Err(ApiError::NotFound(format!("no decision `{id}`")));
        };
        if self
            .state
            .pending
            .get(&original.service)
            .map(String::as_str)
            != Some(id)
        {
            return Err(ApiError::Conflict(format!(
                "decision `{id}` is not waiting for approval (its outcome was {})",
                original.outcome.as_str()
            )));
        }
        let now = Utc::now();
        let mut d = original.clone();
        d.time = now;
        d.refers_to = Some(original.id.clone());
        if approve {
            if let Err(changed) = self.still_as_proposed(&original) {
                // Withdrawn: the next evaluation proposes again, with what holds now.
                self.state.pending.remove(&original.service);
                self.last_logged.remove(&original.service);
                let _ = self.state_file.save(&self.state);
                tracing::info!(
                    "Decision {id} of {} was not approved: {changed}.",
                    original.service
                );
                return Err(ApiError::Conflict(format!(
                    "decision `{id}` cannot be approved: {changed}; it is withdrawn, and the next evaluation proposes again"
                )));
            }
        }
        self.state.pending.remove(&original.service);
        if approve {
            d.outcome = Outcome::Approved;
            // Budgets are judged again: time has passed since the decision.
            let active = self.conduit.active();
            let cfg = self.config().broker.clone();
            if active >= cfg.max_concurrent_relocations as usize {
                self.state
                    .pending
                    .insert(original.service.clone(), original.id.clone());
                return Err(ApiError::Conflict(format!(
                    "{active} relocations are in progress, at most {} allowed; approve later",
                    cfg.max_concurrent_relocations
                )));
            }
            if self.relocation_starts.len() >= cfg.max_relocations_per_window as usize {
                self.state
                    .pending
                    .insert(original.service.clone(), original.id.clone());
                return Err(ApiError::Conflict(
                    "the relocation budget of the window is spent; approve later".into(),
                ));
            }
            if let Err(e) = self.submit(&d, "operator") {
                self.state
                    .pending
                    .insert(original.service.clone(), original.id.clone());
                return Err(ApiError::Conflict(e.to_string()));
            }
        } else {
            d.outcome = Outcome::Rejected;
        }
        d.id = self.log.next_id(now);
        self.metrics
            .decisions
            .with_label_values(&[d.outcome.as_str()])
            .inc();
        tracing::info!(
            "Decision {} of {} was {} by an operator.",
            original.id,
            d.service,
            if approve { "approved" } else { "rejected" }
        );
        self.last_logged.insert(d.service.clone(), log_key(&d));
        if let Err(e) = self.log.append(d.clone()) {
            tracing::error!("{e}");
        }
        let _ = self.state_file.save(&self.state);
        Ok(d)
    }

    /// Whether a pending decision can still be approved as proposed: the service is where it
    /// was, the plan the conduit would run now is the one proposed, and the target's price
    /// has not changed. Says what changed otherwise.
    fn still_as_proposed(&self, d: &Decision) -> Result<(), String> {
        let Some(Verdict::Relocate { provider: to, .. }) = &d.verdict else {
            return Err("it is not a relocation".into());
        };
        let config = self.config();
        let now_at = config
            .services
            .get(&d.service)
            .map(|s| s.provider.clone())
            .ok_or_else(|| format!("`{}` is no longer configured", d.service))?;
        if now_at != d.provider {
            return Err(format!(
                "`{}` runs on `{now_at}` now, not on `{}`",
                d.service, d.provider
            ));
        }
        let Some(proposed) = &d.plan else {
            return Err("it carries no plan (it was proposed by an older version)".into());
        };
        let plan = self
            .conduit
            .plan(&d.service, to)
            .map_err(|e| format!("no plan can be made now: {e}"))?;
        if ProposedPlan::digest(&plan) != proposed.digest {
            return Err(format!(
                "the plan changed since it was proposed (steps now: {})",
                plan.step_names().join(", ")
            ));
        }
        let now_cost = self
            .last_costs
            .get(&d.service)
            .and_then(|ev| ev.targets.get(to.as_str()))
            .map(|(monthly, _)| *monthly);
        match (proposed.target_monthly_cost, now_cost) {
            (Some(then), Some(now)) if (then - now).abs() > 1e-9 * then.abs().max(1.0) => {
                Err(format!(
                    "the market changed: `{to}` costs {now:.2} a month now, {then:.2} when proposed"
                ))
            }
            (Some(_), None) => Err(format!("`{to}` has no fitting offer now")),
            _ => Ok(()),
        }
    }

    fn trigger(
        &mut self,
        service: &str,
        to: &str,
        reason: Option<String>,
        force: bool,
    ) -> Result<Decision, ApiError> {
        // Refused rather than cut: the operator is there to shorten it.
        if let Some(r) = reason.as_ref().filter(|r| r.len() > MAX_REASON_BYTES) {
            return Err(ApiError::Invalid(format!(
                "the reason is {} bytes long; at most {MAX_REASON_BYTES} are allowed",
                r.len()
            )));
        }
        self.apply_placements();
        let config = self.loaded.config.clone();
        let Some(spec) = config.services.get(service) else {
            return Err(ApiError::NotFound(format!(
                "no service `{service}`; configured services: {}",
                config
                    .services
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if !config.providers.contains_key(to) {
            return Err(ApiError::NotFound(format!(
                "no provider `{to}`; configured providers: {}",
                config
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if spec.provider == to {
            return Err(ApiError::Invalid(format!(
                "`{service}` already runs on `{to}`"
            )));
        }
        if spec.pinned && !force {
            return Err(ApiError::Conflict(format!(
                "`{service}` is pinned to `{}`; pass force to move it anyway",
                spec.provider
            )));
        }
        // An operator skips the policy's rails, not the budgets, unless told to.
        let active = self.conduit.active();
        if !force && active >= config.broker.max_concurrent_relocations as usize {
            return Err(ApiError::Conflict(format!(
                "{active} relocations are in progress, at most {} allowed; pass force to start one anyway",
                config.broker.max_concurrent_relocations
            )));
        }
        let now = Utc::now();
        let reason = reason.unwrap_or_else(|| "relocation requested by an operator".into());
        let mut d = Decision {
            id: self.log.next_id(now),
            time: now,
            service: service.into(),
            policy: spec.policy.clone(),
            policy_hash: String::new(),
            input_digest: String::new(),
            mode: "operator".into(),
            provider: spec.provider.clone(),
            verdict: Some(Verdict::Relocate {
                provider: to.into(),
                reason,
                compulsory: true,
            }),
            outcome: Outcome::Submitted,
            suppressed_by: None,
            rails: Vec::new(),
            current_monthly_cost: None,
            target_monthly_cost: None,
            migration_cost: None,
            refers_to: None,
            error: None,
            plan: None,
        };
        if let Some(ev) = self.last_costs.get(service) {
            d.current_monthly_cost = ev.current_monthly_cost;
            if let Some((m, mig)) = ev.targets.get(to) {
                d.target_monthly_cost = Some(*m);
                d.migration_cost = Some(*mig);
            }
        }
        self.submit(&d, "operator")
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        self.metrics
            .decisions
            .with_label_values(&[d.outcome.as_str()])
            .inc();
        tracing::info!("Decision {}: an operator sent {service} to {to}.", d.id);
        self.last_logged.insert(d.service.clone(), log_key(&d));
        if let Err(e) = self.log.append(d.clone()) {
            tracing::error!("{e}");
        }
        let _ = self.state_file.save(&self.state);
        Ok(d)
    }

    fn services(&self) -> Vec<ServiceStatus> {
        let config = self.config();
        // One pass over the log (newest wins) instead of one search per service.
        let last_by_service: BTreeMap<&str, &Decision> = self
            .log
            .recent()
            .iter()
            .map(|d| (d.service.as_str(), d))
            .collect();
        let relocations = self.conduit.relocations();
        let active: BTreeMap<&str, &crate::conduit::Relocation> = relocations
            .iter()
            .filter(|r| r.state.is_active())
            .map(|r| (r.request.service.as_str(), r))
            .collect();
        config
            .services
            .values()
            .map(|s| {
                let pending = self
                    .state
                    .pending
                    .get(&s.name)
                    .and_then(|id| self.log.get(id));
                let memory = self.state.services.get(&s.name);
                let last = last_by_service.get(s.name.as_str()).copied();
                let ev = self.last_costs.get(&s.name);
                let best = ev.and_then(|e| {
                    e.targets
                        .iter()
                        .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                        .map(|(p, (m, _))| (p.clone(), *m))
                });
                ServiceStatus {
                    name: s.name.clone(),
                    provider: s.provider.clone(),
                    policy: s.policy.clone(),
                    mode: config
                        .policies
                        .get(&s.policy)
                        .map(|p| p.mode)
                        .unwrap_or(Mode::Audit),
                    pinned: s.pinned,
                    monthly_cost: ev.and_then(|e| e.current_monthly_cost),
                    currency: ev.map(|e| e.currency.clone()).unwrap_or_default(),
                    best_alternative: best.as_ref().map(|b| b.0.clone()),
                    best_alternative_monthly_cost: best.map(|b| b.1),
                    placed_since: memory.and_then(|m| m.placed_since),
                    streak_target: memory.and_then(|m| m.streak_target.clone()),
                    streak: memory.map(|m| m.streak).unwrap_or(0),
                    last_decision: last.map(|d| d.id.clone()),
                    last_outcome: last.map(|d| d.outcome),
                    pending_decision: pending.map(|d| d.id.clone()),
                    pending_target: pending.and_then(|d| match &d.verdict {
                        Some(Verdict::Relocate { provider, .. }) => Some(provider.clone()),
                        _ => None,
                    }),
                    relocation: active.get(s.name.as_str()).map(|r| ActiveRelocation {
                        id: r.id.clone(),
                        to: r.request.to.clone(),
                        state: r.state,
                        detail: r.detail.clone(),
                    }),
                }
            })
            .collect()
    }

    fn decisions(&self, q: &DecisionQuery) -> Vec<Decision> {
        let limit = q
            .limit
            .unwrap_or(100)
            .min(super::decisions::RECENT_DECISIONS);
        let mut out: Vec<Decision> = self
            .log
            .recent()
            .iter()
            .rev()
            .filter(|d| q.service.as_deref().is_none_or(|s| d.service == s))
            .filter(|d| q.outcome.as_deref().is_none_or(|o| d.outcome.as_str() == o))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

/// The id of the relocation a decision asks for: its own, or for an approval, the id of the
/// pending decision it approves (the plan the operator saw).
fn request_id(d: &Decision) -> String {
    d.refers_to.clone().unwrap_or_else(|| d.id.clone())
}

fn log_key(d: &Decision) -> (Outcome, Option<String>, Option<String>, String) {
    let target = match &d.verdict {
        Some(Verdict::Relocate { provider, .. }) => Some(provider.clone()),
        _ => None,
    };
    (
        d.outcome,
        target,
        d.suppressed_by.clone(),
        d.policy_hash.clone(),
    )
}

fn refresh_regions(market: &mut MarketSnapshot, loaded: &Loaded) {
    market.regions.clear();
    for (name, p) in &loaded.config.providers {
        if let Some(info) = regions::resolve(&loaded.regions, p) {
            market.regions.insert(name.clone(), info);
        }
    }
}

/// Evaluates every service's policy against one market snapshot. Runs on a blocking thread.
pub fn evaluate_all(
    config: &Config,
    policies: &Policies,
    market: &MarketSnapshot,
    metrics: &Metrics,
    now: DateTime<Utc>,
) -> Vec<Evaluation> {
    let mut out = Vec::with_capacity(config.services.len());
    // Offer facts are built once per tick and shared by every service's context.
    let market = Market::new(market);
    for service in config.services.values() {
        let Some(spec) = config.policies.get(&service.policy) else {
            continue;
        };
        let Some(policy) = policies.get(&service.policy) else {
            continue;
        };
        let mut ev = Evaluation {
            service: service.name.clone(),
            policy: service.policy.clone(),
            policy_hash: policy.hash().to_string(),
            input_digest: String::new(),
            provider: service.provider.clone(),
            verdict: Err(String::new()),
            current_monthly_cost: None,
            currency: String::new(),
            targets: BTreeMap::new(),
            target_flavors: BTreeMap::new(),
        };
        match DecisionContext::build_in(&market, service, spec, now) {
            Err(e) => ev.verdict = Err(format!("cannot build the decision context: {e}")),
            Ok(ctx) => {
                ev.input_digest = digest(&ctx);
                ev.current_monthly_cost = Some(ctx.current.monthly_cost);
                ev.currency = ctx.current.offer.offer.currency.clone();
                for c in &ctx.candidates {
                    // Candidates are sorted by cost: the first per provider is its cheapest.
                    ev.targets
                        .entry(c.offer.offer.provider.clone())
                        .or_insert((c.monthly_cost, c.migration_cost));
                    ev.target_flavors
                        .entry(c.offer.offer.provider.clone())
                        .or_insert_with(|| c.offer.offer.flavor.clone());
                }
                let started = Instant::now();
                // An error can quote what the policy made (a thrown string, a bad return).
                ev.verdict = policy
                    .decide(&ctx)
                    .map_err(|e| bounded_reason(&e.to_string()));
                metrics
                    .policy_duration
                    .with_label_values(&[&service.policy])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        out.push(ev);
    }
    out
}

/// The label values a service's cost series were last exported with.
#[derive(Default)]
struct CostSeries {
    /// `provider` and `currency` of `service_monthly_cost`.
    cost: Option<(String, String)>,
    /// `currency` of `service_projected_monthly_savings`.
    savings: Option<String>,
}

impl CostSeries {
    /// Removes the series of `service` exported with these labels that `next` does not set.
    fn remove_unless_in(&self, metrics: &Metrics, service: &str, next: &CostSeries) {
        if let Some((provider, currency)) = &self.cost {
            if next.cost.as_ref() != Some(&(provider.clone(), currency.clone())) {
                let _ = metrics
                    .service_monthly_cost
                    .remove_label_values(&[service, provider, currency]);
            }
        }
        if let Some(currency) = &self.savings {
            if next.savings.as_ref() != Some(currency) {
                let _ = metrics
                    .service_savings
                    .remove_label_values(&[service, currency]);
            }
        }
    }
}

/// Exports a service's monthly cost and projected savings, and removes the series it had
/// under another provider or currency: left behind, they would go on reporting a cost where
/// the service no longer runs.
fn export_costs(metrics: &Metrics, exported: &mut BTreeMap<String, CostSeries>, ev: &Evaluation) {
    let mut next = CostSeries::default();
    if let Some(cost) = ev.current_monthly_cost {
        metrics
            .service_monthly_cost
            .with_label_values(&[&ev.service, &ev.provider, &ev.currency])
            .set(cost);
        next.cost = Some((ev.provider.clone(), ev.currency.clone()));
        let best = ev
            .targets
            .values()
            .map(|(m, _)| *m)
            .fold(f64::INFINITY, f64::min);
        if best.is_finite() {
            metrics
                .service_savings
                .with_label_values(&[&ev.service, &ev.currency])
                .set(cost - best);
            next.savings = Some(ev.currency.clone());
        }
    }
    if let Some(old) = exported.get(&ev.service) {
        old.remove_unless_in(metrics, &ev.service, &next);
    }
    exported.insert(ev.service.clone(), next);
}

fn digest(ctx: &DecisionContext) -> String {
    let mut hasher = blake3::Hasher::new();
    // `now` changes every tick; the digest is about the market and the service.
    if serde_json::to_writer(HashWriter(&mut hasher), &(&ctx.current, &ctx.candidates)).is_err() {
        return String::new();
    }
    hasher.finalize().to_hex()[..32].to_string()
}

struct HashWriter<'a>(&'a mut blake3::Hasher);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evaluation(provider: &str, currency: &str, cost: Option<f64>) -> Evaluation {
        Evaluation {
            service: "shop".into(),
            policy: "cheapest".into(),
            policy_hash: String::new(),
            input_digest: String::new(),
            provider: provider.into(),
            verdict: Err(String::new()),
            current_monthly_cost: cost,
            currency: currency.into(),
            targets: BTreeMap::from([("elsewhere".to_string(), (10.0, 1.0))]),
            target_flavors: BTreeMap::new(),
        }
    }

    fn series(metrics: &Metrics, name: &str) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_moved_service_exports_only_its_new_provider_cost_series() {
        let metrics = Metrics::new();
        let mut exported = BTreeMap::new();
        export_costs(
            &metrics,
            &mut exported,
            &evaluation("aws-va", "USD", Some(70.0)),
        );
        export_costs(
            &metrics,
            &mut exported,
            &evaluation("azure-we", "EUR", Some(30.0)),
        );
        assert_eq!(
            series(&metrics, "fluidcloud_service_monthly_cost"),
            [
                r#"fluidcloud_service_monthly_cost{currency="EUR",provider="azure-we",service="shop"} 30"#
            ]
        );
        assert_eq!(
            series(&metrics, "fluidcloud_service_projected_monthly_savings"),
            [r#"fluidcloud_service_projected_monthly_savings{currency="EUR",service="shop"} 20"#]
        );
        // A cost that is no longer known is not exported at its old value.
        export_costs(
            &metrics,
            &mut exported,
            &evaluation("azure-we", "EUR", None),
        );
        assert!(series(&metrics, "fluidcloud_service_monthly_cost").is_empty());
        assert!(series(&metrics, "fluidcloud_service_projected_monthly_savings").is_empty());
    }
}
