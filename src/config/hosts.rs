//! Across hosts: the `[tls]` section (the certificate this process proves who it is with,
//! and the authority it trusts), the `[agent]` section of an agent's own configuration, and
//! a provider's `agent = "https://HOST:PORT"` naming the agent that serves it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::raw::{RawAgent, RawTls};
use super::{Provider, Validator};
use crate::model::Driver;
use crate::sys::tls::{Identity, TlsFiles};

/// Where an agent listens by default: its API (HTTPS, the daemon only).
pub const DEFAULT_AGENT_LISTEN: &str = "0.0.0.0:7481";
/// Where an agent's viaduct receiver listens by default (TLS, other agents only).
pub const DEFAULT_VIADUCT_LISTEN: &str = "0.0.0.0:7482";

/// The `[agent]` section: what `fluidcloud agent` serves, and where.
#[derive(Debug, Clone, Serialize)]
pub struct AgentSettings {
    /// The address the daemon and the other agents reach this host at, and that apps and
    /// health checks use; its certificate must name it.
    pub advertise: String,
    pub listen: SocketAddr,
    pub viaduct_listen: SocketAddr,
    /// `HOST:PORT` the senders are told to reach the viaduct receiver at, when a NAT or a
    /// port forward stands between them and `viaduct_listen`; by default `advertise` and
    /// the port the receiver listens on. The TLS name stays `advertise`.
    pub viaduct_advertise: Option<String>,
    /// Plain-HTTP `/metrics`; none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Where received images are staged. Default `/var/lib/fluidcloud-agent`, or
    /// `$STATE_DIRECTORY` when systemd sets it.
    pub state_dir: PathBuf,
}

impl Validator<'_> {
    pub(super) fn tls(&mut self, raw: Option<RawTls>) -> Option<TlsFiles> {
        let raw = raw?;
        let files = TlsFiles {
            ca: self.path(&raw.ca),
            cert: self.path(&raw.cert),
            key: self.path(&raw.key),
        };
        // Loading checks the files as the process will: readable, PEM, the key private to
        // its owner, the certificate naming a party and matching the key.
        if let Err(e) = Identity::load(&files) {
            self.err("tls", e.to_string());
        }
        Some(files)
    }

    fn socket(&mut self, key: &str, value: Option<String>, default: &str) -> SocketAddr {
        let s = value.unwrap_or_else(|| default.to_string());
        s.parse().unwrap_or_else(|_| {
            self.err(
                key,
                format!("`{s}` is not an address and port such as {default}"),
            );
            default.parse().expect("default address")
        })
    }

    pub(super) fn agent(
        &mut self,
        raw: Option<RawAgent>,
        tls: &Option<TlsFiles>,
    ) -> Option<AgentSettings> {
        let raw = raw?;
        if tls.is_none() {
            self.err(
                "agent",
                "an agent needs the [tls] section (ca, cert, key): the daemon and the other agents accept only parties of their authority",
            );
        }
        if crate::sys::tls::server_name(&raw.advertise).is_err() {
            self.err(
                "agent.advertise",
                format!(
                    "`{}` is neither a host name nor an IP address",
                    raw.advertise
                ),
            );
        }
        let listen = self.socket("agent.listen", raw.listen, DEFAULT_AGENT_LISTEN);
        let viaduct_listen = self.socket(
            "agent.viaduct_listen",
            raw.viaduct_listen,
            DEFAULT_VIADUCT_LISTEN,
        );
        let viaduct_advertise = raw.viaduct_advertise.and_then(|a| {
            if host_and_port(&a) {
                Some(a)
            } else {
                self.err(
                    "agent.viaduct_advertise",
                    format!("`{a}` is not a host and port such as 203.0.113.7:7482"),
                );
                None
            }
        });
        let metrics_listen = raw
            .metrics_listen
            .map(|m| self.socket("agent.metrics_listen", Some(m), "127.0.0.1:9482"));
        let state_dir = match raw.state_dir {
            Some(d) => self.path(&d),
            None => std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/fluidcloud-agent")),
        };
        Some(AgentSettings {
            advertise: raw.advertise,
            listen,
            viaduct_listen,
            viaduct_advertise,
            metrics_listen,
            state_dir,
        })
    }

    /// Checks a provider's `agent` and what may go with it.
    pub(super) fn provider_agent(&mut self, key: &str, driver: Driver, agent: &str) {
        let uri: Result<http::Uri, _> = agent.parse();
        let ok = uri.as_ref().is_ok_and(|u| {
            u.scheme_str() == Some("https")
                && u.authority().is_some_and(|a| a.port_u16().is_some())
                && matches!(u.path(), "" | "/")
                && u.query().is_none()
        });
        if !ok {
            self.err(
                format!("{key}.agent"),
                format!("`{agent}` is not an agent's address such as https://10.0.0.2:7481"),
            );
        }
        if !matches!(driver, Driver::Local | Driver::Qemu) {
            self.err(
                format!("{key}.agent"),
                format!(
                    "the `{driver}` driver runs in the daemon; only `local` and `qemu` providers are served by agents"
                ),
            );
        }
    }

    /// What only makes sense once all providers and the `[tls]` section are read.
    pub(super) fn hosts(
        &mut self,
        providers: &mut std::collections::BTreeMap<String, Provider>,
        tls: &Option<TlsFiles>,
        is_agent: bool,
    ) {
        for (name, p) in providers.iter_mut() {
            if p.agent.is_none() {
                continue;
            }
            let key = format!("providers.{name}.agent");
            if is_agent {
                self.err(
                    key,
                    "an agent serves its own providers; `agent` belongs in the daemon's configuration",
                );
            } else if tls.is_none() {
                self.err(
                    key,
                    "a provider on another host needs the [tls] section (ca, cert, key) the daemon proves who it is with",
                );
            }
            p.tls = tls.clone();
        }
    }
}

/// `HOST:PORT`: a host name or IP address (an IPv6 one in brackets) and a port above 0.
fn host_and_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => match v6.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            _ => return false,
        },
        None if host.contains(':') => return false,
        None => host,
    };
    port.parse::<u16>().is_ok_and(|p| p > 0) && crate::sys::tls::server_name(host).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_viaduct_address_to_advertise_is_a_host_and_a_port() {
        for ok in [
            "203.0.113.7:7482",
            "nat.example.net:17482",
            "[2001:db8::1]:7482",
        ] {
            assert!(super::host_and_port(ok), "{ok}");
        }
        for bad in [
            "203.0.113.7",
            "nat.example.net:0",
            "nat.example.net:70000",
            "2001:db8::1:7482",
            "[nat.example.net]:7482",
            "not a host:7482",
            ":7482",
        ] {
            assert!(!super::host_and_port(bad), "{bad}");
        }
    }
}
