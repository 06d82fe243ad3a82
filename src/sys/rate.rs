//! A byte-rate token bucket shared by the streams of one transfer: the viaduct's connections
//! ([`RateLimiter::acquire`]) and a bucket copy's objects, which consult it from inside
//! `poll_read` ([`RateLimiter::reserve`]).
//!
//! Written here rather than taken from a crate: the general-purpose limiters count cells in
//! `u32` with a burst that must cover every request, while a transfer needs byte counts of
//! any size, debt instead of refusal, and nothing else.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    bytes_per_sec: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter for `bytes_per_sec` (above zero) whose bucket holds a quarter second of
    /// traffic, at least 64 KiB, and starts full.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 4.0).max(65536.0);
        RateLimiter {
            bytes_per_sec: rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `n` bytes at once and returns how long to wait before the next ones. The bucket
    /// goes into debt, so that a request larger than the burst still passes and later
    /// callers wait for it to be paid off. The lock is held for a few arithmetic operations
    /// only, never across a wait.
    pub fn reserve(&self, n: u64) -> Duration {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * self.bytes_per_sec;
        b.tokens = (b.tokens + refill).min(self.burst) - n as f64;
        b.last = now;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.bytes_per_sec)
        }
    }

    /// Waits until `n` bytes may go (see [`RateLimiter::reserve`]).
    pub async fn acquire(&self, n: u64) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rate_is_held_across_callers() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1 << 20));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    l.acquire(64 << 10).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 1 MiB at 1 MiB/s with a 256 KiB head start: at least 0.75 s.
        let secs = start.elapsed().as_secs_f64();
        assert!(secs >= 0.7, "took {secs}");
        assert!(secs < 3.0, "took {secs}");
    }

    #[test]
    fn a_read_larger_than_the_burst_passes_and_the_next_one_waits() {
        let limiter = RateLimiter::new(1 << 20);
        assert_eq!(limiter.reserve(256 << 10), Duration::ZERO);
        let wait = limiter.reserve(1 << 20);
        assert!(wait >= Duration::from_millis(900), "{wait:?}");
    }
}
