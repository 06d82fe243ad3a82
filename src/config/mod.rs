//! Configuration: a TOML file parsed into [`raw::RawConfig`] (unknown keys are errors), then
//! validated into [`Config`]. Validation collects every problem at once; each
//! [`ConfigError`] names the key path and, where the file has it, `file:line:column`.
//!
//! Relative paths in the file are resolved against the file's own directory, so an example
//! configuration works from wherever the daemon is started.

pub mod raw;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::model::{ComponentKind, RegionInfo, Requirements};
use raw::*;

/// The validated configuration. Every field has already been checked.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    pub daemon: DaemonSettings,
    pub broker: BrokerSettings,
    pub conduit: ConduitSettings,
    /// Optional region table that extends or replaces rows of the shipped one.
    pub regions_file: Option<PathBuf>,
    pub providers: BTreeMap<String, Provider>,
    pub policies: BTreeMap<String, PolicySpec>,
    pub services: BTreeMap<String, ServiceSpec>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    /// Where the decision log, feed cache and journal live. Default `/var/lib/fluidcloud`,
    /// or `$STATE_DIRECTORY` when systemd sets it.
    pub state_dir: PathBuf,
    /// HTTP API and `/metrics`. Default `127.0.0.1:7480`.
    pub listen: SocketAddr,
    /// Bearer token file. Default: `$CREDENTIALS_DIRECTORY/api-token` when set.
    pub api_token_file: Option<PathBuf>,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when `$JOURNAL_STREAM` says stderr is the journal, text otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerSettings {
    /// Cron schedule (with seconds) of policy evaluation. Default every minute.
    pub evaluate_schedule: String,
    pub max_concurrent_relocations: u32,
    pub max_relocations_per_window: u32,
    pub relocation_window: Duration,
    /// A tick that would relocate more than this share of all services relocates none.
    pub max_relocations_percent: f64,
    /// Wall-clock limit of one policy evaluation.
    pub policy_timeout: Duration,
    /// Rhai operation limit of one policy evaluation.
    pub max_policy_operations: u64,
}

/// How relocations run.
#[derive(Debug, Clone, Serialize)]
pub struct ConduitSettings {
    /// How long the source is kept, stopped but intact, after the target passed its health
    /// check; it is deleted after that. Default one hour.
    pub grace_period: Duration,
    /// How long an app gets to stop after SIGTERM at cutover. Default 30 s.
    pub stop_timeout: Duration,
    /// Kill an app that has not stopped by then. Default false: the relocation fails and
    /// the source keeps running.
    pub kill_after_stop_timeout: bool,
    /// Health-check deadline for a target of a service without its own `health_check`
    /// timeout. Default 60 s.
    pub health_timeout: Duration,
    /// Objects a bucket copy moves at the same time (`bucket_concurrency`, 1 to 256).
    /// Default 8.
    pub bucket_concurrency: usize,
    /// Cap on what a bucket copy reads per second (`bucket_max_mib_per_sec`). Default none.
    pub bucket_max_bytes_per_sec: Option<u64>,
    /// Volume and bucket copies of one relocation phase that run at the same time
    /// (`transfer_concurrency`, 1 to 64). Default 4.
    pub transfer_concurrency: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    pub name: String,
    pub driver: Driver,
    /// The cloud the region belongs to, for the region table; `None` matches any.
    pub cloud: Option<String>,
    pub region: String,
    pub root: Option<PathBuf>,
    /// Format new volumes get at this provider (a relocation converts to it). Default raw.
    pub disk_format: DiskFormat,
    pub pricing: Option<PricingSource>,
    pub benchmark: Option<BenchmarkSource>,
    /// Overrides of the shipped region table for this provider.
    pub region_overrides: Option<RawRegionOverride>,
    /// Settings of the `s3` and `swift` drivers; `None` for the others.
    pub object_store: Option<ObjectStoreSettings>,
    /// Settings of the `qemu` driver; `None` for the others.
    pub qemu: Option<QemuSettings>,
}

/// Settings of the `qemu` driver (`[providers.NAME.qemu]`). The provider's `root` holds its
/// disk pool and the runtime state of its VMs; `disk_format` is the format of the pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuSettings {
    /// The emulator (`binary`): a path (relative to the configuration file) or a name looked
    /// up in `PATH`. Default: `$FLUIDCLOUD_QEMU_SYSTEM` when set when the driver opens, else
    /// `qemu-system-x86_64`.
    pub binary: Option<PathBuf>,
    /// Extra firmware directories (`firmware_dirs`), passed as `-L` before qemu's own.
    pub firmware_dirs: Vec<PathBuf>,
    /// `LD_LIBRARY_PATH` of the emulator (`library_path`), for a qemu unpacked outside the
    /// system's library directories. Default: none.
    pub library_path: Vec<PathBuf>,
    /// `accel`: default auto.
    pub accel: Accel,
    /// How disks are attached (`disk_bus`). Default virtio.
    pub disk_bus: DiskBus,
    /// The emulated network card (`nic_model`), or `none` for no network. Default
    /// `virtio-net-pci`.
    pub nic_model: String,
    /// Least time a guest gets to power down after the ACPI power button
    /// (`powerdown_timeout_secs`); a stop waits the longer of this and the caller's
    /// timeout. Default 60 s.
    pub powerdown_timeout: Duration,
}

/// Which accelerator runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and a probe guest runs under it, else TCG.
    Auto,
    Kvm,
    /// Emulation: slow, but works everywhere.
    Tcg,
}

impl Accel {
    pub const NAMES: &'static [&'static str] = &["auto", "kvm", "tcg"];

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How a VM's disks are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk: `/dev/vdX` in a Linux guest.
    Virtio,
    /// The PIIX IDE controller (at most four disks).
    Ide,
    /// virtio-scsi with `scsi-hd` disks.
    Scsi,
    /// An AHCI controller with SATA disks (at most six).
    Sata,
}

impl DiskBus {
    pub const NAMES: &'static [&'static str] = &["virtio", "ide", "scsi", "sata"];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Ide => "ide",
            DiskBus::Scsi => "scsi",
            DiskBus::Sata => "sata",
        }
    }
}

/// Network cards `nic_model` accepts: what qemu-system-x86_64 emulates with a driver in
/// common guests, and `none`.
pub const NIC_MODELS: &[&str] = &[
    "virtio-net-pci",
    "e1000",
    "e1000e",
    "rtl8139",
    "vmxnet3",
    "pcnet",
    "ne2k_pci",
    "none",
];

/// Where an object store is and how to log in to it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectStoreSettings {
    S3(S3Settings),
    Swift(SwiftSettings),
}

/// Settings of the `s3` driver (`[providers.NAME.s3]`).
#[derive(Debug, Clone, Serialize)]
pub struct S3Settings {
    /// Base URL of the S3 API (`endpoint`). Default `https://s3.<region>.amazonaws.com`.
    pub endpoint: String,
    /// Region requests are signed for (`region`). Default: the provider's region.
    pub region: String,
    /// Address buckets as `ENDPOINT/BUCKET/KEY` instead of `BUCKET.ENDPOINT/KEY`
    /// (`path_style`). Default false; most servers other than AWS need true.
    pub path_style: bool,
    /// The remote name of a service's bucket (`bucket_name`): `{service}` and `{bucket}` are
    /// replaced by the names. Default [`DEFAULT_REMOTE_NAME`].
    pub bucket_name: String,
    pub credentials: CredentialsSource,
    /// Objects larger than this are uploaded in parts of this size (`part_size_mib`, 5 to
    /// 5120). Default 16 MiB.
    pub part_size: u64,
    /// Limit of one request, and of silence while data moves (`timeout_secs`). Default 60 s.
    pub timeout: Duration,
}

/// How the `swift` driver logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwiftAuth {
    /// Swift's own v1 login (`GET AUTH_URL` with `X-Auth-User`/`X-Auth-Key`): tempauth,
    /// swauth, and the v1 endpoints of many hosted Swift offers.
    Tempauth,
    /// Keystone v3 password login, scoped to a project; the storage URL comes from the
    /// service catalog.
    Keystone,
}

/// Settings of the `swift` driver (`[providers.NAME.swift]`).
#[derive(Debug, Clone, Serialize)]
pub struct SwiftSettings {
    /// Where to log in (`auth_url`): `…/auth/v1.0` for tempauth, `…/v3` for Keystone.
    pub auth_url: String,
    /// `auth`: default `keystone` when the URL ends in `/v3`, else `tempauth`.
    pub auth: SwiftAuth,
    /// Keystone: catalog region of the object-store endpoint (`region`). Default: the
    /// provider's region.
    pub region: String,
    /// Keystone: which endpoint of the catalog to use (`interface`): public, internal or
    /// admin. Default public.
    pub interface: String,
    /// Keystone: the project to scope the token to (`project_name`); required there.
    pub project_name: Option<String>,
    /// Keystone: default `Default`.
    pub project_domain_name: String,
    /// Keystone: default `Default`.
    pub user_domain_name: String,
    /// The remote name of a service's bucket (`container_name`), as for S3. Default
    /// [`DEFAULT_REMOTE_NAME`].
    pub container_name: String,
    pub credentials: CredentialsSource,
    /// Objects larger than this are uploaded as a static large object in segments of this
    /// size (`part_size_mib`, 5 to 5120). Default 16 MiB.
    pub part_size: u64,
    /// As for S3. Default 60 s.
    pub timeout: Duration,
}

/// Where an object store's secret comes from: `credentials_file`, else
/// `$CREDENTIALS_DIRECTORY/provider-<name>` (systemd's `LoadCredential=`), looked up when
/// the driver opens.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialsSource {
    pub file: Option<PathBuf>,
    /// The section of the file to read (`credentials_profile`); default: top-level keys,
    /// else the `default` section.
    pub profile: Option<String>,
}

/// The default remote name of a service's bucket. Names never contain `--` in a way that
/// could make two pairs meet (see `providers::objstore`).
pub const DEFAULT_REMOTE_NAME: &str = "{service}--{bucket}";

/// Checks a remote name template: exactly one `{service}` and one `{bucket}`, with text
/// between them, and no other braces. Returns the reason it is refused.
pub fn check_remote_name_template(template: &str) -> Result<(), String> {
    let count = |p: &str| template.matches(p).count();
    if count("{service}") != 1 || count("{bucket}") != 1 {
        return Err(format!(
            "`{template}` must hold `{{service}}` and `{{bucket}}` once each, so that every bucket gets a name of its own"
        ));
    }
    let rest = template.replace("{service}", "").replace("{bucket}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{template}` holds braces other than `{{service}}` and `{{bucket}}`"
        ));
    }
    let (s, b) = (
        template.find("{service}").unwrap_or(0),
        template.find("{bucket}").unwrap_or(0),
    );
    let between = if s < b {
        &template[s + "{service}".len()..b]
    } else {
        &template[b + "{bucket}".len()..s]
    };
    if between.is_empty() {
        return Err(format!(
            "`{template}` needs a separator between `{{service}}` and `{{bucket}}`, e.g. `--`"
        ));
    }
    Ok(())
}

/// Region facts given in the configuration; `None` keeps the table's value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RawRegionOverride {
    pub country: Option<String>,
    pub subdivision: Option<String>,
    pub eu: Option<bool>,
    pub eea: Option<bool>,
    pub tags: Option<Vec<String>>,
}

impl RawRegionOverride {
    pub fn apply(&self, base: &mut RegionInfo) {
        if let Some(v) = &self.country {
            base.country = v.clone();
        }
        if let Some(v) = &self.subdivision {
            base.subdivision = v.clone();
        }
        if let Some(v) = self.eu {
            base.eu = v;
        }
        if let Some(v) = self.eea {
            base.eea = v;
        }
        if let Some(v) = &self.tags {
            base.tags = v.clone();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Local,
    Qemu,
    S3,
    Swift,
}

impl Driver {
    pub const NAMES: &'static [&'static str] = &["local", "qemu", "s3", "swift"];
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => Driver::Local,
            "qemu" => Driver::Qemu,
            "s3" => Driver::S3,
            "swift" => Driver::Swift,
            _ => return None,
        })
    }
}

/// A disk image format, as `qemu-img` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl DiskFormat {
    pub const NAMES: &'static [&'static str] = &["raw", "qcow2", "vmdk", "vhdx"];
    pub const ALL: [DiskFormat; 4] = [
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vmdk,
        DiskFormat::Vhdx,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => DiskFormat::Raw,
            "qcow2" => DiskFormat::Qcow2,
            "vmdk" => DiskFormat::Vmdk,
            "vhdx" => DiskFormat::Vhdx,
            _ => return None,
        })
    }

    /// The name `qemu-img -f`/`-O` takes, also used as the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PricingFormat {
    /// AWS price-list bulk offer file (`products` + `terms.OnDemand`).
    Aws,
    /// Azure Retail Prices API (`Items` + `NextPageLink`).
    Azure,
    /// Our normalised catalogue, CSV.
    Csv,
    /// Our normalised catalogue, JSON (an array of rows or `{"offers": [...]}`).
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct PricingSource {
    pub format: PricingFormat,
    /// `file://`, `http://` or `https://`.
    pub url: String,
    pub schedule: String,
    /// A cached download younger than this is used without fetching again.
    pub ttl: Duration,
    /// Prices older than this do not justify a relocation (stale-data guard).
    pub max_age: Duration,
    pub timeout: Duration,
    /// A feed larger than this is refused.
    pub max_bytes: u64,
    /// Catalogue rows whose `provider` column equals this are taken.
    pub catalogue_provider: String,
    /// Rows whose region equals this are taken.
    pub feed_region: String,
    pub currency: String,
    /// Applied where the feed does not carry a storage price.
    pub storage_price_per_gib_month: Option<f64>,
    /// Applied where the feed does not carry an egress price.
    pub egress_price_per_gib: Option<f64>,
    /// Prices above this are rejected as absurd.
    pub max_price_per_hour: f64,
    /// A price that falls by more than this share since the last good poll is a market
    /// shock: held out of decisions until `price_drop_confirmations` polls in a row saw it.
    pub max_price_drop_ratio: f64,
    /// Consecutive polls that must see a shocked price before it is trusted (1: at once).
    pub price_drop_confirmations: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkSource {
    pub schedule: String,
    pub max_age: Duration,
    pub timeout: Duration,
    pub kind: BenchmarkKind,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BenchmarkKind {
    Builtin {
        path: PathBuf,
        file_size_mib: u64,
        random_reads: u64,
    },
    Command {
        command: Vec<String>,
        map: BenchmarkMap,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkMap {
    pub seq_write_mb_s: Option<String>,
    pub seq_read_mb_s: Option<String>,
    pub rand_read_iops: Option<String>,
    pub rand_read_latency_seconds: Option<String>,
    pub bandwidth_scale: f64,
    pub latency_scale: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decide and log, never act.
    Audit,
    /// Decide, log, and wait for an operator to approve through the API.
    Approve,
    /// Decide and relocate.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Approve => "approve",
            Mode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicySpec {
    pub name: String,
    pub file: PathBuf,
    pub mode: Mode,
    /// Required `(current − target) / current` monthly cost, unless the policy's reason is
    /// not about cost (see the README). Default 0.10.
    pub min_improvement_ratio: f64,
    /// Consecutive evaluations that must ask for the same target. Default 3.
    pub confirmations: u32,
    pub min_residency: Duration,
    pub cooldown: Duration,
    pub break_even_horizon_days: f64,
    pub expected_downtime: Duration,
    pub move_duration: Duration,
    pub downtime_cost_per_hour: f64,
    pub blackouts: Vec<Blackout>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Blackout {
    pub cron: String,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub provider: String,
    pub policy: String,
    pub flavor: Option<String>,
    pub requirements: Requirements,
    pub pinned: bool,
    pub health_check: Option<HealthCheck>,
    pub components: Vec<Component>,
    /// Repoints clients (DNS record, floating IP, proxy) at the relocated service; called
    /// again with phase `rollback` to point them back.
    pub cutover: Option<HookSpec>,
    /// Hands environment data to the relocated instance, after the conduit wrote its
    /// context file.
    pub recontextualise: Option<HookSpec>,
}

impl ServiceSpec {
    /// Bytes a relocation carries (volumes, VM disks, buckets not kept at the source).
    pub fn bytes_to_move(&self) -> u64 {
        self.components
            .iter()
            .filter(|c| !(c.kind == ComponentKind::Bucket && c.keep_at_source))
            .map(|c| (c.size_gib * GIB) as u64)
            .sum()
    }

    /// GiB of block storage the service keeps at its provider.
    pub fn storage_gib(&self) -> f64 {
        self.components
            .iter()
            .filter(|c| matches!(c.kind, ComponentKind::Vm | ComponentKind::Volume))
            .map(|c| c.size_gib)
            .sum()
    }
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, Clone, Serialize)]
pub struct HealthCheck {
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub timeout: Duration,
}

/// A program or webhook the conduit calls at one step of a relocation
/// (`[services.NAME.cutover]`, `[services.NAME.recontextualise]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookSpec {
    pub target: HookTarget,
    /// The hook is stopped (a command's whole process group killed) after this. Default 30 s.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HookTarget {
    /// Run without a shell; a program path with a `/` is resolved against the configuration's
    /// directory, a bare name is looked up in `PATH`.
    Command {
        argv: Vec<String>,
        /// The configuration's directory, where the command runs.
        workdir: PathBuf,
    },
    /// An HTTP POST of the event as JSON.
    Webhook {
        url: String,
        /// Holds the bearer token sent in `Authorization`.
        token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub kind: ComponentKind,
    pub name: String,
    pub size_gib: f64,
    /// A bucket that stays where it is when the service moves: kept at the service's
    /// provider, or at its own `home`.
    pub keep_at_source: bool,
    /// The provider a bucket lives at when not the service's own (`provider` of the
    /// component); such a bucket is kept there.
    pub home: Option<String>,
    pub settings: toml::Table,
}

impl Component {
    /// A bucket's `settings.skip_special_files`: a relocation leaves the bucket's entries
    /// that are not objects (symbolic links, special files) behind at the source instead of
    /// refusing to start. Off by default.
    pub fn skip_special_files(&self) -> bool {
        self.settings
            .get("skip_special_files")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
    }
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, where known.
    pub location: Option<(usize, usize)>,
    /// Dotted key path, e.g. `services.shop.provider`; empty for syntax errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.location {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// All problems of one file; displays one per line.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        // An absolute path makes every relative path in the file absolute too, so the daemon
        // does not depend on its working directory after start.
        let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                location: None,
                key: String::new(),
                message: format!("cannot read the configuration file: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text` as if read from `path`. Every problem is reported: a
    /// syntax error stops the reading, but unknown keys and values of the wrong type are
    /// collected and the rest of the file is still validated.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let locator = Locator::new(path, text);
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let location = e.span().map(|s| locator.line_col(s.start));
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                location,
                key: String::new(),
                message: e.message().trim().to_string(),
            }])
        })?;
        let (raw, refused) = raw::read_all(table);
        let mut errors: Vec<ConfigError> = refused
            .into_iter()
            .map(|r| ConfigError {
                file: PathBuf::new(),
                location: if r.unknown_key {
                    locator.find_key(&r.key)
                } else {
                    locator.find(&r.key)
                },
                key: r.key,
                message: r.message,
            })
            .collect();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut v = Validator {
            locator: &locator,
            base: &base,
            errors: Vec::new(),
        };
        let config = raw.map(|raw| v.config(path, raw));
        // A key refused while reading is not reported a second time (as missing, or as what
        // its table then lacks).
        let refused: BTreeSet<String> = errors.iter().map(|e| e.key.clone()).collect();
        let follows_from_refused = |key: &str| {
            refused.iter().any(|r| {
                r == key
                    || r.strip_prefix(key)
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            })
        };
        errors.extend(
            v.errors
                .into_iter()
                .filter(|e| !follows_from_refused(&e.key)),
        );
        for e in &mut errors {
            e.file = path.to_path_buf();
        }
        // In the order of the file; problems without a place last.
        errors.sort_by_key(|e| e.location.unwrap_or((usize::MAX, 0)));
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// Where pricing downloads are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.daemon.state_dir.join("cache")
    }

    /// The decision log, one JSON object per line.
    pub fn decision_log_path(&self) -> PathBuf {
        self.daemon.state_dir.join("decisions.jsonl")
    }
}

/// Maps key paths and byte offsets of the file to line:column.
struct Locator {
    doc: Option<toml_edit::ImDocument<String>>,
    line_starts: Vec<usize>,
}

impl Locator {
    fn new(_path: &Path, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Locator {
            doc: toml_edit::ImDocument::parse(text.to_string()).ok(),
            line_starts,
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        (line, offset - start + 1)
    }

    /// Location of the key itself (not its value) at the end of `key`, or of the nearest
    /// parent that exists in the file.
    fn find_key(&self, key: &str) -> Option<(usize, usize)> {
        let (parent, name) = match key.rsplit_once('.') {
            Some((p, n)) if !n.contains('[') => (p, n),
            None if !key.contains('[') => ("", key),
            _ => return self.find(key),
        };
        let doc = self.doc.as_ref()?;
        let table: Option<&dyn toml_edit::TableLike> = if parent.is_empty() {
            Some(doc.as_table())
        } else {
            self.node(parent).and_then(|n| match n {
                Node::Table(t) => Some(t as &dyn toml_edit::TableLike),
                Node::Item(i) => i.as_table_like(),
                Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
            })
        };
        table
            .and_then(|t| t.key(name))
            .and_then(|k| k.span())
            .map(|s| self.line_col(s.start))
            .or_else(|| self.find(key))
    }

    /// The node at `key`, if the file has it.
    fn node(&self, key: &str) -> Option<Node<'_>> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        for part in split_key(key) {
            node = node.child(part)?;
        }
        Some(node)
    }

    /// Location of the value at `key` (dot-separated, `[n]` for array elements), or of the
    /// nearest parent that exists in the file.
    fn find(&self, key: &str) -> Option<(usize, usize)> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut best = None;
        for part in split_key(key) {
            let Some(next) = node.child(part) else { break };
            if let Some(span) = next.span() {
                best = Some(span.start);
            }
            node = next;
        }
        best.map(|o| self.line_col(o))
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn child(self, part: KeyPart<'_>) -> Option<Node<'a>> {
        match (self, part) {
            (Node::Table(t), KeyPart::Name(n)) => t.get(n).map(Node::Item),
            (Node::Item(i), KeyPart::Name(n)) => match i {
                toml_edit::Item::Table(t) => t.get(n).map(Node::Item),
                toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                    t.get(n).map(Node::Value)
                }
                _ => None,
            },
            (Node::Value(toml_edit::Value::InlineTable(t)), KeyPart::Name(n)) => {
                t.get(n).map(Node::Value)
            }
            (Node::Item(toml_edit::Item::ArrayOfTables(a)), KeyPart::Index(i)) => {
                a.get(i).map(Node::Table)
            }
            (Node::Item(toml_edit::Item::Value(toml_edit::Value::Array(a))), KeyPart::Index(i))
            | (Node::Value(toml_edit::Value::Array(a)), KeyPart::Index(i)) => {
                a.get(i).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(&self) -> Option<std::ops::Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
        }
    }
}

enum KeyPart<'a> {
    Name(&'a str),
    Index(usize),
}

fn split_key(key: &str) -> Vec<KeyPart<'_>> {
    let mut out = Vec::new();
    for seg in key.split('.') {
        let (name, rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            out.push(KeyPart::Name(name));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(KeyPart::Index(n));
            }
        }
    }
    out
}

struct Validator<'a> {
    locator: &'a Locator,
    base: &'a Path,
    errors: Vec<ConfigError>,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:7480";
const EVERY_MINUTE: &str = "0 * * * * *";
const EVERY_HOUR: &str = "0 0 * * * *";

impl Validator<'_> {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let location = self.locator.find(&key);
        self.errors.push(ConfigError {
            file: PathBuf::new(),
            location,
            key,
            message: message.into(),
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn schedule(&mut self, key: &str, s: Option<String>, default: &str) -> String {
        let s = s.unwrap_or_else(|| default.to_string());
        if let Err(e) = parse_cron(&s) {
            self.err(
                key,
                format!("`{s}` is not a cron schedule with seconds (like \"0 */5 * * * *\"): {e}"),
            );
        }
        s
    }

    fn positive(&mut self, key: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            self.err(key, format!("must be a positive number, got {v}"));
        }
        v
    }

    fn non_negative(&mut self, key: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v >= 0.0) {
            self.err(key, format!("must be zero or a positive number, got {v}"));
        }
        v
    }

    fn at_least(&mut self, key: &str, v: Option<u64>, default: u64, min: u64) -> u64 {
        let v = v.unwrap_or(default);
        if v < min {
            self.err(key, format!("must be at least {min}, got {v}"));
        }
        v
    }

    fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let daemon = self.daemon(raw.daemon);
        let broker = self.broker(raw.broker);
        let conduit = ConduitSettings {
            grace_period: Duration::from_secs(raw.conduit.grace_period_secs.unwrap_or(3600)),
            stop_timeout: Duration::from_secs(self.at_least(
                "conduit.stop_timeout_secs",
                raw.conduit.stop_timeout_secs,
                30,
                1,
            )),
            kill_after_stop_timeout: raw.conduit.kill_after_stop_timeout.unwrap_or(false),
            health_timeout: Duration::from_secs(self.at_least(
                "conduit.health_timeout_secs",
                raw.conduit.health_timeout_secs,
                60,
                1,
            )),
            bucket_concurrency: {
                let n = self.at_least(
                    "conduit.bucket_concurrency",
                    raw.conduit.bucket_concurrency,
                    crate::migrators::copier::DEFAULT_CONCURRENCY as u64,
                    1,
                );
                let max = crate::migrators::copier::MAX_CONCURRENCY as u64;
                if n > max {
                    self.err(
                        "conduit.bucket_concurrency",
                        format!("must be at most {max}, got {n}"),
                    );
                }
                n.min(max) as usize
            },
            bucket_max_bytes_per_sec: raw.conduit.bucket_max_mib_per_sec.map(|_| {
                self.at_least(
                    "conduit.bucket_max_mib_per_sec",
                    raw.conduit.bucket_max_mib_per_sec,
                    1,
                    1,
                ) << 20
            }),
            transfer_concurrency: {
                let n = self.at_least(
                    "conduit.transfer_concurrency",
                    raw.conduit.transfer_concurrency,
                    4,
                    1,
                );
                if n > 64 {
                    self.err(
                        "conduit.transfer_concurrency",
                        format!("must be at most 64, got {n}"),
                    );
                }
                n.min(64) as usize
            },
        };
        let regions_file = raw.regions.file.as_deref().map(|f| self.path(f));
        if let Some(f) = &regions_file {
            if !f.is_file() {
                self.err(
                    "regions.file",
                    format!("region table {} does not exist", f.display()),
                );
            }
        }
        let providers: BTreeMap<_, _> = raw
            .providers
            .into_iter()
            .map(|(name, p)| {
                let v = self.provider(&name, p);
                (name, v)
            })
            .collect();
        self.distinct_roots(&providers);
        let policies: BTreeMap<_, _> = raw
            .policies
            .into_iter()
            .map(|(name, p)| {
                let v = self.policy(&name, p);
                (name, v)
            })
            .collect();
        let services: BTreeMap<_, _> = raw
            .services
            .into_iter()
            .map(|(name, s)| {
                let v = self.service(&name, s, &providers, &policies);
                (name, v)
            })
            .collect();
        for e in &mut self.errors {
            e.file = path.to_path_buf();
        }
        Config {
            path: path.to_path_buf(),
            daemon,
            broker,
            conduit,
            regions_file,
            providers,
            policies,
            services,
        }
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonSettings {
        let state_dir = match raw.state_dir {
            Some(s) => self.path(&s),
            None => std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/fluidcloud")),
        };
        let listen_s = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_s.parse().unwrap_or_else(|_| {
            self.err(
                "daemon.listen",
                format!("`{listen_s}` is not an address and port such as 127.0.0.1:7480"),
            );
            DEFAULT_LISTEN.parse().expect("default listen address")
        });
        let log_format = match raw.log_format.as_deref().unwrap_or("auto") {
            "auto" => LogFormat::Auto,
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            "journald" => LogFormat::Journald,
            other => {
                self.err(
                    "daemon.log_format",
                    format!("`{other}` is not one of auto, text, json, journald"),
                );
                LogFormat::Auto
            }
        };
        DaemonSettings {
            state_dir,
            listen,
            api_token_file: raw.api_token_file.map(|f| self.path(&f)),
            log_format,
        }
    }

    fn broker(&mut self, raw: RawBroker) -> BrokerSettings {
        let evaluate_schedule = self.schedule(
            "broker.evaluate_schedule",
            raw.evaluate_schedule,
            EVERY_MINUTE,
        );
        let pct = raw.max_relocations_percent.unwrap_or(20.0);
        if !(pct.is_finite() && pct > 0.0 && pct <= 100.0) {
            self.err(
                "broker.max_relocations_percent",
                format!("must be more than 0 and at most 100, got {pct}"),
            );
        }
        let timeout_ms = self.at_least("broker.policy_timeout_ms", raw.policy_timeout_ms, 250, 1);
        let ops = self.at_least(
            "broker.max_policy_operations",
            raw.max_policy_operations,
            1_000_000,
            1_000,
        );
        BrokerSettings {
            evaluate_schedule,
            max_concurrent_relocations: self.at_least(
                "broker.max_concurrent_relocations",
                raw.max_concurrent_relocations.map(u64::from),
                1,
                1,
            ) as u32,
            max_relocations_per_window: self.at_least(
                "broker.max_relocations_per_window",
                raw.max_relocations_per_window.map(u64::from),
                5,
                1,
            ) as u32,
            relocation_window: Duration::from_secs(self.at_least(
                "broker.relocation_window_secs",
                raw.relocation_window_secs,
                86_400,
                1,
            )),
            max_relocations_percent: pct,
            policy_timeout: Duration::from_millis(timeout_ms),
            max_policy_operations: ops,
        }
    }

    /// One directory serves one provider: two sharing a root would adopt each other's apps
    /// and overwrite each other's images.
    fn distinct_roots(&mut self, providers: &BTreeMap<String, Provider>) {
        let mut owners: BTreeMap<PathBuf, &str> = BTreeMap::new();
        for (name, p) in providers {
            let Some(root) = &p.root else { continue };
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| normalize(root));
            if let Some(first) = owners.insert(root.clone(), name) {
                owners.insert(root.clone(), first);
                self.err(
                    format!("providers.{name}.root"),
                    format!(
                        "{} is already the root of provider `{first}`; each provider needs a directory of its own",
                        root.display()
                    ),
                );
            }
        }
    }

    fn provider(&mut self, name: &str, raw: RawProvider) -> Provider {
        let key = format!("providers.{name}");
        check_name(self, &key, name);
        let driver = Driver::parse(&raw.driver).unwrap_or_else(|| {
            self.err(
                format!("{key}.driver"),
                format!(
                    "`{}` is not a known driver; known drivers: {}",
                    raw.driver,
                    Driver::NAMES.join(", ")
                ),
            );
            Driver::Local
        });
        if raw.region.trim().is_empty() {
            self.err(format!("{key}.region"), "must not be empty");
        }
        let disk_format = match raw.disk_format.as_deref() {
            None => DiskFormat::Raw,
            Some(f) => DiskFormat::parse(f).unwrap_or_else(|| {
                self.err(
                    format!("{key}.disk_format"),
                    format!("`{f}` is not one of {}", DiskFormat::NAMES.join(", ")),
                );
                DiskFormat::Raw
            }),
        };
        let pricing = raw
            .pricing
            .map(|p| self.pricing(&format!("{key}.pricing"), name, &raw.region, p));
        let benchmark = raw
            .benchmark
            .map(|b| self.benchmark(&format!("{key}.benchmark"), b));
        let region_overrides = raw.region_info.map(|r| {
            if let Some(c) = &r.country {
                if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_uppercase()) {
                    self.err(
                        format!("{key}.region_info.country"),
                        format!("`{c}` is not an ISO 3166-1 alpha-2 code such as DE"),
                    );
                }
            }
            RawRegionOverride {
                country: r.country,
                subdivision: r.subdivision,
                eu: r.eu,
                eea: r.eea,
                tags: r.tags,
            }
        });
        let object_store = self.object_store(&key, name, driver, &raw.region, raw.s3, raw.swift);
        let qemu = self.qemu(&key, driver, raw.qemu);
        if driver == Driver::Qemu && raw.root.is_none() {
            self.err(
                format!("{key}.root"),
                "a qemu provider needs `root`, the directory holding its disk pool and VMs",
            );
        }
        Provider {
            name: name.to_string(),
            driver,
            cloud: raw.cloud,
            region: raw.region,
            root: raw.root.map(|r| self.path(&r)),
            disk_format,
            pricing,
            benchmark,
            region_overrides,
            object_store,
            qemu,
        }
    }

    fn qemu(&mut self, key: &str, driver: Driver, raw: Option<RawQemu>) -> Option<QemuSettings> {
        if driver != Driver::Qemu {
            if raw.is_some() {
                self.err(
                    format!("{key}.qemu"),
                    "belongs to providers with driver = \"qemu\"",
                );
            }
            return None;
        }
        let raw = raw.unwrap_or_default();
        let key = format!("{key}.qemu");
        let binary = match raw.binary {
            None => None,
            Some(b) if b.trim().is_empty() => {
                self.err(format!("{key}.binary"), "must not be empty");
                None
            }
            // A bare name is looked up in PATH when the driver runs it, as a shell would.
            Some(b) if !b.contains('/') => Some(PathBuf::from(b)),
            Some(b) => Some(self.path(&b)),
        };
        let dirs = |this: &mut Self, field: &str, list: Option<Vec<String>>| {
            let mut out = Vec::new();
            for (i, d) in list.unwrap_or_default().into_iter().enumerate() {
                if d.trim().is_empty() || d.contains(':') {
                    this.err(
                        format!("{key}.{field}[{i}]"),
                        format!("`{d}` must be a non-empty directory path without `:`"),
                    );
                } else {
                    out.push(this.path(&d));
                }
            }
            out
        };
        let firmware_dirs = dirs(self, "firmware_dirs", raw.firmware_dirs);
        let library_path = dirs(self, "library_path", raw.library_path);
        let accel = match raw.accel.as_deref() {
            None | Some("auto") => Accel::Auto,
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            Some(other) => {
                self.err(
                    format!("{key}.accel"),
                    format!("`{other}` is not one of {}", Accel::NAMES.join(", ")),
                );
                Accel::Auto
            }
        };
        let disk_bus = match raw.disk_bus.as_deref() {
            None | Some("virtio") => DiskBus::Virtio,
            Some("ide") => DiskBus::Ide,
            Some("scsi") => DiskBus::Scsi,
            Some("sata") => DiskBus::Sata,
            Some(other) => {
                self.err(
                    format!("{key}.disk_bus"),
                    format!("`{other}` is not one of {}", DiskBus::NAMES.join(", ")),
                );
                DiskBus::Virtio
            }
        };
        let nic_model = raw
            .nic_model
            .unwrap_or_else(|| "virtio-net-pci".to_string());
        if !NIC_MODELS.contains(&nic_model.as_str()) {
            self.err(
                format!("{key}.nic_model"),
                format!("`{nic_model}` is not one of {}", NIC_MODELS.join(", ")),
            );
        }
        let powerdown_timeout = Duration::from_secs(self.at_least(
            &format!("{key}.powerdown_timeout_secs"),
            raw.powerdown_timeout_secs,
            60,
            1,
        ));
        Some(QemuSettings {
            binary,
            firmware_dirs,
            library_path,
            accel,
            disk_bus,
            nic_model,
            powerdown_timeout,
        })
    }

    fn object_store(
        &mut self,
        key: &str,
        name: &str,
        driver: Driver,
        region: &str,
        s3: Option<RawS3>,
        swift: Option<RawSwift>,
    ) -> Option<ObjectStoreSettings> {
        if s3.is_some() && driver != Driver::S3 {
            self.err(
                format!("{key}.s3"),
                "belongs to providers with driver = \"s3\"",
            );
        }
        if swift.is_some() && driver != Driver::Swift {
            self.err(
                format!("{key}.swift"),
                "belongs to providers with driver = \"swift\"",
            );
        }
        match driver {
            Driver::S3 => {
                let raw = s3.unwrap_or_default();
                let key = format!("{key}.s3");
                let region = raw.region.unwrap_or_else(|| region.to_string());
                let endpoint = match raw.endpoint {
                    Some(e) => self.url(&format!("{key}.endpoint"), e),
                    None => format!("https://s3.{region}.amazonaws.com"),
                };
                let bucket_name = self.remote_name(
                    &format!("{key}.bucket_name"),
                    raw.bucket_name,
                    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.',
                    "lowercase letters, digits, `-` and `.`",
                );
                Some(ObjectStoreSettings::S3(S3Settings {
                    endpoint,
                    region,
                    path_style: raw.path_style.unwrap_or(false),
                    bucket_name,
                    credentials: self.credentials(raw.credentials_file, raw.credentials_profile),
                    part_size: self.part_size(&key, raw.part_size_mib, 5),
                    timeout: Duration::from_secs(self.at_least(
                        &format!("{key}.timeout_secs"),
                        raw.timeout_secs,
                        60,
                        1,
                    )),
                }))
            }
            Driver::Swift => {
                let Some(raw) = swift else {
                    self.err(
                        format!("{key}.swift"),
                        format!(
                            "a swift provider needs a [providers.{name}.swift] table with at least `auth_url`"
                        ),
                    );
                    return None;
                };
                let key = format!("{key}.swift");
                let auth_url = self.url(&format!("{key}.auth_url"), raw.auth_url);
                let auth = match raw.auth.as_deref() {
                    None if auth_url.trim_end_matches('/').ends_with("/v3") => SwiftAuth::Keystone,
                    None | Some("tempauth") => SwiftAuth::Tempauth,
                    Some("keystone") => SwiftAuth::Keystone,
                    Some(other) => {
                        self.err(
                            format!("{key}.auth"),
                            format!("`{other}` is not one of tempauth, keystone"),
                        );
                        SwiftAuth::Tempauth
                    }
                };
                if auth == SwiftAuth::Keystone && raw.project_name.is_none() {
                    self.err(
                        format!("{key}.project_name"),
                        "a Keystone login needs `project_name`, the project whose containers are used",
                    );
                }
                let interface = raw.interface.unwrap_or_else(|| "public".to_string());
                if !["public", "internal", "admin"].contains(&interface.as_str()) {
                    self.err(
                        format!("{key}.interface"),
                        format!("`{interface}` is not one of public, internal, admin"),
                    );
                }
                let container_name = self.remote_name(
                    &format!("{key}.container_name"),
                    raw.container_name,
                    |c| c != '/' && !c.is_control(),
                    "anything but `/` and control characters",
                );
                Some(ObjectStoreSettings::Swift(SwiftSettings {
                    auth_url,
                    auth,
                    region: raw.region.unwrap_or_else(|| region.to_string()),
                    interface,
                    project_name: raw.project_name,
                    project_domain_name: raw
                        .project_domain_name
                        .unwrap_or_else(|| "Default".to_string()),
                    user_domain_name: raw
                        .user_domain_name
                        .unwrap_or_else(|| "Default".to_string()),
                    container_name,
                    credentials: self.credentials(raw.credentials_file, raw.credentials_profile),
                    part_size: self.part_size(&key, raw.part_size_mib, 5),
                    timeout: Duration::from_secs(self.at_least(
                        &format!("{key}.timeout_secs"),
                        raw.timeout_secs,
                        60,
                        1,
                    )),
                }))
            }
            Driver::Local | Driver::Qemu => None,
        }
    }

    fn url(&mut self, key: &str, url: String) -> String {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.split("://").nth(1).is_some_and(|rest| {
                !rest.is_empty() && !rest.starts_with('/') && !rest.contains(['?', '#', ' '])
            });
        if !ok {
            self.err(
                key,
                format!(
                    "`{}` is not an http:// or https:// URL with a host (and no query)",
                    crate::sys::redact::redact_url(&url)
                ),
            );
        }
        url.trim_end_matches('/').to_string()
    }

    fn remote_name(
        &mut self,
        key: &str,
        template: Option<String>,
        allowed: impl Fn(char) -> bool,
        allowed_text: &str,
    ) -> String {
        let template = template.unwrap_or_else(|| DEFAULT_REMOTE_NAME.to_string());
        if let Err(e) = check_remote_name_template(&template) {
            self.err(key, e);
        } else {
            let literal = template.replace("{service}", "").replace("{bucket}", "");
            if let Some(c) = literal.chars().find(|c| !allowed(*c)) {
                self.err(
                    key,
                    format!("`{template}` holds {c:?}; names here may hold {allowed_text}"),
                );
            }
        }
        template
    }

    fn credentials(&mut self, file: Option<String>, profile: Option<String>) -> CredentialsSource {
        CredentialsSource {
            file: file.map(|f| self.path(&f)),
            profile,
        }
    }

    fn part_size(&mut self, key: &str, mib: Option<u64>, min: u64) -> u64 {
        let v = mib.unwrap_or(16);
        if !(min..=5120).contains(&v) {
            self.err(
                format!("{key}.part_size_mib"),
                format!("must be between {min} and 5120, got {v}"),
            );
        }
        v * 1024 * 1024
    }

    fn pricing(
        &mut self,
        key: &str,
        provider: &str,
        region: &str,
        raw: RawPricing,
    ) -> PricingSource {
        let format = match raw.format.as_str() {
            "aws" => PricingFormat::Aws,
            "azure" => PricingFormat::Azure,
            "csv" => PricingFormat::Csv,
            "json" => PricingFormat::Json,
            other => {
                self.err(
                    format!("{key}.format"),
                    format!("`{other}` is not one of aws, azure, csv, json"),
                );
                PricingFormat::Json
            }
        };
        let url = if let Some(rest) = raw.url.strip_prefix("file://") {
            // Relative file URLs are resolved against the configuration's directory.
            format!("file://{}", self.path(rest).display())
        } else if raw.url.starts_with("http://") || raw.url.starts_with("https://") {
            raw.url.clone()
        } else {
            self.err(
                format!("{key}.url"),
                format!(
                    "`{}` must start with file://, http:// or https://",
                    crate::sys::redact::redact_url(&raw.url)
                ),
            );
            raw.url.clone()
        };
        let schedule = self.schedule(&format!("{key}.schedule"), raw.schedule, EVERY_HOUR);
        let ttl = self.at_least(&format!("{key}.ttl_secs"), raw.ttl_secs, 3_600, 0);
        let max_age = self.at_least(&format!("{key}.max_age_secs"), raw.max_age_secs, 86_400, 1);
        let timeout = self.at_least(&format!("{key}.timeout_secs"), raw.timeout_secs, 60, 1);
        let max_bytes = self.at_least(
            &format!("{key}.max_bytes"),
            raw.max_bytes,
            2 * 1024 * 1024 * 1024,
            1,
        );
        if let Some(v) = raw.storage_price_per_gib_month {
            self.non_negative(&format!("{key}.storage_price_per_gib_month"), Some(v), 0.0);
        }
        if let Some(v) = raw.egress_price_per_gib {
            self.non_negative(&format!("{key}.egress_price_per_gib"), Some(v), 0.0);
        }
        let max_price_per_hour = self.positive(
            &format!("{key}.max_price_per_hour"),
            raw.max_price_per_hour,
            1_000.0,
        );
        let max_price_drop_ratio = raw.max_price_drop_ratio.unwrap_or(0.5);
        if !(max_price_drop_ratio > 0.0 && max_price_drop_ratio <= 1.0) {
            self.err(
                format!("{key}.max_price_drop_ratio"),
                format!(
                    "is a share of the last good price and must be above 0 and at most 1 (1 turns the rail off), got {max_price_drop_ratio}"
                ),
            );
        }
        let price_drop_confirmations = raw.price_drop_confirmations.unwrap_or(3);
        if price_drop_confirmations == 0 {
            self.err(
                format!("{key}.price_drop_confirmations"),
                "must be at least 1, got 0",
            );
        }
        PricingSource {
            format,
            url,
            schedule,
            ttl: Duration::from_secs(ttl),
            max_age: Duration::from_secs(max_age),
            timeout: Duration::from_secs(timeout),
            max_bytes,
            catalogue_provider: raw
                .catalogue_provider
                .unwrap_or_else(|| provider.to_string()),
            feed_region: raw.feed_region.unwrap_or_else(|| region.to_string()),
            currency: raw.currency.unwrap_or_else(|| "USD".to_string()),
            storage_price_per_gib_month: raw.storage_price_per_gib_month,
            egress_price_per_gib: raw.egress_price_per_gib,
            max_price_per_hour,
            max_price_drop_ratio,
            price_drop_confirmations,
        }
    }

    fn benchmark(&mut self, key: &str, raw: RawBenchmark) -> BenchmarkSource {
        let schedule = self.schedule(&format!("{key}.schedule"), raw.schedule, EVERY_HOUR);
        let max_age = self.at_least(&format!("{key}.max_age_secs"), raw.max_age_secs, 86_400, 1);
        let timeout = self.at_least(&format!("{key}.timeout_secs"), raw.timeout_secs, 300, 1);
        let kind = match raw.kind.as_str() {
            "builtin" => {
                let path = match raw.path {
                    Some(p) => self.path(&p),
                    None => {
                        self.err(
                            format!("{key}.path"),
                            "a builtin benchmark needs `path`, the directory to test in",
                        );
                        PathBuf::new()
                    }
                };
                if raw.command.is_some() || raw.map.is_some() {
                    self.err(
                        format!("{key}.kind"),
                        "`command` and `map` belong to kind = \"command\", not \"builtin\"",
                    );
                }
                BenchmarkKind::Builtin {
                    path,
                    file_size_mib: self.at_least(
                        &format!("{key}.file_size_mib"),
                        raw.file_size_mib,
                        64,
                        1,
                    ),
                    random_reads: self.at_least(
                        &format!("{key}.random_reads"),
                        raw.random_reads,
                        2_000,
                        1,
                    ),
                }
            }
            "command" => {
                let command = raw.command.unwrap_or_default();
                if command.is_empty() {
                    self.err(
                        format!("{key}.command"),
                        "a command benchmark needs `command`, a program and its arguments",
                    );
                }
                let m = raw.map.unwrap_or_default();
                if m.seq_write_mb_s.is_none()
                    && m.seq_read_mb_s.is_none()
                    && m.rand_read_iops.is_none()
                    && m.rand_read_latency_seconds.is_none()
                {
                    self.err(format!("{key}.map"), "needs at least one JSON pointer, e.g. seq_read_mb_s = \"/jobs/0/read/bw_bytes\"");
                }
                for (k, p) in [
                    ("seq_write_mb_s", &m.seq_write_mb_s),
                    ("seq_read_mb_s", &m.seq_read_mb_s),
                    ("rand_read_iops", &m.rand_read_iops),
                    ("rand_read_latency_seconds", &m.rand_read_latency_seconds),
                ] {
                    if let Some(p) = p {
                        if !p.is_empty() && !p.starts_with('/') {
                            self.err(
                                format!("{key}.map.{k}"),
                                format!("`{p}` is not a JSON pointer; it must start with /"),
                            );
                        }
                    }
                }
                let bandwidth_scale = self.positive(
                    &format!("{key}.map.bandwidth_scale"),
                    m.bandwidth_scale,
                    1.0,
                );
                let latency_scale =
                    self.positive(&format!("{key}.map.latency_scale"), m.latency_scale, 1.0);
                BenchmarkKind::Command {
                    command,
                    map: BenchmarkMap {
                        seq_write_mb_s: m.seq_write_mb_s,
                        seq_read_mb_s: m.seq_read_mb_s,
                        rand_read_iops: m.rand_read_iops,
                        rand_read_latency_seconds: m.rand_read_latency_seconds,
                        bandwidth_scale,
                        latency_scale,
                    },
                }
            }
            other => {
                self.err(
                    format!("{key}.kind"),
                    format!("`{other}` is not one of builtin, command"),
                );
                BenchmarkKind::Command {
                    command: Vec::new(),
                    map: BenchmarkMap {
                        seq_write_mb_s: None,
                        seq_read_mb_s: None,
                        rand_read_iops: None,
                        rand_read_latency_seconds: None,
                        bandwidth_scale: 1.0,
                        latency_scale: 1.0,
                    },
                }
            }
        };
        BenchmarkSource {
            schedule,
            max_age: Duration::from_secs(max_age),
            timeout: Duration::from_secs(timeout),
            kind,
        }
    }

    fn policy(&mut self, name: &str, raw: RawPolicy) -> PolicySpec {
        let key = format!("policies.{name}");
        check_name(self, &key, name);
        let file = self.path(&raw.file);
        if !file.is_file() {
            self.err(
                format!("{key}.file"),
                format!("policy file {} does not exist", file.display()),
            );
        }
        let mode = match raw.mode.as_deref().unwrap_or("audit") {
            "audit" => Mode::Audit,
            "approve" => Mode::Approve,
            "enforce" => Mode::Enforce,
            other => {
                self.err(
                    format!("{key}.mode"),
                    format!("`{other}` is not one of audit, approve, enforce"),
                );
                Mode::Audit
            }
        };
        let ratio = self.non_negative(
            &format!("{key}.min_improvement_ratio"),
            raw.min_improvement_ratio,
            0.10,
        );
        if ratio >= 1.0 {
            self.err(
                format!("{key}.min_improvement_ratio"),
                format!("is a share of the current cost and must be below 1, got {ratio}"),
            );
        }
        let confirmations = raw.confirmations.unwrap_or(3);
        if confirmations == 0 {
            self.err(format!("{key}.confirmations"), "must be at least 1, got 0");
        }
        let blackouts = raw
            .blackout
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let cron = self.schedule(&format!("{key}.blackout[{i}].cron"), Some(b.cron), "");
                if b.duration_secs == 0 {
                    self.err(
                        format!("{key}.blackout[{i}].duration_secs"),
                        "must be at least 1, got 0",
                    );
                }
                Blackout {
                    cron,
                    duration: Duration::from_secs(b.duration_secs),
                }
            })
            .collect();
        PolicySpec {
            name: name.to_string(),
            file,
            mode,
            min_improvement_ratio: ratio,
            confirmations,
            min_residency: Duration::from_secs(raw.min_residency_secs.unwrap_or(86_400)),
            cooldown: Duration::from_secs(raw.cooldown_secs.unwrap_or(3_600)),
            break_even_horizon_days: self.positive(
                &format!("{key}.break_even_horizon_days"),
                raw.break_even_horizon_days,
                30.0,
            ),
            expected_downtime: Duration::from_secs(raw.expected_downtime_secs.unwrap_or(60)),
            move_duration: Duration::from_secs(raw.move_duration_secs.unwrap_or(3_600)),
            downtime_cost_per_hour: self.non_negative(
                &format!("{key}.downtime_cost_per_hour"),
                raw.downtime_cost_per_hour,
                0.0,
            ),
            blackouts,
        }
    }

    fn service(
        &mut self,
        name: &str,
        raw: RawService,
        providers: &BTreeMap<String, Provider>,
        policies: &BTreeMap<String, PolicySpec>,
    ) -> ServiceSpec {
        let key = format!("services.{name}");
        check_name(self, &key, name);
        if !providers.contains_key(&raw.provider) {
            self.err(
                format!("{key}.provider"),
                format!(
                    "unknown provider `{}`; configured providers: {}",
                    raw.provider,
                    list(providers.keys())
                ),
            );
        }
        if !policies.contains_key(&raw.policy) {
            self.err(
                format!("{key}.policy"),
                format!(
                    "unknown policy `{}`; configured policies: {}",
                    raw.policy,
                    list(policies.keys())
                ),
            );
        }
        let mut components = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let (mut vcpus, mut memory) = (0u32, 0.0f64);
        let mut unknown_kinds = BTreeSet::new();
        for (i, c) in raw.components.into_iter().enumerate() {
            let ck = format!("{key}.components[{i}]");
            let kind = match c.kind.as_str() {
                "vm" => ComponentKind::Vm,
                "volume" => ComponentKind::Volume,
                "bucket" => ComponentKind::Bucket,
                "app" => ComponentKind::App,
                "config" => ComponentKind::Config,
                other => {
                    self.err(
                        format!("{ck}.kind"),
                        format!("`{other}` is not one of vm, volume, bucket, app, config"),
                    );
                    unknown_kinds.insert(i);
                    ComponentKind::App
                }
            };
            let name_ok = if kind == ComponentKind::Config {
                crate::providers::validate_file_name(&c.name)
            } else {
                crate::providers::validate_name(&c.name)
            };
            if let Err(reason) = name_ok {
                self.err(format!("{ck}.name"), reason);
            }
            if !seen.insert(c.name.clone()) {
                self.err(
                    format!("{ck}.name"),
                    format!("component name `{}` is used twice in this service", c.name),
                );
            }
            if let Some(n) = c.vcpus {
                if n == 0 {
                    self.err(format!("{ck}.vcpus"), "must be at least 1, got 0");
                }
            }
            if c.memory_gib.is_some() {
                self.positive(&format!("{ck}.memory_gib"), c.memory_gib, 1.0);
            }
            let size_gib = self.non_negative(&format!("{ck}.size_gib"), c.size_gib, 0.0);
            if matches!(kind, ComponentKind::Volume | ComponentKind::Bucket) && c.size_gib.is_none()
            {
                self.err(
                    format!("{ck}.size_gib"),
                    format!(
                        "a {} needs `size_gib` to price storage and the move",
                        kind.as_str()
                    ),
                );
            }
            if c.keep_at_source && kind != ComponentKind::Bucket {
                self.err(
                    format!("{ck}.keep_at_source"),
                    "only a bucket can be kept at the source",
                );
            }
            if kind == ComponentKind::Bucket
                && c.settings
                    .get("skip_special_files")
                    .is_some_and(|v| !v.is_bool())
            {
                self.err(
                    format!("{ck}.settings.skip_special_files"),
                    "must be true or false",
                );
            }
            if let Some(home) = &c.provider {
                match providers.get(home) {
                    _ if kind != ComponentKind::Bucket => self.err(
                        format!("{ck}.provider"),
                        "only a bucket can live at a provider of its own",
                    ),
                    None => self.err(
                        format!("{ck}.provider"),
                        format!(
                            "unknown provider `{home}`; configured providers: {}",
                            list(providers.keys())
                        ),
                    ),
                    Some(p) if !matches!(p.driver, Driver::Local | Driver::S3 | Driver::Swift) => {
                        self.err(
                            format!("{ck}.provider"),
                            format!(
                                "`{home}` uses the `{}` driver, which has no object storage",
                                crate::providers::driver_name(p.driver)
                            ),
                        )
                    }
                    Some(_) => {}
                }
            }
            if kind == ComponentKind::Vm {
                vcpus += c.vcpus.unwrap_or(0);
                memory += c.memory_gib.unwrap_or(0.0);
            }
            components.push(Component {
                kind,
                name: c.name,
                size_gib,
                keep_at_source: c.keep_at_source || c.provider.is_some(),
                home: c.provider,
                settings: c.settings,
            });
        }
        if raw.vcpus == Some(0) {
            self.err(format!("{key}.vcpus"), "must be at least 1, got 0");
        }
        if raw.memory_gib.is_some() {
            self.positive(&format!("{key}.memory_gib"), raw.memory_gib, 1.0);
        }
        let requirements = Requirements {
            vcpus: raw.vcpus.unwrap_or(vcpus.max(1)),
            memory_gib: raw
                .memory_gib
                .unwrap_or(if memory > 0.0 { memory } else { 1.0 }),
        };
        // Apps and VMs are read as the drivers will read them, so unknown or wrong settings
        // are refused here rather than at deployment.
        for (i, c) in components.iter().enumerate() {
            if unknown_kinds.contains(&i) || crate::providers::validate_name(&c.name).is_err() {
                continue; // refused above already
            }
            let ck = format!("{key}.components[{i}]");
            let problems = match c.kind {
                ComponentKind::App => crate::providers::AppSpec::from_component(name, c, self.base)
                    .err()
                    .map(|e| e.problems),
                ComponentKind::Vm => {
                    crate::providers::VmSpec::from_component(name, c, requirements, self.base)
                        .err()
                        .map(|e| e.problems)
                }
                _ => None,
            };
            for (k, message) in problems.unwrap_or_default() {
                self.err(format!("{ck}.{k}"), message);
            }
        }
        let health_check = raw.health_check.map(|h| {
            if h.url.is_none() && h.command.is_none() {
                self.err(format!("{key}.health_check"), "needs `url` or `command`");
            }
            HealthCheck {
                url: h.url,
                command: h.command,
                timeout: Duration::from_secs(h.timeout_secs.unwrap_or(10)),
            }
        });
        for (i, c) in components.iter().enumerate() {
            if c.kind != ComponentKind::Config {
                continue;
            }
            let ck = format!("{key}.components[{i}]");
            match crate::migrators::rewrite::ConfigFileSpec::from_component(name, c, self.base) {
                Ok(spec) => {
                    if let Err(message) = spec.resolve_app(&components) {
                        let at = if spec.app.is_some() {
                            format!("{ck}.settings.app")
                        } else {
                            ck
                        };
                        self.err(at, message);
                    }
                }
                Err(problems) => {
                    for (k, message) in problems {
                        // `kind` was already checked above.
                        if k != "kind" {
                            self.err(format!("{ck}.{k}"), message);
                        }
                    }
                }
            }
        }
        let cutover = raw.cutover.map(|h| self.hook(&format!("{key}.cutover"), h));
        let recontextualise = raw
            .recontextualise
            .map(|h| self.hook(&format!("{key}.recontextualise"), h));
        ServiceSpec {
            name: name.to_string(),
            provider: raw.provider,
            policy: raw.policy,
            flavor: raw.flavor,
            requirements,
            pinned: raw.pinned,
            health_check,
            components,
            cutover,
            recontextualise,
        }
    }

    fn hook(&mut self, key: &str, raw: RawHook) -> HookSpec {
        let timeout = self.at_least(&format!("{key}.timeout_secs"), raw.timeout_secs, 30, 1);
        let target = match (raw.command, raw.url) {
            (Some(_), Some(_)) => {
                self.err(
                    key,
                    "set either `command` or `url`, not both: a hook is one program or one webhook",
                );
                None
            }
            (None, None) => {
                self.err(
                    key,
                    "needs `command` (a program and its arguments) or `url` (a webhook); \
                     leave the table out if there is nothing to call",
                );
                None
            }
            (Some(argv), None) => {
                if raw.token_file.is_some() {
                    self.err(
                        format!("{key}.token_file"),
                        "belongs to a webhook (`url`), not to a command",
                    );
                }
                self.hook_command(key, argv)
            }
            (None, Some(url)) => {
                match reqwest::Url::parse(&url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    Ok(u) => self.err(
                        format!("{key}.url"),
                        format!("`{url}` must be http:// or https://, not {}://", u.scheme()),
                    ),
                    Err(e) => self.err(format!("{key}.url"), format!("`{url}` is not a URL: {e}")),
                }
                Some(HookTarget::Webhook {
                    url,
                    token_file: raw.token_file.map(|f| self.path(&f)),
                })
            }
        };
        HookSpec {
            target: target.unwrap_or(HookTarget::Command {
                argv: Vec::new(),
                workdir: self.base.to_path_buf(),
            }),
            timeout: Duration::from_secs(timeout),
        }
    }

    fn hook_command(&mut self, key: &str, mut argv: Vec<String>) -> Option<HookTarget> {
        let Some(program) = argv.first_mut() else {
            self.err(
                format!("{key}.command"),
                "must name a program, e.g. [\"scripts/repoint.sh\"]",
            );
            return None;
        };
        if program.trim().is_empty() {
            self.err(format!("{key}.command[0]"), "the program must not be empty");
            return None;
        }
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            self.err(format!("{key}.command[{i}]"), "holds a NUL byte");
            return None;
        }
        let program = &mut argv[0];
        if program.contains('/') {
            let path = self.path(program);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    use std::os::unix::fs::PermissionsExt;
                    if m.permissions().mode() & 0o111 == 0 {
                        self.err(
                            format!("{key}.command[0]"),
                            format!("{} is not executable; run `chmod +x` on it", path.display()),
                        );
                    }
                }
                _ => self.err(
                    format!("{key}.command[0]"),
                    format!("program {} does not exist", path.display()),
                ),
            }
            *program = path.to_string_lossy().into_owned();
        }
        Some(HookTarget::Command {
            argv,
            workdir: self.base.to_path_buf(),
        })
    }
}

fn check_name(v: &mut Validator<'_>, key: &str, name: &str) {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        v.err(
            key,
            format!("name `{name}` may hold only letters, digits, `-` and `_`"),
        );
    }
}

/// `path` without `.` and `..` components (for paths that do not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(", ")
    }
}

/// Parses a cron schedule the way the scheduler does: seconds first, day-of-month and
/// day-of-week both honoured.
pub fn parse_cron(s: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::Cron::new(s)
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
}

#[cfg(test)]
mod tests;
