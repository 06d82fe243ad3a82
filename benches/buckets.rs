//! Bucket relocation from S3 (s3s-fs) to OpenStack Swift: the bucket migrator
//! (`providers::copier::copy_bucket`) against `rclone copy`, on the same servers, in one run.
//!
//! `cargo bench --bench buckets -- [--dir DIR] [--repeat N]
//! [--sets small,large] [--rclone PATH] [--swift-part-mib N]`. Needs the servers of
//! `scripts/test-env.sh` and `rclone` (scripts/bench-buckets.sh installs both).
//!
//! An s3s-fs server and a single-node Swift (tempauth) are started on free loopback ports,
//! as the integration tests start them. Two data sets are uploaded once each into their own
//! S3 bucket: `small` (1,000 objects of 64 KiB) and `large` (4 objects of 256 MiB), random
//! content, each object in one PUT so its S3 entity tag is its MD5 (rclone compares MD5s only
//! where both sides give one). Then, `--repeat` rounds, alternately: the migrator copies the
//! bucket into a fresh Swift container, and `rclone copy --transfers 8 --checkers 8` (its
//! default checks: size, and MD5 where both ends have it) copies it into another fresh one.
//! Both start with the source objects in the page cache (they were just written) and both
//! log in to Swift within the timed run (the migrator's providers are opened anew each
//! round). The migrator runs with its defaults: 8 objects at a time, and a BLAKE3 manifest of
//! both sides compared at the end.
//!
//! After every run the target container is listed and must hold every source key with the
//! source's size; anything missing fails the benchmark. One more, untimed, rclone run per
//! data set with `-vv` counts the objects rclone's log shows a matching MD5 for, which the
//! table reports.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/common/config.rs"]
mod config;
#[path = "../tests/it/common/servers.rs"]
#[allow(dead_code)]
mod servers;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use common::{at_least_one, free_port, load_average, median};
use config::{ConfigBuilder, Section};
use fluidcloud::config::Config;
use fluidcloud::providers::copier::{copy_bucket, BucketCopyOptions, BucketProgress};
use fluidcloud::providers::{self, Provider};
use servers::{S3sFs, SwiftServer, TestEnv};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Bucket relocation, the migrator against `rclone copy`, S3 to Swift.
#[derive(Parser, Debug)]
#[command(name = "buckets", bin_name = "cargo bench --bench buckets --")]
struct Args {
    /// Where the servers' data and the data sets live (a temporary directory under it).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Rounds of each copier per data set.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<usize>)]
    repeat: usize,
    /// The data sets to copy.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "small,large")]
    sets: Vec<SetName>,
    /// The rclone binary.
    #[arg(long, default_value = "rclone")]
    rclone: String,
    /// The Swift provider's part size; objects above it become static large objects.
    #[arg(long)]
    swift_part_mib: Option<u64>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SetName {
    Small,
    Large,
}

impl SetName {
    fn data_set(self) -> &'static DataSet {
        match self {
            SetName::Small => &SMALL,
            SetName::Large => &LARGE,
        }
    }
}

#[derive(Clone, Copy)]
struct DataSet {
    name: &'static str,
    count: usize,
    size: usize,
}

const SMALL: DataSet = DataSet {
    name: "small",
    count: 1000,
    size: 64 * KIB,
};
const LARGE: DataSet = DataSet {
    name: "large",
    count: 4,
    size: 256 * MIB,
};

impl DataSet {
    fn label(&self) -> String {
        let size = if self.size >= MIB {
            format!("{} MiB", self.size / MIB)
        } else {
            format!("{} KiB", self.size / KIB)
        };
        format!("{} x {size}", self.count)
    }

    fn bytes(&self) -> u64 {
        (self.count * self.size) as u64
    }

    fn key(&self, i: usize) -> String {
        // Nested keys, as a bucket of assets has them.
        format!("{}/{:02}/object-{i:05}.bin", self.name, i % 16)
    }
}

fn secret_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))
}

/// Providers `s3` and `swift` on the two servers. `upload_part_mib` is the S3 part size:
/// the uploads use one large enough to put every object in one request.
fn config(
    dir: &Path,
    s3: &S3sFs,
    swift: &SwiftServer,
    upload_part_mib: u64,
    swift_part_mib: Option<u64>,
) -> Result<Config, String> {
    secret_file(
        &dir.join("s3.credentials"),
        &format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            s3.access_key, s3.secret_key
        ),
    )?;
    secret_file(
        &dir.join("swift.credentials"),
        &format!(
            "username = \"{}\"\npassword = \"{}\"\n",
            swift.user, swift.key
        ),
    )?;
    // S3 through its endpoint, by path, with the credentials written above.
    let s3_table = |t: Section| {
        t.set("endpoint", s3.endpoint.as_str())
            .set("region", "us-east-1")
            .set("path_style", true)
            .set("credentials_file", "s3.credentials")
    };
    let text = ConfigBuilder::new()
        .provider("s3", "s3", "lab", |p| p.table("s3", s3_table))
        .provider("uploader", "s3", "lab", |p| {
            p.table("s3", |t| {
                s3_table(t).set("part_size_mib", upload_part_mib as i64)
            })
        })
        .provider("swift", "swift", "lab", |p| {
            p.table("swift", |t| {
                let t = t
                    .set("auth_url", swift.auth_url.as_str())
                    .set("credentials_file", "swift.credentials");
                match swift_part_mib {
                    Some(m) => t.set("part_size_mib", m as i64),
                    None => t,
                }
            })
        })
        .render();
    Config::parse(&dir.join("fluidcloud.toml"), &text).map_err(|e| e.to_string())
}

fn open(config: &Config, name: &str) -> Result<Arc<dyn Provider>, String> {
    providers::open(&config.providers[name]).map_err(|e| format!("provider `{name}`: {e}"))
}

fn content(set: &DataSet, i: usize) -> Vec<u8> {
    let mut v = vec![0u8; set.size];
    blake3::Hasher::new()
        .update(set.name.as_bytes())
        .update(&(i as u64).to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

async fn upload(p: &dyn Provider, set: &DataSet) -> Result<(), String> {
    p.ensure_bucket("shop", set.name)
        .await
        .map_err(|e| e.to_string())?;
    for i in 0..set.count {
        let body = Box::pin(std::io::Cursor::new(content(set, i)));
        p.write_object("shop", set.name, &set.key(i), body)
            .await
            .map_err(|e| format!("cannot upload {}: {e}", set.key(i)))?;
    }
    Ok(())
}

/// Every key of the source must be in the target container with the same size.
async fn check_target(
    swift: &dyn Provider,
    container: &str,
    want: &BTreeMap<String, u64>,
) -> Result<(), String> {
    let got: BTreeMap<String, u64> = swift
        .list_objects("shop", container)
        .await
        .map_err(|e| format!("cannot list the target `shop--{container}`: {e}"))?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, size)| got.get(*k) != Some(size))
        .map(|(k, size)| format!("{k} ({size} bytes) is {:?}", got.get(k)))
        .take(5)
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "the target `shop--{container}` holds {} objects, {} of the source's {} are missing or differ in size, e.g. {}",
            got.len(),
            want.iter().filter(|(k, s)| got.get(*k) != Some(s)).count(),
            want.len(),
            wrong.join("; ")
        ));
    }
    Ok(())
}

/// `rclone` with the two remotes configured through its environment: `s3src` (S3, provider
/// Other, path style) and `swiftdst` (Swift, tempauth v1).
fn rclone(args: &Args, s3: &S3sFs, swift: &SwiftServer, conf_dir: &Path) -> Command {
    let mut cmd = Command::new(&args.rclone);
    // An empty config file keeps a user's own rclone.conf out of the comparison.
    cmd.arg("--config").arg(conf_dir.join("rclone.conf"));
    // The AWS SDK inside rclone fails on a custom CA bundle with rclone's own HTTP
    // transport; the servers are plain HTTP on loopback, so no bundle is needed.
    cmd.env_remove("AWS_CA_BUNDLE");
    for (k, v) in [
        ("S3SRC_TYPE", "s3"),
        ("S3SRC_PROVIDER", "Other"),
        ("S3SRC_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("S3SRC_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("S3SRC_ENDPOINT", s3.endpoint.as_str()),
        ("S3SRC_REGION", "us-east-1"),
        ("S3SRC_FORCE_PATH_STYLE", "true"),
        ("SWIFTDST_TYPE", "swift"),
        ("SWIFTDST_AUTH", swift.auth_url.as_str()),
        ("SWIFTDST_USER", swift.user.as_str()),
        ("SWIFTDST_KEY", swift.key.as_str()),
    ] {
        cmd.env(format!("RCLONE_CONFIG_{k}"), v);
    }
    cmd
}

fn run_rclone(
    args: &Args,
    s3: &S3sFs,
    swift: &SwiftServer,
    dir: &Path,
    set: &DataSet,
    container: &str,
    extra: &[&str],
) -> Result<(Duration, String), String> {
    let mut cmd = rclone(args, s3, swift, dir);
    cmd.args([
        "copy",
        &format!("s3src:shop--{}", set.name),
        &format!("swiftdst:shop--{container}"),
        "--transfers",
        "8",
        "--checkers",
        "8",
    ])
    .args(extra);
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args.rclone))?;
    let elapsed = started.elapsed();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        return Err(format!(
            "rclone copy into `shop--{container}` failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    Ok((elapsed, log))
}

fn no_progress(_: BucketProgress) {}

struct Figures {
    ours: Vec<f64>,
    rclone: Vec<f64>,
    ours_read: u64,
    ours_copied: u64,
    md5_checked: String,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let version = Command::new(&args.rclone)
        .arg("version")
        .output()
        .map_err(|e| format!("cannot run `{} version`: {e}", args.rclone))?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("rclone (unknown version)")
        .to_string();
    let work = tempfile::Builder::new()
        .prefix("buckets-bench.")
        .tempdir_in(&args.dir)
        .map_err(|e| {
            format!(
                "cannot create a directory under {}: {e}",
                args.dir.display()
            )
        })?;
    let dir = work.path();
    std::fs::write(dir.join("rclone.conf"), "").map_err(|e| e.to_string())?;
    let env = TestEnv::load();
    eprintln!("Starting s3s-fs and Swift in {} ...", dir.display());
    let s3 = S3sFs::start(&env, dir);
    let swift = SwiftServer::start(&env, dir);
    let largest = args
        .sets
        .iter()
        .map(|s| s.data_set().size)
        .max()
        .unwrap_or(MIB);
    let config = config(
        dir,
        &s3,
        &swift,
        ((largest / MIB) as u64 + 1).max(5),
        args.swift_part_mib,
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let mut results = Vec::new();
    for set in args.sets.iter().map(|s| s.data_set()) {
        eprintln!("Uploading {} ({}) into s3s-fs ...", set.name, set.label());
        let uploader = open(&config, "uploader")?;
        runtime.block_on(upload(uploader.as_ref(), set))?;
        let want: BTreeMap<String, u64> = (0..set.count)
            .map(|i| (set.key(i), set.size as u64))
            .collect();
        let mut fig = Figures {
            ours: vec![],
            rclone: vec![],
            ours_read: 0,
            ours_copied: 0,
            md5_checked: String::new(),
        };
        for round in 1..=args.repeat {
            // Alternate which tool goes first, so neither always meets the other's writeback.
            let order: [bool; 2] = if round % 2 == 1 {
                [true, false]
            } else {
                [false, true]
            };
            for ours in order {
                let _ = Command::new("sync").status();
                let container = format!(
                    "{}-{}-{round}",
                    set.name,
                    if ours { "ours" } else { "rclone" }
                );
                if ours {
                    let (src, dst) = (open(&config, "s3")?, open(&config, "swift")?);
                    let started = Instant::now();
                    let report = runtime
                        .block_on(copy_bucket(
                            src.as_ref(),
                            "shop",
                            set.name,
                            dst.as_ref(),
                            "shop",
                            &container,
                            &BucketCopyOptions::default(),
                            &no_progress,
                        ))
                        .map_err(|e| format!("copy_bucket into `{container}`: {e}"))?;
                    let secs = started.elapsed().as_secs_f64();
                    if report.objects_copied != set.count as u64 {
                        return Err(format!(
                            "copy_bucket into a fresh `{container}` copied {} of {} objects",
                            report.objects_copied, set.count
                        ));
                    }
                    runtime.block_on(check_target(dst.as_ref(), &container, &want))?;
                    eprintln!(
                        "  {} round {round}, copy_bucket: {secs:.2} s, read {} MiB, wrote {} MiB, manifest {}",
                        set.name,
                        report.bytes_read / MIB as u64,
                        report.bytes_copied / MIB as u64,
                        &report.manifest_digest[..12.min(report.manifest_digest.len())]
                    );
                    fig.ours.push(secs);
                    fig.ours_read = report.bytes_read;
                    fig.ours_copied = report.bytes_copied;
                } else {
                    let (elapsed, _) = run_rclone(args, &s3, &swift, dir, set, &container, &[])?;
                    let swift_p = open(&config, "swift")?;
                    runtime.block_on(check_target(swift_p.as_ref(), &container, &want))?;
                    eprintln!(
                        "  {} round {round}, rclone: {:.2} s",
                        set.name,
                        elapsed.as_secs_f64()
                    );
                    fig.rclone.push(elapsed.as_secs_f64());
                }
            }
        }
        // Untimed: what rclone checked, from its debug log.
        let container = format!("{}-rclone-checks", set.name);
        let (_, log) = run_rclone(args, &s3, &swift, dir, set, &container, &["-vv"])?;
        let md5_ok = log
            .lines()
            .filter(|l| l.contains("md5 = ") && l.contains(" OK"))
            .count();
        let md5_skipped = log
            .lines()
            .filter(|l| l.contains("no hashes in common") || l.contains("hash not supported"))
            .count();
        fig.md5_checked = format!(
            "{md5_ok} of {} objects MD5-verified by rclone{}",
            set.count,
            if md5_skipped > 0 {
                format!(" ({md5_skipped} without a common hash)")
            } else {
                String::new()
            }
        );
        eprintln!("  {}: {}", set.name, fig.md5_checked);
        results.push((*set, fig));
    }
    drop(runtime);

    println!();
    println!(
        "s3s-fs -> Swift (tempauth, one node), both on loopback; {version}; {} interleaved \
         rounds on {} CPUs; load average at the end: {}.",
        args.repeat,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "copy_bucket: 8 objects at a time, BLAKE3 manifest of both sides compared. rclone copy \
         --transfers 8 --checkers 8, default checks. Every target listed afterwards: all keys, \
         right sizes."
    );
    println!();
    println!(
        "{:<20} {:<12} {:>28} {:>10} {:>10} {:>12}",
        "data set", "tool", "seconds (each round)", "median s", "MB/s", "ours/rclone"
    );
    for (set, fig) in &results {
        let (ours, theirs) = (median(fig.ours.clone()), median(fig.rclone.clone()));
        let mb = set.bytes() as f64 / 1e6;
        let rounds = |v: &[f64]| {
            v.iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "{:<20} {:<12} {:>28} {:>10.2} {:>10.1} {:>11.2}x  {}",
            set.label(),
            "copy_bucket",
            rounds(&fig.ours),
            ours,
            mb / ours,
            ours / theirs,
            if ours <= theirs {
                "target (no slower) met"
            } else {
                "target (no slower) MISSED"
            }
        );
        println!(
            "{:<20} {:<12} {:>28} {:>10.2} {:>10.1} {:>12}",
            "",
            "rclone",
            rounds(&fig.rclone),
            theirs,
            mb / theirs,
            ""
        );
        println!(
            "{:<20} copy_bucket read {:.1} MB and wrote {:.1} MB per run; {}",
            "",
            fig.ours_read as f64 / 1e6,
            fig.ours_copied as f64 / 1e6,
            fig.md5_checked
        );
    }
    drop(s3);
    drop(swift);
    Ok(())
}
