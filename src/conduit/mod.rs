//! CloudConduit: plans and executes one relocation of a service instance.
//!
//! The Broker meets the conduit at [`Conduit`]: it submits a [`RelocationRequest`] once a
//! decision has passed every guard rail, and reads [`Relocation`] records back for budgets,
//! the API and metrics. Submitting never blocks the Broker; the conduit runs the relocation
//! in its own task.

pub mod buckets;
pub mod journal;

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

/// A conduit that accepts relocation requests and records them in the relocation journal,
/// where they stay queued: the engine that plans and executes them is not part of this build
/// yet. Requests survive restarts, count against the budgets, and show in the API and
/// metrics, without anything being moved.
pub struct JournalQueue {
    journal: journal::Journal,
}

const QUEUED_DETAIL: &str = "queued; this build has no relocation engine to execute it";

impl JournalQueue {
    pub fn open(path: &std::path::Path) -> Result<JournalQueue, journal::JournalError> {
        Ok(JournalQueue {
            journal: journal::Journal::open(path)?,
        })
    }
}

impl Conduit for JournalQueue {
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError> {
        if self
            .relocations()
            .iter()
            .any(|r| r.request.service == request.service && r.state.is_active())
        {
            return Err(ConduitError::AlreadyRelocating(request.service));
        }
        let record = self
            .journal
            .create(&request, &[])
            .and_then(|r| {
                self.journal
                    .set_state(&r.id, RelocationState::Queued, QUEUED_DETAIL)
                    .map(|_| r)
            })
            .map_err(|e| ConduitError::Refused(e.to_string()))?;
        Ok(Relocation {
            id: record.id,
            request: record.request,
            state: RelocationState::Queued,
            submitted_at: record.created_at,
            updated_at: record.updated_at,
            detail: QUEUED_DETAIL.to_string(),
        })
    }

    fn relocations(&self) -> Vec<Relocation> {
        match self.journal.list() {
            Ok(records) => records
                .into_iter()
                .map(|r| Relocation {
                    id: r.id,
                    request: r.request,
                    state: r.state,
                    submitted_at: r.created_at,
                    updated_at: r.updated_at,
                    detail: r.detail,
                })
                .collect(),
            Err(e) => {
                tracing::error!("Cannot read the relocation journal: {e}.");
                Vec::new()
            }
        }
    }
}
