//! The viaduct against the paper's `dd | nc`, `cp --sparse=always` and `rsync --sparse` on
//! one sparse raw image, in one run, plus the bytes a re-sync sends after 1% of the blocks
//! changed, and the final pass of a pre-copy relocation (the share of the cutover downtime
//! the viaduct accounts for).
//!
//! `cargo bench --bench viaduct -- [--dir DIR] [--size-gib N] [--allocated-gib N]
//! [--streams N] [--repeat N] [--only METHOD[,METHOD...]] [--compression-level N]`. The
//! image and every copy live in a temporary directory under DIR (default: the system
//! temporary directory) that is removed at the end.
//!
//! Every method copies the same image with a warm page cache, `--repeat` times (default 3,
//! interleaved, each round starting with another method), and the best time counts: on a
//! small shared machine one method's run can be slowed severalfold by other work. Before
//! every run of every method, alike: a scratch file as large as the image's data is written
//! and deleted (see `prime`), everything dirty is flushed, and the source image's data is
//! read once (see `pre_read`), so every method starts from the same cache state: the source
//! in the page cache, nothing of the copies. Caches are not dropped: that needs root and
//! would hit everything else running on a shared machine. "seconds" runs until the method
//! reports completion (for the viaduct: the receiver checked the image digest and renamed
//! the file); "+flush" adds an fsync of the copy, so the disk's write speed shows.
//!
//! The cutover figure: the image is pre-copied into a staging file with `copy_local` in
//! place, 1% of its 1 MiB chunks are rewritten, and the final pass (read the whole source,
//! compare every chunk with the previous pass's manifest, write and read back what changed,
//! compare image digests) is timed; best of `--repeat` rounds, each with another 1% changed.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fluidcloud::viaduct::{
    copy_local, image_digest, send_file, serve, ChunkManifest, Endpoint, LocalCopyOptions,
    PresharedKey, ReceiverOptions, SendOptions,
};

#[path = "common/mod.rs"]
mod common;
use clap::Parser;
use common::{at_least_one, build_image, fill_random, free_port, XorShift, MIB};

/// The viaduct against `dd | nc`, `cp --sparse=always` and `rsync --sparse`.
#[derive(Parser, Debug)]
#[command(name = "viaduct", bin_name = "cargo bench --bench viaduct --")]
struct Args {
    /// Where the image and the copies live (a temporary directory under it).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// The image's size.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// How much of the image holds data (above zero, at most --size-gib).
    #[arg(long, default_value_t = 1.5)]
    allocated_gib: f64,
    /// The viaduct's parallel streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Runs of each method; the best counts.
    #[arg(long, default_value_t = 3, value_parser = at_least_one::<usize>)]
    repeat: usize,
    /// Only these methods, comma-separated.
    #[arg(long, value_name = "METHOD[,METHOD...]")]
    only: Option<String>,
    /// The viaduct's zstd level.
    #[arg(long = "compression-level", default_value_t = 1)]
    level: i32,
    #[command(flatten)]
    cargo: common::CargoBench,
}

impl Args {
    /// The checks across arguments that clap cannot make.
    fn checked(self) -> Args {
        if self.allocated_gib <= 0.0 || self.allocated_gib > self.size_gib as f64 {
            common::invalid::<Args>("--allocated-gib must be above zero and at most --size-gib");
        }
        self
    }
}

fn sync_file(path: &Path) -> Duration {
    let t = Instant::now();
    if let Err(e) = File::open(path).and_then(|f| f.sync_all()) {
        eprintln!("cannot flush {}: {e}", path.display());
    }
    t.elapsed()
}

/// Flushes everything written so far, so one method's write-back does not slow the next.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Writes and deletes a scratch file of `bytes`. On this kind of virtual machine, writing
/// into memory the guest has not touched lately costs several times more than into memory
/// it just freed; priming before every run gives every method the same start.
fn prime(dir: &Path, bytes: u64) {
    let path = dir.join("prime.tmp");
    if let Ok(f) = File::create(&path) {
        let buf = vec![1u8; MIB as usize];
        let mut off = 0;
        while off < bytes && f.write_all_at(&buf, off).is_ok() {
            off += MIB;
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads the data of the image at `path` once (holes are skipped), so that every method
/// starts with the source in the page cache.
fn pre_read(path: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(path) else { return };
    let len = f.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; 256 << 10];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (mut at, end) = (data as u64, (hole.max(data) as u64).min(len));
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            match f.read_at(&mut buf[..n], at) {
                Ok(0) | Err(_) => return,
                Ok(k) => at += k as u64,
            }
        }
        pos = end.max(pos + 1);
    }
}

/// CPU seconds used so far by this process (all threads) and its waited-for children.
fn cpu_seconds() -> f64 {
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage fills the zeroed struct we pass and nothing else.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            total += tv(ru.ru_utime) + tv(ru.ru_stime);
        }
    }
    total
}

fn run_shell(cmd: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run `{cmd}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{cmd}` failed: {status}"));
    }
    Ok(t.elapsed())
}

/// The paper's method: a listening `nc` writes what a piped `dd` sends.
fn dd_nc(img: &Path, out: &Path) -> Result<Duration, String> {
    let port = free_port();
    let out_file = File::create(out).map_err(|e| e.to_string())?;
    let mut listener = Command::new("nc")
        .args(["-l", "-p", &port.to_string()])
        .stdout(out_file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nc: {e}"))?;
    // Wait for the listener without connecting to it (it accepts only once).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !port_listening(port) {
        if Instant::now() > deadline {
            let _ = listener.kill();
            return Err("nc did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let sender = format!(
        "dd if={} bs=1M 2>/dev/null | nc -q0 127.0.0.1 {port}",
        img.display()
    );
    let status = Command::new("sh")
        .arg("-c")
        .arg(&sender)
        .status()
        .map_err(|e| e.to_string())?;
    let received = listener.wait().map_err(|e| e.to_string())?;
    let elapsed = t.elapsed();
    if !status.success() || !received.success() {
        return Err(format!(
            "dd | nc failed: sender {status}, receiver {received}"
        ));
    }
    Ok(elapsed)
}

fn port_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| t.lines().any(|l| l.contains(&hex) && l.contains(" 0A ")))
        .unwrap_or(false)
}

struct Row {
    method: String,
    seconds: f64,
    /// User and system CPU seconds of every process and thread involved.
    cpu: f64,
    flush: f64,
    note: String,
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn main() {
    let args = Args::parse().checked();
    if let Err(e) = run(&args) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let work = tempfile::Builder::new()
        .prefix("viaduct-bench.")
        .tempdir_in(&args.dir)
        .map_err(|e| {
            format!(
                "cannot create a directory under {}: {e}",
                args.dir.display()
            )
        })?;
    let img = work.path().join("image.raw");
    let size = args.size_gib << 30;
    let allocated = (args.allocated_gib * (1u64 << 30) as f64) as u64;
    eprintln!(
        "Building a {} image with {} allocated in {} ...",
        gib(size),
        gib(allocated),
        work.path().display()
    );
    build_image(&img, size, allocated, 0x9e37_79b9_7f4a_7c15)
        .map_err(|e| format!("cannot build the image: {e}"))?;
    let img_alloc = std::fs::metadata(&img).map_err(|e| e.to_string())?.blocks() * 512;
    let chunk = fluidcloud::viaduct::DEFAULT_CHUNK_SIZE;
    let source_digest = image_digest(&img, chunk).map_err(|e| e.to_string())?;
    let check = |out: &Path| -> Result<String, String> {
        let d = image_digest(out, chunk).map_err(|e| e.to_string())?;
        if d != source_digest {
            return Err(format!("{} differs from the image", out.display()));
        }
        let alloc = std::fs::metadata(out).map_err(|e| e.to_string())?.blocks() * 512;
        Ok(format!("copy allocates {}", gib(alloc)))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let root = work.path().join("received");
    std::fs::create_dir(&root).map_err(|e| e.to_string())?;
    let key = PresharedKey::random();
    let send_opts = SendOptions {
        streams: args.streams,
        compression_level: args.level,
        ..SendOptions::default()
    };
    let (addr, stop) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener
            .local_addr()
            .map_err(|e| e.to_string())?
            .to_string();
        let mut opts = ReceiverOptions::new(&root, key.clone());
        // Flushing is timed separately for every method alike.
        opts.fsync = false;
        let stop = opts.shutdown.clone();
        tokio::spawn(serve(listener, opts));
        Ok::<_, String>((addr, stop))
    })?;
    let endpoint = Endpoint::new(addr, key);

    let endpoint = &endpoint;
    let received = root.join("image.raw");
    let methods = [
        "viaduct",
        "copy_local",
        "cp --sparse=always",
        "rsync --sparse",
        "dd | nc",
    ];
    let mut best: Vec<Option<Row>> = methods.iter().map(|_| None).collect();
    for round in 1..=args.repeat {
        // Each round starts with a different method, so none always runs first.
        let order = (0..methods.len()).map(|k| (k + round - 1) % methods.len());
        for i in order {
            let method = &methods[i];
            if args
                .only
                .as_deref()
                .is_some_and(|o| !o.split(',').any(|o| method.starts_with(o.trim())))
            {
                continue;
            }
            if *method == "viaduct" {
                // Its previous copy is the one to replace; free that memory first too.
                let _ = std::fs::remove_file(&received);
            }
            prime(work.path(), img_alloc);
            settle();
            pre_read(&img);
            eprintln!("round {round}: {method} ...");
            let cpu0 = cpu_seconds();
            let row = match *method {
                "viaduct" => {
                    let report = runtime
                        .block_on(send_file(&img, endpoint, "image.raw", &send_opts, &|_| {}))
                        .map_err(|e| format!("viaduct: {e}"))?;
                    let cpu = cpu_seconds() - cpu0;
                    Row {
                        cpu,
                        method: format!("viaduct over TCP loopback, {} streams", report.streams),
                        seconds: report.duration.as_secs_f64(),
                        flush: sync_file(&received).as_secs_f64(),
                        note: format!(
                            "{}; read {}, sent {}",
                            check(&received)?,
                            gib(report.bytes_read),
                            gib(report.bytes_sent)
                        ),
                    }
                }
                "copy_local" => {
                    let out = work.path().join("local.raw");
                    let local = copy_local(
                        &img,
                        &out,
                        &LocalCopyOptions {
                            fsync: false,
                            ..LocalCopyOptions::default()
                        },
                    )
                    .map_err(|e| format!("copy_local: {e}"))?;
                    let cpu = cpu_seconds() - cpu0;
                    let row = Row {
                        cpu,
                        method: "viaduct copy_local (local fast path)".into(),
                        seconds: local.duration.as_secs_f64(),
                        flush: sync_file(&out).as_secs_f64(),
                        note: check(&out)?,
                    };
                    let _ = std::fs::remove_file(&out);
                    row
                }
                "dd | nc" => {
                    let out = work.path().join("nc.raw");
                    let seconds = dd_nc(&img, &out)?;
                    let cpu = cpu_seconds() - cpu0;
                    let row = Row {
                        cpu,
                        method: "dd bs=1M | nc (the paper)".into(),
                        seconds: seconds.as_secs_f64(),
                        flush: sync_file(&out).as_secs_f64(),
                        note: check(&out)?,
                    };
                    let _ = std::fs::remove_file(&out);
                    row
                }
                tool => {
                    let out = work.path().join("copy.raw");
                    let seconds =
                        run_shell(&format!("{tool} {} {}", img.display(), out.display()))?;
                    let cpu = cpu_seconds() - cpu0;
                    let row = Row {
                        cpu,
                        method: tool.to_string(),
                        seconds: seconds.as_secs_f64(),
                        flush: sync_file(&out).as_secs_f64(),
                        note: check(&out)?,
                    };
                    let _ = std::fs::remove_file(&out);
                    row
                }
            };
            eprintln!(
                "  {:.2} s (+{:.2} s flush), {:.2} CPU s",
                row.seconds, row.flush, row.cpu
            );
            if best[i].as_ref().is_none_or(|b| row.seconds < b.seconds) {
                best[i] = Some(row);
            }
        }
    }
    let viaduct_ran = best[0].is_some();
    let rows: Vec<Row> = best.into_iter().flatten().collect();
    let resync = if viaduct_ran {
        Some(resync(
            &img, size, &runtime, endpoint, &send_opts, &received, chunk,
        )?)
    } else {
        None
    };
    stop.cancel();
    drop(runtime);
    let cutover = if args
        .only
        .as_deref()
        .is_none_or(|o| o.split(',').any(|o| "cutover".starts_with(o.trim())))
    {
        Some(cutover(&img, work.path(), size, img_alloc, args.repeat)?)
    } else {
        None
    };

    let base = rows.first().map_or(1.0, |r| r.seconds);
    println!();
    println!(
        "Image: {} raw, {} allocated (random, text, allocated zeros), page cache warm.",
        gib(size),
        gib(img_alloc)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Best of {} interleaved rounds on {} CPUs; load average at the end: {}.",
        args.repeat,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "The viaduct checks every chunk's BLAKE3 at the receiver and the image digest before the \
         rename; copy_local reads every chunk back and compares."
    );
    println!(
        "{:<44} {:>7} {:>10} {:>8} {:>6}  notes",
        "method", "seconds", "vs viaduct", "+flush", "CPU s"
    );
    for r in &rows {
        println!(
            "{:<44} {:>7.2} {:>9.2}x {:>8.2} {:>6.2}  {}",
            r.method,
            r.seconds,
            r.seconds / base,
            r.seconds + r.flush,
            r.cpu,
            r.note
        );
    }
    if let Some(line) = resync {
        println!();
        println!("{line}");
    }
    if let Some(c) = cutover {
        let full = rows
            .iter()
            .find(|r| r.method.contains("copy_local"))
            .map(|r| r.seconds);
        println!();
        println!(
            "Final delta (cutover share): {:.2} s (+{:.2} s flush), {:.2} CPU s, after {} of {} \
             1 MiB chunks (1%) changed since the pre-copy ({:.2} s); wrote {} chunks, read {}, \
             staging file verified: {}.{}",
            c.seconds,
            c.flush,
            c.cpu,
            c.changed,
            c.chunks,
            c.precopy,
            c.written,
            gib(c.read),
            if c.verified { "yes" } else { "NO" },
            full.map_or(String::new(), |f| format!(
                " A full copy_local of the image takes {f:.2} s."
            ))
        );
    }
    drop(work);
    Ok(())
}

/// Rewrites 1% of the image's 1 MiB blocks with new random data, sends the image again to
/// the receiver that holds the previous version, and describes what travelled.
fn resync(
    img: &Path,
    size: u64,
    runtime: &tokio::runtime::Runtime,
    endpoint: &Endpoint,
    send_opts: &SendOptions,
    received: &Path,
    chunk: u32,
) -> Result<String, String> {
    // Re-sync: rewrite 1% of the image's 1 MiB blocks with new random data.
    let blocks = size / MIB;
    let changed = (blocks / 100).max(1);
    let mut rng = XorShift(0x5151_2026);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        picked.insert(rng.below(blocks));
    }
    {
        let f = File::options()
            .write(true)
            .open(img)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; MIB as usize];
        for b in &picked {
            fill_random(&mut buf, 1_000_000 + b);
            f.write_all_at(&buf, b * MIB).map_err(|e| e.to_string())?;
        }
    }
    settle();
    eprintln!("viaduct re-sync ...");
    let resync = runtime
        .block_on(send_file(img, endpoint, "image.raw", send_opts, &|_| {}))
        .map_err(|e| format!("viaduct re-sync: {e}"))?;
    let verified = image_digest(received, chunk).map_err(|e| e.to_string())? == resync.digest;
    Ok(format!(
        "Re-sync after {changed} of {blocks} 1 MiB blocks (1%) changed: sent {} bytes = {:.2}% of the image, {} chunks of {}, {:.2} s, target verified: {}.",
        resync.bytes_sent,
        resync.bytes_sent as f64 * 100.0 / size as f64,
        resync.chunks_sent,
        resync.chunks_total,
        resync.duration.as_secs_f64(),
        if verified { "yes" } else { "NO" }
    ))
}

/// Rewrites `count` distinct 1 MiB blocks of the image, picked with `seed`, with new random
/// data.
fn change_blocks(img: &Path, size: u64, count: u64, seed: u64) -> Result<(), String> {
    let blocks = size / MIB;
    let mut rng = XorShift(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count.min(blocks) {
        picked.insert(rng.below(blocks));
    }
    let f = File::options()
        .write(true)
        .open(img)
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MIB as usize];
    for b in &picked {
        fill_random(&mut buf, seed.wrapping_mul(31).wrapping_add(*b));
        f.write_all_at(&buf, b * MIB).map_err(|e| e.to_string())?;
    }
    Ok(())
}

struct Cutover {
    seconds: f64,
    flush: f64,
    cpu: f64,
    precopy: f64,
    changed: u64,
    chunks: u64,
    written: u64,
    read: u64,
    verified: bool,
}

/// Pre-copies the image into a staging file in place, then, `repeat` times, changes 1% of
/// its chunks and times the final pass against the previous pass's manifest.
fn cutover(
    img: &Path,
    dir: &Path,
    size: u64,
    img_alloc: u64,
    repeat: usize,
) -> Result<Cutover, String> {
    let staging = dir.join("staging.raw");
    let opts = |base| LocalCopyOptions {
        in_place: true,
        fsync: false,
        base,
        ..LocalCopyOptions::default()
    };
    prime(dir, img_alloc);
    settle();
    pre_read(img);
    eprintln!("cutover: pre-copy ...");
    let pre = copy_local(img, &staging, &opts(None)).map_err(|e| format!("pre-copy: {e}"))?;
    sync_file(&staging);
    let manifest_path = ChunkManifest::path_for(&staging);
    pre.manifest
        .save(&manifest_path)
        .map_err(|e| e.to_string())?;
    let changed = (pre.chunks_total / 100).max(1);
    let mut best: Option<Cutover> = None;
    for round in 1..=repeat {
        change_blocks(img, size, changed, 0xc0ff_ee00 + round as u64)?;
        let base = ChunkManifest::load(&manifest_path).map_err(|e| e.to_string())?;
        prime(dir, img_alloc);
        settle();
        pre_read(img);
        eprintln!("round {round}: final delta ...");
        let cpu0 = cpu_seconds();
        let delta = copy_local(img, &staging, &opts(Some(base)))
            .map_err(|e| format!("final delta: {e}"))?;
        let cpu = cpu_seconds() - cpu0;
        let flush = sync_file(&staging).as_secs_f64();
        delta
            .manifest
            .save(&manifest_path)
            .map_err(|e| e.to_string())?;
        let verified = image_digest(&staging, delta.chunk_size).map_err(|e| e.to_string())?
            == image_digest(img, delta.chunk_size).map_err(|e| e.to_string())?;
        eprintln!(
            "  {:.2} s (+{flush:.2} s flush), {cpu:.2} CPU s, {} chunks written",
            delta.duration.as_secs_f64(),
            delta.chunks_sent
        );
        let row = Cutover {
            seconds: delta.duration.as_secs_f64(),
            flush,
            cpu,
            precopy: pre.duration.as_secs_f64(),
            changed,
            chunks: delta.chunks_total,
            written: delta.chunks_sent,
            read: delta.bytes_read,
            verified,
        };
        if !verified {
            return Err("the staging file differs from the image after the final pass".into());
        }
        if best.as_ref().is_none_or(|b| row.seconds < b.seconds) {
            best = Some(row);
        }
    }
    best.ok_or_else(|| "no cutover round ran".to_string())
}
