//! Telemetry: the one Prometheus registry of the daemon ([`Metrics`]) and the tracing
//! subscriber (text, JSON or journald).
//!
//! Every series is created here, named with the `fluidcloud_` prefix and base units, and
//! initialised at start for the labels the configuration makes known, so a dashboard shows
//! zeros rather than gaps.
//!
//! [`redact_url`] is how a URL is shown anywhere (logs, errors, the API): without the
//! credentials and signatures it may carry.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::LogFormat;

/// Reasons a guard rail can suppress a decision; also the `reason` label values.
pub const SUPPRESSION_REASONS: &[&str] = &[
    "pinned",
    "unknown_target",
    "stale_data",
    "market_shock",
    "min_improvement",
    "break_even",
    "confirmations",
    "min_residency",
    "cooldown",
    "blackout",
    "concurrency_budget",
    "window_budget",
    "max_relocations_percent",
    "already_relocating",
    "conduit_refused",
];

/// Outcomes of a decision; also the `outcome` label values.
pub const OUTCOMES: &[&str] = &[
    "stay",
    "suppressed",
    "audited",
    "pending_approval",
    "submitted",
    "approved",
    "rejected",
    "error",
];

pub struct Metrics {
    pub registry: Registry,
    pub poll_runs: IntCounterVec,
    pub poll_errors: IntCounterVec,
    pub poll_duration: HistogramVec,
    pub poll_last_success: GaugeVec,
    pub data_age: GaugeVec,
    pub data_stale: IntGaugeVec,
    pub rows_rejected: IntCounterVec,
    pub market_offers: IntGaugeVec,
    pub ticks_skipped: IntCounterVec,
    pub polls_deferred: IntCounterVec,
    pub policy_evaluations: IntCounterVec,
    pub policy_duration: HistogramVec,
    pub policy_tick_duration: Histogram,
    pub decisions: IntCounterVec,
    pub suppressions: IntCounterVec,
    pub service_monthly_cost: GaugeVec,
    pub service_savings: GaugeVec,
    pub relocations_requested: IntCounterVec,
    pub relocations_active: IntGauge,
    pub relocations_started: IntCounterVec,
    pub relocations_refused: IntCounterVec,
    pub relocation_cancels: IntCounterVec,
    pub relocations_finished: IntCounterVec,
    pub relocation_phase_duration: HistogramVec,
    pub relocation_bytes_read: IntCounterVec,
    pub relocation_bytes_sent: IntCounterVec,
    pub relocation_throughput: GaugeVec,
    pub cutover_downtime: Histogram,
    pub cutover_downtime_last: GaugeVec,
    pub vm_migrations: IntCounterVec,
    pub vm_migration_downtime: Histogram,
    pub vm_migration_passes: Histogram,
    pub vm_migration_dirty_rate: GaugeVec,
    pub vm_migration_bytes: IntCounterVec,
    pub reloads: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub build_info: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("metric definition");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        let secs = vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        let metrics = Metrics {
            poll_runs: reg!(IntCounterVec::new(
                Opts::new("fluidcloud_poll_runs_total", "Market source polls started."),
                &["source"]
            )),
            poll_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_poll_errors_total",
                    "Market source polls that failed."
                ),
                &["source"]
            )),
            poll_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "fluidcloud_poll_duration_seconds",
                    "Time one poll of a market source took."
                )
                .buckets(secs.clone()),
                &["source"]
            )),
            poll_last_success: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_poll_last_success_timestamp_seconds",
                    "Unix time of the last successful poll of a source."
                ),
                &["source"]
            )),
            data_age: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_market_data_age_seconds",
                    "Age of the market data of a source (-1 when there never was good data)."
                ),
                &["source"]
            )),
            data_stale: reg!(IntGaugeVec::new(
                Opts::new(
                    "fluidcloud_market_data_stale",
                    "1 when the last poll of a source failed (older data, if any, is served)."
                ),
                &["source"]
            )),
            rows_rejected: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_pricing_rows_rejected_total",
                    "Feed rows refused (price negative, zero, below the floor, NaN or absurd, unknown size, currency), also in a poll that failed because every row was."
                ),
                &["source"]
            )),
            market_offers: reg!(IntGaugeVec::new(
                Opts::new(
                    "fluidcloud_market_offers",
                    "Offers known for a provider in the current market snapshot."
                ),
                &["provider"]
            )),
            ticks_skipped: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_ticks_skipped_total",
                    "Scheduler ticks skipped because the previous run was still busy."
                ),
                &["task"]
            )),
            polls_deferred: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_polls_deferred_total",
                    "Scheduled polls not started because the source asked to be polled later (Retry-After on HTTP 429 or 503)."
                ),
                &["source"]
            )),
            policy_evaluations: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_policy_evaluations_total",
                    "Policy evaluations, by policy and result (ok or error)."
                ),
                &["policy", "result"]
            )),
            policy_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "fluidcloud_policy_evaluation_duration_seconds",
                    "Time one policy evaluation of one service took."
                )
                .buckets(vec![
                    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0
                ]),
                &["policy"]
            )),
            policy_tick_duration: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "fluidcloud_evaluation_tick_duration_seconds",
                    "Time one evaluation tick over all services took."
                )
                .buckets(secs)
            )),
            decisions: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_decisions_total",
                    "Decisions logged, by outcome."
                ),
                &["outcome"]
            )),
            suppressions: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_suppressions_total",
                    "Relocations a guard rail suppressed, by the first rail that refused."
                ),
                &["reason"]
            )),
            service_monthly_cost: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_service_monthly_cost",
                    "Projected monthly cost of a service where it runs, in the feed's currency."
                ),
                &["service", "provider", "currency"]
            )),
            service_savings: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_service_projected_monthly_savings",
                    "Monthly savings of the cheapest fitting offer elsewhere (negative: none)."
                ),
                &["service", "currency"]
            )),
            relocations_requested: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocations_requested_total",
                    "Relocations handed to the conduit, by origin (policy or operator)."
                ),
                &["origin"]
            )),
            relocations_active: reg!(IntGauge::new(
                "fluidcloud_relocations_active",
                "Relocations queued or running in the conduit."
            )),
            relocations_started: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocations_started_total",
                    "Relocations the conduit started executing, by origin."
                ),
                &["origin"]
            )),
            relocations_refused: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocations_refused_total",
                    "Relocations the conduit refused when they were handed to it (the service is already relocating, or no plan could be made), by origin."
                ),
                &["origin"]
            )),
            relocation_cancels: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocation_cancels_total",
                    "Cancels of relocations asked by operators, by result: accepted (the relocation rolls back), refused (too late: committed, rolling back or ended), unknown."
                ),
                &["result"]
            )),
            relocations_finished: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocations_finished_total",
                    "Relocations that ended, by outcome: completed (the target took over), rolled_back (the source runs again) or failed (needs an operator)."
                ),
                &["outcome"]
            )),
            relocation_phase_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "fluidcloud_relocation_phase_duration_seconds",
                    "Time spent in each phase of a relocation (precopy, cutover, rollback, decommission)."
                )
                .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0]),
                &["phase"]
            )),
            relocation_bytes_read: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocation_bytes_read_total",
                    "Bytes read from sources by viaducts, by kind of data (volume or bucket)."
                ),
                &["kind"]
            )),
            relocation_bytes_sent: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_relocation_bytes_sent_total",
                    "Bytes viaducts wrote to or sent towards targets, by kind of data (volume or bucket)."
                ),
                &["kind"]
            )),
            relocation_throughput: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_relocation_throughput_bytes_per_second",
                    "Read throughput of the last finished transfer, by kind of data."
                ),
                &["kind"]
            )),
            cutover_downtime: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "fluidcloud_cutover_downtime_seconds",
                    "Time from stopping the source to the target passing its health check."
                )
                .buckets(vec![0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
            )),
            cutover_downtime_last: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_cutover_downtime_last_seconds",
                    "Downtime of the last cutover, by service."
                ),
                &["service"]
            )),
            vm_migrations: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_vm_migrations_total",
                    "Live VM migrations, by result: completed, fell_back (moved cold instead), failed."
                ),
                &["result"]
            )),
            vm_migration_downtime: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "fluidcloud_vm_migration_downtime_seconds",
                    "How long a live-migrated guest did not run: from its pause for the last pass to it going on at the target."
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            )),
            vm_migration_passes: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "fluidcloud_vm_migration_passes",
                    "Passes over guest memory a live migration took."
                )
                .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]),
            )),
            vm_migration_dirty_rate: reg!(GaugeVec::new(
                Opts::new(
                    "fluidcloud_vm_migration_dirty_pages_per_second",
                    "Guest pages dirtied per second during the last live migration, by service."
                ),
                &["service"]
            )),
            vm_migration_bytes: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_vm_migration_bytes_total",
                    "Bytes live migrations sent, by kind: memory, disk."
                ),
                &["kind"]
            )),
            reloads: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_config_reloads_total",
                    "Configuration reloads, by result (ok or error)."
                ),
                &["result"]
            )),
            api_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "fluidcloud_api_requests_total",
                    "HTTP API requests, by route and status code."
                ),
                &["route", "status"]
            )),
            build_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "fluidcloud_build_info",
                    "Build of the running daemon (always 1)."
                ),
                &["version"]
            )),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for o in OUTCOMES {
            metrics.decisions.with_label_values(&[o]);
        }
        for r in SUPPRESSION_REASONS {
            metrics.suppressions.with_label_values(&[r]);
        }
        for o in ["policy", "operator"] {
            metrics.relocations_requested.with_label_values(&[o]);
        }
        for r in ["ok", "error"] {
            metrics.reloads.with_label_values(&[r]);
        }
        for o in ["policy", "operator"] {
            metrics.relocations_started.with_label_values(&[o]);
            metrics.relocations_refused.with_label_values(&[o]);
        }
        for r in ["accepted", "refused", "unknown"] {
            metrics.relocation_cancels.with_label_values(&[r]);
        }
        for o in ["completed", "rolled_back", "failed"] {
            metrics.relocations_finished.with_label_values(&[o]);
        }
        for k in ["volume", "bucket"] {
            metrics.relocation_bytes_read.with_label_values(&[k]);
            metrics.relocation_bytes_sent.with_label_values(&[k]);
        }
        for r in ["completed", "fell_back", "failed"] {
            metrics.vm_migrations.with_label_values(&[r]);
        }
        for k in ["memory", "disk"] {
            metrics.vm_migration_bytes.with_label_values(&[k]);
        }
        metrics
    }

    /// Creates the per-source series so they read 0 before the first poll.
    pub fn init_source(&self, source: &str) {
        self.poll_runs.with_label_values(&[source]);
        self.poll_errors.with_label_values(&[source]);
        self.poll_duration.with_label_values(&[source]);
        self.data_stale.with_label_values(&[source]);
        self.data_age.with_label_values(&[source]).set(-1.0);
        self.rows_rejected.with_label_values(&[source]);
        self.ticks_skipped.with_label_values(&[source]);
        self.polls_deferred.with_label_values(&[source]);
    }

    pub fn init_policy(&self, policy: &str) {
        for r in ["ok", "error"] {
            self.policy_evaluations.with_label_values(&[policy, r]);
        }
        self.policy_duration.with_label_values(&[policy]);
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_cron_scheduler=warn"));
    let format = match format {
        // systemd sets JOURNAL_STREAM when stderr is connected to the journal.
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => {
                registry
                    .with(layer.with_syslog_identifier("fluidcloud".into()))
                    .init();
            }
            Err(e) => {
                let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
                registry.with(fmt).init();
                tracing::warn!(
                    "The journal is not reachable ({e}); logging to standard error instead."
                );
            }
        },
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        _ => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

pub use crate::sys::redact::redact_url;

mod agent;
pub use agent::{AgentMetrics, AGENT_OPS};
