//! The `[daemon]`, `[broker]` and `[conduit]` sections: where the daemon keeps its state
//! and serves its API, how often and how boldly the broker decides, how relocations run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawBroker, RawConduit, RawDaemon};
use super::Validator;
use crate::model::bucket_copy;

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
    /// Cap on what a volume copy between hosts puts on the wire per second
    /// (`volume_max_mib_per_sec`), per volume. Default none.
    pub volume_max_bytes_per_sec: Option<u64>,
    /// Volume and bucket copies of one relocation phase that run at the same time
    /// (`transfer_concurrency`, 1 to 64). Default 4.
    pub transfer_concurrency: usize,
}

const DEFAULT_LISTEN: &str = "127.0.0.1:7480";
const EVERY_MINUTE: &str = "0 * * * * *";

impl Validator<'_> {
    pub(super) fn daemon(&mut self, raw: RawDaemon) -> DaemonSettings {
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

    pub(super) fn broker(&mut self, raw: RawBroker) -> BrokerSettings {
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

    pub(super) fn conduit(&mut self, raw: RawConduit) -> ConduitSettings {
        ConduitSettings {
            grace_period: Duration::from_secs(raw.grace_period_secs.unwrap_or(3600)),
            stop_timeout: Duration::from_secs(self.at_least(
                "conduit.stop_timeout_secs",
                raw.stop_timeout_secs,
                30,
                1,
            )),
            kill_after_stop_timeout: raw.kill_after_stop_timeout.unwrap_or(false),
            health_timeout: Duration::from_secs(self.at_least(
                "conduit.health_timeout_secs",
                raw.health_timeout_secs,
                60,
                1,
            )),
            bucket_concurrency: {
                let n = self.at_least(
                    "conduit.bucket_concurrency",
                    raw.bucket_concurrency,
                    bucket_copy::DEFAULT_CONCURRENCY as u64,
                    1,
                );
                let max = bucket_copy::MAX_CONCURRENCY as u64;
                if n > max {
                    self.err(
                        "conduit.bucket_concurrency",
                        format!("must be at most {max}, got {n}"),
                    );
                }
                n.min(max) as usize
            },
            bucket_max_bytes_per_sec: raw.bucket_max_mib_per_sec.map(|_| {
                self.at_least(
                    "conduit.bucket_max_mib_per_sec",
                    raw.bucket_max_mib_per_sec,
                    1,
                    1,
                ) << 20
            }),
            volume_max_bytes_per_sec: raw.volume_max_mib_per_sec.map(|_| {
                self.at_least(
                    "conduit.volume_max_mib_per_sec",
                    raw.volume_max_mib_per_sec,
                    1,
                    1,
                ) << 20
            }),
            transfer_concurrency: {
                let n = self.at_least(
                    "conduit.transfer_concurrency",
                    raw.transfer_concurrency,
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
        }
    }
}
