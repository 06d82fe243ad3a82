//! The local fast path: both ends on one host, no network, same guarantees; and the
//! incremental in-place copy that pre-copy relocations are built on.
//!
//! # Incremental copies into a staging file
//!
//! A relocation with a short cutover copies a volume twice into the same staging file: a
//! pre-copy while the source still runs, then, with the source stopped, a final pass that
//! writes only what changed. [`LocalCopyOptions::in_place`] writes straight into the
//! staging file; [`LocalCopyOptions::base`] hands the next pass the manifest the previous
//! one returned ([`TransferReport::manifest`]), so chunks whose source digest equals the
//! base digest are neither written nor read back. Without a base, an existing staging file
//! is hashed first (a resume after a crash).
//!
//! # Why the fast verification is sound
//!
//! After an in-place pass the target's chunk table is made of two kinds of entries: the
//! digests of the chunks written in this pass, read back from the target after writing, and,
//! for every other chunk, the digest the target was known to hold before the pass began. The
//! whole-image digest over that table is compared with the source's. The second kind is
//! trustworthy because it comes either from hashing the target at the start of this pass, or
//! from a base manifest, and a base is only used while the staging file carries the *seal*
//! its pass set on it: the last thing a successful in-place pass does (after the flush) is
//! set the file's modification time to a value derived from the image digest, a date in the
//! early 1970s no real write produces. Any later write to the file, by a pass that crashed or
//! was cancelled half-way or by anyone else, moves the modification time to the present and
//! breaks the seal, and so does handing in the manifest of an older pass (its digest gives a
//! different seal). Then the base is ignored and the file is hashed. So every entry in the
//! table describes bytes that were read back after they were last written; what this does
//! not catch is storage that silently changes bytes at rest, which is what
//! [`LocalCopyOptions::verify_all`] (a full re-read) is for.
//!
//! # Block devices as targets
//!
//! An in-place copy may write into a block device (a volume on a device): it is never
//! resized, must be at least as long as the image (what lies past the image's length is
//! left alone), and cannot carry a seal (its node's times say nothing about writes made
//! through another node, or by a guest), so a base manifest is never trusted there: what
//! the device holds is always hashed first. Chunks the source holds as zeros are zeroed
//! where that hashing found anything else (a device has no holes; the kernel's zeroing is
//! used where the device offers it) and read back like every written chunk, so the
//! verification is the same as for a file.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::chunks::{self, ChunkHasher, Layout, PIECE};
use super::manifest::ChunkManifest;
use super::names::PARTIAL_SUFFIX;
use super::{
    check_chunk_size, ImageDigest, Phase, Progress, ResumedFrom, TransferReport, ViaductError,
    DEFAULT_CHUNK_SIZE,
};

/// A progress callback: called from the copying thread a few times a second.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How a local copy runs.
#[derive(Clone)]
pub struct LocalCopyOptions {
    /// Chunk size of the digest (see the module documentation). Default 1 MiB.
    pub chunk_size: u32,
    /// Read every chunk written in this pass back from the target and compare the target's
    /// image digest with the source's before the copy counts as done. Default true.
    pub verify: bool,
    /// With `verify`, re-read the whole target at the end instead of only the chunks this
    /// pass wrote (see "Why the fast verification is sound"). Default false.
    pub verify_all: bool,
    /// Flush the copy to disk before it counts as done (and, without `in_place`, before
    /// renaming it into place). Default true.
    pub fsync: bool,
    /// Write straight into `dst` (created if missing, resized to the source's length,
    /// holes punched where the source now has zeros) instead of into `<dst>.partial` that
    /// is renamed over `dst` at the end. Only for staging files nobody else reads while a
    /// pass runs: a failed pass leaves `dst` half-updated. `dst` may be a block device at
    /// least as long as the source (see "Block devices as targets"). Default false.
    pub in_place: bool,
    /// What `dst` holds: the [`TransferReport::manifest`] of the previous in-place pass into
    /// it. Requires `in_place` and the same `chunk_size`. Ignored (and `dst` hashed instead)
    /// when `dst` no longer carries the seal of that pass. Default none: an existing `dst`
    /// is hashed before the copy.
    pub base: Option<ChunkManifest>,
    /// Called from the copying thread a few times a second. Default none.
    pub progress: Option<ProgressFn>,
    /// Checked between chunks; once true, the copy stops with
    /// [`ViaductError::Cancelled`]. Without `in_place` the partial copy is removed; with it,
    /// `dst` stays as it is and the next pass hashes it. Default none.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for LocalCopyOptions {
    fn default() -> Self {
        LocalCopyOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            verify: true,
            verify_all: false,
            fsync: true,
            in_place: false,
            base: None,
            progress: None,
            cancel: None,
        }
    }
}

impl fmt::Debug for LocalCopyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCopyOptions")
            .field("chunk_size", &self.chunk_size)
            .field("verify", &self.verify)
            .field("verify_all", &self.verify_all)
            .field("fsync", &self.fsync)
            .field("in_place", &self.in_place)
            .field("base", &self.base)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .field("cancel", &self.cancel)
            .finish()
    }
}

impl LocalCopyOptions {
    fn check(&self) -> Result<(), ViaductError> {
        let bad = ViaductError::InvalidOptions;
        check_chunk_size(self.chunk_size).map_err(|e| bad(e.to_string()))?;
        if let Some(base) = &self.base {
            if !self.in_place {
                return Err(bad(
                    "a base manifest describes a staging file updated in place: set in_place"
                        .into(),
                ));
            }
            base.check()
                .map_err(|e| bad(format!("the base manifest is inconsistent: {e}")))?;
            if base.chunk_size != self.chunk_size {
                return Err(bad(format!(
                    "the base manifest was taken with chunks of {} bytes, this copy uses {}",
                    base.chunk_size, self.chunk_size
                )));
            }
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// Copies the image at `src` to `dst` on the same host: only allocated extents are read,
/// zero blocks stay holes, and every chunk is hashed. By default the copy is written to
/// `<dst>.partial` and renamed over `dst` only once its digest (read back from the copy)
/// equals the source's; with [`LocalCopyOptions::in_place`] it updates `dst` directly and
/// writes only the chunks that differ from what `dst` holds.
///
/// The data passes through memory rather than `copy_file_range`: it has to be hashed and
/// scanned for zeros anyway, and reading it once serves all three. Chunks are handled on
/// several threads (one per core, at least two). Blocking: call it from
/// `tokio::task::spawn_blocking` in async code.
pub fn copy_local(
    src: &Path,
    dst: &Path,
    opts: &LocalCopyOptions,
) -> Result<TransferReport, ViaductError> {
    let started = Instant::now();
    opts.check()?;
    let source = chunks::open_source(src)?;
    let src_err = |source| ViaductError::Source {
        path: src.to_path_buf(),
        source,
    };
    let length = chunks::image_length(&source).map_err(src_err)?;
    let extents = chunks::data_extents(&source, length).map_err(src_err)?;
    let layout = Layout::new(length, opts.chunk_size);
    match std::fs::symlink_metadata(dst) {
        // Written in place only: a rename would put a file in place of the device node.
        Ok(m) if m.file_type().is_block_device() && opts.in_place => {}
        Ok(m) if m.file_type().is_symlink() || !m.is_file() => {
            return Err(ViaductError::Target {
                path: dst.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    if m.file_type().is_block_device() {
                        "it is a block device, which is only written in place"
                    } else {
                        "it exists and is not a regular file or a block device"
                    },
                ),
            })
        }
        _ => {}
    }
    let meter = Meter {
        opts,
        layout: &layout,
        started,
        chunks_done: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
    };
    if opts.in_place {
        copy_in_place(&source, &extents, src, dst, &layout, &meter)
    } else {
        copy_via_partial(&source, &extents, src, dst, &layout, &meter)
    }
}

/// Counters shared by the copying threads, and the progress reports made from them.
struct Meter<'a> {
    opts: &'a LocalCopyOptions,
    layout: &'a Layout,
    started: Instant,
    chunks_done: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Meter<'_> {
    fn report(&self, phase: Phase) {
        if let Some(progress) = &self.opts.progress {
            progress(&Progress {
                phase,
                image_bytes: self.layout.length,
                chunks_total: self.layout.chunks,
                chunks_done: self.chunks_done.load(Ordering::Relaxed),
                bytes_read: self.bytes_read.load(Ordering::Relaxed),
                bytes_sent: self.bytes_written.load(Ordering::Relaxed),
                elapsed: self.started.elapsed(),
            });
        }
    }

    /// Starts a phase whose chunk count starts from zero.
    fn begin(&self, phase: Phase) {
        self.chunks_done.store(0, Ordering::Relaxed);
        self.report(phase);
    }
}

/// The file being written and what it held, chunk by chunk, when the pass began (`None`
/// where that is not known, so the chunk is rewritten whatever the source holds).
struct Target<'a> {
    file: File,
    /// Where the writes go (`dst` or `<dst>.partial`), for error messages.
    path: &'a Path,
    held: Vec<Option<blake3::Hash>>,
    /// Created empty by this pass: chunks not written must be holes, which is cheap to check.
    fresh: bool,
    resumed: ResumedFrom,
}

fn copy_via_partial(
    source: &File,
    extents: &[std::ops::Range<u64>],
    src: &Path,
    dst: &Path,
    layout: &Layout,
    meter: &Meter<'_>,
) -> Result<TransferReport, ViaductError> {
    let opts = meter.opts;
    let mut partial_name = dst.as_os_str().to_owned();
    partial_name.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial_name);
    // A partial copy left by a crash is worth nothing here: start over.
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dst_err(&partial, e)),
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&partial)
        .map_err(|e| dst_err(&partial, e))?;
    let result = (|| {
        file.set_len(layout.length)
            .map_err(|e| dst_err(&partial, e))?;
        let target = Target {
            file,
            path: &partial,
            held: (0..layout.chunks)
                .map(|i| Some(layout.zero_digest(i)))
                .collect(),
            fresh: true,
            resumed: ResumedFrom::None,
        };
        let report = run_pass(source, extents, src, &target, layout, meter)?;
        if opts.fsync {
            target.file.sync_all().map_err(|e| dst_err(&partial, e))?;
        }
        std::fs::rename(&partial, dst).map_err(|e| dst_err(dst, e))?;
        if opts.fsync {
            sync_parent(dst)?;
        }
        Ok(report)
    })();
    result.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })
}

fn copy_in_place(
    source: &File,
    extents: &[std::ops::Range<u64>],
    src: &Path,
    dst: &Path,
    layout: &Layout,
    meter: &Meter<'_>,
) -> Result<TransferReport, ViaductError> {
    let opts = meter.opts;
    let err = |e| dst_err(dst, e);
    let create = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst);
    let (file, existed) = match create {
        Ok(f) => (f, false),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let f = File::options()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dst)
                .map_err(err)?;
            (f, true)
        }
        Err(e) => return Err(err(e)),
    };
    let meta = file.metadata().map_err(err)?;
    let device = meta.file_type().is_block_device();
    if !meta.is_file() && !device {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file or a block device",
        )));
    }
    if device {
        let size = chunks::image_length(&file).map_err(err)?;
        if size < layout.length {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the block device holds {size} bytes, fewer than the image's {}",
                    layout.length
                ),
            )));
        }
    }
    let (held, resumed) = if device {
        // No seal on a device: what it holds is always read (see "Block devices as targets").
        (
            hash_target(&file, dst, layout, meter)?,
            ResumedFrom::Partial,
        )
    } else if !existed {
        let zeros = (0..layout.chunks)
            .map(|i| Some(layout.zero_digest(i)))
            .collect();
        (zeros, ResumedFrom::None)
    } else if let Some(base) = opts
        .base
        .as_ref()
        .filter(|b| b.length == meta.len() && has_seal(&meta, &b.image_digest()))
    {
        (held_from_base(base, layout), ResumedFrom::Target)
    } else {
        if opts.base.is_some() {
            tracing::warn!(
                "The staging file {} changed since its manifest was taken (a pass that did not \
                 finish, or an older manifest); hashing it instead of trusting the manifest.",
                dst.display()
            );
        }
        (
            hash_target(&file, dst, layout, meter)?,
            ResumedFrom::Partial,
        )
    };
    // Resizing moves the modification time even to the same size: only when needed.
    if !device && meta.len() != layout.length {
        file.set_len(layout.length).map_err(err)?;
    }
    let target = Target {
        file,
        path: dst,
        held,
        fresh: !existed,
        resumed,
    };
    let report = run_pass(source, extents, src, &target, layout, meter)?;
    if device {
        if opts.fsync {
            target.file.sync_all().map_err(err)?;
        }
        return Ok(report);
    }
    if opts.fsync {
        target.file.sync_data().map_err(err)?;
    }
    set_seal(&target.file, &report.digest).map_err(err)?;
    if opts.fsync {
        target.file.sync_all().map_err(err)?;
        if !existed {
            sync_parent(dst)?;
        }
    }
    Ok(report)
}

/// Hashes what an existing staging file holds, for a pass that has no trustworthy base.
fn hash_target(
    file: &File,
    path: &Path,
    layout: &Layout,
    meter: &Meter<'_>,
) -> Result<Vec<Option<blake3::Hash>>, ViaductError> {
    let err = |e| dst_err(path, e);
    let len = chunks::image_length(file).map_err(err)?.min(layout.length);
    let extents = chunks::data_extents(file, len).map_err(err)?;
    meter.begin(Phase::Comparing);
    let opts = meter.opts;
    let digests = chunks::map_chunks(
        layout.chunks,
        chunks::worker_threads(),
        |index, buf: &mut Vec<u8>| {
            if opts.cancelled() {
                return Err(ViaductError::Cancelled);
            }
            let (digest, _) = chunks::hash_chunk(file, &extents, layout, index, buf)
                .map_err(|e| dst_err(path, e))?;
            meter.chunks_done.fetch_add(1, Ordering::Relaxed);
            Ok(Some(digest))
        },
        &mut || meter.report(Phase::Comparing),
    )?;
    Ok(digests)
}

/// What the target held per chunk of `layout`, from a manifest taken at possibly another
/// length: chunks wholly inside the old image keep their digests, chunks wholly past its end
/// read as zeros once the file is extended, and the chunk across the old end is unknown.
fn held_from_base(base: &ChunkManifest, layout: &Layout) -> Vec<Option<blake3::Hash>> {
    (0..layout.chunks)
        .map(|index| {
            let (offset, len) = layout.range(index);
            let end = offset + len as u64;
            if offset >= base.length {
                Some(layout.zero_digest(index))
            } else if end <= base.length {
                let old_len = (base.length - offset).min(u64::from(base.chunk_size));
                (old_len == len as u64)
                    .then(|| blake3::Hash::from_bytes(base.digests[index as usize]))
            } else {
                None
            }
        })
        .collect()
}

/// Why a copying thread stopped.
enum Failure {
    Read(io::Error),
    Write(io::Error),
    /// The target does not read back as the source at this offset.
    Differs(u64),
    Cancelled,
}

/// One thread's reusable buffer, [`chunks::PIECE`] bytes long.
#[derive(Default)]
struct Buffers {
    piece: Vec<u8>,
}

/// What happened to one chunk.
struct ChunkDone {
    /// The digest of the source chunk as read.
    source: blake3::Hash,
    /// The digest the target holds there now: read back if written, else as known before.
    target: blake3::Hash,
    kind: ChunkKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkKind {
    Written,
    /// Zeros in the source; cleared in the target if it held data there.
    Zero,
    /// Equal to what the target held: neither written nor read back.
    Equal,
}

/// Copies every chunk that differs from what the target holds, verifies, and builds the
/// report. The caller flushes and puts the target in place.
fn run_pass(
    source: &File,
    extents: &[std::ops::Range<u64>],
    src: &Path,
    target: &Target<'_>,
    layout: &Layout,
    meter: &Meter<'_>,
) -> Result<TransferReport, ViaductError> {
    let opts = meter.opts;
    let dst = target.path;
    let fail = |e: Failure| match e {
        Failure::Read(source) => ViaductError::Source {
            path: src.to_path_buf(),
            source,
        },
        Failure::Write(e) => dst_err(dst, e),
        Failure::Differs(offset) => ViaductError::DigestMismatch {
            at: dst.display().to_string(),
            detail: format!("the chunk at offset {offset} reads back different from the source"),
        },
        Failure::Cancelled => ViaductError::Cancelled,
    };
    meter.begin(Phase::Transferring);
    let done = chunks::map_chunks(
        layout.chunks,
        chunks::worker_threads(),
        |index, bufs: &mut Buffers| {
            if opts.cancelled() {
                return Err(Failure::Cancelled);
            }
            let done = copy_chunk(source, extents, target, layout, index, bufs, meter)?;
            meter.chunks_done.fetch_add(1, Ordering::Relaxed);
            Ok(done)
        },
        &mut || meter.report(Phase::Transferring),
    )
    .map_err(fail)?;
    let source_digests: Vec<blake3::Hash> = done.iter().map(|d| d.source).collect();
    let digest = layout.image_digest(&source_digests);
    if opts.verify {
        let held = if opts.verify_all {
            meter.begin(Phase::Verifying);
            let len = chunks::image_length(&target.file)
                .map_err(|e| dst_err(dst, e))?
                .min(layout.length);
            let extents = chunks::data_extents(&target.file, len).map_err(|e| dst_err(dst, e))?;
            chunks::map_chunks(
                layout.chunks,
                chunks::worker_threads(),
                |index, buf: &mut Vec<u8>| {
                    if opts.cancelled() {
                        return Err(Failure::Cancelled);
                    }
                    let (d, _) = chunks::hash_chunk(&target.file, &extents, layout, index, buf)
                        .map_err(Failure::Write)?;
                    meter.chunks_done.fetch_add(1, Ordering::Relaxed);
                    Ok(d)
                },
                &mut || meter.report(Phase::Verifying),
            )
            .map_err(fail)?
        } else {
            if target.fresh {
                check_unwritten_are_zero(&target.file, layout, &done).map_err(fail)?;
            }
            done.iter().map(|d| d.target).collect()
        };
        if layout.image_digest(&held) != digest {
            let index = held
                .iter()
                .zip(&source_digests)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(fail(Failure::Differs(layout.range(index as u64).0)));
        }
    }
    meter.report(Phase::Verifying);
    let count = |kind| done.iter().filter(|d| d.kind == kind).count() as u64;
    Ok(TransferReport {
        image_bytes: layout.length,
        chunk_size: layout.chunk_size,
        bytes_read: meter.bytes_read.load(Ordering::Relaxed),
        bytes_sent: meter.bytes_written.load(Ordering::Relaxed),
        chunks_total: layout.chunks,
        chunks_sent: count(ChunkKind::Written),
        chunks_skipped_zero: count(ChunkKind::Zero),
        chunks_skipped_equal: count(ChunkKind::Equal),
        digest,
        duration: meter.started.elapsed(),
        streams: 1,
        resumed_from: target.resumed,
        manifest: ChunkManifest::from_hashes(layout, &source_digests),
    })
}

/// Reads and hashes one chunk and, where it differs from what the target holds, writes
/// and reads it back, all in [`chunks::PIECE`]s.
///
/// Where the target holds data, the chunk is likely unchanged (a later pass into a staging
/// file): it is hashed first and read again only to be written if it differs. What is
/// written is always what was hashed in the same read, so a source that changes between
/// the two reads (a pre-copy of a running volume) yields the digest of the bytes written.
fn copy_chunk(
    source: &File,
    extents: &[std::ops::Range<u64>],
    target: &Target<'_>,
    layout: &Layout,
    index: u64,
    bufs: &mut Buffers,
    meter: &Meter<'_>,
) -> Result<ChunkDone, Failure> {
    let (offset, len) = layout.range(index);
    let zero_digest = layout.zero_digest(index);
    let held = target.held[index as usize];
    bufs.piece.resize(PIECE.min(len), 0);
    let in_source = chunks::overlaps(extents, offset, len as u64);
    if !in_source && held == Some(zero_digest) {
        return Ok(ChunkDone {
            source: zero_digest,
            target: zero_digest,
            kind: ChunkKind::Zero,
        });
    }
    if in_source && held.is_some_and(|h| h != zero_digest) {
        let (digest, zero) = scan_chunk(
            source,
            extents,
            offset,
            len,
            bufs,
            meter,
            zero_digest,
            |_, _, _| Ok(()),
        )?;
        if held == Some(digest) {
            // `held` is not the zero digest, so neither is `digest`, nor was the chunk zeros.
            debug_assert!(!zero);
            return Ok(ChunkDone {
                source: digest,
                target: digest,
                kind: ChunkKind::Equal,
            });
        }
    }
    // Written below: what the target held there is about to change.
    let region_was_zero = held == Some(zero_digest);
    let (digest, zero) = if in_source {
        let file = &target.file;
        scan_chunk(
            source,
            extents,
            offset,
            len,
            bufs,
            meter,
            zero_digest,
            |at, piece, zero| {
                if zero && region_was_zero {
                    return Ok(());
                }
                let written = chunks::write_sparse(file, at, piece, region_was_zero)
                    .map_err(Failure::Write)?;
                meter.bytes_written.fetch_add(written, Ordering::Relaxed);
                Ok(())
            },
        )?
    } else {
        chunks::punch_hole(&target.file, offset, len as u64).map_err(Failure::Write)?;
        (zero_digest, true)
    };
    let kind = if zero {
        ChunkKind::Zero
    } else {
        ChunkKind::Written
    };
    let untouched = zero && region_was_zero;
    let now = if meter.opts.verify && !untouched {
        let back =
            read_back(&target.file, offset, len, bufs, zero_digest).map_err(Failure::Write)?;
        if back != digest {
            return Err(Failure::Differs(offset));
        }
        back
    } else {
        digest
    };
    Ok(ChunkDone {
        source: digest,
        target: now,
        kind,
    })
}

/// Reads the chunk at `offset` of the source piece by piece, hashing each piece and handing
/// it to `sink` with its absolute offset and whether it is all zeros. Returns the chunk's
/// digest and whether it held only zeros.
#[allow(clippy::too_many_arguments)]
fn scan_chunk(
    source: &File,
    extents: &[std::ops::Range<u64>],
    offset: u64,
    len: usize,
    bufs: &mut Buffers,
    meter: &Meter<'_>,
    zero_digest: blake3::Hash,
    mut sink: impl FnMut(u64, &[u8], bool) -> Result<(), Failure>,
) -> Result<(blake3::Hash, bool), Failure> {
    let mut hasher = ChunkHasher::new();
    let mut at = 0usize;
    while at < len {
        let n = (len - at).min(PIECE);
        let piece = &mut bufs.piece[..n];
        let pos = offset + at as u64;
        let zero = if chunks::overlaps(extents, pos, n as u64) {
            let read = chunks::read_sparse(source, extents, pos, piece).map_err(Failure::Read)?;
            meter.bytes_read.fetch_add(read, Ordering::Relaxed);
            chunks::is_zero(piece)
        } else {
            piece.fill(0);
            true
        };
        hasher.update(piece, zero);
        sink(pos, piece, zero)?;
        at += n;
    }
    Ok(hasher.finish(zero_digest))
}

/// The digest of what the target holds at `offset`, read piece by piece.
fn read_back(
    file: &File,
    offset: u64,
    len: usize,
    bufs: &mut Buffers,
    zero_digest: blake3::Hash,
) -> io::Result<blake3::Hash> {
    let mut hasher = ChunkHasher::new();
    let mut at = 0usize;
    while at < len {
        let n = (len - at).min(PIECE);
        let piece = &mut bufs.piece[..n];
        file.read_exact_at(piece, offset + at as u64)?;
        hasher.update(piece, chunks::is_zero(piece));
        at += n;
    }
    Ok(hasher.finish(zero_digest).0)
}

/// Every chunk of a freshly created target that was not written must read as zeros: cheap,
/// since such chunks are holes and only data extents of the copy are read.
fn check_unwritten_are_zero(
    dst: &File,
    layout: &Layout,
    done: &[ChunkDone],
) -> Result<(), Failure> {
    let len = dst.metadata().map_err(Failure::Write)?.len();
    let extents = chunks::data_extents(dst, len).map_err(Failure::Write)?;
    let mut buf = Vec::new();
    for (index, d) in done.iter().enumerate() {
        let (offset, size) = layout.range(index as u64);
        if d.kind == ChunkKind::Written || !chunks::overlaps(&extents, offset, size as u64) {
            continue;
        }
        buf.resize(size, 0);
        dst.read_exact_at(&mut buf, offset)
            .map_err(Failure::Write)?;
        if !chunks::is_zero(&buf) {
            return Err(Failure::Differs(offset));
        }
    }
    Ok(())
}

/// The modification time that seals a staging file holding the image with `digest`: a
/// second in 1971–1979 and a nanosecond, both taken from the digest. No write made by a
/// machine whose clock is anywhere near the present produces it.
fn seal_of(digest: &ImageDigest) -> (i64, i64) {
    let mut x = [0u8; 8];
    x.copy_from_slice(&digest.0[..8]);
    let x = u64::from_le_bytes(x);
    let secs = 31_536_000 + (x & ((1 << 28) - 1)) as i64;
    let nanos = ((x >> 32) % 1_000_000_000) as i64;
    (secs, nanos)
}

fn set_seal(file: &File, digest: &ImageDigest) -> io::Result<()> {
    let (secs, nanos) = seal_of(digest);
    use rustix::fs::{futimens, Timespec, Timestamps, UTIME_OMIT};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: secs,
            tv_nsec: nanos as _,
        },
    };
    futimens(file, &times)?;
    Ok(())
}

/// Whether the file still carries the seal set after a pass that produced `digest`. A file
/// system that keeps coarser times never matches, which costs a re-hash, never a skipped
/// chunk.
fn has_seal(meta: &std::fs::Metadata, digest: &ImageDigest) -> bool {
    let (secs, nanos) = seal_of(digest);
    meta.mtime() == secs && meta.mtime_nsec() == nanos
}

fn sync_parent(path: &Path) -> Result<(), ViaductError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| dst_err(dir, e))?;
    }
    Ok(())
}

fn dst_err(path: &Path, source: io::Error) -> ViaductError {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_differ_per_digest_and_look_like_no_real_time() {
        let a = seal_of(&ImageDigest(*blake3::hash(b"a").as_bytes()));
        let b = seal_of(&ImageDigest(*blake3::hash(b"b").as_bytes()));
        assert_ne!(a, b);
        for (secs, nanos) in [a, b] {
            assert!((31_536_000..315_532_800).contains(&secs), "{secs}");
            assert!((0..1_000_000_000).contains(&nanos));
        }
    }

    #[test]
    fn piecewise_hashing_equals_hashing_the_whole_chunk() {
        let zero_digest = blake3::hash(&[0u8; 3 * PIECE + 100]);
        let mut data = vec![0u8; 3 * PIECE + 100];
        data[2 * PIECE + 7] = 1;
        let mut h = ChunkHasher::new();
        for piece in data.chunks(PIECE) {
            h.update(piece, chunks::is_zero(piece));
        }
        assert_eq!(h.finish(zero_digest), (blake3::hash(&data), false));
        let mut z = ChunkHasher::new();
        for piece in [0u8; 3 * PIECE + 100].chunks(PIECE) {
            z.update(piece, true);
        }
        assert_eq!(z.finish(zero_digest), (zero_digest, true));
    }

    #[test]
    fn chunks_of_several_pieces_are_copied_and_updated_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let cs = PIECE as u64 + PIECE as u64 / 2;
        let len = 7 * cs + 4096;
        let f = File::create(&src).unwrap();
        f.set_len(len).unwrap();
        let mut bytes = vec![0u8; 3 * cs as usize];
        blake3::Hasher::new().finalize_xof().fill(&mut bytes);
        f.write_all_at(&bytes, cs / 2).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        let opts = |base| LocalCopyOptions {
            chunk_size: cs as u32,
            in_place: true,
            base,
            ..LocalCopyOptions::default()
        };
        let first = copy_local(&src, &dst, &opts(None)).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Change one byte in the second piece of chunk 1 and clear chunk 2's first piece.
        f.write_all_at(b"x", cs + PIECE as u64 + 5).unwrap();
        f.write_all_at(&vec![0u8; PIECE], 2 * cs).unwrap();
        let second = copy_local(&src, &dst, &opts(Some(first.manifest))).unwrap();
        assert_eq!(second.chunks_sent, 2);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(
            second.digest,
            chunks::image_digest(&dst, cs as u32).unwrap()
        );
    }

    #[test]
    fn a_base_of_another_length_keeps_only_chunks_it_describes() {
        let cs = 65536u32;
        let mut base = ChunkManifest::zeros(3 * 65536 + 10, cs).unwrap();
        for (i, d) in base.digests.iter_mut().enumerate() {
            *d = *blake3::hash(&[i as u8]).as_bytes();
        }
        let grown = held_from_base(&base, &Layout::new(6 * 65536, cs));
        assert_eq!(grown[1], Some(blake3::Hash::from_bytes(base.digests[1])));
        assert_eq!(grown[3], None, "the old last chunk grew");
        let zero = Layout::new(6 * 65536, cs).zero_digest(4);
        assert_eq!(grown[4], Some(zero));
        let shrunk = held_from_base(&base, &Layout::new(2 * 65536 + 5, cs));
        assert_eq!(shrunk.len(), 3);
        assert!(shrunk[0].is_some() && shrunk[1].is_some());
        assert_eq!(shrunk[2], None, "a chunk cut short is unknown");
    }
}
