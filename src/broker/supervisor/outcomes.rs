//! Outcomes: one tick's evaluations judged by the guard rails and the policy's mode,
//! submitted to the conduit, logged and remembered.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::costs::{export_costs, CostSeries};
use super::evaluation::{Evaluation, FreshPrices};
use super::jobs::Job;
use super::{placed_at, Supervisor};
use crate::broker::decisions::{Decision, Outcome, ProposedPlan};
use crate::broker::guard::{self, Proposal, RailVerdict, Streak};
use crate::broker::shock;
use crate::conduit::{ConduitError, Relocation, RelocationRequest};
use crate::config::{BrokerSettings, Config, Mode};
use crate::model::Verdict;

/// What the rails and the mode made of one evaluation.
enum Judged {
    /// Final: logged as it is. The flag says whether it collected a new confirmation: such
    /// a decision is logged even when it says what the last one said.
    Decided(Decision, bool),
    /// Passed every rail and is to be acted on (audited, proposed or submitted), subject to
    /// the tick's safety belt and budgets.
    Passed(Decision),
}

/// What the tick knows while it judges one service.
struct Tick<'a> {
    config: &'a Config,
    now: DateTime<Utc>,
    /// Services with a relocation in progress.
    relocating: &'a BTreeSet<String>,
    /// When the prices the evaluations saw were polled.
    fresh: &'a FreshPrices,
}

impl Supervisor {
    /// Applies guard rails and modes to one tick's evaluations, made on prices polled when
    /// `fresh` says, logs and acts.
    pub(super) fn apply(&mut self, evals: Vec<Evaluation>, fresh: &FreshPrices) {
        self.busy.remove(&Job::Evaluate);
        self.refresh_placements();
        self.evaluated_once = true;
        let now = self.clock.now();
        let window_start = now
            - chrono::Duration::from_std(self.config().broker.relocation_window)
                .unwrap_or(chrono::Duration::MAX);
        let total = evals.len();
        let config = self.loaded.config.clone();
        let relocations = self.conduit.summaries_since(window_start);
        self.remember_relocations(&relocations, window_start);
        let relocating: BTreeSet<String> = relocations
            .into_iter()
            .filter(|r| r.state.is_active())
            .map(|r| r.request.service)
            .collect();
        let tick = Tick {
            config: &config,
            now,
            relocating: &relocating,
            fresh,
        };
        let mut decisions: Vec<(Decision, bool)> = Vec::new();
        let mut passed: Vec<Decision> = Vec::new();
        for ev in evals {
            match self.judge(ev, &tick) {
                Some(Judged::Decided(d, confirmed)) => decisions.push((d, confirmed)),
                Some(Judged::Passed(d)) => passed.push(d),
                None => {}
            }
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
        safety_belt(&mut passed, total, &config.broker);
        for mut d in passed {
            if d.outcome == Outcome::Submitted {
                self.submit_within_budgets(&mut d, &config.broker, now);
            }
            decisions.push((d, false));
        }
        for (d, confirmed) in decisions {
            self.record(d, confirmed, now);
        }
        self.save_state();
        self.metrics
            .relocations_active
            .set(self.conduit.active() as i64);
    }

    /// Judges one evaluation: its verdict, the rails, the mode. `None` for a service or
    /// policy a reload removed since the evaluation started.
    fn judge(&mut self, ev: Evaluation, tick: &Tick<'_>) -> Option<Judged> {
        let config = tick.config;
        let service = config.services.get(&ev.service)?;
        let policy = config.policies.get(&ev.policy)?;
        let at = placed_at(config, &self.placements, service).to_string();
        self.last_costs.insert(ev.service.clone(), ev.clone());
        self.observe_placement(&ev.service, &at, tick.now);
        let mut d = Decision {
            id: String::new(),
            time: tick.now,
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
        let memory = self.state.services.entry(ev.service.clone()).or_default();
        let (target, compulsory) = match &ev.verdict {
            Err(e) => {
                memory.reset_streak();
                d.outcome = Outcome::Error;
                d.error = Some(e.clone());
                return Some(Judged::Decided(d, false));
            }
            Ok(v @ Verdict::Stay { .. }) => {
                memory.reset_streak();
                d.verdict = Some(v.clone());
                return Some(Judged::Decided(d, false));
            }
            Ok(
                v @ Verdict::Relocate {
                    provider,
                    compulsory,
                    ..
                },
            ) => {
                d.verdict = Some(v.clone());
                (provider.as_str(), *compulsory)
            }
        };
        // News is a fresh poll of either end of the move; the target may be unknown (then
        // other rails refuse it).
        let prices_at = [at.as_str(), target]
            .iter()
            .filter_map(|p| tick.fresh.get(*p).copied())
            .max();
        let streak: Streak = memory.observe(Some(target), prices_at);
        let memory = memory.clone();
        let figures = ev.targets.get(target).copied();
        let target_known = if target == at {
            Err(format!(
                "the policy asked to move to `{target}`, where the service already runs"
            ))
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
        let proposal = Proposal {
            target,
            provider: &at,
            compulsory,
            pinned: service.pinned,
            target_known,
            current_monthly_cost: ev.current_monthly_cost.unwrap_or(f64::NAN),
            target_monthly_cost: target_cost,
            migration_cost: migration,
            stale_sources: self.stale_sources(&[&at, target], tick.now),
            target_shock: self.target_shock(target, &ev),
            streak,
            memory: &memory,
            active_relocations: tick.relocating.len(),
            relocations_in_window: self.relocation_starts.len(),
            already_relocating: tick.relocating.contains(&ev.service),
        };
        d.rails = guard::judge(&proposal, policy, &config.broker, tick.now);
        if let Some(r) = guard::first_refusal(&d.rails) {
            d.outcome = Outcome::Suppressed;
            d.suppressed_by = Some(r.rail.clone());
            return Some(Judged::Decided(d, streak.counted));
        }
        d.outcome = match policy.mode {
            Mode::Audit => Outcome::Audited,
            Mode::Approve => Outcome::PendingApproval,
            Mode::Enforce => Outcome::Submitted,
        };
        if d.outcome == Outcome::PendingApproval {
            // The operator approves a plan, not a wish: one the conduit cannot make does
            // not wait for anybody.
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
                    refuse(
                        &mut d,
                        "conduit_refused",
                        format!("no plan can be made: {e}"),
                    );
                    return Some(Judged::Decided(d, false));
                }
            }
        }
        Some(Judged::Passed(d))
    }

    /// Keeps a service's residency and streak true to where it runs: a relocation the
    /// journal committed since the broker last looked starts both afresh.
    fn observe_placement(&mut self, service: &str, at: &str, now: DateTime<Utc>) {
        let moved_at = self
            .placements
            .get(service)
            .filter(|p| p.provider == at)
            .map(|p| p.since);
        let memory = self.state.services.entry(service.to_string()).or_default();
        match (moved_at, memory.placed_since) {
            (Some(since), Some(known)) if known >= since => {}
            (Some(since), _) => {
                memory.placed_since = Some(since);
                memory.reset_streak();
            }
            (None, None) => memory.placed_since = Some(now),
            (None, Some(_)) => {}
        }
    }

    /// Submits a decision that passed, unless this tick's earlier submissions spent a budget.
    fn submit_within_budgets(
        &mut self,
        d: &mut Decision,
        broker: &BrokerSettings,
        now: DateTime<Utc>,
    ) {
        let max_active = broker.max_concurrent_relocations as usize;
        let max_window = broker.max_relocations_per_window as usize;
        // Every service was judged against the budgets as they stood at the start of the
        // tick; the ones submitted earlier in this tick count too.
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
            // The relocation takes the decision's id: the id is given before the conduit
            // sees the request, and the decision is logged under it.
            d.id = self.log.next_id(now);
            self.submit(d, "policy").err().map(|e| match e {
                ConduitError::AlreadyRelocating(_) => ("already_relocating", e.to_string()),
                _ => ("conduit_refused", e.to_string()),
            })
        };
        if let Some((rail, detail)) = refusal {
            refuse(d, rail, detail);
        }
    }

    /// Takes the window budget and each service's last relocation from the relocations the
    /// conduit really holds, never from what was asked of it.
    fn remember_relocations(&mut self, relocations: &[Relocation], window_start: DateTime<Utc>) {
        self.relocation_starts = relocations
            .iter()
            .map(|r| r.submitted_at)
            .filter(|t| *t >= window_start)
            .collect();
        let last = self.conduit.last_relocations();
        for service in last.keys() {
            self.state.services.entry(service.clone()).or_default();
        }
        // A last relocation the journal does not hold never happened.
        for (service, m) in &mut self.state.services {
            m.last_relocation = last.get(service).copied();
        }
    }

    /// Counts, logs (when it says something new, or collected a confirmation) and remembers
    /// one decision.
    fn record(&mut self, mut d: Decision, confirmed: bool, now: DateTime<Utc>) {
        self.metrics
            .decisions
            .with_label_values(&[d.outcome.as_str()])
            .inc();
        if let Some(r) = &d.suppressed_by {
            self.metrics.suppressions.with_label_values(&[r]).inc();
        }
        let key = log_key(&d);
        // Each confirmation collected is logged; the evaluations that wait for new prices
        // in between say nothing new.
        let streak_progress = confirmed && d.suppressed_by.as_deref() == Some("confirmations");
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
            for job in [Job::Pricing(p.to_string()), Job::Benchmark(p.to_string())] {
                let name = job.to_string();
                if let Some(st) = self.market.sources.get(&name) {
                    if st.too_old(now) {
                        out.push(match st.age_secs(now) {
                            Some(a) => format!("{name} is {a:.0}s old (max {}s)", st.max_age_secs),
                            None => format!("{name} has no data yet"),
                        });
                    }
                } else if matches!(job, Job::Pricing(_)) {
                    out.push(format!("{name} is not configured"));
                }
            }
        }
        out
    }

    pub(super) fn submit(&mut self, d: &Decision, origin: &str) -> Result<(), ConduitError> {
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
                let now = self.clock.now();
                self.relocation_starts.push(now);
                let m = self.state.services.entry(d.service.clone()).or_default();
                m.last_relocation = Some(now);
                m.reset_streak();
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
}

/// Suppresses a decision by `rail`, saying why.
pub(super) fn refuse(d: &mut Decision, rail: &str, detail: String) {
    d.outcome = Outcome::Suppressed;
    d.suppressed_by = Some(rail.into());
    d.rails.push(RailVerdict {
        rail: rail.into(),
        passed: false,
        detail,
    });
}

/// The safety belt: a tick that would move too many of its `total` services at once moves
/// none of them.
pub(super) fn safety_belt(passed: &mut [Decision], total: usize, broker: &BrokerSettings) {
    let percent = broker.max_relocations_percent;
    let limit = (percent / 100.0 * total as f64).ceil() as usize;
    let moving = passed
        .iter()
        .filter(|d| d.outcome != Outcome::Audited)
        .count();
    if moving <= limit.max(1) {
        return;
    }
    tracing::error!(
        "This tick would relocate {moving} of {total} services, more than {percent}%; none is relocated."
    );
    for d in passed {
        refuse(
            d,
            "max_relocations_percent",
            format!(
                "{moving} of {total} services would move in one tick, at most {percent}% allowed"
            ),
        );
    }
}

/// The id of the relocation a decision asks for: its own, or for an approval, the id of the
/// pending decision it approves (the plan the operator saw).
fn request_id(d: &Decision) -> String {
    d.refers_to.clone().unwrap_or_else(|| d.id.clone())
}

/// What a decision says, for logging only the changes.
pub(super) type LogKey = (Outcome, Option<String>, Option<String>, String);

pub(super) fn log_key(d: &Decision) -> LogKey {
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
