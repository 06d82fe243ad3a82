//! CloudConduit: plans and executes one relocation of a service instance.
//!
//! The Broker meets the conduit at [`Conduit`]: it submits a [`RelocationRequest`] once a
//! decision has passed every guard rail, and reads [`Relocation`] records back for budgets,
//! the API and metrics. Submitting never blocks the Broker; the conduit runs the relocation
//! in its own task.

// Bottom to top, each using only those below it (`tests/it/layering.rs` keeps it so):
// `journal` and `progress`, the planner `plan`, `shared` (what the engine and the
// relocation tasks share), the state machine `executor`, and `engine` on top.
pub mod engine;
mod executor;
pub mod journal;
pub mod plan;
pub mod progress;
mod shared;

pub use executor::downtime;
pub use progress::Observer;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What the Broker asks the conduit to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelocationRequest {
    /// The decision that asked for this relocation (also the relocation's id).
    pub decision_id: String,
    pub service: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// `policy` for a decision, `operator` for a relocation triggered by hand.
    pub origin: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelocationState {
    /// Accepted, waiting for an execution slot.
    Queued,
    Running,
    /// A step failed or a crash interrupted the cutover: undoing what was done.
    RollingBack,
    /// The target took over; the source is kept, stopped, until the grace period ends.
    Grace,
    Completed,
    /// Ended without reaching a consistent state on its own (a rollback step failed):
    /// the detail says what an operator must look at.
    Failed,
    RolledBack,
}

impl RelocationState {
    /// Not finished: the service must not be relocated again meanwhile.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RelocationState::Queued
                | RelocationState::Running
                | RelocationState::RollingBack
                | RelocationState::Grace
        )
    }

    /// Moving data or switching the service: counts against the concurrency budget. A
    /// relocation in its grace period does not.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            RelocationState::Queued | RelocationState::Running | RelocationState::RollingBack
        )
    }

    /// True once nothing more will happen to the relocation.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RelocationState::Completed | RelocationState::Failed | RelocationState::RolledBack
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RelocationState::Queued => "queued",
            RelocationState::Running => "running",
            RelocationState::RollingBack => "rolling_back",
            RelocationState::Grace => "grace",
            RelocationState::Completed => "completed",
            RelocationState::Failed => "failed",
            RelocationState::RolledBack => "rolled_back",
        }
    }
}

/// One relocation as the conduit reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Relocation {
    pub id: String,
    pub request: RelocationRequest,
    pub state: RelocationState,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub detail: String,
    /// Its steps in plan order, with state, times, what each produced (bytes, digests,
    /// verification) and errors: the progress of a running relocation. Empty where the
    /// conduit keeps no journal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<journal::StepRecord>,
    /// The latest snapshot of each transfer running now, by step name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub progress: std::collections::BTreeMap<String, progress::LiveProgress>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConduitError {
    #[error("service `{0}` already has a relocation in progress")]
    AlreadyRelocating(String),
    #[error("the conduit refused the relocation: {0}")]
    Refused(String),
    #[error("no relocation `{0}`")]
    Unknown(String),
    /// The journal could not be read: an answer built without it would be wrong.
    #[error("the relocation journal cannot be read: {0}")]
    Journal(String),
    /// A cancel that came too late (or for a relocation that is not running here).
    #[error("relocation `{id}` cannot be cancelled: {reason}")]
    NotCancellable { id: String, reason: String },
}

/// The seam between Broker and CloudConduit.
pub trait Conduit: Send + Sync + 'static {
    /// Accepts a relocation for execution; returns at once.
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError>;
    /// Every relocation this conduit knows, newest last.
    fn relocations(&self) -> Vec<Relocation>;

    /// Without steps or progress, newest last: the relocations that have not ended and every
    /// one submitted at or after `since`. What the broker's guard rails read each tick; its
    /// cost follows what is under way and the rails' window, not the length of the history.
    fn summaries_since(&self, since: DateTime<Utc>) -> Vec<Relocation> {
        self.relocations()
            .into_iter()
            .filter(|r| r.state.is_active() || r.submitted_at >= since)
            .map(|r| Relocation {
                steps: Vec::new(),
                progress: Default::default(),
                ..r
            })
            .collect()
    }

    /// When each service's last relocation was submitted.
    fn last_relocations(&self) -> std::collections::BTreeMap<String, DateTime<Utc>> {
        let mut last = std::collections::BTreeMap::new();
        for r in self.relocations() {
            let t = last.entry(r.request.service).or_insert(r.submitted_at);
            *t = (*t).max(r.submitted_at);
        }
        last
    }

    /// The `limit` most recent relocations that `keep` selects (it sees them without their
    /// steps), with their steps, newest last; with `before`, only those submitted before the
    /// relocation of that id (unknown: an error).
    fn recent(
        &self,
        limit: usize,
        before: Option<&str>,
        keep: &dyn Fn(&Relocation) -> bool,
    ) -> Result<Vec<Relocation>, ConduitError> {
        let mut all = self.relocations();
        if let Some(id) = before {
            let at = all
                .iter()
                .position(|r| r.id == id)
                .ok_or_else(|| ConduitError::Unknown(id.to_string()))?;
            all.truncate(at);
        }
        let mut picked: Vec<Relocation> = all
            .into_iter()
            .rev()
            .filter(|r| keep(r))
            .take(limit)
            .collect();
        picked.reverse();
        Ok(picked)
    }

    /// One relocation, with the live progress of its running transfers.
    fn relocation(&self, id: &str) -> Option<Relocation> {
        self.relocations().into_iter().find(|r| r.id == id)
    }

    /// Stops a relocation that has not reached its commit: copies in flight are cancelled and
    /// it rolls back to the untouched source. After the commit the target has taken over, and
    /// the cancel is refused with the reason.
    fn cancel(&self, id: &str) -> Result<Relocation, ConduitError> {
        Err(ConduitError::NotCancellable {
            id: id.to_string(),
            reason: "this conduit cannot cancel".into(),
        })
    }

    /// The plan a relocation of `service` to `to` would run now.
    fn plan(&self, service: &str, to: &str) -> Result<plan::Plan, plan::PlanError> {
        let _ = (service, to);
        Err(plan::PlanError::Unsupported)
    }
    /// Relocations that hold an execution slot (queued, running, rolling back).
    fn active(&self) -> usize {
        self.summaries_since(DateTime::<Utc>::MAX_UTC)
            .iter()
            .filter(|r| r.state.holds_slot())
            .count()
    }

    /// Where relocations have placed services (service to provider); a service not listed
    /// is where its configuration puts it.
    fn placements(&self) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::new()
    }

    /// Takes a reloaded configuration.
    fn configure(&self, config: std::sync::Arc<crate::config::Config>) {
        let _ = config;
    }
}
