//! Evaluation: every service's policy run against one market snapshot, on a blocking thread,
//! before the guard rails (which [`super::outcomes`] applies).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::jobs::Job;
use super::loader::Policies;
use super::messages::Command;
use super::Supervisor;
use crate::config::Config;
use crate::model::{bounded_reason, MarketSnapshot, Placements, Verdict};
use crate::policy::context::{DecisionContext, Market};
use crate::telemetry::Metrics;

/// When each provider's prices were last polled afresh (a successful poll that did not reuse
/// a cached download), by provider: what an evaluation knew of the market's news. The
/// `confirmations` rail counts an evaluation only on prices newer than the last it counted.
pub type FreshPrices = BTreeMap<String, DateTime<Utc>>;

/// One service's policy evaluation, before the guard rails.
#[derive(Clone)]
pub struct Evaluation {
    pub service: String,
    pub policy: String,
    pub policy_hash: String,
    pub input_digest: String,
    /// Where the service ran when it was evaluated.
    pub provider: String,
    pub verdict: Result<Verdict, String>,
    pub current_monthly_cost: Option<f64>,
    pub currency: String,
    /// Monthly cost and migration cost of the cheapest fitting offer, by provider.
    pub targets: BTreeMap<String, (f64, f64)>,
    /// The flavor of that offer, by provider: what a relocation there would run on.
    pub target_flavors: BTreeMap<String, String>,
}

impl Supervisor {
    /// Starts an evaluation of every service on a blocking thread, unless one still runs.
    pub(super) fn start_evaluation(&mut self) {
        self.refresh_placements();
        if self.busy.contains(&Job::Evaluate) {
            self.metrics
                .ticks_skipped
                .with_label_values(&["evaluate"])
                .inc();
            tracing::warn!("Skipping an evaluation tick: the previous one is still running.");
            return;
        }
        self.busy.insert(Job::Evaluate);
        let config = self.loaded.config.clone();
        let policies = self.loaded.policies.clone();
        let placements = self.placements.clone();
        let market = self.market.clone();
        // Taken with the snapshot: a poll that lands while the policies run is news to the
        // next evaluation, not to this one.
        let fresh = self.fresh_prices.clone();
        let metrics = self.metrics.clone();
        let tx = self.commands_tx.clone();
        let now = self.clock.now();
        self.tasks.spawn_blocking(move || {
            let started = Instant::now();
            let evals = evaluate_all(&config, &policies, &placements, &market, &metrics, now);
            metrics
                .policy_tick_duration
                .observe(started.elapsed().as_secs_f64());
            let _ = tx.blocking_send(Command::EvaluationDone(evals, fresh));
        });
    }
}

/// Evaluates every service's policy, each where `placements` says it runs, against one
/// market snapshot. Runs on a blocking thread.
pub fn evaluate_all(
    config: &Config,
    policies: &Policies,
    placements: &Placements,
    market: &MarketSnapshot,
    metrics: &Metrics,
    now: DateTime<Utc>,
) -> Vec<Evaluation> {
    let mut out = Vec::with_capacity(config.services.len());
    // Offer facts are built once per tick and shared by every service's context.
    let market = Market::new(market);
    for configured in config.services.values() {
        let Some(spec) = config.policies.get(&configured.policy) else {
            continue;
        };
        let Some(policy) = policies.get(&configured.policy) else {
            continue;
        };
        let at = super::placed_at(config, placements, configured);
        // The policy sees the service where it runs; the configuration stays as written.
        let service = if at == configured.provider {
            Cow::Borrowed(configured)
        } else {
            let mut moved = configured.clone();
            moved.provider = at.to_string();
            Cow::Owned(moved)
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
        match DecisionContext::build_in(&market, &service, spec, now) {
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
