//! Choosing the accelerator: KVM only when `/dev/kvm` opens and a probe guest really runs
//! under it, quickly, otherwise TCG emulation. On some hosts (nested virtualisation without
//! the features guests expect) a KVM guest runs a boot sector, only very slowly, and a Linux
//! kernel hangs: a probe that takes longer than [`KVM_PROBE_LIMIT`] counts as failed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::config::Accel;

/// The probe must finish within this; a KVM guest that hangs is caught by it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// A sound KVM host runs the probe (firmware and one boot sector) in well under a second;
/// TCG emulation takes about a quarter of a second. Slower than this, KVM is broken.
pub const KVM_PROBE_LIMIT: Duration = Duration::from_secs(3);
/// What the probe guest writes to the isa-debug-exit port; qemu then exits with
/// `(value << 1) | 1`.
const PROBE_VALUE: u8 = 0x2a;

/// Whether `/dev/kvm` can be opened for reading and writing, as qemu needs it.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm cannot be opened ({e})"))
}

/// A boot sector that writes [`PROBE_VALUE`] to I/O port 0xf4 and halts.
fn probe_sector() -> [u8; 512] {
    let mut s = [0u8; 512];
    // mov al, PROBE_VALUE; out 0xf4, al; cli; hlt
    s[..6].copy_from_slice(&[0xb0, PROBE_VALUE, 0xe6, 0xf4, 0xfa, 0xf4]);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Boots the probe sector under `accel` with the emulator `cmd` (which carries the
/// provider's environment and firmware directories) and checks it reached its exit port.
pub async fn probe(
    cmd: &tokio::process::Command,
    scratch: &Path,
    accel: Accel,
) -> Result<Duration, String> {
    let image = scratch.join(format!(".accel-probe-{:08x}.img", fastrand::u32(..)));
    std::fs::write(&image, probe_sector())
        .map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    let mut cmd = clone_command(cmd);
    cmd.args([
        "-machine",
        "pc",
        "-accel",
        accel.as_str(),
        "-m",
        "16",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=1",
        "-drive",
    ])
    .arg(format!(
        "file={},format=raw,if=ide",
        image.to_string_lossy().replace(',', ",,")
    ))
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await;
    let took = started.elapsed();
    let _ = std::fs::remove_file(&image);
    let output = result
        .map_err(|_| format!("the probe guest did not finish within {PROBE_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run the emulator: {e}"))?;
    let want = (i32::from(PROBE_VALUE) << 1) | 1;
    if output.status.code() == Some(want) {
        Ok(took)
    } else {
        Err(format!(
            "the probe guest ended with {} instead of exit code {want}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// tokio's Command cannot be cloned; this copies program, arguments and environment.
fn clone_command(cmd: &tokio::process::Command) -> tokio::process::Command {
    let std = cmd.as_std();
    let mut out = tokio::process::Command::new(std.get_program());
    out.args(std.get_args());
    for (k, v) in std.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    out.stdin(Stdio::null());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_sector_is_bootable_and_writes_the_exit_port() {
        let s = probe_sector();
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(&s[..4], &[0xb0, PROBE_VALUE, 0xe6, 0xf4]);
    }
}
