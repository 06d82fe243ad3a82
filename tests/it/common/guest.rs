//! A tiny Linux guest for the VM tests: Debian's kernel and an initramfs of static busybox,
//! the kernel modules the disk buses and NICs need, and an `/init` that hashes the first
//! disk and prints `FLUIDCLOUD-DISK-SHA256 <hex>` on the serial console. What it does next
//! comes from the kernel command line (`fc.after=`):
//!
//! - `poweroff`: powers off at once;
//! - `serve`: brings up eth0 (slirp's 10.0.2.15), serves the hash over HTTP on `fc.port`
//!   (`/`, `/health`, `/boot` with the kernel's boot id, `/uptime`) and powers off when the
//!   ACPI power button is pressed;
//! - `ignore`: keeps running and ignores the power button.
//!
//! `fc.hash=skip` prints `skipped` instead of hashing (a large disk takes long under TCG).
//!
//! `fc.writer=1` (with `serve`) runs a writer that keeps writing known blocks to the disk
//! (see [`writer_block`]), about 20 a second, each flushed before `/written` counts it. At the power button it
//! stops, and the guest hashes its whole disk and prints
//! `FLUIDCLOUD-FINAL-SHA256 <hex> written=<n>` before it powers off.
//!
//! `scripts/test-env.sh qemu_system guest` installs the emulator, kernel and busybox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One VM at a time, across the VM and VM relocation tests (one binary, run in parallel):
/// TCG guests on two cores slow each other down past any useful limit.
pub static ONE_VM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The marker line the guest prints before the disk's hash.
pub const HASH_MARKER: &str = "FLUIDCLOUD-DISK-SHA256 ";
/// Printed once the guest serves HTTP.
pub const SERVING_MARKER: &str = "FLUIDCLOUD-SERVING";
/// Printed at the power button by a guest that ran the writer.
pub const FINAL_MARKER: &str = "FLUIDCLOUD-FINAL-SHA256 ";
/// The writer's blocks: 4 KiB each, in 256 slots from 8 MiB into the disk.
pub const WRITER_BLOCK: usize = 4096;
pub const WRITER_FIRST_BLOCK: usize = 2048;
pub const WRITER_SLOTS: usize = 256;

/// The `k`-th block the writer writes (at slot `k % WRITER_SLOTS`): the line
/// `format!("{k:015}\n")` repeated.
pub fn writer_block(k: usize) -> Vec<u8> {
    format!("{k:015}\n").repeat(WRITER_BLOCK / 16).into_bytes()
}

/// The disk a guest leaves after writing `written` blocks onto `disk`.
pub fn after_writer(disk: &[u8], written: usize) -> Vec<u8> {
    let mut out = disk.to_vec();
    for k in written.saturating_sub(WRITER_SLOTS)..written {
        let at = (WRITER_FIRST_BLOCK + k % WRITER_SLOTS) * WRITER_BLOCK;
        out[at..at + WRITER_BLOCK].copy_from_slice(&writer_block(k));
    }
    out
}

/// Modules the guest loads, each after what it depends on: virtio, the PIIX IDE, AHCI and
/// virtio-scsi disk controllers with the SCSI disk driver, the virtio and e1000 NICs, and the
/// ACPI power button.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "ata_piix",
    "ahci",
    "sd_mod",
    "virtio_net",
    "e1000",
    "button",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" 2>/dev/null || echo "fc-init: cannot load $m"
done
after=poweroff
port=80
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        fc.after=*) after=${arg#fc.after=} ;;
        fc.port=*) port=${arg#fc.port=} ;;
    esac
done
# Disk drivers probe asynchronously (SCSI scans in particular): wait for the first disk.
disk=
for i in $(seq 1 200); do
    for d in vda sda hda; do
        if [ -b "/dev/$d" ]; then disk=/dev/$d; break 2; fi
    done
    sleep 0.1
done
if [ -z "$disk" ]; then
    echo "fc-init: no disk appeared; block devices: $(ls /sys/block)"
    poweroff -f
fi
hash=skipped
grep -q 'fc.hash=skip' /proc/cmdline || hash=$(sha256sum "$disk" | cut -d' ' -f1)
echo "FLUIDCLOUD-DISK-SHA256 $hash $disk"
writer() {
    k=0
    while [ ! -e /tmp/stop ]; do
        yes "$(printf '%015d' $k)" | head -c 4096 \
            | dd of="$1" bs=4096 seek=$((2048 + k % 256)) conv=notrunc,fsync 2>/dev/null
        k=$((k + 1))
        echo $k > /www/written.tmp && mv /www/written.tmp /www/written
        usleep 50000
    done
}
power_button() {
    set -- $(cat /sys/firmware/acpi/interrupts/ff_pwr_btn)
    [ "$1" != 0 ]
}
case "$after" in
    serve)
        ifconfig lo 127.0.0.1 up
        ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
        route add default gw 10.0.2.2
        mkdir -p /www
        echo "$hash" > /www/index.html
        echo ok > /www/health
        cat /proc/sys/kernel/random/boot_id > /www/boot
        echo 0 > /www/written
        (while true; do cut -d' ' -f1 /proc/uptime > /www/uptime.tmp; mv /www/uptime.tmp /www/uptime; sleep 1; done) &
        writing=
        if grep -q 'fc.writer=1' /proc/cmdline; then
            writer "$disk" &
            writing=$!
        fi
        httpd -p "$port" -h /www
        echo "FLUIDCLOUD-SERVING $port"
        until power_button; do sleep 0.5; done
        echo "fc-init: power button pressed; powering off"
        if [ -n "$writing" ]; then
            touch /tmp/stop
            wait "$writing"
            sync
            echo 3 > /proc/sys/vm/drop_caches
            echo "FLUIDCLOUD-FINAL-SHA256 $(sha256sum "$disk" | cut -d' ' -f1) written=$(cat /www/written)"
        fi
        sync
        poweroff -f
        ;;
    ignore)
        echo "FLUIDCLOUD-SERVING none"
        while true; do sleep 3600; done
        ;;
    *)
        poweroff -f
        ;;
esac
"#;

/// Where the emulator and the guest's parts are, from the test environment.
#[derive(Debug, Clone)]
pub struct QemuEnv {
    pub qemu: PathBuf,
    pub libs: PathBuf,
    pub firmware: Vec<PathBuf>,
    pub kernel: PathBuf,
    pub modules: PathBuf,
    pub busybox: PathBuf,
}

impl QemuEnv {
    /// Reads the env file of `scripts/test-env.sh`; panics with what to run when the
    /// emulator or the guest is not installed.
    pub fn load() -> QemuEnv {
        let vars = super::servers::env_vars();
        let get = |name: &str| -> PathBuf {
            let path = vars.get(name).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{name} is not set; run scripts/test-env.sh qemu_system guest first")
            });
            assert!(
                path.exists(),
                "{name}={} does not exist; run scripts/test-env.sh qemu_system guest again",
                path.display()
            );
            path
        };
        let firmware = vars
            .get("FLUIDCLOUD_QEMU_FIRMWARE")
            .map(|v| v.split(':').map(PathBuf::from).collect())
            .unwrap_or_default();
        QemuEnv {
            qemu: get("FLUIDCLOUD_QEMU_SYSTEM"),
            libs: get("FLUIDCLOUD_QEMU_LIBS"),
            firmware,
            kernel: get("FLUIDCLOUD_GUEST_KERNEL"),
            modules: get("FLUIDCLOUD_GUEST_MODULES"),
            busybox: get("FLUIDCLOUD_GUEST_BUSYBOX"),
        }
    }

    /// Builds the initramfs into `dir` and returns its path.
    pub fn initramfs(&self, dir: &Path) -> PathBuf {
        self.initramfs_without(dir, &[], "initrd.gz")
    }

    /// Builds an initramfs lacking the driver modules `missing` (a guest that cannot see
    /// disks on some bus) into `dir/name`.
    pub fn initramfs_without(&self, dir: &Path, missing: &[&str], name: &str) -> PathBuf {
        let stage = dir.join(format!("{name}.stage"));
        let _ = std::fs::remove_dir_all(&stage);
        for sub in ["bin", "modules", "proc", "sys", "dev", "tmp"] {
            std::fs::create_dir_all(stage.join(sub)).unwrap();
        }
        std::fs::copy(&self.busybox, stage.join("bin/busybox")).unwrap();
        let wanted: Vec<&str> = MODULES
            .iter()
            .copied()
            .filter(|m| !missing.contains(m))
            .collect();
        let order = module_order(&self.modules, &wanted);
        let mut names = Vec::new();
        for rel in &order {
            let file = Path::new(rel)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            std::fs::copy(self.modules.join(rel), stage.join("modules").join(&file))
                .unwrap_or_else(|e| panic!("cannot copy module {rel}: {e}"));
            names.push(file);
        }
        std::fs::write(stage.join("modules.order"), names.join("\n") + "\n").unwrap();
        std::fs::write(stage.join("init"), INIT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(stage.join("init"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let out = dir.join(name);
        let script = format!(
            "cd '{}' && '{bb}' find . | '{bb}' cpio -o -H newc 2>/dev/null | '{bb}' gzip -1 > '{}'",
            stage.display(),
            out.display(),
            bb = self.busybox.display()
        );
        let status = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .status()
            .expect("run sh");
        assert!(status.success(), "packing the initramfs failed: {script}");
        out
    }

    /// The kernel command line for the guest.
    pub fn append(after: &str, port: u16) -> String {
        format!("console=ttyS0 quiet panic=-1 fc.after={after} fc.port={port}")
    }
}

/// The module files (relative to the module directory) to load for `wanted`, each after
/// its dependencies, from `modules.dep`.
pub fn module_order(dir: &Path, wanted: &[&str]) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("modules.dep"))
        .unwrap_or_else(|e| panic!("cannot read {}/modules.dep: {e}", dir.display()));
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(module)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".ko")
            .replace('-', "_");
        by_name.insert(name, module.to_string());
        deps.insert(
            module.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, seen, out);
        }
        out.push(m.to_string());
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for w in wanted {
        let m = by_name
            .get(*w)
            .unwrap_or_else(|| panic!("module {w} is not in {}/modules.dep", dir.display()));
        visit(m, &deps, &mut seen, &mut out);
    }
    out
}

/// Waits until the console log holds a line starting with `marker` and returns the rest of
/// that line; panics with the log after `limit`.
pub fn wait_for_console(console: &Path, marker: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(marker))
        {
            return line.to_string();
        }
        assert!(
            started.elapsed() < limit,
            "no `{marker}` on the console within {limit:?}; console {}:\n{text}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SHA-256 of a file, hex, with the host's `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string()
}

/// Creates volume `service/name` of `bytes.len()` at `provider` (in its format) and writes
/// `bytes` into it through `qemu-img` (from a raw copy in `scratch`).
pub async fn write_disk(
    provider: &dyn fluidcloud::providers::Provider,
    service: &str,
    name: &str,
    bytes: &[u8],
    scratch: &Path,
) {
    use fluidcloud::providers::{self, VolumeSpec};
    let op = provider
        .create_volume(
            service,
            &VolumeSpec {
                name: name.into(),
                size_bytes: bytes.len() as u64,
                format: provider.preferred_disk_format(),
            },
        )
        .await
        .unwrap();
    providers::wait_for(provider, &op.id, Duration::from_secs(60))
        .await
        .unwrap();
    let info = provider.volume_info(service, name).await.unwrap().unwrap();
    let raw = scratch.join(format!("{name}.raw"));
    std::fs::write(&raw, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", info.format.as_str()])
        .arg(&raw)
        .arg(info.path.unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
