//! Object stores: the `s3` driver (any S3 API: AWS, s3s, MinIO, Ceph RGW…) and the `swift`
//! driver (OpenStack Swift with tempauth or Keystone v3), both through Apache OpenDAL.
//!
//! [`open`] builds an [`ObjectStore`] for a provider whose configuration has an `s3` or
//! `swift` table. Its capabilities are object storage only: buckets are listed, read and
//! written as streams (large objects in parts: S3 multipart uploads, Swift static large
//! objects), with content type and user metadata, and created or deleted as whole buckets.
//!
//! - A service's bucket `B` of service `S` is the remote bucket (container) named by the
//!   provider's `bucket_name`/`container_name` template, `S--B` by default; `naming` has
//!   the rules and refuses names the store would not take.
//! - Secrets come from a file, never from the configuration (`credentials`).
//! - Listings give size, entity tag and modification time; BLAKE3 only for what this driver
//!   writes (of the bytes it sent), since the stores compute MD5 at best.
//! - Errors name the provider, the bucket with its remote name, and the key, and say
//!   plainly when the credentials are wrong ([`ProviderError::Denied`]), the endpoint does
//!   not answer ([`ProviderError::Unreachable`]) or the bucket is missing
//!   ([`ProviderError::NotFound`]).
//!
//! Reads are pinned to the entity tag seen when the object was opened, so a concurrent
//! overwrite fails the read (which is then retried on the new version) rather than mixing
//! two versions.
//!
//! Temporary failures: every request is bounded by the provider's `timeout_secs` (also
//! each read or write of a body, so a stalled connection ends), and OpenDAL retries what it
//! knows as temporary (resets, timeouts, `5xx`) three times with backoff and jitter,
//! including each part of a large upload. Lookups, listings, opening a read, deletes and
//! the checks before an upload are then made again as a whole on any temporary failure
//! ([`copier::is_transient`]: Swift's `429` among them, which OpenDAL does not retry), up to
//! [`copier::OBJECT_ATTEMPTS`] times. An upload's stream cannot be replayed here; the copier
//! replays it from its source. Logins and bucket calls go through [`send`], which honours
//! `Retry-After`.

mod credentials;
mod naming;
mod s3;
mod swift;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use opendal::options::{ListOptions, ReaderOptions, WriteOptions};
use opendal::Operator;
use tokio::io::AsyncReadExt;

use super::copier;
use super::{
    object, validate_key, validate_meta, validate_name, BucketLocation, Capabilities, DiskFormat,
    ObjectBody, ObjectInfo, ObjectMeta, ObjectStat, ObjectStream, Operation, OperationId, Provider,
    ProviderError,
};
use crate::config::{self, ObjectStoreSettings};
use crate::model::Driver;
use crate::sys::retry::{self, BackoffBuilder, ConstantBuilder, Retryable};

pub(crate) use naming::Store;

/// How much of an object is read from the caller's stream before it goes to OpenDAL.
const READ_CHUNK: usize = 1 << 20;
/// Parts uploaded at the same time for one large object.
const PART_CONCURRENCY: usize = 2;
/// Times a read is reopened when the object changed between stat and read.
const REOPEN_ATTEMPTS: usize = 3;

/// Why one attempt to open an object for reading failed.
enum Reopen {
    /// The object was replaced after it was looked at; another attempt may succeed.
    Replaced(opendal::Error),
    Failed(ProviderError),
}

/// Opens the driver a provider with `driver = "s3"` or `"swift"` names.
pub fn open(provider: &config::Provider) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(Arc::new(ObjectStore::open(provider)?))
}

/// The `s3` and `swift` drivers.
pub struct ObjectStore {
    name: String,
    driver: Driver,
    store: Store,
    template: String,
    part_size: u64,
    remote: Box<dyn Remote>,
    /// Remote buckets seen to exist. A write checks its bucket once, since some servers
    /// (s3s-fs among them) create a missing bucket on the first upload instead of refusing.
    known_buckets: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What differs between S3 and Swift: how to reach a bucket and manage whole buckets.
#[async_trait]
trait Remote: Send + Sync {
    /// The URL errors name when nothing answers.
    fn endpoint(&self) -> String;
    /// The URL clients reach the remote bucket at.
    async fn bucket_url(&self, remote: &str, obj: &str) -> Result<String, ProviderError>;
    /// An operator on the remote bucket `remote`.
    async fn operator(&self, remote: &str) -> Result<Operator, ProviderError>;
    async fn bucket_exists(&self, remote: &str, obj: &str) -> Result<bool, ProviderError>;
    async fn create_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError>;
    /// Deletes an empty bucket; succeeds when it is missing, conflicts when it holds objects.
    async fn delete_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError>;
    /// The store refused the credentials: forget what was learned at login, and say whether
    /// logging in again might help.
    async fn credentials_refused(&self) -> bool {
        false
    }
    /// The store's own listing of a bucket, when it describes objects better than the
    /// generic one (`None`: use that). Swift's generic listing gives a static large object
    /// the MD5 of its manifest; its real entity tag (the one a HEAD or the upload gives) is
    /// only in the JSON listing, as `slo_etag`. Keys ending in `/` are directory markers.
    async fn list_native(
        &self,
        remote: &str,
        obj: &str,
    ) -> Result<Option<Vec<ObjectInfo>>, ProviderError> {
        let _ = (remote, obj);
        Ok(None)
    }
    /// Keys the driver uses for its own bookkeeping, which are not objects.
    fn reserved(&self, key: &str) -> Option<&'static str> {
        let _ = key;
        None
    }
    async fn delete_object(
        &self,
        op: &Operator,
        remote: &str,
        key: &str,
        obj: &str,
    ) -> Result<(), ProviderError>;
    /// Called before an object is written; what it returns goes to `after_write`.
    async fn before_write(
        &self,
        remote: &str,
        key: &str,
        obj: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let _ = (remote, key, obj);
        Ok(Vec::new())
    }
    /// Called after an object of `size` bytes was written with `meta`.
    async fn after_write(
        &self,
        remote: &str,
        key: &str,
        obj: &str,
        size: u64,
        meta: &ObjectMeta,
        before: Vec<String>,
    ) -> Result<(), ProviderError> {
        let _ = (remote, key, obj, size, meta, before);
        Ok(())
    }
}

impl ObjectStore {
    /// Opens the driver: reads the credentials and, for Swift, nothing more until the first
    /// call (the login happens then, and again whenever the token runs out).
    pub fn open(provider: &config::Provider) -> Result<ObjectStore, ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: provider.name.clone(),
            reason,
        };
        // reqwest, under OpenDAL, leaves the choice of the TLS crypto to the program. Another
        // provider may have installed it already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (store, template, part_size, remote): (_, _, _, Box<dyn Remote>) =
            match (&provider.driver, &provider.object_store) {
                (Driver::S3, Some(ObjectStoreSettings::S3(s))) => {
                    let creds = credentials::s3(&provider.name, &s.credentials)
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        Store::S3,
                        s.bucket_name.clone(),
                        s.part_size,
                        Box::new(s3::S3::new(&provider.name, s, creds).map_err(setup)?),
                    )
                }
                (Driver::Swift, Some(ObjectStoreSettings::Swift(s))) => {
                    let creds = credentials::swift(&provider.name, &s.credentials)
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        Store::Swift,
                        s.container_name.clone(),
                        s.part_size,
                        Box::new(swift::Swift::new(&provider.name, s, creds).map_err(setup)?),
                    )
                }
                (driver, _) => {
                    return Err(setup(format!(
                        "the `{}` driver needs its [providers.{}.{}] settings",
                        driver.as_str(),
                        provider.name,
                        driver.as_str()
                    )))
                }
            };
        Ok(ObjectStore {
            name: provider.name.clone(),
            driver: provider.driver,
            store,
            template,
            part_size,
            remote,
            known_buckets: Default::default(),
        })
    }

    /// Lists a bucket through OpenDAL, every key below it.
    async fn list_generic(
        &self,
        remote: &str,
        obj: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        let op = self.remote.operator(remote).await?;
        let options = ListOptions {
            recursive: true,
            ..ListOptions::default()
        };
        let mut lister = op
            .lister_options("/", options)
            .await
            .map_err(|e| self.dal(e, obj, obj, "list it"))?;
        let mut out = Vec::new();
        while let Some(entry) = lister
            .try_next()
            .await
            .map_err(|e| self.dal(e, obj, obj, "list it"))?
        {
            let meta = entry.metadata();
            if meta.is_dir() {
                continue;
            }
            out.push(ObjectInfo {
                key: entry.path().to_string(),
                size: meta.content_length(),
                blake3: None,
                etag: meta.etag().or(meta.content_md5()).map(str::to_string),
                modified: meta.last_modified().map(to_chrono),
            });
        }
        Ok(out)
    }

    /// Whether the remote bucket exists, remembering a yes.
    async fn bucket_exists(&self, remote: &str, obj: &str) -> Result<bool, ProviderError> {
        let exists = self.remote.bucket_exists(remote, obj).await?;
        let mut known = self.known_buckets.lock().unwrap_or_else(|e| e.into_inner());
        if exists {
            known.insert(remote.to_string());
        } else {
            known.remove(remote);
        }
        Ok(exists)
    }

    fn known_bucket(&self, remote: &str) -> bool {
        self.known_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(remote)
    }

    /// The remote name of a service's bucket, and how errors name the bucket.
    pub fn remote_name(&self, service: &str, bucket: &str) -> Result<String, ProviderError> {
        self.remote_bucket(service, bucket).map(|(r, _)| r)
    }

    fn remote_bucket(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<(String, String), ProviderError> {
        let plain = object::bucket(service, bucket);
        let invalid = |reason: String| ProviderError::Invalid {
            provider: self.name.clone(),
            object: plain.clone(),
            reason,
        };
        validate_name(service).map_err(|e| invalid(format!("service name: {e}")))?;
        validate_name(bucket).map_err(|e| invalid(format!("bucket name: {e}")))?;
        let remote =
            naming::remote_name(self.store, &self.template, service, bucket).map_err(invalid)?;
        let noun = match self.store {
            Store::S3 => "S3 bucket",
            Store::Swift => "Swift container",
        };
        Ok((remote.clone(), format!("{plain} ({noun} `{remote}`)")))
    }

    /// Remote bucket, how errors name the bucket, and how they name the object.
    fn remote_key(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(String, String, String), ProviderError> {
        let (remote, bucket_obj) = self.remote_bucket(service, bucket)?;
        let key_obj = format!("object `{key}` in {bucket_obj}");
        validate_key(key).map_err(|reason| ProviderError::Invalid {
            provider: self.name.clone(),
            object: key_obj.clone(),
            reason,
        })?;
        if let Some(why) = self.remote.reserved(key) {
            return Err(ProviderError::Invalid {
                provider: self.name.clone(),
                object: key_obj,
                reason: why.to_string(),
            });
        }
        Ok((remote, bucket_obj, key_obj))
    }

    /// Translates an OpenDAL error. A missing thing is the object `obj` unless the store
    /// says the bucket is missing (`bucket_obj`).
    fn dal(&self, e: opendal::Error, obj: &str, bucket_obj: &str, action: &str) -> ProviderError {
        dal_error(
            &self.name,
            &self.remote.endpoint(),
            e,
            obj,
            bucket_obj,
            action,
        )
    }

    /// As [`ObjectStore::dal`] for uploads, where "not found" can only mean the bucket.
    fn dal_write(
        &self,
        e: opendal::Error,
        obj: &str,
        bucket_obj: &str,
        action: &str,
    ) -> ProviderError {
        if e.kind() == opendal::ErrorKind::NotFound {
            return ProviderError::NotFound {
                provider: self.name.clone(),
                object: bucket_obj.to_string(),
            };
        }
        self.dal(e, obj, bucket_obj, action)
    }

    /// Runs `f`, and once more after a fresh login when the store refused the credentials
    /// (a Swift token that expired or was revoked).
    async fn with_login<T, F, Fut>(&self, mut f: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        match f().await {
            Err(ProviderError::Denied { .. }) if self.remote.credentials_refused().await => {
                f().await
            }
            other => other,
        }
    }

    /// As [`ObjectStore::with_login`], and the whole again on temporary failures (see the
    /// module documentation). Only for calls that can be repeated: no stream is consumed.
    async fn idempotent<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        copier::retry_transient(copier::OBJECT_ATTEMPTS, None, what, || self.with_login(&f)).await
    }

    async fn stat_remote(
        &self,
        op: &Operator,
        key: &str,
        obj: &str,
        bucket_obj: &str,
    ) -> Result<Option<(ObjectInfo, ObjectMeta)>, ProviderError> {
        match op.stat(key).await {
            Ok(m) => Ok(Some((
                ObjectInfo {
                    key: key.to_string(),
                    size: m.content_length(),
                    blake3: None,
                    etag: m.etag().map(str::to_string),
                    modified: m.last_modified().map(to_chrono),
                },
                ObjectMeta {
                    content_type: m.content_type().map(str::to_string),
                    user: m
                        .user_metadata()
                        .map(|u| {
                            u.iter()
                                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                },
            ))),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.dal(e, obj, bucket_obj, "look it up")),
        }
    }

    async fn write_remote(
        &self,
        remote: &str,
        key: &str,
        obj: &str,
        bucket_obj: &str,
        mut body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        let op = self.remote.operator(remote).await?;
        let options = WriteOptions {
            content_type: meta.content_type.clone(),
            user_metadata: (!meta.user.is_empty())
                .then(|| meta.user.clone().into_iter().collect::<HashMap<_, _>>()),
            chunk: Some(self.part_size as usize),
            concurrent: PART_CONCURRENCY,
            ..WriteOptions::default()
        };
        let mut writer = op
            .writer_options(key, options)
            .await
            .map_err(|e| self.dal_write(e, obj, bucket_obj, "start the upload"))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let sent = async {
            loop {
                let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
                while buf.len() < READ_CHUNK {
                    if body
                        .read_buf(&mut buf)
                        .await
                        .map_err(|e| ProviderError::Io {
                            provider: self.name.clone(),
                            object: obj.to_string(),
                            action: "read the content to store".to_string(),
                            source: e,
                        })?
                        == 0
                    {
                        break;
                    }
                }
                if buf.is_empty() {
                    break;
                }
                hasher.update(&buf);
                size += buf.len() as u64;
                writer
                    .write(buf.freeze())
                    .await
                    .map_err(|e| self.dal_write(e, obj, bucket_obj, "upload it"))?;
            }
            writer
                .close()
                .await
                .map_err(|e| self.dal_write(e, obj, bucket_obj, "finish the upload"))
        }
        .await;
        let closed = match sent {
            Ok(m) => m,
            Err(e) => {
                // Leaves no half-uploaded parts behind; the old version, if any, stays.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(provider = %self.name, "Cannot abort the upload of {obj}: {abort}.");
                }
                return Err(e);
            }
        };
        let mut info = ObjectInfo {
            key: key.to_string(),
            size,
            blake3: Some(hasher.finalize().to_hex().to_string()),
            etag: closed.etag().map(str::to_string),
            modified: closed.last_modified().map(to_chrono),
        };
        if info.etag.is_none() {
            // Callers compare it with later listings to tell versions apart.
            if let Some((now, _)) = self.stat_remote(&op, key, obj, bucket_obj).await? {
                if now.size == size {
                    info.etag = now.etag;
                    info.modified = info.modified.or(now.modified);
                }
            }
        }
        Ok(info)
    }
}

fn to_chrono(t: opendal::raw::Timestamp) -> DateTime<Utc> {
    DateTime::<Utc>::from(std::time::SystemTime::from(t))
}

/// Translates an OpenDAL error into what the caller can act on.
fn dal_error(
    provider: &str,
    endpoint: &str,
    e: opendal::Error,
    obj: &str,
    bucket_obj: &str,
    action: &str,
) -> ProviderError {
    use opendal::ErrorKind as K;
    let detail = describe(&e);
    match e.kind() {
        // S3 answers NoSuchBucket with 404, which OpenDAL calls a configuration error.
        K::ConfigInvalid if detail.contains("NoSuchBucket") => ProviderError::NotFound {
            provider: provider.to_string(),
            object: bucket_obj.to_string(),
        },
        K::NotFound => ProviderError::NotFound {
            provider: provider.to_string(),
            object: obj.to_string(),
        },
        K::PermissionDenied => ProviderError::Denied {
            provider: provider.to_string(),
            object: obj.to_string(),
            detail,
        },
        _ if unreachable(&e) => ProviderError::Unreachable {
            provider: provider.to_string(),
            object: obj.to_string(),
            endpoint: endpoint.to_string(),
            detail,
        },
        _ => ProviderError::Remote {
            provider: provider.to_string(),
            object: obj.to_string(),
            action: action.to_string(),
            detail,
        },
    }
}

/// The message of an OpenDAL error and its causes, without the request and response dumps
/// its `Display` adds.
fn describe(e: &opendal::Error) -> String {
    let mut out = e.message().trim().to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

/// True when nothing answered: the connection was refused, reset or timed out.
fn unreachable(e: &opendal::Error) -> bool {
    use std::io::ErrorKind as IoK;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                IoK::ConnectionRefused
                    | IoK::ConnectionReset
                    | IoK::ConnectionAborted
                    | IoK::NotConnected
                    | IoK::TimedOut
                    | IoK::HostUnreachable
                    | IoK::NetworkUnreachable
                    | IoK::AddrNotAvailable
                    | IoK::BrokenPipe
            ) {
                return true;
            }
        }
        cur = c.source();
    }
    let text = describe(e).to_ascii_lowercase();
    [
        "connection refused",
        "dns error",
        "timeout",
        "timed out",
        "connection reset",
        "error trying to connect",
    ]
    .iter()
    .any(|t| text.contains(t))
}

/// Translates an error of the HTTP client used for logins and bucket calls.
fn http_error(
    provider: &str,
    endpoint: &str,
    obj: &str,
    action: &str,
    e: reqwest::Error,
) -> ProviderError {
    let mut detail = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        detail.push_str(": ");
        detail.push_str(&c.to_string());
        cur = c.source();
    }
    if e.is_connect() || e.is_timeout() {
        ProviderError::Unreachable {
            provider: provider.to_string(),
            object: obj.to_string(),
            endpoint: endpoint.to_string(),
            detail,
        }
    } else {
        ProviderError::Remote {
            provider: provider.to_string(),
            object: obj.to_string(),
            action: action.to_string(),
            detail,
        }
    }
}

/// The longest `Retry-After` honoured: a store asking for longer is asked again sooner,
/// since the caller's own deadline is what counts.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Sends a login or bucket request, again when it failed on the way (a kept-alive connection
/// turned out to be closed, the connection was reset or timed out) or the server answered
/// that it could not serve it now (`500`, `502`, `503`, `504`, `429`): up to four more
/// attempts, with exponential backoff and jitter so that clients that failed together do not
/// come back in step, and no sooner than the answer's `Retry-After` (in seconds, up to
/// [`MAX_RETRY_AFTER`]). A refused connection is not retried: the server is not there, and
/// the caller says so at once. Only idempotent requests are sent this way; a request whose
/// body cannot be cloned (a stream) is sent once.
async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, reqwest::Error> {
    if request.try_clone().is_none() {
        return request.send().await;
    }
    let mut pauses = retry::jittered(4).build();
    loop {
        let Some(again) = request.try_clone() else {
            unreachable!("the request was cloned above")
        };
        let result = again.send().await;
        let (transient, asked) = match &result {
            Ok(r) => (
                matches!(r.status().as_u16(), 500 | 502 | 503 | 504 | 429),
                retry_after(r),
            ),
            Err(e) => (
                !e.is_connect() && (e.is_request() || e.is_timeout() || e.is_body()),
                None,
            ),
        };
        match pauses.next() {
            Some(pause) if transient => {
                tokio::time::sleep(pause.max(asked.unwrap_or_default())).await
            }
            _ => return result,
        }
    }
}

/// How long the answer asks to wait before the next attempt, bounded. Only the delay in
/// seconds is read; the HTTP-date form leaves the backoff to decide.
fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    let text = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    let secs: u64 = text.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// The HTTP client for logins and bucket calls.
fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10).min(timeout))
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Retry and time-out layers every operator gets.
fn finish(
    builder: opendal::OperatorBuilder<impl opendal::raw::Access>,
    timeout: Duration,
) -> Operator {
    builder
        .layer(
            opendal::layers::TimeoutLayer::new()
                .with_timeout(timeout)
                .with_io_timeout(timeout),
        )
        .layer(
            opendal::layers::RetryLayer::new()
                .with_max_times(3)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter(),
        )
        .finish()
}

#[async_trait]
impl Provider for ObjectStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> Driver {
        self.driver
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of(self.driver())
    }

    fn preferred_disk_format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        // Every call of this driver finishes before it returns; none leaves an operation.
        Err(ProviderError::NotFound {
            provider: self.name.clone(),
            object: object::operation(id),
        })
    }

    async fn ensure_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let (remote, obj) = self.remote_bucket(service, bucket)?;
        self.with_login(|| async {
            if self.bucket_exists(&remote, &obj).await? {
                return Ok(());
            }
            self.remote.create_bucket(&remote, &obj).await?;
            self.known_buckets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(remote.clone());
            Ok(())
        })
        .await
    }

    async fn bucket_location(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Option<BucketLocation>, ProviderError> {
        let (remote, obj) = self.remote_bucket(service, bucket)?;
        let url = self
            .with_login(|| self.remote.bucket_url(&remote, &obj))
            .await?;
        Ok(Some(BucketLocation {
            url,
            name: remote,
            path: None,
        }))
    }

    async fn delete_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let (remote, obj) = self.remote_bucket(service, bucket)?;
        self.known_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&remote);
        self.with_login(|| self.remote.delete_bucket(&remote, &obj))
            .await
    }

    async fn list_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        let (remote, obj) = self.remote_bucket(service, bucket)?;
        let what = format!("Listing {obj} at `{}`", self.name);
        self.idempotent(&what, || async {
            // Some stores list a missing bucket as empty; a copy from it must fail instead.
            if !self.bucket_exists(&remote, &obj).await? {
                return Err(ProviderError::NotFound {
                    provider: self.name.clone(),
                    object: obj.clone(),
                });
            }
            let listed = match self.remote.list_native(&remote, &obj).await? {
                Some(listed) => listed,
                None => self.list_generic(&remote, &obj).await?,
            };
            let mut out: Vec<ObjectInfo> = listed
                .into_iter()
                .filter(|o| !o.key.ends_with('/') && self.remote.reserved(&o.key).is_none())
                .filter(|o| match validate_key(&o.key) {
                    Ok(_) => true,
                    Err(why) => {
                        tracing::warn!(
                            provider = %self.name,
                            "Skipping object `{}` in {obj}: {why}.",
                            o.key
                        );
                        false
                    }
                })
                .collect();
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn stat_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        let (remote, bucket_obj, obj) = self.remote_key(service, bucket, key)?;
        let what = format!("Looking up {obj} at `{}`", self.name);
        self.idempotent(&what, || async {
            let op = self.remote.operator(&remote).await?;
            match self.stat_remote(&op, key, &obj, &bucket_obj).await? {
                Some((info, meta)) => Ok(Some(ObjectStat { info, meta })),
                None if !self.bucket_exists(&remote, &bucket_obj).await? => {
                    Err(ProviderError::NotFound {
                        provider: self.name.clone(),
                        object: bucket_obj.clone(),
                    })
                }
                None => Ok(None),
            }
        })
        .await
    }

    async fn read_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        let (remote, bucket_obj, obj) = self.remote_key(service, bucket, key)?;
        let what = format!("Opening {obj} at `{}`", self.name);
        self.idempotent(&what, || async {
            let op = self.remote.operator(&remote).await?;
            // Replaced between the stat and the read: open the new version, at once.
            let reopens = ConstantBuilder::new()
                .with_delay(Duration::ZERO)
                .with_max_times(REOPEN_ATTEMPTS - 1);
            let opened = (|| async {
                let Some((info, _)) = self
                    .stat_remote(&op, key, &obj, &bucket_obj)
                    .await
                    .map_err(Reopen::Failed)?
                else {
                    return Err(Reopen::Failed(ProviderError::NotFound {
                        provider: self.name.clone(),
                        object: obj.clone(),
                    }));
                };
                let options = ReaderOptions {
                    if_match: info.etag.clone(),
                    chunk: Some(8 << 20),
                    ..ReaderOptions::default()
                };
                let opened = async {
                    let reader = op.reader_options(key, options).await?;
                    reader.into_bytes_stream(0..info.size).await
                }
                .await;
                match opened {
                    Ok(stream) => {
                        let stream = stream.map_err(std::io::Error::other);
                        Ok(ObjectBody {
                            size: info.size,
                            stream: Box::pin(tokio_util::io::StreamReader::new(stream)),
                        })
                    }
                    Err(e) if e.kind() == opendal::ErrorKind::ConditionNotMatch => {
                        Err(Reopen::Replaced(e))
                    }
                    Err(e) => Err(Reopen::Failed(self.dal(e, &obj, &bucket_obj, "read it"))),
                }
            })
            .retry(reopens)
            .when(|e| matches!(e, Reopen::Replaced(_)))
            .await;
            match opened {
                Ok(body) => Ok(body),
                Err(Reopen::Failed(e)) => Err(e),
                Err(Reopen::Replaced(last)) => Err(ProviderError::Conflict {
                    provider: self.name.clone(),
                    object: obj.clone(),
                    detail: format!(
                        "it was replaced each time it was opened ({REOPEN_ATTEMPTS} attempts); last: {}",
                        describe(&last)
                    ),
                }),
            }
        })
        .await
    }

    async fn write_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
    ) -> Result<ObjectInfo, ProviderError> {
        self.write_object_with_meta(service, bucket, key, body, &ObjectMeta::default())
            .await
    }

    async fn write_object_with_meta(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        let (remote, bucket_obj, obj) = self.remote_key(service, bucket, key)?;
        validate_meta(meta).map_err(|reason| ProviderError::Invalid {
            provider: self.name.clone(),
            object: obj.clone(),
            reason,
        })?;
        // The body can be read only once, so a refused login cannot be retried past this
        // point; the login is checked (and renewed when due) before anything is read.
        let what = format!("Preparing the upload of {obj} to `{}`", self.name);
        let before = self
            .idempotent(&what, || async {
                if !self.known_bucket(&remote) && !self.bucket_exists(&remote, &bucket_obj).await? {
                    return Err(ProviderError::NotFound {
                        provider: self.name.clone(),
                        object: bucket_obj.clone(),
                    });
                }
                self.remote.before_write(&remote, key, &obj).await
            })
            .await?;
        let info = self
            .write_remote(&remote, key, &obj, &bucket_obj, body, meta)
            .await?;
        self.remote
            .after_write(&remote, key, &obj, info.size, meta, before)
            .await?;
        Ok(info)
    }

    async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        let (remote, _, obj) = self.remote_key(service, bucket, key)?;
        let what = format!("Deleting {obj} at `{}`", self.name);
        self.idempotent(&what, || async {
            let op = self.remote.operator(&remote).await?;
            match self.remote.delete_object(&op, &remote, key, &obj).await {
                // Deleting what is gone succeeds, also when its bucket is gone.
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            }
        })
        .await
    }
}

#[cfg(test)]
mod send_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Regression: a Swift bucket lookup answered `500` once (the fault suite) failed the
    /// relocation's step at once, and a container delete reset once failed its rollback.
    #[tokio::test]
    async fn a_bucket_call_answered_500_or_503_once_is_sent_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "busy"),
                    1 => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy"),
                    _ => (axum::http::StatusCode::OK, "here"),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/AUTH_test/c", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = http_client(Duration::from_secs(5)).unwrap();
        let answer = send(client.head(&url)).await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// The fault suite's `429` and `503` answers ask for a second's pause: it is kept.
    #[tokio::test]
    async fn retry_after_is_honoured_and_bounded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => (
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "1")],
                        "slow down",
                    ),
                    _ => (axum::http::StatusCode::OK, [("x-fine", "1")], "here"),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/b", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = http_client(Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        let answer = send(client.get(&url)).await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_secs(1));

        let asked = |value: &str| {
            let r = axum::http::Response::builder()
                .status(503)
                .header("retry-after", value)
                .body("")
                .unwrap();
            retry_after(&reqwest::Response::from(r))
        };
        assert_eq!(asked("2"), Some(Duration::from_secs(2)));
        assert_eq!(asked("3600"), Some(MAX_RETRY_AFTER));
        assert_eq!(asked("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_retried() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let client = http_client(Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        let e = send(client.get(&url)).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
