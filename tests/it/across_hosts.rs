//! Relocations between hosts, with the real binaries: an agent in each of two network
//! namespaces serves that host's providers, the daemon runs in the test's namespace and
//! directs, and the data goes host to host.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::agents::{process_io, Agent, Pki};
use common::netns::Hosts;
use common::{bin, free_port, http_get as get, repo, Daemon};
use serde_json::Value;

/// The shipped quickstart, its two providers each served by an agent on its own host.
fn quickstart_across(dir: &Path, pki: &Pki, a: &str, b: &str, app_port: u16) -> String {
    let qs = repo().join("examples/quickstart");
    for entry in std::fs::read_dir(&qs).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("feeds")).unwrap();
    for entry in std::fs::read_dir(qs.join("feeds")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("feeds").join(entry.file_name())).unwrap();
    }
    // A GiB of random data for the volume to carry.
    let template = std::fs::read_to_string(dir.join("demo.toml.in")).unwrap();
    std::fs::write(
        dir.join("demo.toml.in"),
        template.replace("seed_mib = 32", "seed_mib = 1024"),
    )
    .unwrap();
    let demo_app = Path::new(bin()).parent().unwrap().join("examples/demo-app");
    // The builtin benchmark measures the daemon's disk, not the agents': left out.
    let shipped = std::fs::read_to_string(dir.join("fluidcloud.toml")).unwrap();
    let without_benchmarks: Vec<&str> = shipped
        .split("\n\n")
        .filter(|section| !section.contains(".benchmark]"))
        .collect();
    let config = without_benchmarks
        .join("\n\n")
        .replace("127.0.0.1:7480", "127.0.0.1:{PORT}")
        .replace(
            "root = \"state/providers/home-virginia\"",
            &format!("agent = \"{a}\""),
        )
        .replace(
            "root = \"state/providers/home-frankfurt\"",
            &format!("agent = \"{b}\""),
        )
        // The app answers on its host's address; so does its health check.
        .replace(
            "http://127.0.0.1:8480/health",
            &format!("http://{{app.web.host}}:{app_port}/health"),
        )
        .replace("port = 8480", &format!("port = {app_port}"))
        .replace(
            "../../policies/",
            &format!("{}/policies/", repo().display()),
        )
        .replace(
            "\"../../target/release/examples/demo-app\"",
            &format!("\"{}\"", demo_app.display()),
        )
        .replace("size_gib = 2", "size_gib = 1")
        .replace("keep_at_source = true", "keep_at_source = false")
        .replace("grace_period_secs = 60", "grace_period_secs = 3");
    assert!(config.contains(&format!("agent = \"{b}\"")), "{config}");
    assert!(config.contains("{app.web.host}"), "{config}");
    assert!(!config.contains("benchmark"), "{config}");
    format!("{}\n{config}", pki.daemon_tls)
}

/// The providers of the quickstart as its agents serve them.
fn agent_providers(name: &str, region: &str) -> String {
    format!("[providers.{name}]\ndriver = \"local\"\ncloud = \"aws\"\nregion = \"{region}\"\nroot = \"{name}-root\"\n")
}

#[test]
fn the_quickstart_service_moves_to_another_host_by_policy_without_its_data_passing_through_the_daemon(
) {
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _apps = common::Apps(dir.path());
    let pki = Pki::create(dir.path());
    let agent_a = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        &agent_providers("home-virginia", "us-east-1"),
    );
    let agent_b = Agent::start(
        hosts.b(),
        dir.path(),
        &pki,
        "b",
        &agent_providers("home-frankfurt", "eu-central-1"),
    );
    agent_a.wait_up(hosts.a());
    agent_b.wait_up(hosts.b());
    let app_port = free_port();
    let config = quickstart_across(dir.path(), &pki, &agent_a.url, &agent_b.url, app_port);
    let mut d = Daemon::start(dir.path(), &config);
    let at_a = format!("http://{}:{app_port}", hosts.a().addr);
    let at_b = format!("http://{}:{app_port}", hosts.b().addr);

    let hash = d.eventually("the demo app on host a", Duration::from_secs(120), |_| {
        get(&format!("{at_a}/hash"))
    });
    let before: Value = serde_json::from_str(&get(&format!("{at_a}/config")).unwrap()).unwrap();
    assert_eq!(
        before["listen"].as_str(),
        Some(format!("{}:{app_port}", hosts.a().addr).as_str())
    );
    // Objects in the bucket, which moves with the service.
    let assets = dir.path().join("home-virginia-root/buckets/shop/assets");
    std::fs::create_dir_all(assets.join("img")).unwrap();
    for i in 0..20 {
        std::fs::write(
            assets.join(format!("img/{i}.txt")),
            format!("asset {i} ").repeat(100 + i),
        )
        .unwrap();
    }
    let io_before = process_io(d.child.id());

    let relocation = d.eventually(
        "shop relocated to host b and decommissioned",
        Duration::from_secs(240),
        |d| {
            let r = d.get("/v1/relocations");
            let shop = r
                .as_array()?
                .iter()
                .find(|r| r["request"]["service"] == "shop")?
                .clone();
            assert_ne!(shop["state"], "rolled_back", "{shop}\n{}", d.logs());
            assert_ne!(shop["state"], "failed", "{shop}\n{}", d.logs());
            (shop["state"] == "completed").then_some(shop)
        },
    );
    let io_after = process_io(d.child.id());
    assert_eq!(relocation["request"]["to"], "home-frankfurt");
    assert_eq!(relocation["request"]["origin"], "policy");

    // The app answers from host b, with the same data, and its old copy is gone.
    let after: Value = serde_json::from_str(&get(&format!("{at_b}/config")).unwrap()).unwrap();
    assert_eq!(
        after["listen"].as_str(),
        Some(format!("{}:{app_port}", hosts.b().addr).as_str())
    );
    assert!(
        after["data_file"]
            .as_str()
            .unwrap()
            .contains("home-frankfurt-root"),
        "{after}"
    );
    assert_eq!(get(&format!("{at_b}/hash")).unwrap(), hash);
    assert!(get(&format!("{at_a}/hash")).is_none());
    assert!(!dir
        .path()
        .join("home-virginia-root/volumes/shop/data.raw")
        .exists());

    // The GiB went host to host: the daemon read and wrote a sliver of it.
    let through_daemon = (io_after.0 - io_before.0) + (io_after.1 - io_before.1);
    println!("the daemon's own I/O during the relocation: {through_daemon} bytes");
    assert!(
        through_daemon < 32 << 20,
        "{through_daemon} bytes passed through the daemon"
    );
    let steps = d.get(&format!(
        "/v1/relocations/{}",
        relocation["id"].as_str().unwrap()
    ));
    let text = steps.to_string();
    assert!(text.contains("viaduct (host to host)"), "{text}");
    assert!(
        text.contains("pulled host to host by the target's agent"),
        "{text}"
    );
    let moved = dir.path().join("home-frankfurt-root/buckets/shop/assets");
    for i in 0..20 {
        assert_eq!(
            std::fs::read(moved.join(format!("img/{i}.txt"))).unwrap(),
            format!("asset {i} ").repeat(100 + i).into_bytes()
        );
    }
}

/// MiB of random data in the volume the fault tests move.
const DATA_MIB: u64 = 160;

/// Two hosts, an agent on each serving a local provider (`a` on host a, `b` on host b),
/// a link of 200 Mbit/s so a transfer lasts seconds, and the daemon's configuration for
/// `shop`, a service of one volume on `a`.
struct Moving {
    hosts: Hosts,
    dir: tempfile::TempDir,
    a: Agent,
    b: Agent,
    config: String,
}

impl Moving {
    fn new() -> Option<Moving> {
        Self::with_service(|s| s)
    }

    /// With `shop` set up further by `service`.
    fn with_service(
        service: impl FnOnce(common::config::Service) -> common::config::Service,
    ) -> Option<Moving> {
        let hosts = Hosts::create(2)?;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(dir.path());
        let local = |name: &str| {
            format!(
                "[providers.{name}]\ndriver = \"local\"\nregion = \"r\"\nroot = \"{name}-root\"\n"
            )
        };
        let a = Agent::start(hosts.a(), dir.path(), &pki, "a", &local("a"));
        let b = Agent::start(hosts.b(), dir.path(), &pki, "b", &local("b"));
        a.wait_up(hosts.a());
        b.wait_up(hosts.b());
        hosts.a().shape("200mbit");
        let config = common::config::ConfigBuilder::for_daemon()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .provider("a", "local", "r", |p| p.set("agent", a.url.clone()))
            .provider("b", "local", "r", |p| p.set("agent", b.url.clone()))
            .policy("watch", "cheapest", "audit", |p| p)
            .service("shop", "a", "watch", |s| service(s.volume("data", 0.25)))
            .raw(&pki.daemon_tls)
            .render();
        Some(Moving {
            hosts,
            dir,
            a,
            b,
            config,
        })
    }

    fn volume(&self, provider: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join(format!("{provider}-root/volumes/shop/data.raw"))
    }

    /// Starts the daemon, which deploys `shop` on `a`; fills its volume with random data
    /// and returns the volume's BLAKE3.
    fn deploy(&self) -> (Daemon, String) {
        let d = Daemon::start(self.dir.path(), &self.config);
        let path = self.volume("a");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(std::time::Instant::now() < deadline, "{}", d.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..DATA_MIB << 17)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&data, 16 << 20).unwrap();
            f.sync_all().unwrap();
        }
        (d, hash_of(&path))
    }

    /// Bytes host a has put on its link so far.
    fn sent_by_a(&self) -> u64 {
        let out = self
            .hosts
            .a()
            .command("cat")
            .arg("/sys/class/net/eth0/statistics/tx_bytes")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Waits until host b's receiver holds a quarter of the data.
    fn wait_mid_transfer(&self, d: &Daemon) {
        let incoming = self.dir.path().join("b-state/incoming");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let held: u64 = walk(&incoming)
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(".partial"))
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum();
            if held >= (DATA_MIB << 20) / 4 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the transfer never got going:\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn hash_of(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    hasher.finalize().to_hex().to_string()
}

/// Asks the daemon to move `shop` to `b`; returns the relocation's id.
fn relocate_to_b(d: &Daemon) -> String {
    relocate_to(d, "b")
}

/// Waits for relocation `id` to end; returns its record.
fn ended(d: &mut Daemon, id: &str) -> Value {
    d.eventually("the relocation to end", Duration::from_secs(180), |d| {
        let r = d.get(&format!("/v1/relocations/{id}"));
        matches!(r["state"].as_str()?, "completed" | "rolled_back" | "failed").then_some(r)
    })
}

/// Asks the daemon to move `shop` to `to`; returns the relocation's id.
fn relocate_to(d: &Daemon, to: &str) -> String {
    let (status, body) = d
        .raw(
            "POST",
            "/v1/services/shop/relocate",
            true,
            Some(serde_json::json!({ "to": to })),
        )
        .unwrap();
    assert_eq!(status, 202, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits for the relocation to end and checks the service is whole: on `b` with the same
/// data and the source decommissioned, or back on `a` unchanged with nothing left at `b`.
fn ends_whole(m: &Moving, d: &mut Daemon, id: &str, hash: &str) -> String {
    let state = ended(d, id)["state"].as_str().unwrap().to_string();
    match state.as_str() {
        "completed" => {
            assert_eq!(hash_of(&m.volume("b")), hash, "the data at b differs");
            assert!(!m.volume("a").exists(), "the source was not decommissioned");
        }
        "rolled_back" => {
            assert_eq!(hash_of(&m.volume("a")), hash, "the source changed");
            assert!(!m.volume("b").exists(), "the target kept a volume");
        }
        other => panic!("the relocation ended {other}:\n{}", d.logs()),
    }
    state
}

#[test]
fn a_link_cut_mid_transfer_delays_the_move_and_little_is_sent_twice() {
    let Some(m) = Moving::new() else {
        return;
    };
    let (mut d, hash) = m.deploy();
    let before = m.sent_by_a();
    let id = relocate_to_b(&d);
    m.wait_mid_transfer(&d);
    m.hosts.b().cut();
    std::thread::sleep(Duration::from_secs(5));
    m.hosts.b().mend();
    assert_eq!(ends_whole(&m, &mut d, &id, &hash), "completed");
    let sent = m.sent_by_a() - before;
    println!("host a sent {sent} bytes for {DATA_MIB} MiB of data");
    assert!(
        sent < (DATA_MIB << 20) * 11 / 10,
        "host a sent {sent} bytes for {DATA_MIB} MiB"
    );
}

#[test]
fn the_target_agent_killed_mid_transfer_and_restarted_resumes_from_what_it_verified() {
    let Some(mut m) = Moving::new() else {
        return;
    };
    let (mut d, hash) = m.deploy();
    let before = m.sent_by_a();
    let id = relocate_to_b(&d);
    m.wait_mid_transfer(&d);
    m.b.kill();
    std::thread::sleep(Duration::from_secs(2));
    m.b.restart();
    assert_eq!(ends_whole(&m, &mut d, &id, &hash), "completed");
    let sent = m.sent_by_a() - before;
    println!("host a sent {sent} bytes for {DATA_MIB} MiB of data");
    // What reached the receiver before the kill is not sent again; what was in flight
    // (socket buffers, chunks not yet written) may be.
    assert!(
        sent < (DATA_MIB << 20) * 5 / 4,
        "host a sent {sent} bytes for {DATA_MIB} MiB\n{}",
        m.b.logs()
    );
    assert!(
        m.b.logs().contains("an interrupted transfer"),
        "{}",
        m.b.logs()
    );
}

#[test]
fn the_daemon_killed_mid_transfer_and_restarted_finishes_the_move() {
    let Some(m) = Moving::new() else {
        return;
    };
    let (mut d, hash) = m.deploy();
    let id = relocate_to_b(&d);
    m.wait_mid_transfer(&d);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let mut d = Daemon::start(m.dir.path(), &m.config);
    let state = ends_whole(&m, &mut d, &id, &hash);
    println!("after the daemon's restart the relocation {state}");
    let _ = &m.a;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_refuses_strangers_and_paths_outside_its_root_and_nothing_changes() {
    use fluidcloud::model::{DiskFormat, Driver};
    use fluidcloud::providers::remote::RemoteProvider;
    use fluidcloud::providers::{Provider, VolumeSpec};
    use fluidcloud::sys::certs;
    use fluidcloud::sys::tls::{Identity, Role, TlsFiles};

    let Some(hosts) = Hosts::create(1) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let agent = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        "[providers.a]\ndriver = \"local\"\nregion = \"r\"\nroot = \"a-root\"\n",
    );
    let host = hosts.a();
    tokio::task::block_in_place(|| agent.wait_up(host));
    let root = dir.path().join("a-root");
    let snapshot = || {
        let mut files: Vec<String> = walk(&root)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        files.sort();
        files
    };
    let before = snapshot();
    let volume = VolumeSpec {
        name: "data".into(),
        size_bytes: 1 << 20,
        format: DiskFormat::Raw,
    };

    // No client certificate at all, though the caller trusts the agent's authority.
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(pki.dir.join("ca.pem")).unwrap()).unwrap();
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .build()
        .unwrap();
    let answer = anonymous
        .get(format!("{}/v1/viaduct", agent.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        answer.is_err(),
        "an unauthenticated caller was answered: {answer:?}"
    );

    // A daemon's certificate from another authority, presented to an agent the caller
    // trusts: the agent refuses it in the handshake.
    let other = dir.path().join("other-pki");
    certs::create_authority(&other, 30).unwrap();
    let stranger = certs::issue(&other, Role::Daemon, "broker", &[], 30).unwrap();
    let mut pem = std::fs::read(&stranger.cert).unwrap();
    pem.extend(std::fs::read(&stranger.key).unwrap());
    let as_stranger = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let answer = as_stranger
        .get(format!("{}/v1/viaduct", agent.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        answer.is_err(),
        "a caller of another authority was answered: {answer:?}"
    );
    // The same client with the daemon's own certificate is answered: the refusals above
    // were about the callers, not the way they called.
    let mut pem = std::fs::read(pki.dir.join("broker.pem")).unwrap();
    pem.extend(std::fs::read(pki.dir.join("broker-key.pem")).unwrap());
    let answer = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
        .get(format!("{}/v1/viaduct", agent.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{answer:?}");

    // The daemon itself, with names that reach outside the provider's root.
    let files = TlsFiles {
        ca: pki.dir.join("ca.pem"),
        cert: pki.dir.join("broker.pem"),
        key: pki.dir.join("broker-key.pem"),
    };
    let daemon = Identity::load(&files).unwrap();
    let as_daemon =
        RemoteProvider::new("a", Driver::Local, DiskFormat::Raw, &agent.url, &daemon).unwrap();
    let outside = dir.path().join("outside.txt");
    for (what, result) in [
        (
            "a volume named ../x",
            as_daemon
                .create_volume(
                    "shop",
                    &VolumeSpec {
                        name: "../x".into(),
                        ..volume.clone()
                    },
                )
                .await
                .map(|_| ()),
        ),
        (
            "a service named ..",
            as_daemon.create_volume("..", &volume).await.map(|_| ()),
        ),
        (
            "an app file outside the app's directory",
            as_daemon
                .write_app_file(
                    "shop",
                    "web",
                    &format!("../../../../../{}", outside.display()),
                    b"x",
                )
                .await
                .map(|_| ()),
        ),
    ] {
        let err = result.expect_err(what);
        println!("{what}: {err}");
    }
    assert!(!outside.exists());

    // Another agent of the authority may read objects (to pull a bucket), nothing else.
    let peer = certs::issue(
        &pki.dir,
        Role::Agent,
        "host-z",
        &["10.0.0.99".to_string()],
        30,
    )
    .unwrap();
    let peer = Identity::load(&TlsFiles {
        ca: pki.dir.join("ca.pem"),
        cert: peer.cert,
        key: peer.key,
    })
    .unwrap();
    let as_peer =
        RemoteProvider::new("a", Driver::Local, DiskFormat::Raw, &agent.url, &peer).unwrap();
    let read = as_peer.list_objects("shop", "assets").await;
    assert!(
        read.as_ref().map_or_else(|e| e.is_not_found(), |_| true),
        "an agent could not read objects: {read:?}"
    );
    let err = as_peer.create_volume("shop", &volume).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("other agents may only read objects"),
        "{err}"
    );
    let err = as_peer.receiver().await.unwrap_err();
    assert!(
        err.to_string().contains("only the daemon may call this"),
        "{err}"
    );

    assert_eq!(snapshot(), before, "the agent's root changed");
    as_daemon.create_volume("shop", &volume).await.unwrap();
    assert_ne!(snapshot(), before);
}

#[test]
fn a_service_moves_from_the_daemons_host_to_an_agents_and_back() {
    let Some(hosts) = Hosts::create(1) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _apps = common::Apps(dir.path());
    let pki = Pki::create(dir.path());
    let agent = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        "[providers.there]\ndriver = \"local\"\nregion = \"r\"\nroot = \"there-root\"\n",
    );
    agent.wait_up(hosts.a());
    let config = common::config::ConfigBuilder::for_daemon()
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .provider("here", "local", "r", |p| p.root("here-root"))
        .provider("there", "local", "r", |p| p.set("agent", agent.url.clone()))
        .policy("watch", "cheapest", "audit", |p| p)
        .service("shop", "here", "watch", |s| s.volume("data", 0.0625))
        .raw(&pki.daemon_tls)
        .render();
    let mut d = Daemon::start(dir.path(), &config);
    let volume = |root: &str| dir.path().join(format!("{root}/volumes/shop/data.raw"));
    d.eventually("shop deployed here", Duration::from_secs(30), |_| {
        volume("here-root").exists().then_some(())
    });
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(volume("here-root"))
            .unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
        f.write_all_at(&data, 4 << 20).unwrap();
    }
    let hash = hash_of(&volume("here-root"));
    for (to, from_root, to_root) in [
        ("there", "here-root", "there-root"),
        ("here", "there-root", "here-root"),
    ] {
        let id = relocate_to(&d, to);
        let done = ended(&mut d, &id);
        assert_eq!(
            done["state"],
            "completed",
            "{done}\n{}\n{}",
            d.logs(),
            agent.logs()
        );
        assert!(
            done.to_string().contains("viaduct (host to host)"),
            "{done}"
        );
        assert_eq!(
            hash_of(&volume(to_root)),
            hash,
            "the data at `{to}` differs"
        );
        d.eventually("the source decommissioned", Duration::from_secs(30), |_| {
            (!volume(from_root).exists()).then_some(())
        });
        // A reload between the moves: the next one runs on the reloaded configuration.
        let (status, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // Every move asked for ran exactly once and ended.
    let count = |series: &str| d.metric(series).unwrap_or(0.0);
    assert_eq!(
        count("fluidcloud_relocations_requested_total{origin=\"operator\"}"),
        2.0
    );
    assert_eq!(
        count("fluidcloud_relocations_started_total{origin=\"operator\"}"),
        2.0
    );
    assert_eq!(
        count("fluidcloud_relocations_finished_total{outcome=\"completed\"}"),
        2.0
    );
}

#[test]
fn a_target_on_another_host_that_fails_its_health_check_is_rolled_back_and_cleaned_up() {
    // The check runs at the target's host and never passes there.
    let Some(m) = Moving::with_service(|s| s.health_command(&["false"], 2)) else {
        return;
    };
    let (mut d, hash) = m.deploy();
    let id = relocate_to_b(&d);
    assert_eq!(ends_whole(&m, &mut d, &id, &hash), "rolled_back");
    let record = d.get(&format!("/v1/relocations/{id}"));
    assert!(
        record.to_string().contains("viaduct (host to host)"),
        "the volume never crossed: {record}"
    );
    // Nothing of it is left at host b: no volume, nothing staged.
    let staged = walk(&m.dir.path().join("b-state/incoming"));
    assert!(staged.is_empty(), "left staged at host b: {staged:?}");
    let services = d.get("/v1/services");
    let shop = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop")
        .unwrap();
    assert_eq!(shop["provider"], "a", "{shop}");
}

#[test]
fn a_volume_moves_from_an_image_file_on_one_host_into_a_block_device_on_another() {
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(devices) = crate::block_devices::loops(dir.path(), &[64 << 20]) else {
        return;
    };
    let device = devices[0].dev.display().to_string();
    let pki = Pki::create(dir.path());
    let a = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        "[providers.a]\ndriver = \"local\"\nregion = \"r\"\nroot = \"a-root\"\n",
    );
    let b = Agent::start(
        hosts.b(),
        dir.path(),
        &pki,
        "b",
        &format!(
            "[providers.b]\ndriver = \"local\"\nregion = \"r\"\nroot = \"b-root\"\n\
             [providers.b.devices]\n\"shop/data\" = \"{device}\"\n"
        ),
    );
    a.wait_up(hosts.a());
    b.wait_up(hosts.b());
    let config = common::config::ConfigBuilder::for_daemon()
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .provider("a", "local", "r", |p| p.set("agent", a.url.clone()))
        .provider("b", "local", "r", |p| p.set("agent", b.url.clone()))
        .policy("watch", "cheapest", "audit", |p| p)
        .service("shop", "a", "watch", |s| s.volume("data", 0.0625))
        .raw(&pki.daemon_tls)
        .render();
    let mut d = Daemon::start(dir.path(), &config);
    let source = dir.path().join("a-root/volumes/shop/data.raw");
    d.eventually("shop deployed at a", Duration::from_secs(30), |_| {
        source.exists().then_some(())
    });
    // Data in the middle; the rest of the image is a hole, which the device (full of 0xAB)
    // must read as zeros afterwards.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&source)
            .unwrap();
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
        f.write_all_at(&data, 24 << 20).unwrap();
    }
    let hash = hash_of(&source);
    let id = relocate_to_b(&d);
    let done = ended(&mut d, &id);
    assert_eq!(done["state"], "completed", "{done}\n{}", b.logs());
    assert_eq!(
        hash_of(&devices[0].dev),
        hash,
        "the device does not hold the volume"
    );
    let adopted = done.to_string();
    assert!(adopted.contains("viaduct (local)"), "{adopted}");
}
