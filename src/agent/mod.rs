//! The agent: a long-running process on a host that owns the host's providers (it holds
//! their root locks) and serves them to the daemon over mutual TLS, plus the ends of the
//! viaducts that carry data straight from one agent to another.
//!
//! - [`server`]: the HTTPS API, one call per operation of the provider trait
//!   ([`crate::providers::remote`] is its client in the daemon).
//! - `/metrics` on a separate plain-HTTP listener, for Prometheus.

pub mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::providers::Provider;
use crate::sys::tls::{Identity, Role, TlsListener};
use crate::telemetry::AgentMetrics;

/// What an agent runs with.
pub struct Agent {
    pub identity: Identity,
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    pub metrics: AgentMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] crate::sys::tls::TlsError),
    #[error("the {what} listener failed: {source}")]
    Serve {
        what: &'static str,
        source: std::io::Error,
    },
}

impl Agent {
    /// Serves the API on `api` (HTTPS, the daemon only) and, when given, `/metrics` on
    /// `metrics` (plain HTTP), until `shutdown` completes.
    pub async fn run(
        self,
        api: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        let tls = TlsListener::new(api, self.identity.server_config()?, &[Role::Daemon]);
        let state = Arc::new(server::ApiState {
            providers: self.providers,
            metrics: self.metrics.clone(),
        });
        // Prometheus scrapes are short: the metrics listener simply ends with the API.
        let metrics_task = metrics.map(|listener| {
            let m = self.metrics.clone();
            let router = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = m.clone();
                    async move { m.encode() }
                }),
            );
            tokio::spawn(async move { axum::serve(listener, router).await })
        });
        let served = axum::serve(tls, server::router(state))
            .with_graceful_shutdown(shutdown)
            .await;
        if let Some(t) = metrics_task {
            if t.is_finished() {
                if let Ok(Err(source)) = t.await {
                    return Err(AgentError::Serve {
                        what: "metrics",
                        source,
                    });
                }
            } else {
                t.abort();
            }
        }
        served.map_err(|source| AgentError::Serve {
            what: "API",
            source,
        })
    }
}

#[cfg(test)]
mod tests;
