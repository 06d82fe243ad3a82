//! The configuration file exactly as written: every struct refuses unknown keys, nothing
//! is checked beyond types. `super::validate` turns this into [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// A key the file's reading refused: unknown, or of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Dotted key path, `[n]` for array elements.
    pub key: String,
    pub message: String,
    /// The key is not known (its name is wrong), rather than its value.
    pub unknown_key: bool,
}

/// At most this many keys are refused before the reading gives up.
const MAX_REFUSED: usize = 200;

/// Reads `table` into a [`RawConfig`], collecting every unknown key and every value of the
/// wrong type instead of stopping at the first: each one refused is taken out of the table
/// and the reading starts again. `None` when a required key is missing or wrong (its
/// section cannot be read), with what was refused.
pub fn read_all(mut table: toml::Table) -> (Option<RawConfig>, Vec<Refused>) {
    let mut refused = Vec::new();
    while refused.len() < MAX_REFUSED {
        let value = toml::Value::Table(table.clone());
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(value) {
            Ok(raw) => return (Some(raw), refused),
            Err(e) => e,
        };
        let path: Vec<PathPart> = error
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(PathPart::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathPart::Index(*index)),
                _ => None,
            })
            .collect();
        let message = error.inner().message().trim().to_string();
        // The path may or may not end with the key the message names already.
        let named = |name: &str| {
            let mut p = path.clone();
            if !matches!(p.last(), Some(PathPart::Key(k)) if k == name) {
                p.push(PathPart::Key(name.to_string()));
            }
            p
        };
        let (key, unknown_key) = match (
            quoted_after(&message, "unknown field `"),
            quoted_after(&message, "missing field `"),
        ) {
            (Some(name), _) => (named(name), true),
            (_, Some(name)) => (named(name), false),
            _ => (path.clone(), false),
        };
        let missing = !unknown_key && message.starts_with("missing field");
        refused.push(Refused {
            key: join(&key),
            message,
            unknown_key,
        });
        let taken = if missing {
            // Nothing can stand in for a required value: its whole section goes (for an
            // element of an array, the whole array, so later elements keep their index).
            let mut section = &key[..key.len() - 1];
            while let Some((PathPart::Index(_), parent)) = section.split_last() {
                section = parent;
            }
            remove(&mut table, section)
        } else {
            remove(&mut table, &key)
        };
        if !taken {
            break;
        }
    }
    (None, refused)
}

#[derive(Debug, Clone)]
enum PathPart {
    Key(String),
    Index(usize),
}

fn join(path: &[PathPart]) -> String {
    let mut out = String::new();
    for p in path {
        match p {
            PathPart::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathPart::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The text between `prefix` and the next backtick of `message`.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// Takes the value at `path` out of `table`; false when there is none (or the path is the
/// whole table), so the reading cannot go on.
fn remove(table: &mut toml::Table, path: &[PathPart]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node: &mut toml::Value = match parents.first() {
        None => {
            return match last {
                PathPart::Key(k) => table.remove(k).is_some(),
                PathPart::Index(_) => false,
            }
        }
        Some(PathPart::Key(k)) => match table.get_mut(k) {
            Some(v) => v,
            None => return false,
        },
        Some(PathPart::Index(_)) => return false,
    };
    for part in &parents[1..] {
        let next = match (node, part) {
            (toml::Value::Table(t), PathPart::Key(k)) => t.get_mut(k),
            (toml::Value::Array(a), PathPart::Index(i)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (node, last) {
        (toml::Value::Table(t), PathPart::Key(k)) => t.remove(k).is_some(),
        (toml::Value::Array(a), PathPart::Index(i)) if *i < a.len() => {
            // A wrong element (a number among strings, say) is taken out; elements after it
            // move up, which only shifts the index named by a later error in this array.
            a.remove(*i);
            true
        }
        _ => false,
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub broker: RawBroker,
    #[serde(default)]
    pub conduit: RawConduit,
    #[serde(default)]
    pub regions: RawRegions,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub policies: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    pub services: BTreeMap<String, RawService>,
    pub tls: Option<RawTls>,
    pub agent: Option<RawAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub advertise: String,
    pub listen: Option<String>,
    pub viaduct_listen: Option<String>,
    pub viaduct_advertise: Option<String>,
    pub metrics_listen: Option<String>,
    pub state_dir: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub state_dir: Option<String>,
    pub listen: Option<String>,
    pub api_token_file: Option<String>,
    pub log_format: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub evaluate_schedule: Option<String>,
    pub max_concurrent_relocations: Option<u32>,
    pub max_relocations_per_window: Option<u32>,
    pub relocation_window_secs: Option<u64>,
    pub max_relocations_percent: Option<f64>,
    pub policy_timeout_ms: Option<u64>,
    pub max_policy_operations: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConduit {
    pub grace_period_secs: Option<u64>,
    pub stop_timeout_secs: Option<u64>,
    pub kill_after_stop_timeout: Option<bool>,
    pub health_timeout_secs: Option<u64>,
    pub bucket_concurrency: Option<u64>,
    pub bucket_max_mib_per_sec: Option<u64>,
    pub volume_max_mib_per_sec: Option<u64>,
    pub transfer_concurrency: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRegions {
    /// Extra or replacement region table in the shipped `regions.csv` format.
    pub file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub driver: String,
    /// The cloud the region belongs to (`aws`, `azure`, `hetzner`…), for region facts.
    pub cloud: Option<String>,
    pub region: String,
    /// Driver settings (for example a local provider's `root` directory).
    pub root: Option<String>,
    /// Disk image format the provider prefers for new volumes: raw, qcow2, vmdk or vhdx.
    pub disk_format: Option<String>,
    pub pricing: Option<RawPricing>,
    pub benchmark: Option<RawBenchmark>,
    pub region_info: Option<RawRegionInfo>,
    /// Settings of the `s3` driver.
    pub s3: Option<RawS3>,
    /// Settings of the `swift` driver.
    pub swift: Option<RawSwift>,
    /// Settings of the `qemu` driver.
    pub qemu: Option<RawQemu>,
    /// The agent that serves this provider on another host, `https://HOST:PORT`.
    pub agent: Option<String>,
    /// Volumes on block devices (`local` and `qemu` drivers): `"SERVICE/VOLUME" = "/dev/…"`.
    pub devices: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawQemu {
    pub binary: Option<String>,
    pub firmware_dirs: Option<Vec<String>>,
    pub library_path: Option<Vec<String>>,
    pub accel: Option<String>,
    pub disk_bus: Option<String>,
    pub nic_model: Option<String>,
    pub powerdown_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub endpoint: Option<String>,
    /// Region requests are signed for, when it is not the provider's region.
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub bucket_name: Option<String>,
    pub credentials_file: Option<String>,
    pub credentials_profile: Option<String>,
    pub part_size_mib: Option<u64>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSwift {
    pub auth_url: String,
    /// `tempauth` or `keystone`.
    pub auth: Option<String>,
    /// Keystone catalog region, when it is not the provider's region.
    pub region: Option<String>,
    pub interface: Option<String>,
    pub project_name: Option<String>,
    pub project_domain_name: Option<String>,
    pub user_domain_name: Option<String>,
    pub container_name: Option<String>,
    pub credentials_file: Option<String>,
    pub credentials_profile: Option<String>,
    pub part_size_mib: Option<u64>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    pub format: String,
    pub url: String,
    pub schedule: Option<String>,
    pub ttl_secs: Option<u64>,
    pub max_age_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Catalogue rows to take (`provider` column); defaults to the provider's name.
    pub catalogue_provider: Option<String>,
    /// Region to take from the feed; defaults to the provider's region.
    pub feed_region: Option<String>,
    pub currency: Option<String>,
    pub storage_price_per_gib_month: Option<f64>,
    pub egress_price_per_gib: Option<f64>,
    pub max_price_per_hour: Option<f64>,
    pub max_price_drop_ratio: Option<f64>,
    pub price_drop_confirmations: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBenchmark {
    pub kind: String,
    pub schedule: Option<String>,
    pub max_age_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    /// `builtin`: directory to test in.
    pub path: Option<String>,
    /// `builtin`: size of the test file.
    pub file_size_mib: Option<u64>,
    /// `builtin`: number of random reads.
    pub random_reads: Option<u64>,
    /// `command`: program and arguments, run without a shell.
    pub command: Option<Vec<String>>,
    /// `command`: JSON pointers (RFC 6901) to each figure in the command's output.
    pub map: Option<RawBenchmarkMap>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawBenchmarkMap {
    pub seq_write_mb_s: Option<String>,
    pub seq_read_mb_s: Option<String>,
    pub rand_read_iops: Option<String>,
    pub rand_read_latency_seconds: Option<String>,
    /// Multiplier applied to the bandwidth figures (fio reports KiB/s: 0.001024).
    pub bandwidth_scale: Option<f64>,
    /// Multiplier applied to the latency figure (fio reports ns: 1e-9).
    pub latency_scale: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRegionInfo {
    pub country: Option<String>,
    pub subdivision: Option<String>,
    pub eu: Option<bool>,
    pub eea: Option<bool>,
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub file: String,
    pub mode: Option<String>,
    pub min_improvement_ratio: Option<f64>,
    pub confirmations: Option<u32>,
    pub min_residency_secs: Option<u64>,
    pub cooldown_secs: Option<u64>,
    pub break_even_horizon_days: Option<f64>,
    pub expected_downtime_secs: Option<u64>,
    pub move_duration_secs: Option<u64>,
    pub downtime_cost_per_hour: Option<f64>,
    #[serde(default)]
    pub blackout: Vec<RawBlackout>,
    /// How relocations under the policy move VMs: `cold` or `live`.
    pub vm_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlackout {
    pub cron: String,
    pub duration_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub provider: String,
    pub policy: String,
    pub flavor: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_gib: Option<f64>,
    #[serde(default)]
    pub pinned: bool,
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub components: Vec<RawComponent>,
    /// Repoints the service's clients (DNS record, floating IP, proxy) at cutover.
    pub cutover: Option<RawHook>,
    /// Hands environment data to the relocated instance.
    pub recontextualise: Option<RawHook>,
    /// How a relocation moves the service's VMs: `cold` or `live`.
    pub vm_mode: Option<String>,
    pub live: Option<RawLive>,
}

/// `[services.NAME.live]`: the bounds of a live VM migration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLive {
    pub downtime_limit_ms: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub max_mib_per_sec: Option<f64>,
    /// `cold` or `rollback`.
    pub fallback: Option<String>,
}

/// A program or a webhook the conduit calls at one step of a relocation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHook {
    /// Program and arguments, run without a shell.
    pub command: Option<Vec<String>>,
    /// Webhook receiving an HTTP POST.
    pub url: Option<String>,
    /// Webhook: bearer token file.
    pub token_file: Option<String>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawComponent {
    pub kind: String,
    pub name: String,
    pub size_gib: Option<f64>,
    pub vcpus: Option<u32>,
    pub memory_gib: Option<f64>,
    /// `bucket`: keep the data at the source provider and reconfigure the app to reach it.
    #[serde(default)]
    pub keep_at_source: bool,
    /// `bucket`: the provider the bucket lives at, when not the service's own; it stays
    /// there when the service moves.
    pub provider: Option<String>,
    /// Driver-specific settings of the component (image path, app command, config rules…).
    #[serde(default)]
    pub settings: toml::Table,
}
