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
//!
//! Between hosts ([`Reception::Network`]) the two emulators talk directly, host to host:
//! the target listens on TCP on its host's address toward the source, and both streams (the
//! disk mirrors' NBD and the memory stream) run under TLS with a pre-shared [`LiveKey`] the
//! daemon makes for the relocation and hands to both ends inside its own mutual-TLS calls.
//! On one host they use unix sockets in the VM's directory, which nobody else reads.

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
            SocketAddress::Tcp { host, port } if host.contains(':') => {
                format!("tcp:[{host}]:{port}")
            }
            SocketAddress::Tcp { host, port } => format!("tcp:{host}:{port}"),
        }
    }
}

/// The pre-shared key both emulators of a live migration between hosts prove they hold
/// (TLS-PSK, for the NBD and the migration streams): 32 random bytes. It travels as hex,
/// only inside the daemon's mutual-TLS calls to the agents; its `Debug` hides it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LiveKey([u8; 32]);

impl LiveKey {
    /// A fresh key from the system's random source.
    pub fn random() -> LiveKey {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the system's random source");
        LiveKey(bytes)
    }

    /// The key as 64 hex digits (what QEMU's `keys.psk` holds after the user name).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a text is not a [`LiveKey`].
#[derive(Debug, thiserror::Error)]
#[error("a live migration key is 64 hex digits")]
pub struct BadLiveKey;

impl TryFrom<String> for LiveKey {
    type Error = BadLiveKey;

    fn try_from(s: String) -> Result<Self, BadLiveKey> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadLiveKey);
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BadLiveKey)?;
        }
        Ok(LiveKey(bytes))
    }
}

impl From<LiveKey> for String {
    fn from(k: LiveKey) -> String {
        k.to_hex()
    }
}

impl std::fmt::Debug for LiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveKey(hidden)")
    }
}

/// How the target's emulator is reached by the source's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reception {
    /// Both ends on this host: unix sockets in the VM's directory, in clear.
    Local,
    /// The source is on another host: TCP on `host` (an address of the target's host the
    /// source reaches), both streams under TLS with `key`.
    Network { host: String, key: LiveKey },
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
    /// The key of a migration between hosts, for the source's side: the target never
    /// answers with it (so it lands in no journal); the daemon adds it before it hands the
    /// address to the source. An emulator refuses to send to a TCP address without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<LiveKey>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_travels_as_hex_and_is_never_printed() {
        let key = LiveKey::random();
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{}\"", key.to_hex()));
        assert_eq!(serde_json::from_str::<LiveKey>(&json).unwrap(), key);
        assert!(!format!("{key:?}").contains(&key.to_hex()));
        let how = Reception::Network {
            host: "10.0.0.2".into(),
            key: key.clone(),
        };
        assert!(!format!("{how:?}").contains(&key.to_hex()));
        assert!(serde_json::from_str::<LiveKey>("\"abc\"").is_err());
        assert!(serde_json::from_str::<LiveKey>(&format!("\"{}\"", "zz".repeat(32))).is_err());
    }

    #[test]
    fn the_target_answers_without_a_key() {
        let incoming = IncomingVm {
            migration: SocketAddress::Tcp {
                host: "::1".into(),
                port: 4000,
            },
            nbd: SocketAddress::Unix { path: "/x".into() },
            exports: vec!["disk0".into()],
            key: None,
        };
        let v = serde_json::to_value(&incoming).unwrap();
        assert!(v.get("key").is_none());
        assert_eq!(incoming.migration.to_uri(), "tcp:[::1]:4000");
    }
}
