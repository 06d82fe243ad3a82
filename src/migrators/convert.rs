//! Disk conversion for the volume migrator: whole images with `qemu-img convert` (checked
//! with `qemu-img compare`), and the final delta of an image already converted written back
//! with `qemu-io` and read back with `qemu-img dd`.

use std::ffi::OsStr;
use std::path::Path;

use futures_util::stream::{self, StreamExt};

use super::MigratorError;
use crate::providers::DiskFormat;
use crate::sys::{self, qemu_img::qemu_io, qemu_img::QemuImgError};
use crate::viaduct;

/// Byte ranges `(offset, length)` covering `chunks` (ascending), adjacent chunks merged.
pub fn chunk_ranges(chunks: &[u64], manifest: &viaduct::ChunkManifest) -> Vec<(u64, u64)> {
    let size = u64::from(manifest.chunk_size);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let start = c * size;
        let len = size.min(manifest.length.saturating_sub(start));
        match ranges.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => ranges.push((start, len)),
        }
    }
    ranges
}

/// `qemu-img dd` read-backs run at the same time after a delta was written.
const READ_BACK_CONCURRENCY: usize = 4;
/// Most commands one `qemu-io` process is given.
const QEMU_IO_BATCH: usize = 256;

/// Writes `ranges` of the raw image `raw` into the image `dst` (format `format`) with
/// `qemu-io`, all-zero ranges as zero writes, then reads every range back with `qemu-img
/// dd` (in blocks of `chunk` bytes, which divides every offset) and compares it with `raw`.
/// The pieces pass through the directory `scratch`, removed at the end.
pub async fn write_ranges(
    scratch: &Path,
    raw: &Path,
    format: DiskFormat,
    dst: &Path,
    ranges: &[(u64, u64)],
    chunk: u64,
) -> Result<(), MigratorError> {
    std::fs::create_dir_all(scratch).map_err(|e| MigratorError::file("create", scratch, e))?;
    let mut commands = Vec::new();
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let data = read_range(raw, offset, len)?;
        if data.iter().all(|&b| b == 0) {
            commands.push(format!("write -q -z {offset} {len}"));
        } else {
            let piece = scratch.join(format!("{i}.raw"));
            std::fs::write(&piece, &data).map_err(|e| MigratorError::file("write", &piece, e))?;
            commands.push(format!("write -q -s {} {offset} {len}", piece.display()));
        }
    }
    for batch in commands.chunks(QEMU_IO_BATCH) {
        let mut args: Vec<String> = vec!["-f".into(), format.as_str().into()];
        for c in batch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(dst.display().to_string());
        qemu_io(&args).await?;
    }
    // Read every range back through qemu, as the guest or app will see it, a few at a time
    // (each `qemu-img dd` is mostly start-up). `count` is given as the end block: some
    // qemu-img versions apply it before `skip`.
    // By index: a closure over borrowed items would be generic over their lifetime, and the
    // compiler could not then prove the relocation's future `Send`.
    let checks = (0..ranges.len()).map(|i| {
        let (offset, len) = ranges[i];
        let back = scratch.join(format!("back-{i}.raw"));
        async move {
            let args: Vec<String> = vec![
                "dd".into(),
                "-f".into(),
                format.as_str().into(),
                "-O".into(),
                "raw".into(),
                format!("if={}", dst.display()),
                format!("of={}", back.display()),
                format!("bs={chunk}"),
                format!("skip={}", offset / chunk),
                format!("count={}", (offset + len).div_ceil(chunk)),
            ];
            sys::qemu_img::qemu_img(&args).await?;
            let got = read_range(&back, 0, len)?;
            let _ = std::fs::remove_file(&back);
            if got != read_range(raw, offset, len)? {
                return Err(MigratorError::Check(format!(
                    "{} differs from the staging image in bytes {offset}..{} after the delta was written",
                    dst.display(),
                    offset + len
                )));
            }
            Ok(())
        }
    });
    let results: Vec<Result<(), MigratorError>> = stream::iter(checks)
        .buffer_unordered(READ_BACK_CONCURRENCY)
        .collect()
        .await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, MigratorError>>()?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

/// `len` bytes of the file at `path` from `offset`.
fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, MigratorError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| MigratorError::file("open", path, e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| MigratorError::file("seek in", path, e))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| MigratorError::file("read", path, e))?;
    Ok(buf)
}

/// Converts the image `src` into the fresh image `dst`.
pub async fn convert(
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), MigratorError> {
    // -n: write into the image the provider created; --target-is-zero: it is fresh, so
    // zero ranges of the source (found through block status) are skipped.
    qemu_img(
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            from.as_str(),
            "-O",
            to.as_str(),
        ],
        &[src, dst],
    )
    .await
    .map(|_| ())
}

/// Fails unless the images `src` and `dst` hold the same data.
pub async fn compare(
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), MigratorError> {
    compare_with(&[], from, src, to, dst).await
}

/// [`compare`] of a source that a halted emulator still holds open (`qemu-img -U`): nothing
/// writes to it, but its lock would refuse the read.
pub async fn compare_held(
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), MigratorError> {
    compare_with(&["-U"], from, src, to, dst).await
}

async fn compare_with(
    extra: &[&str],
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), MigratorError> {
    let mut args = vec!["compare", "-q"];
    args.extend_from_slice(extra);
    args.extend(["-f", from.as_str(), "-F", to.as_str()]);
    qemu_img(&args, &[src, dst])
        .await
        .map(|_| ())
        .map_err(|e| MigratorError::Check(format!("the copy differs from the source: {e}")))
}

/// Runs `qemu-img` with `args`, then `paths`, and returns what it printed.
pub async fn qemu_img(args: &[&str], paths: &[&Path]) -> Result<String, MigratorError> {
    let all = args
        .iter()
        .map(OsStr::new)
        .chain(paths.iter().map(|p| p.as_os_str()));
    let out = sys::qemu_img::qemu_img(all).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl From<QemuImgError> for MigratorError {
    fn from(e: QemuImgError) -> Self {
        let command = e.command();
        match e {
            QemuImgError::Spawn { program, source } => MigratorError::Spawn { program, source },
            QemuImgError::Failed {
                status,
                stdout,
                stderr,
                ..
            } => MigratorError::Tool {
                command,
                status,
                output: format!("{} {}", stderr.trim(), stdout.trim())
                    .trim()
                    .to_string(),
            },
        }
    }
}
