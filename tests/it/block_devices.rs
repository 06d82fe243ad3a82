//! Volumes on block devices (`[providers.NAME.devices]`), with real loop devices: the
//! viaduct's in-place copy into a device, the local provider's volumes on devices, and
//! relocations from a device to an image file and from an image file into a device.
//!
//! Loop devices need root and `losetup`; without them the tests say why and skip, except
//! under CI (`CI=true`), where that is a failure. Every device is detached when its guard
//! drops, also after a failed assertion.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::config::ConfigBuilder;
use crate::common::{bin, Daemon};
use fluidcloud::providers::{self, DiskFormat, ProviderError, VolumeSpec};
use fluidcloud::viaduct::{self, LocalCopyOptions};

const MIB: u64 = 1024 * 1024;

/// A loop device over an image file, detached on drop.
pub(crate) struct Loop {
    pub(crate) dev: PathBuf,
}

impl Loop {
    fn attach(image: &Path) -> Result<Loop, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the test does not run as root".into());
        }
        let mut last = String::new();
        // Another process may take the free device between the look-up and the attach.
        for _ in 0..5 {
            let out = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(image)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run `losetup`: {e}"))?;
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return Ok(Loop {
                    dev: PathBuf::from(dev),
                });
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("`losetup -f --show` failed: {last}"))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .stdin(Stdio::null())
            .status();
    }
}

/// Loop devices over new image files of these sizes in `dir`, each filled with `0xAB` (so
/// that nothing reads as zeros by chance), or `None` (skip) when loop devices cannot be made.
pub(crate) fn loops(dir: &Path, sizes: &[u64]) -> Option<Vec<Loop>> {
    let mut out = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let image = dir.join(format!("loop{i}.img"));
        std::fs::write(&image, vec![0xABu8; *size as usize]).unwrap();
        match Loop::attach(&image) {
            Ok(l) => out.push(l),
            Err(why) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("block device test cannot make its loop devices under CI: {why}");
                }
                eprintln!("SKIPPED: cannot make loop devices: {why}");
                return None;
            }
        }
    }
    Some(out)
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn random(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A sparse source image of `len` bytes: data, a hole, data, explicit zeros, data at the end.
fn source_image(path: &Path, len: u64) {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    f.write_all_at(&random(700_000, 1), 10_000).unwrap();
    f.write_all_at(&random(300_000, 2), 3 * MIB).unwrap();
    f.write_all_at(&vec![0u8; 600_000], 4 * MIB).unwrap();
    f.write_all_at(&random(5000, 3), len - 5000).unwrap();
}

#[test]
fn an_in_place_copy_writes_into_a_block_device_and_never_trusts_a_base_there() {
    let dir = tempfile::tempdir().unwrap();
    let Some(devs) = loops(dir.path(), &[8 * MIB, 4 * MIB]) else {
        return;
    };
    let (dev, small) = (&devs[0].dev, &devs[1].dev);
    // An odd length: the zeroing of the last chunk is not aligned to the device's sectors.
    let len = 6 * MIB + 1000;
    let src = dir.path().join("src.raw");
    source_image(&src, len);
    let opts = |base| LocalCopyOptions {
        chunk_size: 256 << 10,
        in_place: true,
        base,
        ..LocalCopyOptions::default()
    };

    let first = viaduct::copy_local(&src, dev, &opts(None)).expect("copy into the device");
    assert_eq!(read_at(dev, 0, len), std::fs::read(&src).unwrap());
    assert!(
        read_at(dev, len, 8 * MIB - len).iter().all(|&b| b == 0xAB),
        "what lies past the image was changed"
    );
    assert_eq!(
        first.digest,
        viaduct::image_digest(&src, 256 << 10).unwrap()
    );
    assert!(first.chunks_sent > 0);

    // The source changes, and so does the device behind the copy's back, in a chunk the
    // source did not change: the base manifest says that chunk is fine, the device says not.
    write_at(&src, 3 * MIB + 17, b"changed");
    write_at(dev, 100_000, b"foreign write");
    let second =
        viaduct::copy_local(&src, dev, &opts(Some(first.manifest.clone()))).expect("second pass");
    assert_eq!(read_at(dev, 0, len), std::fs::read(&src).unwrap());
    assert_eq!(second.chunks_sent, 2, "{second:?}");
    assert_eq!(
        second.digest,
        viaduct::image_digest(&src, 256 << 10).unwrap()
    );

    // The source is now all zeros where it held data: the device must read zeros there.
    write_at(&src, 10_000, &vec![0u8; 700_000]);
    viaduct::copy_local(&src, dev, &opts(None)).expect("third pass");
    assert_eq!(read_at(dev, 0, len), std::fs::read(&src).unwrap());
    assert!(read_at(dev, 0, MIB).iter().all(|&b| b == 0));

    // Too small a device, and a copy that would rename over the device node.
    let err = viaduct::copy_local(&src, small, &opts(None)).unwrap_err();
    assert!(err.to_string().contains("fewer than the image"), "{err}");
    let err = viaduct::copy_local(&src, dev, &LocalCopyOptions::default()).unwrap_err();
    assert!(err.to_string().contains("only written in place"), "{err}");
    assert!(std::fs::metadata(dev).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_providers_volume_can_be_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let Some(devs) = loops(dir.path(), &[8 * MIB]) else {
        return;
    };
    let dev = devs[0].dev.clone();
    let config = |device: &Path| {
        let text = format!(
            "[providers.w]\ndriver = \"local\"\nregion = \"r\"\nroot = \"{}\"\n\
             [providers.w.devices]\n\"shop/data\" = \"{}\"\n",
            dir.path().join("w").display(),
            device.display()
        );
        fluidcloud::config::Config::parse(&dir.path().join("fc.toml"), &text).unwrap()
    };

    // A path that is not a block device is refused when the provider opens, naming the key.
    let not_a_device = dir.path().join("loop0.img");
    let err = match providers::open(&config(&not_a_device).providers["w"]) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a regular file was taken for a block device"),
    };
    assert!(
        err.contains("providers.w.devices.\"shop/data\"") && err.contains("not a block device"),
        "{err}"
    );

    let p = providers::open(&config(&dev).providers["w"]).expect("open");
    assert!(p.volume_info("shop", "data").await.unwrap().is_none());
    let spec = |size_bytes, format| VolumeSpec {
        name: "data".into(),
        size_bytes,
        format,
    };
    for (asked, what) in [
        (spec(16 * MIB, DiskFormat::Raw), "holds 8388608 bytes"),
        (spec(4 * MIB, DiskFormat::Qcow2), "asked for qcow2"),
    ] {
        match p.create_volume("shop", &asked).await {
            Err(ProviderError::Conflict { detail, .. }) => {
                assert!(detail.contains(what), "{detail}")
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    let op = p
        .create_volume("shop", &spec(4 * MIB, DiskFormat::Raw))
        .await
        .unwrap();
    let detail = op.detail.clone();
    assert!(
        detail.contains("took the block device") && detail.contains("more than the 4194304"),
        "{detail}"
    );
    let info = p.volume_info("shop", "data").await.unwrap().unwrap();
    assert_eq!(info.format, DiskFormat::Raw);
    assert_eq!(info.virtual_size, 8 * MIB);
    assert_eq!(
        info.path.as_deref(),
        Some(dev.canonicalize().unwrap().as_path())
    );
    let listed = p.list_volumes("shop").await.unwrap();
    assert_eq!(
        listed.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["data"]
    );
    let again = p
        .create_volume("shop", &spec(8 * MIB, DiskFormat::Raw))
        .await
        .unwrap();
    assert!(
        again.detail.contains("already existed"),
        "a second create is a no-op"
    );

    // Deleting forgets the volume; the device and its data stay.
    write_at(&dev, MIB, b"precious");
    let op = p.delete_volume("shop", "data").await.unwrap();
    let detail = op.detail;
    assert!(
        detail.contains("released the block device") && detail.contains("not erased"),
        "{detail}"
    );
    assert!(p.volume_info("shop", "data").await.unwrap().is_none());
    assert!(p.list_volumes("shop").await.unwrap().is_empty());
    assert_eq!(read_at(&dev, MIB, 8), b"precious");
}

/// Runs `fluidcloud relocate shop --to TO` with the configuration in `dir`.
fn relocate(dir: &Path, to: &str) {
    let out = Command::new(bin())
        .args(["relocate", "--quiet", "--config"])
        .arg(dir.join("fluidcloud.toml"))
        .args(["shop", "--to", to])
        .env_remove("FLUIDCLOUD_KILL_AT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("completed"),
        "relocation to {to}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verified:   sync:volume:data: image digest"),
        "{stdout}"
    );
}

#[test]
fn a_volume_moves_from_a_block_device_to_a_file_and_from_a_file_into_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    // The volume is 8 MiB; the target device is larger and full of old data.
    let Some(devs) = loops(dir.path(), &[8 * MIB, 12 * MIB]) else {
        return;
    };
    let (dev_a, dev_c) = (&devs[0].dev, &devs[1].dev);
    let config = ConfigBuilder::new()
        .listen_on_placeholder_port()
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .provider_local_with("a", "us-east-1", |p| {
            p.table("devices", |d| {
                d.set("shop/data", dev_a.display().to_string())
            })
        })
        .provider_local("b", "eu-central-1")
        .provider_local_with("c", "eu-west-1", |p| {
            p.table("devices", |d| {
                d.set("shop/data", dev_c.display().to_string())
            })
        })
        .policy("watch", "cheapest", "audit", |p| p)
        .service("shop", "a", "watch", |s| s.volume("data", 8.0 / 1024.0));

    // Deployed on `a`: the daemon takes the device for the volume.
    let mut d = Daemon::start(dir.path(), &config.render());
    let record = dir.path().join("providers/a/volumes/shop/data.device");
    d.eventually("the volume on the device", Duration::from_secs(60), |_| {
        record.exists().then_some(())
    });
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success());
    // The service's data, with zeros and old device bytes (0xAB) in between.
    write_at(dev_a, 0, &random(MIB as usize, 7));
    write_at(dev_a, 3 * MIB, &vec![0u8; MIB as usize]);
    write_at(dev_a, 6 * MIB + 4096, &random(100_000, 8));
    let data = read_at(dev_a, 0, 8 * MIB);

    relocate(dir.path(), "b");
    let file = dir.path().join("providers/b/volumes/shop/data.raw");
    assert_eq!(std::fs::read(&file).unwrap(), data, "the file differs");
    assert!(!record.exists(), "the source volume was not decommissioned");
    assert_eq!(
        read_at(dev_a, 0, 8 * MIB),
        data,
        "decommissioning touched the device"
    );

    relocate(dir.path(), "c");
    assert_eq!(read_at(dev_c, 0, 8 * MIB), data, "the device differs");
    assert!(
        read_at(dev_c, 8 * MIB, 4 * MIB).iter().all(|&b| b == 0xAB),
        "the device past the volume's image was changed"
    );
    assert!(dir
        .path()
        .join("providers/c/volumes/shop/data.device")
        .exists());
    assert!(!file.exists(), "the file at `b` was not decommissioned");
}
