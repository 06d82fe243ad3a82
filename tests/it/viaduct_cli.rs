//! `fluidcloud viaduct serve` as an operator runs it on a target host: the real binary
//! receives an image from the library's sender, and refuses a key file others can read.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fluidcloud::viaduct::{image_digest, send_file, Endpoint, PresharedKey, SendOptions};

fn key_file(dir: &std::path::Path, mode: u32) -> std::path::PathBuf {
    let path = dir.join("viaduct.key");
    std::fs::write(
        &path,
        "a secret of more than thirty-two bytes, for the test\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn the_receiver_binary_takes_an_image_and_verifies_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pool");
    std::fs::create_dir(&root).unwrap();
    let key = key_file(dir.path(), 0o600);
    let port = common::free_port();
    let mut child = Command::new(common::bin())
        .args([
            "viaduct",
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--root",
        ])
        .arg(&root)
        .arg("--key-file")
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A 24 MiB image: text, a hole, then random-looking bytes.
    let src = dir.path().join("disk.raw");
    let mut data: Vec<u8> = b"fluidcloud ".repeat(800_000);
    data.resize(16 << 20, 0);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    data.extend((0..8 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    std::fs::write(&src, &data).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = Endpoint::new(
        format!("127.0.0.1:{port}"),
        PresharedKey::from_file(&key).unwrap(),
    );
    let start = Instant::now();
    let report = loop {
        match rt.block_on(send_file(
            &src,
            &endpoint,
            "vm/disk.raw",
            &SendOptions::default(),
            &|_| {},
        )) {
            Ok(r) => break r,
            // The receiver may not listen yet.
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("sending failed: {e}"),
        }
    };
    let landed = root.join("vm/disk.raw");
    assert_eq!(std::fs::read(&landed).unwrap(), data);
    assert_eq!(
        image_digest(&landed, report.chunk_size).unwrap(),
        report.digest
    );
    assert!(report.chunks_skipped_zero > 0, "{report:?}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), 0o644);
    let out = Command::new(common::bin())
        .args(["viaduct", "serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path())
        .arg("--key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open to other users"), "{err}");
}

#[test]
fn a_key_file_of_16_bytes_is_refused_as_the_help_says() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("short.key");
    std::fs::write(&key, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut child = Command::new(common::bin())
        .args(["viaduct", "serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path())
        .arg("--key-file")
        .arg(&key)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A receiver that accepts the key listens until it is stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the receiver started with a key of 16 bytes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("16 bytes long; at least 32"), "{err}");
    let help = Command::new(common::bin())
        .args(["viaduct", "serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("at least 32 bytes"), "{help}");
}
