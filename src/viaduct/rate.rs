//! A byte-rate token bucket shared by the streams of one transfer.
//!
//! Written here rather than taken from a crate: the general-purpose limiters count cells in
//! `u32` with a burst that must cover every request, while the viaduct needs byte counts
//! of any size, debt instead of refusal, and nothing else.

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

pub(crate) struct RateLimiter {
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

    /// Waits until `n` bytes may go. Takes the tokens at once and lets the bucket go into
    /// debt, so that a request larger than the burst still passes and later callers wait
    /// for it to be paid off; waiting happens outside the lock.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut b = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(b.last).as_secs_f64() * self.bytes_per_sec;
            b.tokens = (b.tokens + refill).min(self.burst);
            b.last = now;
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-b.tokens / self.bytes_per_sec)
        };
        tokio::time::sleep(wait).await;
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
}
