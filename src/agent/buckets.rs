//! Buckets pulled host to host: asked by the daemon, an agent copies a bucket of another
//! agent's provider into one of its own, reading the objects from that agent directly with
//! its own certificate (agents may read each other's objects, nothing else). The copy is the
//! [`crate::providers::copier`]'s: skip what is equal, copy the rest, compare BLAKE3
//! manifests of both sides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::model::{DiskFormat, Driver};
use crate::providers::copier::{self, BucketCopyOptions, BucketProgress};
use crate::providers::remote::wire::{PullBucket, PullId, PullState};
use crate::providers::remote::RemoteProvider;
use crate::providers::{Provider, ProviderError};
use crate::sys::tls::Identity;

/// A finished pull is answered for this long, then forgotten.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);

struct Tracked {
    state: Arc<Mutex<PullState>>,
    started: Instant,
    cancel: CancellationToken,
}

/// The pulls of one agent.
pub struct Pulls {
    identity: Arc<Identity>,
    running: Mutex<HashMap<String, Tracked>>,
    /// The pull each target bucket is being filled by, so a repeated request (the daemon
    /// asking again after a restart) joins it instead of starting a second.
    by_bucket: Mutex<HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("bucket pull `{0}` is not known to this agent")]
    Unknown(String),
}

impl Pulls {
    pub fn new(identity: Arc<Identity>) -> Self {
        Pulls {
            identity,
            running: Mutex::new(HashMap::new()),
            by_bucket: Mutex::new(HashMap::new()),
        }
    }

    /// Starts filling bucket `req.bucket` of `target` from the other agent; answers at once.
    pub fn start(&self, target: Arc<dyn Provider>, req: PullBucket) -> Result<PullId, PullError> {
        let key = format!("{}/{}/{}", req.provider, req.service, req.bucket);
        if let Some(id) = self.by_bucket.lock().unwrap().get(&key).cloned() {
            let running = self
                .running
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|t| matches!(*t.state.lock().unwrap(), PullState::Running { .. }));
            if running {
                return Ok(PullId { id });
            }
        }
        // The source is another agent's provider; its driver and disk format do not matter
        // for reading objects.
        let source = RemoteProvider::new(
            &req.from_provider,
            Driver::Local,
            DiskFormat::Raw,
            &req.from_agent,
            &self.identity,
        )?;
        let id = super::transfers::random_secret()[..16].to_string();
        let state = Arc::new(Mutex::new(PullState::Running { progress: None }));
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap();
            running.retain(|_, t| {
                t.started.elapsed() < KEEP_FINISHED
                    || matches!(*t.state.lock().unwrap(), PullState::Running { .. })
            });
            running.insert(
                id.clone(),
                Tracked {
                    state: state.clone(),
                    started: Instant::now(),
                    cancel: cancel.clone(),
                },
            );
            let mut by_bucket = self.by_bucket.lock().unwrap();
            by_bucket.retain(|_, id| running.contains_key(id));
            by_bucket.insert(key, id.clone());
        }
        tokio::spawn(async move {
            let options = BucketCopyOptions {
                concurrency: req.concurrency,
                max_bytes_per_sec: req.max_bytes_per_sec,
                cancel,
                known: req.known.clone(),
                ..BucketCopyOptions::default()
            };
            let progress_state = state.clone();
            let progress = move |p: BucketProgress| {
                *progress_state.lock().unwrap() = PullState::Running { progress: Some(p) };
            };
            let result = copier::copy_bucket(
                &source,
                &req.service,
                &req.bucket,
                target.as_ref(),
                &req.service,
                &req.bucket,
                &options,
                &progress,
            )
            .await;
            let end = match result {
                Ok(report) => {
                    tracing::info!(
                        "Pulled bucket `{}/{}` of `{}` at {} into `{}`: {} objects copied, {} equal.",
                        req.service,
                        req.bucket,
                        req.from_provider,
                        req.from_agent,
                        req.provider,
                        report.objects_copied,
                        report.objects_skipped
                    );
                    let known = report.known.clone();
                    PullState::Done {
                        report: Box::new(report),
                        known,
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "Pulling bucket `{}/{}` of `{}` at {} failed: {e}.",
                        req.service,
                        req.bucket,
                        req.from_provider,
                        req.from_agent
                    );
                    PullState::Failed {
                        error: e.to_string(),
                    }
                }
            };
            *state.lock().unwrap() = end;
        });
        Ok(PullId { id })
    }

    pub fn status(&self, id: &str) -> Result<PullState, PullError> {
        self.running
            .lock()
            .unwrap()
            .get(id)
            .map(|t| t.state.lock().unwrap().clone())
            .ok_or_else(|| PullError::Unknown(id.to_string()))
    }

    /// Stops a running pull; what was copied stays and is skipped by the next.
    pub fn cancel(&self, id: &str) -> Result<(), PullError> {
        self.running
            .lock()
            .unwrap()
            .get(id)
            .map(|t| t.cancel.cancel())
            .ok_or_else(|| PullError::Unknown(id.to_string()))
    }
}
