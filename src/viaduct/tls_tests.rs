//! The viaduct over mutual TLS: agents send to agents, nobody else.

use std::path::Path;

use tokio::net::TcpListener;

use super::*;
use crate::sys::certs;
use crate::sys::tls::{server_name, Identity, Role, TlsFiles};

fn identity(pki: &Path, role: Role, name: &str) -> Identity {
    let hosts = if role == Role::Agent {
        vec!["127.0.0.1".to_string()]
    } else {
        vec![]
    };
    let w = certs::issue(pki, role, name, &hosts, 30).unwrap();
    Identity::load(&TlsFiles {
        ca: pki.join(certs::CA_CERT),
        cert: w.cert,
        key: w.key,
    })
    .unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    src: std::path::PathBuf,
    addr: String,
    key: PresharedKey,
    shutdown: tokio_util::sync::CancellationToken,
}

async fn receiver_over_tls() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let receiving = identity(&pki, Role::Agent, "host-b");
    let root = dir.path().join("in");
    std::fs::create_dir(&root).unwrap();
    let key = PresharedKey::random();
    let mut opts = ReceiverOptions::new(&root, key.clone());
    opts.tls = Some(receiving.server_config().unwrap());
    let shutdown = opts.shutdown.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve(listener, opts));
    let src = dir.path().join("image.raw");
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    Setup {
        dir,
        src,
        addr,
        key,
        shutdown,
    }
}

fn tls_to(identity: &Identity) -> EndpointTls {
    EndpointTls {
        config: identity.client_config().unwrap(),
        server_name: server_name("127.0.0.1").unwrap(),
    }
}

#[tokio::test]
async fn an_agent_sends_an_image_to_another_over_tls() {
    let s = receiver_over_tls().await;
    let sender = identity(&s.dir.path().join("pki"), Role::Agent, "host-a");
    let to = Endpoint::new(&s.addr, s.key.clone()).with_tls(tls_to(&sender));
    let report = send_file(&s.src, &to, "disk.raw", &SendOptions::default(), &|_| {})
        .await
        .unwrap();
    let landed = std::fs::read(s.dir.path().join("in/disk.raw")).unwrap();
    assert_eq!(landed, std::fs::read(&s.src).unwrap());
    assert_eq!(
        report.digest,
        image_digest(&s.src, DEFAULT_CHUNK_SIZE).unwrap()
    );
    s.shutdown.cancel();
}

#[tokio::test]
async fn only_parties_of_the_authority_over_tls_may_send() {
    let s = receiver_over_tls().await;
    let pki = s.dir.path().join("pki");
    let opts = SendOptions {
        connect_timeout: std::time::Duration::from_secs(5),
        ..SendOptions::default()
    };

    // The daemon sends the volumes of its own providers; it still needs the key.
    let daemon = identity(&pki, Role::Daemon, "broker");
    let to = Endpoint::new(&s.addr, s.key.clone()).with_tls(tls_to(&daemon));
    send_file(&s.src, &to, "a.raw", &opts, &|_| {})
        .await
        .unwrap();
    std::fs::remove_file(s.dir.path().join("in").join("a.raw")).unwrap();
    let wrong = crate::viaduct::PresharedKey::from_secret(&[7u8; 32]).unwrap();
    let to = Endpoint::new(&s.addr, wrong).with_tls(tls_to(&daemon));
    assert!(send_file(&s.src, &to, "a.raw", &opts, &|_| {})
        .await
        .is_err());

    // An agent of another authority.
    let other = s.dir.path().join("other");
    certs::create_authority(&other, 30).unwrap();
    let stranger = identity(&other, Role::Agent, "host-a");
    let to = Endpoint::new(&s.addr, s.key.clone()).with_tls(tls_to(&stranger));
    assert!(send_file(&s.src, &to, "b.raw", &opts, &|_| {})
        .await
        .is_err());

    // Plain TCP, even with the right key.
    let to = Endpoint::new(&s.addr, s.key.clone());
    assert!(send_file(&s.src, &to, "c.raw", &opts, &|_| {})
        .await
        .is_err());

    let landed: Vec<_> = std::fs::read_dir(s.dir.path().join("in"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(landed.is_empty(), "{landed:?}");
    s.shutdown.cancel();
}
