//! A VM relocated between hosts with the real binaries: an agent in each of two network
//! namespaces serves a qemu provider, `qa` on host a keeping qcow2 disks on virtio and `qb` on
//! host b raw disks on SATA, and `fluidcloud relocate` (in the test's namespace, as the
//! daemon's host) moves the busybox guest of the VM tests from a to b. The disk goes host to
//! host at cutover (a qcow2 image is only consistent once its VM is off), host b converts the
//! staged image into its raw volume, and the guest booted there prints the source disk's hash
//! on its serial console.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::agents::{Agent, Pki};
use common::config::{ConfigBuilder, Qemu};
use common::guest::{self, QemuEnv, HASH_MARKER, SERVING_MARKER};
use common::netns::Hosts;
use common::servers::kill_from_pid_file;
use common::{bin, free_port};
use fluidcloud::conduit::journal::Journal;
use fluidcloud::config::Config;
use fluidcloud::providers::{self, VolumeSpec};

const DISK_BYTES: u64 = 32 << 20;
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// Kills, when dropped, the emulators the agents' qemu providers started under `dir`: they
/// outlive their agent, and a process left in a namespace keeps it alive.
struct Guests<'a>(&'a Path);

impl Drop for Guests<'_> {
    fn drop(&mut self) {
        for provider in ["qa", "qb"] {
            kill_from_pid_file(&vm_dir(self.0, provider).join("pid"));
        }
    }
}

/// Where provider `provider` (its root `dir/PROVIDER-root`) keeps the state of VM
/// `box/guest`: its pid file and serial console.
fn vm_dir(dir: &Path, provider: &str) -> PathBuf {
    dir.join(format!("{provider}-root/vms/box/guest"))
}

/// The `[providers.NAME]` section of an agent: a qemu provider under `NAME-root` storing
/// `format` disks on `bus`, its guests on `nic`, under TCG.
fn agent_provider(env: &QemuEnv, name: &str, format: &str, bus: &str, nic: &str) -> String {
    let qemu = Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
        .disk_bus(bus)
        .nic_model(nic)
        .powerdown_timeout_secs(60);
    let rendered = ConfigBuilder::new()
        .provider(name, "qemu", "lab", |p| {
            p.root(&format!("{name}-root"))
                .disk_format(format)
                .qemu(qemu)
        })
        .render();
    // The builder's `[daemon]` table is the daemon's, not the agent's.
    let mut table: toml::Table = rendered.parse().unwrap();
    table.remove("daemon");
    toml::to_string(&table).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_from_qcow2_on_one_host_to_raw_on_another_and_boots_the_same_disk() {
    let _one = guest::ONE_VM.lock().await;
    let env = QemuEnv::load();
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Dropped before the directory and the namespaces.
    let _guests = Guests(dir.path());
    let initrd = env.initramfs(dir.path());
    let pki = Pki::create(dir.path());
    let a = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        &agent_provider(&env, "qa", "qcow2", "virtio", "virtio-net-pci"),
    );
    let b = Agent::start(
        hosts.b(),
        dir.path(),
        &pki,
        "b",
        &agent_provider(&env, "qb", "raw", "sata", "e1000"),
    );
    a.wait_up(hosts.a());
    b.wait_up(hosts.b());
    let logs = || format!("agent a:\n{}\nagent b:\n{}", a.logs(), b.logs());

    // The daemon's side: the providers by their agents, and `box`, one VM on `qa`. The guest's
    // port is forwarded on its host's address, where the health check reaches it.
    let port = free_port();
    let path = dir.path().join("fluidcloud.toml");
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
            s.set("memory_gib", 0.1875)
                .vm(
                    "guest",
                    0.03125,
                    &env.kernel,
                    &initrd,
                    &QemuEnv::append("serve", 80),
                    &[(80, port)],
                )
                .health_url(&format!("http://{{host}}:{port}/health"), 180)
        })
        .raw(&pki.daemon_tls)
        .write(&path);
    let config = Config::parse(&path, &text_of_config).unwrap_or_else(|e| panic!("{e}"));

    // The source disk, made through host a's agent and filled on its host: half
    // pseudo-random, half zeros.
    let qa = providers::open(&config.providers["qa"]).unwrap_or_else(|e| panic!("{e}"));
    let op = qa
        .create_volume(
            "box",
            &VolumeSpec {
                name: "guest".into(),
                size_bytes: DISK_BYTES,
                format: qa.preferred_disk_format(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    providers::wait_for(qa.as_ref(), &op.id, Duration::from_secs(60))
        .await
        .unwrap();
    let image = qa
        .volume_info("box", "guest")
        .await
        .unwrap()
        .unwrap()
        .path
        .unwrap();
    assert_eq!(image, dir.path().join("qa-root/volumes/box/guest.qcow2"));
    let raw = dir.path().join("guest.raw");
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    fastrand::Rng::with_seed(42).fill(&mut bytes[..DISK_BYTES as usize / 2]);
    std::fs::write(&raw, &bytes).unwrap();
    drop(bytes);
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let want = guest::sha256_file(&raw);

    // Deployed on host a (the VM boots there), then moved to host b.
    let started = std::time::Instant::now();
    let out = Command::new(bin())
        .args(["relocate", "--quiet", "--config"])
        .arg(&path)
        .args(["box", "--to", "qb"])
        .env_remove("FLUIDCLOUD_KILL_AT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out);
    eprintln!("relocated in {:?}:\n{said}", started.elapsed());
    assert!(out.status.success(), "{said}\n{}", logs());
    assert!(said.contains("completed"), "{said}\n{}", logs());
    assert!(said.contains("downtime:"), "{said}");
    // Regression: the summary counted 0 bytes sent for a disk that went between hosts (it
    // added up `bytes_written` only, which a step crossing hosts does not report).
    assert!(said.contains("bytes sent:"), "{said}");
    assert!(!said.contains("(0 B)"), "{said}");

    // The disk went host to host at cutover and host b converted it into its raw volume.
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
    };
    let pre = &step("precopy:volume:guest").output;
    assert!(pre["skipped"].is_string(), "{pre}");
    let sync = &step("sync:volume:guest").output;
    assert_eq!(sync["method"], "viaduct (host to host)", "{sync}");
    assert_eq!(sync["from"], hosts.a().addr.to_string(), "{sync}");
    assert_eq!(sync["adopted"]["method"], "qemu-img convert", "{sync}");

    // The guest at host b hashed the disk it booted from: the source's bytes.
    let console = vm_dir(dir.path(), "qb").join("console.log");
    let line = guest::wait_for_console(&console, HASH_MARKER, BOOT_LIMIT);
    assert_eq!(first_word(&line), want, "console at host b:\n{line}");
    guest::wait_for_console(&console, SERVING_MARKER, BOOT_LIMIT);
    // Clients on other hosts reach it at host b's address.
    let served = reqwest::get(format!("http://{}:{port}/", hosts.b().addr))
        .await
        .unwrap_or_else(|e| panic!("the guest at host b is not reached: {e}"))
        .text()
        .await
        .unwrap();
    assert_eq!(served.trim(), want);
    let target = dir.path().join("qb-root/volumes/box/guest.raw");
    assert_eq!(guest::sha256_file(&target), want);
    eprintln!(
        "the guest at host b hashed its disk {:?} after the relocation began",
        started.elapsed()
    );

    // The source VM and its disk are gone after the grace period; nothing is left staged.
    assert!(!image.exists(), "the source disk is still at host a");
    assert!(qa.vm_status("box", "guest").await.unwrap().is_none());
    let staged = files_under(&dir.path().join("b-state/incoming"));
    assert!(staged.is_empty(), "left staged at host b: {staged:?}");
}
