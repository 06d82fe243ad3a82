//! The network namespaces the cross-host tests stand their hosts in.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fluidcloud::model::{DiskFormat, Driver};
use fluidcloud::providers::remote::wire::{staged_name, AdoptVolume, SendVolume, TransferState};
use fluidcloud::providers::remote::RemoteProvider;
use fluidcloud::providers::{wait_for, Provider, VolumeSpec};
use fluidcloud::sys::tls::{Identity, TlsFiles};

use crate::common::netns::{Host, Hosts};

#[test]
fn hosts_reach_each_other_and_are_removed_afterwards() {
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let names: Vec<String> = hosts.hosts.iter().map(|h| h.ns.clone()).collect();
    let mut b = hosts.b().listen(7000);
    let daemon = std::net::TcpListener::bind((hosts.gateway, 7001)).unwrap();
    assert!(hosts.a().connects(hosts.b().addr, 7000), "a cannot reach b");
    assert!(
        hosts.b().connects(hosts.gateway, 7001),
        "b cannot reach the test's namespace"
    );
    drop(daemon);
    hosts.b().cut();
    assert!(
        !hosts.a().connects(hosts.b().addr, 7000),
        "the cut link still carries"
    );
    hosts.b().mend();
    assert!(
        hosts.a().connects(hosts.b().addr, 7000),
        "the mended link does not carry"
    );
    b.kill().unwrap();
    b.wait().unwrap();
    drop(hosts);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} was left behind");
    }
}

/// An agent running in a host's namespace, killed when dropped.
struct RunningAgent {
    child: std::process::Child,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(host: &Host, dir: &Path, pki: &Path, name: &str) -> RunningAgent {
    let cert = fluidcloud::sys::certs::issue(
        pki,
        fluidcloud::sys::tls::Role::Agent,
        &format!("host-{name}"),
        &[host.addr.to_string()],
        30,
    )
    .unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
advertise = "{addr}"
listen = "{addr}:7481"
viaduct_listen = "{addr}:7482"
state_dir = "{name}-state"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[providers.{name}]
driver = "local"
region = "r"
root = "{name}-root"
"#,
            addr = host.addr,
            ca = pki.join("ca.pem").display(),
            cert = cert.cert.display(),
            key = cert.key.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = host
        .command(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(["agent", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    RunningAgent { child }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_moves_between_agents_on_two_hosts_without_passing_through_the_daemon() {
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    fluidcloud::sys::certs::create_authority(&pki, 30).unwrap();
    let daemon =
        fluidcloud::sys::certs::issue(&pki, fluidcloud::sys::tls::Role::Daemon, "broker", &[], 30)
            .unwrap();
    let identity = Identity::load(&TlsFiles {
        ca: pki.join("ca.pem"),
        cert: daemon.cert,
        key: daemon.key,
    })
    .unwrap();
    let _agent_a = start_agent(hosts.a(), dir.path(), &pki, "a");
    let _agent_b = start_agent(hosts.b(), dir.path(), &pki, "b");
    let remote = |name: &str, host: &Host| {
        RemoteProvider::new(
            name,
            Driver::Local,
            DiskFormat::Raw,
            &format!("https://{}:7481", host.addr),
            &identity,
        )
        .unwrap()
    };
    let (a, b) = (remote("a", hosts.a()), remote("b", hosts.b()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.free_bytes().await.is_err() || b.free_bytes().await.is_err() {
        assert!(Instant::now() < deadline, "the agents did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let size = 256u64 << 20;
    let op = a
        .create_volume(
            "shop",
            &VolumeSpec {
                name: "data".into(),
                size_bytes: size,
                format: DiskFormat::Raw,
            },
        )
        .await
        .unwrap();
    wait_for(&a, &op.id, Duration::from_secs(30)).await.unwrap();
    let src = dir.path().join("a-root/volumes/shop/data.raw");
    let data: Vec<u8> = (0..(64u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&data, 32 << 20).unwrap();
    }

    let io_before = process_io();
    let receiver = b.receiver().await.unwrap();
    assert_eq!(receiver.addr, format!("{}:7482", hosts.b().addr));
    let name = staged_name("r-1", "b", "shop", "data");
    let id = a
        .send_volume(&SendVolume {
            provider: "a".into(),
            service: "shop".into(),
            volume: "data".into(),
            to: receiver,
            name: name.clone(),
            streams: None,
            max_bytes_per_sec: None,
        })
        .await
        .unwrap();
    let report = loop {
        match a.transfer(&id.id).await.unwrap() {
            TransferState::Running { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            TransferState::Done { report } => break report,
            TransferState::Failed { error } => panic!("the send failed: {error}"),
        }
    };
    let adopted = b
        .adopt_volume(&AdoptVolume {
            provider: "b".into(),
            service: "shop".into(),
            volume: "data".into(),
            name: name.clone(),
            format: DiskFormat::Raw,
            size_bytes: size,
            digest: report.digest.clone(),
        })
        .await
        .unwrap();
    let io_after = process_io();
    println!("sent: {report:?}\nadopted: {adopted:?}");

    let dst = dir.path().join("b-root/volumes/shop/data.raw");
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        std::fs::read(&src).unwrap(),
        "the volume at host b differs from host a's"
    );
    assert_eq!(report.chunks_sent, 64, "{report:?}");
    assert_eq!(report.chunks_skipped_zero, 192, "{report:?}");
    // The test process is the daemon here: the 64 MiB went host to host, not through it.
    let through_us = (io_after.0 - io_before.0) + (io_after.1 - io_before.1);
    assert!(
        through_us < 4 << 20,
        "{through_us} bytes passed through the daemon's side"
    );
    b.discard(&name).await.unwrap();
}

/// `rchar` and `wchar` of this process (every read and write, sockets included).
fn process_io() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
    };
    (field("rchar:"), field("wchar:"))
}
