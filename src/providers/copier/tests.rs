use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;

use super::*;
use crate::model::Driver;
use crate::providers::local::LocalProvider;
use crate::providers::{
    Capabilities, DiskFormat, ObjectBody, ObjectMeta, ObjectStat, Operation, OperationId,
};

fn local(name: &str, dir: &std::path::Path) -> Arc<LocalProvider> {
    LocalProvider::open_at(name, dir, DiskFormat::Raw).unwrap()
}

fn body(bytes: Vec<u8>) -> ObjectStream {
    Box::pin(std::io::Cursor::new(bytes))
}

/// Deterministic content of `len` bytes that differs with `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

async fn put(p: &dyn Provider, bucket: &str, key: &str, bytes: Vec<u8>) {
    p.write_object("svc", bucket, key, body(bytes))
        .await
        .unwrap();
}

async fn read_all(p: &dyn Provider, bucket: &str, key: &str) -> Vec<u8> {
    let mut b = p.read_object("svc", bucket, key).await.unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut b.stream, &mut out)
        .await
        .unwrap();
    out
}

/// A source of `n` objects of assorted sizes (empty included) and nesting.
async fn fill(p: &dyn Provider, bucket: &str, n: usize) {
    p.ensure_bucket("svc", bucket).await.unwrap();
    for i in 0..n {
        let key = match i % 3 {
            0 => format!("top-{i}"),
            1 => format!("a/b/nested-{i}.bin"),
            _ => format!("a/{i}"),
        };
        put(p, bucket, &key, content(i as u64, (i * 997) % 20_000)).await;
    }
}

fn no_progress(_: BucketProgress) {}

async fn copy(
    src: &dyn Provider,
    dst: &dyn Provider,
    options: &BucketCopyOptions,
) -> Result<BucketCopyReport, BucketCopyError> {
    copy_bucket(
        src,
        "svc",
        "data",
        dst,
        "svc",
        "copy",
        options,
        &no_progress,
    )
    .await
}

#[tokio::test]
async fn a_bucket_is_copied_then_a_second_run_skips_everything_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 40).await;
    let meta = ObjectMeta {
        content_type: Some("text/plain; charset=utf-8".to_string()),
        user: BTreeMap::from([("owner".to_string(), "shop team".to_string())]),
    };
    a.write_object_with_meta("svc", "data", "typed.txt", body(b"hello".to_vec()), &meta)
        .await
        .unwrap();

    let phases = Mutex::new(Vec::new());
    let report = copy_bucket(
        &*a,
        "svc",
        "data",
        &*b,
        "svc",
        "copy",
        &BucketCopyOptions::default(),
        &|p: BucketProgress| {
            let mut v = phases.lock().unwrap();
            if v.last() != Some(&p.phase) {
                v.push(p.phase);
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(report.objects_total, 41);
    assert_eq!(report.objects_copied, 41);
    assert_eq!(report.objects_skipped, 0);
    let source = bucket_manifest(&*a, "svc", "data", 4).await.unwrap();
    let target = bucket_manifest(&*b, "svc", "copy", 4).await.unwrap();
    assert_eq!(source.entries.len(), 41);
    assert_eq!(source, target);
    assert_eq!(report.manifest_digest, source.digest());
    assert_eq!(
        report.bytes_total,
        source.entries.values().map(|e| e.size).sum::<u64>()
    );
    assert_eq!(report.bytes_copied, report.bytes_total);
    assert_eq!(
        *phases.lock().unwrap(),
        vec![
            BucketPhase::Listing,
            BucketPhase::Copying,
            BucketPhase::Verifying
        ]
    );
    let stat = b
        .stat_object("svc", "copy", "typed.txt")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stat.meta, meta);

    // Change one object, add one: only those two travel.
    put(&*a, "data", "top-0", b"changed".to_vec()).await;
    put(&*a, "data", "new/one", b"new".to_vec()).await;
    let again = copy(&*a, &*b, &BucketCopyOptions::default()).await.unwrap();
    assert_eq!((again.objects_copied, again.objects_skipped), (2, 40));
    assert_eq!(again.bytes_copied, 10);
    assert_eq!(read_all(&*b, "copy", "top-0").await, b"changed");
    assert_ne!(again.manifest_digest, report.manifest_digest);
}

#[tokio::test]
async fn a_target_object_of_the_same_size_but_other_content_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 3).await;
    b.ensure_bucket("svc", "copy").await.unwrap();
    let original = read_all(&*a, "data", "a/b/nested-1.bin").await;
    let mut stale = original.clone();
    stale[0] ^= 0xff;
    put(&*b, "copy", "a/b/nested-1.bin", stale).await;
    put(&*b, "copy", "only-here", b"keep me".to_vec()).await;

    let report = copy(&*a, &*b, &BucketCopyOptions::default()).await.unwrap();
    assert_eq!((report.objects_copied, report.objects_skipped), (3, 0));
    assert_eq!(read_all(&*b, "copy", "a/b/nested-1.bin").await, original);
    assert_eq!(report.extra_at_target, vec!["only-here".to_string()]);
    assert_eq!(read_all(&*b, "copy", "only-here").await, b"keep me");
}

#[tokio::test]
async fn a_missing_source_bucket_fails_without_creating_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    let err = copy(&*a, &*b, &BucketCopyOptions::default())
        .await
        .unwrap_err();
    match &err {
        BucketCopyError::Bucket {
            side: Side::Source,
            error,
        } => assert!(error.is_not_found(), "{error}"),
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(
        err.to_string(),
        "the source bucket: provider `a`: bucket `svc/data` does not exist"
    );
    let target = b.list_objects("svc", "copy").await.unwrap_err();
    assert!(target.is_not_found(), "{target}");
}

#[tokio::test]
async fn bad_options_and_copying_a_bucket_onto_itself_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    fill(&*a, "data", 1).await;
    let err = copy_bucket(
        &*a,
        "svc",
        "data",
        &*a,
        "svc",
        "data",
        &BucketCopyOptions::default(),
        &no_progress,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("same bucket `svc/data`"), "{err}");
    for (options, text) in [
        (
            BucketCopyOptions {
                concurrency: 0,
                ..Default::default()
            },
            "concurrency must be between 1 and 256, got 0",
        ),
        (
            BucketCopyOptions {
                max_bytes_per_sec: Some(0),
                ..Default::default()
            },
            "max_bytes_per_sec must be above zero",
        ),
    ] {
        let err = copy(&*a, &*a, &options).await.unwrap_err();
        assert!(err.to_string().contains(text), "{err}");
    }
}

#[tokio::test]
async fn the_rate_limit_holds_and_cancelling_keeps_what_arrived_for_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    a.ensure_bucket("svc", "data").await.unwrap();
    for i in 0..8 {
        put(&*a, "data", &format!("part-{i}"), content(i, 256 * 1024)).await;
    }
    // 2 MiB at 4 MiB/s with a 1 MiB head start: at least a quarter second.
    let started = Instant::now();
    let options = BucketCopyOptions {
        concurrency: 2,
        max_bytes_per_sec: Some(4 << 20),
        ..Default::default()
    };
    let report = copy(&*a, &*b, &options).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(report.objects_copied, 8);
    assert!(secs >= 0.24, "2 MiB at 4 MiB/s took only {secs} s");

    // Cancel once the first objects of a slow copy are through.
    for i in 0..8 {
        b.delete_object("svc", "copy", &format!("part-{i}"))
            .await
            .unwrap();
    }
    let cancel = CancellationToken::new();
    let options = BucketCopyOptions {
        concurrency: 1,
        max_bytes_per_sec: Some(1 << 20),
        cancel: cancel.clone(),
        ..Default::default()
    };
    let err = copy_bucket(&*a, "svc", "data", &*b, "svc", "copy", &options, &|p| {
        if p.objects_copied >= 2 {
            cancel.cancel();
        }
    })
    .await
    .unwrap_err();
    assert!(matches!(err, BucketCopyError::Cancelled), "{err}");
    let arrived = b.list_objects("svc", "copy").await.unwrap();
    assert!(
        (2..8).contains(&arrived.len()),
        "{} objects arrived",
        arrived.len()
    );
    // Nothing half-written: every object there is complete.
    for o in &arrived {
        assert_eq!(o.size, 256 * 1024, "{}", o.key);
    }
    let report = copy(&*a, &*b, &BucketCopyOptions::default()).await.unwrap();
    assert_eq!(report.objects_skipped, arrived.len() as u64);
    assert_eq!(report.objects_copied, 8 - arrived.len() as u64);
}

/// Delegates to a local provider; can hide BLAKE3 from listings (like S3 or Swift) and
/// replace an object with new content each time it is opened for reading.
struct Wrapped {
    inner: Arc<LocalProvider>,
    hide_blake3: bool,
    /// Key whose content changes on read, and how many more times it does.
    churn: Option<(String, AtomicUsize)>,
    reads: AtomicUsize,
    /// Calls that fail on the way before the next one goes through, as a store behind a
    /// flaky network does: lookups (reset), uploads (`503` after reading part of the
    /// content) and deletes (reset).
    failing_stats: AtomicUsize,
    failing_writes: AtomicUsize,
    failing_deletes: AtomicUsize,
}

/// Takes one from `n` when it is above zero: true when this call is to fail.
fn fails(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn reset(provider: &str, object: &str) -> ProviderError {
    ProviderError::Unreachable {
        provider: provider.to_string(),
        object: object.to_string(),
        endpoint: "http://127.0.0.1:1".to_string(),
        detail: "connection reset by peer".to_string(),
    }
}

impl Wrapped {
    fn new(inner: Arc<LocalProvider>) -> Self {
        Wrapped {
            inner,
            hide_blake3: false,
            churn: None,
            reads: AtomicUsize::new(0),
            failing_stats: AtomicUsize::new(0),
            failing_writes: AtomicUsize::new(0),
            failing_deletes: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Provider for Wrapped {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn driver(&self) -> Driver {
        Driver::Local
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn preferred_disk_format(&self) -> DiskFormat {
        DiskFormat::Raw
    }
    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        self.inner.operation(id).await
    }
    async fn ensure_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        self.inner.ensure_bucket(service, bucket).await
    }
    async fn list_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        let mut list = self.inner.list_objects(service, bucket).await?;
        if self.hide_blake3 {
            for o in &mut list {
                o.blake3 = None;
            }
        }
        Ok(list)
    }
    async fn stat_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        if fails(&self.failing_stats) {
            return Err(reset(self.name(), key));
        }
        self.inner.stat_object(service, bucket, key).await
    }
    async fn read_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let opened = self.inner.read_object(service, bucket, key).await?;
        if let Some((k, left)) = &self.churn {
            if k != key {
                return Ok(opened);
            }
            let turn = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if let Ok(n) = turn {
                // The open file keeps the old content; the key now names a new version.
                let new = format!("version {n}").into_bytes();
                self.inner
                    .write_object(service, bucket, key, body(new))
                    .await?;
            }
        }
        Ok(opened)
    }
    async fn write_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        mut body: ObjectStream,
    ) -> Result<ObjectInfo, ProviderError> {
        if fails(&self.failing_writes) {
            // Part of the content went before the store gave up: the stream is spent.
            let mut some = [0u8; 100];
            let _ = tokio::io::AsyncReadExt::read(&mut body, &mut some).await;
            return Err(ProviderError::Remote {
                provider: self.name().to_string(),
                object: key.to_string(),
                action: "upload it".to_string(),
                detail: "Swift answered 503 Service Unavailable".to_string(),
            });
        }
        self.inner.write_object(service, bucket, key, body).await
    }
    async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        if fails(&self.failing_deletes) {
            return Err(reset(self.name(), key));
        }
        self.inner.delete_object(service, bucket, key).await
    }
    async fn delete_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        if fails(&self.failing_deletes) {
            return Err(reset(self.name(), bucket));
        }
        self.inner.delete_bucket(service, bucket).await
    }
    fn object_path(&self, _: &str, _: &str, _: &str) -> Result<Option<PathBuf>, ProviderError> {
        Ok(None)
    }
}

#[tokio::test]
async fn without_hashes_in_listings_equal_objects_are_found_by_reading_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 6).await;
    let first = copy(&*a, &*b, &BucketCopyOptions::default()).await.unwrap();
    assert_eq!(first.objects_copied, 6);

    let src = Wrapped {
        hide_blake3: true,
        ..Wrapped::new(a.clone())
    };
    let dst = Wrapped {
        hide_blake3: true,
        ..Wrapped::new(b.clone())
    };
    let report = copy(&src, &dst, &BucketCopyOptions::default())
        .await
        .unwrap();
    assert_eq!((report.objects_copied, report.objects_skipped), (0, 6));
    // Each side was read once to compare, and the manifest reused those hashes.
    assert_eq!(src.reads.load(Ordering::SeqCst), 6);
    assert_eq!(dst.reads.load(Ordering::SeqCst), 6);
    assert_eq!(report.bytes_read, 2 * first.bytes_total);
    assert_eq!(report.manifest_digest, first.manifest_digest);

    // With verification by reading, what was copied is read back; what was compared by
    // reading is not read again.
    b.delete_object("svc", "copy", "top-3").await.unwrap();
    let dst = Wrapped {
        hide_blake3: true,
        ..Wrapped::new(b.clone())
    };
    let options = BucketCopyOptions {
        verify_by_reading: true,
        ..Default::default()
    };
    let report = copy(&src, &dst, &options).await.unwrap();
    assert_eq!((report.objects_copied, report.objects_skipped), (1, 5));
    assert_eq!(dst.reads.load(Ordering::SeqCst), 5 + 1);
}

#[tokio::test]
async fn an_object_changing_during_its_copy_is_copied_again_or_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 4).await;

    let src = Wrapped {
        churn: Some(("top-0".to_string(), AtomicUsize::new(1))),
        ..Wrapped::new(a.clone())
    };
    let report = copy(&src, &*b, &BucketCopyOptions::default())
        .await
        .unwrap();
    assert_eq!(report.recopied, vec!["top-0".to_string()]);
    assert_eq!(report.objects_copied, 4);
    assert_eq!(read_all(&*b, "copy", "top-0").await, b"version 1");

    put(&*a, "data", "a/1", b"differs from the copy".to_vec()).await;
    let src = Wrapped {
        churn: Some(("a/1".to_string(), AtomicUsize::new(usize::MAX))),
        ..Wrapped::new(a.clone())
    };
    let err = copy(&src, &*b, &BucketCopyOptions::default())
        .await
        .unwrap_err();
    match err {
        BucketCopyError::Unstable { keys, report } => {
            assert_eq!(keys, vec!["a/1".to_string()]);
            assert_eq!(report.objects_copied, 0);
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn manifests_differ_by_key_size_and_content() {
    let entry = |size: u64, seed: u8| ManifestEntry {
        size,
        blake3: blake3::hash(&[seed]).to_hex().to_string(),
    };
    let mut a = BucketManifest::default();
    a.entries.insert("x".into(), entry(1, 1));
    a.entries.insert("y".into(), entry(2, 2));
    let mut b = a.clone();
    assert_eq!(a.digest(), b.digest());
    assert!(a.differences(&b).is_empty());
    b.entries.insert("y".into(), entry(2, 3));
    b.entries.insert("z".into(), entry(0, 0));
    b.entries.remove("x");
    assert_ne!(a.digest(), b.digest());
    let d: Vec<String> = a.differences(&b).iter().map(|d| d.to_string()).collect();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0], "`x` is missing at the target");
    assert!(
        d[1].starts_with("`y` differs: 2 bytes with BLAKE3"),
        "{}",
        d[1]
    );
    assert_eq!(d[2], "`z` is only at the target");
    // Moving a byte between key and size must change the digest.
    let mut c = BucketManifest::default();
    c.entries.insert("ab".into(), entry(1, 1));
    let mut e = BucketManifest::default();
    e.entries.insert("a".into(), entry(1, 1));
    assert_ne!(c.digest(), e.digest());
}

#[test]
fn only_plain_md5_entity_tags_are_compared() {
    assert_eq!(
        plain_md5(Some("\"9E107D9D372BB6826BD81D3542A419D6\"")).as_deref(),
        Some("9e107d9d372bb6826bd81d3542a419d6")
    );
    assert_eq!(
        plain_md5(Some("\"9e107d9d372bb6826bd81d3542a419d6-3\"")),
        None
    );
    assert_eq!(plain_md5(Some("abc")), None);
    assert_eq!(plain_md5(None), None);
}

#[tokio::test]
async fn metadata_no_store_could_keep_is_refused_before_any_data_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    a.ensure_bucket("svc", "data").await.unwrap();
    for (meta, words) in [
        (
            ObjectMeta {
                content_type: None,
                user: BTreeMap::from([("Owner".to_string(), "x".to_string())]),
            },
            "only lowercase letters, digits and `-`",
        ),
        (
            ObjectMeta {
                content_type: Some("text/plain\n".to_string()),
                user: BTreeMap::new(),
            },
            "printable ASCII",
        ),
        (
            ObjectMeta {
                content_type: None,
                user: BTreeMap::from([("big".to_string(), "v".repeat(3000))]),
            },
            "at most 2048 are allowed",
        ),
    ] {
        let err = a
            .write_object_with_meta("svc", "data", "k", body(b"x".to_vec()), &meta)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains(words), "{err}");
    }
    assert!(a.list_objects("svc", "data").await.unwrap().is_empty());
}

#[tokio::test]
async fn hashes_from_an_earlier_copy_spare_reading_unchanged_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 6).await;
    // Neither side lists hashes, and the local entity tags are no MD5: without what an
    // earlier copy learned, comparing and verifying means reading.
    let hidden = |p: &Arc<LocalProvider>| Wrapped {
        hide_blake3: true,
        ..Wrapped::new(p.clone())
    };
    let (src, dst) = (hidden(&a), hidden(&b));
    let first = copy(&src, &dst, &BucketCopyOptions::default())
        .await
        .unwrap();
    assert_eq!(first.objects_copied, 6);
    assert_eq!(first.known.len(), 12, "{:?}", first.known);

    let (src, dst) = (hidden(&a), hidden(&b));
    let options = BucketCopyOptions {
        known: first.known.clone(),
        ..Default::default()
    };
    let again = copy(&src, &dst, &options).await.unwrap();
    assert_eq!((again.objects_copied, again.objects_skipped), (0, 6));
    assert_eq!(src.reads.load(Ordering::SeqCst), 0);
    assert_eq!(dst.reads.load(Ordering::SeqCst), 0);
    assert_eq!(again.bytes_read, 0);
    assert_eq!(again.manifest_digest, first.manifest_digest);

    // A changed object is copied (one read), and the hashes of the others still count.
    put(&*a, "data", "a/2", b"a new version".to_vec()).await;
    let (src, dst) = (hidden(&a), hidden(&b));
    let options = BucketCopyOptions {
        known: again.known.clone(),
        ..Default::default()
    };
    let third = copy(&src, &dst, &options).await.unwrap();
    assert_eq!((third.objects_copied, third.objects_skipped), (1, 5));
    assert_eq!(src.reads.load(Ordering::SeqCst), 1);
    assert_eq!(dst.reads.load(Ordering::SeqCst), 0);
    assert_eq!(read_all(&*b, "copy", "a/2").await, b"a new version");
    assert_ne!(third.manifest_digest, first.manifest_digest);

    // Hashes survive a trip through JSON, as between a pre-copy and its sync.
    let json = serde_json::to_string(&third.known).unwrap();
    let back: KnownHashes = serde_json::from_str(&json).unwrap();
    let (src, dst) = (hidden(&a), hidden(&b));
    let options = BucketCopyOptions {
        known: back,
        ..Default::default()
    };
    let fourth = copy(&src, &dst, &options).await.unwrap();
    assert_eq!(fourth.objects_skipped, 6);
    assert_eq!(
        src.reads.load(Ordering::SeqCst) + dst.reads.load(Ordering::SeqCst),
        0
    );
}

/// Regression (fault suite): an upload that failed on the way (a `503` after part of the
/// content went) failed the object and the whole copy step, since the target had consumed
/// the stream; and a lookup reset before the copy failed it too. The copy is now replayed
/// from the source and lookups are made again.
#[tokio::test]
async fn an_object_upload_failing_on_the_way_is_replayed_from_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    let b = local("b", &tmp.path().join("b"));
    fill(&*a, "data", 6).await;
    let src = Wrapped {
        failing_stats: AtomicUsize::new(2),
        ..Wrapped::new(a.clone())
    };
    let dst = Wrapped {
        failing_writes: AtomicUsize::new(3),
        ..Wrapped::new(b.clone())
    };
    let report = copy(&src, &dst, &BucketCopyOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.objects_copied, 6);
    assert_eq!(dst.failing_writes.load(Ordering::SeqCst), 0);
    assert_eq!(src.failing_stats.load(Ordering::SeqCst), 0);
    for key in ["top-0", "a/b/nested-1.bin", "a/2"] {
        assert_eq!(
            read_all(&*b, "copy", key).await,
            read_all(&*a, "data", key).await
        );
    }
}

/// What is not temporary fails at once, without replays.
#[tokio::test]
async fn an_object_failing_for_good_is_not_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    fill(&*a, "data", 1).await;
    let refused = ProviderError::Unreachable {
        provider: "b".into(),
        object: "x".into(),
        endpoint: "http://127.0.0.1:1".into(),
        detail: "error trying to connect: Connection refused (os error 111)".into(),
    };
    assert!(!is_transient(&refused));
    let denied = ProviderError::Denied {
        provider: "b".into(),
        object: "x".into(),
        detail: "403".into(),
    };
    assert!(!is_transient(&denied));
    let timed_out = ProviderError::Unreachable {
        provider: "b".into(),
        object: "x".into(),
        endpoint: "http://127.0.0.1:1".into(),
        detail: "operation timeout reached".into(),
    };
    assert!(!is_transient(&timed_out));
    assert!(is_transient(&reset("b", "x")));
    let mut calls = 0;
    let started = Instant::now();
    let r: Result<(), ProviderError> = retry_transient(OBJECT_ATTEMPTS, None, "Testing", || {
        calls += 1;
        let e = denied.to_string();
        async move {
            Err(ProviderError::Denied {
                provider: "b".into(),
                object: "x".into(),
                detail: e,
            })
        }
    })
    .await;
    assert!(r.is_err());
    assert_eq!(calls, 1);
    assert!(started.elapsed() < Duration::from_millis(50));
}

/// Regression (fault suite): the rollback of a bucket copy deleted the target's objects
/// once each; one reset left objects behind and the relocation ended `failed`.
#[tokio::test]
async fn the_undo_of_a_bucket_copy_deletes_again_after_a_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let a = local("a", &tmp.path().join("a"));
    fill(&*a, "data", 5).await;
    let flaky = Wrapped {
        failing_deletes: AtomicUsize::new(3),
        ..Wrapped::new(a.clone())
    };
    remove_bucket(&flaky, "svc", "data")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(flaky.failing_deletes.load(Ordering::SeqCst), 0);
    let gone = a.list_objects("svc", "data").await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
    // Removing what is gone succeeds.
    remove_bucket(&flaky, "svc", "data").await.unwrap();
}
