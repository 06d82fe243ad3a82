use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::config::{Config, DiskFormat, Driver};
use crate::providers::remote::RemoteProvider;
use crate::providers::{
    wait_for, AppSpec, AppState, ObjectMeta, ProviderError, StopOptions, VolumeSpec,
};
use crate::sys::certs;
use crate::sys::tls::TlsFiles;

struct Fixture {
    dir: tempfile::TempDir,
    remote: RemoteProvider,
    metrics: AgentMetrics,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

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

/// An agent on loopback serving one `local` provider `a`, and the daemon's client for it.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let root = dir.path().join("a");
    let text = format!(
        "[providers.a]\ndriver = \"local\"\nregion = \"r\"\nroot = \"{}\"\n",
        root.display()
    );
    let config = Config::parse(&dir.path().join("agent.toml"), &text).unwrap();
    let provider = crate::providers::open(&config.providers["a"]).unwrap();
    let metrics = AgentMetrics::new();
    let agent = Agent {
        identity: identity(&pki, Role::Agent, "host-a"),
        providers: BTreeMap::from([("a".to_string(), provider)]),
        metrics: metrics.clone(),
    };
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = api.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(api, None, async move {
        let _ = stopped.await;
    }));
    let daemon = identity(&pki, Role::Daemon, "broker");
    let remote = RemoteProvider::new(
        "a",
        Driver::Local,
        DiskFormat::Raw,
        &format!("https://127.0.0.1:{}", addr.port()),
        &daemon,
    )
    .unwrap();
    Fixture {
        dir,
        remote,
        metrics,
        addr,
        stop: Some(stop),
        task,
    }
}

#[tokio::test]
async fn the_daemon_drives_a_local_provider_through_its_agent() {
    let mut f = fixture().await;
    let p = &f.remote;

    // Volumes: created through an operation, described without a path on this side.
    let op = p
        .create_volume(
            "shop",
            &VolumeSpec {
                name: "data".into(),
                size_bytes: 1 << 20,
                format: DiskFormat::Raw,
            },
        )
        .await
        .unwrap();
    wait_for(p, &op.id, Duration::from_secs(10)).await.unwrap();
    let info = p.volume_info("shop", "data").await.unwrap().unwrap();
    assert_eq!(info.virtual_size, 1 << 20);
    assert_eq!(
        info.path, None,
        "a path on the agent's host means nothing here"
    );
    assert!(f.dir.path().join("a").exists());
    assert_eq!(p.list_volumes("shop").await.unwrap().len(), 1);
    assert!(p.volume_info("shop", "nope").await.unwrap().is_none());

    // Objects: content and metadata travel both ways.
    p.ensure_bucket("shop", "media").await.unwrap();
    let meta = ObjectMeta {
        content_type: Some("text/plain".into()),
        user: [("owner".to_string(), "ops".to_string())].into(),
    };
    let content = b"hello across hosts".repeat(10_000);
    let written = p
        .write_object_with_meta(
            "shop",
            "media",
            "docs/a.txt",
            Box::pin(std::io::Cursor::new(content.clone())),
            &meta,
        )
        .await
        .unwrap();
    assert_eq!(written.size, content.len() as u64);
    let mut body = p.read_object("shop", "media", "docs/a.txt").await.unwrap();
    assert_eq!(body.size, content.len() as u64);
    let mut back = Vec::new();
    body.stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, content);
    let stat = p
        .stat_object("shop", "media", "docs/a.txt")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stat.meta, meta);
    assert_eq!(p.list_objects("shop", "media").await.unwrap().len(), 1);
    let err = p
        .read_object("shop", "media", "missing")
        .await
        .err()
        .unwrap();
    assert!(err.is_not_found(), "{err}");
    p.delete_object("shop", "media", "docs/a.txt")
        .await
        .unwrap();
    p.delete_bucket("shop", "media").await.unwrap();

    // Apps: started, asked, stopped, removed; their files written and read back.
    let mut spec = AppSpec::new("web", "sleep");
    spec.args = vec!["600".into()];
    let op = p.start_app("shop", &spec).await.unwrap();
    wait_for(p, &op.id, Duration::from_secs(10)).await.unwrap();
    let status = p.app_status("shop", "web").await.unwrap().unwrap();
    assert_eq!(status.state, AppState::Running);
    p.write_app_file("shop", "web", "app.conf", b"port = 1\n")
        .await
        .unwrap();
    assert_eq!(
        p.read_app_file("shop", "web", "app.conf").await.unwrap(),
        Some(b"port = 1\n".to_vec())
    );
    p.stop_app(
        "shop",
        "web",
        StopOptions {
            timeout: Duration::from_secs(5),
            kill_after_timeout: true,
        },
    )
    .await
    .unwrap();
    p.remove_app("shop", "web").await.unwrap();

    let text = f.metrics.encode();
    assert!(
        text.contains("fluidcloud_agent_calls_total{op=\"create_volume\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fluidcloud_agent_object_bytes_total{{direction=\"received\"}} {}",
            content.len()
        )),
        "{text}"
    );

    f.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut f.task)
        .await
        .expect("the agent stops when asked")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn names_that_are_not_component_names_are_refused_before_the_driver_sees_them() {
    let f = fixture().await;
    let p = &f.remote;
    for (service, bucket) in [("../etc", "media"), ("shop", "a/b"), ("shop", "")] {
        let err = p.ensure_bucket(service, bucket).await.unwrap_err();
        assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    }
    let err = p
        .read_app_file("shop", "web", "../../etc/passwd")
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    let err = p
        .write_object(
            "shop",
            "media",
            "../escape",
            Box::pin(std::io::Cursor::new(b"x".to_vec())),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    // Nothing reached the root outside the provider's own directories.
    assert!(!f.dir.path().join("etc").exists());
    assert!(!f.dir.path().join("a").join("escape").exists());
}

#[tokio::test]
async fn only_the_daemon_may_call_an_agent() {
    let f = fixture().await;
    let pki = f.dir.path().join("pki");
    let other_agent = identity(&pki, Role::Agent, "host-b");
    let impostor = RemoteProvider::new(
        "a",
        Driver::Local,
        DiskFormat::Raw,
        &format!("https://127.0.0.1:{}", f.addr.port()),
        &other_agent,
    )
    .unwrap();
    let err = impostor.list_volumes("shop").await.unwrap_err();
    assert!(matches!(err, ProviderError::Unreachable { .. }), "{err}");

    let stranger_pki = f.dir.path().join("other-pki");
    certs::create_authority(&stranger_pki, 30).unwrap();
    let stranger = identity(&stranger_pki, Role::Daemon, "broker");
    let stranger = RemoteProvider::new(
        "a",
        Driver::Local,
        DiskFormat::Raw,
        &format!("https://127.0.0.1:{}", f.addr.port()),
        &stranger,
    )
    .unwrap();
    let err = stranger.list_volumes("shop").await.unwrap_err();
    assert!(matches!(err, ProviderError::Unreachable { .. }), "{err}");
    assert!(f
        .metrics
        .encode()
        .contains("fluidcloud_agent_calls_total{op=\"list_volumes\"} 0"));

    let err = RemoteProvider::new(
        "b",
        Driver::Local,
        DiskFormat::Raw,
        &format!("https://127.0.0.1:{}", f.addr.port()),
        &identity(&pki, Role::Daemon, "broker2"),
    )
    .unwrap()
    .list_volumes("shop")
    .await
    .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(err.to_string().contains("it serves: a"), "{err}");
}
