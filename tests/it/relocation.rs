//! Relocations with the real binary: a service with an app (the demo app), a configuration
//! file, a volume and a bucket moves between two local providers, killed with SIGKILL at
//! every checkpoint of its plan and recovered by the next start of the daemon.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::{ConfigBuilder, Section, Service};
use common::servers::kill_from_pid_file;
use common::{bin, demo_app, free_port, repo, Daemon};
use serde_json::Value;

/// The steps of the plan for `shop`, in order.
const STEPS: &[&str] = &[
    "preflight",
    "precopy:volume:data",
    "copy:bucket:assets",
    "stop-source:app:web",
    "sync:volume:data",
    "sync:bucket:assets",
    "write-config:demo.toml",
    "recontextualise",
    "start-target:app:web",
    "health-check",
    "commit",
];

/// `shop` on `a`: the demo app on `app_port`, its `demo.toml` (the bucket's path rewritten by a
/// rule matching `bucket_key`), volume `data` and bucket `assets`, set up further by `bucket`.
fn shop(
    s: Service,
    app_port: u16,
    bucket_key: &str,
    bucket: impl FnOnce(Section) -> Section,
) -> Service {
    shop_sized(s, app_port, bucket_key, 0.0625, bucket)
}

/// `shop` with a volume of `volume_gib`.
fn shop_sized(
    s: Service,
    app_port: u16,
    bucket_key: &str,
    volume_gib: f64,
    bucket: impl FnOnce(Section) -> Section,
) -> Service {
    s.app(
        "web",
        &demo_app().display().to_string(),
        &["demo.toml"],
        app_port,
    )
    .config_file(
        "demo.toml",
        "demo.toml.in",
        &[
            // Where the app listens: the target's host when the providers are on two.
            (
                r#"listen = "[^"]*""#,
                r#"listen = "{app.web.host}:{app.web.port}""#,
            ),
            (
                r#"data_file = "[^"]*""#,
                r#"data_file = "{volume.data.path}""#,
            ),
            (
                &format!(r#"{bucket_key} = "[^"]*""#),
                r#"bucket_dir = "{bucket.assets.path}""#,
            ),
        ],
    )
    .volume("data", volume_gib)
    .component("bucket", "assets", |c| bucket(c.set("size_gib", 0.01)))
}

pub(crate) struct Setup {
    dir: tempfile::TempDir,
    pub(crate) config: ConfigBuilder,
    app_port: u16,
    /// Where the app may answer, tried in order: the providers' hosts.
    pub(crate) app_hosts: Vec<String>,
}

impl Setup {
    pub(crate) fn new(target_format: &str) -> Setup {
        Setup::with_formats("raw", target_format)
    }

    fn with_formats(source_format: &str, target_format: &str) -> Setup {
        Setup::build(source_format, target_format, 64, 8)
    }

    /// Raw volumes of `volume_mib`, all of it filled with the app's data.
    pub(crate) fn with_volume(volume_mib: u64) -> Setup {
        Setup::build("raw", "raw", volume_mib, volume_mib)
    }

    fn build(source_format: &str, target_format: &str, volume_mib: u64, seed_mib: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let app_port = free_port();
        std::fs::write(
            dir.path().join("demo.toml.in"),
            format!(
                "listen = \"{{app.web.host}}:{{app.web.port}}\"\n\
                 data_file = \"{{volume.data.path}}\"\n\
                 bucket_dir = \"{{bucket.assets.path}}\"\n\
                 seed_mib = {seed_mib}\n"
            ),
        )
        .unwrap();
        let config = ConfigBuilder::new()
            .listen_on_placeholder_port()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .conduit("stop_timeout_secs", 5)
            .conduit("health_timeout_secs", 20)
            .provider_local_with("a", "us-east-1", |p| p.disk_format(source_format))
            .provider_local_with("b", "eu-central-1", |p| p.disk_format(target_format))
            .policy("watch", "cheapest", "audit", |p| p)
            .service("shop", "a", "watch", |s| {
                shop_sized(s, app_port, "bucket_dir", volume_mib as f64 / 1024.0, |b| b)
                    .health_url(&format!("http://{{app.web.host}}:{app_port}/health"), 20)
            });
        Setup {
            dir,
            config,
            app_port,
            app_hosts: vec!["127.0.0.1".to_string()],
        }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub(crate) fn daemon(&self) -> Daemon {
        Daemon::start(self.dir.path(), &self.config.render())
    }

    pub(crate) fn app(&self, path: &str) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for host in &self.app_hosts {
                let url = format!("http://{host}:{}{path}", self.app_port);
                let Ok(r) = reqwest::Client::new()
                    .get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                else {
                    continue;
                };
                if r.status().is_success() {
                    if let Ok(body) = r.text().await {
                        return Some(body);
                    }
                }
            }
            None
        })
    }

    pub(crate) fn wait_app(&self, path: &str) -> String {
        for _ in 0..200 {
            if let Some(body) = self.app(path) {
                return body;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the demo app never answered {path}");
    }

    /// Runs `fluidcloud relocate`, optionally killing itself at `kill_at`.
    pub(crate) fn relocate(&self, to: &str, kill_at: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new(bin());
        cmd.args(["relocate", "--quiet", "--config"])
            .arg(self.dir.path().join("fluidcloud.toml"))
            .args(["shop", "--to", to])
            .env_remove("FLUIDCLOUD_KILL_AT")
            .stdin(Stdio::null());
        if let Some(k) = kill_at {
            cmd.env("FLUIDCLOUD_KILL_AT", k);
        }
        cmd.output().unwrap()
    }

    /// Kills the demo app processes left running by the local providers.
    fn kill_apps(&self) {
        for p in ["a", "b"] {
            kill_from_pid_file(&self.path(&format!("providers/{p}/apps/shop/web/pid")));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.kill_apps();
    }
}

/// Deploys the service on `a` through the daemon, fills its bucket, and returns the data
/// hash and bucket listing the app serves.
pub(crate) fn deploy(s: &Setup) -> (String, String) {
    let mut d = s.daemon();
    let hash = s.wait_app("/hash");
    let bucket = s.path("providers/a/buckets/shop/assets");
    std::fs::create_dir_all(bucket.join("img")).unwrap();
    for i in 0..20 {
        std::fs::write(
            bucket.join(format!("img/{i}.txt")),
            format!("asset {i} ").repeat(100 + i),
        )
        .unwrap();
    }
    let listing = s.wait_app("/bucket");
    assert!(listing.contains("img/7.txt 856"), "{listing}");
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
    (hash, listing)
}

fn relocations(d: &mut Daemon) -> Value {
    d.eventually("the relocation to finish", Duration::from_secs(90), |d| {
        let r = d.get("/v1/relocations");
        let state = r.as_array()?.last()?["state"].as_str()?.to_string();
        matches!(state.as_str(), "completed" | "rolled_back" | "failed").then_some(r)
    })
}

/// The service is whole: either on `b` with the same data and the source gone, or on `a`
/// untouched with nothing left on `b`.
pub(crate) fn assert_consistent(
    s: &Setup,
    hash: &str,
    listing: &str,
    outcome: &str,
    context: &str,
) {
    let served = s.wait_app("/hash");
    assert_eq!(served, hash, "{context}: the app serves other data");
    assert_eq!(s.wait_app("/bucket"), listing, "{context}: bucket differs");
    let config: Value = serde_json::from_str(&s.wait_app("/config")).unwrap();
    let data_file = config["data_file"].as_str().unwrap().to_string();
    match outcome {
        "completed" => {
            assert!(
                data_file.contains("/providers/b/"),
                "{context}: the app reads {data_file}"
            );
            assert!(
                !s.path("providers/a/volumes/shop/data.raw").exists(),
                "{context}: the source volume was not decommissioned"
            );
            assert!(!s.path("providers/a/apps/shop/web").exists(), "{context}");
        }
        "rolled_back" => {
            assert!(
                data_file.contains("/providers/a/"),
                "{context}: the app reads {data_file}"
            );
            assert!(
                !s.path("providers/b/volumes/shop/data.raw").exists(),
                "{context}: the partial target volume is left"
            );
            assert!(
                !s.path("providers/b/apps/shop/web/pid").exists(),
                "{context}: a target app is left"
            );
        }
        other => panic!("{context}: the relocation ended `{other}`"),
    }
}

#[test]
fn a_service_moves_with_its_data_config_and_bucket_and_the_source_is_decommissioned() {
    let s = Setup::new("raw");
    let (hash, listing) = deploy(&s);
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("completed"), "{stdout}");
    assert!(stdout.contains("downtime:"), "{stdout}");
    assert!(
        stdout.contains("verified:   sync:volume:data: image digest"),
        "{stdout}"
    );
    assert_consistent(&s, &hash, &listing, "completed", "uninterrupted");
    // The volume's and the bucket's copies of one phase ran side by side.
    let journal =
        fluidcloud::conduit::journal::Journal::open(&s.path("state/journal.sqlite")).unwrap();
    let record = journal.list().unwrap().pop().unwrap();
    for (volume, bucket) in [
        ("precopy:volume:data", "copy:bucket:assets"),
        ("sync:volume:data", "sync:bucket:assets"),
    ] {
        let times = |name: &str| {
            let step = record.steps.iter().find(|st| st.name == name).unwrap();
            (step.started_at.unwrap(), step.finished_at.unwrap())
        };
        let (v, b) = (times(volume), times(bucket));
        assert!(
            v.0 < b.1 && b.0 < v.1,
            "{volume} ran {v:?} and {bucket} ran {b:?}: one after the other"
        );
    }
    // The placement moved: planning again starts from `b`.
    let plan = Command::new(bin())
        .args(["plan", "--config"])
        .arg(s.path("fluidcloud.toml"))
        .args(["shop", "--to", "a"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("from `b` to `a`"), "{text}");
    for together in ["steps 2, 3 run side by side", "steps 5, 6 run side by side"] {
        assert!(text.contains(together), "{text}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "stops the relocation at a checkpoint: needs --features crash-points"
)]
fn sigkill_at_every_checkpoint_ends_relocated_or_rolled_back() {
    let mut outcomes = Vec::new();
    for step in STEPS {
        for state in ["running", "done"] {
            let point = format!("{step}:{state}");
            let s = Setup::new("raw");
            let (hash, listing) = deploy(&s);
            let out = s.relocate("b", Some(&point));
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGKILL),
                "{point}: the process was not killed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let mut d = s.daemon();
            let r = relocations(&mut d);
            let last = r.as_array().unwrap().last().unwrap();
            let outcome = last["state"].as_str().unwrap().to_string();
            assert_consistent(&s, &hash, &listing, &outcome, &point);
            // Before the cutover it resumes, during it it rolls back, after commit it
            // finishes.
            let cut = STEPS.iter().position(|x| x == step).unwrap();
            let expected = if cut < 3 || *step == "commit" && state == "done" {
                "completed"
            } else {
                "rolled_back"
            };
            assert_eq!(outcome, expected, "{point}: {last}");
            outcomes.push(format!("{point} -> {outcome}"));
            drop(d);
        }
    }
    assert_eq!(outcomes.len(), STEPS.len() * 2, "{outcomes:?}");
}

#[test]
fn a_target_that_never_gets_healthy_rolls_back_to_the_running_source() {
    let s = Setup::new("raw");
    let (hash, listing) = deploy(&s);
    // Point the health check at a port nobody serves.
    let broken = s
        .config
        .clone()
        .service("shop", "a", "watch", |sv| {
            shop(sv, s.app_port, "bucket_dir", |b| b)
                .health_url(&format!("http://127.0.0.1:{}/health", free_port()), 2)
        })
        .render();
    std::fs::write(
        s.path("fluidcloud.toml"),
        broken
            .replace("{PORT}", "7")
            .replace("{REPO}", &repo().display().to_string()),
    )
    .unwrap();
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("rolled_back"), "{stdout}");
    assert!(stdout.contains("health-check"), "{stdout}");
    assert_consistent(&s, &hash, &listing, "rolled_back", "unhealthy target");
}

fn run_cli(s: &Setup, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(s.path("fluidcloud.toml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_config(s: &Setup, config: &str) {
    std::fs::write(
        s.path("fluidcloud.toml"),
        config
            .replace("{PORT}", "7")
            .replace("{REPO}", &repo().display().to_string()),
    )
    .unwrap();
}

#[test]
fn plans_to_unknown_or_incapable_providers_are_refused_with_the_reason() {
    let s = Setup::new("raw");
    let config = s
        .config
        .clone()
        .provider("objects", "s3", "us-east-1", |p| p);
    write_config(&s, &config.render());
    let (ok, out) = run_cli(&s, &["plan", "shop", "--to", "mars"]);
    assert!(!ok);
    assert!(
        out.contains("no provider `mars`") && out.contains("a, b"),
        "{out}"
    );
    let (ok, out) = run_cli(&s, &["plan", "shop", "--to", "objects"]);
    assert!(!ok);
    assert!(
        out.contains("volume `data` needs block volumes") && out.contains("app `web` needs apps"),
        "{out}"
    );
    let (ok, out) = run_cli(&s, &["plan", "shop", "--to", "a"]);
    assert!(!ok);
    assert!(out.contains("already runs on `a`"), "{out}");
    // Nothing was created anywhere.
    assert!(!s.path("providers/b/volumes/shop").exists());
}

#[test]
fn a_config_rule_that_matches_nothing_fails_before_the_source_stops() {
    let s = Setup::new("raw");
    let (hash, listing) = deploy(&s);
    let config = s.config.clone().service("shop", "a", "watch", |sv| {
        shop(sv, s.app_port, "bucket_directory", |b| b)
            .health_url(&format!("http://127.0.0.1:{}/health", s.app_port), 20)
    });
    write_config(&s, &config.render());
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("✗ [pre-copy] preflight"), "{stdout}");
    assert!(stdout.contains("bucket_directory"), "{stdout}");
    // The source never stopped.
    assert!(!stdout.contains("stop-source"), "{stdout}");
    assert_consistent(&s, &hash, &listing, "rolled_back", "rule matching nothing");
}

#[test]
fn a_missing_source_image_is_reported_and_nothing_is_written_at_the_target() {
    let s = Setup::new("raw");
    let (hash, _) = deploy(&s);
    let volume = s.path("providers/a/volumes/shop/data.raw");
    let kept = s.path("data.raw.kept");
    std::fs::rename(&volume, &kept).unwrap();
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    // It existed before: it is not recreated empty, and nothing moves.
    assert!(
        stderr.contains("volume `data`: it existed at `a` and is gone"),
        "{stderr}"
    );
    assert!(!volume.exists());
    assert!(!s.path("providers/b/volumes/shop/data.raw").exists());
    std::fs::rename(&kept, &volume).unwrap();
    assert_eq!(s.wait_app("/hash"), hash);
}

/// A tmpfs of `mib` MiB mounted at `dir` for as long as it lives.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// `None` when this process may not mount (not root).
    fn mount(dir: &Path, mib: u64) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallDisk(dir.to_path_buf()))
    }

    /// Fills the disk until only about `leave` bytes are free.
    fn fill(&self, leave: u64) -> PathBuf {
        let free = {
            // SAFETY: statvfs writes only into the struct it is given.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
            st.f_bavail as u64 * st.f_frsize as u64
        };
        let filler = self.0.join("filler");
        let f = std::fs::File::create(&filler).unwrap();
        // tmpfs has no fallocate holes: write real bytes.
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let block = vec![0x5au8; 1 << 20];
        let mut left = free.saturating_sub(leave);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        w.flush().unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "stops the relocation at a checkpoint: needs --features crash-points"
)]
fn a_full_target_disk_is_refused_at_preflight_and_rolled_back_when_it_fills_later() {
    let s = Setup::new("raw");
    let Some(disk) = SmallDisk::mount(&s.path("providers/b"), 160) else {
        eprintln!("skipped: mounting a small tmpfs as the target's disk needs root");
        return;
    };
    let (hash, listing) = deploy(&s);

    // Too little room from the start: preflight says so and nothing stops.
    let filler = disk.fill(30 << 20);
    let out = s.relocate("b", None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the target `b` has") && stderr.contains("free, the relocation needs"),
        "{stderr}"
    );
    assert_consistent(&s, &hash, &listing, "rolled_back", "refused at preflight");

    // Room at preflight, then something else fills the disk before the copy: the copy
    // fails on the full disk and the relocation rolls back.
    std::fs::remove_file(&filler).unwrap();
    let out = s.relocate("b", Some("preflight:done"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    disk.fill(2 << 20);
    let mut d = s.daemon();
    let r = relocations(&mut d);
    let last = r.as_array().unwrap().last().unwrap();
    assert_eq!(last["state"], "rolled_back", "{last}");
    let detail = last.to_string();
    assert!(
        detail.contains("No space left") || detail.contains("full"),
        "the journal does not say the disk was full: {detail}"
    );
    assert_consistent(
        &s,
        &hash,
        &listing,
        "rolled_back",
        "disk filled after preflight",
    );
}

#[test]
fn a_corrupt_source_image_is_refused_before_the_source_stops() {
    let s = Setup::with_formats("qcow2", "raw");
    deploy(&s);
    let volume = s.path("providers/a/volumes/shop/data.qcow2");
    // Overwrite the qcow2 L1 table (its offset is at byte 40 of the header).
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&volume)
            .unwrap();
        let mut header = [0u8; 48];
        f.read_exact(&mut header).unwrap();
        let l1 = u64::from_be_bytes(header[40..48].try_into().unwrap());
        f.seek(SeekFrom::Start(l1)).unwrap();
        f.write_all(&[0xff; 16]).unwrap();
    }
    let damaged = std::fs::read(&volume).unwrap();
    let served = s.wait_app("/hash");
    let out = s.relocate("b", None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("volume `shop/data` at `a` is damaged"),
        "{stderr}"
    );
    assert!(stderr.contains("preflight"), "{stderr}");
    // The app was never stopped, the image is as it was, and nothing was left at the
    // target.
    assert_eq!(s.wait_app("/hash"), served);
    assert!(
        std::fs::read(&volume).unwrap() == damaged,
        "the source image changed"
    );
    assert!(!s.path("providers/b/volumes/shop/data.raw").exists());
}

#[test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "stops the relocation at a checkpoint: needs --features crash-points"
)]
fn a_qcow2_target_gets_the_pre_copy_converted_and_only_the_delta_at_cutover() {
    let s = Setup::new("qcow2");
    deploy(&s);
    let out = s.relocate("b", Some("precopy:volume:data:done"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The service keeps writing after the pre-copy: new data in one place, zeros in another.
    let volume = s.path("providers/a/volumes/shop/data.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        let mut fresh = vec![0u8; 3 << 20];
        fastrand::Rng::with_seed(9).fill(&mut fresh);
        f.write_all(&fresh).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    let expected = s.path("expected.raw");
    std::fs::copy(&volume, &expected).unwrap();
    let mut d = s.daemon();
    let r = relocations(&mut d);
    let last = r.as_array().unwrap().last().unwrap();
    assert_eq!(last["state"], "completed", "{last}");
    let sync = last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["name"] == "sync:volume:data")
        .unwrap();
    assert!(
        sync["output"]["delta_chunks_converted"]
            .as_u64()
            .unwrap_or(0)
            >= 4,
        "the cutover did not convert only the delta: {sync}"
    );
    let target = s.path("providers/b/volumes/shop/data.qcow2");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&expected)
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "the target differs from the source at the cutover: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "stops the relocation at a checkpoint: needs --features crash-points"
)]
fn a_failing_copy_stops_the_copies_beside_it_and_the_relocation_rolls_back() {
    let mut s = Setup::new("raw");
    // The bucket copy is held to 1 MiB/s and given 8 MiB more: it runs for seconds.
    s.config = s.config.clone().conduit("bucket_max_mib_per_sec", 1);
    let (hash, _) = deploy(&s);
    let mut big = vec![0u8; 8 << 20];
    fastrand::Rng::with_seed(3).fill(&mut big);
    std::fs::write(s.path("providers/a/buckets/shop/assets/big.bin"), &big).unwrap();
    let listing = s.wait_app("/bucket");
    assert!(listing.contains("big.bin 8388608"), "{listing}");

    // Stopped after preflight; then the source volume vanishes, so the volume's pre-copy
    // fails at once when the daemon resumes, while the bucket's copy has barely begun.
    let out = s.relocate("b", Some("preflight:done"));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    let volume = s.path("providers/a/volumes/shop/data.raw");
    let kept = s.path("data.raw.kept");
    std::fs::rename(&volume, &kept).unwrap();
    let mut d = s.daemon();
    let r = relocations(&mut d);
    let last = r.as_array().unwrap().last().unwrap();
    assert_eq!(last["state"], "rolled_back", "{last}");
    assert!(
        last["detail"]
            .as_str()
            .unwrap()
            .contains("step `precopy:volume:data` failed"),
        "the rollback does not name the failure that caused it: {last}"
    );
    let bucket = last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["name"] == "copy:bucket:assets")
        .unwrap();
    assert!(
        bucket["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled")),
        "the bucket copy beside the failed one was not stopped: {bucket}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
    std::fs::rename(&kept, &volume).unwrap();
    let mut d = s.daemon();
    assert_consistent(
        &s,
        &hash,
        &listing,
        "rolled_back",
        "a copy failed beside another",
    );
    assert!(!s.path("providers/b/buckets/shop/assets/big.bin").exists());
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
}

#[test]
fn a_bucket_holding_links_is_refused_at_preflight_and_what_was_not_copied_is_never_deleted() {
    let s = Setup::new("raw");
    let (hash, listing) = deploy(&s);
    let bucket = s.path("providers/a/buckets/shop/assets");
    std::fs::write(s.path("elsewhere.txt"), "data that lives elsewhere").unwrap();
    std::os::unix::fs::symlink(s.path("elsewhere.txt"), bucket.join("img/link.txt")).unwrap();
    let fifo = std::ffi::CString::new(bucket.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let with_others = s.wait_app("/bucket");
    assert!(with_others.contains("img/link.txt"), "{with_others}");

    // Not allowed: refused before the source stops, naming what cannot be copied.
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("✗ [pre-copy] preflight"), "{stdout}");
    assert!(
        stdout.contains("`img/link.txt`, `pipe`") && stdout.contains("skip_special_files = true"),
        "{stdout}"
    );
    assert!(!stdout.contains("stop-source"), "{stdout}");
    assert_consistent(&s, &hash, &with_others, "rolled_back", "links refused");

    // A setting that is not a boolean is a configuration error.
    let with_setting = |value: toml::Value| {
        s.config
            .clone()
            .service("shop", "a", "watch", |sv| {
                shop(sv, s.app_port, "bucket_dir", |b| {
                    b.table("settings", |t| t.set("skip_special_files", value))
                })
                .health_url(&format!("http://127.0.0.1:{}/health", s.app_port), 20)
            })
            .render()
    };
    write_config(&s, &with_setting("yes".into()));
    let (ok, out) = run_cli(&s, &["check"]);
    assert!(!ok);
    assert!(
        out.contains("settings.skip_special_files: must be true or false"),
        "{out}"
    );

    // Allowed: the service moves without them; they stay at the source, and the summary says
    // so, while the objects were copied and then deleted there.
    write_config(&s, &with_setting(true.into()));
    let out = s.relocate("b", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("left:       bucket assets: 2 entries that are not objects were not copied and stay at `a`: `img/link.txt`, `pipe`"),
        "{stdout}"
    );
    assert_consistent(&s, &hash, &listing, "completed", "links skipped");
    assert!(std::fs::symlink_metadata(bucket.join("img/link.txt"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(bucket.join("pipe")).is_ok());
    assert!(
        !bucket.join("img/7.txt").exists(),
        "the objects were decommissioned"
    );
    assert!(s.path("elsewhere.txt").exists());
}

/// Asks the daemon to relocate `shop` to `to`; returns the relocation's id.
pub(crate) fn relocate_by_hand(d: &Daemon, to: &str) -> String {
    let (status, body) = d
        .raw(
            "POST",
            "/v1/services/shop/relocate",
            true,
            Some(serde_json::json!({ "to": to })),
        )
        .unwrap();
    assert_eq!(status, 202, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Operators see the daemon's relocations (list, steps, live progress, status) and can cancel
/// one before its commit: the copies in flight stop and the source is untouched; after the
/// commit the cancel is refused with the reason.
#[test]
fn an_operator_follows_and_cancels_a_relocation_before_its_commit_but_not_after() {
    let mut s = Setup::new("raw");
    // A 1 MiB/s cap and a 6 MiB object keep the bucket's pre-copy running for seconds; the
    // grace period keeps the second relocation after its commit long enough to be asked.
    s.config = s
        .config
        .clone()
        .conduit("grace_period_secs", 60)
        .conduit("bucket_max_mib_per_sec", 1);
    let (hash, _) = deploy(&s);
    let bucket = s.path("providers/a/buckets/shop/assets");
    std::fs::write(bucket.join("big.bin"), vec![7u8; 6 << 20]).unwrap();
    let listing = s.wait_app("/bucket");
    let mut d = s.daemon();
    let cli = |args: &[&str]| run_cli(&s, args);

    let id = relocate_by_hand(&d, "b");
    // The daemon reports the bucket copy's progress while it runs.
    let live = d.eventually(
        "live progress of the bucket copy",
        Duration::from_secs(30),
        |d| {
            let r = d.get(&format!("/v1/relocations/{id}"));
            let p = r["progress"]["copy:bucket:assets"].clone();
            (p["kind"] == "bucket" && p["bytes_read"].as_u64()? > 0).then_some(p)
        },
    );
    assert!(live["bytes_total"].as_u64().unwrap() >= 6 << 20, "{live}");
    let (ok, out) = cli(&["relocations"]);
    assert!(ok && out.contains(&id) && out.contains("running"), "{out}");
    let (ok, out) = cli(&["relocations", "--state", "completed"]);
    assert!(ok && !out.contains(&id), "{out}");
    let (ok, out) = cli(&["relocations", "show", &id]);
    assert!(
        ok && out.contains("copy:bucket:assets") && out.contains("preflight"),
        "{out}"
    );
    let (ok, out) = cli(&["status"]);
    assert!(ok && out.contains(&format!("{id} to b: running")), "{out}");

    let asked = std::time::Instant::now();
    let (ok, out) = cli(&["relocations", "cancel", &id]);
    assert!(ok, "{out}");
    let done = d.eventually("the rollback", Duration::from_secs(30), |d| {
        let r = d.get(&format!("/v1/relocations/{id}"));
        (r["state"] == "rolled_back").then_some(r)
    });
    // Rolled back at once, not after the copy would have ended.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        done["detail"]
            .as_str()
            .unwrap()
            .contains("cancelled by an operator"),
        "{done}"
    );
    assert_consistent(&s, &hash, &listing, "rolled_back", "cancelled");
    assert!(!s.path("providers/b/buckets/shop/assets/big.bin").exists());
    let (status, body) = d
        .raw("POST", &format!("/v1/relocations/{id}/cancel"), true, None)
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("ended"), "{body}");
    let (status, _) = d
        .raw("POST", "/v1/relocations/nope/cancel", true, None)
        .unwrap();
    assert_eq!(status, 404);

    // The second relocation is followed to its commit with `--watch`; after the commit a
    // cancel is refused.
    let second = relocate_by_hand(&d, "b");
    let (ok, out) = cli(&["relocations", "show", &second, "--watch"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("✓ commit") && out.contains("state:  grace"),
        "{out}"
    );
    // More than the API's largest page: the CLI pages back by itself.
    let (ok, listed) = cli(&["relocations", "--limit", "5000"]);
    assert!(
        ok && listed.contains(&id) && listed.contains(&second),
        "{listed}"
    );
    let (status, body) = d
        .raw(
            "POST",
            &format!("/v1/relocations/{second}/cancel"),
            true,
            None,
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("relocate it back"), "{body}");

    let count = |series: &str| d.metric(series).unwrap_or(-1.0);
    assert_eq!(
        count("fluidcloud_relocation_cancels_total{result=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        count("fluidcloud_relocation_cancels_total{result=\"refused\"}"),
        2.0
    );
    assert_eq!(
        count("fluidcloud_relocations_requested_total{origin=\"operator\"}"),
        2.0
    );
    assert_eq!(
        count("fluidcloud_relocations_started_total{origin=\"operator\"}"),
        2.0
    );
    assert_eq!(
        count("fluidcloud_relocations_finished_total{outcome=\"rolled_back\"}"),
        1.0
    );
    assert_eq!(
        count("fluidcloud_relocations_finished_total{outcome=\"completed\"}"),
        1.0
    );
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
}
