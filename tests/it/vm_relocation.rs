//! A VM relocated with the real binary between two qemu providers that store disks in
//! different formats on different buses: the guest (a Debian kernel and a busybox initramfs
//! from `scripts/test-env.sh qemu_system guest`, under TCG) hashes its disk on the serial
//! console, and the hash it prints on the target equals the source disk's. A target where the
//! guest cannot be reached rolls back and the source VM runs again.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::config::{ConfigBuilder, Qemu};
use common::guest::{self, QemuEnv, HASH_MARKER, SERVING_MARKER};
use common::servers::kill_from_pid_file;
use common::{bin, free_port};
use fluidcloud::config::Config;
use fluidcloud::providers::{self, Provider, StopOptions};

const DISK_BYTES: u64 = 32 << 20;
const BOOT_LIMIT: Duration = Duration::from_secs(180);

struct Lab {
    env: QemuEnv,
    dir: tempfile::TempDir,
    initrd: PathBuf,
    port: u16,
    /// What the guest does after hashing its disk (`serve`, `ignore`).
    after: &'static str,
    /// How long the source provider waits for a guest to power down.
    powerdown_secs: u64,
}

impl Lab {
    fn new() -> Lab {
        let env = QemuEnv::load();
        let dir = tempfile::tempdir().unwrap();
        let initrd = env.initramfs(dir.path());
        Lab {
            env,
            dir,
            initrd,
            port: free_port(),
            after: "serve",
            powerdown_secs: 60,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `fluidcloud.toml` with `q1` (qcow2 on virtio) and `q2` (raw on `target_bus` with
    /// `target_nic`), and service `box`: one VM on `q1`.
    fn write_config(&self, target_bus: &str, target_nic: &str, health_secs: u64) -> Config {
        let qemu = |bus: &str, nic: &str, powerdown_secs: u64| {
            Qemu::tcg(
                &self.env.qemu,
                &self.env.firmware,
                std::slice::from_ref(&self.env.libs),
            )
            .disk_bus(bus)
            .nic_model(nic)
            .powerdown_timeout_secs(powerdown_secs)
        };
        let port = self.port;
        let path = self.path("fluidcloud.toml");
        let text = ConfigBuilder::new()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .conduit("stop_timeout_secs", self.powerdown_secs as i64)
            .provider("q1", "qemu", "lab", |p| {
                p.root("providers/q1").disk_format("qcow2").qemu(qemu(
                    "virtio",
                    "virtio-net-pci",
                    self.powerdown_secs,
                ))
            })
            .provider("q2", "qemu", "lab", |p| {
                p.root("providers/q2")
                    .disk_format("raw")
                    .qemu(qemu(target_bus, target_nic, 60))
            })
            .policy("watch", "cheapest", "audit", |p| p)
            .service("box", "q1", "watch", |s| {
                s.set("memory_gib", 0.1875)
                    .health_url(
                        &format!("http://127.0.0.1:{port}/health"),
                        health_secs as i64,
                    )
                    .vm(
                        "guest",
                        0.03125,
                        &self.env.kernel,
                        &self.initrd,
                        &QemuEnv::append(self.after, 80),
                        &[(80, port)],
                    )
            })
            .write(&path);
        Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates the source disk with pseudo-random content; returns its SHA-256 as raw bytes.
    async fn source_disk(&self, config: &Config) -> String {
        let q1 = providers::open(&config.providers["q1"]).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = vec![0u8; DISK_BYTES as usize];
        fastrand::Rng::with_seed(42).fill(&mut bytes[..DISK_BYTES as usize / 2]);
        guest::write_disk(q1.as_ref(), "box", "guest", &bytes, self.dir.path()).await;
        guest::sha256_file(&self.dir.path().join("guest.raw"))
    }

    fn relocate(&self, to: &str) -> Output {
        Command::new(bin())
            .args(["relocate", "--quiet", "--config"])
            .arg(self.path("fluidcloud.toml"))
            .args(["box", "--to", to])
            .env_remove("FLUIDCLOUD_KILL_AT")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Switches off every VM the providers may still run.
    fn stop_all(&self) {
        for p in ["q1", "q2"] {
            kill_from_pid_file(&self.path(&format!("providers/{p}/vms/box/guest/pid")));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn console(config: &Config, provider: &str) -> (std::sync::Arc<dyn Provider>, PathBuf) {
    let p = providers::open(&config.providers[provider]).unwrap_or_else(|e| panic!("{e}"));
    let path = p
        .vm_console("box", "guest")
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no console of box/guest at {provider}"));
    (p, path)
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_from_qcow2_on_virtio_to_raw_on_sata_and_boots_the_same_disk() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Lab::new();
    let config = lab.write_config("sata", "e1000", 150);
    let want = lab.source_disk(&config).await;

    let out = lab.relocate("q2");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("completed"), "{said}");
    assert!(said.contains("downtime:"), "{said}");

    // The target guest hashed the disk it booted from: the source's bytes.
    let (q2, path) = console(&config, "q2").await;
    let line = guest::wait_for_console(&path, HASH_MARKER, BOOT_LIMIT);
    assert_eq!(first_word(&line), want, "console of the target:\n{line}");
    guest::wait_for_console(&path, SERVING_MARKER, BOOT_LIMIT);
    let image = q2.volume_info("box", "guest").await.unwrap().unwrap();
    assert_eq!(image.format.as_str(), "raw");
    assert_eq!(guest::sha256_file(image.path.as_deref().unwrap()), want);

    // The source VM and its disk are gone after the grace period.
    assert!(!exists(&lab.path("providers/q1/volumes/box/guest.qcow2")));
    let q1 = providers::open(&config.providers["q1"]).unwrap();
    assert!(q1.vm_status("box", "guest").await.unwrap().is_none());

    let outcome = q2
        .stop_vm(
            "box",
            "guest",
            StopOptions {
                timeout: Duration::from_secs(60),
                kill_after_timeout: false,
            },
        )
        .await
        .unwrap();
    eprintln!("target powered down: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_cannot_run_the_guest_is_refused_or_rolled_back_to_the_running_source() {
    let _one = guest::ONE_VM.lock().await;
    let mut lab = Lab::new();
    // No network card at the target, but the guest forwards a port: refused at preflight,
    // the source never stops.
    let config = lab.write_config("sata", "none", 90);
    let want = lab.source_disk(&config).await;
    let out = lab.relocate("q2");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("preflight"), "{said}");
    assert!(said.contains("nic_model is `none`"), "{said}");
    assert!(!said.contains("stop-source"), "{said}");
    let (q1, path) = console(&config, "q1").await;
    let status = q1.vm_status("box", "guest").await.unwrap().unwrap();
    assert_eq!(format!("{:?}", status.state), "Running", "{status:?}");
    assert_eq!(
        first_word(&guest::wait_for_console(&path, HASH_MARKER, BOOT_LIMIT)),
        want
    );
    drop(q1);

    // A guest without the AHCI driver, moved to a provider whose disks are on SATA: it boots
    // there, finds no disk and never serves. The health check fails, the target is removed
    // and the source VM boots again from its untouched disk.
    lab.initrd = lab
        .env
        .initramfs_without(lab.dir.path(), &["ahci"], "no-ahci.gz");
    lab.stop_all();
    let config = lab.write_config("sata", "e1000", 90);
    let out = lab.relocate("q2");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("rolled_back"), "{said}");
    assert!(said.contains("health-check"), "{said}");
    let (q1, path) = console(&config, "q1").await;
    let status = q1.vm_status("box", "guest").await.unwrap().unwrap();
    assert_eq!(format!("{:?}", status.state), "Running", "{status:?}");
    let line = guest::wait_for_console(&path, HASH_MARKER, BOOT_LIMIT);
    assert_eq!(first_word(&line), want, "the source disk changed");
    assert!(!exists(&lab.path("providers/q2/volumes/box/guest.raw")));
    let q2 = providers::open(&config.providers["q2"]).unwrap();
    assert!(q2.vm_status("box", "guest").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_does_not_power_down_fails_the_relocation_and_keeps_running() {
    let _one = guest::ONE_VM.lock().await;
    let mut lab = Lab::new();
    lab.after = "ignore";
    lab.powerdown_secs = 8;
    let config = lab.write_config("sata", "e1000", 60);
    let want = lab.source_disk(&config).await;
    let out = lab.relocate("q2");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("stop-source:vm:guest"), "{said}");
    assert!(said.contains("still running"), "{said}");
    assert!(said.contains("not killed"), "{said}");
    // Never switched off: the same emulator still runs the guest, which hashed its disk.
    let (q1, path) = console(&config, "q1").await;
    let status = q1.vm_status("box", "guest").await.unwrap().unwrap();
    assert_eq!(format!("{:?}", status.state), "Running", "{status:?}");
    let line = guest::wait_for_console(&path, HASH_MARKER, BOOT_LIMIT);
    assert_eq!(first_word(&line), want);
    assert!(!exists(&lab.path("providers/q2/volumes/box/guest.raw")));
}
