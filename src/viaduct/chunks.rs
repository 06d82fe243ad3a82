//! Chunk layout, sparse file access and digests: the parts both ends share.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{check_chunk_size, ImageDigest, ViaductError};

/// The block size at which the writers look for zeros: holes smaller than this would not
/// save space on any common file system.
pub(crate) const SPARSE_BLOCK: usize = 4096;

const DIGEST_TAG: &[u8] = b"fluidcloud-viaduct-image-v1";

/// The largest single write into a target. The page cache allocates a folio as large as the
/// write allows, and on a guest whose balloon reports free memory to the host, writes of
/// 1 MiB measured 1.5–3× the CPU per byte of writes of 256 KiB (probably because the large
/// free blocks are the reported ones, which fault in the host when touched again; see
/// BENCHMARKS.md). Smaller pieces gained nothing more.
pub(crate) const WRITE_PIECE: usize = 256 << 10;

/// How an image of `length` bytes is cut into chunks.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub length: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    zero_full: blake3::Hash,
    zero_last: blake3::Hash,
}

impl Layout {
    pub fn new(length: u64, chunk_size: u32) -> Self {
        let cs = u64::from(chunk_size);
        let chunks = length.div_ceil(cs);
        let last_len = if chunks == 0 {
            0
        } else {
            length - (chunks - 1) * cs
        };
        let zeros = vec![0u8; chunk_size as usize];
        Layout {
            length,
            chunk_size,
            chunks,
            zero_full: blake3::hash(&zeros),
            zero_last: blake3::hash(&zeros[..last_len as usize]),
        }
    }

    /// Offset and length of chunk `index` (which must be below `chunks`).
    pub fn range(&self, index: u64) -> (u64, usize) {
        let cs = u64::from(self.chunk_size);
        let offset = index * cs;
        (offset, (self.length - offset).min(cs) as usize)
    }

    /// The digest of chunk `index` when it holds only zeros.
    pub fn zero_digest(&self, index: u64) -> blake3::Hash {
        if index + 1 == self.chunks {
            self.zero_last
        } else {
            self.zero_full
        }
    }

    /// The whole-image digest over the ordered chunk digests.
    pub fn image_digest(&self, digests: &[blake3::Hash]) -> ImageDigest {
        digest_over(
            self.length,
            self.chunk_size,
            digests.iter().map(|d| &d.as_bytes()[..]),
        )
    }
}

/// The whole-image digest of an image of `length` bytes in chunks of `chunk_size`, over
/// its ordered chunk digests.
pub(crate) fn digest_over<'a>(
    length: u64,
    chunk_size: u32,
    digests: impl Iterator<Item = &'a [u8]>,
) -> ImageDigest {
    let mut h = blake3::Hasher::new();
    h.update(DIGEST_TAG);
    h.update(&length.to_le_bytes());
    h.update(&u64::from(chunk_size).to_le_bytes());
    for d in digests {
        h.update(d);
    }
    ImageDigest(*h.finalize().as_bytes())
}

/// How many threads read and hash one image: one per core, so hashing (the bulk of the
/// CPU work) scales, but at least two so that one thread's wait for the disk overlaps
/// another's hashing, and at most eight, past which a single file's page cache and the
/// disk queue stop scaling.
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
}

/// How often [`map_chunks`] calls its `tick` while the workers run.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Runs `work` for every chunk index below `count` on up to `threads` scoped threads, each
/// taking the next index when it is free and keeping its own `S` (buffers) across chunks,
/// and returns the results in index order. The first error stops the other threads after
/// their current chunk and is returned. `tick` runs on the calling thread every [`TICK`]
/// while the workers run (for progress reports).
pub(crate) fn map_chunks<S, T, E, F>(
    count: u64,
    threads: usize,
    work: F,
    tick: &mut dyn FnMut(),
) -> Result<Vec<T>, E>
where
    S: Default,
    T: Send,
    E: Send,
    F: Fn(u64, &mut S) -> Result<T, E> + Sync,
{
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let threads = threads.clamp(1, count.clamp(1, 64) as usize);
    let (done_tx, done_rx) = mpsc::channel::<Result<Vec<(u64, T)>, E>>();
    let worker = || {
        let mut state = S::default();
        let mut out = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let index = next.fetch_add(1, Ordering::Relaxed);
            if index >= count {
                return Ok(out);
            }
            match work(index, &mut state) {
                Ok(t) => out.push((index, t)),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    std::thread::scope(|scope| {
        let mut spawned = 0;
        for _ in 0..threads {
            let (worker, done) = (&worker, done_tx.clone());
            let started = std::thread::Builder::new()
                .name("viaduct-chunks".into())
                .spawn_scoped(scope, move || {
                    let _ = done.send(worker());
                });
            spawned += usize::from(started.is_ok());
        }
        if spawned == 0 {
            // No thread could be started (a process at its thread limit): do the work here,
            // slower and without progress reports, rather than fail.
            let _ = done_tx.send(worker());
        }
        drop(done_tx);
        let mut slots: Vec<Option<T>> = (0..count).map(|_| None).collect();
        let mut failure = None;
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match done_rx.recv_timeout(wait) {
                Ok(Ok(part)) => {
                    for (i, t) in part {
                        slots[i as usize] = Some(t);
                    }
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tick();
                    next_tick = Instant::now() + TICK;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        match failure {
            Some(e) => Err(e),
            // Without a failure no thread stopped early, so every index was claimed once.
            None => Ok(slots.into_iter().flatten().collect()),
        }
    })
}

/// The unit in which local copies and scans read, hash, write and read back a chunk. Small
/// enough that a thread's buffer stays in its core's L2 cache between the read, the hash
/// and the write: reading into a 1 MiB buffer measured four times the CPU per byte of
/// reading into one of 128 KiB (see BENCHMARKS.md), and a chunk need not be held whole to
/// be hashed.
pub(crate) const PIECE: usize = 128 << 10;

/// Zeros to hash in place of the leading zero pieces of a chunk that turned out to hold data.
static ZEROS: [u8; PIECE] = [0; PIECE];

/// A BLAKE3 hasher that does not hash a chunk at all while it holds only zeros: their
/// digest is known in advance.
pub(crate) struct ChunkHasher {
    hasher: blake3::Hasher,
    /// Bytes of leading zeros not hashed yet.
    zeros: usize,
    data: bool,
}

impl ChunkHasher {
    pub fn new() -> Self {
        ChunkHasher {
            hasher: blake3::Hasher::new(),
            zeros: 0,
            data: false,
        }
    }

    pub fn update(&mut self, piece: &[u8], zero: bool) {
        if self.data {
            self.hasher.update(piece);
        } else if zero {
            self.zeros += piece.len();
        } else {
            while self.zeros > 0 {
                let n = self.zeros.min(PIECE);
                self.hasher.update(&ZEROS[..n]);
                self.zeros -= n;
            }
            self.hasher.update(piece);
            self.data = true;
        }
    }

    /// The digest, and whether the chunk held only zeros.
    pub fn finish(&self, zero_digest: blake3::Hash) -> (blake3::Hash, bool) {
        if self.data {
            (self.hasher.finalize(), false)
        } else {
            (zero_digest, true)
        }
    }
}

/// The digest of chunk `index` of `file` as it is now (holes and bytes past `extents`
/// read as zeros), read in [`PIECE`]s through `buf`. Returns the digest and the bytes read.
pub(crate) fn hash_chunk(
    file: &File,
    extents: &[Range<u64>],
    layout: &Layout,
    index: u64,
    buf: &mut Vec<u8>,
) -> io::Result<(blake3::Hash, u64)> {
    let (offset, len) = layout.range(index);
    let zero_digest = layout.zero_digest(index);
    if !overlaps(extents, offset, len as u64) {
        return Ok((zero_digest, 0));
    }
    buf.resize(PIECE.min(len), 0);
    let mut hasher = ChunkHasher::new();
    let (mut at, mut read) = (0usize, 0u64);
    while at < len {
        let n = (len - at).min(PIECE);
        let piece = &mut buf[..n];
        read += read_sparse(file, extents, offset + at as u64, piece)?;
        hasher.update(piece, is_zero(piece));
        at += n;
    }
    Ok((hasher.finish(zero_digest).0, read))
}

/// The allocated extents of `file` within `[0, length)`, in order. A file system that cannot
/// report holes makes the whole file one extent, which is correct, only slower.
pub(crate) fn data_extents(file: &File, length: u64) -> io::Result<Vec<Range<u64>>> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < length {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(data) => data,
            Err(e) => {
                let err = io::Error::from(e);
                return match err.raw_os_error() {
                    Some(libc::ENXIO) => Ok(extents),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if extents.is_empty() => {
                        Ok(std::iter::once(0..length).collect())
                    }
                    _ => Err(err),
                };
            }
        };
        if data >= length {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data))?;
        let end = hole.min(length);
        extents.push(data..end);
        pos = end;
    }
    Ok(extents)
}

/// Reads `buf.len()` bytes at `offset` into `buf`, reading only what `extents` says is
/// allocated and zero-filling the rest. Returns the bytes actually read.
pub(crate) fn read_sparse(
    file: &File,
    extents: &[Range<u64>],
    offset: u64,
    buf: &mut [u8],
) -> io::Result<u64> {
    let end = offset + buf.len() as u64;
    let first = extents.partition_point(|e| e.end <= offset);
    let mut cursor = offset;
    let mut read = 0;
    for e in extents[first..].iter().take_while(|e| e.start < end) {
        let from = e.start.max(offset);
        let to = e.end.min(end);
        buf[(cursor - offset) as usize..(from - offset) as usize].fill(0);
        let slice = &mut buf[(from - offset) as usize..(to - offset) as usize];
        read_exact_at_or_zero(file, slice, from)?;
        read += to - from;
        cursor = to;
    }
    buf[(cursor - offset) as usize..].fill(0);
    Ok(read)
}

/// `read_exact_at`, except that a file which shrank under us reads as zeros past its end
/// instead of failing: the digest then describes what was read, and the receiver holds
/// exactly that.
fn read_exact_at_or_zero(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `buf` holds only zeros. The inner fold has no early exit so that it vectorises;
/// the outer loop stops at the first block with data, which is where random data stops.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(SPARSE_BLOCK)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Whether a block holds any non-zero byte. Data blocks almost always show it in their
/// first bytes, so those are looked at before the whole block is folded.
fn block_has_data(block: &[u8]) -> bool {
    let head = block.len().min(64);
    block[..head].iter().any(|&b| b != 0) || block.iter().fold(0u8, |acc, &b| acc | b) != 0
}

/// Writes `data` at `offset`, leaving holes for its all-zero 4 KiB blocks. When the region
/// may hold old data (`region_was_zero` false), zero blocks are punched out instead of
/// skipped. Returns the bytes written.
pub(crate) fn write_sparse(
    file: &File,
    offset: u64,
    data: &[u8],
    region_was_zero: bool,
) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start = 0usize;
    let mut run_is_data = None::<bool>;
    let mut flush = |start: usize, end: usize, is_data: bool| -> io::Result<()> {
        if is_data {
            let mut at = start;
            while at < end {
                let to = end.min(at + WRITE_PIECE);
                file.write_all_at(&data[at..to], offset + at as u64)?;
                at = to;
            }
            written += (end - start) as u64;
        } else if !region_was_zero {
            punch_hole(file, offset + start as u64, (end - start) as u64)?;
        }
        Ok(())
    };
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let is_data = block_has_data(block);
        let pos = i * SPARSE_BLOCK;
        match run_is_data {
            Some(kind) if kind == is_data => {}
            Some(kind) => {
                flush(run_start, pos, kind)?;
                run_start = pos;
                run_is_data = Some(is_data);
            }
            None => run_is_data = Some(is_data),
        }
    }
    if let Some(kind) = run_is_data {
        flush(run_start, data.len(), kind)?;
    }
    Ok(written)
}

/// Makes `[offset, offset + len)` read as zeros, freeing its blocks where the file system
/// can; where it cannot, zeros are written. On a block device the kernel zeroes the range
/// (unmapping it where the device can); a device that cannot, or a range not aligned to its
/// sectors (the end of an image of odd length), gets zeros written.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    use rustix::fs::{fallocate, FallocateFlags};
    let punched = fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    );
    match punched {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Digests of every chunk of `file` as it is now, for `layout` (the file may be shorter or
/// longer; bytes past its end count as zeros). Holes are not read; chunks are hashed on
/// [`worker_threads`] threads.
pub(crate) fn hash_file(file: &File, layout: &Layout) -> io::Result<Vec<blake3::Hash>> {
    let file_len = file.metadata()?.len().min(layout.length);
    let extents = data_extents(file, file_len)?;
    map_chunks(
        layout.chunks,
        worker_threads(),
        |index, buf: &mut Vec<u8>| {
            hash_chunk(file, &extents, layout, index, buf).map(|(digest, _)| digest)
        },
        &mut || {},
    )
}

/// Copies the content of `src` into the empty file `dst` for `layout` (bytes of `src` past
/// the layout are left out), keeping holes, and returns the digest of every chunk.
pub(crate) fn copy_and_hash(
    src: &File,
    dst: &File,
    layout: &Layout,
) -> Result<Vec<blake3::Hash>, CopyError> {
    let src_len = src
        .metadata()
        .map_err(CopyError::Read)?
        .len()
        .min(layout.length);
    let extents = data_extents(src, src_len).map_err(CopyError::Read)?;
    map_chunks(
        layout.chunks,
        worker_threads(),
        |index, buf: &mut Vec<u8>| {
            let (offset, len) = layout.range(index);
            let zero_digest = layout.zero_digest(index);
            if !overlaps(&extents, offset, len as u64) {
                return Ok(zero_digest);
            }
            buf.resize(PIECE.min(len), 0);
            let mut hasher = ChunkHasher::new();
            let mut at = 0usize;
            while at < len {
                let n = (len - at).min(PIECE);
                let piece = &mut buf[..n];
                let pos = offset + at as u64;
                read_sparse(src, &extents, pos, piece).map_err(CopyError::Read)?;
                let zero = is_zero(piece);
                if !zero {
                    write_sparse(dst, pos, piece, true).map_err(CopyError::Write)?;
                }
                hasher.update(piece, zero);
                at += n;
            }
            Ok(hasher.finish(zero_digest).0)
        },
        &mut || {},
    )
}

#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Whether any extent intersects `[offset, offset + len)`.
pub(crate) fn overlaps(extents: &[Range<u64>], offset: u64, len: u64) -> bool {
    let first = extents.partition_point(|e| e.end <= offset);
    extents.get(first).is_some_and(|e| e.start < offset + len)
}

/// Shares the blocks of `src` with `dst` (a reflink), where the file system can.
pub(crate) fn try_clone(src: &File, dst: &File) -> bool {
    rustix::fs::ioctl_ficlone(dst, src).is_ok()
}

/// Length of a regular file or block device opened as `file`.
pub(crate) fn image_length(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        return Ok(meta.len());
    }
    if kind.is_block_device() {
        // The end of a block device is its size.
        return Ok(rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "not a regular file or a block device",
    ))
}

/// The whole-image digest of the file at `path` for `chunk_size`, as defined in the module
/// documentation: equal to [`super::TransferReport::digest`] of a transfer of that file.
pub fn image_digest(path: &Path, chunk_size: u32) -> Result<ImageDigest, ViaductError> {
    check_chunk_size(chunk_size).map_err(|e| ViaductError::InvalidOptions(e.to_string()))?;
    let file = open_source(path)?;
    let source = |source| ViaductError::Source {
        path: path.to_path_buf(),
        source,
    };
    let layout = Layout::new(image_length(&file).map_err(source)?, chunk_size);
    let digests = hash_file(&file, &layout).map_err(source)?;
    Ok(layout.image_digest(&digests))
}

/// Opens a source image for reading, telling a missing file apart from other failures.
pub(crate) fn open_source(path: &Path) -> Result<File, ViaductError> {
    File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            ViaductError::SourceMissing {
                path: path.to_path_buf(),
            }
        } else {
            ViaductError::Source {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(dir: &Path, len: u64, data: &[(u64, &[u8])]) -> File {
        let path = dir.join("img");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        for (off, bytes) in data {
            f.write_all_at(bytes, *off).unwrap();
        }
        f
    }

    #[test]
    fn extents_follow_written_regions() {
        let dir = tempfile::tempdir().unwrap();
        let f = sparse_file(
            dir.path(),
            4 << 20,
            &[(1 << 20, &[7u8; 8192]), (3 << 20, &[9u8; 4096])],
        );
        let ext = data_extents(&f, 4 << 20).unwrap();
        let covered: u64 = ext.iter().map(|e| e.end - e.start).sum();
        // File systems may round extents up, never below what was written.
        assert!((12288..1 << 20).contains(&covered), "extents {ext:?}");
        assert!(overlaps(&ext, 1 << 20, 1));
        assert!(!overlaps(&ext, 2 << 20, 4096));
    }

    #[test]
    fn read_sparse_equals_plain_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = sparse_file(
            dir.path(),
            1 << 20,
            &[(5000, b"hello"), (700_000, &[3u8; 70_000])],
        );
        let ext = data_extents(&f, 1 << 20).unwrap();
        for (off, len) in [(0u64, 1usize << 20), (4096, 8192), (699_999, 100_000)] {
            let mut a = vec![0xffu8; len];
            read_sparse(&f, &ext, off, &mut a).unwrap();
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, off).unwrap();
            assert!(a == b, "mismatch at {off}+{len}");
        }
    }

    #[test]
    fn write_sparse_leaves_holes_and_punches_old_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = sparse_file(dir.path(), 0, &[]);
        let mut data = vec![0u8; 64 << 10];
        data[10_000] = 1;
        data[60_000..61_000].fill(2);
        let written = write_sparse(&f, 0, &data, true).unwrap();
        assert_eq!(written, 8192, "two 4 KiB blocks hold data");
        // Old data under a zero block must go when the region was not known to be zero.
        f.write_all_at(&[5u8; 64 << 10], 64 << 10).unwrap();
        write_sparse(&f, 64 << 10, &data, false).unwrap();
        let mut back = vec![0u8; 64 << 10];
        f.read_exact_at(&mut back, 64 << 10).unwrap();
        assert!(back == data);
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 1 << 20];
        assert!(is_zero(&buf));
        buf[(1 << 20) - 1] = 1;
        assert!(!is_zero(&buf));
        assert!(is_zero(&[]));
    }

    #[test]
    fn layout_ranges_and_digest_depend_on_every_chunk() {
        let l = Layout::new(3 * 65536 + 10, 65536);
        assert_eq!(l.chunks, 4);
        assert_eq!(l.range(3), (3 * 65536, 10));
        assert_eq!(l.zero_digest(3), blake3::hash(&[0u8; 10]));
        let d: Vec<_> = (0..4).map(|i| l.zero_digest(i)).collect();
        let mut d2 = d.clone();
        d2[1] = blake3::hash(b"x");
        assert_ne!(l.image_digest(&d), l.image_digest(&d2));
        let other = Layout::new(3 * 65536 + 11, 65536);
        assert_ne!(l.image_digest(&d), other.image_digest(&d));
    }

    #[test]
    fn hash_file_matches_plain_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = sparse_file(dir.path(), 300_000, &[(70_000, &[1u8; 100_000])]);
        let layout = Layout::new(300_000, 65536);
        let digests = hash_file(&f, &layout).unwrap();
        let all = std::fs::read(dir.path().join("img")).unwrap();
        for (i, d) in digests.iter().enumerate() {
            let (off, len) = layout.range(i as u64);
            assert_eq!(*d, blake3::hash(&all[off as usize..off as usize + len]));
        }
    }
}
