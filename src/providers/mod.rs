//! Providers: the places a service instance lives, behind one [`Provider`] trait.
//!
//! A driver serves one configured provider (a directory on this machine, a cloud account in a
//! region). [`open`] builds the driver a [`config::Provider`] names. The trait is shaped for
//! remote IaaS APIs as much as for this machine:
//!
//! - every call is async and idempotent: creating what exists with the same shape succeeds,
//!   deleting what is gone succeeds, a different shape is a [`ProviderError::Conflict`];
//! - a driver declares its [`Capabilities`] (compute, block, object, app); calls outside them
//!   answer [`ProviderError::Unsupported`];
//! - long-running calls (volume create/delete, app start) return an [`Operation`] whose
//!   [`OperationId`] the conduit's journal persists; [`Provider::operation`] polls it, also
//!   after a daemon restart, and [`wait_for`] polls until it finishes;
//! - volumes expose the local path where a viaduct or `qemu-img` reads and writes their data,
//!   buckets list objects with size and BLAKE3/ETag and read/write them as streams, apps are
//!   started from an [`AppSpec`] and stopped gracefully (killing is the caller's decision),
//!   VMs are started from a [`VmSpec`] (booting the volume named like the VM) and powered
//!   down through ACPI (again killed only when the caller says so), and
//!   [`Provider::health_check`] runs a service's HTTP or command check with a deadline.
//!
//! Every [`ProviderError`] names the provider and the object it concerns.
//!
//! Drivers: [`local`] (the embedded default: a directory, supervised processes, image files);
//! [`qemu`] (virtual machines under `qemu-system-x86_64` on this machine, with a disk pool);
//! `objstore` (S3 and OpenStack Swift buckets through Apache OpenDAL); [`remote`] (a provider
//! on another host, through its agent).
//!
//! [`copier`] copies a bucket between any two providers through the trait alone; the
//! conduit's bucket migrator and the agents (a bucket pulled host to host) both use it.

pub mod copier;
pub mod health;
pub(crate) mod host;
pub mod live;
pub mod local;
mod names;
pub mod objstore;
pub mod precopy;
pub mod qemu;
pub mod remote;
mod spec;
mod vm_spec;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use crate::config;
use crate::model::{Driver, HealthCheck};
use crate::sys::retry::{self, ExponentialBuilder};

pub use crate::model::DiskFormat;
pub use host::keep_root_locks_until_exit;
pub use live::{
    IncomingVm, LiveKey, LiveLimits, MigrationReport, MirrorReport, Reception, SocketAddress,
};
pub use names::{validate_file_name, validate_key, validate_name};
pub use precopy::{DiskExport, DiskPass, DiskPassKind, Halt};
pub use spec::{AppSpec, SettingsError};
pub use vm_spec::{PortForward, VmSpec, MAX_VCPUS, MIN_MEMORY_MIB};

/// What a driver can do. The planner checks these before it plans a move onto a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Virtual machines.
    pub compute: bool,
    /// Block volumes (disk images).
    pub block: bool,
    /// Object storage (buckets).
    pub object: bool,
    /// Supervised application processes or containers.
    pub app: bool,
}

impl Capabilities {
    /// What a driver can do, wherever it runs (on this host or behind an agent).
    pub fn of(driver: Driver) -> Capabilities {
        match driver {
            Driver::Local => Capabilities {
                compute: false,
                block: true,
                object: true,
                app: true,
            },
            Driver::Qemu => Capabilities {
                compute: true,
                block: true,
                object: false,
                app: false,
            },
            Driver::S3 | Driver::Swift => Capabilities {
                compute: false,
                block: false,
                object: true,
                app: false,
            },
        }
    }
}

/// Names a long-running operation at its provider. Opaque to everyone but the driver; the
/// journal stores it as a string and polls it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OperationId(String);

impl OperationId {
    pub fn new(id: impl Into<String>) -> Self {
        OperationId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    CreateVolume,
    DeleteVolume,
    StartApp,
    StartVm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum OperationState {
    /// Still under way; `progress` is a share in 0..=1 where the provider reports one.
    Running {
        progress: Option<f64>,
    },
    Succeeded,
    Failed {
        message: String,
    },
}

/// A long-running operation as its provider last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: OperationId,
    pub kind: OperationKind,
    /// The object it works on, e.g. "volume `shop/data`".
    pub object: String,
    pub state: OperationState,
    /// What the provider said, e.g. "created" or "already existed with the same shape".
    pub detail: String,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Operation {
    pub fn is_finished(&self) -> bool {
        !matches!(self.state, OperationState::Running { .. })
    }
}

/// A volume to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    /// Virtual size; a multiple of 512 (disks have 512-byte sectors).
    pub size_bytes: u64,
    pub format: DiskFormat,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub service: String,
    pub name: String,
    pub format: DiskFormat,
    /// Size the guest sees.
    pub virtual_size: u64,
    /// Bytes the image occupies at the provider (less than `virtual_size` when sparse).
    pub allocated_bytes: u64,
    /// Where the image can be read and written on this machine (by a viaduct or
    /// `qemu-img`); `None` when the provider keeps it out of reach (a remote API).
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// `/`-separated key relative to the bucket.
    pub key: String,
    pub size: u64,
    /// BLAKE3 of the content, hex, where the provider can give it.
    pub blake3: Option<String>,
    /// The provider's own entity tag (S3, Swift), where it has one.
    pub etag: Option<String>,
    pub modified: Option<DateTime<Utc>>,
}

/// What an object carries besides its content, where the provider keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// The MIME type given when the object was stored.
    pub content_type: Option<String>,
    /// User metadata (S3 `x-amz-meta-*`, Swift `X-Object-Meta-*`). Keys are lowercase
    /// letters, digits and `-` (see [`validate_meta`]).
    pub user: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn is_empty(&self) -> bool {
        self.content_type.is_none() && self.user.is_empty()
    }
}

/// Longest user metadata key.
pub const MAX_META_KEY_LEN: usize = 128;
/// Most bytes of content type and user metadata together (S3 allows 2 KiB of user metadata).
pub const MAX_META_BYTES: usize = 2048;

/// Checks metadata so that every provider stores it and gives it back unchanged: keys are
/// lowercase ASCII letters, digits and `-` (HTTP header names fold case, and Swift turns `_`
/// into `-`), values printable ASCII without leading or trailing spaces. Returns the reason
/// it is refused.
pub fn validate_meta(meta: &ObjectMeta) -> Result<(), String> {
    let printable = |v: &str| v.bytes().all(|b| (0x20..0x7f).contains(&b)) && v.trim() == v;
    let mut total = 0;
    if let Some(ct) = &meta.content_type {
        if ct.is_empty() || !printable(ct) {
            return Err(format!(
                "the content type {ct:?} must be non-empty printable ASCII without surrounding spaces"
            ));
        }
        total += ct.len();
    }
    for (k, v) in &meta.user {
        if k.is_empty() || k.len() > MAX_META_KEY_LEN {
            return Err(format!(
                "the metadata key {k:?} must be 1 to {MAX_META_KEY_LEN} characters long"
            ));
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!(
                "the metadata key {k:?} may hold only lowercase letters, digits and `-`"
            ));
        }
        if !printable(v) {
            return Err(format!(
                "the value of metadata key `{k}` must be printable ASCII without surrounding spaces"
            ));
        }
        total += k.len() + v.len();
    }
    if total > MAX_META_BYTES {
        return Err(format!(
            "content type and metadata take {total} bytes; at most {MAX_META_BYTES} are allowed"
        ));
    }
    Ok(())
}

/// One object as a provider describes it on its own: what a listing gives, plus its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStat {
    pub info: ObjectInfo,
    pub meta: ObjectMeta,
}

/// Object content as a byte stream.
pub type ObjectStream = Pin<Box<dyn AsyncRead + Send>>;

/// An object opened for reading.
pub struct ObjectBody {
    pub size: u64,
    pub stream: ObjectStream,
}

impl fmt::Debug for ObjectBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBody")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Where clients reach a bucket, for configuration files (`{bucket.NAME.endpoint}` and
/// friends) and the context document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLocation {
    /// `file:///dir` for a directory, the bucket's URL at an object store (path-style or
    /// virtual-hosted S3 as configured, the container under the Swift storage URL).
    pub url: String,
    /// The name the store knows the bucket by.
    pub name: String,
    /// The directory holding its objects, where the provider keeps them on this machine.
    pub path: Option<PathBuf>,
}

/// Where a running app can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// `http://host:port` followed by `path` (which should start with `/`).
    pub fn http_url(&self, path: &str) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}{path}", self.host, self.port)
        } else {
            format!("http://{}:{}{path}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    Running,
    /// Wanted running but not running now: it exited and waits for its next start.
    Restarting,
    /// Asked to stop; still running.
    Stopping,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub service: String,
    pub name: String,
    pub state: AppState,
    pub pid: Option<u32>,
    /// Times the provider started the app again after it exited on its own.
    pub restarts: u32,
    /// The running process was found at start-up (from an earlier daemon) rather than
    /// started by this provider instance.
    pub adopted: bool,
    /// How the previous process ended, e.g. "killed by signal 9".
    pub last_exit: Option<String>,
    /// The last failure to start it, if any.
    pub last_error: Option<String>,
    pub endpoint: Option<Endpoint>,
    pub spec: AppSpec,
}

/// How to stop an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// How long to wait after the graceful signal.
    pub timeout: Duration,
    /// Kill it when it has not exited by then. Without this the app is left running and the
    /// call fails with [`ProviderError::StopTimedOut`].
    pub kill_after_timeout: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StopOutcome {
    AlreadyStopped,
    Stopped { after: Duration },
    Killed { after: Duration },
}

/// What a VM is doing, as far as its provider can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    /// Its emulator runs but the guest does not (paused, suspended, being migrated).
    Paused,
    /// The guest shut down or crashed (panicked, I/O or internal error) while its emulator
    /// still runs.
    Halted,
    /// No emulator runs for it.
    Stopped,
}

/// A guest port and the host port that reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedPort {
    pub guest: u16,
    pub host: u16,
    /// The host address the port listens on: the provider's address (127.0.0.1 in the
    /// daemon, an agent's advertised address on its host).
    #[serde(default = "loopback")]
    pub address: String,
}

fn loopback() -> String {
    LOOPBACK.to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub service: String,
    pub name: String,
    pub state: VmState,
    /// The emulator's own word for the guest's state (QMP `query-status`), e.g. `running`,
    /// `paused`, `shutdown`, `guest-panicked`; `None` when it could not be asked.
    pub detail: Option<String>,
    pub pid: Option<u32>,
    /// The running emulator was started before this provider instance (by an earlier
    /// daemon) and taken over from its pid file.
    pub adopted: bool,
    /// Where the guest's forwarded ports are reached, as of its last start.
    pub ports: Vec<ForwardedPort>,
    /// The guest's serial console log.
    pub console: Option<PathBuf>,
    pub spec: VmSpec,
}

impl VmStatus {
    /// The endpoint that reaches `guest_port`, if it is forwarded.
    pub fn endpoint(&self, guest_port: u16) -> Option<Endpoint> {
        self.ports
            .iter()
            .find(|p| p.guest == guest_port)
            .map(|p| Endpoint {
                host: p.address.clone(),
                port: p.host,
            })
    }
}

/// A health check that passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    pub attempts: u32,
    pub elapsed: Duration,
    /// What passed, e.g. "GET http://127.0.0.1:8080/health answered 200 OK".
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider `{provider}`: {reason}")]
    Setup { provider: String, reason: String },
    #[error("provider `{provider}`: {object}: the `{driver}` driver does not support {what}")]
    Unsupported {
        provider: String,
        driver: &'static str,
        object: String,
        what: &'static str,
    },
    #[error("provider `{provider}`: {object} does not exist")]
    NotFound { provider: String, object: String },
    /// The provider refused who we are: a wrong key or secret, an expired or revoked token,
    /// or an account without the right to do this.
    #[error("provider `{provider}`: {object}: wrong credentials or no permission: {detail}")]
    Denied {
        provider: String,
        object: String,
        detail: String,
    },
    /// Nothing answered at the provider's endpoint (refused, unresolvable, timed out).
    #[error("provider `{provider}`: {object}: endpoint {endpoint} unreachable: {detail}")]
    Unreachable {
        provider: String,
        object: String,
        endpoint: String,
        detail: String,
    },
    /// The provider answered with something this driver does not understand or an error it
    /// has no better name for.
    #[error("provider `{provider}`: {object}: cannot {action}: {detail}")]
    Remote {
        provider: String,
        object: String,
        action: String,
        detail: String,
    },
    #[error("provider `{provider}`: {object} conflicts with what is there: {detail}")]
    Conflict {
        provider: String,
        object: String,
        detail: String,
    },
    #[error("provider `{provider}`: {object}: {reason}")]
    Invalid {
        provider: String,
        object: String,
        reason: String,
    },
    #[error("provider `{provider}`: {object}: cannot {action}: {source}")]
    Io {
        provider: String,
        object: String,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("provider `{provider}`: {object}: `{program}` failed: {detail}")]
    Tool {
        provider: String,
        object: String,
        program: String,
        detail: String,
    },
    #[error("provider `{provider}`: {object} did not pass within {timeout:?} ({attempts} attempts); last failure: {last}")]
    Unhealthy {
        provider: String,
        object: String,
        timeout: Duration,
        attempts: u32,
        last: String,
    },
    #[error("provider `{provider}`: {object} is still running {waited:?} after {asked}; it was not killed because the caller did not ask for that")]
    StopTimedOut {
        provider: String,
        object: String,
        waited: Duration,
        /// How it was asked to stop, e.g. "SIGTERM".
        asked: &'static str,
    },
    /// A live migration that failed or did not converge in time; it was cancelled and the
    /// VM runs on at the source.
    #[error("provider `{provider}`: {object}: the live migration {reason}; it was cancelled and the VM runs on here")]
    MigrationFailed {
        provider: String,
        object: String,
        reason: String,
        /// The migration ran out of time (rather than failing).
        timed_out: bool,
    },
    #[error("provider `{provider}`: {object}: operation `{operation}` failed: {message}")]
    OperationFailed {
        provider: String,
        object: String,
        operation: OperationId,
        message: String,
    },
    #[error("provider `{provider}`: {object}: operation `{operation}` is not finished after {waited:?}; poll it again with its id to resume")]
    OperationPending {
        provider: String,
        object: String,
        operation: OperationId,
        waited: Duration,
    },
}

impl ProviderError {
    /// True for [`ProviderError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProviderError::NotFound { .. })
    }
}

/// How error messages name objects; one place so every driver says it the same way.
pub mod object {
    pub fn volume(service: &str, name: &str) -> String {
        format!("volume `{service}/{name}`")
    }
    pub fn bucket(service: &str, bucket: &str) -> String {
        format!("bucket `{service}/{bucket}`")
    }
    pub fn key(service: &str, bucket: &str, key: &str) -> String {
        format!("object `{key}` in bucket `{service}/{bucket}`")
    }
    pub fn app(service: &str, app: &str) -> String {
        format!("app `{service}/{app}`")
    }
    pub fn vm(service: &str, vm: &str) -> String {
        format!("vm `{service}/{vm}`")
    }
    pub fn service(service: &str) -> String {
        format!("service `{service}`")
    }
    pub fn health_check(service: &str) -> String {
        format!("health check of service `{service}`")
    }
    pub fn operation(id: &super::OperationId) -> String {
        format!("operation `{id}`")
    }
}

/// One provider. Calls a driver does not support (see [`Provider::capabilities`]) answer
/// [`ProviderError::Unsupported`] through the default methods.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The provider's name in the configuration.
    fn name(&self) -> &str;
    fn driver(&self) -> Driver;
    fn capabilities(&self) -> Capabilities;
    /// The disk image format new volumes get here; a relocation converts to it.
    fn preferred_disk_format(&self) -> DiskFormat;

    /// The address its apps (and the daemon's health checks) reach it at: `app.NAME.host`.
    /// 127.0.0.1 for a provider in this process, the agent's host for one served by an
    /// agent.
    fn address(&self) -> String {
        LOOPBACK.to_string()
    }

    /// The provider's agent, when it runs on another host: volumes then move agent to agent
    /// ([`remote::RemoteProvider::send_volume`]) instead of through paths on this host.
    fn remote(&self) -> Option<&remote::RemoteProvider> {
        None
    }

    /// The current state of a long-running operation this provider started, also one started
    /// before a daemon restart.
    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError>;

    // --- block -------------------------------------------------------------------------

    /// The volume, or `None` when it does not exist.
    async fn volume_info(
        &self,
        service: &str,
        volume: &str,
    ) -> Result<Option<VolumeInfo>, ProviderError> {
        Err(self.unsupported(object::volume(service, volume), "block volumes"))
    }

    /// The service's volumes, sorted by name.
    async fn list_volumes(&self, service: &str) -> Result<Vec<VolumeInfo>, ProviderError> {
        Err(self.unsupported(object::service(service), "block volumes"))
    }

    /// Creates an empty volume. Succeeds when it exists with the same format and size.
    async fn create_volume(
        &self,
        service: &str,
        spec: &VolumeSpec,
    ) -> Result<Operation, ProviderError> {
        Err(self.unsupported(object::volume(service, &spec.name), "block volumes"))
    }

    /// Deletes a volume and its data. Succeeds when it does not exist.
    async fn delete_volume(&self, service: &str, volume: &str) -> Result<Operation, ProviderError> {
        Err(self.unsupported(object::volume(service, volume), "block volumes"))
    }

    // --- object ------------------------------------------------------------------------

    /// Creates the bucket unless it exists.
    async fn ensure_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::bucket(service, bucket), "object storage"))
    }

    /// Deletes an empty bucket; succeeds when it does not exist, refuses one holding objects
    /// or entries that are not objects (see [`Provider::list_non_objects`]).
    async fn delete_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::bucket(service, bucket), "object storage"))
    }

    /// Every object of the bucket, sorted by key.
    async fn list_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        Err(self.unsupported(object::bucket(service, bucket), "object storage"))
    }

    /// What the bucket holds besides objects, as paths inside it, sorted: for the `local`
    /// driver, symbolic links, other entries that are not regular files and files whose names
    /// are not valid keys. They are never listed, so never copied; an object store has none.
    async fn list_non_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let _ = (service, bucket);
        Ok(Vec::new())
    }

    async fn read_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        Err(self.unsupported(object::key(service, bucket, key), "object storage"))
    }

    /// Stores `body` under `key`, replacing what was there only once all of it arrived.
    /// Returns what was written, with its BLAKE3 where the provider computes one.
    async fn write_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
    ) -> Result<ObjectInfo, ProviderError> {
        drop(body);
        Err(self.unsupported(object::key(service, bucket, key), "object storage"))
    }

    /// The object's size, tags and metadata, or `None` when it does not exist. Cheaper than
    /// a listing: it may leave `blake3` out where only reading the content would give it.
    /// The default finds the object in [`Provider::list_objects`] and reports no metadata.
    async fn stat_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        let objects = self.list_objects(service, bucket).await?;
        Ok(objects
            .into_iter()
            .find(|o| o.key == key)
            .map(|info| ObjectStat {
                info,
                meta: ObjectMeta::default(),
            }))
    }

    /// Like [`Provider::write_object`], also storing `meta` (checked with [`validate_meta`])
    /// with the content, so that a reader never sees one without the other. The default is
    /// for drivers that keep no metadata: it stores the content only.
    async fn write_object_with_meta(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        let _ = meta;
        self.write_object(service, bucket, key, body).await
    }

    /// Deletes an object; succeeds when it does not exist.
    async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        Err(self.unsupported(object::key(service, bucket, key), "object storage"))
    }

    /// Where clients reach the bucket, or `None` when the driver cannot say. Works whether
    /// or not the bucket exists yet.
    async fn bucket_location(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Option<BucketLocation>, ProviderError> {
        let _ = (service, bucket);
        Ok(None)
    }

    /// Where the object's content lives on this machine, for readers that want a path
    /// rather than a stream; `None` when the provider keeps objects out of reach.
    fn object_path(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<PathBuf>, ProviderError> {
        let _ = (service, bucket, key);
        Ok(None)
    }

    // --- app ---------------------------------------------------------------------------

    /// Starts the app. Succeeds when it already runs with the same spec.
    async fn start_app(&self, service: &str, spec: &AppSpec) -> Result<Operation, ProviderError> {
        Err(self.unsupported(object::app(service, &spec.name), "apps"))
    }

    /// Asks the app to stop and waits up to `options.timeout`; kills it after that only when
    /// `options.kill_after_timeout` says so. Succeeds when it is not running.
    async fn stop_app(
        &self,
        service: &str,
        app: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        let _ = options;
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// The app's state, or `None` when the provider does not know it.
    async fn app_status(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<AppStatus>, ProviderError> {
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// Where the app listens, or `None` when its spec has no port.
    async fn app_endpoint(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<Endpoint>, ProviderError> {
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// Stops supervising a stopped app and deletes its directory (spec, files, logs).
    /// Succeeds when the app is unknown; refuses one that is not stopped.
    async fn remove_app(&self, service: &str, app: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// Writes a file the app reads (a configuration file, the context document) into the
    /// app's own directory, atomically; returns where it landed.
    async fn write_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
        content: &[u8],
    ) -> Result<PathBuf, ProviderError> {
        let _ = (name, content);
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// A file of the app's directory, or `None` when it does not exist.
    async fn read_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ProviderError> {
        let _ = name;
        Err(self.unsupported(object::app(service, app), "apps"))
    }

    /// The directory an app's files live in on this machine, where it has one.
    fn app_dir(&self, service: &str, app: &str) -> Option<PathBuf> {
        let _ = (service, app);
        None
    }

    // --- compute -----------------------------------------------------------------------

    /// Starts the VM, booting the service's volume named like it. Succeeds when it already
    /// runs with the same spec; a VM running with another spec is a conflict.
    /// Refuses a machine definition this provider could not start, without starting it
    /// (its disks need not exist yet).
    async fn check_vm(&self, service: &str, spec: &VmSpec) -> Result<(), ProviderError> {
        let _ = service;
        Err(self.unsupported(object::vm(service, &spec.name), "virtual machines"))
    }

    async fn start_vm(&self, service: &str, spec: &VmSpec) -> Result<Operation, ProviderError> {
        Err(self.unsupported(object::vm(service, &spec.name), "virtual machines"))
    }

    /// Presses the VM's ACPI power button and waits up to `options.timeout` (or longer where
    /// the provider grants guests more) for it to power off. A guest still running then is
    /// switched off only when `options.kill_after_timeout` says so; otherwise it keeps
    /// running and the call fails with [`ProviderError::StopTimedOut`]. Succeeds when it is
    /// not running.
    async fn stop_vm(
        &self,
        service: &str,
        vm: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        let _ = options;
        Err(self.unsupported(object::vm(service, vm), "virtual machines"))
    }

    /// The VM's state, or `None` when the provider does not know it.
    async fn vm_status(&self, service: &str, vm: &str) -> Result<Option<VmStatus>, ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "virtual machines"))
    }

    /// Where the VM's serial console is logged on this machine, or `None` when it is
    /// unknown or out of reach.
    async fn vm_console(&self, service: &str, vm: &str) -> Result<Option<PathBuf>, ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "virtual machines"))
    }

    /// Forgets a stopped VM (its runtime state and console logs; its volumes stay).
    /// Succeeds when the VM is unknown; refuses one that runs.
    async fn remove_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "virtual machines"))
    }

    // --- live migration (see [`live`]) -------------------------------------------------

    /// Starts the VM paused, waiting for its memory and device state from a live migration,
    /// with its disks (which must exist) exported writable for the source's mirrors.
    /// `how` says where it listens and whether the streams need TLS. Succeeds with the same
    /// answer when the VM already waits, or has received its migration and has not been
    /// resumed.
    async fn receive_vm(
        &self,
        service: &str,
        spec: &VmSpec,
        how: &Reception,
    ) -> Result<IncomingVm, ProviderError> {
        let _ = how;
        Err(self.unsupported(object::vm(service, &spec.name), "live migration"))
    }

    /// Mirrors the running VM's disks into the exports of `to`; returns once every mirror is
    /// in step, and keeps them in step until the migration or [`Provider::cancel_mirror`].
    async fn mirror_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
    ) -> Result<MirrorReport, ProviderError> {
        let _ = to;
        Err(self.unsupported(object::vm(service, vm), "live migration"))
    }

    /// Migrates the VM's memory and device state to `to` (its disks must be mirrored). On
    /// success the VM is paused here and its mirrors have drained; a migration that fails or
    /// outlasts `limits.timeout` is cancelled ([`ProviderError::MigrationFailed`]) and the
    /// VM runs on here.
    async fn migrate_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
        limits: &LiveLimits,
    ) -> Result<MigrationReport, ProviderError> {
        let _ = (to, limits);
        Err(self.unsupported(object::vm(service, vm), "live migration"))
    }

    /// Lets a VM paused by a live migration run: at the target once the migration is in,
    /// at the source to take it back (what is left of the migration is cancelled first).
    /// Succeeds when it runs.
    async fn resume_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "live migration"))
    }

    /// Stops mirroring the VM's disks (a migration that will not happen); the VM runs on.
    /// Succeeds when there is nothing to stop.
    async fn cancel_mirror(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "live migration"))
    }

    // --- pre-copy of a running VM's disks (see [`precopy`]) -----------------------------

    /// Prepares a pass over the running VM's disks: tracking and read-only exports. Asking
    /// for the same [`DiskPassKind::Final`] again gives the same answer.
    async fn track_vm_disks(
        &self,
        service: &str,
        vm: &str,
        kind: DiskPassKind,
    ) -> Result<DiskPass, ProviderError> {
        let _ = kind;
        Err(self.unsupported(object::vm(service, vm), "pre-copy of a running VM"))
    }

    /// Stops the VM's guest for the last pass of a pre-copy, keeping its emulator and the
    /// tracking of its disks: through the power button, or paused when the guest has not
    /// shut down within `timeout`. Succeeds at once when the guest is halted already.
    async fn halt_vm(
        &self,
        service: &str,
        vm: &str,
        timeout: Duration,
    ) -> Result<Halt, ProviderError> {
        let _ = timeout;
        Err(self.unsupported(object::vm(service, vm), "pre-copy of a running VM"))
    }

    /// Ends a pre-copy's tracking and exports; the VM runs (or stays halted) as it is.
    /// Succeeds when there is nothing to end.
    async fn untrack_vm_disks(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        Err(self.unsupported(object::vm(service, vm), "pre-copy of a running VM"))
    }

    /// Free bytes where this provider keeps volumes, when it can tell.
    async fn free_bytes(&self) -> Result<Option<u64>, ProviderError> {
        Ok(None)
    }

    // --- health ------------------------------------------------------------------------

    /// Runs the check until it passes or its timeout ends. The default runs it from this
    /// machine; a driver whose services are only reachable from elsewhere overrides it.
    async fn health_check(
        &self,
        service: &str,
        check: &HealthCheck,
    ) -> Result<HealthReport, ProviderError> {
        health::run(self.name(), service, check).await
    }

    /// The error a call outside this driver's capabilities answers.
    fn unsupported(&self, object: String, what: &'static str) -> ProviderError {
        ProviderError::Unsupported {
            provider: self.name().to_string(),
            driver: self.driver().as_str(),
            object,
            what,
        }
    }
}

/// Builds the driver that serves `provider`.
pub fn open(provider: &config::Provider) -> Result<Arc<dyn Provider>, ProviderError> {
    if let Some(agent) = &provider.agent {
        let setup = |reason: String| ProviderError::Setup {
            provider: provider.name.clone(),
            reason,
        };
        let files = provider
            .tls
            .as_ref()
            .ok_or_else(|| setup("its agent is set but the [tls] section is not".into()))?;
        let identity = crate::sys::tls::Identity::load(files).map_err(|e| setup(e.to_string()))?;
        return Ok(Arc::new(remote::RemoteProvider::new(
            &provider.name,
            provider.driver,
            provider.disk_format,
            agent,
            &identity,
        )?));
    }
    match provider.driver {
        Driver::Local => Ok(local::LocalProvider::open(provider)?),
        Driver::Qemu => Ok(qemu::QemuProvider::open(provider)?),
        Driver::S3 | Driver::Swift => objstore::open(provider),
    }
}

/// Where the apps of a provider in this process are reached.
pub const LOOPBACK: &str = "127.0.0.1";

/// Polls an operation until it finishes or `timeout` passes. A failed operation is an
/// [`ProviderError::OperationFailed`]; one still running at the deadline is an
/// [`ProviderError::OperationPending`] and can be waited for again with the same id.
pub async fn wait_for(
    provider: &dyn Provider,
    id: &OperationId,
    timeout: Duration,
) -> Result<Operation, ProviderError> {
    // Polls from 50 ms, doubling up to 2 s.
    const POLLS: ExponentialBuilder = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times();
    let started = Instant::now();
    // Ok: the operation ended (or could not be looked at); Err: it is still running.
    let polled = retry::until_deadline(POLLS, timeout, || async move {
        let op = match provider.operation(id).await {
            Ok(op) => op,
            Err(e) => return Ok(Err(e)),
        };
        match &op.state {
            OperationState::Succeeded => Ok(Ok(op)),
            OperationState::Failed { message } => Ok(Err(ProviderError::OperationFailed {
                provider: provider.name().to_string(),
                object: op.object.clone(),
                operation: id.clone(),
                message: message.clone(),
            })),
            OperationState::Running { .. } => Err(op),
        }
    })
    .await;
    match polled {
        Ok(ended) => ended,
        Err(running) => Err(ProviderError::OperationPending {
            provider: provider.name().to_string(),
            object: running.object,
            operation: id.clone(),
            waited: started.elapsed(),
        }),
    }
}

/// Environment variables by name, as an app spec holds them.
pub type Env = BTreeMap<String, String>;

#[cfg(test)]
mod tests;
