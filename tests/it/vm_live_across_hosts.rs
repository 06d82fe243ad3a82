//! A VM moved live between hosts with the real binaries: an agent in each of two network
//! namespaces serves a qemu provider (`qa` on host a with qcow2 disks, `qb` on host b with
//! raw ones, the same machine), and `fluidcloud relocate` (in the test's namespace, as the
//! daemon's host) moves the running busybox guest of the VM tests from a to b while it
//! serves HTTP and keeps writing known blocks to its disk, and a client polls it every
//! 50 ms at each host's address. The assertions are those of `vm_live`'s live move (no gap
//! over 2 s, the same boot id, every written block on the target's disk), plus: the target
//! listened on TCP on host b's address, a plain NBD client there is refused because TLS is
//! required, the relocation's key never shows in the journal, the output or the agents'
//! logs, and the key files are gone afterwards.

use crate::common;
use crate::vm_live::{
    poll_ends, power_down_for_hash, sha256, text, BOOT_LIMIT, DISK_BYTES, GAP_LIMIT,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::agents::{Agent, Pki};
use common::config::{ConfigBuilder, Qemu};
use common::guest::{self, QemuEnv, SERVING_MARKER};
use common::netns::Hosts;
use common::servers::kill_from_pid_file;
use common::{bin, free_port};
use fluidcloud::conduit::journal::Journal;
use fluidcloud::config::Config;
use fluidcloud::providers;

/// Where provider `provider` (root `dir/PROVIDER-root`) keeps the state of VM `box/guest`.
fn vm_dir(dir: &Path, provider: &str) -> PathBuf {
    dir.join(format!("{provider}-root/vms/box/guest"))
}

/// Kills, when dropped, the emulators the agents started: they outlive their agent, and a
/// process left in a namespace keeps it alive.
struct Guests<'a>(&'a Path);

impl Drop for Guests<'_> {
    fn drop(&mut self) {
        for provider in ["qa", "qb"] {
            kill_from_pid_file(&vm_dir(self.0, provider).join("pid"));
        }
    }
}

/// The `[providers.NAME]` section of an agent: a qemu provider under `NAME-root` keeping
/// `format` disks, on the machine of `vm_live` (virtio disks, an e1000 NIC), under TCG.
fn agent_provider(env: &QemuEnv, name: &str, format: &str) -> String {
    let qemu = Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
        .disk_bus("virtio")
        .nic_model("e1000")
        .powerdown_timeout_secs(60);
    let rendered = ConfigBuilder::new()
        .provider(name, "qemu", "lab", |p| {
            p.root(&format!("{name}-root"))
                .disk_format(format)
                .qemu(qemu)
        })
        .render();
    let mut table: toml::Table = rendered.parse().unwrap();
    table.remove("daemon");
    toml::to_string(&table).unwrap()
}

/// What a plain NBD client (no TLS) got from the target's NBD port while the VM moved.
#[derive(Default)]
struct Probe {
    /// `qemu-img info`'s refusal, once the server answered.
    refusal: Option<String>,
    /// The key file the target's emulator read, and its mode.
    key_file_mode: Option<u32>,
    /// The relocation's key, read from the daemon's working directory.
    key: Option<String>,
}

/// Until `done`: reads the target's TCP addresses once it is told to receive, and connects a
/// plain NBD client to its NBD server until the server answers.
fn probe_target(dir: &Path, done: Arc<AtomicBool>, probe: Arc<Mutex<Probe>>) {
    let incoming = vm_dir(dir, "qb").join("incoming.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    let addrs: serde_json::Value = loop {
        if let Some(v) = std::fs::read(&incoming)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            break v;
        }
        if done.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let nbd = &addrs[0];
    assert_eq!(nbd["type"], "tcp", "{addrs}");
    let url = format!(
        "nbd://{}:{}/disk0",
        nbd["host"].as_str().unwrap(),
        nbd["port"]
    );
    while !done.load(Ordering::Relaxed) {
        let key_file = vm_dir(dir, "qb").join("live-tls/keys.psk");
        if let Ok(meta) = std::fs::metadata(&key_file) {
            use std::os::unix::fs::PermissionsExt;
            probe.lock().unwrap().key_file_mode = Some(meta.permissions().mode() & 0o777);
        }
        if let Some(key) = std::fs::read_dir(dir.join("state/relocations"))
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| std::fs::read_to_string(e.path().join("guest.live.key")).ok())
        {
            probe.lock().unwrap().key = Some(key.trim().to_string());
        }
        let out = Command::new("qemu-img")
            .args(["info", &url])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "a plain NBD client read the target's disk: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if said.contains("TLS") {
            probe.lock().unwrap().refusal = Some(said);
            if probe.lock().unwrap().key.is_some() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_live_between_hosts_encrypted_without_a_reboot_or_a_lost_write() {
    let _one = guest::ONE_VM.lock().await;
    let env = QemuEnv::load();
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _guests = Guests(dir.path());
    let initrd = env.initramfs(dir.path());
    let pki = Pki::create(dir.path());
    let a = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        &agent_provider(&env, "qa", "qcow2"),
    );
    let b = Agent::start(
        hosts.b(),
        dir.path(),
        &pki,
        "b",
        &agent_provider(&env, "qb", "raw"),
    );
    a.wait_up(hosts.a());
    b.wait_up(hosts.b());
    let logs = || format!("agent a:\n{}\nagent b:\n{}", a.logs(), b.logs());

    // The guest's port is forwarded on its host's address: the same port at both hosts.
    let port = free_port();
    let path = dir.path().join("fluidcloud.toml");
    let append = format!("{} fc.hash=skip fc.writer=1", QemuEnv::append("serve", 80));
    let text_of_config = ConfigBuilder::new()
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 60)
        .provider("qa", "qemu", "lab", |p| {
            p.disk_format("qcow2").set("agent", a.url.clone())
        })
        .provider("qb", "qemu", "lab", |p| {
            p.disk_format("raw").set("agent", b.url.clone())
        })
        .policy("watch", "cheapest", "audit", |p| p)
        .service("box", "qa", "watch", |s| {
            s.set("memory_gib", 0.1875).set("vm_mode", "live").vm(
                "guest",
                0.03125,
                &env.kernel,
                &initrd,
                &append,
                &[(80, port)],
            )
        })
        .raw(&pki.daemon_tls)
        .write(&path);
    let config = Config::parse(&path, &text_of_config).unwrap_or_else(|e| panic!("{e}"));

    // The source disk, made through host a's agent (half random, half zeros), and the VM
    // started there.
    let qa = providers::open(&config.providers["qa"]).unwrap();
    let mut disk = vec![0u8; DISK_BYTES as usize];
    fastrand::Rng::with_seed(11).fill(&mut disk[..DISK_BYTES as usize / 2]);
    guest::write_disk(qa.as_ref(), "box", "guest", &disk, dir.path()).await;
    let spec = config.services["box"].components[0].vm().unwrap().clone();
    let op = qa.start_vm("box", &spec).await.unwrap();
    providers::wait_for(qa.as_ref(), &op.id, Duration::from_secs(120))
        .await
        .unwrap();
    guest::wait_for_console(
        &vm_dir(dir.path(), "qa").join("console.log"),
        SERVING_MARKER,
        BOOT_LIMIT,
    );
    let url = |host: std::net::Ipv4Addr| format!("http://{host}:{port}/boot");
    let (at_a, at_b) = (url(hosts.a().addr), url(hosts.b().addr));
    let boot = {
        let at_a = at_a.clone();
        tokio::task::spawn_blocking(move || common::http_get(&at_a))
            .await
            .unwrap()
            .expect("the guest serves at host a")
            .trim()
            .to_string()
    };

    // Moved while the client polls host a, then host b, and a plain NBD client knocks at
    // the target's NBD port.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = poll_ends(
        move || vec![("qa", at_a.clone()), ("qb", at_b.clone())],
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let done = Arc::new(AtomicBool::new(false));
    let probe = Arc::new(Mutex::new(Probe::default()));
    let prober = std::thread::spawn({
        let (dir, done, probe) = (dir.path().to_path_buf(), done.clone(), probe.clone());
        move || probe_target(&dir, done, probe)
    });
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            Command::new(bin())
                .args(["relocate", "--config"])
                .arg(&path)
                .args(["box", "--to", "qb"])
                .env_remove("FLUIDCLOUD_KILL_AT")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    done.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    prober.join().unwrap();
    let said = text(&out);
    eprintln!("relocated in {:?}:\n{said}", started.elapsed());
    assert!(out.status.success(), "{said}\n{}", logs());
    assert!(said.contains("completed"), "{said}\n{}", logs());

    // The same boot served all along, first at host a, then at host b, without a long gap.
    let boots: std::collections::BTreeSet<&str> =
        seen.answers.iter().map(|(_, _, b)| b.as_str()).collect();
    assert_eq!(boots.len(), 1, "the guest rebooted: boot ids {boots:?}");
    assert!(boots.contains(boot.as_str()), "{boots:?} {boot}");
    for end in ["qa", "qb"] {
        assert!(
            seen.answers.iter().any(|(_, e, _)| *e == end),
            "the client never reached {end}: {:?}",
            seen.failures
        );
    }
    let gap = seen.longest_gap();
    eprintln!(
        "the client got {} answers; the longest gap was {gap:?}",
        seen.answers.len()
    );
    assert!(gap < GAP_LIMIT, "the client saw a gap of {gap:?}\n{said}");

    // Host to host, under TLS: the target listened on host b's address, and a client
    // without the key was refused.
    let probe = std::mem::take(&mut *probe.lock().unwrap());
    let refusal = probe
        .refusal
        .as_deref()
        .expect("the target's NBD server never answered the plain client");
    assert!(refusal.contains("TLS"), "{refusal}");
    assert_eq!(probe.key_file_mode, Some(0o600));
    let journal = Journal::open(&dir.path().join("state/journal.sqlite")).unwrap();
    let records = journal.list().unwrap();
    let record = records
        .iter()
        .find(|r| r.request.service == "box")
        .expect("the relocation is in the journal");
    let step = |name: &str| {
        record
            .steps
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name}: {record:#?}"))
            .output
            .clone()
    };
    let prepared = step("prepare-target:vm:guest");
    assert_eq!(prepared["tls"], true, "{prepared}");
    for stream in ["nbd", "migration"] {
        let at = &prepared["incoming"][stream];
        assert_eq!(at["type"], "tcp", "{prepared}");
        assert_eq!(at["host"], hosts.b().addr.to_string(), "{prepared}");
    }
    assert!(prepared["incoming"].get("key").is_none(), "{prepared}");
    let mirrored = step("mirror:vm:guest");
    assert!(
        mirrored["method"].as_str().unwrap().contains("TLS"),
        "{mirrored}"
    );
    let migrated = step("migrate:vm:guest");
    assert_eq!(migrated["tls"], true, "{migrated}");
    assert!(
        migrated["qemu_downtime_ms"].as_u64().is_some(),
        "{migrated}"
    );
    eprintln!("migration: {migrated}");

    // The key is in no journal, output or log, and every key file is gone.
    let key = probe
        .key
        .clone()
        .expect("the relocation's key file was seen");
    assert_eq!(key.len(), 64);
    for (what, text) in [
        ("the journal", format!("{record:?}")),
        ("the output", said.clone()),
        ("the agents' logs", logs()),
    ] {
        assert!(!text.contains(&key), "the key shows in {what}");
    }
    assert!(!vm_dir(dir.path(), "qb").join("live-tls").exists());
    assert!(!vm_dir(dir.path(), "qb").join("incoming.json").exists());
    assert!(
        !dir.path().join("state/relocations").exists() || {
            let left: Vec<_> = std::fs::read_dir(dir.path().join("state/relocations"))
                .unwrap()
                .flatten()
                .filter(|e| e.path().join("guest.live.key").exists())
                .collect();
            left.is_empty()
        }
    );

    // Every block the writer wrote, before, during and after the move, is on the disk the
    // guest hashes at host b, and in host b's image.
    let qb = providers::open(&config.providers["qb"]).unwrap();
    let console = vm_dir(dir.path(), "qb").join("console.log");
    let (hash, written) = power_down_for_hash(qb.as_ref(), "qb", &console).await;
    assert!(written > 0, "the writer wrote nothing");
    let want = sha256(&guest::after_writer(&disk, written));
    assert_eq!(hash, want, "the guest's disk at host b ({written} blocks)");
    let image = dir.path().join("qb-root/volumes/box/guest.raw");
    assert_eq!(guest::sha256_file(&image), want);
    // The paused source emulator ended after the commit, its disk after the grace period.
    assert!(qa.vm_status("box", "guest").await.unwrap().is_none());
    assert!(!dir.path().join("qa-root/volumes/box/guest.qcow2").exists());
}
