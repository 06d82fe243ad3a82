//! CloudConduit: plans and executes one relocation of a service instance.
//!
//! The Broker meets the conduit at [`Conduit`]: it submits a [`RelocationRequest`] once a
//! decision has passed every guard rail, and reads [`Relocation`] records back for budgets,
//! the API and metrics. Submitting never blocks the Broker; the conduit runs the relocation
//! in its own task.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// What the Broker asks the conduit to do.
#[derive(Debug, Clone, Serialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelocationState {
    /// Accepted, waiting for an execution slot.
    Queued,
    Running,
    Completed,
    Failed,
    RolledBack,
}

impl RelocationState {
    pub fn is_active(self) -> bool {
        matches!(self, RelocationState::Queued | RelocationState::Running)
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConduitError {
    #[error("service `{0}` already has a relocation in progress")]
    AlreadyRelocating(String),
    #[error("the conduit refused the relocation: {0}")]
    Refused(String),
}

/// The seam between Broker and CloudConduit.
pub trait Conduit: Send + Sync + 'static {
    /// Accepts a relocation for execution; returns at once.
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError>;
    /// Every relocation this conduit knows, newest last.
    fn relocations(&self) -> Vec<Relocation>;
    /// Relocations queued or running.
    fn active(&self) -> usize {
        self.relocations()
            .iter()
            .filter(|r| r.state.is_active())
            .count()
    }
}

/// A conduit that accepts and records relocation requests and leaves them queued: the
/// relocation engine that executes them is not part of this build yet. Everything the Broker
/// decides is visible through it (API, metrics, budgets) without anything being moved.
#[derive(Default)]
pub struct QueueOnly {
    records: Mutex<Vec<Relocation>>,
}

impl Conduit for QueueOnly {
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError> {
        let mut records = self.records.lock().expect("relocation records lock");
        if records
            .iter()
            .any(|r| r.request.service == request.service && r.state.is_active())
        {
            return Err(ConduitError::AlreadyRelocating(request.service));
        }
        let now = Utc::now();
        let record = Relocation {
            id: request.decision_id.clone(),
            request,
            state: RelocationState::Queued,
            submitted_at: now,
            updated_at: now,
            detail: "queued; this build has no relocation engine to execute it".to_string(),
        };
        records.push(record.clone());
        Ok(record)
    }

    fn relocations(&self) -> Vec<Relocation> {
        self.records.lock().expect("relocation records lock").clone()
    }
}
