//! The time the Broker's rails read: residency, cooldown, confirmations' market data,
//! budgets per window, blackout windows and the stale-data guard all ask one [`Clock`].
//!
//! The daemon runs on [`SystemClock`]. A [`ManualClock`] only moves when told to, so a feed
//! can be replayed through the real broker, policies and rails in simulated time (see
//! [`super::supervisor::Replay`]). Durations of real work (a poll, a policy run) are still
//! measured with `Instant`: they are about this machine, not about the market's time.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where the Broker reads the time of day.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until it is advanced; share it by `Arc`.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock(Mutex::new(start))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let start: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(3600));
        assert_eq!(clock.now(), start + chrono::Duration::hours(1));
    }
}
