//! [`Replay`]: the broker driven by hand in simulated time, to replay a price feed through
//! the real policies, guard rails and modes, one poll and one evaluation at a time.
//!
//! Polls enter where a poller's result would ([`Replay::poll_prices`]: the market-shock
//! rail and the stale-data guard see them), evaluations run the compiled policies and then
//! the rails exactly as a tick does ([`Replay::evaluate`]), and the clock moves only when
//! told to ([`Replay::advance`]). The conduit is a [`RecordingConduit`]: it records each
//! relocation and completes it at once, placing the service at its target.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::evaluation::evaluate_all;
use super::jobs::Job;
use super::messages::{DecisionQuery, PollResult};
use super::{BrokerError, Loaded, Seams, Supervisor};
use crate::broker::clock::{Clock, ManualClock};
use crate::broker::decisions::{Decision, RECENT_DECISIONS};
use crate::broker::pricing::PollOutcome;
use crate::conduit::{Conduit, ConduitError, Relocation, RelocationRequest, RelocationState};
use crate::model::{Offer, Placement, PlacementBook, PlacementReadError, Placements};
use crate::telemetry::{Metrics, SUPPRESSION_REASONS};

/// The broker of one configuration on a [`ManualClock`], with a [`RecordingConduit`].
pub struct Replay {
    pub(super) supervisor: Supervisor,
    clock: Arc<ManualClock>,
    conduit: Arc<RecordingConduit>,
    metrics: Arc<Metrics>,
}

impl Replay {
    /// Builds the broker of `loaded` (its state directory is used as the daemon's would
    /// be) with the clock at `start`.
    pub fn new(loaded: Loaded, start: DateTime<Utc>) -> Result<Replay, BrokerError> {
        let clock = Arc::new(ManualClock::new(start));
        let conduit = Arc::new(RecordingConduit::new(clock.clone()));
        let metrics = Arc::new(Metrics::new());
        let (supervisor, _handle) = Supervisor::new(
            loaded,
            Seams {
                conduit: conduit.clone(),
                placements: conduit.clone(),
                metrics: metrics.clone(),
                shutdown: CancellationToken::new(),
                notify: false,
                clock: clock.clone(),
            },
        )?;
        Ok(Replay {
            supervisor,
            clock,
            conduit,
            metrics,
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Moves the simulated time forward.
    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Takes a fresh download of `provider`'s price feed that produced `offers`, as its
    /// poller would report it.
    pub fn poll_prices(&mut self, provider: &str, offers: Vec<Offer>) {
        self.finish_pricing_poll(provider, offers, false);
    }

    /// Takes a poll of `provider`'s price feed that reused its cached download.
    pub fn poll_cached_prices(&mut self, provider: &str, offers: Vec<Offer>) {
        self.finish_pricing_poll(provider, offers, true);
    }

    fn finish_pricing_poll(&mut self, provider: &str, offers: Vec<Offer>, from_cache: bool) {
        let outcome = PollOutcome {
            offers,
            from_cache,
            bytes_read: 0,
            rejected: Vec::new(),
        };
        self.supervisor.finish_poll(
            Job::Pricing(provider.to_string()),
            Instant::now(),
            PollResult::Pricing(Ok(outcome)),
        );
    }

    /// One evaluation tick: every service's policy against the market, then the rails, the
    /// modes and the conduit, on this thread.
    pub fn evaluate(&mut self) {
        let s = &mut self.supervisor;
        s.refresh_placements();
        let evals = evaluate_all(
            &s.loaded.config,
            &s.loaded.policies,
            &s.placements,
            &s.market,
            &s.metrics,
            s.clock.now(),
        );
        let fresh = s.fresh_prices.clone();
        s.apply(evals, &fresh);
    }

    /// Where `service` runs now.
    pub fn provider_of(&mut self, service: &str) -> Option<String> {
        self.supervisor.refresh_placements();
        let config = self.supervisor.config();
        let spec = config.services.get(service)?;
        Some(super::placed_at(config, &self.supervisor.placements, spec).to_string())
    }

    /// Every relocation submitted so far, oldest first.
    pub fn relocations(&self) -> Vec<Relocation> {
        self.conduit.relocations()
    }

    /// Suppressions so far by reason (the `fluidcloud_suppressions_total` counters), the
    /// reasons never counted left out.
    pub fn suppressions(&self) -> BTreeMap<String, u64> {
        SUPPRESSION_REASONS
            .iter()
            .map(|r| {
                (
                    r.to_string(),
                    self.metrics.suppressions.with_label_values(&[r]).get(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The decisions logged so far (the most recent [`RECENT_DECISIONS`]), oldest first.
    pub fn decisions(&self) -> Vec<Decision> {
        self.supervisor.decisions(&DecisionQuery {
            limit: Some(RECENT_DECISIONS),
            ..DecisionQuery::default()
        })
    }

    /// Decisions so far by outcome (the `fluidcloud_decisions_total` counters), the outcomes
    /// never counted left out.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        crate::telemetry::OUTCOMES
            .iter()
            .map(|o| {
                (
                    o.to_string(),
                    self.metrics.decisions.with_label_values(&[o]).get(),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// A conduit that records each relocation and completes it at once: the service is placed
/// at the target from the submission's time, as the journal would after a commit. It also
/// serves as the placement book.
pub struct RecordingConduit {
    clock: Arc<dyn Clock>,
    state: Mutex<(Vec<Relocation>, Placements)>,
}

impl RecordingConduit {
    pub fn new(clock: Arc<dyn Clock>) -> RecordingConduit {
        RecordingConduit {
            clock,
            state: Mutex::default(),
        }
    }
}

impl Conduit for RecordingConduit {
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError> {
        let now = self.clock.now();
        let r = Relocation {
            id: request.decision_id.clone(),
            state: RelocationState::Completed,
            submitted_at: now,
            updated_at: now,
            detail: String::new(),
            steps: Vec::new(),
            progress: BTreeMap::new(),
            request,
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (relocations, placements) = &mut *state;
        let mut all: Vec<Placement> = placements.iter().cloned().collect();
        all.retain(|p| p.service != r.request.service);
        all.push(Placement {
            service: r.request.service.clone(),
            provider: r.request.to.clone(),
            since: now,
            relocation_id: r.id.clone(),
        });
        *placements = all.into_iter().collect();
        relocations.push(r.clone());
        Ok(r)
    }

    fn relocations(&self) -> Vec<Relocation> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}

impl PlacementBook for RecordingConduit {
    fn placements(&self) -> Result<Placements, PlacementReadError> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone())
    }
}
