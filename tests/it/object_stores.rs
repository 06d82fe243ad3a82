//! The `s3` and `swift` drivers and the bucket migrator against real servers on loopback:
//! s3s-fs (which checks SigV4) and a single-node OpenStack Swift with tempauth, installed by
//! `scripts/test-env.sh`. A bucket travels local → S3 → Swift → local and arrives with the
//! same manifest and metadata; wrong credentials, missing buckets and dead endpoints fail
//! plainly; a copy interrupted by a crashed server resumes after the restart.

use crate::common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::servers::{http, S3sFs, SwiftServer, TestEnv};
use fluidcloud::config::Config;
use fluidcloud::providers::copier::{
    bucket_manifest, copy_bucket, BucketCopyError, BucketCopyOptions, BucketCopyReport,
    BucketProgress, Side,
};
use fluidcloud::providers::{self, ObjectMeta, ObjectStream, Provider, ProviderError};

const MIB: usize = 1 << 20;
/// Larger than the 5 MiB part size configured below: three parts.
const BIG: usize = 12 * MIB + 12_345;
const BIG_KEY: &str = "video/front-door.mp4";

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

fn body(bytes: Vec<u8>) -> ObjectStream {
    Box::pin(std::io::Cursor::new(bytes))
}

fn big_meta() -> ObjectMeta {
    ObjectMeta {
        content_type: Some("video/mp4".to_string()),
        user: BTreeMap::from([
            ("camera".to_string(), "front door".to_string()),
            ("take".to_string(), "3".to_string()),
        ]),
    }
}

fn small_meta() -> ObjectMeta {
    ObjectMeta {
        content_type: Some("text/csv".to_string()),
        user: BTreeMap::from([("source".to_string(), "till-7".to_string())]),
    }
}

fn secret_file(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Providers `home` and `back` (local), `s3` and `swift`, with the given secrets.
fn config(
    dir: &Path,
    s3: Option<&S3sFs>,
    swift: Option<&SwiftServer>,
    s3_secret: &str,
    swift_key: &str,
) -> Config {
    let mut text = String::from(
        "[providers.home]\ndriver = \"local\"\nregion = \"lab\"\nroot = \"home\"\n\n\
         [providers.back]\ndriver = \"local\"\nregion = \"lab\"\nroot = \"back\"\n\n",
    );
    if let Some(s3) = s3 {
        secret_file(
            dir,
            "s3.credentials",
            &format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {s3_secret}\n",
                s3.access_key
            ),
        );
        text.push_str(&format!(
            "[providers.s3]\ndriver = \"s3\"\nregion = \"lab\"\n[providers.s3.s3]\n\
             endpoint = \"{}\"\nregion = \"eu-test-1\"\npath_style = true\n\
             credentials_file = \"s3.credentials\"\npart_size_mib = 5\ntimeout_secs = 20\n\n",
            s3.endpoint
        ));
    }
    if let Some(swift) = swift {
        secret_file(
            dir,
            "swift.credentials",
            &format!(
                "username = \"{}\"\npassword = \"{swift_key}\"\n",
                swift.user
            ),
        );
        text.push_str(&format!(
            "[providers.swift]\ndriver = \"swift\"\nregion = \"lab\"\n[providers.swift.swift]\n\
             auth_url = \"{}\"\ncredentials_file = \"swift.credentials\"\npart_size_mib = 5\n\
             timeout_secs = 20\n",
            swift.auth_url
        ));
    }
    Config::parse(&dir.join("fluidcloud.toml"), &text).unwrap()
}

fn open(config: &Config, name: &str) -> Arc<dyn Provider> {
    providers::open(&config.providers[name]).unwrap_or_else(|e| panic!("{e}"))
}

/// `n` small objects of assorted sizes and nesting, one typed small object and the big one.
async fn fill(p: &dyn Provider, bucket: &str, n: usize) -> u64 {
    p.ensure_bucket("shop", bucket).await.unwrap();
    let mut total = 0;
    for i in 0..n {
        let key = match i % 4 {
            0 => format!("img/{i:04}.jpg"),
            1 => format!("img/thumbs/{i:04}.jpg"),
            2 => format!("docs/{i}"),
            _ => format!("top-{i}"),
        };
        let bytes = content(i as u64, (i * 331) % (48 * 1024));
        total += bytes.len() as u64;
        p.write_object("shop", bucket, &key, body(bytes))
            .await
            .unwrap();
    }
    let csv = b"day,total\nmon,3\n".to_vec();
    total += csv.len() as u64;
    p.write_object_with_meta("shop", bucket, "sales.csv", body(csv), &small_meta())
        .await
        .unwrap();
    p.write_object_with_meta("shop", bucket, BIG_KEY, body(content(99, BIG)), &big_meta())
        .await
        .unwrap();
    total + BIG as u64
}

fn no_progress(_: BucketProgress) {}

async fn hop(
    what: &str,
    src: &dyn Provider,
    src_bucket: &str,
    dst: &dyn Provider,
    dst_bucket: &str,
) -> BucketCopyReport {
    let started = Instant::now();
    let report = copy_bucket(
        src,
        "shop",
        src_bucket,
        dst,
        "shop",
        dst_bucket,
        &BucketCopyOptions::default(),
        &no_progress,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{what}: {} copied, {} skipped, {:.1} MiB copied, {:.1} MiB read, {secs:.2} s ({:.1} MiB/s of the bucket)",
        report.objects_copied,
        report.objects_skipped,
        report.bytes_copied as f64 / MIB as f64,
        report.bytes_read as f64 / MIB as f64,
        report.bytes_total as f64 / MIB as f64 / secs,
    );
    report
}

async fn assert_meta(p: &dyn Provider, bucket: &str, key: &str, want: &ObjectMeta) {
    let stat = p
        .stat_object("shop", bucket, key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("`{key}` is missing at {}", p.name()));
    assert_eq!(&stat.meta, want, "metadata of `{key}` at {}", p.name());
}

/// Objects in a Swift container as Swift counts them (large-object segments included).
fn swift_object_count(swift: &SwiftServer, container: &str) -> u64 {
    let (_, login) = http(
        swift.proxy_port,
        "GET",
        "/auth/v1.0",
        &[("X-Auth-User", &swift.user), ("X-Auth-Key", &swift.key)],
    )
    .unwrap();
    let (status, head) = http(
        swift.proxy_port,
        "HEAD",
        &format!("/v1/AUTH_test/{container}"),
        &[("X-Auth-Token", &login["x-auth-token"])],
    )
    .unwrap();
    assert_eq!(status, 204, "{head:?}");
    head["x-container-object-count"].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_travels_from_local_through_s3_and_swift_back_to_local_unchanged() {
    let env = TestEnv::load();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(&env, tmp.path());
    let swift = SwiftServer::start(&env, tmp.path());
    let cfg = config(
        tmp.path(),
        Some(&s3),
        Some(&swift),
        &s3.secret_key,
        &swift.key,
    );
    let (home, s3p, swp, back) = (
        open(&cfg, "home"),
        open(&cfg, "s3"),
        open(&cfg, "swift"),
        open(&cfg, "back"),
    );
    assert!(s3p.capabilities().object && !s3p.capabilities().block);

    let total = fill(&*home, "media", 300).await;
    let source = bucket_manifest(&*home, "shop", "media", 8).await.unwrap();
    assert_eq!(source.entries.len(), 302);

    let r = hop("local -> s3", &*home, "media", &*s3p, "media").await;
    assert_eq!((r.objects_copied, r.objects_skipped), (302, 0));
    assert_eq!(r.bytes_copied, total);
    assert_eq!(r.manifest_digest, source.digest());
    // The bucket is where the documented mapping puts it.
    assert!(s3.data.join("shop--media").is_dir());
    assert_meta(&*s3p, "media", BIG_KEY, &big_meta()).await;
    assert_meta(&*s3p, "media", "sales.csv", &small_meta()).await;

    let r = hop("s3 -> swift", &*s3p, "media", &*swp, "media").await;
    assert_eq!((r.objects_copied, r.objects_skipped), (302, 0));
    assert_eq!(r.manifest_digest, source.digest());
    // What was written is trusted for the target's manifest, the large object included
    // (Swift lists it with its manifest's MD5; its real entity tag is `slo_etag`): nothing
    // is read back.
    assert_eq!(r.bytes_read, r.bytes_copied, "the target was read back");
    assert_meta(&*swp, "media", BIG_KEY, &big_meta()).await;
    assert_meta(&*swp, "media", "sales.csv", &small_meta()).await;
    // 302 objects and the three segments of the big one.
    assert_eq!(swift_object_count(&swift, "shop--media"), 305);

    let r = hop("swift -> local", &*swp, "media", &*back, "restored").await;
    assert_eq!((r.objects_copied, r.objects_skipped), (302, 0));
    assert_eq!(r.manifest_digest, source.digest());
    let arrived = bucket_manifest(&*back, "shop", "restored", 8)
        .await
        .unwrap();
    assert_eq!(arrived, source);
    assert_meta(&*back, "restored", BIG_KEY, &big_meta()).await;
    assert_meta(&*back, "restored", "sales.csv", &small_meta()).await;

    // Again: nothing travels, and both manifests need every object read once: local and
    // S3 share no hash, S3 and Swift compare MD5 entity tags but list no BLAKE3.
    let r = hop("local -> s3 again", &*home, "media", &*s3p, "media").await;
    assert_eq!((r.objects_copied, r.objects_skipped), (0, 302));
    assert_eq!(r.bytes_read, 2 * total);
    let r = hop("s3 -> swift again", &*s3p, "media", &*swp, "media").await;
    assert_eq!((r.objects_copied, r.objects_skipped), (0, 302));
    assert_eq!(r.bytes_read, 2 * total);
    assert_eq!(r.manifest_digest, source.digest());

    // Tokens that vanish are renewed by logging in again.
    swift.flush_tokens();
    assert_eq!(swp.list_objects("shop", "media").await.unwrap().len(), 302);

    // Replacing and deleting a large object leaves none of its segments behind.
    swp.write_object_with_meta("shop", "media", BIG_KEY, body(content(7, BIG)), &big_meta())
        .await
        .unwrap();
    assert_eq!(swift_object_count(&swift, "shop--media"), 305);
    swp.delete_object("shop", "media", BIG_KEY).await.unwrap();
    assert_eq!(swift_object_count(&swift, "shop--media"), 301);
    swp.delete_object("shop", "media", BIG_KEY).await.unwrap();
    let err = swp.delete_bucket("shop", "media").await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
    s3p.delete_object("shop", "media", BIG_KEY).await.unwrap();
    assert!(s3p
        .stat_object("shop", "media", BIG_KEY)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_plainly_and_nothing_is_written() {
    let env = TestEnv::load();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(&env, tmp.path());
    let swift = SwiftServer::start(&env, tmp.path());
    let good = config(
        tmp.path(),
        Some(&s3),
        Some(&swift),
        &s3.secret_key,
        &swift.key,
    );
    fill(&*open(&good, "home"), "media", 3).await;
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = config(
        &bad_dir,
        Some(&s3),
        Some(&swift),
        "not-the-secret",
        "not-the-key",
    );
    let home = open(&good, "home");

    for target in ["s3", "swift"] {
        let err = copy_bucket(
            &*home,
            "shop",
            "media",
            &*open(&bad, target),
            "shop",
            "media",
            &BucketCopyOptions::default(),
            &no_progress,
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        match &err {
            BucketCopyError::Bucket {
                side: Side::Target,
                error: ProviderError::Denied { .. },
            } => {}
            other => panic!("{target}: unexpected error: {other}"),
        }
        assert!(
            text.contains(&format!("provider `{target}`")) && text.contains("wrong credentials"),
            "{text}"
        );
        eprintln!("{target}: {text}");
    }
    assert!(ensure_bucket_error(&bad, "s3")
        .await
        .contains("the secret access key is wrong"));
    // Nothing was created: the good credentials find no such bucket.
    for target in ["s3", "swift"] {
        let err = open(&good, target)
            .list_objects("shop", "media")
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }
    assert_eq!(std::fs::read_dir(&s3.data).unwrap().count(), 0);
}

async fn ensure_bucket_error(cfg: &Config, name: &str) -> String {
    open(cfg, name)
        .ensure_bucket("shop", "other")
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_buckets_bad_names_and_dead_endpoints_are_named() {
    let env = TestEnv::load();
    let tmp = tempfile::tempdir().unwrap();
    let mut s3 = S3sFs::start(&env, tmp.path());
    let cfg = config(tmp.path(), Some(&s3), None, &s3.secret_key, "");
    let s3p = open(&cfg, "s3");

    let err = s3p.list_objects("shop", "nothing").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "provider `s3`: bucket `shop/nothing` (S3 bucket `shop--nothing`) does not exist"
    );
    let err = copy_bucket(
        &*s3p,
        "shop",
        "nothing",
        &*open(&cfg, "back"),
        "shop",
        "copy",
        &BucketCopyOptions::default(),
        &no_progress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            BucketCopyError::Bucket {
                side: Side::Source,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = s3p
        .write_object("shop", "nothing", "k", body(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "provider `s3`: bucket `shop/nothing` (S3 bucket `shop--nothing`) does not exist"
    );
    let err = s3p.read_object("shop", "nothing", "k").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string()
            .contains("`shop/nothing` (S3 bucket `shop--nothing`)"),
        "{err}"
    );

    s3p.ensure_bucket("shop", "here").await.unwrap();
    let err = s3p
        .read_object("shop", "here", "no/such/key")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "provider `s3`: object `no/such/key` in bucket `shop/here` (S3 bucket `shop--here`) does not exist"
    );
    let err = s3p.ensure_bucket("Shop", "here").await.unwrap_err();
    assert!(
        err.to_string().contains("S3 bucket name `Shop--here`"),
        "{err}"
    );
    assert!(err.to_string().contains("lowercase"), "{err}");
    s3p.delete_bucket("shop", "here").await.unwrap();
    s3p.delete_bucket("shop", "here").await.unwrap();

    s3.kill();
    let err = s3p.list_objects("shop", "here").await.unwrap_err();
    assert!(matches!(err, ProviderError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("endpoint {} unreachable", s3.endpoint)),
        "{err}"
    );
    eprintln!("{err}");
}

/// Copies 200 objects slowly into `target`, crashes its server once 40 have arrived, and
/// checks that a copy after the restart skips what arrived and finishes equal.
async fn resume_after_crash(
    cfg: &Config,
    target: &str,
    crash: impl Fn() + Send + Sync,
    restart: impl FnOnce(),
) {
    let home = open(cfg, "home");
    let dst = open(cfg, target);
    home.ensure_bucket("shop", "logs").await.unwrap();
    for i in 0..200u64 {
        home.write_object(
            "shop",
            "logs",
            &format!("day-{i:03}"),
            body(content(i, 32 * 1024)),
        )
        .await
        .unwrap();
    }
    let crashed = std::sync::atomic::AtomicBool::new(false);
    let options = BucketCopyOptions {
        concurrency: 4,
        max_bytes_per_sec: Some(2 * MIB as u64),
        ..Default::default()
    };
    let err = copy_bucket(
        &*home,
        "shop",
        "logs",
        &*dst,
        "shop",
        "logs",
        &options,
        &|p| {
            if p.objects_copied >= 40 && !crashed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                crash();
            }
        },
    )
    .await
    .unwrap_err();
    eprintln!("{target} crashed mid-copy: {err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    restart();

    let report = hop(
        &format!("resume into {target}"),
        &*home,
        "logs",
        &*dst,
        "logs",
    )
    .await;
    assert!(report.objects_skipped >= 40, "{report:?}");
    assert_eq!(report.objects_skipped + report.objects_copied, 200);
    let (a, b) = (
        bucket_manifest(&*home, "shop", "logs", 8).await.unwrap(),
        bucket_manifest(&*dst, "shop", "logs", 8).await.unwrap(),
    );
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_s3_interrupted_by_a_crash_resumes_after_the_restart() {
    let env = TestEnv::load();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = Mutex::new(S3sFs::start(&env, tmp.path()));
    let cfg = {
        let s = s3.lock().unwrap();
        config(tmp.path(), Some(&s), None, &s.secret_key, "")
    };
    resume_after_crash(
        &cfg,
        "s3",
        || s3.lock().unwrap().kill(),
        || s3.lock().unwrap().restart(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_swift_interrupted_by_a_crash_resumes_after_the_restart() {
    let env = TestEnv::load();
    let tmp = tempfile::tempdir().unwrap();
    let swift = Mutex::new(SwiftServer::start(&env, tmp.path()));
    let cfg = {
        let s = swift.lock().unwrap();
        config(tmp.path(), None, Some(&s), "", &s.key)
    };
    resume_after_crash(
        &cfg,
        "swift",
        || swift.lock().unwrap().kill_proxy(),
        || swift.lock().unwrap().restart_proxy(),
    )
    .await;
}
