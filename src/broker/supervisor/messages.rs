//! What the rest of the daemon says to the supervisor ([`Command`]) and hears back, and the
//! [`BrokerHandle`] it says it through.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::evaluation::{Evaluation, FreshPrices};
use super::jobs::Job;
use super::views::ServiceStatus;
use crate::broker::decisions::Decision;
use crate::broker::{benchmarks, pricing};
use crate::conduit::Relocation;
use crate::config::ConfigErrors;
use crate::model::MarketSnapshot;
use crate::telemetry::Metrics;

/// Messages to the supervisor.
pub enum Command {
    Tick(Job),
    PollDone {
        job: Job,
        started: Instant,
        result: PollResult,
    },
    /// One tick's evaluations, and when the prices they saw were polled.
    EvaluationDone(Vec<Evaluation>, FreshPrices),
    Services(oneshot::Sender<Vec<ServiceStatus>>),
    Decisions {
        query: DecisionQuery,
        reply: oneshot::Sender<Vec<Decision>>,
    },
    Relocations {
        query: RelocationQuery,
        reply: oneshot::Sender<Result<Vec<Relocation>, ApiError>>,
    },
    Relocation {
        id: String,
        reply: oneshot::Sender<Option<Relocation>>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<Relocation, ApiError>>,
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

#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct DecisionQuery {
    pub service: Option<String>,
    pub outcome: Option<String>,
    pub limit: Option<usize>,
}

/// `GET /v1/relocations`: the most recent `limit` relocations of `service` in `state`, or
/// the most recent of those handed to the conduit `before` a given one (the next page back).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelocationQuery {
    pub service: Option<String>,
    /// A state (`running`, `grace`, …), or `active` for every unfinished one.
    pub state: Option<String>,
    /// Default [`RelocationQuery::DEFAULT_LIMIT`], at most [`RelocationQuery::MAX_LIMIT`].
    pub limit: Option<usize>,
    /// A relocation's id: only those handed to the conduit before it (the oldest of a page
    /// asks for the page before it).
    pub before: Option<String>,
}

impl RelocationQuery {
    pub const DEFAULT_LIMIT: usize = 100;
    /// The largest page: an answer is built in memory, each relocation with its steps.
    pub const MAX_LIMIT: usize = 1000;

    /// Whether `r` is one the query asks for.
    pub fn keeps(&self, r: &Relocation) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| &r.request.service == s)
            && match self.state.as_deref() {
                None => true,
                Some("active") => r.state.is_active(),
                Some(st) => r.state.as_str() == st,
            }
    }

    pub fn limit(&self) -> usize {
        self.limit
            .unwrap_or(Self::DEFAULT_LIMIT)
            .min(Self::MAX_LIMIT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// What the daemon needs to answer could not be read; the request itself was fine.
    #[error("{0}")]
    Internal(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub waiting_for: Vec<String>,
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
