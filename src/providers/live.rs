//! What the two ends of a live VM migration tell each other: the target's
//! [`IncomingVm`] (where the memory stream and the disk mirrors go), the
//! [`LiveLimits`] the source migrates under and the [`MigrationReport`] it returns.
//!
//! The sequence, driven by the conduit through [`super::Provider`]:
//!
//! 1. [`super::Provider::receive_vm`] at the target: the VM starts paused, waiting for an
//!    incoming migration; its disks (created empty beforehand) are exported writable over NBD.
//! 2. [`super::Provider::mirror_vm`] at the source: every disk is mirrored into the target's
//!    export while the guest runs; the call returns once every mirror is in step.
//! 3. [`super::Provider::migrate_vm`] at the source: memory and device state travel while
//!    the guest runs; QEMU pauses the guest for the last pass (bounded by
//!    [`LiveLimits::downtime_limit`]), the mirrors drain, and the source stays paused.
//! 4. [`super::Provider::resume_vm`] at the target: the guest goes on there, without a reboot.
//!
//! A migration that does not finish within [`LiveLimits::timeout`] is cancelled and the
//! guest runs on at the source; [`super::Provider::resume_vm`] at the source also undoes a
//! completed migration as long as the target has not run.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a socket of a VM's emulator listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SocketAddress {
    /// A unix socket on the host of both ends.
    Unix { path: String },
    /// A TCP address.
    Tcp { host: String, port: u16 },
}

impl SocketAddress {
    /// The address as QMP's `SocketAddress` (flat form, as `blockdev-add` takes it).
    pub fn to_qmp(&self) -> serde_json::Value {
        match self {
            SocketAddress::Unix { path } => serde_json::json!({ "type": "unix", "path": path }),
            SocketAddress::Tcp { host, port } => {
                serde_json::json!({ "type": "inet", "host": host, "port": port.to_string() })
            }
        }
    }

    /// The address as a migration URI (`unix:PATH`, `tcp:HOST:PORT`).
    pub fn to_uri(&self) -> String {
        match self {
            SocketAddress::Unix { path } => format!("unix:{path}"),
            SocketAddress::Tcp { host, port } => format!("tcp:{host}:{port}"),
        }
    }
}

/// A VM waiting at the target for a live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingVm {
    /// Where the source sends memory and device state.
    pub migration: SocketAddress,
    /// The NBD server holding the VM's disks, writable.
    pub nbd: SocketAddress,
    /// The export of each disk, in the VM's disk order (its boot disk first).
    pub exports: Vec<String>,
}

/// How a live migration may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveLimits {
    /// The longest pause QEMU may plan for its last pass (`downtime-limit`).
    pub downtime_limit: Duration,
    /// How long the memory migration may take before it is cancelled.
    pub timeout: Duration,
    /// Bytes per second the memory stream may use; `None` for as fast as it goes.
    pub max_bytes_per_sec: Option<u64>,
}

/// What a finished live migration measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// From the start of the memory migration to its end, as QEMU counted.
    pub total_ms: u64,
    /// The pause of the last pass, as QEMU counted.
    pub qemu_downtime_ms: u64,
    /// From the guest's pause to the mirrors having drained, as measured here (includes
    /// the last pass).
    pub paused_ms: u64,
    /// Bytes of memory sent.
    pub memory_bytes: u64,
    /// Guest memory size.
    pub memory_total_bytes: u64,
    /// Passes over guest memory (QEMU's `dirty-sync-count`).
    pub passes: u64,
    /// Pages dirtied per second at the last look.
    pub dirty_pages_rate: u64,
    /// Bytes of disk the mirrors covered.
    pub disk_bytes: u64,
}

/// What the mirrors of a VM's disks covered once they were in step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorReport {
    /// Bytes of disk the mirrors copied.
    pub disk_bytes: u64,
    /// How long until every mirror was in step.
    pub seconds: f64,
}
