//! The operator's answers: approving or rejecting a pending decision, and relocations asked
//! for by hand. Both skip the policy's rails but not the budgets (unless forced).

use std::sync::Arc;

use super::messages::ApiError;
use super::outcomes::log_key;
use super::{placed_at, Supervisor};
use crate::broker::decisions::{Decision, Outcome, ProposedPlan};
use crate::config::Config;
use crate::model::{Verdict, MAX_REASON_BYTES};

impl Supervisor {
    /// An operator's answer to a pending decision.
    pub(super) fn answer_pending(&mut self, id: &str, approve: bool) -> Result<Decision, ApiError> {
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
        let now = self.clock.now();
        let mut d = original.clone();
        d.time = now;
        d.refers_to = Some(original.id.clone());
        if approve {
            if let Err(changed) = self.still_as_proposed(&original) {
                // Withdrawn: the next evaluation proposes again, with what holds now.
                self.state.pending.remove(&original.service);
                self.last_logged.remove(&original.service);
                self.save_state();
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
            let refusal = if active >= cfg.max_concurrent_relocations as usize {
                Some(format!(
                    "{active} relocations are in progress, at most {} allowed; approve later",
                    cfg.max_concurrent_relocations
                ))
            } else if self.relocation_starts.len() >= cfg.max_relocations_per_window as usize {
                Some("the relocation budget of the window is spent; approve later".into())
            } else {
                self.submit(&d, "operator").err().map(|e| e.to_string())
            };
            if let Some(why) = refusal {
                self.state
                    .pending
                    .insert(original.service.clone(), original.id.clone());
                return Err(ApiError::Conflict(why));
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
        self.save_state();
        Ok(d)
    }

    /// Whether a pending decision can still be approved as proposed: the service is where it
    /// was, the plan the conduit would run now is the one proposed, and the target's price
    /// has not changed. Says what changed otherwise.
    fn still_as_proposed(&mut self, d: &Decision) -> Result<(), String> {
        let Some(Verdict::Relocate { provider: to, .. }) = &d.verdict else {
            return Err("it is not a relocation".into());
        };
        self.refresh_placements();
        let config = self.config();
        let now_at = config
            .services
            .get(&d.service)
            .map(|s| placed_at(config, &self.placements, s).to_string())
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

    /// A relocation an operator asks for by hand.
    pub(super) fn trigger(
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
        self.refresh_placements();
        let config: Arc<Config> = self.loaded.config.clone();
        let names = |keys: std::collections::btree_map::Keys<'_, String, _>| {
            keys.cloned().collect::<Vec<_>>().join(", ")
        };
        let Some(spec) = config.services.get(service) else {
            return Err(ApiError::NotFound(format!(
                "no service `{service}`; configured services: {}",
                names(config.services.keys())
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
        let at = placed_at(&config, &self.placements, spec).to_string();
        if at == to {
            return Err(ApiError::Invalid(format!(
                "`{service}` already runs on `{to}`"
            )));
        }
        if spec.pinned && !force {
            return Err(ApiError::Conflict(format!(
                "`{service}` is pinned to `{at}`; pass force to move it anyway"
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
        let now = self.clock.now();
        let reason = reason.unwrap_or_else(|| "relocation requested by an operator".into());
        let mut d = Decision {
            id: self.log.next_id(now),
            time: now,
            service: service.into(),
            policy: spec.policy.clone(),
            policy_hash: String::new(),
            input_digest: String::new(),
            mode: "operator".into(),
            provider: at,
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
        self.save_state();
        Ok(d)
    }
}
