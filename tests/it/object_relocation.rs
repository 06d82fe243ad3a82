//! Relocations with the real binary and real object stores on loopback (s3s-fs and a
//! single-node OpenStack Swift, installed by `scripts/test-env.sh`): a service made of a
//! bucket moves from S3 to Swift and back and arrives with the same manifest; wrong
//! credentials at the target fail the move and change nothing; a service whose buckets live
//! at S3 and Swift moves between two local providers and its app is pointed at them there.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::config::{ConfigBuilder, Section};
use common::servers::{kill_from_pid_file, S3sFs, SwiftServer, TestEnv};
use common::{bin, demo_app};
use fluidcloud::config::Config;
use fluidcloud::providers::copier::{bucket_manifest, BucketManifest};
use fluidcloud::providers::{self, ObjectStream, Provider};

/// Larger than the 5 MiB part size configured below, so it travels in parts.
const BIG: usize = 11 * (1 << 20) + 4321;

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

fn body(bytes: Vec<u8>) -> ObjectStream {
    Box::pin(std::io::Cursor::new(bytes))
}

fn secret_file(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
    s3: S3sFs,
    swift: SwiftServer,
}

impl Setup {
    fn new() -> Setup {
        let env = TestEnv::load();
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3sFs::start(&env, dir.path());
        let swift = SwiftServer::start(&env, dir.path());
        let s = Setup { dir, s3, swift };
        s.credentials(&s.swift.key.clone());
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes both stores' credential files, Swift's with `swift_key`.
    fn credentials(&self, swift_key: &str) {
        secret_file(
            self.dir.path(),
            "s3.credentials",
            &format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.s3.access_key, self.s3.secret_key
            ),
        );
        secret_file(
            self.dir.path(),
            "swift.credentials",
            &format!(
                "username = \"{}\"\npassword = \"{swift_key}\"\n",
                self.swift.user
            ),
        );
    }

    /// Providers `a`, `b` (local), `s3` and `swift`, and policy `watch`; the services are
    /// the caller's.
    fn config(&self) -> ConfigBuilder {
        // Both stores read their credentials from a file and send in parts of 5 MiB.
        let store = |t: Section, credentials: &str| {
            t.set("credentials_file", credentials)
                .set("part_size_mib", 5)
                .set("timeout_secs", 20)
        };
        ConfigBuilder::new()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .conduit("stop_timeout_secs", 5)
            .conduit("health_timeout_secs", 20)
            .provider_local("a", "lab")
            .provider_local("b", "lab")
            .provider("s3", "s3", "lab", |p| {
                p.table("s3", |t| {
                    store(
                        t.set("endpoint", self.s3.endpoint.as_str())
                            .set("region", "eu-test-1")
                            .set("path_style", true),
                        "s3.credentials",
                    )
                })
            })
            .provider("swift", "swift", "lab", |p| {
                p.table("swift", |t| {
                    store(
                        t.set("auth_url", self.swift.auth_url.as_str()),
                        "swift.credentials",
                    )
                })
            })
            .policy("watch", "cheapest", "audit", |p| p)
    }

    /// Writes `config` to `fluidcloud.toml` and parses it.
    fn write_config(&self, config: ConfigBuilder) -> Config {
        let path = self.path("fluidcloud.toml");
        let text = config.write(&path);
        Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn relocate_command(&self, service: &str, to: &str) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(["relocate", "--quiet", "--config"])
            .arg(self.path("fluidcloud.toml"))
            .args([service, "--to", to])
            .env_remove("FLUIDCLOUD_KILL_AT")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::null());
        cmd
    }

    fn relocate(&self, service: &str, to: &str) -> Output {
        self.relocate_command(service, to).output().unwrap()
    }

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

fn open(config: &Config, name: &str) -> Arc<dyn Provider> {
    providers::open(&config.providers[name]).unwrap_or_else(|e| panic!("{e}"))
}

/// `n` objects of assorted sizes and nesting plus one larger than the part size.
async fn fill(p: &dyn Provider, service: &str, bucket: &str, n: usize) {
    p.ensure_bucket(service, bucket).await.unwrap();
    for i in 0..n {
        let key = match i % 3 {
            0 => format!("img/{i:04}.jpg"),
            1 => format!("docs/{i}.txt"),
            _ => format!("top-{i}"),
        };
        p.write_object(
            service,
            bucket,
            &key,
            body(content(i as u64, (i * 509) % 30_000)),
        )
        .await
        .unwrap();
    }
    p.write_object(service, bucket, "video/big.mp4", body(content(7, BIG)))
        .await
        .unwrap();
}

async fn manifest(p: &dyn Provider, service: &str, bucket: &str) -> BucketManifest {
    bucket_manifest(p, service, bucket, 8)
        .await
        .unwrap_or_else(|e| panic!("manifest of {service}/{bucket} at {}: {e}", p.name()))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Service `archive`: one bucket at `s3`.
fn archive(config: ConfigBuilder) -> ConfigBuilder {
    config.service("archive", "s3", "watch", |s| s.bucket("media", 0.05))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_moves_from_s3_to_swift_and_back_and_wrong_credentials_change_nothing() {
    let s = Setup::new();
    let config = s.write_config(archive(s.config()));
    let s3 = open(&config, "s3");
    fill(s3.as_ref(), "archive", "media", 300).await;
    let original = manifest(s3.as_ref(), "archive", "media").await;
    assert_eq!(original.entries.len(), 301);

    // A target that refuses the credentials: the move fails before anything is written
    // there, and the source keeps every object.
    s.credentials("not-the-key");
    let out = s.relocate("archive", "swift");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("swift"), "{said}");
    assert!(
        said.contains("refused") || said.contains("denied") || said.contains("credentials"),
        "the error does not say the credentials were refused: {said}"
    );
    assert_eq!(manifest(s3.as_ref(), "archive", "media").await, original);
    s.credentials(&s.swift.key.clone());
    let swift = open(&config, "swift");
    let left = swift.list_objects("archive", "media").await;
    assert!(
        left.as_ref().map(|l| l.is_empty()).unwrap_or(true),
        "objects were left at the target: {left:?}"
    );

    // S3 → Swift: every object arrives, the source bucket goes after the grace period.
    let out = s.relocate("archive", "swift");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("completed"),
        "{}",
        text(&out)
    );
    assert_eq!(manifest(swift.as_ref(), "archive", "media").await, original);
    let gone = s3.list_objects("archive", "media").await;
    assert!(
        gone.as_ref().map(|l| l.is_empty()).unwrap_or(true),
        "the source bucket was not decommissioned: {gone:?}"
    );

    // And back.
    let out = s.relocate("archive", "s3");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(manifest(s3.as_ref(), "archive", "media").await, original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_living_at_s3_and_swift_stay_there_and_the_app_is_pointed_at_them() {
    let s = Setup::new();
    std::fs::write(
        s.path("demo.toml.in"),
        "listen = \"{app.web.host}:{app.web.port}\"\n\
         data_file = \"{volume.data.path}\"\n\
         bucket_url = \"{bucket.photos.endpoint}\"\n\
         # swift: {bucket.thumbs.endpoint}\n",
    )
    .unwrap();
    let port = common::free_port();
    let config = s.write_config(s.config().service("shop", "a", "watch", |shop| {
        shop.health_url(&format!("http://127.0.0.1:{port}/health"), 20)
            .demo_app_with_data(demo_app(), port, 0.03125)
            .bucket_at("photos", 0.01, "s3")
            .bucket_at("thumbs", 0.01, "swift")
    }));
    let (s3, swift) = (open(&config, "s3"), open(&config, "swift"));
    fill(s3.as_ref(), "shop", "photos", 20).await;
    fill(swift.as_ref(), "shop", "thumbs", 20).await;
    let photos = manifest(s3.as_ref(), "shop", "photos").await;
    let thumbs = manifest(swift.as_ref(), "shop", "thumbs").await;

    let plan = Command::new(bin())
        .args(["plan", "--config"])
        .arg(s.path("fluidcloud.toml"))
        .args(["shop", "--to", "b"])
        .output()
        .unwrap();
    let shown = text(&plan);
    assert!(plan.status.success(), "{shown}");
    assert!(shown.contains("bucket `photos` stays at `s3`"), "{shown}");
    assert!(
        shown.contains("bucket `thumbs` stays at `swift`"),
        "{shown}"
    );
    assert!(!shown.contains("copy:bucket"), "{shown}");

    let out = s.relocate("shop", "b");
    assert!(out.status.success(), "{}", text(&out));
    let written = std::fs::read_to_string(s.path("providers/b/apps/shop/web/demo.toml")).unwrap();
    let s3_url = format!("{}/shop--photos", s.s3.endpoint.trim_end_matches('/'));
    assert!(
        written.contains(&format!("bucket_url = \"{s3_url}\"")),
        "the app is not pointed at the S3 bucket: {written}"
    );
    assert!(
        written.contains("/v1/AUTH_test/shop--thumbs"),
        "the app is not pointed at the Swift container: {written}"
    );
    // Neither bucket moved nor went with the decommissioned source.
    assert_eq!(manifest(s3.as_ref(), "shop", "photos").await, photos);
    assert_eq!(manifest(swift.as_ref(), "shop", "thumbs").await, thumbs);
    assert!(!s.path("providers/b/buckets/shop/photos").exists());
}

/// The number after `label` in the summary `relocate` prints, e.g. `bytes sent: 1.2 MiB (N B)`.
fn summary_bytes(out: &Output, label: &str) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in the summary:\n{}", text(out)));
    let inner = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(" B)"))
        .unwrap_or_else(|| panic!("unexpected summary line: {line}"));
    inner.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_server_killed_mid_copy_fails_the_move_and_the_next_attempt_resumes() {
    let mut s = Setup::new();
    // Slow enough that the copy is still going when the target's server dies.
    let config = s.write_config(archive(s.config()).conduit("bucket_max_mib_per_sec", 1));
    let s3 = open(&config, "s3");
    fill(s3.as_ref(), "archive", "media", 300).await;
    let original = manifest(s3.as_ref(), "archive", "media").await;
    let total: u64 = original.entries.values().map(|e| e.size).sum();

    let log = std::fs::File::create(s.path("first.log")).unwrap();
    let mut child = s
        .relocate_command("archive", "swift")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let swift = open(&config, "swift");
    let started = std::time::Instant::now();
    let arrived = loop {
        let n = swift
            .list_objects("archive", "media")
            .await
            .map(|l| l.len())
            .unwrap_or(0);
        if n >= 30 {
            break n;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "objects did not start arriving at Swift:\n{}",
            std::fs::read_to_string(s.path("first.log")).unwrap_or_default()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the copy ended before the server could be killed:\n{}",
            std::fs::read_to_string(s.path("first.log")).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    s.swift.kill_proxy();
    let status = child.wait().unwrap();
    let said = std::fs::read_to_string(s.path("first.log")).unwrap();
    assert!(!status.success(), "{said}");
    assert!(
        said.contains("copy:bucket:media") && said.contains("swift"),
        "the failure does not name the step and the provider:\n{said}"
    );
    assert!(
        said.contains("unreachable") || said.contains("connect"),
        "the failure does not say the target could not be reached:\n{said}"
    );
    // The source is untouched.
    assert_eq!(manifest(s3.as_ref(), "archive", "media").await, original);

    // With the server back and no rate cap, the next attempt completes, and what arrived
    // before the crash is not sent again.
    s.swift.restart_proxy();
    s.write_config(archive(s.config()));
    let out = s.relocate("archive", "swift");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(manifest(swift.as_ref(), "archive", "media").await, original);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(
            "verified:   sync:bucket:media: BLAKE3 manifests of both sides equal (301 objects)"
        ),
        "{shown}"
    );
    let sent = summary_bytes(&out, "bytes sent:");
    assert!(
        sent < total && sent > 0,
        "{sent} of {total} bytes were sent after {arrived} objects had arrived:\n{}",
        text(&out)
    );
    // The sync reuses the hashes the copy learned: every object is read once to copy it,
    // what had arrived is read at both ends once to hash it, and nothing more.
    let read = summary_bytes(&out, "bytes read:");
    assert!(
        read < 2 * total,
        "{read} bytes were read for a bucket of {total}:\n{}",
        text(&out)
    );
    let gone = s3.list_objects("archive", "media").await;
    assert!(
        gone.as_ref().map(|l| l.is_empty()).unwrap_or(true),
        "the source bucket was not decommissioned: {gone:?}"
    );
}
