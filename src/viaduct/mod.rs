//! Viaduct: the data path that carries disk images and volumes between two providers.
//!
//! - [`serve`] runs a receiver on a TCP listener; images land under [`ReceiverOptions::root`].
//! - [`send_file`] sends one image (a regular file or a block device) to a receiver
//!   ([`Endpoint`]) over [`SendOptions::streams`] parallel TCP connections.
//! - [`copy_local`] is the fast path when both ends are on one host; with
//!   [`LocalCopyOptions::in_place`] and [`LocalCopyOptions::base`] it is also the incremental
//!   copy into a staging file that pre-copy relocations use (pre-copy while the source runs,
//!   then a final pass that writes only the changed chunks).
//! - [`ChunkManifest`] is what a copy read, chunk by chunk ([`TransferReport::manifest`]);
//!   it is saved beside a staging image and handed to the next pass.
//! - [`image_digest`] computes the whole-image digest of a file, as both ends do.
//! - [`PresharedKey`] is the secret both ends hold; it never travels.
//!
//! # What travels, and what does not
//!
//! The image is cut into fixed-size chunks ([`SendOptions::chunk_size`], 1 MiB by default).
//! The sender reads only the allocated extents of the source (`SEEK_DATA`/`SEEK_HOLE`); a
//! chunk that is all zeros is never sent, the receiver leaves a hole there. Before any data
//! moves, the receiver reports the BLAKE3 of every chunk it already holds for that name (an
//! interrupted `<name>.partial` first, else a finished `<name>`), and the sender skips every
//! chunk that is already equal: this is both the resume after a broken connection and the
//! cheap re-sync of an image in which few blocks changed. Chunks that do travel are
//! compressed with zstd when it pays: samples must show the chunk shrinks (random data never
//! does), and, unless [`SendOptions::adaptive_compression`] is off, the wire (or the rate
//! cap) must be slower than the compressor, so a fast link is not slowed down by the CPU;
//! to a receiver on a loopback address without a rate cap, chunks always go raw.
//!
//! # Integrity and authentication
//!
//! Each TCP connection starts with a mutual challenge-response: both ends send a random
//! nonce and prove knowledge of the key with keyed BLAKE3 over both nonces (the receiver
//! proves first, so a sender never talks to an impostor). Every later frame carries a
//! keyed-BLAKE3 MAC under a per-connection session key, over the direction, a sequence
//! number and the frame's header. A chunk's header holds the BLAKE3 of the chunk's plain
//! bytes, which the receiver checks after decompression and before writing: together they
//! detect any change to a chunk on the way (the error names the chunk's offset).
//!
//! Between agents every connection is also TLS 1.3 with mutual authentication
//! ([`ReceiverOptions::tls`], [`Endpoint::with_tls`]): the receiver lets in only senders whose
//! certificate of the deployment's authority names an agent, and the sender checks that the
//! receiver's names the host it dialled, so the content is encrypted on the way. Without
//! TLS (`fluidcloud viaduct serve`, the same-host tests) frames are authenticated but not
//! encrypted: use that only on a private network or through a tunnel.
//!
//! # Protocol
//!
//! On every connection: `Hello` (sender nonce), `Challenge` (receiver nonce and proof),
//! `Response` (sender proof), `AuthOk`. The first connection then sends `Open` (name,
//! length, chunk size, stream count) and receives `Opened` (a transfer id and the digest of
//! every chunk the receiver holds); the other connections `Join` with that id. Each stream
//! carries `Chunk` and `Zero` frames for the chunks it takes and ends with `Done`, answered
//! by `DoneAck`; the first stream then sends `Commit` with the image digest, answered by
//! `Committed` once the file is in place. A failure at the receiver travels back as an
//! `Error` frame (wrong key, refused or busy name, full disk, altered chunk with its offset,
//! digest mismatch) and comes out of [`send_file`] as the matching [`ViaductError`]. Either
//! end sends keepalives while it is busy, so idle timeouts measure silence only.
//!
//! # The image digest
//!
//! With `n = ceil(length / chunk_size)` chunks, chunk `i` covering bytes
//! `[i * chunk_size, min((i + 1) * chunk_size, length))`:
//!
//! ```text
//! digest = BLAKE3( "fluidcloud-viaduct-image-v1" || le64(length) || le64(chunk_size)
//!                  || BLAKE3(chunk 0) || BLAKE3(chunk 1) || ... || BLAKE3(chunk n-1) )
//! ```
//!
//! Holes count as zero bytes. The sender computes it over what it read; the receiver over
//! what it holds (chunks it kept, hashed when the transfer opened, and chunks it received,
//! hashed after decompression). The receiver renames `<name>.partial` to `<name>` only when
//! both digests are equal; otherwise the old `<name>`, if any, stays untouched. The digest
//! depends on the chunk size: compare digests computed with the same one.
//!
//! The source must not change while it is read (stop the guest or send a snapshot): the
//! viaduct proves that the target equals what was read, not a point-in-time view.

mod auth;
mod chunks;
mod local;
mod manifest;
mod names;
mod receiver;
mod sender;
mod wire;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use auth::{PresharedKey, SecretError};
pub use chunks::image_digest;
pub use local::{copy_local, LocalCopyOptions, ProgressFn};
pub use manifest::{ChunkManifest, ManifestError};
pub use names::{check_name, NameError};
pub use receiver::{serve, OnCommit, ReceiverOptions};
pub use sender::{send_file, Endpoint, EndpointTls, SendOptions};
pub use wire::{read_frames, FrameStreamMode, FrameStreamSummary};

/// The default chunk size: small enough that a re-sync sends little more than what changed,
/// large enough that per-chunk costs (a frame, a MAC, a task hop) vanish.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// The smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// The largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// Why a chunk size is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkSizeError {
    #[error("chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes, got {0}")]
    OutOfRange(u32),
    #[error("chunk size must be a multiple of 4096 bytes, got {0}")]
    Unaligned(u32),
}

/// Checks a chunk size: a multiple of 4 KiB (so holes stay block-aligned) within bounds.
pub(crate) fn check_chunk_size(chunk_size: u32) -> Result<(), ChunkSizeError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ChunkSizeError::OutOfRange(chunk_size));
    }
    if !chunk_size.is_multiple_of(4096) {
        return Err(ChunkSizeError::Unaligned(chunk_size));
    }
    Ok(())
}

/// The whole-image digest (see the module documentation for its definition).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDigest(pub [u8; 32]);

impl ImageDigest {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageDigest({})", self.to_hex())
    }
}

impl Serialize for ImageDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// What a finished transfer did.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    /// Length of the image in bytes (the target has exactly this length).
    pub image_bytes: u64,
    pub chunk_size: u32,
    /// Bytes read from the source (allocated extents only).
    pub bytes_read: u64,
    /// Bytes the sender put on the wire, frames, MACs and handshakes included. For
    /// [`copy_local`], the bytes written to the target.
    pub bytes_sent: u64,
    pub chunks_total: u64,
    /// Chunks whose data travelled (or, locally, were written).
    pub chunks_sent: u64,
    /// Chunks of zeros: never sent as data; the target has a hole there.
    pub chunks_skipped_zero: u64,
    /// Chunks the target already held with the same content.
    pub chunks_skipped_equal: u64,
    /// The whole-image digest both ends agreed on.
    pub digest: ImageDigest,
    #[serde(rename = "duration_secs", with = "crate::model::secs_f64")]
    pub duration: Duration,
    /// Parallel TCP streams used (1 for a local copy).
    pub streams: usize,
    /// What the target held before: `none`, `partial` (an interrupted transfer) or `target`
    /// (an earlier version of the image). For an in-place [`copy_local`]: `target` when the
    /// base manifest was used, `partial` when the existing file was hashed instead.
    pub resumed_from: ResumedFrom,
    /// The digest of every chunk of the source as read; its
    /// [`ChunkManifest::image_digest`] is `digest`. Left out of the serialised report (it
    /// has one entry per chunk): save it with [`ChunkManifest::save`].
    #[serde(skip)]
    pub manifest: ChunkManifest,
}

/// What the receiver compared the image against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumedFrom {
    /// Nothing under that name: every non-zero chunk travels.
    None,
    /// `<name>.partial` from an interrupted transfer.
    Partial,
    /// A finished `<name>` from an earlier transfer.
    Target,
}

/// Where a transfer is, for progress bars and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting, authenticating, and waiting for the receiver to hash what it holds (for a
    /// local copy: hashing the existing target).
    Comparing,
    Transferring,
    /// All chunks are through; the receiver checks the image digest and renames (for a
    /// local copy: re-reading the target when asked, and flushing).
    Verifying,
}

/// A snapshot of a running transfer, handed to the progress callback a few times a second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub image_bytes: u64,
    pub chunks_total: u64,
    /// Chunks handled so far in this phase (sent or skipped; for a local copy's
    /// `comparing` and `verifying`, hashed).
    pub chunks_done: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    #[serde(rename = "elapsed_secs", with = "crate::model::secs_f64")]
    pub elapsed: Duration,
}

/// Everything that can go wrong on the viaduct. Errors the receiver detects travel back to
/// the sender and arrive here as the same variants, with the receiver's address as `peer`.
#[derive(Debug, thiserror::Error)]
pub enum ViaductError {
    #[error("the source image {} does not exist", path.display())]
    SourceMissing { path: PathBuf },
    #[error("cannot read the source image {}: {source}", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the disk holding {what} is full: {detail}")]
    TargetDiskFull { what: String, detail: String },
    #[error("cannot connect to the receiver at {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection with {peer} dropped: {detail}")]
    ConnectionDropped { peer: String, detail: String },
    #[error("authentication with {peer} failed: {detail}")]
    WrongKey { peer: String, detail: String },
    #[error("data was altered on the way to {peer}: {detail}")]
    Tampered {
        peer: String,
        offset: u64,
        detail: String,
    },
    #[error("the image digest does not match at {at}: {detail}")]
    DigestMismatch { at: String, detail: String },
    #[error("the name `{name}` is refused for the receiver at {peer}: {detail}")]
    NameRefused {
        peer: String,
        name: String,
        detail: String,
    },
    #[error(
        "the receiver at {peer} is busy with `{name}`: another transfer of that name is running"
    )]
    Busy { peer: String, name: String },
    #[error("the receiver at {peer} failed: {detail}")]
    Remote { peer: String, detail: String },
    #[error("protocol error with {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("invalid viaduct options: {0}")]
    InvalidOptions(String),
    #[error("the pre-shared key {}: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    #[error("the receiver root {}: {detail}", path.display())]
    Root { path: PathBuf, detail: String },
    #[error("the chunk manifest {}: {detail}", path.display())]
    Manifest { path: PathBuf, detail: String },
    #[error("the transfer was cancelled")]
    Cancelled,
    #[error("internal failure of the viaduct: {0}")]
    Internal(String),
}

#[cfg(test)]
mod tls_tests;
