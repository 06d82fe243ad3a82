//! Cutover downtime of a service with a 4 GiB volume, relocated with pre-copy by the same
//! engine `fluidcloud relocate` and the daemon use, between two `local` providers.
//!
//! `cargo bench --bench relocation -- [--dir DIR] [--size-gib N] [--allocated-gib N]
//! [--repeat N] [--targets raw,qcow2] [--change-percent P] [--bucket-objects N]
//! [--transfer-concurrency 1,4]`. Needs the demo app built in
//! release mode (`cargo build --release --example demo-app`; scripts/bench-relocation.sh
//! does it).
//!
//! Each round builds a fresh pair of providers under DIR: `a` (raw images) and `b` (raw, or
//! qcow2 for the conversion case), and a service `shop` with the demo app, its configuration
//! file (rewritten for the target) and a volume of `--size-gib`. The service is deployed on
//! `a`, then an image with `--allocated-gib` allocated (random data, text, allocated zeros,
//! holes; built once per run) is written into the source volume with `cp --sparse=always`,
//! so the source image is in the page cache and nothing of the target is. Then
//! `Engine::run` relocates the service to `b` with a one-second grace period.
//!
//! The data changes between the pre-copy and the cutover: the engine's observer is told when
//! the pre-copy step is done, and before it returns (so before the source app is stopped)
//! `--change-percent` of the volume's 1 MiB blocks, picked at random over the whole volume,
//! are overwritten with new random data, as a service writing while it is copied would have
//! done. The final delta must carry them.
//!
//! With `--bucket-objects N` the service also has a local bucket of N objects of 64 KiB,
//! written after the deployment; when its pre-copy is done, `--change-percent` of its
//! objects are rewritten, so the sync at cutover copies them. With several values for
//! `--transfer-concurrency` (the `conduit.transfer_concurrency` setting: 1 runs the volume
//! and bucket copies one after the other), each target format is run with each, in
//! interleaved rounds, and the table compares their downtimes.
//!
//! Figures come from the relocation's journal: total (first step started to commit done,
//! without the grace period), pre-copy (the volume's pre-copy step), downtime (first source
//! app stopped to the target's health check passing, [`Engine::downtime`]) and what the
//! final delta read and wrote. After every round the target image is compared with the
//! expected content (the built image plus the same changes, rebuilt beside it) by
//! `qemu-img compare`, and the running app is asked which data file it serves; a round whose
//! target differs fails the benchmark.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fluidcloud::conduit::engine::Engine;
use fluidcloud::conduit::journal::{RelocationRecord, StepState};
use fluidcloud::conduit::plan::Step;
use fluidcloud::conduit::{Observer, RelocationRequest, RelocationState};
use fluidcloud::config::Config;
use fluidcloud::viaduct::Progress;

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/common/config.rs"]
mod config;
#[path = "../tests/it/common/servers.rs"]
#[allow(dead_code)]
mod servers;
use clap::Parser;
use common::{
    at_least_one, build_image, fill_random, free_port, load_average, median, XorShift, MIB,
};
use config::ConfigBuilder;
use servers::kill_from_pid_file;

/// Cutover downtime of a pre-copy relocation between two `local` providers.
#[derive(Parser, Debug)]
#[command(name = "relocation", bin_name = "cargo bench --bench relocation --")]
struct Args {
    /// Where the rounds' providers live (a temporary directory under it).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// The volume's size.
    #[arg(long, default_value_t = 4, value_parser = at_least_one::<u64>)]
    size_gib: u64,
    /// How much of the volume holds data (above zero, at most --size-gib).
    #[arg(long, default_value_t = 1.5)]
    allocated_gib: f64,
    /// Rounds of each case.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<usize>)]
    repeat: usize,
    /// The target providers' disk formats.
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2", value_parser = ["raw", "qcow2"])]
    targets: Vec<String>,
    /// The share of the volume's blocks the app changes between pre-copy and cutover.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Objects of 64 KiB in the service's bucket.
    #[arg(long, default_value_t = 0)]
    bucket_objects: usize,
    /// Copies at once during the transfer; several make one case each.
    #[arg(
        long = "transfer-concurrency",
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "4",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64)
    )]
    concurrency: Vec<usize>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

impl Args {
    /// The checks across arguments that clap cannot make.
    fn checked(self) -> Args {
        if self.allocated_gib <= 0.0 || self.allocated_gib > self.size_gib as f64 {
            common::invalid::<Args>("--allocated-gib must be above zero and at most --size-gib");
        }
        if !(0.0..=100.0).contains(&self.change_percent) {
            common::invalid::<Args>("--change-percent must be between 0 and 100");
        }
        self
    }
}

/// What one series of rounds runs: a target disk format and a transfer concurrency.
struct Case {
    target: String,
    concurrency: usize,
    label: String,
}

/// Objects of the benchmark bucket.
const OBJECT_BYTES: usize = 64 << 10;

/// The 1 MiB blocks a round changes: `count` distinct ones over the whole volume.
fn pick_blocks(size: u64, count: u64, seed: u64) -> Vec<u64> {
    let blocks = size / MIB;
    let mut rng = XorShift(seed | 1);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count.min(blocks) {
        picked.insert(rng.below(blocks));
    }
    picked.into_iter().collect()
}

/// Overwrites `blocks` of the image at `path` with new random data derived from `seed`.
fn change_blocks(path: &Path, blocks: &[u64], seed: u64) -> std::io::Result<()> {
    let f = File::options().write(true).open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    for b in blocks {
        fill_random(&mut buf, seed.wrapping_mul(1_000_003).wrapping_add(*b));
        f.write_all_at(&buf, b * MIB)?;
    }
    Ok(())
}

fn cp_sparse(from: &Path, to: &Path) -> Result<(), String> {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cannot run cp: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cp --sparse=always {} {} failed: {status}",
            from.display(),
            to.display()
        ));
    }
    Ok(())
}

/// Flushes everything written so far, so the writeback of one round's setup does not land
/// in the middle of its relocation.
fn settle() {
    let _ = Command::new("sync").status();
}

fn demo_app() -> Result<PathBuf, String> {
    // The benchmark runs from target/release/deps/; the example sits in target/release/examples/.
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let app = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|release| release.join("examples/demo-app"))
        .ok_or_else(|| format!("{} has no target directory above it", exe.display()))?;
    if !app.exists() {
        return Err(format!(
            "{} is missing: run `cargo build --release --example demo-app` first",
            app.display()
        ));
    }
    Ok(app)
}

/// Writes the configuration of one round into `dir` and parses it.
fn write_config(
    dir: &Path,
    app: &Path,
    port: u16,
    case: &Case,
    size_gib: u64,
    bucket_objects: usize,
) -> Result<Config, String> {
    let target = &case.target;
    std::fs::write(
        dir.join("demo.toml.in"),
        "listen = \"{app.web.host}:{app.web.port}\"\ndata_file = \"{volume.data.path}\"\n",
    )
    .map_err(|e| format!("cannot write the config template: {e}"))?;
    let config = ConfigBuilder::new()
        .daemon("listen", "127.0.0.1:9")
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 5)
        .conduit("health_timeout_secs", 30)
        .conduit("transfer_concurrency", case.concurrency as i64)
        .provider_local("a", "us-east-1")
        .provider_local_with("b", "eu-central-1", |p| p.disk_format(target))
        .policy("watch", "cheapest", "audit", |p| p)
        .service("shop", "a", "watch", |s| {
            let s = s
                .health_url(&format!("http://127.0.0.1:{port}/health"), 30)
                .demo_app_with_data(app, port, size_gib as f64);
            if bucket_objects > 0 {
                s.bucket("assets", 0.1)
            } else {
                s
            }
        });
    let path = dir.join("fluidcloud.toml");
    let text = config.render();
    std::fs::write(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Config::parse(&path, &text).map_err(|e| format!("the round's configuration: {e}"))
}

/// Changes the source volume when the engine reports the pre-copy done, before the next
/// step (stopping the source app) begins: the engine calls its observer synchronously
/// between steps.
struct ChangeAfterPrecopy {
    volume: PathBuf,
    blocks: Vec<u64>,
    seed: u64,
    took: Mutex<Option<Result<Duration, String>>>,
    /// The bucket's directory and the objects rewritten once its pre-copy is done.
    bucket: Option<(PathBuf, Vec<usize>)>,
    bucket_changed: Mutex<Option<Result<(), String>>>,
}

/// The content of object `i` of the benchmark bucket, in its first or its rewritten version.
fn object_content(i: usize, rewritten: bool) -> Vec<u8> {
    let mut v = vec![0u8; OBJECT_BYTES];
    fill_random(&mut v, 0x0b1e_c700 + i as u64 * 2 + u64::from(rewritten));
    v
}

fn object_name(i: usize) -> String {
    format!("obj-{i:05}")
}

impl Observer for ChangeAfterPrecopy {
    fn step(&self, _relocation: &str, step: &Step, state: StepState, _detail: &str) {
        if step.name == "precopy:volume:data" && state == StepState::Done {
            let started = Instant::now();
            let outcome = change_blocks(&self.volume, &self.blocks, self.seed)
                .map(|_| started.elapsed())
                .map_err(|e| format!("cannot change {}: {e}", self.volume.display()));
            *self.took.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        }
        if let Some((dir, changed)) = &self.bucket {
            if step.name == "copy:bucket:assets" && state == StepState::Done {
                let outcome = changed.iter().try_for_each(|&i| {
                    std::fs::write(dir.join(object_name(i)), object_content(i, true))
                        .map_err(|e| format!("cannot rewrite {}: {e}", object_name(i)))
                });
                *self
                    .bucket_changed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            }
        }
    }
}

impl fluidcloud::migrators::Observer for ChangeAfterPrecopy {
    fn transfer(&self, _relocation: &str, _step: &str, _progress: &Progress) {}
}

/// Kills the demo apps a round's providers left running, by the pids they recorded.
struct Apps(PathBuf);

impl Drop for Apps {
    fn drop(&mut self) {
        for p in ["a", "b"] {
            kill_from_pid_file(&self.0.join(format!("providers/{p}/apps/shop/web/pid")));
        }
    }
}

/// One round's figures.
struct Round {
    total: f64,
    precopy: f64,
    change: f64,
    downtime: f64,
    /// Seconds of each cutover step, in plan order.
    cutover_steps: Vec<(String, f64)>,
    delta_seconds: f64,
    delta_read: u64,
    delta_written: u64,
    delta_chunks: u64,
    /// Seconds of the bucket's sync at cutover, when there is a bucket.
    bucket_sync: Option<f64>,
    bucket_sync_written: u64,
    /// What the bucket's sync read to copy and compare, listings excluded.
    bucket_sync_read: u64,
    precopy_written: u64,
    load: String,
}

fn step_secs(record: &RelocationRecord, name: &str) -> Option<f64> {
    let s = record.steps.iter().find(|s| s.name == name)?;
    Some(
        (s.finished_at? - s.started_at?)
            .to_std()
            .ok()?
            .as_secs_f64(),
    )
}

fn output_u64(record: &RelocationRecord, name: &str, key: &str) -> u64 {
    record
        .steps
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.output.get(key))
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn one_round(
    work: &Path,
    template: &Path,
    expected_dir: &Path,
    app: &Path,
    case: &Case,
    round: usize,
    size_gib: u64,
    change_count: u64,
    bucket_objects: usize,
    change_percent: f64,
) -> Result<Round, String> {
    let target = case.target.as_str();
    let dir = work.join(format!("round-{round}-{target}-{}", case.concurrency));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let port = free_port();
    let config = Arc::new(write_config(
        &dir,
        app,
        port,
        case,
        size_gib,
        bucket_objects,
    )?);
    let _apps = Apps(dir.clone());
    let source = dir.join("providers/a/volumes/shop/data.raw");
    let target_image = dir.join(format!("providers/b/volumes/shop/data.{target}"));
    let seed = 0x5eed_0000 + round as u64 * 7 + u64::from(target == "qcow2");
    let blocks = pick_blocks(size_gib << 30, change_count, seed);
    let source_bucket = dir.join("providers/a/buckets/shop/assets");
    let changed_objects: Vec<usize> = if bucket_objects > 0 && change_percent > 0.0 {
        let every = (100.0 / change_percent).round().max(1.0) as usize;
        (0..bucket_objects).step_by(every).collect()
    } else {
        Vec::new()
    };
    let hook = Arc::new(ChangeAfterPrecopy {
        volume: source.clone(),
        blocks: blocks.clone(),
        seed,
        took: Mutex::new(None),
        bucket: (bucket_objects > 0).then(|| (source_bucket.clone(), changed_objects.clone())),
        bucket_changed: Mutex::new(None),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let outcome = runtime.block_on(async {
        let observer: Arc<dyn Observer> = hook.clone();
        let engine = Engine::open(config.clone(), None, Some(observer))
            .map_err(|e| format!("cannot open the engine: {e}"))?;
        engine
            .deploy("shop", "a")
            .await
            .map_err(|e| format!("cannot deploy `shop` on `a`: {e}"))?;
        wait_app(port, "/health").await?;
        // The image goes into the volume the provider created, as the service's data.
        cp_sparse(template, &source)?;
        if bucket_objects > 0 {
            std::fs::create_dir_all(&source_bucket).map_err(|e| e.to_string())?;
            for i in 0..bucket_objects {
                std::fs::write(source_bucket.join(object_name(i)), object_content(i, false))
                    .map_err(|e| format!("cannot write the bucket: {e}"))?;
            }
        }
        settle();
        let load = load_average();
        let request = RelocationRequest {
            decision_id: format!("bench-{round}-{target}-{}", case.concurrency),
            service: "shop".into(),
            from: "a".into(),
            to: "b".into(),
            reason: "benchmark".into(),
            origin: "operator".into(),
        };
        let record = engine
            .run(request)
            .await
            .map_err(|e| format!("the relocation was refused: {e}"))?;
        if record.state != RelocationState::Completed {
            let failed: Vec<String> = record
                .steps
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.name)))
                .collect();
            return Err(format!(
                "the relocation ended {}: {} {}",
                record.state.as_str(),
                record.detail,
                failed.join("; ")
            ));
        }
        let downtime = engine
            .downtime(&record)
            .ok_or("the journal gives no downtime")?;
        // The app answers from the target's volume.
        let served = wait_app(port, "/config").await?;
        if !served.contains("/providers/b/volumes/shop/data") {
            return Err(format!(
                "after the relocation the app serves another data file: {served}"
            ));
        }
        Ok::<_, String>((record, downtime, load))
    });
    drop(runtime);
    let (record, downtime, load) = outcome?;
    let change = match hook.took.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(Ok(d)) => d.as_secs_f64(),
        Some(Err(e)) => return Err(e),
        None => return Err("the engine never reported the pre-copy done".into()),
    };
    // The target must hold the image as the source was at the cutover: rebuild that
    // beside it and let qemu-img compare the content.
    let expected = expected_dir.join("expected.raw");
    cp_sparse(template, &expected)?;
    change_blocks(&expected, &blocks, seed).map_err(|e| e.to_string())?;
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", target])
        .arg(&expected)
        .arg(&target_image)
        .status()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    let _ = std::fs::remove_file(&expected);
    if !cmp.success() {
        return Err(format!(
            "{} differs from the source image with its changes (qemu-img compare: {cmp})",
            target_image.display()
        ));
    }
    if bucket_objects > 0 {
        match hook
            .bucket_changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Err("the engine never reported the bucket's pre-copy done".into()),
        }
        let target_bucket = dir.join("providers/b/buckets/shop/assets");
        for i in 0..bucket_objects {
            let want = object_content(i, changed_objects.binary_search(&i).is_ok());
            let got = std::fs::read(target_bucket.join(object_name(i)))
                .map_err(|e| format!("object {} at the target: {e}", object_name(i)))?;
            if got != want {
                return Err(format!(
                    "object {} at the target differs from the source",
                    object_name(i)
                ));
            }
        }
    }
    let first_start = record
        .steps
        .iter()
        .filter_map(|s| s.started_at)
        .min()
        .ok_or("the journal has no started step")?;
    let committed = record
        .steps
        .iter()
        .find(|s| s.name == "commit")
        .and_then(|s| s.finished_at)
        .ok_or("the journal has no finished commit")?;
    let total = (committed - first_start)
        .to_std()
        .map_err(|e| e.to_string())?
        .as_secs_f64();
    let stop = record
        .steps
        .iter()
        .position(|s| s.name.starts_with("stop-source:"))
        .ok_or("the plan has no stop-source step")?;
    let cutover_steps = record.steps[stop..]
        .iter()
        .take_while(|s| s.name != "commit")
        .map(|s| (s.name.clone(), step_secs(&record, &s.name).unwrap_or(0.0)))
        .collect();
    let sync = "sync:volume:data";
    let round = Round {
        total,
        precopy: step_secs(&record, "precopy:volume:data").unwrap_or(0.0),
        change,
        downtime: downtime.as_secs_f64(),
        cutover_steps,
        delta_seconds: step_secs(&record, sync).unwrap_or(0.0),
        delta_read: output_u64(&record, sync, "bytes_read"),
        delta_written: output_u64(&record, sync, "bytes_written"),
        delta_chunks: output_u64(&record, sync, "chunks_sent"),
        bucket_sync: step_secs(&record, "sync:bucket:assets"),
        bucket_sync_written: output_u64(&record, "sync:bucket:assets", "bytes_written"),
        bucket_sync_read: output_u64(&record, "sync:bucket:assets", "bytes_read"),
        precopy_written: output_u64(&record, "precopy:volume:data", "bytes_written"),
        load,
    };
    drop(_apps);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(round)
}

async fn wait_app(port: u16, path: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{port}{path}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return r.text().await.map_err(|e| e.to_string());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("the demo app never answered {url}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn main() {
    let args = Args::parse().checked();
    if let Err(e) = run(&args) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let app = demo_app()?;
    let work = tempfile::Builder::new()
        .prefix("relocation-bench.")
        .tempdir_in(&args.dir)
        .map_err(|e| {
            format!(
                "cannot create a directory under {}: {e}",
                args.dir.display()
            )
        })?;
    let size = args.size_gib << 30;
    let allocated = (args.allocated_gib * (1u64 << 30) as f64) as u64;
    let template = work.path().join("template.raw");
    eprintln!(
        "Building a {} GiB image with {:.2} GiB allocated in {} ...",
        args.size_gib,
        args.allocated_gib,
        work.path().display()
    );
    build_image(&template, size, allocated, 0x2545_f491_4f6c_dd1d)
        .map_err(|e| format!("cannot build the image: {e}"))?;
    let image_alloc = std::fs::metadata(&template)
        .map_err(|e| e.to_string())?
        .blocks()
        * 512;
    let change_count = ((size / MIB) as f64 * args.change_percent / 100.0).round() as u64;
    let mut results: Vec<(Case, Vec<Round>)> = Vec::new();
    for target in &args.targets {
        for &concurrency in &args.concurrency {
            let label = if args.concurrency.len() > 1 {
                format!("raw -> {target}, {concurrency} at once")
            } else {
                format!("raw -> {target}")
            };
            let case = Case {
                target: target.clone(),
                concurrency,
                label,
            };
            results.push((case, vec![]));
        }
    }
    for round in 1..=args.repeat {
        // Interleaved, each round starting with another case.
        for k in 0..results.len() {
            let i = (k + round - 1) % results.len();
            let label = results[i].0.label.clone();
            eprintln!("round {round}, {label} ...");
            let r = one_round(
                work.path(),
                &template,
                work.path(),
                &app,
                &results[i].0,
                round,
                args.size_gib,
                change_count,
                args.bucket_objects,
                args.change_percent,
            )
            .map_err(|e| format!("round {round}, {label}: {e}"))?;
            eprintln!(
                "  total {:.2} s, pre-copy {:.2} s, downtime {:.3} s, final delta wrote {}",
                r.total,
                r.precopy,
                r.downtime,
                mib(r.delta_written)
            );
            results[i].1.push(r);
        }
    }

    println!();
    println!(
        "Service `shop`: demo app, its config file, a {} GiB raw volume with {} allocated \
         (random, text, allocated zeros), local provider a (raw) -> b; Engine::run, grace 1 s.",
        args.size_gib,
        mib(image_alloc)
    );
    println!(
        "Between pre-copy and cutover, {change_count} of {} 1 MiB blocks ({}%) were rewritten \
         with new random data. Source image in the page cache (just written), target not.",
        size / MIB,
        args.change_percent
    );
    if args.bucket_objects > 0 {
        println!(
            "Also a local bucket of {} objects of 64 KiB; {}% of them rewritten after its \
             pre-copy. Every target object compared with the source's content.",
            args.bucket_objects, args.change_percent
        );
    }
    println!(
        "{} interleaved rounds on {} CPUs; load average at the end: {}. Every target compared \
         with the expected image by qemu-img compare.",
        args.repeat,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!();
    let width = results
        .iter()
        .map(|(c, _)| c.label.len())
        .max()
        .unwrap_or(12);
    println!(
        "{:<width$} {:>6} {:>8} {:>10} {:>8} {:>10} {:>9} {:>11} {:>11} {:>9} {:>9} {:>13}",
        "case",
        "round",
        "total s",
        "pre-copy s",
        "change s",
        "downtime s",
        "delta s",
        "delta read",
        "delta sent",
        "% image",
        "% alloc",
        "bucket sync s"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    for (case, rounds) in &results {
        let label = &case.label;
        for (i, r) in rounds.iter().enumerate() {
            println!(
                "{:<width$} {:>6} {:>8.2} {:>10.2} {:>8.2} {:>10.3} {:>9.2} {:>11} {:>11} {:>8.2}% {:>8.2}% {:>13}",
                label,
                i + 1,
                r.total,
                r.precopy,
                r.change,
                r.downtime,
                r.delta_seconds,
                mib(r.delta_read),
                mib(r.delta_written),
                r.delta_written as f64 * 100.0 / size as f64,
                r.delta_written as f64 * 100.0 / image_alloc as f64,
                opt(r.bucket_sync),
            );
        }
        let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let downtime = m(|r| r.downtime);
        let bucket_sync = rounds
            .iter()
            .map(|r| r.bucket_sync)
            .collect::<Option<Vec<f64>>>()
            .map(median);
        println!(
            "{:<width$} {:>6} {:>8.2} {:>10.2} {:>8.2} {:>10.3} {:>9.2} {:>11} {:>11} {:>9} {:>9} {:>13}  downtime target < 2 s: {}",
            label,
            "median",
            m(|r| r.total),
            m(|r| r.precopy),
            m(|r| r.change),
            downtime,
            m(|r| r.delta_seconds),
            "",
            "",
            "",
            "",
            opt(bucket_sync),
            if downtime < 2.0 { "met" } else { "MISSED" }
        );
    }
    if args.concurrency.len() > 1 {
        println!();
        println!("Median downtime against the first concurrency, same target:");
        for target in &args.targets {
            let of = |c: usize| {
                results
                    .iter()
                    .find(|(k, _)| &k.target == target && k.concurrency == c)
                    .map(|(_, rounds)| median(rounds.iter().map(|r| r.downtime).collect()))
            };
            let Some(base) = of(args.concurrency[0]) else {
                continue;
            };
            for &c in &args.concurrency[1..] {
                if let Some(d) = of(c) {
                    println!(
                        "  raw -> {target}: {c} at once {d:.3} s, {} at once {base:.3} s: {:.2}x",
                        args.concurrency[0],
                        d / base
                    );
                }
            }
        }
    }
    println!();
    println!("Cutover steps (seconds, each round), pre-copy writes and load average at the start:");
    for (case, rounds) in &results {
        for (i, r) in rounds.iter().enumerate() {
            let steps: Vec<String> = r
                .cutover_steps
                .iter()
                .map(|(n, s)| format!("{n} {s:.3}"))
                .collect();
            let bucket = if r.bucket_sync.is_some() {
                format!(
                    "; bucket sync wrote {} and read {} besides the listings",
                    mib(r.bucket_sync_written),
                    mib(r.bucket_sync_read)
                )
            } else {
                String::new()
            };
            println!(
                "  {} round {}: {}; final delta {} chunks; pre-copy wrote {}{bucket}; load {}",
                case.label,
                i + 1,
                steps.join(", "),
                r.delta_chunks,
                mib(r.precopy_written),
                r.load
            );
        }
    }
    Ok(())
}
