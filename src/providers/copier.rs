//! The bucket migrator: copies every object of one bucket to a bucket at another provider (or
//! the same one), through nothing but the [`Provider`] trait, so it works between any two
//! drivers with object storage.
//!
//! [`copy_bucket`] lists both sides, skips objects the target already holds with the same
//! content, copies the rest a few at a time, and ends by comparing a BLAKE3 manifest
//! (key → size, BLAKE3 of the content) of both sides. Running it again after a failure or a
//! cancellation is the resume: what arrived is skipped.
//!
//! # Equal objects
//!
//! An object at the target is taken as equal when the sizes match and then, in this order:
//! both providers give a BLAKE3 and it matches; both give a plain MD5 entity tag (32 hex
//! digits: a single-part S3 upload, a plain Swift object) and it matches; an earlier copy
//! between the same buckets ([`BucketCopyOptions::known`]) hashed both listed versions and
//! the hashes match; or, when none of these is possible, reading both and hashing them gives
//! the same BLAKE3. Entity tags
//! of other shapes (multipart uploads, Swift large objects) are never compared: they depend
//! on how the object was uploaded, not only on its content.
//!
//! # Objects that change while they are copied
//!
//! Each copy is bracketed by two [`Provider::stat_object`] calls at the source. When the
//! size, entity tag, modification time or BLAKE3 differ between them (where both calls give
//! them), or fewer or more bytes were read than announced, the copy may be torn, and the
//! object is copied once more. If it changes during that second copy as well, it is reported
//! in [`BucketCopyError::Unstable`]: stop the writers, or copy again when it settles.
//!
//! # Temporary failures
//!
//! A call that fails on the way ([`is_transient`]: a reset, a timeout, an answer such as
//! `503` or `429`, a body cut short) is made again with exponential backoff and jitter, up to
//! [`OBJECT_ATTEMPTS`] times: listings, lookups, reads to hash, and copies. A copy hands the
//! target a stream that cannot be replayed, so it is replayed from its source: the object is
//! looked up and opened at the source again and written again in full (a large object's
//! parts are retried one by one below, by the driver). [`remove_bucket`] deletes a bucket
//! and its objects the same way, for the undo of a copy.
//!
//! # The manifest
//!
//! After copying, both buckets are listed again. For every object of the source, the BLAKE3
//! comes from the provider's listing where it gives one, else from what this run or an
//! earlier one ([`BucketCopyOptions::known`]) read (at the source) or wrote (at the target)
//! when size, entity tag and modification time still match, else the object is read again
//! and hashed. What was learned is returned in [`BucketCopyReport::known`]. [`BucketCopyOptions::verify_by_reading`]
//! makes the target side always read back. The manifest digest is
//!
//! ```text
//! BLAKE3( "fluidcloud-bucket-manifest-v1"
//!         || for each object in key order: le64(len(key)) || key || le64(size) || blake3 )
//! ```
//!
//! Objects found only at the target are left alone and listed in the report; they are not
//! part of the comparison. An object created at the source after the first listing is
//! missing at the target and fails the comparison: copy again, or stop the writers first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::providers::{ObjectInfo, ObjectStat, ObjectStream, Provider, ProviderError};
use crate::sys::rate::RateLimiter;
use crate::sys::retry::{self, Retryable};

pub use crate::model::bucket_copy::{DEFAULT_CONCURRENCY, MAX_CONCURRENCY};

/// Attempts at one call (a listing, a lookup, a read, a copy, a delete) that fails with a
/// temporary error, the first included.
pub const OBJECT_ATTEMPTS: usize = 4;

/// True when `e` may go away if the call is made again: the connection was reset or closed
/// on the way, the provider answered an error it has no better name for (most often a `5xx`
/// or `429` the driver does not retry or that outlasted its retries), or a stream broke part
/// way. Not: a refused connection or an unknown host (nothing listens there), a timeout
/// (drivers retry those themselves, each attempt waiting its full timeout; retrying again
/// above them would multiply the wait for a store that does not answer), wrong credentials,
/// missing or conflicting objects, refused input.
pub fn is_transient(e: &ProviderError) -> bool {
    match e {
        ProviderError::Unreachable { detail, .. } => {
            let d = detail.to_ascii_lowercase();
            !["refused", "dns error", "timeout", "timed out"]
                .iter()
                .any(|t| d.contains(t))
        }
        ProviderError::Remote { .. } => true,
        ProviderError::Io { source, .. } => source.kind() != io::ErrorKind::Interrupted,
        _ => false,
    }
}

/// Calls `call` until it succeeds, fails with an error that is not transient
/// ([`is_transient`]), or `attempts` were made, pausing with exponential backoff and jitter
/// between attempts; no new attempt starts once `cancel` is cancelled. `what` names the call
/// in the log ("Deleting object `k` of …").
pub async fn retry_transient<T, F, Fut>(
    attempts: usize,
    cancel: Option<&CancellationToken>,
    what: &str,
    call: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    again(attempts, cancel, what, is_transient, call).await
}

async fn again<T, E, F, Fut>(
    attempts: usize,
    cancel: Option<&CancellationToken>,
    what: &str,
    transient: impl Fn(&E) -> bool,
    call: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    call.retry(retry::jittered(attempts.saturating_sub(1)))
        .when(|e| transient(e) && !cancel.is_some_and(|c| c.is_cancelled()))
        .notify(|e, pause| {
            tracing::info!(
                "{what} failed ({e}); trying again in {:.1} s.",
                pause.as_secs_f64()
            )
        })
        .await
}

/// Deletes a bucket with every object in it; succeeds when it is gone already. Each call is
/// made again on temporary failures ([`retry_transient`]), so one reset does not leave
/// objects behind.
pub async fn remove_bucket(
    provider: &dyn Provider,
    service: &str,
    bucket: &str,
) -> Result<(), ProviderError> {
    let name = provider.name();
    let listed = retry_transient(
        OBJECT_ATTEMPTS,
        None,
        &format!("Listing bucket `{service}/{bucket}` at `{name}` to delete it"),
        || provider.list_objects(service, bucket),
    )
    .await;
    let objects = match listed {
        Ok(l) => l,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    for o in objects {
        retry_transient(
            OBJECT_ATTEMPTS,
            None,
            &format!(
                "Deleting object `{}` of bucket `{service}/{bucket}` at `{name}`",
                o.key
            ),
            || provider.delete_object(service, bucket, &o.key),
        )
        .await?;
    }
    retry_transient(
        OBJECT_ATTEMPTS,
        None,
        &format!("Deleting bucket `{service}/{bucket}` at `{name}`"),
        || provider.delete_bucket(service, bucket),
    )
    .await
}

/// How [`copy_bucket`] works.
#[derive(Debug, Clone)]
pub struct BucketCopyOptions {
    /// Objects copied (or compared, or hashed) at the same time; 1 to 256 (per side while
    /// the manifests are built). Default 8.
    pub concurrency: usize,
    /// Cap on the bytes read per second, from either side, shared by all objects. Default
    /// none.
    pub max_bytes_per_sec: Option<u64>,
    /// Read every object at the target back for the final manifest, unless the target's
    /// listing gives its BLAKE3, rather than trusting the BLAKE3 of what was written when
    /// size and entity tag still match. Default false.
    pub verify_by_reading: bool,
    /// Cancelling stops the copy: objects being written are abandoned (the target keeps its
    /// previous version), objects already copied stay and are skipped by the next run.
    pub cancel: CancellationToken,
    /// Hashes an earlier copy between the same two buckets learned
    /// ([`BucketCopyReport::known`]): an object whose listing still describes the version
    /// hashed then is compared and put in the manifest without being read again.
    pub known: KnownHashes,
}

impl Default for BucketCopyOptions {
    fn default() -> Self {
        BucketCopyOptions {
            concurrency: DEFAULT_CONCURRENCY,
            max_bytes_per_sec: None,
            verify_by_reading: false,
            cancel: CancellationToken::new(),
            known: KnownHashes::default(),
        }
    }
}

/// Where a copy is, for progress bars and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BucketPhase {
    /// Listing both buckets.
    Listing,
    /// Comparing and copying objects.
    Copying,
    /// Listing again and building both manifests.
    Verifying,
}

/// A snapshot of a running copy, handed to the progress callback a few times a second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketProgress {
    pub phase: BucketPhase,
    /// Objects at the source (known once listed).
    pub objects_total: u64,
    /// Objects handled so far in this phase.
    pub objects_done: u64,
    pub objects_copied: u64,
    pub objects_skipped: u64,
    /// Bytes of all objects at the source.
    pub bytes_total: u64,
    /// Bytes read so far, from either side (copies, comparisons, hashing).
    pub bytes_read: u64,
    #[serde(rename = "elapsed_secs", with = "crate::model::secs_f64")]
    pub elapsed: Duration,
}

/// What a finished copy did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BucketCopyReport {
    /// Objects at the source when the copy ended.
    pub objects_total: u64,
    pub objects_copied: u64,
    /// Objects the target already held with the same content.
    pub objects_skipped: u64,
    /// Objects that changed at the source while they were copied and were copied again.
    pub recopied: Vec<String>,
    /// Objects listed at the source that were gone when their turn came.
    pub vanished: Vec<String>,
    /// Objects only at the target; left alone and outside the comparison.
    pub extra_at_target: Vec<String>,
    /// Bytes of all objects at the source.
    pub bytes_total: u64,
    /// Bytes written to the target.
    pub bytes_copied: u64,
    /// Bytes read from either side, copies and checks included.
    pub bytes_read: u64,
    /// The manifest digest both sides agreed on (see the module documentation), hex.
    pub manifest_digest: String,
    #[serde(rename = "duration_secs", with = "crate::model::secs_f64")]
    pub duration: Duration,
    /// The BLAKE3 of every object of both sides, for the versions this copy saw; hand it to
    /// the next copy between the same buckets ([`BucketCopyOptions::known`]).
    #[serde(skip)]
    pub known: KnownHashes,
}

/// One object in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestEntry {
    pub size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
}

/// Every object of a bucket with its size and BLAKE3.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BucketManifest {
    pub entries: BTreeMap<String, ManifestEntry>,
}

impl BucketManifest {
    /// The manifest digest (see the module documentation), hex.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"fluidcloud-bucket-manifest-v1");
        for (key, e) in &self.entries {
            h.update(&(key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
            h.update(&e.size.to_le_bytes());
            // A malformed hex string cannot come from this module; hash its text rather
            // than failing, so it still differs from every well-formed one.
            match blake3::Hash::from_hex(&e.blake3) {
                Ok(hash) => h.update(hash.as_bytes()),
                Err(_) => h.update(e.blake3.as_bytes()),
            };
        }
        h.finalize().to_hex().to_string()
    }

    /// Where `self` (the source) and `target` differ, in key order.
    pub fn differences(&self, target: &BucketManifest) -> Vec<ManifestDifference> {
        let mut out = Vec::new();
        for (key, s) in &self.entries {
            match target.entries.get(key) {
                None => out.push(ManifestDifference::Missing { key: key.clone() }),
                Some(t) if t != s => out.push(ManifestDifference::Differs {
                    key: key.clone(),
                    source: s.clone(),
                    target: t.clone(),
                }),
                Some(_) => {}
            }
        }
        for key in target.entries.keys() {
            if !self.entries.contains_key(key) {
                out.push(ManifestDifference::Extra { key: key.clone() });
            }
        }
        out
    }
}

/// How a target manifest differs from its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ManifestDifference {
    /// At the source, not at the target.
    Missing { key: String },
    /// At both, with different size or content.
    Differs {
        key: String,
        source: ManifestEntry,
        target: ManifestEntry,
    },
    /// At the target only.
    Extra { key: String },
}

impl std::fmt::Display for ManifestDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestDifference::Missing { key } => write!(f, "`{key}` is missing at the target"),
            ManifestDifference::Differs {
                key,
                source,
                target,
            } => write!(
                f,
                "`{key}` differs: {} bytes with BLAKE3 {} at the source, {} bytes with BLAKE3 {} at the target",
                source.size, source.blake3, target.size, target.blake3
            ),
            ManifestDifference::Extra { key } => write!(f, "`{key}` is only at the target"),
        }
    }
}

/// Which end of the copy an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// One object that could not be copied.
#[derive(Debug)]
pub struct ObjectFailure {
    pub key: String,
    pub side: Side,
    pub error: ProviderError,
}

#[derive(Debug, thiserror::Error)]
pub enum BucketCopyError {
    #[error("invalid bucket copy options: {0}")]
    InvalidOptions(String),
    /// Listing or creating a bucket failed; nothing was copied after it.
    #[error("the {side} bucket: {error}")]
    Bucket {
        side: Side,
        #[source]
        error: ProviderError,
    },
    /// Some objects could not be copied; the others were. The report counts what was done.
    /// Failures that stopped the copy (wrong credentials, an endpoint gone) come first; the
    /// objects not tried after them follow.
    #[error("{}", objects_message(failures))]
    Objects {
        failures: Vec<ObjectFailure>,
        report: Box<BucketCopyReport>,
    },
    /// Objects kept changing at the source, also while they were copied a second time.
    #[error("{} object(s) changed at the source during both copies, e.g. `{}`; stop the writers or copy again", keys.len(), keys[0])]
    Unstable {
        keys: Vec<String>,
        report: Box<BucketCopyReport>,
    },
    /// The manifests of both sides differ after copying.
    #[error("the target does not equal the source: {} difference(s), the first: {}", differences.len(), differences[0])]
    Mismatch {
        differences: Vec<ManifestDifference>,
        report: Box<BucketCopyReport>,
    },
    #[error("the bucket copy was cancelled")]
    Cancelled,
}

fn objects_message(failures: &[ObjectFailure]) -> String {
    let stopped = failures.iter().filter(|f| is_stopped(&f.error)).count();
    let failed = failures.len() - stopped;
    let not_tried = if stopped > 0 {
        format!(" and {stopped} were not tried after that")
    } else {
        String::new()
    };
    match failures.first() {
        Some(first) => format!(
            "{failed} object(s) could not be copied{not_tried}; the first: `{}` at the {}: {}",
            first.key, first.side, first.error
        ),
        None => "no object could be copied".to_string(),
    }
}

/// Copies bucket `src_bucket` of `src_service` at `src` into bucket `dst_bucket` of
/// `dst_service` at `dst` (created when missing), skipping what is already there and equal,
/// and checks the result against a manifest of both sides. `progress` is called from this
/// task a few times a second.
#[allow(clippy::too_many_arguments)]
pub async fn copy_bucket(
    src: &dyn Provider,
    src_service: &str,
    src_bucket: &str,
    dst: &dyn Provider,
    dst_service: &str,
    dst_bucket: &str,
    options: &BucketCopyOptions,
    progress: &(dyn Fn(BucketProgress) + Send + Sync),
) -> Result<BucketCopyReport, BucketCopyError> {
    let started = Instant::now();
    if !(1..=MAX_CONCURRENCY).contains(&options.concurrency) {
        return Err(BucketCopyError::InvalidOptions(format!(
            "concurrency must be between 1 and {MAX_CONCURRENCY}, got {}",
            options.concurrency
        )));
    }
    if options.max_bytes_per_sec == Some(0) {
        return Err(BucketCopyError::InvalidOptions(
            "max_bytes_per_sec must be above zero; leave it out for no limit".to_string(),
        ));
    }
    if src.name() == dst.name() && src_service == dst_service && src_bucket == dst_bucket {
        return Err(BucketCopyError::InvalidOptions(format!(
            "source and target are the same bucket `{src_service}/{src_bucket}` at provider `{}`",
            src.name()
        )));
    }
    let run = Run {
        src: End {
            provider: src,
            service: src_service,
            bucket: src_bucket,
            side: Side::Source,
        },
        dst: End {
            provider: dst,
            service: dst_service,
            bucket: dst_bucket,
            side: Side::Target,
        },
        options,
        limiter: options
            .max_bytes_per_sec
            .map(|rate| Arc::new(RateLimiter::new(rate))),
        stop: options.cancel.child_token(),
        bytes_read: Arc::new(AtomicU64::new(0)),
        started,
        progress,
        ticker: Mutex::new(Ticker::default()),
    };
    run.execute().await
}

/// Lists a bucket and hashes every object whose BLAKE3 the listing does not give.
pub async fn bucket_manifest(
    provider: &dyn Provider,
    service: &str,
    bucket: &str,
    concurrency: usize,
) -> Result<BucketManifest, ProviderError> {
    let objects = provider.list_objects(service, bucket).await?;
    let end = End {
        provider,
        service,
        bucket,
        side: Side::Source,
    };
    let cancel = CancellationToken::new();
    let counter = Arc::new(AtomicU64::new(0));
    let results: Vec<Result<(String, ManifestEntry), ProviderError>> = stream::iter(objects)
        .map(|o| {
            let (end, cancel, counter) = (&end, &cancel, &counter);
            async move {
                let entry = match &o.blake3 {
                    Some(h) => ManifestEntry {
                        size: o.size,
                        blake3: h.to_ascii_lowercase(),
                    },
                    None => {
                        let (size, hash) = end.hash(&o.key, None, cancel, counter).await?;
                        ManifestEntry {
                            size,
                            blake3: hash.to_hex().to_string(),
                        }
                    }
                };
                Ok((o.key, entry))
            }
        })
        .buffer_unordered(concurrency.clamp(1, MAX_CONCURRENCY))
        .collect()
        .await;
    let mut manifest = BucketManifest::default();
    for r in results {
        let (key, entry) = r?;
        manifest.entries.insert(key, entry);
    }
    Ok(manifest)
}

/// One end of the copy.
struct End<'a> {
    provider: &'a dyn Provider,
    service: &'a str,
    bucket: &'a str,
    side: Side,
}

impl End<'_> {
    /// Reads an object through to its end and returns its size and BLAKE3; a read that
    /// fails on the way is started again.
    async fn hash(
        &self,
        key: &str,
        limiter: Option<&Arc<RateLimiter>>,
        cancel: &CancellationToken,
        counter: &Arc<AtomicU64>,
    ) -> Result<(u64, blake3::Hash), ProviderError> {
        retry_transient(
            OBJECT_ATTEMPTS,
            Some(cancel),
            &format!("Reading {} to hash it", self.describe(key)),
            || self.hash_once(key, limiter, cancel, counter),
        )
        .await
    }

    /// `object `k` of bucket `s/b` at `p``, for the log.
    fn describe(&self, key: &str) -> String {
        format!(
            "object `{key}` of bucket `{}/{}` at `{}`",
            self.service,
            self.bucket,
            self.provider.name()
        )
    }

    /// One look-up at this end, made again on temporary failures.
    async fn stat(
        &self,
        key: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        retry_transient(
            OBJECT_ATTEMPTS,
            Some(cancel),
            &format!("Looking up {}", self.describe(key)),
            || self.provider.stat_object(self.service, self.bucket, key),
        )
        .await
    }

    async fn hash_once(
        &self,
        key: &str,
        limiter: Option<&Arc<RateLimiter>>,
        cancel: &CancellationToken,
        counter: &Arc<AtomicU64>,
    ) -> Result<(u64, blake3::Hash), ProviderError> {
        let body = self
            .provider
            .read_object(self.service, self.bucket, key)
            .await?;
        let (mut tap, slot) = Tap::new(body.stream, limiter, cancel, counter);
        let copied = tokio::io::copy(&mut tap, &mut tokio::io::sink()).await;
        copied.map_err(|e| ProviderError::Io {
            provider: self.provider.name().to_string(),
            object: crate::providers::object::key(self.service, self.bucket, key),
            action: "read it to hash it".to_string(),
            source: e,
        })?;
        let done = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        done.ok_or_else(|| ProviderError::Io {
            provider: self.provider.name().to_string(),
            object: crate::providers::object::key(self.service, self.bucket, key),
            action: "read it to hash it".to_string(),
            source: io::Error::other("the content ended before it was read through"),
        })
    }
}

/// What a run learned about an object's content: its BLAKE3 for the version that had
/// `fingerprint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Known {
    fingerprint: Fingerprint,
    #[serde(with = "hex_hash")]
    blake3: blake3::Hash,
    /// The fingerprint comes from a write, not from a listing: providers describe an object
    /// differently there (entity tags missing from listings, modification times rounded to
    /// the second in one and not the other), so only size and entity tag are compared.
    written: bool,
}

impl Known {
    /// True when `listed` (from a listing) is the version this was learned about.
    fn matches(&self, listed: &ObjectInfo) -> bool {
        let now = Fingerprint::of(listed);
        if self.written {
            self.fingerprint.size == now.size
                && match (&self.fingerprint.etag, &now.etag) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        } else {
            self.fingerprint.same_version(&now)
        }
    }
}

/// What identifies a version of an object without reading it. Only compare fingerprints
/// that come from the same kind of call (two listings, or two stats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    size: u64,
    etag: Option<String>,
    modified: Option<chrono::DateTime<chrono::Utc>>,
    blake3: Option<String>,
}

impl Fingerprint {
    fn of(info: &ObjectInfo) -> Self {
        Fingerprint {
            size: info.size,
            etag: info.etag.as_deref().map(normalize_etag),
            modified: info.modified,
            blake3: info.blake3.clone(),
        }
    }

    /// Same version as far as both descriptions tell. Only size in common is not enough to
    /// tell, and counts as a different version.
    fn same_version(&self, other: &Fingerprint) -> bool {
        if self.size != other.size {
            return false;
        }
        let mut compared = false;
        macro_rules! field {
            ($f:ident) => {
                if let (Some(a), Some(b)) = (&self.$f, &other.$f) {
                    if a != b {
                        return false;
                    }
                    compared = true;
                }
            };
        }
        field!(etag);
        field!(modified);
        field!(blake3);
        compared
    }
}

fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// A plain MD5 entity tag: the MD5 of the content, comparable across providers.
fn plain_md5(etag: Option<&str>) -> Option<String> {
    let e = normalize_etag(etag?);
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then_some(e)
}

/// How one object went.
enum Outcome {
    Skipped,
    Copied { bytes: u64, recopied: bool },
    Vanished,
    Unstable,
}

struct ObjectError {
    side: Side,
    error: ProviderError,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at the {}: {}", self.side, self.error)
    }
}

/// One copy of an object that went through.
struct Copied {
    /// The source's object before and after it was read.
    before: ObjectStat,
    after: Option<ObjectStat>,
    written: ObjectInfo,
    /// Size and BLAKE3 of what was read.
    read: (u64, blake3::Hash),
}

impl ObjectError {
    fn at(side: Side) -> impl FnOnce(ProviderError) -> ObjectError {
        move |error| ObjectError { side, error }
    }
}

#[derive(Default)]
struct Ticker {
    last: Option<Instant>,
    phase: Option<BucketPhase>,
    objects_total: u64,
    objects_done: u64,
    objects_copied: u64,
    objects_skipped: u64,
    bytes_total: u64,
}

struct Run<'a> {
    src: End<'a>,
    dst: End<'a>,
    options: &'a BucketCopyOptions,
    limiter: Option<Arc<RateLimiter>>,
    /// Cancelled by the caller, or by this run when a failure means the rest would fail too.
    stop: CancellationToken,
    bytes_read: Arc<AtomicU64>,
    started: Instant,
    progress: &'a (dyn Fn(BucketProgress) + Send + Sync),
    ticker: Mutex<Ticker>,
}

/// Hashes learned by a copy, by key and side, each for the version of the object it was
/// learned about. Saved between the pre-copy and the final sync of a relocation, so the sync
/// reads only what changed. Serialises to JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KnownHashes {
    src: HashMap<String, Known>,
    dst: HashMap<String, Known>,
}

impl KnownHashes {
    /// Objects described, both sides together.
    pub fn len(&self) -> usize {
        self.src.len() + self.dst.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hashes of the source object `src` and the target object `dst` when both listings
    /// still describe the versions they were learned about.
    fn both(&self, src: &ObjectInfo, dst: &ObjectInfo) -> Option<(blake3::Hash, blake3::Hash)> {
        let s = self.src.get(&src.key).filter(|k| k.matches(src))?;
        let d = self.dst.get(&dst.key).filter(|k| k.matches(dst))?;
        Some((s.blake3, d.blake3))
    }
}

mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &blake3::Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<blake3::Hash, D::Error> {
        let text = String::deserialize(d)?;
        blake3::Hash::from_hex(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

impl<'a> Run<'a> {
    async fn execute(&self) -> Result<BucketCopyReport, BucketCopyError> {
        self.tick(|t| t.phase = Some(BucketPhase::Listing), true);
        // The source first: a missing source bucket must not leave an empty target behind.
        let src_list = self.list(&self.src).await?;
        retry_transient(
            OBJECT_ATTEMPTS,
            Some(&self.stop),
            &format!(
                "Creating bucket `{}/{}` at `{}`",
                self.dst.service,
                self.dst.bucket,
                self.dst.provider.name()
            ),
            || {
                self.dst
                    .provider
                    .ensure_bucket(self.dst.service, self.dst.bucket)
            },
        )
        .await
        .map_err(|error| BucketCopyError::Bucket {
            side: Side::Target,
            error,
        })?;
        let dst_list = self.list(&self.dst).await?;
        self.check_cancel()?;

        let bytes_total: u64 = src_list.iter().map(|o| o.size).sum();
        self.tick(
            |t| {
                t.phase = Some(BucketPhase::Copying);
                t.objects_total = src_list.len() as u64;
                t.bytes_total = bytes_total;
            },
            true,
        );
        let dst_by_key: HashMap<&str, &ObjectInfo> =
            dst_list.iter().map(|o| (o.key.as_str(), o)).collect();
        let learned = Mutex::new(self.options.known.clone());
        let results: Vec<(String, Result<Outcome, ObjectError>)> = stream::iter(0..src_list.len())
            .map(|i| {
                // By index: a closure over `&ObjectInfo` would be generic over the borrow's
                // lifetime, and the compiler cannot then prove the whole copy `Send`.
                let o = &src_list[i];
                let target = dst_by_key.get(o.key.as_str()).copied();
                let learned = &learned;
                async move {
                    let r = self.object(o, target, learned).await;
                    (o.key.clone(), r)
                }
            })
            .buffer_unordered(self.options.concurrency)
            .collect()
            .await;

        let mut report = BucketCopyReport::default();
        let mut failures = Vec::new();
        let mut unstable = Vec::new();
        for (key, r) in results {
            match r {
                Ok(Outcome::Skipped) => report.objects_skipped += 1,
                Ok(Outcome::Copied { bytes, recopied }) => {
                    report.objects_copied += 1;
                    report.bytes_copied += bytes;
                    if recopied {
                        report.recopied.push(key);
                    }
                }
                Ok(Outcome::Vanished) => report.vanished.push(key),
                Ok(Outcome::Unstable) => unstable.push(key),
                Err(e) => failures.push(ObjectFailure {
                    key,
                    side: e.side,
                    error: e.error,
                }),
            }
        }
        report.recopied.sort();
        report.vanished.sort();
        unstable.sort();
        failures.sort_by(|a, b| a.key.cmp(&b.key));
        // The caller's cancellation wins over the failures it caused.
        self.check_cancel()?;
        if !failures.is_empty() {
            // Failures that stopped the run are listed last: they are consequences.
            failures.sort_by_key(|f| is_stopped(&f.error));
            report.duration = self.started.elapsed();
            report.bytes_read = self.bytes_read.load(Ordering::Relaxed);
            return Err(BucketCopyError::Objects {
                failures,
                report: Box::new(report),
            });
        }

        self.tick(
            |t| {
                t.phase = Some(BucketPhase::Verifying);
                t.objects_done = 0;
            },
            true,
        );
        let mut learned = learned.into_inner().unwrap_or_else(|e| e.into_inner());
        let (src_manifest, dst_manifest, extra, total) =
            self.manifests(&mut learned, &report).await?;
        report.objects_total = total.0;
        report.bytes_total = total.1;
        report.extra_at_target = extra;
        report.bytes_read = self.bytes_read.load(Ordering::Relaxed);
        report.duration = self.started.elapsed();
        report.manifest_digest = src_manifest.digest();
        report.known = learned;
        if !unstable.is_empty() {
            return Err(BucketCopyError::Unstable {
                keys: unstable,
                report: Box::new(report),
            });
        }
        let mut differences = src_manifest.differences(&dst_manifest);
        // Extra objects at the target are reported, not compared.
        differences.retain(|d| !matches!(d, ManifestDifference::Extra { .. }));
        if !differences.is_empty() {
            return Err(BucketCopyError::Mismatch {
                differences,
                report: Box::new(report),
            });
        }
        self.tick(|_| {}, true);
        Ok(report)
    }

    async fn list(&self, end: &End<'_>) -> Result<Vec<ObjectInfo>, BucketCopyError> {
        retry_transient(
            OBJECT_ATTEMPTS,
            Some(&self.stop),
            &format!(
                "Listing bucket `{}/{}` at `{}`",
                end.service,
                end.bucket,
                end.provider.name()
            ),
            || end.provider.list_objects(end.service, end.bucket),
        )
        .await
        .map_err(|error| BucketCopyError::Bucket {
            side: end.side,
            error,
        })
    }

    /// Without credentials or an endpoint every other object fails the same way: stop
    /// trying.
    fn stop_if_hopeless(&self, error: &ProviderError) {
        if matches!(
            error,
            ProviderError::Denied { .. } | ProviderError::Unreachable { .. }
        ) {
            self.stop.cancel();
        }
    }

    fn check_cancel(&self) -> Result<(), BucketCopyError> {
        if self.options.cancel.is_cancelled() {
            Err(BucketCopyError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Compares one object and copies it when the target lacks it or differs.
    async fn object(
        &self,
        src: &ObjectInfo,
        dst: Option<&ObjectInfo>,
        learned: &Mutex<KnownHashes>,
    ) -> Result<Outcome, ObjectError> {
        if self.stop.is_cancelled() {
            return Err(stopped(&self.src, &src.key));
        }
        let outcome = async {
            if self.equal(src, dst, learned).await? {
                return Ok(Outcome::Skipped);
            }
            self.copy(src, learned).await
        }
        .await;
        let outcome = match outcome {
            // Cut off by a failure elsewhere (or the caller): not a failure of its own.
            Err(e) if self.stop.is_cancelled() && is_interrupted(&e.error) => {
                Err(stopped(&self.src, &src.key))
            }
            Err(e) => {
                self.stop_if_hopeless(&e.error);
                Err(e)
            }
            ok => ok,
        };
        self.tick(
            |t| {
                t.objects_done += 1;
                match &outcome {
                    Ok(Outcome::Skipped) => t.objects_skipped += 1,
                    Ok(Outcome::Copied { .. }) => t.objects_copied += 1,
                    _ => {}
                }
            },
            false,
        );
        outcome
    }

    async fn equal(
        &self,
        src: &ObjectInfo,
        dst: Option<&ObjectInfo>,
        learned: &Mutex<KnownHashes>,
    ) -> Result<bool, ObjectError> {
        let Some(dst) = dst else { return Ok(false) };
        if dst.size != src.size {
            return Ok(false);
        }
        if let (Some(a), Some(b)) = (&src.blake3, &dst.blake3) {
            return Ok(a.eq_ignore_ascii_case(b));
        }
        if let (Some(a), Some(b)) = (
            plain_md5(src.etag.as_deref()),
            plain_md5(dst.etag.as_deref()),
        ) {
            return Ok(a == b);
        }
        if src.blake3.is_none() && dst.blake3.is_none() && src.size > 0 {
            // Some stores leave entity tags out of listings but give them per object, which
            // costs a request rather than the whole content. (A store that lists BLAKE3
            // hashes, like the local one, has no entity tags to give.)
            let (s, d) = tokio::join!(
                self.src.stat(&src.key, &self.stop),
                self.dst.stat(&dst.key, &self.stop),
            );
            let (s, d) = (
                s.map_err(ObjectError::at(Side::Source))?,
                d.map_err(ObjectError::at(Side::Target))?,
            );
            if let (Some(s), Some(d)) = (s, d) {
                if let (Some(a), Some(b)) = (
                    plain_md5(s.info.etag.as_deref()),
                    plain_md5(d.info.etag.as_deref()),
                ) {
                    if s.info.size == src.size && d.info.size == dst.size {
                        return Ok(a == b);
                    }
                }
            }
        }
        let known = learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .both(src, dst);
        if let Some((s, d)) = known {
            return Ok(s == d);
        }
        let limiter = self.limiter.as_ref();
        let (s, d) = tokio::join!(
            self.src
                .hash(&src.key, limiter, &self.stop, &self.bytes_read),
            self.dst
                .hash(&dst.key, limiter, &self.stop, &self.bytes_read),
        );
        let (s, d) = (
            s.map_err(ObjectError::at(Side::Source))?,
            d.map_err(ObjectError::at(Side::Target))?,
        );
        let mut l = learned.lock().unwrap_or_else(|e| e.into_inner());
        // Sizes read differ from the listing's when the object changed since: then the
        // hash belongs to no listed version and is not remembered.
        if s.0 == src.size {
            l.src.insert(
                src.key.clone(),
                Known {
                    fingerprint: Fingerprint::of(src),
                    blake3: s.1,
                    written: false,
                },
            );
        }
        if d.0 == dst.size {
            l.dst.insert(
                dst.key.clone(),
                Known {
                    fingerprint: Fingerprint::of(dst),
                    blake3: d.1,
                    written: false,
                },
            );
        }
        Ok(s == d && s.0 == src.size)
    }

    async fn copy(
        &self,
        src: &ObjectInfo,
        learned: &Mutex<KnownHashes>,
    ) -> Result<Outcome, ObjectError> {
        let key = src.key.as_str();
        let what = format!("Copying {}", self.src.describe(key));
        for attempt in 1..=2 {
            // The target consumed the stream it was given: a failed attempt is replayed from
            // the source.
            let tried = again(
                OBJECT_ATTEMPTS,
                Some(&self.stop),
                &what,
                |e: &ObjectError| is_transient(&e.error),
                || self.copy_once(key),
            )
            .await?;
            let Some(Copied {
                before,
                after,
                written,
                read: (read_size, read_hash),
            }) = tried
            else {
                return Ok(Outcome::Vanished);
            };
            let before_fp = Fingerprint::of(&before.info);
            let stable = after
                .as_ref()
                .is_some_and(|a| before_fp.same_version(&Fingerprint::of(&a.info)))
                && read_size == before.info.size
                && written.size == read_size;
            if stable {
                let mut l = learned.lock().unwrap_or_else(|e| e.into_inner());
                // The source's listing entry, not the stat: the manifest compares it with
                // the next listing. Had the object changed since the listing, that listing
                // differs and the object is hashed again there.
                l.src.insert(
                    key.to_string(),
                    Known {
                        fingerprint: Fingerprint::of(src),
                        blake3: read_hash,
                        written: false,
                    },
                );
                l.dst.insert(
                    key.to_string(),
                    Known {
                        fingerprint: Fingerprint::of(&written),
                        blake3: read_hash,
                        written: true,
                    },
                );
                return Ok(Outcome::Copied {
                    bytes: read_size,
                    recopied: attempt > 1,
                });
            }
            tracing::warn!(
                source = %self.src.provider.name(),
                "Object `{key}` in bucket `{}/{}` changed while it was copied (attempt {attempt} of 2).",
                self.src.service,
                self.src.bucket
            );
        }
        Ok(Outcome::Unstable)
    }

    /// One attempt at copying an object: looks it up at the source, streams it to the
    /// target, and looks it up again. `None`: the object is gone from the source.
    async fn copy_once(&self, key: &str) -> Result<Option<Copied>, ObjectError> {
        let before = self
            .src
            .stat(key, &self.stop)
            .await
            .map_err(ObjectError::at(Side::Source))?;
        let Some(before) = before else {
            return Ok(None);
        };
        let body = match self
            .src
            .provider
            .read_object(self.src.service, self.src.bucket, key)
            .await
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(ObjectError::at(Side::Source)(e)),
        };
        let (tap, slot) = Tap::new(
            body.stream,
            self.limiter.as_ref(),
            &self.stop,
            &self.bytes_read,
        );
        let tap: ObjectStream = Box::pin(tap);
        let written = self
            .dst
            .provider
            .write_object_with_meta(self.dst.service, self.dst.bucket, key, tap, &before.meta)
            .await;
        let written = written.map_err(ObjectError::at(Side::Target))?;
        let read = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((read_size, read_hash)) = read else {
            return Err(ObjectError::at(Side::Target)(ProviderError::Invalid {
                provider: self.dst.provider.name().to_string(),
                object: crate::providers::object::key(self.dst.service, self.dst.bucket, key),
                reason: "the provider stored the object without reading its content to the end"
                    .to_string(),
            }));
        };
        if let Some(h) = &written.blake3 {
            if !h.eq_ignore_ascii_case(&read_hash.to_hex()) {
                return Err(ObjectError::at(Side::Target)(ProviderError::Invalid {
                    provider: self.dst.provider.name().to_string(),
                    object: crate::providers::object::key(self.dst.service, self.dst.bucket, key),
                    reason: format!(
                        "it stored content with BLAKE3 {h}, but what was sent has BLAKE3 {}",
                        read_hash.to_hex()
                    ),
                }));
            }
        }
        let after = self
            .src
            .stat(key, &self.stop)
            .await
            .map_err(ObjectError::at(Side::Source))?;
        Ok(Some(Copied {
            before,
            after,
            written,
            read: (read_size, read_hash),
        }))
    }

    /// Lists both sides again and builds their manifests. Returns them, the keys only at the
    /// target, and the source's object count and bytes.
    async fn manifests(
        &self,
        learned: &mut KnownHashes,
        report: &BucketCopyReport,
    ) -> Result<(BucketManifest, BucketManifest, Vec<String>, (u64, u64)), BucketCopyError> {
        let (src_list, dst_list) = tokio::join!(self.list(&self.src), self.list(&self.dst));
        let (src_list, dst_list) = (src_list?, dst_list?);
        let total = (
            src_list.len() as u64,
            src_list.iter().map(|o| o.size).sum::<u64>(),
        );
        let src_keys: std::collections::HashSet<&str> =
            src_list.iter().map(|o| o.key.as_str()).collect();
        let extra: Vec<String> = dst_list
            .iter()
            .filter(|o| !src_keys.contains(o.key.as_str()))
            .map(|o| o.key.clone())
            .collect();
        let dst_compared: Vec<&ObjectInfo> = dst_list
            .iter()
            .filter(|o| src_keys.contains(o.key.as_str()))
            .collect();
        // Hashes of what was written count unless the caller wants the target read back.
        let trust_written = !self.options.verify_by_reading;
        let (src_manifest, dst_manifest) = tokio::join!(
            self.manifest(&self.src, src_list.iter().collect(), &learned.src, true),
            self.manifest(&self.dst, dst_compared, &learned.dst, trust_written),
        );
        self.check_cancel()?;
        match (src_manifest, dst_manifest) {
            (Ok((s, src_hashed)), Ok((d, dst_hashed))) => {
                // What was read now is known for the next run; objects that are gone are
                // forgotten.
                learned.src.extend(src_hashed);
                learned.dst.extend(dst_hashed);
                learned.src.retain(|k, _| s.entries.contains_key(k));
                learned.dst.retain(|k, _| d.entries.contains_key(k));
                Ok((s, d, extra, total))
            }
            (s, d) => {
                let mut failures: Vec<ObjectFailure> =
                    s.err().into_iter().chain(d.err()).flatten().collect();
                failures.sort_by(|a, b| a.key.cmp(&b.key));
                failures.sort_by_key(|f| is_stopped(&f.error));
                let mut report = report.clone();
                report.bytes_read = self.bytes_read.load(Ordering::Relaxed);
                report.duration = self.started.elapsed();
                Err(BucketCopyError::Objects {
                    failures,
                    report: Box::new(report),
                })
            }
        }
    }

    async fn manifest(
        &self,
        end: &End<'_>,
        objects: Vec<&ObjectInfo>,
        known: &HashMap<String, Known>,
        trust_written: bool,
    ) -> Result<(BucketManifest, Vec<(String, Known)>), Vec<ObjectFailure>> {
        type Hashed = Option<Known>;
        let results: Vec<Result<(String, ManifestEntry, Hashed), ObjectFailure>> = stream::iter(0..objects.len())
            .map(|i| {
                let o = objects[i];
                async move {
                let from_run = known
                    .get(&o.key)
                    .filter(|k| (trust_written || !k.written) && k.matches(o));
                let blake3 = match (&o.blake3, from_run) {
                    (Some(h), _) => h.to_ascii_lowercase(),
                    (None, Some(k)) => k.blake3.to_hex().to_string(),
                    (None, None) => {
                        let failed = |e: ObjectError| ObjectFailure {
                            key: o.key.clone(),
                            side: e.side,
                            error: e.error,
                        };
                        if self.stop.is_cancelled() {
                            return Err(failed(stopped(end, &o.key)));
                        }
                        let hashed = end
                            .hash(&o.key, self.limiter.as_ref(), &self.stop, &self.bytes_read)
                            .await;
                        let (size, hash) = match hashed {
                            Ok(h) => h,
                            Err(e) if self.stop.is_cancelled() && is_interrupted(&e) => {
                                return Err(failed(stopped(end, &o.key)))
                            }
                            Err(error) => {
                                self.stop_if_hopeless(&error);
                                return Err(failed(ObjectError {
                                    side: end.side,
                                    error,
                                }));
                            }
                        };
                        // The hash belongs to the listed version only if the size agrees.
                        let learned = (size == o.size).then(|| Known {
                            fingerprint: Fingerprint::of(o),
                            blake3: hash,
                            written: false,
                        });
                        if learned.is_none() {
                            // Changed since the listing; what was read is the truth now.
                            tracing::warn!(
                                "Object `{}` in bucket `{}/{}` changed while the manifest was built.",
                                o.key,
                                end.service,
                                end.bucket
                            );
                        }
                        let entry = ManifestEntry {
                            size,
                            blake3: hash.to_hex().to_string(),
                        };
                        self.tick(|t| t.objects_done += 1, false);
                        return Ok((o.key.clone(), entry, learned));
                    }
                };
                self.tick(|t| t.objects_done += 1, false);
                Ok((
                    o.key.clone(),
                    ManifestEntry {
                        size: o.size,
                        blake3,
                    },
                    None,
                ))
            }
            })
            .buffer_unordered(self.options.concurrency)
            .collect()
            .await;
        let mut manifest = BucketManifest::default();
        let mut hashed = Vec::new();
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok((k, e, learned)) => {
                    if let Some(l) = learned {
                        hashed.push((k.clone(), l));
                    }
                    manifest.entries.insert(k, e);
                }
                Err(f) => failures.push(f),
            }
        }
        if !failures.is_empty() {
            return Err(failures);
        }
        Ok((manifest, hashed))
    }

    /// Updates the progress counters and calls the callback when it is due (at most ten
    /// times a second, and always when `force`).
    fn tick(&self, update: impl FnOnce(&mut Ticker), force: bool) {
        let snapshot = {
            let mut t = self.ticker.lock().unwrap_or_else(|e| e.into_inner());
            update(&mut t);
            let now = Instant::now();
            let due = force
                || t.last
                    .is_none_or(|l| now.duration_since(l) >= Duration::from_millis(100));
            if !due {
                return;
            }
            t.last = Some(now);
            BucketProgress {
                phase: t.phase.unwrap_or(BucketPhase::Listing),
                objects_total: t.objects_total,
                objects_done: t.objects_done,
                objects_copied: t.objects_copied,
                objects_skipped: t.objects_skipped,
                bytes_total: t.bytes_total,
                bytes_read: self.bytes_read.load(Ordering::Relaxed),
                elapsed: self.started.elapsed(),
            }
        };
        (self.progress)(snapshot);
    }
}

const STOPPED: &str = "the bucket copy stopped before this object";

fn stopped(end: &End<'_>, key: &str) -> ObjectError {
    ObjectError {
        side: end.side,
        error: ProviderError::Io {
            provider: end.provider.name().to_string(),
            object: crate::providers::object::key(end.service, end.bucket, key),
            action: "copy it".to_string(),
            source: io::Error::new(io::ErrorKind::Interrupted, STOPPED),
        },
    }
}

fn is_stopped(e: &ProviderError) -> bool {
    matches!(e, ProviderError::Io { source, .. } if source.kind() == io::ErrorKind::Interrupted && source.to_string() == STOPPED)
}

/// True when the error comes from a [`Tap`] that was cancelled, seen through a driver.
fn is_interrupted(e: &ProviderError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::Interrupted {
                return true;
            }
        }
        cur = err.source();
    }
    e.to_string().contains(CANCELLED)
}

const CANCELLED: &str = "the bucket copy was cancelled";

/// Where a [`Tap`] leaves the size and BLAKE3 of what passed once it reached the end.
type TapSlot = Arc<Mutex<Option<(u64, blake3::Hash)>>>;

/// Wraps an object stream: hashes and counts what passes, holds the rate limit, and fails
/// the read when the copy is cancelled, so that the target abandons the write instead of
/// storing a truncated object.
struct Tap {
    inner: ObjectStream,
    hasher: blake3::Hasher,
    size: u64,
    slot: TapSlot,
    limiter: Option<Arc<RateLimiter>>,
    /// The rate limit's debt, paid before the next read.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    cancel: CancellationToken,
    counter: Arc<AtomicU64>,
}

impl Tap {
    fn new(
        inner: ObjectStream,
        limiter: Option<&Arc<RateLimiter>>,
        cancel: &CancellationToken,
        counter: &Arc<AtomicU64>,
    ) -> (Tap, TapSlot) {
        let slot = TapSlot::default();
        let tap = Tap {
            inner,
            hasher: blake3::Hasher::new(),
            size: 0,
            slot: slot.clone(),
            limiter: limiter.cloned(),
            sleep: None,
            cancel: cancel.clone(),
            counter: counter.clone(),
        };
        (tap, slot)
    }
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        if this.cancel.is_cancelled() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::Interrupted, CANCELLED)));
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let read = &buf.filled()[before..];
        if read.is_empty() {
            let done = (this.size, this.hasher.finalize());
            *this.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
            return Poll::Ready(Ok(()));
        }
        this.hasher.update(read);
        this.size += read.len() as u64;
        this.counter.fetch_add(read.len() as u64, Ordering::Relaxed);
        if let Some(limiter) = &this.limiter {
            let wait = limiter.reserve(read.len() as u64);
            if !wait.is_zero() {
                this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
