//! Relocation of a VM with a 1 GiB disk between two hosts: two network namespaces on a
//! bridge, their links shaped with a token bucket (tbf) to `--rate` (default 1gbit), a real
//! `fluidcloud agent` in each serving a qemu provider (`qa` qcow2, `qb` raw, both virtio with
//! a virtio NIC, under TCG), moved by the engine of `fluidcloud relocate` in the bench's own
//! namespace (the daemon's host), in each mode (`cold`, `precopy`, `live`). The companion of
//! `vm_relocation` (the same guest, disk and columns, on one host).
//!
//! `cargo bench --bench vm_hosts -- [--disk-mib N] [--rounds N] [--modes cold,precopy,live] [--rate R]`
//!
//! Each round: fresh agents and providers; the source disk gets the same pseudo-random half
//! (the rest stays unallocated); the VM is deployed at host a and must serve before the
//! relocation starts. A client in the bench's namespace asks the guest for `/health` every
//! 50 ms at host a's address and then host b's (the guest's port is forwarded on its host's
//! address); its longest gap between answers is the downtime it saw. Printed per round:
//! total (first step started → commit), the journal's downtime, the client's gap, QEMU's
//! downtime of a live move's last pass, and the bytes host b received on its link (its
//! veth's counter: disk, memory, TLS and TCP headers, and the daemon's calls), and for a
//! pre-copy the bytes its final pass put on the wire (during the downtime). The target
//! image is hashed and must equal the source's content. Needs root.

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

#[path = "../tests/it/common/netns.rs"]
#[allow(dead_code)]
mod netns;

#[path = "../tests/it/common/agents.rs"]
#[allow(dead_code)]
mod agents;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agents::{Agent, Pki};
use config::{policy_path, ConfigBuilder, Qemu};
use fluidcloud::conduit::engine::Engine;
use fluidcloud::conduit::journal::RelocationRecord;
use fluidcloud::conduit::{RelocationRequest, RelocationState};
use fluidcloud::config::Config;
use fluidcloud::providers::{self, VolumeSpec};
use guest::QemuEnv;
use netns::Hosts;

/// A VM relocation between two hosts (network namespaces) under TCG.
#[derive(Parser, Debug)]
#[command(name = "vm_hosts", bin_name = "cargo bench --bench vm_hosts --")]
struct Args {
    /// The VM's disk (64 at least).
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Relocations to time per mode (1 to 10).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// The modes to measure, side by side.
    #[arg(long, value_delimiter = ',', default_value = "cold,precopy,live")]
    modes: Vec<String>,
    /// The rate of both hosts' links (tc tbf).
    #[arg(long, default_value = "1gbit")]
    rate: String,
    #[command(flatten)]
    cargo: common::CargoBench,
}

/// The agent's `[providers.NAME]` section: a qemu provider under `NAME-root`.
fn agent_provider(env: &QemuEnv, name: &str, format: &str) -> String {
    let qemu = Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
        .disk_bus("virtio")
        .nic_model("virtio-net-pci")
        .powerdown_timeout_secs(120);
    let rendered = ConfigBuilder::new()
        .provider(name, "qemu", "lab", |p| {
            p.root(&format!("{name}-root"))
                .disk_format(format)
                .qemu(qemu)
        })
        .render();
    let mut table: toml::Table = rendered.parse().expect("a rendered configuration");
    table.remove("daemon");
    toml::to_string(&table).expect("TOML")
}

/// The daemon's configuration: `qa` and `qb` by their agents, `box` on `qa` in `mode`.
#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &Path,
    env: &QemuEnv,
    initrd: &Path,
    pki: &Pki,
    agents: (&Agent, &Agent),
    mode: &str,
    disk_mib: u64,
    port: u16,
) -> Result<Config, String> {
    let text = ConfigBuilder::new()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 120)
        .provider("qa", "qemu", "lab", |p| {
            p.disk_format("qcow2").set("agent", agents.0.url.clone())
        })
        .provider("qb", "qemu", "lab", |p| {
            p.disk_format("raw").set("agent", agents.1.url.clone())
        })
        .policy_file("watch", &policy_path("cheapest"), |p| p)
        .service("box", "qa", "watch", |s| {
            s.set("memory_gib", 0.25).set("vm_mode", mode).vm(
                "guest",
                disk_mib as f64 / 1024.0,
                &env.kernel,
                initrd,
                &format!("{} fc.hash=skip", QemuEnv::append("serve", 80)),
                &[(80, port)],
            )
        })
        .raw(&pki.daemon_tls)
        .render();
    let path = dir.join("fluidcloud.toml");
    std::fs::write(&path, &text).map_err(|e| e.to_string())?;
    Config::parse(&path, &text).map_err(|e| e.to_string())
}

fn health(host: Ipv4Addr, port: u16) -> String {
    format!("http://{host}:{port}/health")
}

/// Asks the guest for `/health` every 50 ms (at host a, then host b) until `stop`; returns
/// the longest gap between answers, and whether host b answered.
fn poll(ends: [String; 2], stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Duration, bool)> {
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
            for (i, url) in ends.iter().enumerate() {
                let ok = rt.block_on(async {
                    client
                        .get(url)
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
                    target |= i == 1;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50).saturating_sub(tick.elapsed()));
        }
        (gap, target)
    })
}

/// A raw image of `mib` MiB whose first half is pseudo-random and the rest a hole (the
/// content of `vm_relocation`'s).
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

async fn wait_serving(url: &str, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(2)).send().await {
            if r.status().is_success() {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            return Err(format!("the guest did not serve at {url} within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes the veth end `link` (on the bridge) sent into its host's namespace.
fn received_by(link: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{link}/statistics/tx_bytes"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

struct Round {
    boot: f64,
    total: f64,
    downtime: f64,
    client_gap: f64,
    qemu_ms: Option<u64>,
    /// Bytes host b received on its link.
    wire: u64,
    /// Bytes a pre-copy's final pass put on the wire.
    final_sent: Option<u64>,
}

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
    hosts: &Hosts,
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
    let pki = Pki::create(&dir);
    let a = Agent::start(
        hosts.a(),
        &dir,
        &pki,
        "a",
        &agent_provider(env, "qa", "qcow2"),
    );
    let b = Agent::start(
        hosts.b(),
        &dir,
        &pki,
        "b",
        &agent_provider(env, "qb", "raw"),
    );
    a.wait_up(hosts.a());
    b.wait_up(hosts.b());
    let port = free_port();
    let config = Arc::new(write_config(
        &dir,
        env,
        initrd,
        &pki,
        (&a, &b),
        mode,
        disk_mib,
        port,
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (at_a, at_b) = (health(hosts.a().addr, port), health(hosts.b().addr, port));
    let result = runtime.block_on(async {
        {
            let qa = providers::open(&config.providers["qa"]).map_err(|e| e.to_string())?;
            let op = qa
                .create_volume(
                    "box",
                    &VolumeSpec {
                        name: "guest".into(),
                        size_bytes: disk_mib << 20,
                        format: qa.preferred_disk_format(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            providers::wait_for(qa.as_ref(), &op.id, Duration::from_secs(120))
                .await
                .map_err(|e| e.to_string())?;
            let image = qa
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
            .deploy("box", "qa")
            .await
            .map_err(|e| format!("cannot deploy: {e}"))?;
        let boot = wait_serving(&at_a, Duration::from_secs(300)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let client = poll([at_a.clone(), at_b.clone()], stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let wire_before = received_by(&hosts.b().link);
        let record = engine
            .run(RelocationRequest {
                decision_id: format!("bench-vm-hosts-{n}"),
                service: "box".into(),
                from: "qa".into(),
                to: "qb".into(),
                reason: "benchmark".into(),
                origin: "operator".into(),
            })
            .await
            .map_err(|e| e.to_string());
        let wire = received_by(&hosts.b().link) - wire_before;
        if record.is_ok() && wait_serving(&at_b, Duration::from_secs(300)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (gap, reached) = client.join().map_err(|_| "the client panicked")?;
        let record = record?;
        if !reached {
            return Err("the client never reached host b".into());
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
        Ok::<_, String>((boot, record, downtime, gap, wire))
    });
    drop(runtime);
    for p in ["qa", "qb"] {
        servers::kill_from_pid_file(&dir.join(format!("{p}-root/vms/box/guest/pid")));
    }
    drop((a, b));
    let (boot, record, downtime, gap, wire) = result?;
    let target = dir.join("qb-root/volumes/box/guest.raw");
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
    let precopied = record
        .steps
        .iter()
        .any(|s| s.name.starts_with("final-pass:"));
    Ok(Round {
        boot: boot.as_secs_f64(),
        total,
        downtime: downtime.as_secs_f64(),
        client_gap: gap.as_secs_f64(),
        qemu_ms: live.then(|| output_u64(&record, "migrate:", "qemu_downtime_ms")),
        wire,
        final_sent: precopied.then(|| output_u64(&record, "final-pass:", "bytes_sent")),
    })
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    args.disk_mib = args.disk_mib.max(64);
    args.rounds = args.rounds.clamp(1, 10);
    let env = QemuEnv::load();
    let Some(hosts) = Hosts::create(2) else {
        eprintln!("vm_hosts: cannot make the hosts' namespaces (run it as root)");
        return ExitCode::FAILURE;
    };
    hosts.a().shape(&args.rate);
    hosts.b().shape(&args.rate);
    let work = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vm_hosts: {e}");
            return ExitCode::FAILURE;
        }
    };
    let initrd = env.initramfs(work.path());
    let raw = match template(work.path(), args.disk_mib) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vm_hosts: cannot build the disk: {e}");
            return ExitCode::FAILURE;
        }
    };
    let want = guest::sha256_file(&raw);
    println!(
        "VM relocation, {} MiB disk ({} MiB random, rest unallocated), qemu qa (qcow2, virtio) on host a -> qb (raw, virtio) on host b, links {} (tbf), 256 MiB guest, TCG, agents in two network namespaces",
        args.disk_mib,
        args.disk_mib / 2,
        args.rate
    );
    println!(
        "{:<8} {:<6} {:>7} {:>8} {:>11} {:>13} {:>11} {:>12} {:>14}",
        "mode",
        "round",
        "boot s",
        "total s",
        "journal s",
        "client gap s",
        "qemu ms",
        "on wire MB",
        "final pass MB"
    );
    let mut summary = Vec::new();
    for mode in &args.modes {
        let mut rounds = Vec::new();
        for n in 1..=args.rounds {
            match round(
                work.path(),
                &hosts,
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
                        "{:<8} {:<6} {:>7.1} {:>8.2} {:>11.2} {:>13.3} {:>11} {:>12.1} {:>14}",
                        mode,
                        n,
                        r.boot,
                        r.total,
                        r.downtime,
                        r.client_gap,
                        r.qemu_ms
                            .map(|m| m.to_string())
                            .unwrap_or_else(|| "-".into()),
                        r.wire as f64 / 1e6,
                        r.final_sent
                            .map(|b| format!("{:.1}", b as f64 / 1e6))
                            .unwrap_or_else(|| "-".into())
                    );
                    rounds.push(r);
                }
                Err(e) => {
                    eprintln!("vm_hosts: {mode} round {n}: {e}");
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
    println!("target content verified by SHA-256 on the host every round");
    ExitCode::SUCCESS
}
