//! What the API shows: services with their costs, streaks and relocations, the decision log,
//! and readiness.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::jobs::{feeds, Job};
use super::messages::{DecisionQuery, Readiness};
use super::{placed_at, Supervisor};
use crate::broker::decisions::{Decision, Outcome, RECENT_DECISIONS};
use crate::conduit::{Relocation, RelocationState};
use crate::config::Mode;
use crate::model::Verdict;

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
    pub state: RelocationState,
    /// The step or steps running now, or what the state means.
    pub detail: String,
}

impl Supervisor {
    pub(super) fn services(&self) -> Vec<ServiceStatus> {
        let config = self.config();
        // One pass over the log (newest wins) instead of one search per service.
        let last_by_service: BTreeMap<&str, &Decision> = self
            .log
            .recent()
            .iter()
            .map(|d| (d.service.as_str(), d))
            .collect();
        // Only those under way: nothing was submitted after the end of time.
        let relocations = self.conduit.summaries_since(DateTime::<Utc>::MAX_UTC);
        let active: BTreeMap<&str, &Relocation> = relocations
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
                    provider: placed_at(config, &self.placements, s).to_string(),
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

    pub(super) fn decisions(&self, q: &DecisionQuery) -> Vec<Decision> {
        let limit = q.limit.unwrap_or(100).min(RECENT_DECISIONS);
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

    /// Ready once every source has had good data (a poll that only failed is not enough:
    /// decisions would lack that provider) and one evaluation ran.
    pub(super) fn readiness(&self) -> Readiness {
        let mut waiting_for: Vec<String> = feeds(self.config())
            .into_iter()
            .filter(|f| !self.had_data.contains(&f.job))
            .map(|f| f.job.to_string())
            .collect();
        if !self.evaluated_once && !self.config().services.is_empty() {
            waiting_for.push(Job::Evaluate.to_string());
        }
        Readiness {
            ready: waiting_for.is_empty(),
            waiting_for,
        }
    }
}
