//! The `[providers.NAME.pricing]` and `[providers.NAME.benchmark]` sections: where a
//! provider's prices and IO figures come from, how often, and what is too old or absurd.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawBenchmark, RawPricing};
use super::Validator;
use crate::sys::redact::redact_url;

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

const EVERY_HOUR: &str = "0 0 * * * *";

impl Validator<'_> {
    pub(super) fn pricing(
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
                    redact_url(&raw.url)
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

    pub(super) fn benchmark(&mut self, key: &str, raw: RawBenchmark) -> BenchmarkSource {
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
}
