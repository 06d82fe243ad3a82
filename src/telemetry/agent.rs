//! The series an agent exports on its own `/metrics`: calls it answered, and the bytes its
//! viaducts and object streams carried, by direction.

use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// An agent's metrics; cheap to clone (the series are shared).
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    calls: IntCounterVec,
    call_errors: IntCounter,
    object_bytes: IntCounterVec,
    viaduct_bytes: IntCounterVec,
    transfers: IntCounterVec,
}

/// Operations an agent answers; also the `op` label values.
pub const AGENT_OPS: &[&str] = &[
    "describe",
    "operation",
    "volume_info",
    "list_volumes",
    "create_volume",
    "delete_volume",
    "ensure_bucket",
    "delete_bucket",
    "list_objects",
    "list_non_objects",
    "stat_object",
    "delete_object",
    "bucket_location",
    "read_object",
    "write_object",
    "start_app",
    "stop_app",
    "app_status",
    "app_endpoint",
    "remove_app",
    "write_app_file",
    "read_app_file",
    "check_vm",
    "start_vm",
    "stop_vm",
    "vm_status",
    "remove_vm",
    "free_bytes",
    "send_volume",
    "receive_volume",
];

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "fluidcloud_agent_calls_total",
                "Calls the agent answered, by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let call_errors = IntCounter::new(
            "fluidcloud_agent_call_errors_total",
            "Calls the agent answered with an error.",
        )
        .expect("valid metric");
        let object_bytes = IntCounterVec::new(
            Opts::new(
                "fluidcloud_agent_object_bytes_total",
                "Object content the agent streamed, by direction (sent, received).",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let viaduct_bytes = IntCounterVec::new(
            Opts::new(
                "fluidcloud_agent_viaduct_bytes_total",
                "Bytes the agent's viaducts put on or took off the wire, by direction (sent, received).",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let transfers = IntCounterVec::new(
            Opts::new(
                "fluidcloud_agent_viaduct_transfers_total",
                "Viaduct transfers that ended, by direction (sent, received) and result (ok, error).",
            ),
            &["direction", "result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(call_errors.clone()),
            Box::new(object_bytes.clone()),
            Box::new(viaduct_bytes.clone()),
            Box::new(transfers.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        for op in AGENT_OPS {
            calls.with_label_values(&[op]);
        }
        for d in ["sent", "received"] {
            object_bytes.with_label_values(&[d]);
            viaduct_bytes.with_label_values(&[d]);
            for r in ["ok", "error"] {
                transfers.with_label_values(&[d, r]);
            }
        }
        AgentMetrics {
            registry,
            calls,
            call_errors,
            object_bytes,
            viaduct_bytes,
            transfers,
        }
    }

    pub fn call(&self, op: &str) {
        self.calls.with_label_values(&[op]).inc();
    }

    pub fn call_failed(&self) {
        self.call_errors.inc();
    }

    pub fn object_bytes_sent(&self, n: u64) {
        self.object_bytes.with_label_values(&["sent"]).inc_by(n);
    }

    pub fn object_bytes_received(&self, n: u64) {
        self.object_bytes.with_label_values(&["received"]).inc_by(n);
    }

    pub fn viaduct_bytes(&self, direction: &str, n: u64) {
        self.viaduct_bytes.with_label_values(&[direction]).inc_by(n);
    }

    pub fn transfer(&self, direction: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.transfers.with_label_values(&[direction, result]).inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}
