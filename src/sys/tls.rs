//! Mutual TLS between the daemon, its agents and the viaducts between agents.
//!
//! One private certificate authority (made with `fluidcloud certs`, see [`super::certs`])
//! signs a certificate for every party. A certificate names its holder: the subject's common
//! name is the party's name and its organizational unit the party's [`Role`]. Both ends of
//! every connection present a certificate of that authority and check the other's; a server
//! also checks the caller's role (an agent's API answers the daemon only, a viaduct receiver
//! agents only). Only TLS 1.3 is spoken.
//!
//! The private key is read under the project's one rule for secret files
//! ([`super::secret::read`]); certificates are public and read as they are.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::secret::{self, SecretError};

/// What a party is; written into its certificate's organizational unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The daemon: drives agents.
    Daemon,
    /// An agent: serves a host's providers and the ends of viaducts.
    Agent,
}

impl Role {
    /// The organizational unit that marks the role in a certificate.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => "daemon",
            Role::Agent => "agent",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "daemon" => Some(Role::Daemon),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is at the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.role, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("the {what} {} holds no PEM certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the {what} {} is not valid PEM: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the certificate authority {} is not usable: {reason}", path.display())]
    Authority { path: PathBuf, reason: String },
    #[error(
        "the certificate {} does not name a FluidCloud party (it needs a common name and the \
         organizational unit `daemon` or `agent`; make it with `fluidcloud certs issue`)",
        path.display()
    )]
    NotAParty { path: PathBuf },
    #[error("the certificate {} and the key {} do not go together: {reason}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("`{host}` is not a host name or IP address a certificate can name")]
    ServerName { host: String },
}

/// The three files a party needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsFiles {
    /// The certificate authority's certificate (PEM).
    pub ca: PathBuf,
    /// This party's certificate (PEM), signed by the authority.
    pub cert: PathBuf,
    /// This party's private key (PEM); readable by its owner only.
    pub key: PathBuf,
}

/// A party's certificate and key with the authority it trusts, loaded and checked.
pub struct Identity {
    files: TlsFiles,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    me: Peer,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("files", &self.files)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The party a certificate names, or `None` when it names none.
pub fn party_of(cert: &CertificateDer<'_>) -> Option<Peer> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = subject
        .iter_organizational_unit()
        .find_map(|ou| ou.as_str().ok().and_then(Role::parse))?;
    Some(Peer { role, name })
}

impl Identity {
    /// Reads and checks the three files: the authority's certificate, this party's
    /// certificate (which must name a party) and its key (under the secret-file rule).
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&files.ca, "certificate authority")? {
            roots.add(cert).map_err(|e| TlsError::Authority {
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let chain = read_certs(&files.cert, "certificate")?;
        let me = party_of(&chain[0]).ok_or_else(|| TlsError::NotAParty {
            path: files.cert.clone(),
        })?;
        let key_pem = secret::read(&files.key, "private key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            what: "private key",
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
        let identity = Identity {
            files: files.clone(),
            roots: Arc::new(roots),
            chain,
            key,
            me,
        };
        // Building both configurations checks that key and certificate match.
        identity.server_config()?;
        identity.client_config()?;
        Ok(identity)
    }

    /// Who this identity is.
    pub fn me(&self) -> &Peer {
        &self.me
    }

    fn config_err(&self, e: impl fmt::Display) -> TlsError {
        TlsError::Config {
            cert: self.files.cert.clone(),
            key: self.files.key.clone(),
            reason: e.to_string(),
        }
    }

    /// A server configuration that demands a client certificate of the authority.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Authority {
            path: self.files.ca.clone(),
            reason: e.to_string(),
        })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_err(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        Ok(Arc::new(config))
    }

    /// A client configuration that trusts the authority only and presents this party's
    /// certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_err(e))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.config_err(e))?;
        Ok(Arc::new(config))
    }

    /// Connects to `addr`, expecting a certificate that names `host` (an IP address or a
    /// DNS name in its subject alternative names), and returns the stream and the party
    /// at the other end.
    pub async fn connect(
        &self,
        host: &str,
        addr: SocketAddr,
    ) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, Peer)> {
        let name = server_name(host).map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(self.client_config().map_err(std::io::Error::other)?);
        let tls = connector.connect(name, tcp).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(party_of)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host}: the server's certificate names no FluidCloud party"),
                )
            })?;
        Ok((tls, peer))
    }
}

/// The name a client checks the server's certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName {
        host: host.to_string(),
    })
}

/// A TLS stream a [`TlsListener`] accepted.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The party at the other end of an accepted stream (the listener let only parties in).
pub fn peer_of(stream: &ServerStream) -> Option<Peer> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(party_of)
}

/// Accepts TCP connections, completes their TLS handshakes concurrently (a slow client
/// holds up nobody), and hands over only connections from a party of an allowed role.
/// Refused handshakes are logged with the caller's address and the reason.
pub struct TlsListener {
    local: SocketAddr,
    rx: mpsc::Receiver<(ServerStream, SocketAddr, Peer)>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` with `config`; `allowed` lists the roles let in.
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>, allowed: &[Role]) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let allowed = allowed.to_vec();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let allowed = allowed.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    );
                    let tls = match handshake.await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::warn!(%addr, error = %e, "refused a TLS connection");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%addr, "refused a TLS connection: handshake timed out");
                            return;
                        }
                    };
                    match peer_of(&tls) {
                        Some(p) if allowed.contains(&p.role) => {
                            let _ = tx.send((tls, addr, p)).await;
                        }
                        Some(p) => {
                            tracing::warn!(%addr, peer = %p, "refused a connection: its role may not call here");
                        }
                        None => {
                            tracing::warn!(%addr, "refused a connection: its certificate names no FluidCloud party");
                        }
                    }
                });
            }
        });
        TlsListener { local, rx, task }
    }

    /// The next accepted connection from an allowed party, or `None` once the accept loop
    /// ended.
    pub async fn next(&mut self) -> Option<(ServerStream, SocketAddr, Peer)> {
        self.rx.recv().await
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who is on the other end of a connection a [`TlsListener`] accepted: handlers read it with
/// `axum::extract::ConnectInfo<Caller>` to decide what that party may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub addr: SocketAddr,
    /// `None` only for the listener's own address.
    pub peer: Option<Peer>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for Caller
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerStream;
    type Addr = Caller;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some((io, addr, peer)) => (
                io,
                Caller {
                    addr,
                    peer: Some(peer),
                },
            ),
            // The accept loop never ends on its own; if it did, wait forever like a listener
            // that gets no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Caller {
            addr: self.local,
            peer: None,
        })
    }
}

#[cfg(test)]
mod tests;
