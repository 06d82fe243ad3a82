//! The cutover and re-contextualisation migrators: the owner's own programs or webhooks
//! that the conduit calls when a relocated service goes live, and the context document it
//! hands to the new instance.
//!
//! - [`run_hook`] calls a [`HookSpec`] with a [`HookEvent`] and returns a [`HookOutcome`]
//!   for the journal, or a [`HookError`] that carries the outcome too.
//! - The rollback of a cutover is the same hook called with [`HookEvent::rollback`]:
//!   phase `rollback`, providers and endpoints swapped, so a script always points clients
//!   at `new_endpoint`.
//! - [`ContextDocument`] is the instance's meta-data (in the spirit of cloud-init's), which
//!   [`ContextDocument::write_to`] puts in `fluidcloud-context.json` atomically.
//!
//! # What a command hook receives
//!
//! The event as one JSON object on stdin, and the same as environment variables (on top of
//! the daemon's environment, from which any other `FLUIDCLOUD_*` variable is removed):
//!
//! | Variable | Value |
//! | --- | --- |
//! | `FLUIDCLOUD_RELOCATION_ID` | the relocation's id |
//! | `FLUIDCLOUD_SERVICE` | the service's name |
//! | `FLUIDCLOUD_PHASE` | `cutover`, `rollback` or `recontextualise` |
//! | `FLUIDCLOUD_FROM_PROVIDER`, `FLUIDCLOUD_TO_PROVIDER` | provider names |
//! | `FLUIDCLOUD_OLD_ENDPOINT`, `FLUIDCLOUD_NEW_ENDPOINT` | `host:port` or URL; unset when unknown |
//! | `FLUIDCLOUD_FACT_<NAME>` | each fact, its name upper-cased with every other character than A–Z and 0–9 made `_` |
//!
//! It runs in the configuration's directory, in a process group of its own that is killed
//! as a whole when the timeout passes. Exit status 0 is success. The last
//! [`OUTPUT_TAIL_BYTES`] of stdout and stderr are kept.
//!
//! # What a webhook receives
//!
//! `POST` of the event as JSON, with `Authorization: Bearer <token>` when a token file is
//! configured, and `X-FluidCloud-Phase` and `X-FluidCloud-Relocation` headers. Redirects
//! are not followed. Any 2xx status is success.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

pub use crate::model::{HookSpec, HookTarget};

use super::rewrite::Placeholders;
use crate::sys::process::{spawn_in_group, wait_or_kill};

/// How much of a command's stdout and stderr, or of a webhook's response body, is kept.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// After a command exits, how long its output is still read: a background process it left
/// behind may hold the pipes open indefinitely.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// A webhook's response body is read up to this much, then dropped.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Name of the file [`ContextDocument::write_to`] writes.
pub const CONTEXT_FILE_NAME: &str = "fluidcloud-context.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookPhase {
    /// Clients are repointed at the relocated service.
    Cutover,
    /// A cutover is undone: clients go back to the source.
    Rollback,
    /// The relocated instance gets its new environment.
    Recontextualise,
}

impl HookPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::Cutover => "cutover",
            HookPhase::Rollback => "rollback",
            HookPhase::Recontextualise => "recontextualise",
        }
    }
}

impl fmt::Display for HookPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a hook is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEvent {
    pub relocation_id: String,
    pub service: String,
    pub phase: HookPhase,
    pub from_provider: String,
    pub to_provider: String,
    /// Where clients reach the service now (`host:port` or a URL), when known.
    pub old_endpoint: Option<String>,
    /// Where they should reach it after this hook, when known.
    pub new_endpoint: Option<String>,
    /// Anything else the engine knows and a hook may use (the context file's path, a
    /// volume's path…).
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
}

impl HookEvent {
    pub fn new(
        relocation_id: impl Into<String>,
        service: impl Into<String>,
        phase: HookPhase,
        from_provider: impl Into<String>,
        to_provider: impl Into<String>,
    ) -> Self {
        HookEvent {
            relocation_id: relocation_id.into(),
            service: service.into(),
            phase,
            from_provider: from_provider.into(),
            to_provider: to_provider.into(),
            old_endpoint: None,
            new_endpoint: None,
            facts: BTreeMap::new(),
        }
    }

    pub fn with_endpoints(mut self, old: Option<String>, new: Option<String>) -> Self {
        self.old_endpoint = old;
        self.new_endpoint = new;
        self
    }

    pub fn with_fact(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.facts.insert(name.into(), value.into());
        self
    }

    /// The event that undoes this one: phase `rollback`, providers and endpoints swapped.
    pub fn rollback(&self) -> HookEvent {
        HookEvent {
            phase: HookPhase::Rollback,
            from_provider: self.to_provider.clone(),
            to_provider: self.from_provider.clone(),
            old_endpoint: self.new_endpoint.clone(),
            new_endpoint: self.old_endpoint.clone(),
            ..self.clone()
        }
    }

    /// The `FLUIDCLOUD_*` variables a command hook gets (see the module documentation).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "FLUIDCLOUD_RELOCATION_ID".to_string(),
                self.relocation_id.clone(),
            ),
            ("FLUIDCLOUD_SERVICE".to_string(), self.service.clone()),
            ("FLUIDCLOUD_PHASE".to_string(), self.phase.to_string()),
            (
                "FLUIDCLOUD_FROM_PROVIDER".to_string(),
                self.from_provider.clone(),
            ),
            (
                "FLUIDCLOUD_TO_PROVIDER".to_string(),
                self.to_provider.clone(),
            ),
        ];
        if let Some(e) = &self.old_endpoint {
            env.push(("FLUIDCLOUD_OLD_ENDPOINT".to_string(), e.clone()));
        }
        if let Some(e) = &self.new_endpoint {
            env.push(("FLUIDCLOUD_NEW_ENDPOINT".to_string(), e.clone()));
        }
        for (name, value) in &self.facts {
            let name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            env.push((format!("FLUIDCLOUD_FACT_{name}"), value.clone()));
        }
        env
    }
}

/// What ran and how it ended; journalled for every hook call, failed or not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HookOutcome {
    pub relocation_id: String,
    pub service: String,
    pub phase: HookPhase,
    #[serde(flatten)]
    pub run: HookRun,
    pub started_at: DateTime<Utc>,
    pub duration_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HookRun {
    Command {
        argv: Vec<String>,
        /// `None` when a signal ended it.
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// Killed because the timeout passed.
        timed_out: bool,
        stdout_tail: String,
        stderr_tail: String,
    },
    Webhook {
        url: String,
        /// `None` when no response came.
        status: Option<u16>,
        body_tail: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook of service `{service}` is misconfigured: {message}")]
    Misconfigured {
        service: String,
        phase: HookPhase,
        message: String,
    },
    #[error("{phase} hook of service `{service}`: cannot run `{program}`: {error}")]
    Spawn {
        service: String,
        phase: HookPhase,
        program: String,
        error: std::io::Error,
    },
    #[error("{phase} hook of service `{service}`: `{command}` {status}{}", stderr_note(.stderr_tail))]
    Exited {
        service: String,
        phase: HookPhase,
        command: String,
        /// `exited with status 3` or `was killed by signal 9`.
        status: String,
        stderr_tail: String,
        outcome: Box<HookOutcome>,
    },
    #[error("{phase} hook of service `{service}`: `{command}` did not finish within {} s and was killed{}", .timeout.as_secs_f64(), stderr_note(.stderr_tail))]
    TimedOut {
        service: String,
        phase: HookPhase,
        command: String,
        timeout: Duration,
        stderr_tail: String,
        outcome: Box<HookOutcome>,
    },
    #[error("{phase} hook of service `{service}`: cannot read the token file {}: {error}", path.display())]
    Token {
        service: String,
        phase: HookPhase,
        path: PathBuf,
        error: TokenError,
    },
    #[error("{phase} hook of service `{service}`: POST {url} failed: {message}")]
    Request {
        service: String,
        phase: HookPhase,
        url: String,
        message: String,
        outcome: Box<HookOutcome>,
    },
    #[error("{phase} hook of service `{service}`: POST {url} answered {status}{}", body_note(.body_tail))]
    Status {
        service: String,
        phase: HookPhase,
        url: String,
        status: u16,
        body_tail: String,
        outcome: Box<HookOutcome>,
    },
}

impl HookError {
    /// What ran, for the journal, when the hook got as far as running.
    pub fn outcome(&self) -> Option<&HookOutcome> {
        match self {
            HookError::Exited { outcome, .. }
            | HookError::TimedOut { outcome, .. }
            | HookError::Request { outcome, .. }
            | HookError::Status { outcome, .. } => Some(outcome),
            _ => None,
        }
    }
}

fn stderr_note(tail: &str) -> String {
    let t = tail.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; stderr ends with: {t}")
    }
}

fn body_note(tail: &str) -> String {
    let t = tail.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; body: {t}")
    }
}

/// Calls the hook with the event and waits for it, at most the hook's timeout.
pub async fn run_hook(spec: &HookSpec, event: &HookEvent) -> Result<HookOutcome, HookError> {
    match &spec.target {
        HookTarget::Command { argv, workdir } => {
            run_command(argv, workdir, spec.timeout, event).await
        }
        HookTarget::Webhook { url, token_file } => {
            run_webhook(url, token_file.as_deref(), spec.timeout, event).await
        }
    }
}

/// The last bytes of a stream.
#[derive(Default)]
struct Tail {
    kept: Vec<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        self.kept.extend_from_slice(bytes);
        if self.kept.len() > 2 * OUTPUT_TAIL_BYTES {
            self.kept.drain(..self.kept.len() - OUTPUT_TAIL_BYTES);
        }
    }

    fn text(&self) -> String {
        let start = self.kept.len().saturating_sub(OUTPUT_TAIL_BYTES);
        let mut bytes = &self.kept[start..];
        let cut = self.total > bytes.len() as u64;
        if cut {
            // Do not start in the middle of a UTF-8 character.
            while let [b, rest @ ..] = bytes {
                if b & 0b1100_0000 != 0b1000_0000 {
                    break;
                }
                bytes = rest;
            }
        }
        let text = String::from_utf8_lossy(bytes);
        if cut {
            format!("…{text}")
        } else {
            text.into_owned()
        }
    }
}

async fn read_into(mut r: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&chunk[..n]);
                }
            }
            Err(e) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(format!("\n(output could not be read: {e})").as_bytes());
                }
                break;
            }
        }
    }
}

fn shown(argv: &[String]) -> String {
    argv.join(" ")
}

fn describe(status: ExitStatus) -> (Option<i32>, Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (Some(c), None, format!("exited with status {c}")),
        (None, Some(s)) => (None, Some(s), format!("was killed by signal {s}")),
        (None, None) => (None, None, "ended without a status".to_string()),
    }
}

async fn run_command(
    argv: &[String],
    workdir: &Path,
    timeout: Duration,
    event: &HookEvent,
) -> Result<HookOutcome, HookError> {
    let misconfigured = |message: String| HookError::Misconfigured {
        service: event.service.clone(),
        phase: event.phase,
        message,
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(misconfigured("the command is empty".to_string()));
    };
    let input = serde_json::to_vec(event)
        .map_err(|e| misconfigured(format!("the event cannot be encoded as JSON: {e}")))?;

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A hook sees exactly this event, not variables the daemon happened to inherit.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FLUIDCLOUD_") {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(event.env());

    let started_at = Utc::now();
    let clock = Instant::now();
    let (mut child, mut group) = spawn_in_group(&mut cmd).map_err(|error| HookError::Spawn {
        service: event.service.clone(),
        phase: event.phase,
        program: program.clone(),
        error,
    })?;

    let stdout_tail = Arc::new(Mutex::new(Tail::default()));
    let stderr_tail = Arc::new(Mutex::new(Tail::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_into(out, stdout_tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_into(err, stderr_tail.clone())));
    }
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read stdin closes it early; the broken pipe is its choice,
        // not a failure.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        });
    }

    let status = wait_or_kill(&mut child, &mut group, timeout)
        .await
        .map_err(|error| HookError::Spawn {
            service: event.service.clone(),
            phase: event.phase,
            program: program.clone(),
            error,
        })?;
    let deadline = tokio::time::Instant::now() + OUTPUT_GRACE;
    for mut reader in readers {
        if tokio::time::timeout_at(deadline, &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
    }
    let duration = clock.elapsed();
    let text = |t: &Arc<Mutex<Tail>>| t.lock().map(|t| t.text()).unwrap_or_default();
    let (stdout_tail, stderr_tail) = (text(&stdout_tail), text(&stderr_tail));

    let (exit_code, signal, description) = match status {
        Some(s) => describe(s),
        None => (None, Some(Signal::KILL.as_raw()), String::new()),
    };
    let outcome = HookOutcome {
        relocation_id: event.relocation_id.clone(),
        service: event.service.clone(),
        phase: event.phase,
        run: HookRun::Command {
            argv: argv.to_vec(),
            exit_code,
            signal,
            timed_out: status.is_none(),
            stdout_tail,
            stderr_tail: stderr_tail.clone(),
        },
        started_at,
        duration_secs: duration.as_secs_f64(),
    };
    match status {
        None => Err(HookError::TimedOut {
            service: event.service.clone(),
            phase: event.phase,
            command: shown(argv),
            timeout,
            stderr_tail,
            outcome: Box::new(outcome),
        }),
        Some(s) if !s.success() => Err(HookError::Exited {
            service: event.service.clone(),
            phase: event.phase,
            command: shown(argv),
            status: description,
            stderr_tail,
            outcome: Box::new(outcome),
        }),
        Some(_) => Ok(outcome),
    }
}

/// Why a webhook's bearer token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Secret(#[from] crate::sys::secret::SecretError),
    #[error("it holds more than one line or control characters")]
    NotOneLine,
}

/// Reads a bearer token file, under the rule of every secret file (none others can read).
fn read_token(path: &Path) -> Result<String, TokenError> {
    let token = crate::sys::secret::read_text(path, "the token file")?;
    if token.chars().any(|c| c.is_control()) {
        return Err(TokenError::NotOneLine);
    }
    Ok(token)
}

/// The error and its causes in one line: reqwest's own message alone rarely says why.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

async fn run_webhook(
    url: &str,
    token_file: Option<&Path>,
    timeout: Duration,
    event: &HookEvent,
) -> Result<HookOutcome, HookError> {
    // The URL as it may be journalled, answered and logged: without its credentials.
    let shown_url = crate::sys::redact::redact_url(url);
    let token = match token_file {
        Some(path) => Some(read_token(path).map_err(|error| HookError::Token {
            service: event.service.clone(),
            phase: event.phase,
            path: path.to_path_buf(),
            error,
        })?),
        None => None,
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        // A redirected POST turns into a GET in most clients; a hook's address must be
        // exact instead.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fluidcloud/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| HookError::Misconfigured {
            service: event.service.clone(),
            phase: event.phase,
            message: format!("cannot build an HTTP client: {}", chain(&e)),
        })?;
    let mut request = client
        .post(url)
        .json(event)
        .header("X-FluidCloud-Phase", event.phase.as_str())
        .header("X-FluidCloud-Relocation", &event.relocation_id);
    if let Some(t) = &token {
        request = request.bearer_auth(t);
    }

    let started_at = Utc::now();
    let clock = Instant::now();
    let outcome = |status: Option<u16>, body_tail: String, duration: Duration| HookOutcome {
        relocation_id: event.relocation_id.clone(),
        service: event.service.clone(),
        phase: event.phase,
        run: HookRun::Webhook {
            url: shown_url.clone(),
            status,
            body_tail,
        },
        started_at,
        duration_secs: duration.as_secs_f64(),
    };
    let request_error = |e: reqwest::Error, status: Option<u16>, body: String| {
        let message = if e.is_timeout() {
            format!("no answer within {} s", timeout.as_secs_f64())
        } else {
            chain(&e.without_url())
        };
        HookError::Request {
            service: event.service.clone(),
            phase: event.phase,
            url: shown_url.clone(),
            message,
            outcome: Box::new(outcome(status, body, clock.elapsed())),
        }
    };

    let mut response = request
        .send()
        .await
        .map_err(|e| request_error(e, None, String::new()))?;
    let status = response.status();
    let mut body = Tail::default();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                body.push(&bytes);
                if body.total >= MAX_BODY_BYTES as u64 {
                    break;
                }
            }
            Ok(None) => break,
            // The status decides success; a body cut short only matters for a failure,
            // which is reported with what arrived.
            Err(e) if status.is_success() => {
                return Err(request_error(e, Some(status.as_u16()), body.text()));
            }
            Err(_) => break,
        }
    }
    let result = outcome(Some(status.as_u16()), body.text(), clock.elapsed());
    if status.is_success() {
        Ok(result)
    } else {
        Err(HookError::Status {
            service: event.service.clone(),
            phase: event.phase,
            url: shown_url.clone(),
            status: status.as_u16(),
            body_tail: body.text(),
            outcome: Box::new(result),
        })
    }
}

/// Where clients reach one app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppEndpoint {
    pub host: String,
    pub port: u16,
}

impl AppEndpoint {
    /// `host:port`, with an IPv6 host in brackets.
    pub fn address(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where a bucket's data is, at the target or kept behind at the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketContext {
    /// A directory, for providers that keep buckets as directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An object-store URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// The relocated instance's meta-data, written beside it for the app and its tools to
/// read: who it is, where it now runs, and where its data is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextDocument {
    /// Changes when a field changes meaning.
    pub format_version: u32,
    /// `service@provider`: stable while the service stays, new when it moves.
    pub instance_id: String,
    pub local_hostname: String,
    pub service: String,
    pub provider: String,
    pub region: String,
    pub cloud: Option<String>,
    pub relocation_id: String,
    /// By app name.
    pub endpoints: BTreeMap<String, AppEndpoint>,
    /// Volume paths by volume name.
    pub volumes: BTreeMap<String, String>,
    pub buckets: BTreeMap<String, BucketContext>,
    pub generated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the context file {}: {error}", path.display())]
pub struct ContextWriteError {
    pub path: PathBuf,
    pub error: std::io::Error,
}

impl ContextDocument {
    pub const FORMAT_VERSION: u32 = 1;

    pub fn new(
        service: impl Into<String>,
        provider: impl Into<String>,
        region: impl Into<String>,
        cloud: Option<String>,
        relocation_id: impl Into<String>,
    ) -> Self {
        let (service, provider) = (service.into(), provider.into());
        ContextDocument {
            format_version: Self::FORMAT_VERSION,
            instance_id: format!("{service}@{provider}"),
            local_hostname: service.clone(),
            service,
            provider,
            region: region.into(),
            cloud,
            relocation_id: relocation_id.into(),
            endpoints: BTreeMap::new(),
            volumes: BTreeMap::new(),
            buckets: BTreeMap::new(),
            generated_at: Utc::now(),
        }
    }

    /// The placeholders config rewriting fills in for this target: `service`, `provider`,
    /// `region`, `cloud` (when known), `relocation_id`, `app.NAME.host`, `app.NAME.port`,
    /// `volume.NAME.path`, `bucket.NAME.path`, `bucket.NAME.endpoint`.
    pub fn placeholders(&self) -> Placeholders {
        let mut p = Placeholders::new();
        p.insert("service", self.service.as_str());
        p.insert("provider", self.provider.as_str());
        p.insert("region", self.region.as_str());
        p.insert("relocation_id", self.relocation_id.as_str());
        if let Some(c) = &self.cloud {
            p.insert("cloud", c.as_str());
        }
        for (name, e) in &self.endpoints {
            p.set_app(name, e.host.as_str(), e.port);
        }
        for (name, path) in &self.volumes {
            p.set_volume(name, path.as_str());
        }
        for (name, b) in &self.buckets {
            p.set_bucket(name, b.path.clone(), b.endpoint.clone());
        }
        p
    }

    /// Writes `fluidcloud-context.json` into `dir` so that a reader sees either the old
    /// file or the whole new one: a temporary file, flushed to disk, renamed over it.
    pub fn write_to(&self, dir: &Path) -> Result<PathBuf, ContextWriteError> {
        let path = dir.join(CONTEXT_FILE_NAME);
        let fail = |error| ContextWriteError {
            path: path.clone(),
            error,
        };
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| fail(std::io::Error::other(e)))?;
        json.push(b'\n');
        crate::sys::fs::write_atomic(&path, &json).map_err(fail)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn event() -> HookEvent {
        HookEvent::new(
            "dec-42",
            "shop",
            HookPhase::Cutover,
            "home-virginia",
            "home-frankfurt",
        )
        .with_endpoints(Some("10.0.0.5:8080".into()), Some("127.0.0.1:9090".into()))
        .with_fact("context_file", "/srv/shop/fluidcloud-context.json")
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn command_hook(dir: &Path, program: &Path, timeout: Duration) -> HookSpec {
        HookSpec {
            target: HookTarget::Command {
                argv: vec![program.to_string_lossy().into_owned(), "first arg".into()],
                workdir: dir.to_path_buf(),
            },
            timeout,
        }
    }

    #[tokio::test]
    async fn a_command_hook_gets_the_event_on_stdin_and_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "repoint.sh",
            r#"cat > stdin.json
env | grep '^FLUIDCLOUD_' | sort > env.txt
echo "arg=$1 cwd=$(pwd)"
echo "repointed" >&2
"#,
        );
        let spec = command_hook(dir.path(), &prog, Duration::from_secs(10));
        let outcome = run_hook(&spec, &event()).await.unwrap();

        let seen: HookEvent =
            serde_json::from_slice(&std::fs::read(dir.path().join("stdin.json")).unwrap()).unwrap();
        assert_eq!(seen, event());
        let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
        for line in [
            "FLUIDCLOUD_FACT_CONTEXT_FILE=/srv/shop/fluidcloud-context.json",
            "FLUIDCLOUD_FROM_PROVIDER=home-virginia",
            "FLUIDCLOUD_NEW_ENDPOINT=127.0.0.1:9090",
            "FLUIDCLOUD_OLD_ENDPOINT=10.0.0.5:8080",
            "FLUIDCLOUD_PHASE=cutover",
            "FLUIDCLOUD_RELOCATION_ID=dec-42",
            "FLUIDCLOUD_SERVICE=shop",
            "FLUIDCLOUD_TO_PROVIDER=home-frankfurt",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} not in:\n{env}");
        }
        assert_eq!(env.lines().count(), 8, "{env}");
        match &outcome.run {
            HookRun::Command {
                exit_code,
                timed_out,
                stdout_tail,
                stderr_tail,
                ..
            } => {
                assert_eq!(*exit_code, Some(0));
                assert!(!timed_out);
                let cwd = std::fs::canonicalize(dir.path()).unwrap();
                assert_eq!(
                    stdout_tail.trim(),
                    format!("arg=first arg cwd={}", cwd.display())
                );
                assert_eq!(stderr_tail.trim(), "repointed");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(outcome.phase, HookPhase::Cutover);
        let journalled = serde_json::to_value(&outcome).unwrap();
        assert_eq!(journalled["kind"], "command");
        assert_eq!(journalled["phase"], "cutover");
    }

    #[tokio::test]
    async fn rollback_swaps_providers_and_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "repoint.sh",
            "echo \"$FLUIDCLOUD_PHASE $FLUIDCLOUD_TO_PROVIDER $FLUIDCLOUD_NEW_ENDPOINT\"\n",
        );
        let spec = command_hook(dir.path(), &prog, Duration::from_secs(10));
        let outcome = run_hook(&spec, &event().rollback()).await.unwrap();
        let HookRun::Command { stdout_tail, .. } = outcome.run else {
            panic!("not a command")
        };
        assert_eq!(stdout_tail.trim(), "rollback home-virginia 10.0.0.5:8080");
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_status_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "repoint.sh",
            "echo 'zone example.com: record not found' >&2\nexit 3\n",
        );
        let spec = command_hook(dir.path(), &prog, Duration::from_secs(10));
        let err = run_hook(&spec, &event()).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exited with status 3"), "{msg}");
        assert!(msg.contains("record not found"), "{msg}");
        assert!(msg.contains("cutover hook of service `shop`"), "{msg}");
        match err.outcome().map(|o| &o.run) {
            Some(HookRun::Command { exit_code, .. }) => assert_eq!(*exit_code, Some(3)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let prog = script(
            dir.path(),
            "slow.sh",
            "sleep 30 &\necho $! > child.pid\necho started\nwait\n",
        );
        let spec = command_hook(dir.path(), &prog, Duration::from_secs(1));
        let clock = Instant::now();
        let err = run_hook(&spec, &event()).await.unwrap_err();
        let took = clock.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(
            matches!(err, HookError::TimedOut { .. }),
            "unexpected {err:?}"
        );
        match err.outcome().map(|o| &o.run) {
            Some(HookRun::Command {
                timed_out,
                stdout_tail,
                ..
            }) => {
                assert!(timed_out);
                assert_eq!(stdout_tail.trim(), "started");
            }
            other => panic!("unexpected {other:?}"),
        }
        let pid: i32 = std::fs::read_to_string(dir.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background `sleep` was in the hook's group: it must be gone (or a zombie
        // waiting for init), not sleeping on. SIGKILL is delivered asynchronously, so
        // give the kernel a moment to finish it off.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .map(str::to_owned);
            if matches!(state.as_deref(), None | Some("Z") | Some("X")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hook's child {pid} survived: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_missing_program_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spec = command_hook(
            dir.path(),
            &dir.path().join("nope.sh"),
            Duration::from_secs(1),
        );
        let err = run_hook(&spec, &event()).await.unwrap_err();
        assert!(matches!(err, HookError::Spawn { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.sh"), "{err}");
        assert!(err.outcome().is_none());
    }

    #[test]
    fn output_tails_are_bounded_and_start_on_a_character() {
        let mut t = Tail::default();
        t.push("é".repeat(OUTPUT_TAIL_BYTES).as_bytes());
        t.push(b"end");
        let s = t.text();
        assert!(s.starts_with('…') && s.ends_with("end"), "{}", &s[..20]);
        assert!(!s.contains('\u{fffd}'));
        assert!(s.len() <= OUTPUT_TAIL_BYTES + '…'.len_utf8());
        assert_eq!(t.total, 2 * OUTPUT_TAIL_BYTES as u64 + 3);
    }

    /// The `Authorization` header and body of one request.
    type Request = (Option<String>, serde_json::Value);

    #[derive(Clone, Default)]
    struct Received(Arc<Mutex<Vec<Request>>>);

    async fn serve(received: Received) -> std::net::SocketAddr {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::post;
        async fn hook(
            axum::extract::State(r): axum::extract::State<Received>,
            headers: HeaderMap,
            body: axum::Json<serde_json::Value>,
        ) -> (StatusCode, &'static str) {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let ok = auth.as_deref() == Some("Bearer s3cret");
            r.0.lock().unwrap().push((auth, body.0));
            if ok {
                (StatusCode::OK, "repointed")
            } else {
                (StatusCode::UNAUTHORIZED, "bad token")
            }
        }
        async fn broken() -> (StatusCode, &'static str) {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "dns provider unreachable",
            )
        }
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .route("/broken", post(broken))
            .with_state(received);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    fn token_file(dir: &Path, token: &str, mode: u32) -> PathBuf {
        let p = dir.join("token");
        std::fs::write(&p, token).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[tokio::test]
    async fn a_webhook_posts_the_event_with_the_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let received = Received::default();
        let addr = serve(received.clone()).await;
        let spec = HookSpec {
            target: HookTarget::Webhook {
                url: format!("http://{addr}/hook"),
                token_file: Some(token_file(dir.path(), "s3cret\n", 0o600)),
            },
            timeout: Duration::from_secs(10),
        };
        let outcome = run_hook(&spec, &event()).await.unwrap();
        assert_eq!(
            outcome.run,
            HookRun::Webhook {
                url: format!("http://{addr}/hook"),
                status: Some(200),
                body_tail: "repointed".into(),
            }
        );
        {
            let got = received.0.lock().unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, serde_json::to_value(event()).unwrap());
            assert_eq!(got[0].1["phase"], "cutover");
        }

        // A wrong token is the server's 401, reported as such.
        let spec = HookSpec {
            target: HookTarget::Webhook {
                url: format!("http://{addr}/hook"),
                token_file: Some(token_file(dir.path(), "guess", 0o600)),
            },
            timeout: Duration::from_secs(10),
        };
        let err = run_hook(&spec, &event()).await.unwrap_err();
        assert!(err.to_string().contains("answered 401"), "{err}");
        assert_eq!(
            received.0.lock().unwrap()[1].0.as_deref(),
            Some("Bearer guess")
        );
    }

    #[tokio::test]
    async fn a_webhook_error_status_is_reported_with_the_body() {
        let received = Received::default();
        let addr = serve(received).await;
        let spec = HookSpec {
            target: HookTarget::Webhook {
                url: format!("http://{addr}/broken"),
                token_file: None,
            },
            timeout: Duration::from_secs(10),
        };
        let err = run_hook(&spec, &event().rollback()).await.unwrap_err();
        match &err {
            HookError::Status {
                status, body_tail, ..
            } => {
                assert_eq!(*status, 500);
                assert_eq!(body_tail, "dns provider unreachable");
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("rollback hook of service `shop`") && msg.contains("answered 500"),
            "{msg}"
        );
        assert!(err.outcome().is_some());
    }

    #[tokio::test]
    async fn unreachable_webhooks_and_unsafe_tokens_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on: bind, note it, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let spec = HookSpec {
            target: HookTarget::Webhook {
                url: format!("http://{addr}/hook"),
                token_file: None,
            },
            timeout: Duration::from_secs(5),
        };
        let err = run_hook(&spec, &event()).await.unwrap_err();
        assert!(matches!(err, HookError::Request { .. }), "{err:?}");

        let spec = HookSpec {
            target: HookTarget::Webhook {
                url: format!("http://{addr}/hook"),
                token_file: Some(token_file(dir.path(), "s3cret", 0o644)),
            },
            timeout: Duration::from_secs(5),
        };
        let err = run_hook(&spec, &event()).await.unwrap_err();
        assert!(err.to_string().contains("open to other users"), "{err}");
    }

    #[test]
    fn the_context_document_is_written_whole_and_gives_the_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let mut doc = ContextDocument::new(
            "shop",
            "home-frankfurt",
            "eu-central-1",
            Some("aws".into()),
            "dec-42",
        );
        doc.endpoints.insert(
            "web".into(),
            AppEndpoint {
                host: "127.0.0.1".into(),
                port: 9090,
            },
        );
        doc.volumes
            .insert("data".into(), "/srv/fc/volumes/shop/data.raw".into());
        doc.buckets.insert(
            "assets".into(),
            BucketContext {
                path: None,
                endpoint: Some("http://127.0.0.1:9000/assets".into()),
            },
        );
        std::fs::write(dir.path().join(CONTEXT_FILE_NAME), "old").unwrap();
        let path = doc.write_to(dir.path()).unwrap();
        assert_eq!(path, dir.path().join(CONTEXT_FILE_NAME));
        let read: ContextDocument =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read, doc);
        assert_eq!(read.instance_id, "shop@home-frankfurt");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from(CONTEXT_FILE_NAME)]);

        let p = doc.placeholders();
        assert_eq!(p.get("app.web.port"), Some("9090"));
        assert_eq!(
            p.get("volume.data.path"),
            Some("/srv/fc/volumes/shop/data.raw")
        );
        assert_eq!(
            p.get("bucket.assets.endpoint"),
            Some("http://127.0.0.1:9000/assets")
        );
        assert_eq!(p.get("bucket.assets.path"), None);
        assert_eq!(p.get("cloud"), Some("aws"));

        let err = doc.write_to(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let e = AppEndpoint {
            host: "::1".into(),
            port: 80,
        };
        assert_eq!(e.address(), "[::1]:80");
    }
}
