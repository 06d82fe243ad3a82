//! The vocabulary shared by every part of FluidCloud: service instances and their
//! components, provider offers, measured IO figures, region facts and the immutable
//! market snapshot the Broker publishes after each poll.
//!
//! Services are described by [`ServiceSpec`] and [`Component`]; a component's settings are
//! typed for its kind ([`ComponentSettings`]: an [`AppSpec`], a [`VmSpec`], a
//! [`ConfigFileSpec`] or [`BucketSettings`]). Providers are kinds of [`Driver`] keeping
//! disks in a [`DiskFormat`]; [`names`] holds what a name may be.
//!
//! Everything here is plain data with its own invariants. Parsing lives in `config` and in
//! the pollers; decisions live in `broker` and `policy`.

mod app;
pub mod config_file;
pub mod names;
mod provider;
mod service;
mod vm;

pub use app::{AppSpec, Env};
pub use config_file::{ConfigFileSpec, ConfigFormat, RewriteRule};
pub use provider::{bucket_copy, DiskFormat, Driver};
pub use service::{
    BucketSettings, Component, ComponentSettings, HealthCheck, HookSpec, HookTarget, LiveFallback,
    ServiceSpec, VmMode, VmMoves, GIB,
};
pub use vm::{PortForward, VmSpec, MAX_VCPUS, MIN_MEMORY_MIB};

mod placement;
pub use placement::{Placement, PlacementBook, PlacementReadError, Placements};

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A `Duration` as fractional seconds in JSON (`#[serde(with = "crate::model::secs_f64")]`).
pub mod secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Hours in an average month (365 × 24 / 12); how hourly prices become monthly costs.
pub const HOURS_PER_MONTH: f64 = 730.0;

/// One priced compute flavor at a provider, normalised from any feed format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The configured provider this offer belongs to.
    pub provider: String,
    pub region: String,
    pub flavor: String,
    pub vcpus: u32,
    pub memory_gib: f64,
    pub price_per_hour: f64,
    /// Block storage price; `None` when the feed does not carry it.
    pub storage_price_per_gib_month: Option<f64>,
    /// Internet egress price; `None` when the feed does not carry it.
    pub egress_price_per_gib: Option<f64>,
    pub currency: String,
}

/// IO performance measured on a provider, in base-ish units people read (MB/s = 10^6 B/s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IoFigures {
    pub seq_write_mb_s: f64,
    pub seq_read_mb_s: f64,
    pub rand_read_iops: f64,
    /// Mean latency of one random read, in seconds.
    pub rand_read_latency_seconds: f64,
    pub measured_at: DateTime<Utc>,
}

/// Where a provider region is, legally speaking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegionInfo {
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
    /// ISO 3166-2 subdivision code, empty when unknown.
    pub subdivision: String,
    pub eu: bool,
    pub eea: bool,
    /// Free-form jurisdiction tags such as `gdpr`, `cloud-act`, `schrems-ii-risk`.
    pub tags: Vec<String>,
}

/// Freshness of one market data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `pricing:<provider>`, `benchmark:<provider>` or `regions`.
    pub source: String,
    pub last_success: Option<DateTime<Utc>>,
    pub last_attempt: Option<DateTime<Utc>>,
    /// True when the last attempt failed and older data is being served.
    pub stale: bool,
    pub last_error: Option<String>,
    /// Data older than this may not justify a relocation.
    pub max_age_secs: u64,
    /// Number of records the last good poll produced.
    pub records: usize,
    /// When the source asked (HTTP `Retry-After`) to be polled again; scheduled polls
    /// before then are skipped.
    #[serde(default)]
    pub retry_after: Option<DateTime<Utc>>,
}

impl SourceStatus {
    pub fn new(source: impl Into<String>, max_age_secs: u64) -> Self {
        SourceStatus {
            source: source.into(),
            last_success: None,
            last_attempt: None,
            stale: false,
            last_error: None,
            max_age_secs,
            records: 0,
            retry_after: None,
        }
    }

    /// Age of the data in seconds at `now`, `None` when there never was good data.
    pub fn age_secs(&self, now: DateTime<Utc>) -> Option<f64> {
        self.last_success
            .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
    }

    /// Whether the data is too old (or absent) to act on at `now`.
    pub fn too_old(&self, now: DateTime<Utc>) -> bool {
        match self.age_secs(now) {
            Some(age) => age > self.max_age_secs as f64,
            None => true,
        }
    }
}

/// Everything the Broker knows about the market at one instant. Published as an
/// `Arc<MarketSnapshot>` and replaced whole, never mutated in place.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MarketSnapshot {
    pub taken_at: Option<DateTime<Utc>>,
    /// Offers by provider name.
    pub offers: BTreeMap<String, Arc<Vec<Offer>>>,
    /// Latest IO figures by provider name.
    pub io: BTreeMap<String, IoFigures>,
    /// Region facts by provider name.
    pub regions: BTreeMap<String, RegionInfo>,
    /// Freshness by source name.
    pub sources: BTreeMap<String, SourceStatus>,
    /// Offers whose price fell too far at once to be trusted yet, by provider and flavor.
    #[serde(default)]
    pub price_shocks: BTreeMap<String, BTreeMap<String, PriceShock>>,
}

/// An offer whose price fell by more than its source's `max_price_drop_ratio` since the
/// last good poll: held out of relocation decisions until enough consecutive polls saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceShock {
    /// The last price that was trusted.
    pub previous_price_per_hour: f64,
    pub price_per_hour: f64,
    /// Consecutive polls that saw the fall, this one included.
    pub seen: u32,
    /// Polls that must see it before it is trusted.
    pub needed: u32,
}

/// The kind of a service component, as the paper lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    Vm,
    Volume,
    Bucket,
    App,
    Config,
}

impl ComponentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Vm => "vm",
            ComponentKind::Volume => "volume",
            ComponentKind::Bucket => "bucket",
            ComponentKind::App => "app",
            ComponentKind::Config => "config",
        }
    }
}

/// The resources a service needs from an offer to run there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Requirements {
    pub vcpus: u32,
    pub memory_gib: f64,
}

impl Requirements {
    pub fn fits(&self, offer: &Offer) -> bool {
        offer.vcpus >= self.vcpus && offer.memory_gib + 1e-9 >= self.memory_gib
    }
}

/// The longest reason a verdict carries, in bytes. A reason is read in the decision log, the
/// API and a terminal table: a few sentences, not a document. Policies' reasons are cut to it
/// (see [`bounded_reason`]); an operator's longer reason is refused.
pub const MAX_REASON_BYTES: usize = 4096;

/// `reason` as it is, or cut at a character boundary to fit [`MAX_REASON_BYTES`] with a
/// marker saying how many bytes were cut, so a runaway string cannot fill the decision log.
pub fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    // The marker's own length, with the widest count it can show.
    let marker = |cut: usize| format!(" … [{cut} more bytes cut]");
    let mut end = MAX_REASON_BYTES - marker(reason.len()).len();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &reason[..end], marker(reason.len() - end))
}

/// Outcome a policy asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Verdict {
    Stay {
        reason: String,
    },
    Relocate {
        provider: String,
        reason: String,
        /// A move the owner must make whatever it costs (a regulatory reason): the cost
        /// guard rails (improvement ratio, break-even) do not apply, the safety ones do.
        #[serde(default)]
        compulsory: bool,
    },
}

impl Verdict {
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Stay { reason } | Verdict::Relocate { reason, .. } => reason,
        }
    }
}
