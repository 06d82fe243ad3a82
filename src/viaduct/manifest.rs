//! Chunk manifests: the digest of every chunk of an image as it was read, kept between the
//! passes of an incremental copy.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chunks::{self, Layout};
use super::{check_chunk_size, ChunkSizeError, ImageDigest, ViaductError};

/// What an image held, chunk by chunk: its length, the chunk size, and the BLAKE3 of every
/// chunk (`ceil(length / chunk_size)` of them, holes hashed as zeros).
///
/// A copy returns the manifest of its source as read ([`super::TransferReport::manifest`]);
/// handed back as [`super::LocalCopyOptions::base`] to the next pass into the same staging
/// file, it lets that pass skip every chunk that did not change.
///
/// Serialised with serde, digests are lower-case hex strings. [`ChunkManifest::save`] writes
/// a compact binary file instead (32 bytes per chunk and a checksum), since a manifest of a
/// large volume has millions of entries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkManifest {
    pub length: u64,
    pub chunk_size: u32,
    #[serde(with = "hex_digests")]
    pub digests: Vec<[u8; 32]>,
}

/// Start of a manifest file; the last byte is the format version.
const MAGIC: [u8; 8] = *b"FCVDMAN\x01";
/// Magic, length, chunk size, chunk count.
const HEAD_LEN: usize = 8 + 8 + 4 + 8;
const CHECK_LEN: usize = 32;

impl ChunkManifest {
    /// The manifest of an image every chunk of which holds zeros (an empty sparse file).
    pub fn zeros(length: u64, chunk_size: u32) -> Result<Self, ViaductError> {
        check_chunk_size(chunk_size).map_err(|e| ViaductError::InvalidOptions(e.to_string()))?;
        let layout = Layout::new(length, chunk_size);
        Ok(ChunkManifest {
            length,
            chunk_size,
            digests: (0..layout.chunks)
                .map(|i| *layout.zero_digest(i).as_bytes())
                .collect(),
        })
    }

    pub(crate) fn from_hashes(layout: &Layout, digests: &[blake3::Hash]) -> Self {
        ChunkManifest {
            length: layout.length,
            chunk_size: layout.chunk_size,
            digests: digests.iter().map(|d| *d.as_bytes()).collect(),
        }
    }

    /// Number of chunks the manifest covers.
    pub fn chunks(&self) -> u64 {
        self.digests.len() as u64
    }

    /// The whole-image digest (see the module documentation), equal to
    /// [`super::image_digest`] of the image the manifest describes.
    pub fn image_digest(&self) -> ImageDigest {
        chunks::digest_over(
            self.length,
            self.chunk_size,
            self.digests.iter().map(|d| &d[..]),
        )
    }

    /// Checks that the manifest is consistent: a valid chunk size and one digest per chunk.
    pub fn check(&self) -> Result<(), ManifestError> {
        check_chunk_size(self.chunk_size)?;
        let expected = self.length.div_ceil(u64::from(self.chunk_size));
        if self.chunks() != expected {
            return Err(ManifestError::ChunkCount {
                length: self.length,
                chunk_size: self.chunk_size,
                expected,
                listed: self.chunks(),
            });
        }
        Ok(())
    }

    /// Indices of the chunks whose digests differ between `self` and `other`, which must
    /// describe images of the same length and chunk size (else `None`).
    pub fn changed_chunks(&self, other: &ChunkManifest) -> Option<Vec<u64>> {
        if self.length != other.length || self.chunk_size != other.chunk_size {
            return None;
        }
        Some(
            self.digests
                .iter()
                .zip(&other.digests)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i as u64)
                .collect(),
        )
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD_LEN + self.digests.len() * 32 + CHECK_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.chunks().to_le_bytes());
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let check = blake3::hash(&out);
        out.extend_from_slice(check.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < HEAD_LEN + CHECK_LEN {
            return Err(ManifestError::TooShort { len: bytes.len() });
        }
        if bytes[..7] != MAGIC[..7] {
            return Err(ManifestError::NotAManifest);
        }
        if bytes[7] != MAGIC[7] {
            return Err(ManifestError::Version {
                found: bytes[7],
                supported: MAGIC[7],
            });
        }
        let le64 = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let length = le64(8);
        let mut cs = [0u8; 4];
        cs.copy_from_slice(&bytes[16..20]);
        let chunk_size = u32::from_le_bytes(cs);
        let count = le64(20);
        let expected = count
            .checked_mul(32)
            .and_then(|n| n.checked_add((HEAD_LEN + CHECK_LEN) as u64));
        if expected != Some(bytes.len() as u64) {
            return Err(ManifestError::Truncated {
                count,
                len: bytes.len(),
            });
        }
        let (body, check) = bytes.split_at(bytes.len() - CHECK_LEN);
        if blake3::hash(body).as_bytes()[..] != check[..] {
            return Err(ManifestError::Checksum);
        }
        let digests = body[HEAD_LEN..]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let manifest = ChunkManifest {
            length,
            chunk_size,
            digests,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Writes the manifest to `path` atomically: into a temporary file beside it, flushed,
    /// then renamed over `path`, so a crash leaves either the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<(), ViaductError> {
        let fail = |detail: String| ViaductError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        self.check()
            .map_err(|e| fail(format!("refusing to save an inconsistent manifest: {e}")))?;
        crate::sys::fs::write_atomic(path, &self.encode())
            .map_err(|e| fail(format!("cannot write it: {e}")))
    }

    /// Reads a manifest written by [`ChunkManifest::save`]. A missing, truncated, corrupt or
    /// inconsistent file is a [`ViaductError::Manifest`] saying which.
    pub fn load(path: &Path) -> Result<Self, ViaductError> {
        Self::load_if_exists(path)?.ok_or_else(|| ViaductError::Manifest {
            path: path.to_path_buf(),
            detail: "it does not exist".into(),
        })
    }

    /// Like [`ChunkManifest::load`], but a missing file is `Ok(None)`: there was no earlier
    /// pass, or it did not finish.
    pub fn load_if_exists(path: &Path) -> Result<Option<Self>, ViaductError> {
        let fail = |detail: String| ViaductError::Manifest {
            path: path.to_path_buf(),
            detail,
        };
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => f
                .read_to_end(&mut bytes)
                .map_err(|e| fail(format!("cannot read it: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fail(format!("cannot open it: {e}"))),
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }

    /// The conventional place of the manifest of a staging image: `<image>.manifest`.
    pub fn path_for(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_owned();
        name.push(".manifest");
        PathBuf::from(name)
    }
}

impl fmt::Debug for ChunkManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkManifest")
            .field("length", &self.length)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.digests.len())
            .field("image_digest", &self.image_digest())
            .finish()
    }
}

/// Why a chunk manifest is refused: inconsistent, or a file that is not a sound manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    ChunkSize(#[from] ChunkSizeError),
    #[error(
        "{length} bytes in chunks of {chunk_size} bytes make {expected} chunks, the manifest lists {listed}"
    )]
    ChunkCount {
        length: u64,
        chunk_size: u32,
        expected: u64,
        listed: u64,
    },
    #[error("it holds {len} bytes, too few for a chunk manifest")]
    TooShort { len: usize },
    #[error("it is not a viaduct chunk manifest")]
    NotAManifest,
    #[error(
        "it is a chunk manifest of format version {found}, this build reads version {supported}"
    )]
    Version { found: u8, supported: u8 },
    #[error(
        "its header announces {count} chunks but the file holds {len} bytes: it is truncated or corrupt"
    )]
    Truncated { count: u64, len: usize },
    #[error("its checksum does not match its content: the file is corrupt")]
    Checksum,
}

mod hex_digests {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(digests: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            digests
                .iter()
                .map(|d| crate::viaduct::ImageDigest(*d).to_hex()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let hex: Vec<String> = Vec::deserialize(d)?;
        hex.iter()
            .enumerate()
            .map(|(i, h)| parse(h).map_err(|e| D::Error::custom(format!("digest {i}: {e}"))))
            .collect()
    }

    /// Why a digest is not 64 hex digits.
    #[derive(Debug, thiserror::Error)]
    pub enum HexDigestError {
        #[error("expected 64 hex digits, got {0} characters")]
        Length(usize),
        #[error("`{0}` is not a hex digit")]
        NotHex(char),
    }

    fn parse(h: &str) -> Result<[u8; 32], HexDigestError> {
        if h.len() != 64 {
            return Err(HexDigestError::Length(h.len()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in h.as_bytes().chunks_exact(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(HexDigestError::NotHex(c as char)),
            };
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChunkManifest {
        let mut m = ChunkManifest::zeros(3 * 65536 + 100, 65536).unwrap();
        m.digests[1] = *blake3::hash(b"one").as_bytes();
        m
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.manifest");
        let m = sample();
        m.save(&path).unwrap();
        assert_eq!(ChunkManifest::load(&path).unwrap(), m);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left behind"
        );
        assert!(ChunkManifest::load_if_exists(&dir.path().join("none"))
            .unwrap()
            .is_none());
        let err = ChunkManifest::load(&dir.path().join("none")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let cases: [(Vec<u8>, &str); 4] = [
            (good[..good.len() - 1].to_vec(), "truncated"),
            (
                {
                    let mut b = good.clone();
                    b[HEAD_LEN + 40] ^= 1;
                    b
                },
                "checksum",
            ),
            (
                b"not a manifest at all, just some text. ".repeat(3),
                "not a viaduct",
            ),
            (
                {
                    let mut b = good.clone();
                    b[7] = 9;
                    b
                },
                "version 9",
            ),
        ];
        for (bytes, want) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let err = ChunkManifest::load(&path).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("/m"), "{want}: {err}");
        }
    }

    #[test]
    fn json_uses_hex_and_checks_digests() {
        let m = sample();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(&ImageDigest(m.digests[1]).to_hex()), "{json}");
        let back: ChunkManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        let bad = json.replacen(&ImageDigest(m.digests[1]).to_hex()[..2], "zz", 1);
        let err = serde_json::from_str::<ChunkManifest>(&bad).unwrap_err();
        assert!(err.to_string().contains("digest 1"), "{err}");
    }

    #[test]
    fn image_digest_matches_the_layout_and_inconsistency_is_named() {
        let m = sample();
        let layout = Layout::new(m.length, m.chunk_size);
        let hashes: Vec<_> = m
            .digests
            .iter()
            .map(|d| blake3::Hash::from_bytes(*d))
            .collect();
        assert_eq!(m.image_digest(), layout.image_digest(&hashes));
        let mut short = m.clone();
        short.digests.pop();
        assert!(short.check().unwrap_err().to_string().contains("lists 3"));
        assert_eq!(m.changed_chunks(&sample()), Some(vec![]));
        let mut other = m.clone();
        other.digests[3] = [7; 32];
        assert_eq!(m.changed_chunks(&other), Some(vec![3]));
    }
}
