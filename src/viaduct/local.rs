//! The local fast path: both ends on one host, no network, same guarantees.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
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
        let copied =
            copy_chunks(&source, &extents, &out, &layout, opts.verify).map_err(|e| match e {
                CopyFailure::Read(e) => src_err(e),
                CopyFailure::Write(e) => dst_err(&partial, e),
                CopyFailure::Differs(offset) => ViaductError::DigestMismatch {
                    at: partial.display().to_string(),
                    detail: format!(
                        "the chunk at offset {offset} reads back different from the source"
                    ),
                },
            })?;
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

enum CopyFailure {
    Read(io::Error),
    Write(io::Error),
    /// The copy does not read back as the source at this offset.
    Differs(u64),
}

/// A chunk on its way from the reader to the writer and on to the checker.
struct InFlight {
    index: u64,
    offset: u64,
    digest: blake3::Hash,
    buf: Vec<u8>,
}

/// Copies chunk by chunk in a three-stage pipeline, so the stages overlap: one thread
/// reads, scans for zeros and hashes; this one writes; a third reads each written chunk
/// back and compares its digest. Chunks of zeros are never written; at the end, any part
/// of the copy that is not a hole and was not written is checked to read as zeros.
fn copy_chunks(
    src: &File,
    extents: &[std::ops::Range<u64>],
    dst: &File,
    layout: &Layout,
    verify: bool,
) -> Result<Copied, CopyFailure> {
    let (full_tx, full_rx) = mpsc::sync_channel::<InFlight>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    let (check_tx, check_rx) = mpsc::sync_channel::<InFlight>(3);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<_, CopyFailure> {
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
                    .map_err(CopyFailure::Read)?;
                if chunks::is_zero(&buf) {
                    digests.push(layout.zero_digest(index));
                    zero_chunks += 1;
                    continue;
                }
                let digest = blake3::hash(&buf);
                digests.push(digest);
                let chunk = InFlight {
                    index,
                    offset,
                    digest,
                    buf,
                };
                if full_tx.send(chunk).is_err() {
                    // The writer stopped; it reports why.
                    break;
                }
            }
            Ok((digests, bytes_read, zero_chunks))
        });
        let checker = scope.spawn(move || -> Result<Vec<u64>, CopyFailure> {
            let mut written = Vec::new();
            let mut back = Vec::new();
            for chunk in check_rx.iter() {
                back.resize(chunk.buf.len(), 0);
                dst.read_exact_at(&mut back, chunk.offset)
                    .map_err(CopyFailure::Write)?;
                if blake3::hash(&back) != chunk.digest {
                    return Err(CopyFailure::Differs(chunk.offset));
                }
                written.push(chunk.index);
                let _ = empty_tx.send(chunk.buf);
            }
            Ok(written)
        });
        let mut bytes_written = 0u64;
        let mut chunks_written = 0u64;
        let mut write_error = None;
        for chunk in full_rx.iter() {
            match chunks::write_sparse(dst, chunk.offset, &chunk.buf, true) {
                Ok(n) => bytes_written += n,
                Err(e) => {
                    write_error = Some(e);
                    break;
                }
            }
            chunks_written += 1;
            if verify && check_tx.send(chunk).is_err() {
                // The checker found a difference; it reports which.
                break;
            }
        }
        drop(full_rx);
        drop(check_tx);
        let panicked = || CopyFailure::Read(io::Error::other("a copy thread panicked"));
        let read = reader.join().unwrap_or_else(|_| Err(panicked()));
        let checked = checker.join().unwrap_or_else(|_| Err(panicked()));
        if let Some(e) = write_error {
            return Err(CopyFailure::Write(e));
        }
        let (digests, bytes_read, chunks_zero) = read?;
        let mut checked = checked?;
        if verify {
            checked.sort_unstable();
            check_unwritten_are_zero(dst, layout, &checked)?;
        }
        Ok(Copied {
            digests,
            bytes_read,
            bytes_written,
            chunks_written,
            chunks_zero,
        })
    })
}

/// Every chunk that was not written must read as zeros: cheap, since such chunks are holes
/// and only data extents of the copy are read.
fn check_unwritten_are_zero(
    dst: &File,
    layout: &Layout,
    written: &[u64],
) -> Result<(), CopyFailure> {
    let len = dst.metadata().map_err(CopyFailure::Write)?.len();
    let extents = chunks::data_extents(dst, len).map_err(CopyFailure::Write)?;
    let mut buf = Vec::new();
    for index in 0..layout.chunks {
        let (offset, size) = layout.range(index);
        if written.binary_search(&index).is_ok() || !chunks::overlaps(&extents, offset, size as u64)
        {
            continue;
        }
        buf.resize(size, 0);
        dst.read_exact_at(&mut buf, offset)
            .map_err(CopyFailure::Write)?;
        if !chunks::is_zero(&buf) {
            return Err(CopyFailure::Differs(offset));
        }
    }
    Ok(())
}
