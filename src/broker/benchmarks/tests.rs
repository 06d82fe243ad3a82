use super::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{BenchmarkKind, BenchmarkMap, BenchmarkSource};

fn source(kind: BenchmarkKind, timeout: Duration) -> BenchmarkSource {
    BenchmarkSource {
        schedule: "0 0 * * * *".to_string(),
        max_age: Duration::from_secs(86_400),
        timeout,
        kind,
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read temp dir")
        .map(|e| e.expect("dir entry").path())
        .collect()
}

fn assert_sane(f: &IoFigures) {
    for (name, v) in [
        ("seq_write_mb_s", f.seq_write_mb_s),
        ("seq_read_mb_s", f.seq_read_mb_s),
        ("rand_read_iops", f.rand_read_iops),
        ("rand_read_latency_seconds", f.rand_read_latency_seconds),
    ] {
        assert!(v.is_finite() && v > 0.0, "{name} = {v}");
    }
    // At queue depth 1 the rate is the inverse of the mean latency.
    let product = f.rand_read_iops * f.rand_read_latency_seconds;
    assert!((product - 1.0).abs() < 1e-6, "iops × latency = {product}");
}

#[tokio::test]
async fn builtin_measures_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = source(
        BenchmarkKind::Builtin {
            path: dir.path().to_path_buf(),
            file_size_mib: 4,
            random_reads: 200,
        },
        Duration::from_secs(60),
    );
    let figures = measure(&src).await.expect("benchmark runs");
    assert_sane(&figures);
    assert!(
        entries(dir.path()).is_empty(),
        "left behind: {:?}",
        entries(dir.path())
    );
}

#[tokio::test]
async fn builtin_reports_what_it_did() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = measure_builtin(dir.path(), 3, 50, Duration::from_secs(60))
        .await
        .expect("benchmark runs");
    assert_eq!(run.bytes_written, 3 * 1024 * 1024);
    assert_eq!(run.random_reads, 50);
    assert_sane(&run.figures);
}

#[tokio::test]
async fn builtin_buffered_path_works_and_cleans_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_builtin(
        Plan {
            dir: dir.path().to_path_buf(),
            file_size_mib: 2,
            random_reads: 100,
            seed: 42,
            allow_direct: false,
        },
        Duration::from_secs(60),
    )
    .await
    .expect("buffered benchmark runs");
    assert_eq!(run.io_mode, IoMode::Buffered);
    assert_sane(&run.figures);
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn builtin_on_tmpfs_runs_in_some_mode() {
    // tmpfs refused O_DIRECT before Linux 6.6; either way the benchmark must work there.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("temp dir on tmpfs");
    let run = measure_builtin(dir.path(), 2, 100, Duration::from_secs(60))
        .await
        .expect("benchmark runs on tmpfs");
    assert_sane(&run.figures);
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn builtin_missing_directory_names_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-dir");
    let err = measure_builtin(&missing, 1, 10, Duration::from_secs(10))
        .await
        .expect_err("missing directory must fail");
    assert!(matches!(err, BenchmarkError::Directory { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
}

#[tokio::test]
async fn builtin_file_instead_of_directory_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    let err = measure_builtin(&file, 1, 10, Duration::from_secs(10))
        .await
        .expect_err("a file is not a directory");
    assert!(
        matches!(err, BenchmarkError::NotADirectory { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn builtin_timeout_returns_promptly_and_removes_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let err = measure_builtin(dir.path(), 256, 100_000, Duration::from_millis(5))
        .await
        .expect_err("5 ms cannot be enough");
    assert!(
        matches!(err, BenchmarkError::BuiltinTimeout { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The blocking thread notices the cancel flag at its next block and cleans up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !entries(dir.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "test file not removed: {:?}",
            entries(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn expected_content_is_random_and_page_addressable() {
    let mut block = vec![0u8; 2 * PAGE_BYTES];
    fill_expected(7, 0, &mut block);
    assert!(block.iter().filter(|&&b| b == 0).count() < block.len() / 64);
    assert_ne!(
        block[..PAGE_BYTES],
        block[PAGE_BYTES..],
        "pages must differ"
    );
    let mut second = vec![0u8; PAGE_BYTES];
    fill_expected(7, PAGE_BYTES as u64, &mut second);
    assert_eq!(
        second,
        block[PAGE_BYTES..],
        "a page must be reproducible on its own"
    );
    let mut other_seed = vec![0u8; PAGE_BYTES];
    fill_expected(8, 0, &mut other_seed);
    assert_ne!(other_seed, block[..PAGE_BYTES]);
}

// ---- command benchmarks ----

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/broker/benchmarks/testdata/fio-3.33-seq-rand.json")
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into(), "sh".into()]
}

fn fio_map() -> BenchmarkMap {
    BenchmarkMap {
        seq_write_mb_s: Some("/jobs/0/write/bw_bytes".into()),
        seq_read_mb_s: Some("/jobs/1/read/bw_bytes".into()),
        rand_read_iops: Some("/jobs/2/read/iops".into()),
        rand_read_latency_seconds: Some("/jobs/2/read/lat_ns/mean".into()),
        bandwidth_scale: 1e-6,
        latency_scale: 1e-9,
    }
}

fn only_read_map(pointer: &str) -> BenchmarkMap {
    BenchmarkMap {
        seq_write_mb_s: None,
        seq_read_mb_s: Some(pointer.into()),
        rand_read_iops: None,
        rand_read_latency_seconds: None,
        bandwidth_scale: 1.0,
        latency_scale: 1.0,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[tokio::test]
async fn fio_json_maps_with_scales() {
    let mut command = sh("cat \"$1\"");
    command.push(fixture().display().to_string());
    let src = source(
        BenchmarkKind::Command {
            command,
            map: fio_map(),
        },
        Duration::from_secs(10),
    );
    let f = measure(&src).await.expect("fio fixture maps");
    // Values as fio 3.33 printed them for a 16 MiB direct-IO run.
    assert!(close(f.seq_write_mb_s, 1677.7216), "{}", f.seq_write_mb_s);
    assert!(close(f.seq_read_mb_s, 1677.7216), "{}", f.seq_read_mb_s);
    assert!(
        close(f.rand_read_iops, 10131.434283),
        "{}",
        f.rand_read_iops
    );
    assert!(
        close(f.rand_read_latency_seconds, 97114.323188e-9),
        "{}",
        f.rand_read_latency_seconds
    );
}

#[tokio::test]
async fn fio_kib_bandwidth_scale() {
    // fio's `bw` is KiB/s; 0.001024 turns it into MB/s.
    let mut command = sh("cat \"$1\"");
    command.push(fixture().display().to_string());
    let mut map = only_read_map("/jobs/1/read/bw");
    map.bandwidth_scale = 0.001024;
    let f = measure_command(&command, &map, Duration::from_secs(10))
        .await
        .expect("maps");
    assert!(
        close(f.seq_read_mb_s, 1638400.0 * 0.001024),
        "{}",
        f.seq_read_mb_s
    );
    assert_eq!(
        f.seq_write_mb_s, 0.0,
        "unmapped figures are 0 (not measured)"
    );
    assert_eq!(f.rand_read_iops, 0.0);
    assert_eq!(f.rand_read_latency_seconds, 0.0);
}

async fn run_err(command: Vec<String>, map: BenchmarkMap, timeout: Duration) -> BenchmarkError {
    measure_command(&command, &map, timeout)
        .await
        .expect_err("must fail")
}

#[tokio::test]
async fn command_not_found() {
    let err = run_err(
        vec!["/nonexistent/fluidcloud-bench-tool".into(), "--json".into()],
        only_read_map("/a"),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(err, BenchmarkError::CommandNotFound { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("/nonexistent/fluidcloud-bench-tool was not found"),
        "{err}"
    );
}

#[tokio::test]
async fn non_zero_exit_shows_last_stderr_lines() {
    let script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo line$i >&2; done; exit 3";
    let err = run_err(sh(script), only_read_map("/a"), Duration::from_secs(5)).await;
    let msg = err.to_string();
    assert!(
        matches!(err, BenchmarkError::CommandFailed { .. }),
        "{err:?}"
    );
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("line12") && msg.contains("line3"), "{msg}");
    assert!(
        !msg.contains("line2\n"),
        "only the last lines are kept: {msg}"
    );
}

#[tokio::test]
async fn timeout_kills_the_command_and_its_children() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("pid");
    let mut command = sh("sleep 30 & echo $! > \"$1\"; wait");
    command.push(pid_file.display().to_string());
    let started = Instant::now();
    let err = run_err(command, only_read_map("/a"), Duration::from_millis(500)).await;
    let took = started.elapsed();
    assert!(
        matches!(err, BenchmarkError::CommandTimeout { .. }),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(3), "returned after {took:?}");

    let pid = std::fs::read_to_string(&pid_file).expect("pid written");
    let stat = PathBuf::from(format!("/proc/{}/stat", pid.trim()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone, or a zombie waiting for its new parent to reap it.
        match std::fs::read_to_string(&stat) {
            Err(_) => break,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
            {
                break
            }
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "sleep {pid} outlived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stdout_not_json_says_where() {
    let err = run_err(
        sh("printf '{\\n  \"a\": 1,\\n  oops\\n}\\n'"),
        only_read_map("/a"),
        Duration::from_secs(5),
    )
    .await;
    match &err {
        BenchmarkError::NotJson { line, column, .. } => {
            assert_eq!((*line, *column), (3, 3), "{err}");
        }
        other => panic!("expected NotJson, got {other:?}"),
    }
    assert!(err.to_string().contains("line 3 column 3"), "{err}");
}

#[tokio::test]
async fn empty_stdout_is_its_own_error() {
    let err = run_err(sh("true"), only_read_map("/a"), Duration::from_secs(5)).await;
    assert!(matches!(err, BenchmarkError::EmptyOutput { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_pointer_names_figure_and_pointer() {
    let mut command = sh("cat \"$1\"");
    command.push(fixture().display().to_string());
    let mut map = fio_map();
    map.rand_read_iops = Some("/jobs/7/read/iops".into());
    let err = run_err(command, map, Duration::from_secs(5)).await;
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            BenchmarkError::PointerNotFound {
                figure: Figure::RandReadIops,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        msg.contains("rand_read_iops") && msg.contains("/jobs/7/read/iops"),
        "{msg}"
    );
}

#[tokio::test]
async fn non_numeric_value_is_refused() {
    let mut command = sh("cat \"$1\"");
    command.push(fixture().display().to_string());
    let err = run_err(
        command,
        only_read_map("/jobs/0/jobname"),
        Duration::from_secs(5),
    )
    .await;
    assert!(matches!(err, BenchmarkError::NotANumber { .. }), "{err:?}");
    assert!(err.to_string().contains("the string \"seqwrite\""), "{err}");
}

#[tokio::test]
async fn negative_value_is_refused() {
    let err = run_err(
        sh("echo '{\"bw\": -5}'"),
        only_read_map("/bw"),
        Duration::from_secs(5),
    )
    .await;
    match err {
        BenchmarkError::BadValue { value, figure, .. } => {
            assert_eq!(value, -5.0);
            assert_eq!(figure, Figure::SeqReadMbS);
        }
        other => panic!("expected BadValue, got {other:?}"),
    }
}

#[tokio::test]
async fn overflowing_value_is_refused() {
    // 1e308 × 1e10 is infinite: a scale must not smuggle a non-finite figure in.
    let mut map = only_read_map("/bw");
    map.bandwidth_scale = 1e10;
    let err = run_err(sh("echo '{\"bw\": 1e308}'"), map, Duration::from_secs(5)).await;
    assert!(matches!(err, BenchmarkError::BadValue { .. }), "{err:?}");
}

#[tokio::test]
async fn nothing_mapped_is_an_error() {
    let map = BenchmarkMap {
        seq_write_mb_s: None,
        seq_read_mb_s: None,
        rand_read_iops: None,
        rand_read_latency_seconds: None,
        bandwidth_scale: 1.0,
        latency_scale: 1.0,
    };
    let err = run_err(sh("echo '{}'"), map, Duration::from_secs(5)).await;
    assert!(matches!(err, BenchmarkError::NothingMapped), "{err:?}");
}

#[tokio::test]
async fn empty_command_is_an_error() {
    let err = run_err(Vec::new(), only_read_map("/a"), Duration::from_secs(5)).await;
    assert!(matches!(err, BenchmarkError::EmptyCommand), "{err:?}");
}

#[test]
fn commands_are_shown_quoted() {
    let shown = show_command(&["fio".into(), "--name=a b".into(), "it's".into()]);
    assert_eq!(shown, r"fio '--name=a b' 'it'\''s'");
}
