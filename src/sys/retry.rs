//! Retrying with backoff, through [`backon`]: callers describe their delays with one of its
//! builders and either hand them to `backon` directly (a fixed number of attempts) or to
//! [`until_deadline`] (as many attempts as fit in a time limit). [`jittered`] is the backoff
//! for calls to a remote service that failed on the way.

use std::future::Future;
use std::time::{Duration, Instant};

pub use backon::{BackoffBuilder, ConstantBuilder, ExponentialBuilder, Retryable};

/// Pauses between attempts at a remote call that failed on the way (a reset, a timeout, a
/// `5xx` or `429` answer): 100 ms doubling up to 2 s, each stretched by a random part of
/// itself so that clients that failed together do not come back in step; `retries` more
/// attempts at most.
pub fn jittered(retries: usize) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(retries)
        .with_jitter()
}

/// Calls `attempt` until it succeeds or `timeout` (from now) has passed, pausing between
/// attempts as `backoff` says; a pause that would end past the deadline is cut short at it.
/// At least one attempt is made; the last failure is returned. `backoff` should set no
/// limit on the number of attempts: the deadline is the limit.
pub async fn until_deadline<T, E, B, F, Fut>(
    backoff: B,
    timeout: Duration,
    attempt: F,
) -> Result<T, E>
where
    B: BackoffBuilder,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    attempt
        .retry(backoff)
        .sleep(move |pause: Duration| {
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now())))
        })
        .when(move |_| Instant::now() < deadline)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_until_success() {
        let mut calls = 0;
        let backoff = ConstantBuilder::new()
            .with_delay(Duration::from_millis(1))
            .without_max_times();
        let result: Result<u32, &str> = until_deadline(backoff, Duration::from_secs(10), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err("not yet")
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result, Ok(3));
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_with_the_last_failure() {
        let started = Instant::now();
        let mut calls = 0u32;
        let backoff = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times();
        let result: Result<(), u32> = until_deadline(backoff, Duration::from_millis(300), || {
            calls += 1;
            let n = calls;
            async move { Err(n) }
        })
        .await;
        let elapsed = started.elapsed();
        assert_eq!(result, Err(calls));
        assert!(calls >= 2, "only {calls} attempts");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        // The 5 s pauses were cut at the deadline.
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn a_zero_timeout_still_makes_one_attempt() {
        let mut calls = 0;
        let result: Result<(), ()> = until_deadline(
            ConstantBuilder::new().without_max_times(),
            Duration::ZERO,
            || {
                calls += 1;
                async { Err(()) }
            },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }
}
