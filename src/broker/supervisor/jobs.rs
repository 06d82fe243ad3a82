//! Scheduling: the [`Job`]s the cron scheduler ticks, and the pollers, one worker per feed
//! (a provider's pricing or benchmark), woken by the supervisor and stopped by a token when
//! the feed goes away or the daemon stops.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;

use super::messages::{Command, PollResult};
use super::{BrokerError, Supervisor};
use crate::broker::{benchmarks, pricing, shock};
use crate::config::{Config, Provider};
use crate::model::SourceStatus;

/// Work the scheduler asks for. Its `Display` is the name logs, metric labels and the API
/// know it by (`evaluate`, `pricing:aws-va`, `benchmark:aws-va`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Job {
    /// Evaluate every service's policy against the market.
    Evaluate,
    /// Poll a provider's price feed.
    Pricing(String),
    /// Measure a provider's IO.
    Benchmark(String),
}

impl Job {
    /// The provider a poll is about; `None` for an evaluation.
    pub fn provider(&self) -> Option<&str> {
        match self {
            Job::Evaluate => None,
            Job::Pricing(p) | Job::Benchmark(p) => Some(p),
        }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Job::Evaluate => f.write_str("evaluate"),
            Job::Pricing(p) => write!(f, "pricing:{p}"),
            Job::Benchmark(p) => write!(f, "benchmark:{p}"),
        }
    }
}

/// One feed a configuration polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Feed {
    pub job: Job,
    /// How old its data may get before decisions stop trusting it.
    pub max_age_secs: u64,
    pub schedule: String,
}

/// Every feed of `config`, in provider order.
pub(super) fn feeds(config: &Config) -> Vec<Feed> {
    let mut out = Vec::new();
    for (name, p) in &config.providers {
        if let Some(s) = &p.pricing {
            out.push(Feed {
                job: Job::Pricing(name.clone()),
                max_age_secs: s.max_age.as_secs(),
                schedule: s.schedule.clone(),
            });
        }
        if let Some(b) = &p.benchmark {
            out.push(Feed {
                job: Job::Benchmark(name.clone()),
                max_age_secs: b.max_age.as_secs(),
                schedule: b.schedule.clone(),
            });
        }
    }
    out
}

/// What one poll needs, read from the configuration in force when it was asked for.
pub(super) struct PollRequest {
    provider: Provider,
    cache: PathBuf,
    started: Instant,
}

/// A feed's poller: a worker that polls when woken, one poll at a time, and ends when its
/// token is cancelled, abandoning a poll in flight.
pub(super) struct Poller {
    wake: mpsc::Sender<PollRequest>,
    stop: CancellationToken,
}

impl Poller {
    /// Starts the poller of `job` in `tasks`; it reports each poll to `report`.
    pub(super) fn spawn(
        job: Job,
        tasks: &mut JoinSet<()>,
        stop: CancellationToken,
        client: reqwest::Client,
        report: mpsc::Sender<Command>,
    ) -> Poller {
        // One poll runs at a time and the supervisor never wakes a busy poller: one slot.
        let (wake, requests) = mpsc::channel(1);
        tasks.spawn(work(job, requests, stop.clone(), client, report));
        Poller { wake, stop }
    }

    pub(super) fn stop(&self) {
        self.stop.cancel();
    }
}

async fn work(
    job: Job,
    mut requests: mpsc::Receiver<PollRequest>,
    stop: CancellationToken,
    client: reqwest::Client,
    report: mpsc::Sender<Command>,
) {
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => break,
            r = requests.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let result = tokio::select! {
            _ = stop.cancelled() => {
                tracing::info!("The poll of {job} in flight is abandoned: its poller is stopping.");
                break;
            }
            r = poll(&job, &request, &client) => r,
        };
        let Some(result) = result else { continue };
        let done = Command::PollDone {
            job: job.clone(),
            started: request.started,
            result,
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            sent = report.send(done) => if sent.is_err() { break },
        }
    }
    tracing::debug!("The poller of {job} has stopped.");
}

async fn poll(job: &Job, r: &PollRequest, client: &reqwest::Client) -> Option<PollResult> {
    let p = &r.provider;
    match (job, &p.pricing, &p.benchmark) {
        (Job::Pricing(_), Some(src), _) => Some(PollResult::Pricing(
            pricing::poll(&p.name, src, client, &r.cache).await,
        )),
        (Job::Benchmark(_), _, Some(b)) => {
            Some(PollResult::Benchmark(benchmarks::measure(b).await))
        }
        _ => None,
    }
}

/// How long the supervisor waits for its workers at shutdown before abandoning them.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

/// How the supervisor's workers ended at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stopped {
    /// Workers (pollers, an evaluation) that ended within the bound.
    pub joined: usize,
    /// Workers still running at the bound, aborted.
    pub abandoned: usize,
}

impl Supervisor {
    /// (Re)starts the cron scheduler with the jobs of the configuration in force.
    pub(super) async fn start_scheduler(&mut self) -> Result<(), BrokerError> {
        if let Some(mut old) = self.scheduler.take() {
            let _ = old.shutdown().await;
        }
        let sched = JobScheduler::new().await?;
        let mut jobs = vec![(
            Job::Evaluate,
            self.config().broker.evaluate_schedule.clone(),
        )];
        jobs.extend(
            feeds(self.config())
                .into_iter()
                .map(|f| (f.job, f.schedule)),
        );
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
                    let label = job.to_string();
                    if tx.try_send(Command::Tick(job)).is_err() {
                        metrics.ticks_skipped.with_label_values(&[&label]).inc();
                    }
                })
            })?;
            sched.add(cron).await?;
        }
        sched.start().await?;
        self.scheduler = Some(sched);
        Ok(())
    }

    /// Gives every feed of the configuration in force a poller, and stops the pollers of
    /// feeds it no longer has.
    pub(super) fn sync_pollers(&mut self) {
        // Reap the pollers stopped earlier.
        while self.tasks.try_join_next().is_some() {}
        let wanted: BTreeSet<Job> = feeds(self.config()).into_iter().map(|f| f.job).collect();
        self.pollers.retain(|job, poller| {
            let keep = wanted.contains(job);
            if !keep {
                poller.stop();
                tracing::info!("Stopped the poller of {job}: the feed is no longer configured.");
            }
            keep
        });
        for job in wanted {
            if self.pollers.contains_key(&job) {
                continue;
            }
            let poller = Poller::spawn(
                job.clone(),
                &mut self.tasks,
                self.workers.child_token(),
                self.client.clone(),
                self.commands_tx.clone(),
            );
            self.pollers.insert(job, poller);
        }
        // A stopped feed's poll in flight will never report.
        let pollers = &self.pollers;
        self.busy
            .retain(|job| *job == Job::Evaluate || pollers.contains_key(job));
    }

    /// Wakes the poller of `job`, unless the feed asked to wait or its last poll still runs.
    pub(super) fn start_poll(&mut self, job: Job) {
        let label = job.to_string();
        if let Some(until) = self.not_before.get(&job) {
            if self.clock.now() < *until {
                // Logged once, when the source asked; every skipped tick is counted.
                self.metrics
                    .polls_deferred
                    .with_label_values(&[&label])
                    .inc();
                tracing::debug!("Skipping a tick of {job}: it asked to be polled later.");
                return;
            }
            self.not_before.remove(&job);
        }
        if self.busy.contains(&job) {
            self.metrics
                .ticks_skipped
                .with_label_values(&[&label])
                .inc();
            tracing::warn!("Skipping a tick of {job}: the previous poll is still running.");
            return;
        }
        let Some(provider) = job
            .provider()
            .and_then(|p| self.config().providers.get(p))
            .cloned()
        else {
            return;
        };
        let Some(poller) = self.pollers.get(&job) else {
            return;
        };
        let request = PollRequest {
            provider,
            cache: self.config().cache_dir(),
            started: Instant::now(),
        };
        if poller.wake.try_send(request).is_err() {
            // Its poller has stopped: the feed is going away.
            return;
        }
        self.busy.insert(job);
        self.metrics.poll_runs.with_label_values(&[&label]).inc();
    }

    /// Takes one poll's result into the market snapshot.
    pub(super) fn finish_poll(&mut self, job: Job, started: Instant, result: PollResult) {
        self.busy.remove(&job);
        self.polled_once.insert(job.clone());
        let source = job.to_string();
        let m = &self.metrics;
        m.poll_duration
            .with_label_values(&[&source])
            .observe(started.elapsed().as_secs_f64());
        let provider = job.provider().unwrap_or_default().to_string();
        if !self.config().providers.contains_key(&provider) {
            return; // removed by a reload while it ran
        }
        let now = self.clock.now();
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
                    // A cached copy saw nothing new: the shocks known stay as they were, and
                    // it confirms no relocation.
                    if !out.from_cache {
                        self.fresh_prices.insert(provider.clone(), now);
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
                self.had_data.insert(job.clone());
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
                        .min(Duration::from_secs(status.max_age_secs));
                    if !wait.is_zero() {
                        let until = now + chrono::Duration::from_std(wait).unwrap_or_default();
                        self.not_before.insert(job.clone(), until);
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

    /// Stops the scheduler and every worker, and waits for them up to `bound`; the ones
    /// still running then are aborted.
    pub(super) async fn stop_workers(&mut self, bound: Duration) -> Stopped {
        if let Some(mut s) = self.scheduler.take() {
            let _ = s.shutdown().await;
        }
        self.workers.cancel();
        self.pollers.clear();
        let mut stopped = Stopped::default();
        let joined = tokio::time::timeout(bound, async {
            while self.tasks.join_next().await.is_some() {
                stopped.joined += 1;
            }
        })
        .await;
        if joined.is_err() {
            stopped.abandoned = self.tasks.len();
            tracing::warn!(
                "{} broker workers did not stop within {} s; they are aborted.",
                stopped.abandoned,
                bound.as_secs()
            );
            self.tasks.shutdown().await;
        }
        stopped
    }
}
