//! Relocation of a VM with a 1 GiB disk between two qemu providers on this host: qcow2 to
//! raw, both on virtio with a virtio NIC, under TCG, by the engine of `fluidcloud relocate`
//! and the daemon, in each mode (`cold`, `precopy`, `live`). The guest is the tests' busybox guest
//! (`scripts/test-env.sh qemu_system guest`), serving HTTP through a forwarded port.
//!
//! `cargo bench --bench vm_relocation -- [--disk-mib N] [--rounds N] [--modes cold,precopy,live]`
//!
//! Each round: a fresh pair of providers; the source disk gets the same pseudo-random half
//! (the rest stays unallocated); the VM is deployed and must serve before the relocation
//! starts. A client asks the guest for `/health` every 50 ms, at the source's port and then
//! the target's; its longest gap between answers is the downtime it saw. Printed per round:
//! total (first step started → commit), the downtime the journal gives (source stopped or
//! paused → the target's VM runs), the client's gap, for a live move QEMU's own downtime of
//! the last pass, and the bytes sent (disk, all passes of a pre-copy, and memory for a live
//! move); the target image is
//! hashed on the host and must equal the source's content.

#[path = "common/mod.rs"]
mod common;
use clap::Parser;
#[allow(unused_imports)]
use common::free_port;

#[path = "../tests/it/common/config.rs"]
mod config;

#[path = "../tests/it/common/servers.rs"]
#[allow(dead_code)]
mod servers;

#[path = "../tests/it/common/guest.rs"]
#[allow(dead_code)]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::{policy_path, ConfigBuilder, Qemu};
use fluidcloud::conduit::engine::Engine;
use fluidcloud::conduit::journal::RelocationRecord;
use fluidcloud::conduit::{RelocationRequest, RelocationState};
use fluidcloud::config::Config;
use fluidcloud::providers::{self, VolumeSpec};
use guest::QemuEnv;

/// A VM relocation between two qemu providers under TCG.
#[derive(Parser, Debug)]
#[command(
    name = "vm_relocation",
    bin_name = "cargo bench --bench vm_relocation --"
)]
struct Args {
    /// The VM's disk (64 at least).
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Relocations to time per mode (1 to 10).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// The modes to measure, side by side.
    #[arg(long, value_delimiter = ',', default_value = "cold,precopy,live")]
    modes: Vec<String>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

fn write_config(
    dir: &Path,
    env: &QemuEnv,
    initrd: &Path,
    mode: &str,
    disk_mib: u64,
) -> Result<Config, String> {
    let qemu = || {
        Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
            .disk_bus("virtio")
            .nic_model("virtio-net-pci")
            .powerdown_timeout_secs(120)
    };
    let text = ConfigBuilder::new()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 120)
        .provider("q1", "qemu", "lab", |p| {
            p.root("q1").disk_format("qcow2").qemu(qemu())
        })
        .provider("q2", "qemu", "lab", |p| {
            p.root("q2").disk_format("raw").qemu(qemu())
        })
        .policy_file("watch", &policy_path("cheapest"), |p| p)
        .service("box", "q1", "watch", |s| {
            s.set("memory_gib", 0.25).set("vm_mode", mode).vm(
                "guest",
                disk_mib as f64 / 1024.0,
                &env.kernel,
                initrd,
                &format!("{} fc.hash=skip", QemuEnv::append("serve", 80)),
                &[(80, 0)],
            )
        })
        .render();
    let path = dir.join("fluidcloud.toml");
    std::fs::write(&path, &text).map_err(|e| e.to_string())?;
    Config::parse(&path, &text).map_err(|e| e.to_string())
}

/// The host port of the guest's HTTP port at `provider`, once it has started there.
fn port_at(dir: &Path, provider: &str) -> Option<u16> {
    let state = std::fs::read(dir.join(format!("{provider}/vms/box/guest/state.json"))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&state).ok()?;
    v["ports"][0]["host"].as_u64().map(|p| p as u16)
}

/// Asks the guest for `/health` every 50 ms (the source's port, then the target's) until
/// `stop`; returns the longest gap between answers, and whether the target answered.
fn poll(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Duration, bool)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_millis(500))
            .build()
            .expect("client");
        let (mut last, mut gap, mut target) = (None::<Instant>, Duration::ZERO, false);
        while !stop.load(Ordering::Relaxed) {
            let tick = Instant::now();
            for end in ["q1", "q2"] {
                let Some(port) = port_at(&dir, end) else {
                    continue;
                };
                let url = format!("http://127.0.0.1:{port}/health");
                let ok = rt.block_on(async {
                    client
                        .get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                });
                if ok {
                    let now = Instant::now();
                    if let Some(l) = last {
                        gap = gap.max(now - l);
                    }
                    last = Some(now);
                    target |= end == "q2";
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50).saturating_sub(tick.elapsed()));
        }
        (gap, target)
    })
}

/// A raw image of `mib` MiB whose first half is pseudo-random and the rest a hole.
fn template(dir: &Path, mib: u64) -> Result<PathBuf, String> {
    use std::io::Write;
    let path = dir.join("template.raw");
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib / 2 {
        rng.fill(&mut block);
        f.write_all(&block).map_err(|e| e.to_string())?;
    }
    f.set_len(mib << 20).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Waits until the guest answers `/health` at `provider`; returns how long that took.
async fn wait_serving(dir: &Path, provider: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if let Some(port) = port_at(dir, provider) {
            let url = format!("http://127.0.0.1:{port}/health");
            if let Ok(r) = client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(started.elapsed());
                }
            }
        }
        if started.elapsed() > limit {
            return Err(format!(
                "the guest did not serve at {provider} within {limit:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill_vms(dir: &Path) {
    for p in ["q1", "q2"] {
        servers::kill_from_pid_file(&dir.join(format!("{p}/vms/box/guest/pid")));
    }
}

struct Round {
    boot: f64,
    total: f64,
    downtime: f64,
    client_gap: f64,
    /// QEMU's downtime of a live move's last pass.
    qemu_ms: Option<u64>,
    /// Bytes sent: disk (converted or mirrored) and memory.
    bytes: u64,
}

/// A number in a step's output.
fn output_u64(record: &RelocationRecord, prefix: &str, key: &str) -> u64 {
    record
        .steps
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .filter_map(|s| s.output.get(key).and_then(serde_json::Value::as_u64))
        .sum()
}

#[allow(clippy::too_many_arguments)]
fn round(
    work: &Path,
    mode: &str,
    n: u32,
    env: &QemuEnv,
    initrd: &Path,
    raw: &Path,
    want: &str,
    disk_mib: u64,
) -> Result<Round, String> {
    let dir = work.join(format!("{mode}-{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = Arc::new(write_config(&dir, env, initrd, mode, disk_mib)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = runtime.block_on(async {
        {
            let q1 = providers::open(&config.providers["q1"]).map_err(|e| e.to_string())?;
            let op = q1
                .create_volume(
                    "box",
                    &VolumeSpec {
                        name: "guest".into(),
                        size_bytes: disk_mib << 20,
                        format: q1.preferred_disk_format(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            providers::wait_for(q1.as_ref(), &op.id, Duration::from_secs(120))
                .await
                .map_err(|e| e.to_string())?;
            let image = q1
                .volume_info("box", "guest")
                .await
                .map_err(|e| e.to_string())?
                .and_then(|i| i.path)
                .ok_or("the source volume has no path")?;
            let out = Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "qcow2"])
                .arg(raw)
                .arg(&image)
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
        }
        let engine = Engine::open(config.clone(), None, None).map_err(|e| e.to_string())?;
        engine
            .deploy("box", "q1")
            .await
            .map_err(|e| format!("cannot deploy: {e}"))?;
        let boot = wait_serving(&dir, "q1", Duration::from_secs(300)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let client = poll(dir.clone(), stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let record = engine
            .run(RelocationRequest {
                decision_id: format!("bench-vm-{n}"),
                service: "box".into(),
                from: "q1".into(),
                to: "q2".into(),
                reason: "benchmark".into(),
                origin: "operator".into(),
            })
            .await
            .map_err(|e| e.to_string());
        // The client goes on until the target has answered (a cold target boots first).
        let waited = Instant::now();
        while record.is_ok()
            && waited.elapsed() < Duration::from_secs(300)
            && !client.is_finished()
            && port_at(&dir, "q2").is_none()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if record.is_ok()
            && wait_serving(&dir, "q2", Duration::from_secs(300))
                .await
                .is_ok()
        {
            // A few more polls after the target's first answer.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (gap, reached) = client.join().map_err(|_| "the client panicked")?;
        let record = record?;
        if !reached {
            return Err("the client never reached the target".into());
        }
        if record.state != RelocationState::Completed {
            return Err(format!(
                "the relocation ended {}: {}",
                record.state.as_str(),
                record.detail
            ));
        }
        let downtime = engine
            .downtime(&record)
            .ok_or("the journal gives no downtime")?;
        Ok::<_, String>((boot, record, downtime, gap))
    });
    drop(runtime);
    kill_vms(&dir);
    let (boot, record, downtime, gap) = result?;
    let target = dir.join("q2/volumes/box/guest.raw");
    let got = guest::sha256_file(&target);
    if got != want {
        return Err(format!(
            "{} holds other content than the source ({got} vs {want})",
            target.display()
        ));
    }
    let first = record.steps.iter().filter_map(|s| s.started_at).min();
    let commit = record
        .steps
        .iter()
        .find(|s| s.name == "commit")
        .and_then(|s| s.finished_at);
    let total = match (first, commit) {
        (Some(a), Some(b)) => (b - a).to_std().map_err(|e| e.to_string())?.as_secs_f64(),
        _ => return Err("the journal lacks start or commit times".into()),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let live = record.steps.iter().any(|s| s.name.starts_with("migrate:"));
    Ok(Round {
        boot: boot.as_secs_f64(),
        total,
        downtime: downtime.as_secs_f64(),
        client_gap: gap.as_secs_f64(),
        qemu_ms: live.then(|| output_u64(&record, "migrate:", "qemu_downtime_ms")),
        bytes: output_u64(&record, "sync:volume:", "bytes_written")
            + output_u64(&record, "precopy:vm:", "bytes_read")
            + output_u64(&record, "final-pass:vm:", "bytes_read")
            + output_u64(&record, "migrate:", "memory_bytes")
            + output_u64(&record, "migrate:", "disk_bytes"),
    })
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    args.disk_mib = args.disk_mib.max(64);
    args.rounds = args.rounds.clamp(1, 10);
    let env = QemuEnv::load();
    let work = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vm_relocation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let initrd = env.initramfs(work.path());
    let raw = match template(work.path(), args.disk_mib) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vm_relocation: cannot build the disk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let want = guest::sha256_file(&raw);
    println!(
        "VM relocation, {} MiB disk ({} MiB random, rest unallocated), qemu q1 (qcow2, virtio) -> q2 (raw, virtio), 256 MiB guest, TCG, one host",
        args.disk_mib,
        args.disk_mib / 2
    );
    println!(
        "{:<6} {:<6} {:>7} {:>8} {:>11} {:>13} {:>11} {:>9}",
        "mode", "round", "boot s", "total s", "journal s", "client gap s", "qemu ms", "sent MB"
    );
    let mut summary = Vec::new();
    for mode in &args.modes {
        let mut rounds = Vec::new();
        for n in 1..=args.rounds {
            match round(
                work.path(),
                mode,
                n,
                &env,
                &initrd,
                &raw,
                &want,
                args.disk_mib,
            ) {
                Ok(r) => {
                    println!(
                        "{:<6} {:<6} {:>7.1} {:>8.2} {:>11.2} {:>13.3} {:>11} {:>9.1}",
                        mode,
                        n,
                        r.boot,
                        r.total,
                        r.downtime,
                        r.client_gap,
                        r.qemu_ms
                            .map(|m| m.to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.bytes as f64 / 1e6
                    );
                    rounds.push(r);
                }
                Err(e) => {
                    eprintln!("vm_relocation: {mode} round {n}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let median = |f: fn(&Round) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        summary.push((mode.clone(), median(|r| r.total), median(|r| r.client_gap)));
    }
    for (mode, total, gap) in &summary {
        println!("{mode}: median total {total:.2} s, median downtime the client saw {gap:.3} s");
    }
    if let [(a, _, ga), (b, _, gb)] = summary.as_slice() {
        println!("downtime {a} / {b}: {:.1}x", ga / gb);
    }
    println!("target content verified by SHA-256 on the host every round");
    ExitCode::SUCCESS
}
