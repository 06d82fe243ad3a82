//! Health checks run from this machine: an HTTP URL that must answer 2xx, a command that must
//! exit 0, or both. A check is retried until it passes or its timeout ends, because an app
//! that was just started needs a moment before it answers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::model::HealthCheck;
use crate::sys::retry::{self, ExponentialBuilder};

use super::{object, HealthReport, ProviderError};

/// Longest single attempt; a check with a long timeout still retries a hung request.
const MAX_ATTEMPT: Duration = Duration::from_secs(5);
/// Pauses between attempts: from 100 ms, doubling up to 2 s, with jitter so that checks
/// started together (a relocation's apps) do not hit a service in step.
const PAUSES: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(2))
    .without_max_times()
    .with_jitter();
/// How much of a failing command's output an error quotes.
const OUTPUT_TAIL: usize = 300;

/// Runs `check` for `service` at `provider` until it passes or `check.timeout` ends. At least
/// one attempt is made whatever the timeout.
pub async fn run(
    provider: &str,
    service: &str,
    check: &HealthCheck,
) -> Result<HealthReport, ProviderError> {
    let invalid = |reason: String| ProviderError::Invalid {
        provider: provider.to_string(),
        object: object::health_check(service),
        reason,
    };
    if check.url.is_none() && check.command.is_none() {
        return Err(invalid("it has neither `url` nor `command`".to_string()));
    }
    let url = match &check.url {
        None => None,
        Some(u) => {
            let parsed =
                reqwest::Url::parse(u).map_err(|e| invalid(format!("`{u}` is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(format!("`{u}` is not an http:// or https:// URL")));
            }
            Some(parsed)
        }
    };
    if let Some(c) = &check.command {
        if c.is_empty() || c[0].is_empty() {
            return Err(invalid("`command` is empty".to_string()));
        }
    }
    // Health checks go straight to the service: a proxy configured for the daemon's feed
    // downloads must not stand between it and the app it watches.
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| invalid(format!("cannot build an HTTP client: {e}")))?;

    let started = Instant::now();
    let mut attempts = 0u32;
    let outcome = retry::until_deadline(PAUSES, check.timeout, || {
        attempts += 1;
        let remaining = check.timeout.saturating_sub(started.elapsed());
        let budget = remaining.clamp(Duration::from_millis(100), MAX_ATTEMPT);
        attempt(&client, url.as_ref(), check.command.as_deref(), budget)
    })
    .await;
    match outcome {
        Ok(detail) => Ok(HealthReport {
            attempts,
            elapsed: started.elapsed(),
            detail,
        }),
        Err(last) => Err(ProviderError::Unhealthy {
            provider: provider.to_string(),
            object: object::health_check(service),
            timeout: check.timeout,
            attempts,
            last: last.to_string(),
        }),
    }
}

/// One attempt: the URL, then the command. Ok holds what passed, Err why it failed.
async fn attempt(
    client: &reqwest::Client,
    url: Option<&reqwest::Url>,
    command: Option<&[String]>,
    budget: Duration,
) -> Result<String, String> {
    let mut passed = Vec::new();
    if let Some(url) = url {
        let response = client
            .get(url.clone())
            .timeout(budget)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url} answered {status}, not 2xx"));
        }
        passed.push(format!("GET {url} answered {status}"));
    }
    if let Some(cmd) = command {
        let shown = cmd.join(" ");
        let child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
        let output = match tokio::time::timeout(budget, child.wait_with_output()).await {
            Err(_) => return Err(format!("`{shown}` did not finish within {budget:?}")),
            Ok(Err(e)) => return Err(format!("waiting for `{shown}`: {e}")),
            Ok(Ok(o)) => o,
        };
        if !output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
            if text.is_empty() {
                text = String::from_utf8_lossy(&output.stdout).trim().to_string();
            }
            let tail = tail(&text, OUTPUT_TAIL);
            return Err(if tail.is_empty() {
                format!("`{shown}` {}", output.status)
            } else {
                format!("`{shown}` {}: {tail}", output.status)
            });
        }
        passed.push(format!("`{shown}` exited 0"));
    }
    Ok(passed.join("; "))
}

/// reqwest's top-level message hides the cause ("error sending request"); the cause
/// ("connection refused") is what an operator needs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = s.source();
    }
    text
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
