//! IO benchmarks: the poller that measures a provider's storage and turns it into
//! [`IoFigures`] for the market snapshot.
//!
//! [`measure`] runs one configured [`BenchmarkSource`] within its timeout:
//!
//! - `builtin` ([`measure_builtin`]) writes a test file in the configured directory with
//!   `O_DIRECT` (buffered IO with `fdatasync` and a page-cache drop where the filesystem
//!   refuses it), reads it back sequentially, then does random 4 KiB reads at queue depth 1.
//!   The test file is removed on every path, including errors, timeouts and cancellation.
//! - `command` ([`measure_command`]) runs a program such as `fio --output-format=json`
//!   without a shell and picks each figure out of its JSON output with an RFC 6901 pointer.
//!
//! Every failure is a [`BenchmarkError`] naming the directory or command and what went wrong.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{BenchmarkKind, BenchmarkMap, BenchmarkSource};
use crate::model::IoFigures;
use crate::sys::process::spawn_in_group;

/// Sequential IO unit of the builtin benchmark.
const BLOCK_BYTES: usize = 1024 * 1024;
/// Random read unit, and the alignment `O_DIRECT` needs for buffers and offsets.
const PAGE_BYTES: usize = 4096;
/// A benchmark command printing more than this on stdout is refused rather than buffered.
const MAX_STDOUT_BYTES: u64 = 16 * 1024 * 1024;
/// How much of a failing command's stderr is kept for the error message.
const STDERR_TAIL_BYTES: usize = 64 * 1024;
const STDERR_TAIL_LINES: usize = 10;

/// Why a benchmark produced no figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchmarkError {
    #[error("benchmark directory {path} is not usable: {source}")]
    Directory { path: PathBuf, source: io::Error },

    #[error("benchmark path {path} is not a directory")]
    NotADirectory { path: PathBuf },

    #[error("cannot {action} benchmark test file {path}: {source}")]
    TestFile {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error(
        "benchmark test file {path} read back different data at byte {offset} than was \
         written; the storage is corrupting data"
    )]
    Corrupt { path: PathBuf, offset: u64 },

    #[error("builtin benchmark in {path} needs {what} of at least 1")]
    InvalidSize { path: PathBuf, what: &'static str },

    #[error("builtin benchmark in {path} did not finish within {}", secs(*timeout))]
    BuiltinTimeout { path: PathBuf, timeout: Duration },

    #[error("builtin benchmark in {path} stopped unexpectedly: {message}")]
    BuiltinAborted { path: PathBuf, message: String },

    #[error("benchmark command is empty")]
    EmptyCommand,

    #[error("benchmark map names no figure; give at least one JSON pointer such as seq_read_mb_s = \"/jobs/0/read/bw_bytes\"")]
    NothingMapped,

    #[error("benchmark command `{command}`: program {program} was not found")]
    CommandNotFound { command: String, program: String },

    #[error("benchmark command `{command}` could not be started: {source}")]
    Spawn { command: String, source: io::Error },

    #[error("benchmark command `{command}`: reading its output failed: {source}")]
    Output { command: String, source: io::Error },

    #[error(
        "benchmark command `{command}` failed ({status}); {}",
        stderr_summary(stderr_tail)
    )]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr_tail: String,
    },

    #[error("benchmark command `{command}` did not finish within {}; it was killed", secs(*timeout))]
    CommandTimeout { command: String, timeout: Duration },

    #[error("benchmark command `{command}` printed more than {limit} bytes on stdout")]
    OutputTooLarge { command: String, limit: u64 },

    #[error("benchmark command `{command}` printed nothing on stdout; expected a JSON document")]
    EmptyOutput { command: String },

    #[error("stdout of benchmark command `{command}` is not JSON: {source}")]
    NotJson {
        command: String,
        /// 1-based line of stdout where parsing failed.
        line: usize,
        /// 1-based column of stdout where parsing failed.
        column: usize,
        source: serde_json::Error,
    },

    #[error(
        "benchmark command `{command}`: {figure} pointer `{pointer}` matches nothing in its output"
    )]
    PointerNotFound {
        command: String,
        figure: Figure,
        pointer: String,
    },

    #[error(
        "benchmark command `{command}`: {figure} pointer `{pointer}` names {found}, not a number"
    )]
    NotANumber {
        command: String,
        figure: Figure,
        pointer: String,
        found: String,
    },

    #[error("benchmark command `{command}`: {figure} pointer `{pointer}` gives {value} after scaling; a figure must be a finite number of at least 0")]
    BadValue {
        command: String,
        figure: Figure,
        pointer: String,
        value: f64,
    },
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn stderr_summary(tail: &str) -> String {
    if tail.trim().is_empty() {
        "its stderr was empty".to_string()
    } else {
        format!("last lines of its stderr:\n{tail}")
    }
}

/// One of the figures in [`IoFigures`], as named in the configuration's `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    SeqWriteMbS,
    SeqReadMbS,
    RandReadIops,
    RandReadLatencySeconds,
}

impl Figure {
    pub fn as_str(self) -> &'static str {
        match self {
            Figure::SeqWriteMbS => "seq_write_mb_s",
            Figure::SeqReadMbS => "seq_read_mb_s",
            Figure::RandReadIops => "rand_read_iops",
            Figure::RandReadLatencySeconds => "rand_read_latency_seconds",
        }
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs the benchmark `source` describes and returns what it measured.
///
/// A `command` benchmark may map only some figures; the others are reported as 0.0,
/// meaning "not measured". A mapped figure that comes out as 0 is logged as a warning,
/// since it usually means the pointer names a job that did no such IO.
pub async fn measure(source: &BenchmarkSource) -> Result<IoFigures, BenchmarkError> {
    match &source.kind {
        BenchmarkKind::Builtin {
            path,
            file_size_mib,
            random_reads,
        } => {
            let run = measure_builtin(path, *file_size_mib, *random_reads, source.timeout).await?;
            tracing::info!(
                path = %path.display(),
                io_mode = run.io_mode.as_str(),
                seq_write_mb_s = run.figures.seq_write_mb_s,
                seq_read_mb_s = run.figures.seq_read_mb_s,
                rand_read_iops = run.figures.rand_read_iops,
                "The builtin IO benchmark in {} finished using {} IO.",
                path.display(),
                run.io_mode.as_str()
            );
            Ok(run.figures)
        }
        BenchmarkKind::Command { command, map } => {
            measure_command(command, map, source.timeout).await
        }
    }
}

/// How the builtin benchmark reached the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: the page cache was bypassed.
    Direct,
    /// The filesystem refused `O_DIRECT` (tmpfs, some FUSE and network filesystems); writes
    /// were flushed with `fdatasync` and the cache dropped with `posix_fadvise` before
    /// reading, which the kernel may honour only in part.
    Buffered,
}

impl IoMode {
    pub fn as_str(self) -> &'static str {
        match self {
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        }
    }
}

/// The outcome of one builtin benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinRun {
    pub figures: IoFigures,
    pub io_mode: IoMode,
    pub bytes_written: u64,
    pub random_reads: u64,
}

/// Runs the builtin benchmark in directory `dir` on a blocking thread.
///
/// If `timeout` passes, or the returned future is dropped, the blocking work stops at its
/// next block or read and removes its test file.
pub async fn measure_builtin(
    dir: &Path,
    file_size_mib: u64,
    random_reads: u64,
    timeout: Duration,
) -> Result<BuiltinRun, BenchmarkError> {
    run_builtin(
        Plan {
            dir: dir.to_path_buf(),
            file_size_mib,
            random_reads,
            seed: fastrand::u64(..),
            allow_direct: true,
        },
        timeout,
    )
    .await
}

struct Plan {
    dir: PathBuf,
    file_size_mib: u64,
    random_reads: u64,
    seed: u64,
    /// Tests turn this off to exercise the buffered path on filesystems that accept O_DIRECT.
    allow_direct: bool,
}

/// Raises the cancel flag when dropped, so a dropped or timed-out future stops the
/// blocking work instead of leaving it writing in the background.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_builtin(plan: Plan, timeout: Duration) -> Result<BuiltinRun, BenchmarkError> {
    let dir = plan.dir.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let flag = cancel.clone();
    let task = tokio::task::spawn_blocking(move || builtin_blocking(&plan, &flag));
    match tokio::time::timeout(timeout, task).await {
        Err(_) => Err(BenchmarkError::BuiltinTimeout { path: dir, timeout }),
        Ok(Err(join)) => Err(BenchmarkError::BuiltinAborted {
            path: dir,
            message: join.to_string(),
        }),
        Ok(Ok(result)) => result,
    }
}

/// The test file; removed when dropped, so every exit path cleans up.
struct TestFile {
    path: PathBuf,
}

impl Drop for TestFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                "Could not remove the benchmark test file {}: {e}.",
                self.path.display()
            ),
        }
    }
}

/// A zeroed buffer whose usable part starts on a page boundary, as `O_DIRECT` requires.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + PAGE_BYTES];
        // `align_offset` may in theory give up (usize::MAX); the clamp keeps the slice in
        // bounds, and an unaligned buffer then only makes O_DIRECT fail, which falls back.
        let start = storage.as_ptr().align_offset(PAGE_BYTES).min(PAGE_BYTES);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Fills `buf` with the content of the file at `offset` (a page multiple). Every page
/// has its own pseudo-random content, so the data is neither zeros (which some
/// filesystems store as holes) nor repeated (which deduplicating ones store once), and
/// any page can be checked on its own after a random read.
fn fill_expected(seed: u64, offset: u64, buf: &mut [u8]) {
    let first_page = offset / PAGE_BYTES as u64;
    for (i, page) in buf.chunks_mut(PAGE_BYTES).enumerate() {
        let page_no = first_page + i as u64;
        let mut rng = fastrand::Rng::with_seed(seed ^ page_no.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.fill(page);
    }
}

enum Stop {
    Cancelled,
    Failed(BenchmarkError),
}

impl From<BenchmarkError> for Stop {
    fn from(e: BenchmarkError) -> Self {
        Stop::Failed(e)
    }
}

fn builtin_blocking(plan: &Plan, cancel: &AtomicBool) -> Result<BuiltinRun, BenchmarkError> {
    match builtin_steps(plan, cancel) {
        Ok(run) => Ok(run),
        Err(Stop::Failed(e)) => Err(e),
        // The caller has already reported the timeout; this value is never seen.
        Err(Stop::Cancelled) => Err(BenchmarkError::BuiltinAborted {
            path: plan.dir.clone(),
            message: "cancelled".to_string(),
        }),
    }
}

fn builtin_steps(plan: &Plan, cancel: &AtomicBool) -> Result<BuiltinRun, Stop> {
    let dir = &plan.dir;
    if plan.file_size_mib == 0 {
        return Err(BenchmarkError::InvalidSize {
            path: dir.clone(),
            what: "file_size_mib",
        }
        .into());
    }
    if plan.random_reads == 0 {
        return Err(BenchmarkError::InvalidSize {
            path: dir.clone(),
            what: "random_reads",
        }
        .into());
    }
    let meta = std::fs::metadata(dir).map_err(|source| BenchmarkError::Directory {
        path: dir.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(BenchmarkError::NotADirectory { path: dir.clone() }.into());
    }

    let test_file = TestFile {
        path: dir.join(format!(
            ".fluidcloud-iobench-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        )),
    };
    let path = &test_file.path;
    let blocks = plan.file_size_mib;
    let file_bytes = blocks * BLOCK_BYTES as u64;
    let mut block = AlignedBuf::new(BLOCK_BYTES);
    let mut expected = vec![0u8; BLOCK_BYTES];

    let (file, io_mode) = if plan.allow_direct {
        match open_test_file(path, true) {
            Ok(f) => (f, IoMode::Direct),
            Err(e) if refuses_direct(&e) => (open_buffered(path)?, IoMode::Buffered),
            Err(e) => return Err(open_error(path, e).into()),
        }
    } else {
        (open_buffered(path)?, IoMode::Buffered)
    };

    // Sequential write. Some filesystems accept O_DIRECT at open and refuse it on the
    // first write; that case falls back to buffered IO and starts over.
    let (file, io_mode, write_secs) = match write_pass(&file, plan, &mut block, cancel, path) {
        Ok(secs) => (file, io_mode, secs),
        Err(Stop::Failed(BenchmarkError::TestFile { source, .. }))
            if io_mode == IoMode::Direct && refuses_direct(&source) =>
        {
            drop(file);
            let file = open_buffered(path)?;
            let secs = write_pass(&file, plan, &mut block, cancel, path)?;
            (file, IoMode::Buffered, secs)
        }
        Err(e) => return Err(e),
    };

    // Sequential read, checking every byte against what was written.
    drop_cache(&file, io_mode, path);
    let mut read_secs = 0.0;
    for i in 0..blocks {
        check_cancel(cancel)?;
        let offset = i * BLOCK_BYTES as u64;
        let started = Instant::now();
        file.read_exact_at(block.as_mut_slice(), offset)
            .map_err(|e| io_error("read", path, e))?;
        read_secs += started.elapsed().as_secs_f64();
        fill_expected(plan.seed, offset, &mut expected);
        if let Some(at) = first_difference(block.as_slice(), &expected) {
            return Err(BenchmarkError::Corrupt {
                path: path.clone(),
                offset: offset + at as u64,
            }
            .into());
        }
    }

    // Random page reads at queue depth 1; the page cache was filled by the sequential
    // pass when IO is buffered, so drop it again.
    drop_cache(&file, io_mode, path);
    let pages = file_bytes / PAGE_BYTES as u64;
    let mut rng = fastrand::Rng::with_seed(plan.seed.rotate_left(17));
    let mut page = AlignedBuf::new(PAGE_BYTES);
    let mut expected_page = vec![0u8; PAGE_BYTES];
    let mut random_secs = 0.0;
    for _ in 0..plan.random_reads {
        check_cancel(cancel)?;
        let offset = rng.u64(0..pages) * PAGE_BYTES as u64;
        let started = Instant::now();
        file.read_exact_at(page.as_mut_slice(), offset)
            .map_err(|e| io_error("read", path, e))?;
        random_secs += started.elapsed().as_secs_f64();
        fill_expected(plan.seed, offset, &mut expected_page);
        if let Some(at) = first_difference(page.as_slice(), &expected_page) {
            return Err(BenchmarkError::Corrupt {
                path: path.clone(),
                offset: offset + at as u64,
            }
            .into());
        }
    }
    drop(file);
    drop(test_file);

    // A clock too coarse to see an operation must not turn into an infinite rate.
    let floor = |s: f64| s.max(1e-9);
    let mb = file_bytes as f64 / 1e6;
    let reads = plan.random_reads as f64;
    Ok(BuiltinRun {
        figures: IoFigures {
            seq_write_mb_s: mb / floor(write_secs),
            seq_read_mb_s: mb / floor(read_secs),
            rand_read_iops: reads / floor(random_secs),
            rand_read_latency_seconds: random_secs / reads,
            measured_at: Utc::now(),
        },
        io_mode,
        bytes_written: file_bytes,
        random_reads: plan.random_reads,
    })
}

/// Writes the whole file and flushes it to the device; returns the seconds spent in IO
/// (filling the buffers is not counted).
fn write_pass(
    file: &File,
    plan: &Plan,
    block: &mut AlignedBuf,
    cancel: &AtomicBool,
    path: &Path,
) -> Result<f64, Stop> {
    let mut secs = 0.0;
    for i in 0..plan.file_size_mib {
        check_cancel(cancel)?;
        let offset = i * BLOCK_BYTES as u64;
        fill_expected(plan.seed, offset, block.as_mut_slice());
        let started = Instant::now();
        file.write_all_at(block.as_slice(), offset)
            .map_err(|e| io_error("write", path, e))?;
        secs += started.elapsed().as_secs_f64();
    }
    // Even with O_DIRECT the data may sit in the device's volatile cache and the size
    // change in the journal; the write is done when it is durable.
    let started = Instant::now();
    file.sync_data().map_err(|e| io_error("flush", path, e))?;
    Ok(secs + started.elapsed().as_secs_f64())
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), Stop> {
    if cancel.load(Ordering::Relaxed) {
        Err(Stop::Cancelled)
    } else {
        Ok(())
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> BenchmarkError {
    BenchmarkError::TestFile {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn open_error(path: &Path, source: io::Error) -> BenchmarkError {
    io_error("create", path, source)
}

/// EINVAL is how Linux says a filesystem (or a buffer alignment it dislikes) does not do
/// direct IO.
fn refuses_direct(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

fn open_test_file(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    if direct {
        options.create_new(true).custom_flags(libc::O_DIRECT);
    } else {
        // A refused O_DIRECT open may already have created the file, so this one
        // may not insist on creating it.
        options.create(true).truncate(true);
    }
    options.open(path)
}

fn open_buffered(path: &Path) -> Result<File, Stop> {
    open_test_file(path, false).map_err(|e| open_error(path, e).into())
}

/// Asks the kernel to drop the file's cached pages so buffered reads reach the storage.
fn drop_cache(file: &File, mode: IoMode, path: &Path) {
    if mode == IoMode::Direct {
        return;
    }
    if let Err(e) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!(
            path = %path.display(),
            "posix_fadvise(DONTNEED) on {} failed: {}; buffered reads may be served from memory.",
            path.display(),
            io::Error::from(e)
        );
    }
}

/// Runs a benchmark program and maps its JSON output to figures.
///
/// Figures the map does not name are 0.0 ("not measured"); a map naming none is an error.
pub async fn measure_command(
    command: &[String],
    map: &BenchmarkMap,
    timeout: Duration,
) -> Result<IoFigures, BenchmarkError> {
    let mapped = mapped_figures(map);
    if mapped.is_empty() {
        return Err(BenchmarkError::NothingMapped);
    }
    let shown = show_command(command);
    let stdout = run_command(command, &shown, timeout).await?;
    let doc = parse_output(&shown, &stdout)?;
    let mut figures = IoFigures {
        seq_write_mb_s: 0.0,
        seq_read_mb_s: 0.0,
        rand_read_iops: 0.0,
        rand_read_latency_seconds: 0.0,
        measured_at: Utc::now(),
    };
    for (figure, pointer) in mapped {
        let scale = match figure {
            Figure::SeqWriteMbS | Figure::SeqReadMbS => map.bandwidth_scale,
            Figure::RandReadLatencySeconds => map.latency_scale,
            Figure::RandReadIops => 1.0,
        };
        let value = pick(&shown, &doc, figure, pointer, scale)?;
        if value == 0.0 {
            tracing::warn!(
                command = %shown,
                figure = figure.as_str(),
                pointer,
                "Benchmark figure {figure} from {pointer} is zero; the pointer may name a job that does no such IO."
            );
        }
        match figure {
            Figure::SeqWriteMbS => figures.seq_write_mb_s = value,
            Figure::SeqReadMbS => figures.seq_read_mb_s = value,
            Figure::RandReadIops => figures.rand_read_iops = value,
            Figure::RandReadLatencySeconds => figures.rand_read_latency_seconds = value,
        }
    }
    Ok(figures)
}

fn mapped_figures(map: &BenchmarkMap) -> Vec<(Figure, &str)> {
    [
        (Figure::SeqWriteMbS, &map.seq_write_mb_s),
        (Figure::SeqReadMbS, &map.seq_read_mb_s),
        (Figure::RandReadIops, &map.rand_read_iops),
        (
            Figure::RandReadLatencySeconds,
            &map.rand_read_latency_seconds,
        ),
    ]
    .into_iter()
    .filter_map(|(f, p)| p.as_deref().map(|p| (f, p)))
    .collect()
}

/// The command as a person would type it, for messages.
fn show_command(command: &[String]) -> String {
    command
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run_command(
    command: &[String],
    shown: &str,
    timeout: Duration,
) -> Result<Vec<u8>, BenchmarkError> {
    let (program, args) = command.split_first().ok_or(BenchmarkError::EmptyCommand)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // In a group of its own, so that helpers it started (fio's workers, a shell's
    // children) do not outlive a timeout: the guard kills the group unless it was reaped.
    let (mut child, mut group) = spawn_in_group(&mut cmd).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            BenchmarkError::CommandNotFound {
                command: shown.to_string(),
                program: program.clone(),
            }
        } else {
            BenchmarkError::Spawn {
                command: shown.to_string(),
                source,
            }
        }
    })?;
    let output_error = |source| BenchmarkError::Output {
        command: shown.to_string(),
        source,
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(output_error(io::Error::other(
            "stdout or stderr was not captured",
        )));
    };

    let run = async {
        let out = async {
            let mut buf = Vec::new();
            stdout
                .take(MAX_STDOUT_BYTES + 1)
                .read_to_end(&mut buf)
                .await
                .map_err(output_error)?;
            if buf.len() as u64 > MAX_STDOUT_BYTES {
                return Err(BenchmarkError::OutputTooLarge {
                    command: shown.to_string(),
                    limit: MAX_STDOUT_BYTES,
                });
            }
            Ok(buf)
        };
        let err = async { read_tail(stderr).await.map_err(output_error) };
        let status = async { child.wait().await.map_err(output_error) };
        tokio::try_join!(out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(timeout, run).await {
        Err(_) => {
            return Err(BenchmarkError::CommandTimeout {
                command: shown.to_string(),
                timeout,
            })
        }
        Ok(result) => result?,
    };
    // The leader has been reaped; its id may be reused, so the group is no longer ours
    // to kill.
    group.reaped();
    if !status.success() {
        return Err(BenchmarkError::CommandFailed {
            command: shown.to_string(),
            status,
            stderr_tail: last_lines(&err, STDERR_TAIL_LINES),
        });
    }
    Ok(out)
}

/// Reads a stream to its end, keeping only its last [`STDERR_TAIL_BYTES`].
async fn read_tail(mut r: impl AsyncRead + Unpin) -> io::Result<String> {
    let mut kept: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > 2 * STDERR_TAIL_BYTES {
            kept.drain(..kept.len() - STDERR_TAIL_BYTES);
        }
    }
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn parse_output(shown: &str, stdout: &[u8]) -> Result<Value, BenchmarkError> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Err(BenchmarkError::EmptyOutput {
            command: shown.to_string(),
        });
    }
    serde_json::from_slice(stdout).map_err(|source| BenchmarkError::NotJson {
        command: shown.to_string(),
        line: source.line(),
        column: source.column(),
        source,
    })
}

fn pick(
    shown: &str,
    doc: &Value,
    figure: Figure,
    pointer: &str,
    scale: f64,
) -> Result<f64, BenchmarkError> {
    let value = doc
        .pointer(pointer)
        .ok_or_else(|| BenchmarkError::PointerNotFound {
            command: shown.to_string(),
            figure,
            pointer: pointer.to_string(),
        })?;
    let raw = value.as_f64().ok_or_else(|| BenchmarkError::NotANumber {
        command: shown.to_string(),
        figure,
        pointer: pointer.to_string(),
        found: describe(value),
    })?;
    let scaled = raw * scale;
    if !(scaled.is_finite() && scaled >= 0.0) {
        return Err(BenchmarkError::BadValue {
            command: shown.to_string(),
            figure,
            pointer: pointer.to_string(),
            value: scaled,
        });
    }
    Ok(scaled)
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if short.len() < s.len() { "…" } else { "" };
            format!("the string \"{short}{more}\"")
        }
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

#[cfg(test)]
mod tests;
