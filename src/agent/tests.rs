use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::config::Config;
use crate::model::{DiskFormat, Driver};
use crate::providers::remote::wire::{
    self, AdoptVolume, Adopted, SendVolume, SentReport, TransferState,
};
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
        advertise: "127.0.0.1".into(),
        viaduct_advertise: None,
        incoming: dir.path().join("incoming"),
        precopy: dir.path().join("precopy"),
    };
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = api.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = Listeners {
        api,
        viaduct: None,
        metrics: None,
    };
    let task = tokio::spawn(agent.run(listeners, async move {
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
    // The path is the one on the agent's host, for placeholders of that host's apps.
    let path = info.path.unwrap();
    assert!(
        path.starts_with(f.dir.path().join("a").canonicalize().unwrap()),
        "{path:?}"
    );
    assert!(path.is_file());
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
async fn only_the_daemon_may_call_an_agent_and_other_agents_only_read_objects() {
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
    // Another agent may read objects (to pull a bucket), nothing else.
    let err = impostor.list_volumes("shop").await.unwrap_err();
    assert!(matches!(err, ProviderError::Denied { .. }), "{err}");

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

/// One agent with a viaduct receiver serving provider `name` (driver `local`, disk format
/// `format`), its provider as the agent holds it, and the daemon's client for it.
struct Host {
    remote: RemoteProvider,
    local: Arc<dyn Provider>,
    metrics: AgentMetrics,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn host(dir: &Path, pki: &Path, name: &str, format: &str) -> Host {
    let root = dir.join(name);
    let text = format!(
        "[providers.{name}]\ndriver = \"local\"\nregion = \"r\"\nroot = \"{}\"\ndisk_format = \"{format}\"\n",
        root.display()
    );
    let config = Config::parse(&dir.join(format!("{name}.toml")), &text).unwrap();
    let local = crate::providers::open(&config.providers[name]).unwrap();
    let metrics = AgentMetrics::new();
    let agent = Agent {
        identity: identity(pki, Role::Agent, &format!("host-{name}")),
        providers: BTreeMap::from([(name.to_string(), local.clone())]),
        metrics: metrics.clone(),
        advertise: "127.0.0.1".into(),
        viaduct_advertise: None,
        incoming: dir.join(format!("{name}-incoming")),
        precopy: dir.join(format!("{name}-precopy")),
    };
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = api.local_addr().unwrap().port();
    let listeners = Listeners {
        api,
        viaduct: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        metrics: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agent.run(listeners, async move {
        let _ = stopped.await;
    }));
    let daemon = identity(pki, Role::Daemon, &format!("broker-{name}"));
    let remote = RemoteProvider::new(
        name,
        Driver::Local,
        if format == "raw" {
            DiskFormat::Raw
        } else {
            DiskFormat::Qcow2
        },
        &format!("https://127.0.0.1:{port}"),
        &daemon,
    )
    .unwrap();
    Host {
        remote,
        local,
        metrics,
        _stop: stop,
    }
}

/// Sends `volume` of `from` to `to` and adopts it there, as the volume migrator does.
async fn move_volume(from: &Host, to: &Host, name: &str) -> (SentReport, Adopted) {
    let info = from
        .remote
        .volume_info("shop", "data")
        .await
        .unwrap()
        .unwrap();
    let receiver = to.remote.receiver().await.unwrap();
    let id = from
        .remote
        .send_volume(&SendVolume {
            provider: from.remote.name().into(),
            service: "shop".into(),
            volume: "data".into(),
            to: receiver,
            name: name.into(),
            streams: Some(2),
            max_bytes_per_sec: None,
        })
        .await
        .unwrap();
    let report = loop {
        match from.remote.transfer(&id.id).await.unwrap() {
            TransferState::Running { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            TransferState::Done { report } => break report,
            TransferState::Failed { error } => panic!("the send failed: {error}"),
        }
    };
    let adopted = to
        .remote
        .adopt_volume(&AdoptVolume {
            provider: to.remote.name().into(),
            service: "shop".into(),
            volume: "data".into(),
            name: name.into(),
            format: info.format,
            size_bytes: info.virtual_size,
            digest: report.digest.clone(),
        })
        .await
        .unwrap();
    (report, adopted)
}

/// Creates the raw volume `shop/data` of `size` bytes at `h`, through its agent.
async fn create_data_volume(h: &Host, size: u64) {
    let spec = VolumeSpec {
        name: "data".into(),
        size_bytes: size,
        format: DiskFormat::Raw,
    };
    let op = h.remote.create_volume("shop", &spec).await.unwrap();
    wait_for(&h.remote, &op.id, Duration::from_secs(10))
        .await
        .unwrap();
}

async fn path_of(h: &Host) -> std::path::PathBuf {
    h.local
        .volume_info("shop", "data")
        .await
        .unwrap()
        .unwrap()
        .path
        .unwrap()
}

#[tokio::test]
async fn a_volume_moves_agent_to_agent_and_its_changes_follow_cheaply() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let a = host(dir.path(), &pki, "a", "raw").await;
    let b = host(dir.path(), &pki, "b", "raw").await;

    let size = 64u64 << 20;
    create_data_volume(&a, size).await;
    let src = path_of(&a).await;
    // 16 MiB of data in a 64 MiB sparse image.
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&data, 8 << 20).unwrap();
    }

    let name = wire::staged_name("r-1", "b", "shop", "data");
    let (sent, adopted) = move_volume(&a, &b, &name).await;
    // Only the allocated extents are read (the provider may have touched a block or so).
    assert!(
        (16 << 20..=(16 << 20) + (64 << 10)).contains(&sent.bytes_read),
        "{sent:?}"
    );
    assert_eq!(adopted.method, "linked into place");
    assert_eq!(adopted.bytes_written, 0);
    let dst = path_of(&b).await;
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());

    // One MiB changes: the second pass sends about that, not the image.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 12 << 20).unwrap();
    }
    let (again, _) = move_volume(&a, &b, &name).await;
    assert_eq!(again.chunks_sent, 1, "{again:?}");
    assert!(again.bytes_sent < 2 << 20, "{again:?}");
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());

    let text = a.metrics.encode();
    assert!(
        text.contains(
            "fluidcloud_agent_viaduct_transfers_total{direction=\"sent\",result=\"ok\"} 2"
        ),
        "{text}"
    );
    assert!(b.metrics.encode().contains(
        "fluidcloud_agent_viaduct_transfers_total{direction=\"received\",result=\"ok\"} 2"
    ));

    b.remote.discard(&name).await.unwrap();
    assert!(!dir.path().join("b-incoming").join(&name).exists());
}

#[tokio::test]
async fn a_received_image_is_converted_to_the_target_providers_format() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let a = host(dir.path(), &pki, "a", "raw").await;
    let b = host(dir.path(), &pki, "b", "qcow2").await;
    create_data_volume(&a, 8 << 20).await;
    let src = path_of(&a).await;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(b"hello from host a", 1 << 20).unwrap();
    }
    let name = wire::staged_name("r-2", "b", "shop", "data");
    let (_, adopted) = move_volume(&a, &b, &name).await;
    assert_eq!(adopted.method, "qemu-img convert");
    let dst = path_of(&b).await;
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let info = b.remote.volume_info("shop", "data").await.unwrap().unwrap();
    assert_eq!(info.format, DiskFormat::Qcow2);
}

#[tokio::test]
async fn a_send_to_a_receiver_with_another_secret_fails_and_nothing_lands() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let a = host(dir.path(), &pki, "a", "raw").await;
    let b = host(dir.path(), &pki, "b", "raw").await;
    create_data_volume(&a, 1 << 20).await;
    let mut receiver = b.remote.receiver().await.unwrap();
    receiver.secret = crate::agent::transfers::random_secret();
    let id = a
        .remote
        .send_volume(&SendVolume {
            provider: "a".into(),
            service: "shop".into(),
            volume: "data".into(),
            to: receiver,
            name: "x/y.img".into(),
            streams: None,
            max_bytes_per_sec: None,
        })
        .await
        .unwrap();
    let error = loop {
        match a.remote.transfer(&id.id).await.unwrap() {
            TransferState::Running { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            TransferState::Done { .. } => panic!("a send with the wrong secret succeeded"),
            TransferState::Failed { error } => break error,
        }
    };
    assert!(error.contains("key"), "{error}");
    assert!(!dir.path().join("b-incoming/x/y.img").exists());
    let err = b
        .remote
        .adopt_volume(&AdoptVolume {
            provider: "b".into(),
            service: "shop".into(),
            volume: "data".into(),
            name: "x/y.img".into(),
            format: DiskFormat::Raw,
            size_bytes: 1 << 20,
            digest: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn a_precopy_image_is_sent_only_from_the_precopy_directory_and_only_for_its_volume() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs::create_authority(&pki, 30).unwrap();
    let a = host(dir.path(), &pki, "a", "raw").await;
    let b = host(dir.path(), &pki, "b", "raw").await;
    let staging = wire::precopy_staging_name("r/1", "a", "shop", "data");
    assert_eq!(staging, "r_1/a.shop.data.precopy.raw");
    let image = dir.path().join("a-precopy").join(&staging);
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    let mut bytes = vec![0u8; 1 << 20];
    fastrand::Rng::with_seed(5).fill(&mut bytes[..1 << 19]);
    std::fs::write(&image, &bytes).unwrap();
    // A file beside the pre-copy directory that a name must not reach.
    std::fs::write(dir.path().join("secret.precopy.raw"), b"no").unwrap();
    let receiver = b.remote.receiver().await.unwrap();
    let send = |staging: &str| wire::SendStaging {
        send: SendVolume {
            provider: "a".into(),
            service: "shop".into(),
            volume: "data".into(),
            to: receiver.clone(),
            name: "r_1/b.shop.data.img".into(),
            streams: None,
            max_bytes_per_sec: None,
        },
        staging: staging.into(),
    };
    for (bad, why) in [
        ("../secret.precopy.raw", "`..`"),
        ("/etc/passwd", "absolute"),
        (
            "r_1/a.shop.other.precopy.raw",
            "not a pre-copy image of volume",
        ),
    ] {
        let err = a.remote.send_staging(&send(bad)).await.unwrap_err();
        assert!(matches!(err, ProviderError::Invalid { .. }), "{bad}: {err}");
        assert!(err.to_string().contains(why), "{bad}: {err}");
    }
    let err = a
        .remote
        .send_staging(&send("r_2/a.shop.data.precopy.raw"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    let id = a.remote.send_staging(&send(&staging)).await.unwrap();
    let report = loop {
        match a.remote.transfer(&id.id).await.unwrap() {
            TransferState::Running { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
            TransferState::Done { report } => break report,
            TransferState::Failed { error } => panic!("the send failed: {error}"),
        }
    };
    assert_eq!(report.image_bytes, 1 << 20);
    let landed = std::fs::read(dir.path().join("b-incoming/r_1/b.shop.data.img")).unwrap();
    assert!(
        landed == bytes,
        "the staged image differs from the pre-copy image"
    );

    // A pass over the disks of a VM of a driver that runs none is refused as such.
    let err = a
        .remote
        .precopy_pass(&wire::PrecopyPass {
            provider: "a".into(),
            service: "shop".into(),
            vm: "guest".into(),
            relocation: "r/1".into(),
            kind: crate::providers::DiskPassKind::Full,
            compare: false,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unsupported { .. }), "{err}");

    a.remote.discard_precopy(&staging).await.unwrap();
    assert!(!image.exists());
    assert!(!image.parent().unwrap().exists());
    assert!(dir.path().join("secret.precopy.raw").exists());
    let err = a
        .remote
        .discard_precopy("../secret.precopy.raw")
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    assert!(dir.path().join("secret.precopy.raw").exists());
}
