//! The local fast path: both ends on one host, no network, same guarantees.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use super::chunks::{self, Layout};
use super::names::PARTIAL_SUFFIX;
use super::{check_chunk_size, ResumedFrom, TransferReport, ViaductError, DEFAULT_CHUNK_SIZE};

/// How a local copy runs.
#[derive(Debug, Clone)]
pub struct LocalCopyOptions {
    /// Chunk size of the digest (see the module documentation). Default 1 MiB.
    pub chunk_size: u32,
    /// Read the copy back and compare its digest with the source's before renaming it
    /// into place. Default true.
    pub verify: bool,
    /// Flush the copy to disk before renaming it into place. Default true.
    pub fsync: bool,
}

impl Default for LocalCopyOptions {
    fn default() -> Self {
        LocalCopyOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            verify: true,
            fsync: true,
        }
    }
}

/// Copies the image at `src` to `dst` on the same host: only allocated extents are read,
/// zero blocks stay holes, and the copy is written to `<dst>.partial` and renamed over
/// `dst` only once its digest (read back from the copy) equals the source's.
///
/// The data passes through memory rather than `copy_file_range`: it has to be hashed and
/// scanned for zeros anyway, and reading it once serves all three.
pub fn copy_local(
    src: &Path,
    dst: &Path,
    opts: &LocalCopyOptions,
) -> Result<TransferReport, ViaductError> {
    use std::os::unix::fs::OpenOptionsExt;
    let started = Instant::now();
    check_chunk_size(opts.chunk_size).map_err(ViaductError::InvalidOptions)?;
    let source = chunks::open_source(src)?;
    let src_err = |source| ViaductError::Source {
        path: src.to_path_buf(),
        source,
    };
    let length = chunks::image_length(&source).map_err(src_err)?;
    let extents = chunks::data_extents(&source, length).map_err(src_err)?;
    let layout = Layout::new(length, opts.chunk_size);
    match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type().is_symlink() || !m.is_file() => {
            return Err(ViaductError::Target {
                path: dst.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it exists and is not a regular file",
                ),
            })
        }
        _ => {}
    }
    let mut partial_name = dst.as_os_str().to_owned();
    partial_name.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial_name);
    let dst_err = |path: &Path, source: io::Error| {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            ViaductError::TargetDiskFull {
                what: path.display().to_string(),
                detail: source.to_string(),
            }
        } else {
            ViaductError::Target {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    // A partial copy left by a crash is worth nothing here: start over.
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dst_err(&partial, e)),
    }
    let out = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)
        .map_err(|e| dst_err(&partial, e))?;
    let result = (|| {
        out.set_len(length).map_err(|e| dst_err(&partial, e))?;
        let copied = copy_chunks(&source, &extents, &out, &layout).map_err(|e| match e {
            chunks::CopyError::Read(e) => src_err(e),
            chunks::CopyError::Write(e) => dst_err(&partial, e),
        })?;
        if opts.verify {
            let held = chunks::hash_file(&out, &layout).map_err(|e| dst_err(&partial, e))?;
            if let Some(i) = (0..held.len()).find(|&i| held[i] != copied.digests[i]) {
                let (offset, _) = layout.range(i as u64);
                return Err(ViaductError::DigestMismatch {
                    at: partial.display().to_string(),
                    detail: format!(
                        "the chunk at offset {offset} differs from the source after writing"
                    ),
                });
            }
        }
        if opts.fsync {
            out.sync_all().map_err(|e| dst_err(&partial, e))?;
        }
        std::fs::rename(&partial, dst).map_err(|e| dst_err(dst, e))?;
        if opts.fsync {
            if let Some(dir) = dst.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| dst_err(dir, e))?;
            }
        }
        Ok(copied)
    })();
    let copied = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    Ok(TransferReport {
        image_bytes: length,
        chunk_size: opts.chunk_size,
        bytes_read: copied.bytes_read,
        bytes_sent: copied.bytes_written,
        chunks_total: layout.chunks,
        chunks_sent: copied.chunks_written,
        chunks_skipped_zero: copied.chunks_zero,
        chunks_skipped_equal: 0,
        digest: layout.image_digest(&copied.digests),
        duration: started.elapsed(),
        streams: 1,
        resumed_from: ResumedFrom::None,
    })
}

struct Copied {
    digests: Vec<blake3::Hash>,
    bytes_read: u64,
    bytes_written: u64,
    chunks_written: u64,
    chunks_zero: u64,
}

/// Copies chunk by chunk with reading and hashing on one thread and writing on another,
/// so the two halves overlap.
fn copy_chunks(
    src: &File,
    extents: &[std::ops::Range<u64>],
    dst: &File,
    layout: &Layout,
) -> Result<Copied, chunks::CopyError> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<_, chunks::CopyError> {
            let mut digests = Vec::with_capacity(layout.chunks as usize);
            let (mut bytes_read, mut zero_chunks) = (0u64, 0u64);
            for index in 0..layout.chunks {
                let (offset, len) = layout.range(index);
                if !chunks::overlaps(extents, offset, len as u64) {
                    digests.push(layout.zero_digest(index));
                    zero_chunks += 1;
                    continue;
                }
                let mut buf = empty_rx.try_recv().unwrap_or_default();
                buf.resize(len, 0);
                bytes_read += chunks::read_sparse(src, extents, offset, &mut buf)
                    .map_err(chunks::CopyError::Read)?;
                if chunks::is_zero(&buf) {
                    digests.push(layout.zero_digest(index));
                    zero_chunks += 1;
                    continue;
                }
                digests.push(blake3::hash(&buf));
                if full_tx.send((offset, buf)).is_err() {
                    // The writer failed; it reports why.
                    break;
                }
            }
            Ok((digests, bytes_read, zero_chunks))
        });
        let mut written = 0u64;
        let mut chunks_written = 0u64;
        let mut write_error = None;
        for (offset, buf) in full_rx.iter() {
            match chunks::write_sparse(dst, offset, &buf, true) {
                Ok(n) => written += n,
                Err(e) => {
                    write_error = Some(e);
                    break;
                }
            }
            chunks_written += 1;
            let _ = empty_tx.send(buf);
        }
        drop(full_rx);
        let read = reader.join().unwrap_or_else(|_| {
            Err(chunks::CopyError::Read(io::Error::other(
                "the reader thread panicked",
            )))
        });
        if let Some(e) = write_error {
            return Err(chunks::CopyError::Write(e));
        }
        let (digests, bytes_read, chunks_zero) = read?;
        Ok(Copied {
            digests,
            bytes_read,
            bytes_written: written,
            chunks_written,
            chunks_zero,
        })
    })
}
