//! What the daemon and an agent say to each other about a provider: one JSON [`Call`] per
//! operation of the [`Provider`](super::super::Provider) trait, answered with the
//! operation's result as JSON (HTTP 200) or a [`WireError`] (any other status). Object
//! contents travel as raw HTTP bodies beside the JSON (see [`super`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{DiskFormat, Driver};
use crate::providers::{
    AppSpec, Capabilities, DiskPassKind, IncomingVm, LiveLimits, OperationId, ProviderError,
    Reception, StopOptions, VmSpec, VolumeSpec,
};

/// The path an agent serves calls for provider `NAME` at: `/v1/providers/NAME/call`.
pub fn call_path(provider: &str) -> String {
    format!("/v1/providers/{provider}/call")
}

/// The path object contents are read from and written to.
pub fn object_path(provider: &str) -> String {
    format!("/v1/providers/{provider}/object")
}

/// The query naming an object for [`object_path`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub service: String,
    pub bucket: String,
    pub key: String,
}

/// The header carrying an object's [`ObjectMeta`](crate::providers::ObjectMeta) as JSON on
/// a write, and the object's size on a read.
pub const META_HEADER: &str = "x-fluidcloud-meta";
pub const SIZE_HEADER: &str = "x-fluidcloud-size";

/// What a provider is, as its agent describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    pub driver: Driver,
    pub capabilities: Capabilities,
    pub preferred_disk_format: DiskFormat,
}

/// How to stop an app or VM, as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStop {
    pub timeout_ms: u64,
    pub kill_after_timeout: bool,
}

impl From<StopOptions> for WireStop {
    fn from(o: StopOptions) -> Self {
        WireStop {
            timeout_ms: u64::try_from(o.timeout.as_millis()).unwrap_or(u64::MAX),
            kill_after_timeout: o.kill_after_timeout,
        }
    }
}

impl From<WireStop> for StopOptions {
    fn from(o: WireStop) -> Self {
        StopOptions {
            timeout: Duration::from_millis(o.timeout_ms),
            kill_after_timeout: o.kill_after_timeout,
        }
    }
}

/// One operation of the provider trait, with its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    Describe,
    Operation {
        id: OperationId,
    },
    VolumeInfo {
        service: String,
        volume: String,
    },
    ListVolumes {
        service: String,
    },
    CreateVolume {
        service: String,
        spec: VolumeSpec,
    },
    DeleteVolume {
        service: String,
        volume: String,
    },
    EnsureBucket {
        service: String,
        bucket: String,
    },
    DeleteBucket {
        service: String,
        bucket: String,
    },
    ListObjects {
        service: String,
        bucket: String,
    },
    ListNonObjects {
        service: String,
        bucket: String,
    },
    StatObject {
        service: String,
        bucket: String,
        key: String,
    },
    DeleteObject {
        service: String,
        bucket: String,
        key: String,
    },
    BucketLocation {
        service: String,
        bucket: String,
    },
    StartApp {
        service: String,
        spec: AppSpec,
    },
    StopApp {
        service: String,
        app: String,
        options: WireStop,
    },
    AppStatus {
        service: String,
        app: String,
    },
    AppEndpoint {
        service: String,
        app: String,
    },
    RemoveApp {
        service: String,
        app: String,
    },
    /// `content` is base64 (standard alphabet, padded).
    WriteAppFile {
        service: String,
        app: String,
        name: String,
        content: String,
    },
    ReadAppFile {
        service: String,
        app: String,
        name: String,
    },
    CheckVm {
        service: String,
        spec: VmSpec,
    },
    StartVm {
        service: String,
        spec: VmSpec,
    },
    StopVm {
        service: String,
        vm: String,
        options: WireStop,
    },
    VmStatus {
        service: String,
        vm: String,
    },
    RemoveVm {
        service: String,
        vm: String,
    },
    /// Live migration ([`crate::providers::live`]). `how` and `to` may carry the
    /// relocation's key, which is why [`Call`]'s `Debug` of them hides it.
    ReceiveVm {
        service: String,
        spec: VmSpec,
        how: Reception,
    },
    MirrorVm {
        service: String,
        vm: String,
        to: IncomingVm,
    },
    MigrateVm {
        service: String,
        vm: String,
        to: IncomingVm,
        limits: LiveLimits,
    },
    ResumeVm {
        service: String,
        vm: String,
    },
    CancelMirror {
        service: String,
        vm: String,
    },
    /// Pre-copy ([`crate::providers::precopy`]).
    TrackVmDisks {
        service: String,
        vm: String,
        kind: DiskPassKind,
    },
    HaltVm {
        service: String,
        vm: String,
        timeout_ms: u64,
    },
    UntrackVmDisks {
        service: String,
        vm: String,
    },
    FreeBytes,
}

impl Call {
    /// The names the call carries that must be valid component names, with what each is.
    pub fn names(&self) -> Vec<(&'static str, &str)> {
        use Call::*;
        match self {
            Describe | FreeBytes | Operation { .. } => vec![],
            ListVolumes { service } => vec![("service", service)],
            VolumeInfo { service, volume } | DeleteVolume { service, volume } => {
                vec![("service", service), ("volume", volume)]
            }
            CreateVolume { service, spec } => vec![("service", service), ("volume", &spec.name)],
            EnsureBucket { service, bucket }
            | DeleteBucket { service, bucket }
            | ListObjects { service, bucket }
            | ListNonObjects { service, bucket }
            | StatObject {
                service, bucket, ..
            }
            | DeleteObject {
                service, bucket, ..
            }
            | BucketLocation { service, bucket } => {
                vec![("service", service), ("bucket", bucket)]
            }
            StartApp { service, spec } => vec![("service", service), ("app", &spec.name)],
            StopApp { service, app, .. }
            | AppStatus { service, app }
            | AppEndpoint { service, app }
            | RemoveApp { service, app }
            | WriteAppFile { service, app, .. }
            | ReadAppFile { service, app, .. } => vec![("service", service), ("app", app)],
            CheckVm { service, spec }
            | StartVm { service, spec }
            | ReceiveVm { service, spec, .. } => {
                let mut v = vec![("service", service.as_str()), ("vm", spec.name.as_str())];
                v.extend(spec.volumes.iter().map(|n| ("volume", n.as_str())));
                v
            }
            StopVm { service, vm, .. }
            | VmStatus { service, vm }
            | RemoveVm { service, vm }
            | MirrorVm { service, vm, .. }
            | MigrateVm { service, vm, .. }
            | ResumeVm { service, vm }
            | CancelMirror { service, vm }
            | TrackVmDisks { service, vm, .. }
            | HaltVm { service, vm, .. }
            | UntrackVmDisks { service, vm } => vec![("service", service), ("vm", vm)],
        }
    }
}

/// A [`ProviderError`] as it travels: the variant and its fields, so the caller gets back the
/// error the agent's driver gave (`NotFound` stays `NotFound`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    Setup {
        provider: String,
        reason: String,
    },
    Unsupported {
        provider: String,
        driver: String,
        object: String,
        what: String,
    },
    NotFound {
        provider: String,
        object: String,
    },
    Denied {
        provider: String,
        object: String,
        detail: String,
    },
    Unreachable {
        provider: String,
        object: String,
        endpoint: String,
        detail: String,
    },
    Remote {
        provider: String,
        object: String,
        action: String,
        detail: String,
    },
    Conflict {
        provider: String,
        object: String,
        detail: String,
    },
    Invalid {
        provider: String,
        object: String,
        reason: String,
    },
    Io {
        provider: String,
        object: String,
        action: String,
        detail: String,
    },
    Tool {
        provider: String,
        object: String,
        program: String,
        detail: String,
    },
    Unhealthy {
        provider: String,
        object: String,
        timeout_ms: u64,
        attempts: u32,
        last: String,
    },
    MigrationFailed {
        provider: String,
        object: String,
        reason: String,
        timed_out: bool,
    },
    StopTimedOut {
        provider: String,
        object: String,
        waited_ms: u64,
        asked: String,
    },
    OperationFailed {
        provider: String,
        object: String,
        operation: OperationId,
        message: String,
    },
    OperationPending {
        provider: String,
        object: String,
        operation: OperationId,
        waited_ms: u64,
    },
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `&'static str`s a [`ProviderError`] holds, found again by their text.
fn known(s: &str, choices: &[&'static str]) -> &'static str {
    choices
        .iter()
        .find(|c| **c == s)
        .copied()
        .unwrap_or("an unknown")
}

const DRIVERS: &[&str] = &["local", "qemu", "s3", "swift"];
const FEATURES: &[&str] = &[
    "block volumes",
    "object storage",
    "apps",
    "virtual machines",
    "live migration",
    "pre-copy of a running VM",
];
const STOP_ASKS: &[&str] = &["SIGTERM", "the ACPI power button (QMP system_powerdown)"];

impl From<&ProviderError> for WireError {
    fn from(e: &ProviderError) -> Self {
        use ProviderError as P;
        let s = |x: &String| x.clone();
        match e {
            P::Setup { provider, reason } => WireError::Setup {
                provider: s(provider),
                reason: s(reason),
            },
            P::Unsupported {
                provider,
                driver,
                object,
                what,
            } => WireError::Unsupported {
                provider: s(provider),
                driver: driver.to_string(),
                object: s(object),
                what: what.to_string(),
            },
            P::NotFound { provider, object } => WireError::NotFound {
                provider: s(provider),
                object: s(object),
            },
            P::Denied {
                provider,
                object,
                detail,
            } => WireError::Denied {
                provider: s(provider),
                object: s(object),
                detail: s(detail),
            },
            P::Unreachable {
                provider,
                object,
                endpoint,
                detail,
            } => WireError::Unreachable {
                provider: s(provider),
                object: s(object),
                endpoint: s(endpoint),
                detail: s(detail),
            },
            P::Remote {
                provider,
                object,
                action,
                detail,
            } => WireError::Remote {
                provider: s(provider),
                object: s(object),
                action: s(action),
                detail: s(detail),
            },
            P::Conflict {
                provider,
                object,
                detail,
            } => WireError::Conflict {
                provider: s(provider),
                object: s(object),
                detail: s(detail),
            },
            P::Invalid {
                provider,
                object,
                reason,
            } => WireError::Invalid {
                provider: s(provider),
                object: s(object),
                reason: s(reason),
            },
            P::Io {
                provider,
                object,
                action,
                source,
            } => WireError::Io {
                provider: s(provider),
                object: s(object),
                action: s(action),
                detail: source.to_string(),
            },
            P::Tool {
                provider,
                object,
                program,
                detail,
            } => WireError::Tool {
                provider: s(provider),
                object: s(object),
                program: s(program),
                detail: s(detail),
            },
            P::Unhealthy {
                provider,
                object,
                timeout,
                attempts,
                last,
            } => WireError::Unhealthy {
                provider: s(provider),
                object: s(object),
                timeout_ms: ms(*timeout),
                attempts: *attempts,
                last: s(last),
            },
            P::MigrationFailed {
                provider,
                object,
                reason,
                timed_out,
            } => WireError::MigrationFailed {
                provider: s(provider),
                object: s(object),
                reason: s(reason),
                timed_out: *timed_out,
            },
            P::StopTimedOut {
                provider,
                object,
                waited,
                asked,
            } => WireError::StopTimedOut {
                provider: s(provider),
                object: s(object),
                waited_ms: ms(*waited),
                asked: asked.to_string(),
            },
            P::OperationFailed {
                provider,
                object,
                operation,
                message,
            } => WireError::OperationFailed {
                provider: s(provider),
                object: s(object),
                operation: operation.clone(),
                message: s(message),
            },
            P::OperationPending {
                provider,
                object,
                operation,
                waited,
            } => WireError::OperationPending {
                provider: s(provider),
                object: s(object),
                operation: operation.clone(),
                waited_ms: ms(*waited),
            },
        }
    }
}

impl From<WireError> for ProviderError {
    fn from(w: WireError) -> Self {
        use ProviderError as P;
        match w {
            WireError::Setup { provider, reason } => P::Setup { provider, reason },
            WireError::Unsupported {
                provider,
                driver,
                object,
                what,
            } => P::Unsupported {
                provider,
                driver: known(&driver, DRIVERS),
                object,
                what: known(&what, FEATURES),
            },
            WireError::NotFound { provider, object } => P::NotFound { provider, object },
            WireError::Denied {
                provider,
                object,
                detail,
            } => P::Denied {
                provider,
                object,
                detail,
            },
            WireError::Unreachable {
                provider,
                object,
                endpoint,
                detail,
            } => P::Unreachable {
                provider,
                object,
                endpoint,
                detail,
            },
            WireError::Remote {
                provider,
                object,
                action,
                detail,
            } => P::Remote {
                provider,
                object,
                action,
                detail,
            },
            WireError::Conflict {
                provider,
                object,
                detail,
            } => P::Conflict {
                provider,
                object,
                detail,
            },
            WireError::Invalid {
                provider,
                object,
                reason,
            } => P::Invalid {
                provider,
                object,
                reason,
            },
            WireError::Io {
                provider,
                object,
                action,
                detail,
            } => P::Io {
                provider,
                object,
                action,
                source: std::io::Error::other(detail),
            },
            WireError::Tool {
                provider,
                object,
                program,
                detail,
            } => P::Tool {
                provider,
                object,
                program,
                detail,
            },
            WireError::Unhealthy {
                provider,
                object,
                timeout_ms,
                attempts,
                last,
            } => P::Unhealthy {
                provider,
                object,
                timeout: Duration::from_millis(timeout_ms),
                attempts,
                last,
            },
            WireError::MigrationFailed {
                provider,
                object,
                reason,
                timed_out,
            } => P::MigrationFailed {
                provider,
                object,
                reason,
                timed_out,
            },
            WireError::StopTimedOut {
                provider,
                object,
                waited_ms,
                asked,
            } => P::StopTimedOut {
                provider,
                object,
                waited: Duration::from_millis(waited_ms),
                asked: known(&asked, STOP_ASKS),
            },
            WireError::OperationFailed {
                provider,
                object,
                operation,
                message,
            } => P::OperationFailed {
                provider,
                object,
                operation,
                message,
            },
            WireError::OperationPending {
                provider,
                object,
                operation,
                waited_ms,
            } => P::OperationPending {
                provider,
                object,
                operation,
                waited: Duration::from_millis(waited_ms),
            },
        }
    }
}

/// Where an agent's viaduct receiver is reached, and the secret senders prove they hold.
/// The daemon asks the target's agent for it and hands it to the source's agent; the secret
/// travels only inside the daemon's TLS connections, and is never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverInfo {
    /// `host:port`.
    pub addr: String,
    /// The name the receiver's certificate carries for that host.
    pub server_name: String,
    /// 32 random bytes, hex.
    pub secret: String,
}

impl std::fmt::Debug for ReceiverInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverInfo")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("secret", &"(hidden)")
            .finish()
    }
}

/// Send one of a provider's volumes to another agent's receiver, staged there as `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendVolume {
    pub provider: String,
    pub service: String,
    pub volume: String,
    pub to: ReceiverInfo,
    /// The staged image's name at the receiver (see [`staged_name`]).
    pub name: String,
    /// Parallel streams; default the viaduct's.
    pub streams: Option<usize>,
    /// Cap on the bytes put on the wire per second.
    pub max_bytes_per_sec: Option<u64>,
}

/// A [`SendVolume`] of the staging image a pre-copy pass of the volume's VM read on the
/// agent's host (its name under the agent's pre-copy directory, [`precopy_staging_name`])
/// rather than the volume's own image, which the running guest writes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendStaging {
    pub send: SendVolume,
    pub staging: String,
}

/// The name a volume's image is staged under at a receiving agent while it moves: one per
/// relocation, provider, service and volume.
pub fn staged_name(relocation: &str, provider: &str, service: &str, volume: &str) -> String {
    format!(
        "{}/{provider}.{service}.{volume}.img",
        safe_relocation(relocation)
    )
}

/// A relocation's id as a directory name.
fn safe_relocation(relocation: &str) -> String {
    relocation
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The name of the raw staging image a pre-copy reads a disk into on the source's host: one
/// per relocation, provider, service and volume.
pub fn precopy_staging_name(
    relocation: &str,
    provider: &str,
    service: &str,
    volume: &str,
) -> String {
    format!(
        "{}/{provider}.{service}.{volume}.precopy.raw",
        safe_relocation(relocation)
    )
}

/// Read one pass of a pre-copy of VM `vm` on the agent's host, where its emulator's NBD
/// export is, into a raw staging image per disk ([`precopy_staging_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecopyPass {
    pub provider: String,
    pub service: String,
    pub vm: String,
    /// The relocation's id, which names the staging images.
    pub relocation: String,
    pub kind: DiskPassKind,
    /// After the pass, compare each staging image with the halted guest's disk (a
    /// [`DiskPassKind::Final`] pass only).
    pub compare: bool,
}

/// What a pass read of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassedDisk {
    pub volume: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// Whether the pass read only what a dirty bitmap marked (else the whole disk, into a
    /// fresh staging image).
    pub incremental: bool,
    pub bytes_read: u64,
    /// The staging image's name ([`precopy_staging_name`]).
    pub staging: String,
    /// How the staging image was checked against the source disk, when it was.
    pub verified: Option<String>,
}

/// A pass read on the source's host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassReport {
    pub disks: Vec<PassedDisk>,
}

/// What a finished send carried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentReport {
    pub image_bytes: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub chunks_total: u64,
    pub chunks_sent: u64,
    pub chunks_skipped_zero: u64,
    pub chunks_skipped_equal: u64,
    /// The image digest both agents agreed on, hex.
    pub digest: String,
    pub seconds: f64,
    pub streams: usize,
}

/// A send as its agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TransferState {
    Running {
        chunks_total: u64,
        chunks_done: u64,
        bytes_read: u64,
        bytes_sent: u64,
    },
    Done {
        report: SentReport,
    },
    Failed {
        error: String,
    },
}

/// A started send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferId {
    pub id: String,
}

/// Make the image staged as `name` the provider's volume, in `target_format`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptVolume {
    pub provider: String,
    pub service: String,
    pub volume: String,
    pub name: String,
    /// The staged image's format (the source volume's).
    pub format: DiskFormat,
    /// The size the guest sees.
    pub size_bytes: u64,
    /// The digest the send reported for the staged image, hex: checked before anything is
    /// written into the volume.
    pub digest: String,
}

/// How a staged image became the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adopted {
    /// `viaduct (local)` or `qemu-img convert`.
    pub method: String,
    pub verified: String,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Remove what is staged under a relocation's prefix (after the commit or the rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discard {
    pub name: String,
    /// A pre-copy's staging image on this (the source's) host, not an image received.
    /// Left out when false, so that an agent of the release before reads every other
    /// discard as it did.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub precopy: bool,
}

/// Copy a bucket of another agent's provider into a bucket of this agent's: the receiving
/// agent reads the objects from the sending one itself (which lets agents read objects, and
/// nothing else), so they go host to host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullBucket {
    /// This agent's provider, service and bucket (created when missing).
    pub provider: String,
    pub service: String,
    pub bucket: String,
    /// Where the objects are: `https://HOST:PORT` of the other agent, and its provider.
    pub from_agent: String,
    pub from_provider: String,
    pub concurrency: usize,
    pub max_bytes_per_sec: Option<u64>,
    /// What an earlier copy between the same buckets learned.
    #[serde(default)]
    pub known: crate::providers::copier::KnownHashes,
}

/// A started pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullId {
    pub id: String,
}

/// A pull as its agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PullState {
    Running {
        progress: Option<crate::providers::copier::BucketProgress>,
    },
    Done {
        report: Box<crate::providers::copier::BucketCopyReport>,
        known: crate::providers::copier::KnownHashes,
    },
    Failed {
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{LiveKey, SocketAddress};

    /// Regression: `precopy: false` went on the wire in every discard, and an agent of the
    /// release before (which refuses unknown fields) refused them all.
    #[test]
    fn an_ordinary_discard_reads_as_the_release_before_wrote_it() {
        let plain = Discard {
            name: "r/x".into(),
            precopy: false,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({ "name": "r/x" })
        );
        let staging = Discard {
            name: "r/x".into(),
            precopy: true,
        };
        let back: Discard =
            serde_json::from_value(serde_json::to_value(&staging).unwrap()).unwrap();
        assert_eq!(back, staging);
    }

    #[test]
    fn a_migration_call_travels_whole_and_prints_no_key() {
        let key = LiveKey::random();
        let to = IncomingVm {
            migration: SocketAddress::Tcp {
                host: "10.0.0.3".into(),
                port: 40001,
            },
            nbd: SocketAddress::Tcp {
                host: "10.0.0.3".into(),
                port: 40002,
            },
            exports: vec!["disk0".into()],
            key: Some(key.clone()),
        };
        let call = Call::MigrateVm {
            service: "box".into(),
            vm: "guest".into(),
            to,
            limits: LiveLimits {
                downtime_limit: Duration::from_millis(300),
                timeout: Duration::from_secs(60),
                max_bytes_per_sec: None,
            },
        };
        let json = serde_json::to_string(&call).unwrap();
        assert_eq!(serde_json::from_str::<Call>(&json).unwrap(), call);
        assert!(!format!("{call:?}").contains(&key.to_hex()));
        assert_eq!(call.names(), [("service", "box"), ("vm", "guest")]);
    }

    #[test]
    fn the_precopy_calls_travel_whole_and_name_their_vm() {
        for call in [
            Call::TrackVmDisks {
                service: "box".into(),
                vm: "guest".into(),
                kind: DiskPassKind::Final,
            },
            Call::HaltVm {
                service: "box".into(),
                vm: "guest".into(),
                timeout_ms: 60_000,
            },
            Call::UntrackVmDisks {
                service: "box".into(),
                vm: "guest".into(),
            },
        ] {
            let json = serde_json::to_string(&call).unwrap();
            assert_eq!(serde_json::from_str::<Call>(&json).unwrap(), call, "{json}");
            assert_eq!(call.names(), [("service", "box"), ("vm", "guest")]);
        }
        // A relocation's id cannot lead a staging image out of its directory.
        assert_eq!(
            precopy_staging_name("../x/y", "qa", "box", "guest"),
            "___x_y/qa.box.guest.precopy.raw"
        );
        let unsupported = ProviderError::Unsupported {
            provider: "qa".into(),
            driver: "local",
            object: "vm `box/guest`".into(),
            what: "pre-copy of a running VM",
        };
        let back: ProviderError = WireError::from(&unsupported).into();
        assert_eq!(back.to_string(), unsupported.to_string());
    }

    #[test]
    fn a_failed_migration_keeps_its_kind_across_the_wire() {
        let e = ProviderError::MigrationFailed {
            provider: "q2".into(),
            object: "vm `box/guest`".into(),
            reason: "did not converge".into(),
            timed_out: true,
        };
        let back: ProviderError = WireError::from(&e).into();
        assert!(matches!(
            back,
            ProviderError::MigrationFailed {
                timed_out: true,
                ..
            }
        ));
    }
}
