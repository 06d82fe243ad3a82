//! The agent: a long-running process on a host that owns the host's providers (it holds
//! their root locks) and serves them to the daemon over mutual TLS, plus the ends of the
//! viaducts that carry data straight from one agent to another.
//!
//! - [`server`]: the HTTPS API, one call per operation of the provider trait
//!   ([`crate::providers::remote`] is its client in the daemon).
//! - [`transfers`]: the viaduct's sends and the adoption of received images.
//! - [`precopy`]: the passes of a VM's pre-copy, read on this host into staging images
//!   that [`transfers`] sends.
//! - `/metrics` on a separate plain-HTTP listener, for Prometheus.

pub mod buckets;
pub mod precopy;
pub mod server;
pub mod transfers;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::providers::Provider;
use crate::sys::tls::{Caller, Identity, Role, TlsListener};
use crate::telemetry::AgentMetrics;

/// What an agent runs with.
pub struct Agent {
    pub identity: Identity,
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    pub metrics: AgentMetrics,
    /// The address other hosts reach this one at (its certificate names it).
    pub advertise: String,
    /// `HOST:PORT` the senders are told to reach the viaduct receiver at, when not
    /// `advertise` and the port it listens on.
    pub viaduct_advertise: Option<String>,
    /// Where received images are staged before they become volumes.
    pub incoming: std::path::PathBuf,
    /// Where pre-copy passes of this host's VMs are read into, to be sent from.
    pub precopy: std::path::PathBuf,
}

/// The sockets an agent serves on.
pub struct Listeners {
    /// The HTTPS API, for the daemon.
    pub api: TcpListener,
    /// The viaduct receiver, for other agents; without it this agent only sends.
    pub viaduct: Option<TcpListener>,
    /// `/metrics`, plain HTTP.
    pub metrics: Option<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] crate::sys::tls::TlsError),
    #[error("cannot prepare {}: {source}", path.display())]
    Incoming {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the viaduct receiver failed: {0}")]
    Viaduct(#[from] crate::viaduct::ViaductError),
    #[error("the {what} listener failed: {source}")]
    Serve {
        what: &'static str,
        source: std::io::Error,
    },
}

impl Agent {
    /// Serves the API (HTTPS, the daemon only), the viaduct receiver (TLS, agents only) and
    /// `/metrics` until `shutdown` completes.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        let Listeners {
            api,
            viaduct,
            metrics,
        } = listeners;
        // The daemon calls everything; other agents read objects (a bucket pulled).
        let tls = TlsListener::new(
            api,
            self.identity.server_config()?,
            &[Role::Daemon, Role::Agent],
        );
        let stop_viaduct = tokio_util::sync::CancellationToken::new();
        let mut receiver = None;
        let mut receiver_task = None;
        if let Some(listener) = viaduct {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.incoming)
                .map_err(|source| AgentError::Incoming {
                    path: self.incoming.clone(),
                    source,
                })?;
            let port = listener
                .local_addr()
                .map_err(|source| AgentError::Serve {
                    what: "viaduct",
                    source,
                })?
                .port();
            let secret = transfers::random_secret();
            let key = crate::viaduct::PresharedKey::from_secret(secret.as_bytes())
                .expect("64 hex digits are a long enough secret");
            let mut opts = crate::viaduct::ReceiverOptions::new(&self.incoming, key);
            opts.tls = Some(self.identity.server_config()?);
            opts.shutdown = stop_viaduct.clone();
            let received = transfers::Received::default();
            opts.on_commit = Some(received.hook());
            // Received images are staging copies only the agent reads (to adopt them).
            opts.staging = true;
            let host = if self.advertise.contains(':') {
                format!("[{}]", self.advertise)
            } else {
                self.advertise.clone()
            };
            receiver = Some(transfers::Receiver {
                info: crate::providers::remote::wire::ReceiverInfo {
                    addr: self
                        .viaduct_advertise
                        .clone()
                        .unwrap_or_else(|| format!("{host}:{port}")),
                    server_name: self.advertise.clone(),
                    secret,
                },
                incoming: self.incoming.clone(),
                received,
            });
            receiver_task = Some(tokio::spawn(crate::viaduct::serve(listener, opts)));
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.precopy)
                .map_err(|source| AgentError::Incoming {
                    path: self.precopy.clone(),
                    source,
                })?;
        }
        let transfers = Arc::new(transfers::Transfers::new(
            receiver,
            self.precopy.clone(),
            &self.identity,
            self.metrics.clone(),
        )?);
        let pulls = Arc::new(buckets::Pulls::new(Arc::new(self.identity)));
        let state = Arc::new(server::ApiState {
            providers: self.providers,
            metrics: self.metrics.clone(),
            transfers,
            pulls,
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
        let served = axum::serve(
            tls,
            server::router(state).into_make_service_with_connect_info::<Caller>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        stop_viaduct.cancel();
        if let Some(t) = receiver_task {
            if let Ok(Err(e)) = t.await {
                return Err(e.into());
            }
        }
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

/// Why an agent's configuration cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("{}: the file has no [agent] section: it is not an agent's configuration", path.display())]
    NotAnAgent { path: std::path::PathBuf },
    #[error("{}: an agent needs the [tls] section", path.display())]
    NoTls { path: std::path::PathBuf },
    #[error(
        "provider `{provider}`: an agent serves only `local` and `qemu` providers, not `{driver}`"
    )]
    Driver {
        provider: String,
        driver: crate::model::Driver,
    },
    #[error("{}: the agent serves no provider", path.display())]
    NoProvider { path: std::path::PathBuf },
    #[error(transparent)]
    Tls(#[from] crate::sys::tls::TlsError),
    #[error(transparent)]
    Provider(#[from] crate::providers::ProviderError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] AgentError),
}

/// What `fluidcloud agent --check` and the agent's start check: an `[agent]` and a `[tls]`
/// section, and only providers an agent can serve.
pub fn check(config: &crate::config::Config) -> Result<(), AgentConfigError> {
    let path = config.path.clone();
    if config.agent.is_none() {
        return Err(AgentConfigError::NotAnAgent { path });
    }
    let Some(files) = &config.tls else {
        return Err(AgentConfigError::NoTls { path });
    };
    Identity::load(files)?;
    if config.providers.is_empty() {
        return Err(AgentConfigError::NoProvider { path });
    }
    for (name, p) in &config.providers {
        if !matches!(
            p.driver,
            crate::model::Driver::Local | crate::model::Driver::Qemu
        ) {
            return Err(AgentConfigError::Driver {
                provider: name.clone(),
                driver: p.driver,
            });
        }
    }
    Ok(())
}

/// Runs the agent a configuration describes until `shutdown` completes: opens its
/// providers (holding their root locks until the process exits), listens and serves.
pub async fn serve(
    config: &crate::config::Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentConfigError> {
    check(config)?;
    let settings = config.agent.as_ref().expect("checked");
    let identity = Identity::load(config.tls.as_ref().expect("checked"))?;
    crate::providers::keep_root_locks_until_exit();
    let mut providers = BTreeMap::new();
    for (name, p) in &config.providers {
        // Its apps are reached at the address the agent is reached at.
        let mut p = p.clone();
        p.address.get_or_insert_with(|| settings.advertise.clone());
        providers.insert(name.clone(), crate::providers::open(&p)?);
    }
    let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| AgentConfigError::Bind { what, addr, source })
    };
    let listeners = Listeners {
        api: bind("API", settings.listen).await?,
        viaduct: Some(bind("viaduct", settings.viaduct_listen).await?),
        metrics: match settings.metrics_listen {
            Some(a) => Some(bind("metrics", a).await?),
            None => None,
        },
    };
    tracing::info!(
        "The agent `{}` serves {} on {} (viaduct {}), reached as {}{}.",
        identity.me().name,
        providers.keys().cloned().collect::<Vec<_>>().join(", "),
        settings.listen,
        settings.viaduct_listen,
        settings.advertise,
        match &settings.viaduct_advertise {
            Some(a) => format!(" (viaduct at {a})"),
            None => String::new(),
        }
    );
    let agent = Agent {
        identity,
        providers,
        metrics: AgentMetrics::new(),
        advertise: settings.advertise.clone(),
        viaduct_advertise: settings.viaduct_advertise.clone(),
        incoming: settings.state_dir.join("incoming"),
        precopy: settings.state_dir.join("precopy"),
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    agent.run(listeners, shutdown).await?;
    Ok(())
}
