//! The viaduct over real TCP on loopback: sparse round trips, re-sync, resume after a cut
//! connection, wrong keys, tampering on the way, names escaping the root, the rate cap, and
//! the local fast path with its incremental in-place passes.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fluidcloud::viaduct::{
    copy_local, image_digest, send_file, serve, ChunkManifest, Endpoint, LocalCopyOptions, Phase,
    PresharedKey, Progress, ReceiverOptions, ResumedFrom, SendOptions, TransferReport,
    ViaductError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A receiver on a free loopback port, writing under its own temporary root.
struct Receiver {
    addr: String,
    root: tempfile::TempDir,
    key: PresharedKey,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ViaductError>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let root = tempfile::tempdir().unwrap();
        let key = PresharedKey::random();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut opts = ReceiverOptions::new(root.path(), key.clone());
        opts.io_timeout = Duration::from_secs(15);
        opts.busy_wait = Duration::from_secs(5);
        let stop = opts.shutdown.clone();
        let task = tokio::spawn(serve(listener, opts));
        Receiver {
            addr,
            root,
            key,
            stop,
            task,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr.clone(), self.key.clone())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the receiver stops when asked")
            .unwrap()
            .unwrap();
    }
}

fn opts(chunk_size: u64, streams: usize) -> SendOptions {
    SendOptions {
        chunk_size: chunk_size as u32,
        streams,
        io_timeout: Duration::from_secs(15),
        ..SendOptions::default()
    }
}

fn no_progress(_: Progress) {}

/// Deterministic incompressible bytes.
fn random_bytes(seed: &str, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// Compressible, text-like bytes.
fn text_bytes(len: u64) -> Vec<u8> {
    let words = [
        "cloud", "provider", "volume", "image", "relocate", "broker", "policy", "viaduct",
    ];
    let mut out = Vec::with_capacity(len as usize);
    let mut i = 0usize;
    while out.len() < len as usize {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        out.push(if i.is_multiple_of(11) { b'\n' } else { b' ' });
        i += 1;
    }
    out.truncate(len as usize);
    out
}

/// A sparse image of `len` bytes with the given regions written (the rest are holes).
fn make_image(path: &Path, len: u64, regions: &[(u64, Vec<u8>)]) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (offset, bytes) in regions {
        f.write_all_at(bytes, *offset).unwrap();
    }
    f.sync_all().unwrap();
}

fn same_content(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// What a proxy between sender and receiver does to the bytes going to the receiver.
#[derive(Clone, Copy)]
enum Mischief {
    /// Closes both sides once this many bytes went through.
    CutAfter(u64),
    /// Inverts the byte at this position.
    Flip(u64),
}

/// A TCP proxy to `target` that applies `mischief` to every connection it carries.
async fn proxy(target: String, mischief: Mischief) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut passed = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    match mischief {
                        Mischief::CutAfter(limit) => {
                            let room = (limit - passed) as usize;
                            if room < chunk.len() {
                                let _ = sw.write_all(&chunk[..room]).await;
                                back.abort();
                                return;
                            }
                        }
                        Mischief::Flip(at) => {
                            if (passed..passed + n as u64).contains(&at) {
                                chunk[(at - passed) as usize] ^= 0xff;
                            }
                        }
                    }
                    passed += n as u64;
                    if sw.write_all(chunk).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
                let _ = back.await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_image_round_trip_keeps_holes_and_content() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let len = 24 * MIB + 12_345;
    make_image(
        &src,
        len,
        &[
            (0, random_bytes("a", 2 * MIB)),
            (6 * MIB + 3 * KIB, text_bytes(3 * MIB)),
            (12 * MIB, vec![0u8; 2 * MIB as usize]),
            (len - 100_000, random_bytes("b", 100_000)),
        ],
    );
    let progress_calls = std::sync::atomic::AtomicUsize::new(0);
    // Compress whatever shrinks, however fast loopback is.
    let o = SendOptions {
        adaptive_compression: false,
        ..opts(256 * KIB, 3)
    };
    let report = send_file(
        &src,
        &rx.endpoint(),
        "vm-1/disk.raw",
        &o,
        &|_p: Progress| {
            progress_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
    )
    .await
    .unwrap();
    let dst = rx.path("vm-1/disk.raw");
    assert!(
        same_content(&src, &dst),
        "the target differs from the source"
    );
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), len);
    assert_eq!(report.digest, image_digest(&src, 256 * KIB as u32).unwrap());
    assert_eq!(report.digest, image_digest(&dst, 256 * KIB as u32).unwrap());
    assert!(!rx.path("vm-1/disk.raw.partial").exists());
    // About 5.1 MiB of the image hold data; the allocated zeros must not be copied.
    let allocated = allocated_bytes(&dst);
    assert!(allocated < 6 * MIB, "target allocates {allocated} bytes");
    assert!(report.chunks_skipped_zero >= 60, "{report:?}");
    assert_eq!(report.streams, 3);
    assert_eq!(report.resumed_from, ResumedFrom::None);
    // The text compresses; random data does not, so the wire carries less than was read.
    assert!(
        report.bytes_sent < report.bytes_read - 2 * MIB,
        "{report:?}"
    );
    assert!(
        report.bytes_read < 8 * MIB,
        "holes are not read: {report:?}"
    );
    assert!(progress_calls.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_after_one_percent_changed_sends_only_those_chunks() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let len = 32 * MIB;
    make_image(&src, len, &[(0, random_bytes("base", len))]);
    let o = opts(64 * KIB, 4);
    let first = send_file(&src, &rx.endpoint(), "disk.raw", &o, &no_progress)
        .await
        .unwrap();
    assert_eq!(first.chunks_sent, 512);
    // Change 5 of 512 chunks (about 1%), a few KiB in each.
    let f = File::options().write(true).open(&src).unwrap();
    for (i, chunk) in [3u64, 100, 257, 400, 511].iter().enumerate() {
        f.write_all_at(
            &random_bytes(&format!("change{i}"), 5000),
            chunk * 64 * KIB + 1000,
        )
        .unwrap();
    }
    drop(f);
    let second = send_file(&src, &rx.endpoint(), "disk.raw", &o, &no_progress)
        .await
        .unwrap();
    assert_eq!(second.resumed_from, ResumedFrom::Target);
    assert_eq!(second.chunks_sent, 5, "{second:?}");
    assert_eq!(second.chunks_skipped_equal, 507);
    let share = second.bytes_sent as f64 / len as f64;
    assert!(
        share <= 0.012,
        "re-sync sent {:.3}% of the image",
        share * 100.0
    );
    assert!(same_content(&src, &rx.path("disk.raw")));
    assert_ne!(first.digest, second.digest);
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_became_zero_are_cleared_in_the_target() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    make_image(&src, 4 * MIB, &[(0, random_bytes("x", 4 * MIB))]);
    let o = opts(64 * KIB, 2);
    send_file(&src, &rx.endpoint(), "d", &o, &no_progress)
        .await
        .unwrap();
    // Discard the second MiB, as a guest's TRIM would.
    let f = File::options().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; MIB as usize], MIB).unwrap();
    drop(f);
    let again = send_file(&src, &rx.endpoint(), "d", &o, &no_progress)
        .await
        .unwrap();
    assert_eq!(again.chunks_sent, 0, "{again:?}");
    assert_eq!(again.chunks_skipped_zero, 16);
    assert!(again.bytes_sent < 16 * KIB, "{again:?}");
    assert!(same_content(&src, &rx.path("d")));
    assert!(allocated_bytes(&rx.path("d")) <= 3 * MIB + 64 * KIB);
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_where_it_stopped() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let len = 16 * MIB;
    make_image(&src, len, &[(0, random_bytes("resume", len))]);
    let o = opts(64 * KIB, 1);
    let cutting = proxy(rx.addr.clone(), Mischief::CutAfter(8 * MIB)).await;
    let through_proxy = Endpoint::new(cutting.clone(), rx.key.clone());
    let err = send_file(&src, &through_proxy, "disk.raw", &o, &no_progress)
        .await
        .unwrap_err();
    match &err {
        ViaductError::ConnectionDropped { peer, .. } => assert_eq!(peer, &cutting),
        other => panic!("expected a dropped connection, got {other}"),
    }
    assert!(
        !rx.path("disk.raw").exists(),
        "nothing under the final name"
    );
    assert!(rx.path("disk.raw.partial").exists());

    let resumed = send_file(&src, &rx.endpoint(), "disk.raw", &o, &no_progress)
        .await
        .unwrap();
    assert_eq!(resumed.resumed_from, ResumedFrom::Partial);
    // A full transfer of this random image puts at least its length on the wire.
    assert!(
        resumed.bytes_sent < len * 6 / 10,
        "the resume sent {} of {len} bytes",
        resumed.bytes_sent
    );
    assert!(resumed.chunks_skipped_equal >= 100, "{resumed:?}");
    assert!(same_content(&src, &rx.path("disk.raw")));
    assert!(!rx.path("disk.raw.partial").exists());
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_and_nothing_is_written() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    make_image(&src, MIB, &[(0, random_bytes("k", MIB))]);
    let wrong = Endpoint::new(rx.addr.clone(), PresharedKey::random());
    let err = send_file(&src, &wrong, "disk.raw", &opts(64 * KIB, 2), &no_progress)
        .await
        .unwrap_err();
    match &err {
        ViaductError::WrongKey { peer, detail } => {
            assert_eq!(peer, &rx.addr);
            assert!(detail.contains("pre-shared keys differ"), "{detail}");
        }
        other => panic!("expected a key error, got {other}"),
    }
    let entries: Vec<_> = std::fs::read_dir(rx.root.path()).unwrap().collect();
    assert!(entries.is_empty(), "the receiver wrote {entries:?}");
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_is_detected_and_the_old_target_stays() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.raw");
    let new = dir.path().join("new.raw");
    make_image(&old, 4 * MIB, &[(0, random_bytes("old", 4 * MIB))]);
    make_image(&new, 4 * MIB, &[(0, random_bytes("new", 4 * MIB))]);
    let o = opts(64 * KIB, 1);
    send_file(&old, &rx.endpoint(), "disk.raw", &o, &no_progress)
        .await
        .unwrap();

    let flip_at = MIB + 1000;
    let flipping = proxy(rx.addr.clone(), Mischief::Flip(flip_at)).await;
    let err = send_file(
        &new,
        &Endpoint::new(flipping, rx.key.clone()),
        "disk.raw",
        &o,
        &no_progress,
    )
    .await
    .unwrap_err();
    match &err {
        ViaductError::Tampered { offset, detail, .. } => {
            // One stream, chunks in order: the flipped byte sits in the chunk at or just
            // before its position in the stream (frame headers shift it a little).
            let chunk = 64 * KIB;
            assert_eq!(offset % chunk, 0);
            assert!(
                *offset == flip_at / chunk * chunk || *offset + chunk == flip_at / chunk * chunk,
                "offset {offset}"
            );
            assert!(detail.contains(&format!("offset {offset}")), "{detail}");
        }
        other => panic!("expected tampering to be detected, got {other}"),
    }
    assert!(
        same_content(&old, &rx.path("disk.raw")),
        "the old target must stay untouched"
    );
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_escaping_the_root_are_refused() {
    let rx = Receiver::start().await;
    let outside = tempfile::tempdir().unwrap();
    let src = outside.path().join("disk.raw");
    make_image(&src, MIB, &[(0, random_bytes("n", 4096))]);
    let o = opts(64 * KIB, 1);
    for name in ["../escape.raw", "/etc/escape.raw"] {
        let err = send_file(&src, &rx.endpoint(), name, &o, &no_progress)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ViaductError::NameRefused { .. }),
            "{name}: {err}"
        );
    }
    // A link inside the root that leads out of it: only the receiver can tell.
    std::os::unix::fs::symlink(outside.path(), rx.path("out")).unwrap();
    let err = send_file(&src, &rx.endpoint(), "out/disk2.raw", &o, &no_progress)
        .await
        .unwrap_err();
    match &err {
        ViaductError::NameRefused { peer, detail, .. } => {
            assert_eq!(peer, &rx.addr);
            assert!(detail.contains("leads out of the root"), "{detail}");
        }
        other => panic!("expected the name to be refused, got {other}"),
    }
    assert!(!outside.path().join("disk2.raw").exists());
    assert!(!outside.path().join("disk2.raw.partial").exists());
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_cap_is_honoured() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    make_image(&src, 6 * MIB, &[(0, random_bytes("rate", 6 * MIB))]);
    let mut o = opts(64 * KIB, 3);
    o.max_bytes_per_sec = Some(2 * MIB);
    let report = send_file(&src, &rx.endpoint(), "disk.raw", &o, &no_progress)
        .await
        .unwrap();
    // 6 MiB at 2 MiB/s with a quarter second of head start: 2.75 s; leave room.
    assert!(
        report.duration >= Duration::from_secs_f64(2.2),
        "took {:?}",
        report.duration
    );
    assert!(same_content(&src, &rx.path("disk.raw")));
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_gets_compressed_chunks() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("logs.raw");
    make_image(&src, 16 * MIB, &[(0, text_bytes(16 * MIB))]);
    let mut o = opts(256 * KIB, 2);
    o.max_bytes_per_sec = Some(4 * MIB);
    let report = send_file(&src, &rx.endpoint(), "logs.raw", &o, &no_progress)
        .await
        .unwrap();
    // While the bucket's first quarter second lasts nothing waits and chunks rightly go
    // raw; after that the cap makes the wire slower than the compressor and they shrink.
    assert!(report.bytes_sent < 16 * MIB * 4 / 10, "{report:?}");
    assert!(same_content(&src, &rx.path("logs.raw")));
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_source_and_refused_connection_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.raw");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let ep = Endpoint::new(closed.clone(), PresharedKey::random());
    let err = send_file(&missing, &ep, "x", &opts(64 * KIB, 1), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ViaductError::SourceMissing { .. }), "{err}");
    assert!(err.to_string().contains("nope.raw"));

    let src = dir.path().join("disk.raw");
    make_image(&src, MIB, &[]);
    let err = send_file(&src, &ep, "x", &opts(64 * KIB, 1), &no_progress)
        .await
        .unwrap_err();
    match &err {
        ViaductError::Connect { peer, source } => {
            assert_eq!(peer, &closed);
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a refused connection, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_tiny_images_travel() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("empty", 0u64), ("tiny", 5)] {
        let src = dir.path().join(name);
        make_image(&src, len, &[(0, b"hello"[..len as usize].to_vec())]);
        let r = send_file(&src, &rx.endpoint(), name, &opts(64 * KIB, 4), &no_progress)
            .await
            .unwrap();
        assert_eq!(r.streams, 1, "one chunk at most: one stream");
        assert!(same_content(&src, &rx.path(name)));
    }
    rx.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_run_side_by_side() {
    let (a, b) = (Receiver::start().await, Receiver::start().await);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    make_image(&src, 3 * MIB, &[(MIB, text_bytes(MIB))]);
    let o = opts(64 * KIB, 2);
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let (ra, rb) = tokio::join!(
        send_file(&src, &ea, "d", &o, &no_progress),
        send_file(&src, &eb, "d", &o, &no_progress)
    );
    assert_eq!(ra.unwrap().digest, rb.unwrap().digest);
    assert!(same_content(&src, &a.path("d")) && same_content(&src, &b.path("d")));
    a.stop().await;
    b.stop().await;
}

#[test]
fn local_copy_keeps_holes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let dst = dir.path().join("copy.raw");
    let len = 20 * MIB + 777;
    make_image(
        &src,
        len,
        &[
            (MIB, random_bytes("l", 2 * MIB)),
            (8 * MIB, vec![0u8; 4 * MIB as usize]),
            (15 * MIB + 5, text_bytes(MIB)),
        ],
    );
    std::fs::write(&dst, b"an older version").unwrap();
    let report = copy_local(&src, &dst, &LocalCopyOptions::default()).unwrap();
    assert!(same_content(&src, &dst));
    assert_eq!(report.digest, image_digest(&src, 1 << 20).unwrap());
    assert!(allocated_bytes(&dst) < 4 * MIB, "{}", allocated_bytes(&dst));
    assert_eq!(report.chunks_total, 21);
    assert!(report.chunks_skipped_zero >= 15, "{report:?}");
    assert!(!dir.path().join("copy.raw.partial").exists());

    let err = copy_local(
        &dir.path().join("missing"),
        &dst,
        &LocalCopyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ViaductError::SourceMissing { .. }), "{err}");
    assert!(
        same_content(&src, &dst),
        "a failed copy leaves the target alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_running_transfer_and_keeps_the_partial() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    make_image(&src, 8 * MIB, &[(0, random_bytes("s", 8 * MIB))]);
    let mut o = opts(64 * KIB, 2);
    o.max_bytes_per_sec = Some(2 * MIB);
    let ep = rx.endpoint();
    let stop = rx.stop.clone();
    let sending =
        tokio::spawn(async move { send_file(&src, &ep, "disk.raw", &o, &no_progress).await });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.cancel();
    let err = sending.await.unwrap().unwrap_err();
    assert!(
        matches!(err, ViaductError::ConnectionDropped { .. }),
        "{err}"
    );
    assert!(!rx.path("disk.raw").exists());
    assert!(rx.path("disk.raw.partial").exists());
    rx.stop().await;
}

/// A 16 MiB image in 64 KiB chunks (256 of them): random data and text in the first half,
/// holes and a run of allocated zeros in the second.
fn staging_source(dir: &Path) -> PathBuf {
    let src = dir.join("volume.raw");
    make_image(
        &src,
        16 * MIB,
        &[
            (0, random_bytes("volume", 5 * MIB)),
            (5 * MIB, text_bytes(3 * MIB)),
            (10 * MIB, vec![0u8; MIB as usize]),
        ],
    );
    src
}

fn in_place(base: Option<ChunkManifest>) -> LocalCopyOptions {
    LocalCopyOptions {
        chunk_size: (64 * KIB) as u32,
        in_place: true,
        base,
        ..LocalCopyOptions::default()
    }
}

/// Overwrites the 64 KiB chunks at `indices` of `path` with new random data.
fn change_chunks(path: &Path, indices: &[u64], seed: &str) {
    let f = File::options().write(true).open(path).unwrap();
    for i in indices {
        f.write_all_at(&random_bytes(&format!("{seed}{i}"), 64 * KIB), i * 64 * KIB)
            .unwrap();
    }
}

fn assert_equal_images(src: &Path, dst: &Path, report: &TransferReport) {
    assert!(same_content(src, dst), "the staging file differs");
    let digest = image_digest(src, (64 * KIB) as u32).unwrap();
    assert_eq!(report.digest, digest);
    assert_eq!(image_digest(dst, (64 * KIB) as u32).unwrap(), digest);
    assert_eq!(report.manifest.image_digest(), digest);
}

#[test]
fn second_pass_after_one_percent_changed_writes_only_those_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let first = copy_local(&src, &dst, &in_place(None)).unwrap();
    assert_eq!(first.resumed_from, ResumedFrom::None);
    assert_eq!(first.chunks_sent, 128, "8 MiB of data in 64 KiB chunks");
    assert!(!dir.path().join("staging.raw.partial").exists());
    assert_equal_images(&src, &dst, &first);

    // 1% of 256 chunks, rounded up: three in the data, one in a hole.
    let changed = [3u64, 77, 120, 200];
    change_chunks(&src, &changed, "pass two");
    let manifest_path = ChunkManifest::path_for(&dst);
    first.manifest.save(&manifest_path).unwrap();
    let base = ChunkManifest::load(&manifest_path).unwrap();
    let second = copy_local(&src, &dst, &in_place(Some(base))).unwrap();
    assert_eq!(second.resumed_from, ResumedFrom::Target);
    assert_eq!(second.chunks_sent, 4);
    assert_eq!(second.bytes_sent, 4 * 64 * KIB);
    assert_eq!(second.chunks_skipped_equal, 128 - 3);
    assert_eq!(second.chunks_skipped_zero, 256 - 128 - 1);
    assert_eq!(
        first.manifest.changed_chunks(&second.manifest),
        Some(changed.to_vec())
    );
    assert_equal_images(&src, &dst, &second);
}

#[test]
fn a_chunk_turned_to_zeros_becomes_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let first = copy_local(&src, &dst, &in_place(None)).unwrap();
    let before = allocated_bytes(&dst);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0u8; 64 * KIB as usize], 64 * KIB)
        .unwrap();
    let second = copy_local(&src, &dst, &in_place(Some(first.manifest))).unwrap();
    assert_eq!((second.chunks_sent, second.bytes_sent), (0, 0));
    assert_equal_images(&src, &dst, &second);
    assert_eq!(
        before - allocated_bytes(&dst),
        64 * KIB,
        "the chunk's blocks are freed"
    );
}

#[test]
fn a_crash_between_passes_still_ends_equal() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let first = copy_local(&src, &dst, &in_place(None)).unwrap();
    // A second pass wrote a chunk the source has since changed back, then died before it
    // could save its manifest: the staging file no longer matches the first manifest there,
    // while the source does. Trusting that manifest would keep the stray chunk.
    File::options()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&random_bytes("stray", 64 * KIB), 2 * 64 * KIB)
        .unwrap();
    change_chunks(&src, &[90], "after the crash");
    let resumed = copy_local(&src, &dst, &in_place(Some(first.manifest.clone()))).unwrap();
    assert_eq!(
        resumed.resumed_from,
        ResumedFrom::Partial,
        "the file was hashed"
    );
    assert_eq!(
        resumed.chunks_sent, 2,
        "the stray chunk and the changed one"
    );
    assert_equal_images(&src, &dst, &resumed);

    // Without any base, an existing staging file is hashed too.
    change_chunks(&src, &[91], "no base");
    let again = copy_local(&src, &dst, &in_place(None)).unwrap();
    assert_eq!(again.resumed_from, ResumedFrom::Partial);
    assert_eq!(again.chunks_sent, 1);
    assert_equal_images(&src, &dst, &again);

    // A manifest older than the last pass is not trusted either.
    let stale = copy_local(&src, &dst, &in_place(Some(first.manifest))).unwrap();
    assert_eq!(stale.resumed_from, ResumedFrom::Partial);
    assert_eq!(stale.chunks_sent, 0);
    assert_equal_images(&src, &dst, &stale);
}

#[test]
fn full_verification_and_resizing_between_passes() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let first = copy_local(&src, &dst, &in_place(None)).unwrap();
    // The volume grew by half a chunk and its old last chunk got data.
    let f = File::options().write(true).open(&src).unwrap();
    f.set_len(16 * MIB + 32 * KIB).unwrap();
    f.write_all_at(b"grown", 16 * MIB - 10).unwrap();
    let opts = LocalCopyOptions {
        verify_all: true,
        ..in_place(Some(first.manifest))
    };
    let second = copy_local(&src, &dst, &opts).unwrap();
    assert_eq!(second.resumed_from, ResumedFrom::Target);
    assert_eq!(second.chunks_total, 257);
    assert_eq!(second.chunks_sent, 1);
    assert_equal_images(&src, &dst, &second);
}

#[test]
fn progress_is_reported_and_cancellation_stops_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = seen.clone();
    let opts = LocalCopyOptions {
        progress: Some(Arc::new(move |p: &Progress| {
            sink.lock().unwrap().push(p.clone())
        })),
        ..in_place(None)
    };
    copy_local(&src, &dst, &opts).unwrap();
    let seen = seen.lock().unwrap();
    let last = seen.last().unwrap();
    assert_eq!((last.phase, last.chunks_done), (Phase::Verifying, 256));
    assert_eq!(last.bytes_sent, 8 * MIB);
    assert!(seen.iter().any(|p| p.phase == Phase::Transferring));

    let cancel = Arc::new(AtomicBool::new(true));
    let err = copy_local(
        &src,
        &dir.path().join("other.raw"),
        &LocalCopyOptions {
            cancel: Some(cancel.clone()),
            ..LocalCopyOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ViaductError::Cancelled), "{err}");
    assert!(!dir.path().join("other.raw").exists());
    assert!(!dir.path().join("other.raw.partial").exists());
    let err = copy_local(
        &src,
        &dst,
        &LocalCopyOptions {
            cancel: Some(cancel),
            ..in_place(None)
        },
    )
    .unwrap_err();
    assert!(matches!(err, ViaductError::Cancelled), "{err}");
    assert!(same_content(&src, &dst), "a cancelled pass wrote nothing");
}

#[test]
fn a_base_must_fit_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = staging_source(dir.path());
    let dst = dir.path().join("staging.raw");
    let first = copy_local(&src, &dst, &in_place(None)).unwrap();
    let not_in_place = LocalCopyOptions {
        in_place: false,
        ..in_place(Some(first.manifest.clone()))
    };
    let err = copy_local(&src, &dst, &not_in_place).unwrap_err();
    assert!(err.to_string().contains("in_place"), "{err}");
    let other_chunks = LocalCopyOptions {
        chunk_size: (128 * KIB) as u32,
        ..in_place(Some(first.manifest.clone()))
    };
    let err = copy_local(&src, &dst, &other_chunks).unwrap_err();
    assert!(err.to_string().contains("65536"), "{err}");
    let mut broken = first.manifest;
    broken.digests.pop();
    let err = copy_local(&src, &dst, &in_place(Some(broken))).unwrap_err();
    assert!(err.to_string().contains("inconsistent"), "{err}");
}
