//! The bucket migrator: copies a bucket's objects to the target while the source runs, and
//! copies what changed since at cutover, both through the [`crate::providers::copier`]. The
//! hashes the pre-copy learned wait in the work directory for the sync. Its undo deletes the
//! target's bucket and its objects, each call again on temporary failures. A bucket kept at
//! its source (`keep_at_source`) gets no step. Between two agents the target's agent pulls
//! the objects from the source's ([`crate::agent::buckets`]), so they go host to host;
//! otherwise the daemon copies them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::{Cx, Migrator, MigratorError};
use crate::providers::copier::{self, BucketCopyOptions, BucketCopyReport, BucketProgress};
use crate::providers::remote::wire::{PullBucket, PullState};
use crate::providers::remote::RemoteProvider;

/// `copy:<bucket>` and `sync:<bucket>`: the same copy, the second finding less to do.
pub struct CopyBucket {
    /// The step's name, for progress reports.
    pub step: String,
    pub bucket: String,
}

#[async_trait::async_trait]
impl Migrator for CopyBucket {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        copy_bucket(cx, &self.step, &self.bucket).await
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        // Each delete is made again on temporary failures: a reset must not leave objects
        // behind and fail the rollback.
        copier::remove_bucket(cx.target.as_ref(), cx.svc(), &self.bucket).await?;
        Ok(())
    }
}

/// Where the hashes a bucket's pre-copy learned wait for its final sync.
fn known_hashes_path(cx: &Cx, bucket: &str) -> PathBuf {
    cx.work_dir.join(format!("bucket-{bucket}.hashes.json"))
}

fn load_known_hashes(path: &Path) -> copier::KnownHashes {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Default::default(),
        Err(e) => {
            tracing::warn!(
                "Cannot read {}: {e}; objects are hashed again.",
                path.display()
            );
            return Default::default();
        }
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| {
        tracing::warn!(
            "{} is damaged ({e}); objects are hashed again.",
            path.display()
        );
        Default::default()
    })
}

async fn copy_bucket(cx: &Cx, step: &str, bucket: &str) -> Result<Value, MigratorError> {
    let svc = cx.svc();
    let hashes = known_hashes_path(cx, bucket);
    let options = copier::BucketCopyOptions {
        concurrency: cx.config.conduit.bucket_concurrency,
        max_bytes_per_sec: cx.config.conduit.bucket_max_bytes_per_sec,
        known: load_known_hashes(&hashes),
        cancel: cx.transfers.child_token(),
        ..Default::default()
    };
    let (observer, id, name) = (cx.observer.clone(), cx.id.clone(), step.to_string());
    let progress: Box<dyn Fn(BucketProgress) + Send + Sync> = Box::new(move |p: BucketProgress| {
        if let Some(o) = &observer {
            o.bucket(&id, &name, &p);
        }
    });
    let (report, method) = match (cx.source.remote(), cx.target.remote()) {
        // Between two agents the target's pulls from the source's: host to host.
        (Some(from), Some(to)) => (
            pull(cx, from, to, bucket, &options, &*progress).await?,
            "pulled host to host by the target's agent",
        ),
        _ => (
            copier::copy_bucket(
                cx.source.as_ref(),
                svc,
                bucket,
                cx.target.as_ref(),
                svc,
                bucket,
                &options,
                &*progress,
            )
            .await
            .map_err(|source| MigratorError::Bucket {
                bucket: bucket.to_string(),
                source: Box::new(source),
            })?,
            "copied by the daemon",
        ),
    };
    // The target bucket is this relocation's own: objects deleted at the source since the
    // pre-copy go at the sync, so the target ends as an exact copy.
    for key in &report.extra_at_target {
        copier::retry_transient(
            copier::OBJECT_ATTEMPTS,
            None,
            &format!(
                "Deleting object `{key}` of bucket `{svc}/{bucket}` at `{}`",
                cx.plan.to
            ),
            || cx.target.delete_object(svc, bucket, key),
        )
        .await?;
    }
    cx.count_bytes(
        "bucket",
        report.bytes_read,
        report.bytes_copied,
        Instant::now() - report.duration,
    );
    // The sync at cutover reads only objects changed since: its time is downtime.
    let saved = serde_json::to_vec(&report.known)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            std::fs::create_dir_all(&cx.work_dir)?;
            crate::sys::fs::write_atomic(&hashes, &json)
        });
    if let Err(e) = saved {
        tracing::warn!(
            "Cannot save {}: {e}; the next pass hashes every object again.",
            hashes.display()
        );
    }
    Ok(json!({
        "method": method,
        "objects": report.objects_total,
        "copied": report.objects_copied,
        "skipped": report.objects_skipped,
        "recopied": report.recopied.len(),
        "removed_at_target": report.extra_at_target.len(),
        "bytes": report.bytes_total,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_copied,
        "manifest_blake3": report.manifest_digest,
        "verified": format!(
            "BLAKE3 manifests of both sides equal ({} objects)",
            report.objects_total
        ),
    }))
}

/// Has the target's agent pull the bucket from the source's, and follows it.
async fn pull(
    cx: &Cx,
    from: &RemoteProvider,
    to: &RemoteProvider,
    bucket: &str,
    options: &BucketCopyOptions,
    progress: &(dyn Fn(BucketProgress) + Send + Sync),
) -> Result<BucketCopyReport, MigratorError> {
    let id = to
        .pull_bucket(&PullBucket {
            provider: cx.plan.to.clone(),
            service: cx.svc().to_string(),
            bucket: bucket.to_string(),
            from_agent: from.agent_url().to_string(),
            from_provider: cx.plan.from.clone(),
            concurrency: options.concurrency,
            max_bytes_per_sec: options.max_bytes_per_sec,
            known: options.known.clone(),
        })
        .await?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            _ = options.cancel.cancelled() => {
                if let Err(e) = to.cancel_pull(&id.id).await {
                    tracing::warn!("Relocation {}: could not stop the pull of bucket `{}/{bucket}` at `{}`: {e}.", cx.id, cx.svc(), cx.plan.to);
                }
                return Err(if cx.cancelled.is_cancelled() {
                    MigratorError::Cancelled
                } else {
                    MigratorError::Check(format!(
                        "the copy of bucket `{}/{bucket}` was stopped: another transfer of the relocation failed",
                        cx.svc()
                    ))
                });
            }
        }
        match to.pull(&id.id).await? {
            PullState::Running { progress: p } => {
                if let Some(p) = p {
                    progress(p);
                }
            }
            PullState::Done { mut report, known } => {
                report.known = known;
                return Ok(*report);
            }
            PullState::Failed { error } => {
                return Err(MigratorError::Check(format!(
                    "`{}` could not pull bucket `{}/{bucket}` from `{}`: {error}",
                    cx.plan.to,
                    cx.svc(),
                    cx.plan.from
                )))
            }
        }
    }
}
