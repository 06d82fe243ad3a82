//! The qemu driver with real VMs: qemu-system-x86_64 and a small Linux guest from
//! `scripts/test-env.sh qemu_system guest`, run under TCG (KVM guests hang on some hosts).
//! The guest hashes its boot disk; the tests compare that with the data they wrote.

use crate::common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest::{self, QemuEnv, HASH_MARKER, SERVING_MARKER};
use fluidcloud::config::{Accel, DiskBus, QemuSettings};
use fluidcloud::providers::qemu::QemuProvider;
use fluidcloud::providers::{
    DiskFormat, PortForward, Provider, ProviderError, StopOptions, StopOutcome, VmSpec, VmState,
    VolumeSpec,
};

const SERVICE: &str = "shop";
const DISK_BYTES: u64 = 32 << 20;
/// Boot and hash take about 6 s under TCG alone; two cores shared with other work need more.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

struct Lab {
    env: QemuEnv,
    dir: tempfile::TempDir,
    initrd: PathBuf,
}

/// Emulators are daemons: a test that fails half-way must not leave them running.
impl Drop for Lab {
    fn drop(&mut self) {
        let pid_files = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|provider| {
                std::fs::read_dir(provider.path().join("vms"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .flat_map(|service| {
                std::fs::read_dir(service.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|vm| vm.path().join("pid"));
        for pid_file in pid_files {
            common::servers::kill_from_pid_file(&pid_file);
        }
    }
}

impl Lab {
    fn new() -> Lab {
        let env = QemuEnv::load();
        let dir = tempfile::tempdir().unwrap();
        let initrd = env.initramfs(dir.path());
        Lab { env, dir, initrd }
    }

    fn settings(&self, bus: DiskBus, nic: &str) -> QemuSettings {
        QemuSettings {
            binary: Some(self.env.qemu.clone()),
            firmware_dirs: self.env.firmware.clone(),
            library_path: vec![self.env.libs.clone()],
            accel: Accel::Tcg,
            disk_bus: bus,
            nic_model: nic.to_string(),
            powerdown_timeout: Duration::from_secs(1),
        }
    }

    fn root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn open(&self, name: &str, format: DiskFormat, settings: QemuSettings) -> Arc<QemuProvider> {
        QemuProvider::open_at(name, &self.root(name), format, settings).expect("provider opens")
    }

    fn spec(&self, name: &str, after: &str, ports: Vec<PortForward>) -> VmSpec {
        let mut spec = VmSpec::new(name);
        spec.memory_mib = 192;
        spec.kernel = Some(self.env.kernel.clone());
        spec.initrd = Some(self.initrd.clone());
        spec.append = Some(QemuEnv::append(
            after,
            ports.first().map_or(80, |p| p.guest),
        ));
        spec.ports = ports;
        spec
    }

    /// Creates the volume, fills it with pseudo-random bytes through qemu-img and returns
    /// the SHA-256 of the bytes the guest must see.
    async fn disk_with_data(&self, p: &QemuProvider, name: &str, seed: u64) -> String {
        let format = p.preferred_disk_format();
        p.create_volume(
            SERVICE,
            &VolumeSpec {
                name: name.to_string(),
                size_bytes: DISK_BYTES,
                format,
            },
        )
        .await
        .expect("volume created");
        let info = p
            .volume_info(SERVICE, name)
            .await
            .unwrap()
            .expect("volume exists");
        let raw = self.dir.path().join(format!("{name}-{seed}.raw"));
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut bytes = vec![0u8; DISK_BYTES as usize];
        rng.fill(&mut bytes);
        std::fs::write(&raw, &bytes).unwrap();
        let image = info.path.expect("a local path");
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            format.as_str(),
            path(&raw),
            path(&image),
        ]);
        let want = guest::sha256_file(&raw);
        // Read back through qemu-img, so that a wrong write is told from a wrong read.
        let back = self.dir.path().join(format!("{name}-{seed}.back"));
        qemu_img(&[
            "convert",
            "-f",
            format.as_str(),
            "-O",
            "raw",
            path(&image),
            path(&back),
        ]);
        assert_eq!(
            guest::sha256_file(&back),
            want,
            "qemu-img reads back what it wrote"
        );
        want
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn console(p: &QemuProvider, vm: &str) -> PathBuf {
    p.vm_console(SERVICE, vm)
        .await
        .unwrap()
        .expect("a started VM has a console")
}

/// Waits for `marker` on the console without blocking the runtime.
async fn wait_console(p: &QemuProvider, vm: &str, marker: &'static str) -> String {
    let log = console(p, vm).await;
    tokio::task::spawn_blocking(move || guest::wait_for_console(&log, marker, BOOT_LIMIT))
        .await
        .unwrap()
}

async fn wait_stopped(p: &QemuProvider, vm: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        let st = p.vm_status(SERVICE, vm).await.unwrap().expect("known VM");
        if st.state == VmState::Stopped {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "still {:?} after {limit:?}",
            st.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read answer");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_reads_what_was_written_on_every_bus_and_format() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Lab::new();
    let mut timings = Vec::new();
    for (i, (format, bus, nic)) in [
        (DiskFormat::Qcow2, DiskBus::Virtio, "virtio-net-pci"),
        (DiskFormat::Raw, DiskBus::Ide, "e1000"),
        (DiskFormat::Raw, DiskBus::Sata, "none"),
        (DiskFormat::Qcow2, DiskBus::Scsi, "virtio-net-pci"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("p{i}");
        let p = lab.open(&name, format, lab.settings(bus, nic));
        let want = lab.disk_with_data(&p, "web", 7 + i as u64).await;
        let started = Instant::now();
        let op = p
            .start_vm(SERVICE, &lab.spec("web", "poweroff", Vec::new()))
            .await
            .unwrap_or_else(|e| panic!("{format}/{bus:?}: {e}"));
        assert!(op.detail.contains("started under tcg"), "{}", op.detail);
        let line = wait_console(&p, "web", HASH_MARKER).await;
        let secs = started.elapsed().as_secs_f64();
        let got = line.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            got, want,
            "{format} on {bus:?}: the guest saw other bytes ({line})"
        );
        wait_stopped(&p, "web", Duration::from_secs(60)).await;
        let outcome = p
            .stop_vm(
                SERVICE,
                "web",
                StopOptions {
                    timeout: Duration::from_secs(1),
                    kill_after_timeout: false,
                },
            )
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::AlreadyStopped);
        timings.push(format!("{format}/{bus:?}: {secs:.1} s"));
    }
    eprintln!("boot to hash under TCG: {}", timings.join(", "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_guest_is_reached_readopted_and_powered_down() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Lab::new();
    let settings = lab.settings(DiskBus::Virtio, "virtio-net-pci");
    let p = lab.open("serve", DiskFormat::Qcow2, settings.clone());
    let want = lab.disk_with_data(&p, "web", 42).await;
    let spec = lab.spec(
        "web",
        "serve",
        vec![PortForward {
            guest: 8080,
            host: None,
        }],
    );
    p.start_vm(SERVICE, &spec).await.expect("starts");
    let hash = wait_console(&p, "web", HASH_MARKER).await;
    assert!(hash.starts_with(&want), "{hash}");
    wait_console(&p, "web", SERVING_MARKER).await;

    let st = p.vm_status(SERVICE, "web").await.unwrap().expect("known");
    assert_eq!(st.state, VmState::Running);
    assert_eq!(st.detail.as_deref(), Some("running"));
    assert!(!st.adopted, "this provider started it");
    let pid = st.pid.expect("a pid");
    let endpoint = st.endpoint(8080).expect("8080 is forwarded");
    let port = endpoint.port;
    let body = tokio::task::spawn_blocking(move || http_get(port, "/"))
        .await
        .unwrap();
    assert!(
        body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
        "{body}"
    );
    assert!(body.contains(&want), "the guest serves its hash: {body}");

    // A new daemon takes the running VM over.
    drop(p);
    let p = lab.open("serve", DiskFormat::Qcow2, settings);
    let st = p.vm_status(SERVICE, "web").await.unwrap().expect("known");
    assert_eq!(
        (st.state, st.pid, st.adopted),
        (VmState::Running, Some(pid), true)
    );
    assert_eq!(st.endpoint(8080), Some(endpoint));
    let again = p.start_vm(SERVICE, &spec).await.expect("same spec is fine");
    assert!(again.detail.contains("already running"), "{}", again.detail);
    let mut other = spec.clone();
    other.memory_mib = 256;
    let err = p.start_vm(SERVICE, &other).await.expect_err("another spec");
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
    let err = p.delete_volume(SERVICE, "web").await.expect_err("in use");
    assert!(err.to_string().contains("running VMs use it"), "{err}");
    let err = p.remove_vm(SERVICE, "web").await.expect_err("running");
    assert!(err.to_string().contains("stop it first"), "{err}");

    let outcome = p
        .stop_vm(
            SERVICE,
            "web",
            StopOptions {
                timeout: Duration::from_secs(60),
                kill_after_timeout: false,
            },
        )
        .await
        .expect("powers down");
    let StopOutcome::Stopped { after } = outcome else {
        panic!("a guest that reacts to the power button stops by itself: {outcome:?}")
    };
    eprintln!("power button to power off: {:.1} s", after.as_secs_f64());
    let log = std::fs::read_to_string(console(&p, "web").await).unwrap();
    assert!(log.contains("power button pressed"), "{log}");
    let st = p.vm_status(SERVICE, "web").await.unwrap().expect("known");
    assert_eq!((st.state, st.pid), (VmState::Stopped, None));
    p.remove_vm(SERVICE, "web").await.expect("removed");
    assert!(p.vm_status(SERVICE, "web").await.unwrap().is_none());
    p.delete_volume(SERVICE, "web")
        .await
        .expect("no longer in use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_ignoring_the_power_button_is_reported_and_killed_only_on_request() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Lab::new();
    let p = lab.open("deaf", DiskFormat::Raw, lab.settings(DiskBus::Sata, "none"));
    lab.disk_with_data(&p, "web", 3).await;
    p.start_vm(SERVICE, &lab.spec("web", "ignore", Vec::new()))
        .await
        .expect("starts");
    wait_console(&p, "web", SERVING_MARKER).await;

    let started = Instant::now();
    let err = p
        .stop_vm(
            SERVICE,
            "web",
            StopOptions {
                timeout: Duration::from_secs(3),
                kill_after_timeout: false,
            },
        )
        .await
        .expect_err("the guest ignores the button");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(
        matches!(err, ProviderError::StopTimedOut { .. })
            && err.to_string().contains("ACPI power button"),
        "{err}"
    );
    let st = p.vm_status(SERVICE, "web").await.unwrap().expect("known");
    assert_eq!(st.state, VmState::Running, "it was not killed");

    let outcome = p
        .stop_vm(
            SERVICE,
            "web",
            StopOptions {
                timeout: Duration::from_secs(2),
                kill_after_timeout: true,
            },
        )
        .await
        .expect("switched off");
    assert!(matches!(outcome, StopOutcome::Killed { .. }), "{outcome:?}");
    let st = p.vm_status(SERVICE, "web").await.unwrap().expect("known");
    assert_eq!(st.state, VmState::Stopped);
}

#[tokio::test]
async fn bad_settings_are_refused_with_what_is_wrong() {
    let lab = Lab::new();
    let mut settings = lab.settings(DiskBus::Virtio, "none");
    settings.binary = Some(lab.dir.path().join("no-qemu-here"));
    let err = match QemuProvider::open_at("bad", &lab.root("bad"), DiskFormat::Raw, settings) {
        Ok(_) => panic!("opened without an emulator"),
        Err(e) => e,
    };
    assert!(
        err.to_string()
            .contains("no-qemu-here (`binary`) does not exist"),
        "{err}"
    );

    let p = lab.open("p", DiskFormat::Raw, lab.settings(DiskBus::Virtio, "none"));
    let spec = lab.spec("web", "poweroff", Vec::new());
    let err = p.start_vm(SERVICE, &spec).await.expect_err("no boot disk");
    assert!(
        err.is_not_found() && err.to_string().contains("the boot disk of vm `shop/web`"),
        "{err}"
    );
    lab.disk_with_data(&p, "web", 1).await;
    let mut missing = spec.clone();
    missing.kernel = Some(lab.dir.path().join("vmlinuz-missing"));
    let err = p.start_vm(SERVICE, &missing).await.expect_err("no kernel");
    assert!(
        err.to_string()
            .contains("vmlinuz-missing is not a readable file"),
        "{err}"
    );
    let mut ports = spec.clone();
    ports.ports = vec![PortForward {
        guest: 80,
        host: None,
    }];
    let err = p.start_vm(SERVICE, &ports).await.expect_err("no nic");
    assert!(err.to_string().contains("nic_model is `none`"), "{err}");
    assert!(p.vm_status(SERVICE, "web").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_acceleration_settles_on_one_that_runs_a_probe_guest() {
    let _one = guest::ONE_VM.lock().await;
    let lab = Lab::new();
    let mut settings = lab.settings(DiskBus::Virtio, "none");
    settings.accel = Accel::Auto;
    let p = lab.open("auto", DiskFormat::Raw, settings);
    let started = Instant::now();
    let accel = p.accel().await.expect("auto always finds one");
    assert!(matches!(accel, Accel::Kvm | Accel::Tcg), "{accel:?}");
    assert_eq!(p.accel().await.unwrap(), accel, "the choice is kept");
    eprintln!(
        "accel = auto chose {} in {:.1} s",
        accel.as_str(),
        started.elapsed().as_secs_f64()
    );
    let leftovers: Vec<_> = std::fs::read_dir(lab.root("auto").join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the probe image is removed: {leftovers:?}"
    );
}
