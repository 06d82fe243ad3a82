//! Relocation of a VM with a 1 GiB disk between two qemu providers: qcow2 on virtio to raw
//! on SATA with an e1000 NIC, under TCG, by the engine of `fluidcloud relocate` and the
//! daemon. The guest is the tests' busybox guest (`scripts/test-env.sh qemu_system guest`),
//! serving HTTP through a forwarded port, which is the service's health check.
//!
//! `cargo bench --bench vm_relocation -- [--disk-mib N] [--rounds N]`
//!
//! Each round: a fresh pair of providers; the source disk gets the same pseudo-random half
//! (the rest stays unallocated); the VM is deployed and must serve before the relocation
//! starts. Printed per round from the journal: total (first step started → commit), the
//! cutover downtime (VM powered down → target health check passed) and its steps; the target
//! image is hashed on the host and must equal the source's content.

#[path = "common/mod.rs"]
mod common;
use clap::Parser;
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
    /// Relocations to time (1 to 10).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    #[command(flatten)]
    cargo: common::CargoBench,
}

fn write_config(
    dir: &Path,
    env: &QemuEnv,
    initrd: &Path,
    port: u16,
    disk_mib: u64,
) -> Result<Config, String> {
    let qemu = |bus: &str, nic: &str| {
        Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
            .disk_bus(bus)
            .nic_model(nic)
            .powerdown_timeout_secs(120)
    };
    let text = ConfigBuilder::new()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 120)
        .provider("q1", "qemu", "lab", |p| {
            p.root("q1")
                .disk_format("qcow2")
                .qemu(qemu("virtio", "virtio-net-pci"))
        })
        .provider("q2", "qemu", "lab", |p| {
            p.root("q2").disk_format("raw").qemu(qemu("sata", "e1000"))
        })
        .policy_file("watch", &policy_path("cheapest"), |p| p)
        .service("box", "q1", "watch", |s| {
            s.set("memory_gib", 0.25)
                .health_url(&format!("http://127.0.0.1:{port}/health"), 300)
                .vm(
                    "guest",
                    disk_mib as f64 / 1024.0,
                    &env.kernel,
                    initrd,
                    &format!("{} fc.hash=skip", QemuEnv::append("serve", 80)),
                    &[(80, port)],
                )
        })
        .render();
    let path = dir.join("fluidcloud.toml");
    std::fs::write(&path, &text).map_err(|e| e.to_string())?;
    Config::parse(&path, &text).map_err(|e| e.to_string())
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

fn step_secs(record: &RelocationRecord, prefix: &str) -> f64 {
    record
        .steps
        .iter()
        .filter(|s| s.name.starts_with(prefix))
        .filter_map(|s| {
            Some(
                (s.finished_at? - s.started_at?)
                    .to_std()
                    .ok()?
                    .as_secs_f64(),
            )
        })
        .sum()
}

async fn wait_serving(port: u16, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let url = format!("http://127.0.0.1:{port}/health");
    let client = reqwest::Client::new();
    loop {
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
        if started.elapsed() > limit {
            return Err(format!("the guest did not serve {url} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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
    stop: f64,
    sync: f64,
    start: f64,
    health: f64,
}

fn round(
    work: &Path,
    n: u32,
    env: &QemuEnv,
    initrd: &Path,
    raw: &Path,
    want: &str,
    disk_mib: u64,
) -> Result<Round, String> {
    let dir = work.join(format!("round-{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port();
    let config = Arc::new(write_config(&dir, env, initrd, port, disk_mib)?);
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
        let boot = wait_serving(port, Duration::from_secs(300)).await?;
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
            .map_err(|e| e.to_string())?;
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
        Ok::<_, String>((boot, record, downtime))
    });
    drop(runtime);
    kill_vms(&dir);
    let (boot, record, downtime) = result?;
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
    Ok(Round {
        boot: boot.as_secs_f64(),
        total,
        downtime: downtime.as_secs_f64(),
        stop: step_secs(&record, "stop-source:"),
        sync: step_secs(&record, "sync:volume:"),
        start: step_secs(&record, "start-target:"),
        health: step_secs(&record, "health-check"),
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
        "VM relocation, {} MiB disk ({} MiB random, rest unallocated), qemu q1 (qcow2, virtio) -> q2 (raw, sata, e1000), TCG, grace 1 s",
        args.disk_mib,
        args.disk_mib / 2
    );
    println!(
        "{:<6} {:>8} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}",
        "round", "boot s", "total s", "downtime s", "stop s", "sync s", "start s", "health s"
    );
    let mut rounds = Vec::new();
    for n in 1..=args.rounds {
        match round(work.path(), n, &env, &initrd, &raw, &want, args.disk_mib) {
            Ok(r) => {
                println!(
                    "{:<6} {:>8.1} {:>8.2} {:>10.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    n, r.boot, r.total, r.downtime, r.stop, r.sync, r.start, r.health
                );
                rounds.push(r);
            }
            Err(e) => {
                eprintln!("vm_relocation: round {n}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut d: Vec<f64> = rounds.iter().map(|r| r.downtime).collect();
    d.sort_by(f64::total_cmp);
    let mut t: Vec<f64> = rounds.iter().map(|r| r.total).collect();
    t.sort_by(f64::total_cmp);
    println!(
        "median total {:.2} s, median downtime {:.2} s; target content verified by SHA-256 on the host every round",
        t[t.len() / 2],
        d[d.len() / 2]
    );
    ExitCode::SUCCESS
}
