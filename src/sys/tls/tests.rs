use std::os::unix::fs::PermissionsExt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::sys::certs;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        certs::create_authority(dir.path(), 30).unwrap();
        Pki { dir }
    }

    fn issue(&self, role: Role, name: &str) -> Identity {
        let hosts = if role == Role::Agent {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            vec![]
        };
        let w = certs::issue(self.dir.path(), role, name, &hosts, 30).unwrap();
        Identity::load(&TlsFiles {
            ca: self.dir.path().join(certs::CA_CERT),
            cert: w.cert,
            key: w.key,
        })
        .unwrap()
    }
}

/// A listener letting `allowed` in that greets every accepted party with its name.
async fn greeter(server: &Identity, allowed: &[Role]) -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut listener = TlsListener::new(tcp, server.server_config().unwrap(), allowed);
    tokio::spawn(async move {
        while let Some((mut stream, _, peer)) = listener.next().await {
            let _ = stream.write_all(peer.name.as_bytes()).await;
            let _ = stream.write_all(b"\n").await;
            let _ = stream.flush().await;
            // Keep the listener alive while the stream is read.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    addr
}

/// What the server says to `client` connecting as `host`, or the error.
async fn greeting(client: &Identity, host: &str, addr: SocketAddr) -> std::io::Result<String> {
    let (mut tls, peer) = client.connect(host, addr).await?;
    assert_eq!(peer.role, Role::Agent);
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tls.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8(out).unwrap());
        }
        out.push(byte[0]);
    }
}

#[tokio::test]
async fn parties_of_one_authority_talk_and_see_who_the_other_is() {
    let pki = Pki::new();
    let agent = pki.issue(Role::Agent, "host-a");
    let daemon = pki.issue(Role::Daemon, "broker");
    assert_eq!(
        daemon.me(),
        &Peer {
            role: Role::Daemon,
            name: "broker".into()
        }
    );
    let addr = greeter(&agent, &[Role::Daemon]).await;
    assert_eq!(
        greeting(&daemon, "127.0.0.1", addr).await.unwrap(),
        "broker"
    );
    assert_eq!(
        greeting(&daemon, "localhost", addr).await.unwrap(),
        "broker"
    );
}

#[tokio::test]
async fn a_caller_of_a_role_not_let_in_is_refused() {
    let pki = Pki::new();
    let agent = pki.issue(Role::Agent, "host-a");
    let other_agent = pki.issue(Role::Agent, "host-b");
    let addr = greeter(&agent, &[Role::Daemon]).await;
    assert!(greeting(&other_agent, "127.0.0.1", addr).await.is_err());
}

#[tokio::test]
async fn a_caller_of_another_authority_is_refused() {
    let pki = Pki::new();
    let stranger = Pki::new().issue(Role::Daemon, "broker");
    let agent = pki.issue(Role::Agent, "host-a");
    let addr = greeter(&agent, &[Role::Daemon]).await;
    assert!(greeting(&stranger, "127.0.0.1", addr).await.is_err());
}

#[tokio::test]
async fn a_caller_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let agent = pki.issue(Role::Agent, "host-a");
    let addr = greeter(&agent, &[Role::Daemon]).await;

    let mut roots = RootCertStore::empty();
    for c in read_certs(&pki.dir.path().join(certs::CA_CERT), "ca").unwrap() {
        roots.add(c).unwrap();
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(Arc::new(config));
    let result = async {
        let mut tls = connector
            .connect(server_name("127.0.0.1").unwrap(), tcp)
            .await?;
        let mut buf = [0u8; 1];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ => Ok(()),
        }
    }
    .await;
    assert!(result.is_err(), "an anonymous caller got an answer");
}

#[tokio::test]
async fn a_server_not_named_for_the_host_dialled_is_refused() {
    let pki = Pki::new();
    let agent = pki.issue(Role::Agent, "host-a");
    let daemon = pki.issue(Role::Daemon, "broker");
    let addr = greeter(&agent, &[Role::Daemon]).await;
    let err = greeting(&daemon, "10.9.9.9", addr).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[test]
fn a_key_others_can_read_is_refused() {
    let pki = Pki::new();
    let w = certs::issue(pki.dir.path(), Role::Daemon, "broker", &[], 30).unwrap();
    std::fs::set_permissions(&w.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&TlsFiles {
        ca: pki.dir.path().join(certs::CA_CERT),
        cert: w.cert,
        key: w.key.clone(),
    })
    .unwrap_err();
    assert!(matches!(err, TlsError::Secret(_)), "{err}");
    assert!(
        err.to_string().contains(&w.key.display().to_string()),
        "{err}"
    );
}

#[test]
fn the_authority_itself_names_no_party() {
    let pki = Pki::new();
    let err = Identity::load(&TlsFiles {
        ca: pki.dir.path().join(certs::CA_CERT),
        cert: pki.dir.path().join(certs::CA_CERT),
        key: pki.dir.path().join(certs::CA_KEY),
    })
    .unwrap_err();
    assert!(matches!(err, TlsError::NotAParty { .. }), "{err}");
}

#[test]
fn certificates_are_never_overwritten_and_names_are_checked() {
    let pki = Pki::new();
    let err = certs::create_authority(pki.dir.path(), 30).unwrap_err();
    assert!(matches!(err, certs::CertError::Exists { .. }), "{err}");
    certs::issue(pki.dir.path(), Role::Daemon, "broker", &[], 30).unwrap();
    let err = certs::issue(pki.dir.path(), Role::Daemon, "broker", &[], 30).unwrap_err();
    assert!(matches!(err, certs::CertError::Exists { .. }), "{err}");
    for bad in ["", "../x", "a b", "-x"] {
        let err = certs::issue(pki.dir.path(), Role::Daemon, bad, &[], 30).unwrap_err();
        assert!(matches!(err, certs::CertError::Name { .. }), "{bad}: {err}");
    }
    let err = certs::issue(pki.dir.path(), Role::Agent, "host-a", &[], 30).unwrap_err();
    assert!(matches!(err, certs::CertError::NoHost), "{err}");
    let err = certs::issue(pki.dir.path(), Role::Agent, "host-a", &["a b".into()], 30).unwrap_err();
    assert!(matches!(err, certs::CertError::Host { .. }), "{err}");
    let err = certs::issue(pki.dir.path(), Role::Daemon, "d", &[], 0).unwrap_err();
    assert!(matches!(err, certs::CertError::Days(0)), "{err}");
}
