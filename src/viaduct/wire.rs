//! The viaduct's wire format: framed messages, their encoding, and MAC'd reading and writing
//! with idle timeouts.
//!
//! A frame is `kind u8 | header_len u32 | body_len u32 | header | body | mac[32]`, integers
//! little-endian. The MAC is present once the connection is authenticated; it is keyed
//! BLAKE3 under the session key over `direction | seq | kind | header_len | body_len |
//! header | body`, except that a chunk's body is left out: the chunk header carries the
//! BLAKE3 of the plain chunk, which the receiver checks after decompression, so the body is
//! bound to the MAC through it without being hashed twice.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth::SessionKey;

use super::ResumedFrom;
use crate::sys::rate::RateLimiter;

/// The read half of a connection, plain TCP or TLS.
pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a connection, plain TCP or TLS.
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// Splits a plain TCP connection into the halves frames travel on (each owns its half: no
/// lock between reader and writer).
pub(crate) fn split_tcp(stream: tokio::net::TcpStream) -> (BoxRead, BoxWrite) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

/// Splits a connection (a TLS stream) into the halves frames travel on.
pub(crate) fn split<S>(stream: S) -> (BoxRead, BoxWrite)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}

pub(crate) const MAGIC: [u8; 4] = *b"FCVD";
pub(crate) const VERSION: u16 = 1;

/// Frames towards the receiver and towards the sender are MAC'd apart, so a frame cannot be
/// reflected back to its author.
pub(crate) const TO_RECEIVER: u8 = 0x52;
pub(crate) const TO_SENDER: u8 = 0x53;

const PREAMBLE: usize = 9;
const MAC_LEN: usize = 32;
const MAX_HEADER: u32 = 64 << 10;
/// Large enough for a 64 MiB chunk that did not compress and for the digest list of an
/// image of four million chunks.
const MAX_BODY: u32 = 136 << 20;
/// Before authentication a peer gets no more than this per frame.
const MAX_UNAUTHENTICATED: u32 = 4096;
/// Under a rate limit, bodies are written in pieces of this size so that bytes flow
/// steadily and the receiver's idle timeout never sees a long silence.
const WRITE_PIECE: usize = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Hello = 1,
    Challenge = 2,
    Response = 3,
    AuthOk = 4,
    Open = 5,
    Opened = 6,
    Join = 7,
    Joined = 8,
    Chunk = 9,
    Zero = 10,
    Done = 11,
    DoneAck = 12,
    Commit = 13,
    Committed = 14,
    Keepalive = 15,
    Error = 16,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Challenge,
            3 => Response,
            4 => AuthOk,
            5 => Open,
            6 => Opened,
            7 => Join,
            8 => Joined,
            9 => Chunk,
            10 => Zero,
            11 => Done,
            12 => DoneAck,
            13 => Commit,
            14 => Committed,
            15 => Keepalive,
            16 => Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Encoding {
    Raw = 0,
    Zstd = 1,
}

/// Why the receiver (or, for `WrongKey`, either end) gave up; carried in `Error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ErrorCode {
    WrongKey = 1,
    BadName = 2,
    Busy = 3,
    DiskFull = 4,
    Tampered = 5,
    DigestMismatch = 6,
    Io = 7,
    Protocol = 8,
    Shutdown = 9,
    Invalid = 10,
}

impl ErrorCode {
    fn from_u8(b: u8) -> ErrorCode {
        use ErrorCode::*;
        match b {
            1 => WrongKey,
            2 => BadName,
            3 => Busy,
            4 => DiskFull,
            5 => Tampered,
            6 => DigestMismatch,
            7 => Io,
            9 => Shutdown,
            10 => Invalid,
            _ => Protocol,
        }
    }
}

/// How often an end that is busy, or waiting on its own other streams, tells the peer it
/// is alive. Both ends' idle timeouts must be well above it.
pub(crate) const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// The shortest idle timeout accepted: two keepalives may be missed.
pub(crate) const MIN_IDLE: Duration = Duration::from_secs(15);

/// Offset value meaning "no particular chunk".
pub(crate) const NO_OFFSET: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub(crate) enum Msg {
    Hello {
        version: u16,
        nonce: [u8; 32],
    },
    Challenge {
        version: u16,
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Response {
        proof: [u8; 32],
    },
    AuthOk,
    Open {
        length: u64,
        chunk_size: u32,
        streams: u16,
        allocated: u64,
        name: String,
    },
    /// The body holds the receiver's chunk digests, unless `resumed` is `None` (all zero).
    Opened {
        transfer: [u8; 16],
        resumed: ResumedFrom,
        digests: Vec<blake3::Hash>,
    },
    Join {
        transfer: [u8; 16],
    },
    Joined,
    /// The body holds the chunk's bytes, encoded.
    Chunk {
        index: u64,
        encoding: Encoding,
        plain_len: u32,
        digest: blake3::Hash,
    },
    Zero {
        index: u64,
    },
    /// `frames` is how many `Chunk` and `Zero` frames this stream carried.
    Done {
        frames: u64,
    },
    DoneAck,
    Commit {
        digest: [u8; 32],
    },
    Committed {
        digest: [u8; 32],
    },
    Keepalive,
    Error {
        code: ErrorCode,
        offset: u64,
        message: String,
    },
}

impl Msg {
    pub fn kind(&self) -> Kind {
        match self {
            Msg::Hello { .. } => Kind::Hello,
            Msg::Challenge { .. } => Kind::Challenge,
            Msg::Response { .. } => Kind::Response,
            Msg::AuthOk => Kind::AuthOk,
            Msg::Open { .. } => Kind::Open,
            Msg::Opened { .. } => Kind::Opened,
            Msg::Join { .. } => Kind::Join,
            Msg::Joined => Kind::Joined,
            Msg::Chunk { .. } => Kind::Chunk,
            Msg::Zero { .. } => Kind::Zero,
            Msg::Done { .. } => Kind::Done,
            Msg::DoneAck => Kind::DoneAck,
            Msg::Commit { .. } => Kind::Commit,
            Msg::Committed { .. } => Kind::Committed,
            Msg::Keepalive => Kind::Keepalive,
            Msg::Error { .. } => Kind::Error,
        }
    }

    pub fn error(code: ErrorCode, offset: u64, message: impl Into<String>) -> Msg {
        Msg::Error {
            code,
            offset,
            message: message.into(),
        }
    }

    fn encode_header(&self, h: &mut Vec<u8>) {
        match self {
            Msg::Hello { version, nonce } => {
                h.extend_from_slice(&MAGIC);
                h.extend_from_slice(&version.to_le_bytes());
                h.extend_from_slice(nonce);
            }
            Msg::Challenge {
                version,
                nonce,
                proof,
            } => {
                h.extend_from_slice(&version.to_le_bytes());
                h.extend_from_slice(nonce);
                h.extend_from_slice(proof);
            }
            Msg::Response { proof } => h.extend_from_slice(proof),
            Msg::AuthOk | Msg::Joined | Msg::DoneAck | Msg::Keepalive => {}
            Msg::Open {
                length,
                chunk_size,
                streams,
                allocated,
                name,
            } => {
                h.extend_from_slice(&length.to_le_bytes());
                h.extend_from_slice(&chunk_size.to_le_bytes());
                h.extend_from_slice(&streams.to_le_bytes());
                h.extend_from_slice(&allocated.to_le_bytes());
                put_str(h, name);
            }
            Msg::Opened {
                transfer, resumed, ..
            } => {
                h.extend_from_slice(transfer);
                h.push(match resumed {
                    ResumedFrom::None => 0,
                    ResumedFrom::Partial => 1,
                    ResumedFrom::Target => 2,
                });
            }
            Msg::Join { transfer } => h.extend_from_slice(transfer),
            Msg::Chunk {
                index,
                encoding,
                plain_len,
                digest,
            } => {
                h.extend_from_slice(&index.to_le_bytes());
                h.push(*encoding as u8);
                h.extend_from_slice(&plain_len.to_le_bytes());
                h.extend_from_slice(digest.as_bytes());
            }
            Msg::Zero { index } => h.extend_from_slice(&index.to_le_bytes()),
            Msg::Done { frames } => h.extend_from_slice(&frames.to_le_bytes()),
            Msg::Commit { digest } | Msg::Committed { digest } => h.extend_from_slice(digest),
            Msg::Error {
                code,
                offset,
                message,
            } => {
                h.push(*code as u8);
                h.extend_from_slice(&offset.to_le_bytes());
                put_str(h, message);
            }
        }
    }

    fn decode(kind: Kind, header: &[u8], body: &[u8]) -> Result<Msg, FrameError> {
        let mut d = Dec { buf: header, kind };
        let msg = match kind {
            Kind::Hello => {
                if d.array::<4>()? != MAGIC {
                    return Err(FrameError::NotViaduct);
                }
                Msg::Hello {
                    version: d.u16()?,
                    nonce: d.array()?,
                }
            }
            Kind::Challenge => Msg::Challenge {
                version: d.u16()?,
                nonce: d.array()?,
                proof: d.array()?,
            },
            Kind::Response => Msg::Response { proof: d.array()? },
            Kind::AuthOk => Msg::AuthOk,
            Kind::Open => Msg::Open {
                length: d.u64()?,
                chunk_size: d.u32()?,
                streams: d.u16()?,
                allocated: d.u64()?,
                name: d.string()?,
            },
            Kind::Opened => {
                let transfer = d.array()?;
                let resumed = match d.u8()? {
                    0 => ResumedFrom::None,
                    1 => ResumedFrom::Partial,
                    2 => ResumedFrom::Target,
                    other => return Err(FrameError::UnknownResume(other)),
                };
                if !body.len().is_multiple_of(32) {
                    return Err(FrameError::DigestList(body.len()));
                }
                let digests = body
                    .chunks_exact(32)
                    .map(|c| {
                        let mut a = [0u8; 32];
                        a.copy_from_slice(c);
                        blake3::Hash::from_bytes(a)
                    })
                    .collect();
                Msg::Opened {
                    transfer,
                    resumed,
                    digests,
                }
            }
            Kind::Join => Msg::Join {
                transfer: d.array()?,
            },
            Kind::Joined => Msg::Joined,
            Kind::Chunk => Msg::Chunk {
                index: d.u64()?,
                encoding: match d.u8()? {
                    0 => Encoding::Raw,
                    1 => Encoding::Zstd,
                    other => return Err(FrameError::UnknownEncoding(other)),
                },
                plain_len: d.u32()?,
                digest: blake3::Hash::from_bytes(d.array()?),
            },
            Kind::Zero => Msg::Zero { index: d.u64()? },
            Kind::Done => Msg::Done { frames: d.u64()? },
            Kind::DoneAck => Msg::DoneAck,
            Kind::Commit => Msg::Commit { digest: d.array()? },
            Kind::Committed => Msg::Committed { digest: d.array()? },
            Kind::Keepalive => Msg::Keepalive,
            Kind::Error => Msg::Error {
                code: ErrorCode::from_u8(d.u8()?),
                offset: d.u64()?,
                message: d.string()?,
            },
        };
        if !d.buf.is_empty() {
            return Err(FrameError::Trailing {
                kind,
                len: d.buf.len(),
            });
        }
        if !body.is_empty() && !matches!(kind, Kind::Chunk | Kind::Opened) {
            return Err(FrameError::UnexpectedBody(kind));
        }
        Ok(msg)
    }
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    h.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    h.extend_from_slice(bytes);
}

struct Dec<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated(self.kind));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let len = self.u16()? as usize;
        let kind = self.kind;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| FrameError::NotUtf8(kind))
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {header_len}+{body_len} bytes exceeds the limit")]
    TooLarge {
        kind: Kind,
        header_len: u32,
        body_len: u32,
    },
    #[error("the peer does not speak the viaduct protocol")]
    NotViaduct,
    #[error("unknown resume origin {0}")]
    UnknownResume(u8),
    #[error("digest list of {0} bytes is not a multiple of 32")]
    DigestList(usize),
    #[error("unknown chunk encoding {0}")]
    UnknownEncoding(u8),
    #[error("{kind:?} frame has {len} unexpected trailing bytes")]
    Trailing { kind: Kind, len: usize },
    #[error("{0:?} frame carries an unexpected body")]
    UnexpectedBody(Kind),
    #[error("{0:?} frame header is truncated")]
    Truncated(Kind),
    #[error("{0:?} frame holds a string that is not UTF-8")]
    NotUtf8(Kind),
}

#[derive(Debug)]
pub(crate) enum WireError {
    /// The peer closed the connection between frames.
    Closed,
    Io(io::Error),
    /// Nothing arrived (or could be written) for this long.
    Idle(Duration),
    Malformed(FrameError),
    /// The frame's MAC is wrong: it was altered, or the peer lost the session key. For a
    /// chunk, the index its (unauthenticated, so possibly altered) header claims.
    BadMac(Kind, Option<u64>),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Closed => f.write_str("the peer closed the connection"),
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Idle(d) => write!(f, "nothing moved for {} s", d.as_secs()),
            WireError::Malformed(m) => write!(f, "malformed frame: {m}"),
            WireError::BadMac(k, _) => write!(
                f,
                "the MAC of a {k:?} frame does not match: it was altered on the way"
            ),
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection in the middle of a frame",
            ))
        } else {
            WireError::Io(e)
        }
    }
}

/// Reads frames of one direction, checking MACs once a session key is set.
pub(crate) struct FrameReader<R> {
    inner: tokio::io::BufReader<R>,
    session: Option<SessionKey>,
    direction: u8,
    seq: u64,
    idle: Duration,
    header: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, direction: u8, idle: Duration) -> Self {
        FrameReader {
            inner: tokio::io::BufReader::with_capacity(64 << 10, inner),
            session: None,
            direction,
            seq: 0,
            idle,
            header: Vec::new(),
        }
    }

    pub fn set_session(&mut self, key: SessionKey) {
        self.session = Some(key);
    }

    /// Reads one frame; the body (for chunks) lands in `body`, replacing what it held.
    pub async fn read(&mut self, body: &mut Vec<u8>) -> Result<Msg, WireError> {
        let mut pre = [0u8; PREAMBLE];
        // A clean close is only a close between frames.
        let first = self.read_some(&mut pre[..1]).await?;
        if first == 0 {
            return Err(WireError::Closed);
        }
        self.read_exact(&mut pre[1..]).await?;
        let kind =
            Kind::from_u8(pre[0]).ok_or(WireError::Malformed(FrameError::UnknownKind(pre[0])))?;
        let header_len = u32::from_le_bytes([pre[1], pre[2], pre[3], pre[4]]);
        let body_len = u32::from_le_bytes([pre[5], pre[6], pre[7], pre[8]]);
        let limit_ok = if self.session.is_none() {
            header_len.saturating_add(body_len) <= MAX_UNAUTHENTICATED
        } else {
            header_len <= MAX_HEADER && body_len <= MAX_BODY
        };
        if !limit_ok {
            return Err(WireError::Malformed(FrameError::TooLarge {
                kind,
                header_len,
                body_len,
            }));
        }
        let mut header = std::mem::take(&mut self.header);
        header.resize(header_len as usize, 0);
        self.read_exact(&mut header).await?;
        self.read_body(body, body_len as usize).await?;
        let msg = match self.check_mac(kind, &pre, &header, body).await {
            Ok(()) => Msg::decode(kind, &header, body).map_err(WireError::Malformed),
            Err(WireError::BadMac(kind, _)) => {
                // Name the chunk the frame claims to carry, so the error can say where.
                let index = match Msg::decode(kind, &header, body) {
                    Ok(Msg::Chunk { index, .. }) => Some(index),
                    _ => None,
                };
                Err(WireError::BadMac(kind, index))
            }
            Err(e) => Err(e),
        };
        self.header = header;
        msg
    }

    /// Reads `len` bytes into `body` without zeroing them first: chunk bodies are large.
    async fn read_body(&mut self, body: &mut Vec<u8>, len: usize) -> Result<(), WireError> {
        body.clear();
        body.reserve(len);
        let idle = self.idle;
        while body.len() < len {
            let want = (len - body.len()) as u64;
            let n = match tokio::time::timeout(idle, (&mut self.inner).take(want).read_buf(body))
                .await
            {
                Ok(r) => r?,
                Err(_) => return Err(WireError::Idle(idle)),
            };
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        Ok(())
    }

    async fn check_mac(
        &mut self,
        kind: Kind,
        pre: &[u8; PREAMBLE],
        header: &[u8],
        body: &[u8],
    ) -> Result<(), WireError> {
        let Some(key) = &self.session else {
            return Ok(());
        };
        let mut h = key.mac(self.direction, self.seq);
        h.update(pre);
        h.update(header);
        if kind != Kind::Chunk {
            h.update(body);
        }
        let expected = h.finalize();
        let mut mac = [0u8; MAC_LEN];
        self.read_exact(&mut mac).await?;
        self.seq += 1;
        // `Hash` equality is constant-time.
        if expected != blake3::Hash::from_bytes(mac) {
            return Err(WireError::BadMac(kind, None));
        }
        Ok(())
    }

    async fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), WireError> {
        while !buf.is_empty() {
            let n = self.read_some(buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    async fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        let idle = self.idle;
        match tokio::time::timeout(idle, self.inner.read(buf)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(WireError::Idle(idle)),
        }
    }
}

/// Writes frames of one direction, adding MACs once a session key is set, counting the
/// bytes and honouring an optional shared rate limit.
pub(crate) struct FrameWriter<W> {
    inner: W,
    session: Option<SessionKey>,
    direction: u8,
    seq: u64,
    idle: Duration,
    limiter: Option<Arc<RateLimiter>>,
    counter: Option<Arc<AtomicU64>>,
    scratch: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, direction: u8, idle: Duration) -> Self {
        FrameWriter {
            inner,
            session: None,
            direction,
            seq: 0,
            idle,
            limiter: None,
            counter: None,
            scratch: Vec::with_capacity(256),
        }
    }

    pub fn set_session(&mut self, key: SessionKey) {
        self.session = Some(key);
    }

    pub fn set_limiter(&mut self, limiter: Option<Arc<RateLimiter>>) {
        self.limiter = limiter;
    }

    pub fn set_counter(&mut self, counter: Arc<AtomicU64>) {
        self.counter = Some(counter);
    }

    /// Writes one frame; `body` is only allowed for `Chunk` and `Opened`.
    pub async fn write(&mut self, msg: &Msg, body: &[u8]) -> Result<(), WireError> {
        let kind = msg.kind();
        let mut frame = std::mem::take(&mut self.scratch);
        frame.clear();
        frame.push(kind as u8);
        frame.extend_from_slice(&[0u8; 8]);
        msg.encode_header(&mut frame);
        let header_len = (frame.len() - PREAMBLE) as u32;
        frame[1..5].copy_from_slice(&header_len.to_le_bytes());
        frame[5..9].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let mac = self.session.as_ref().map(|key| {
            let mut h = key.mac(self.direction, self.seq);
            h.update(&frame);
            if kind != Kind::Chunk {
                h.update(body);
            }
            h.finalize()
        });
        let result = self.write_frame(&frame, body, mac).await;
        self.scratch = frame;
        result?;
        // A TLS stream may keep the frame's last record in its buffer when the socket was
        // full; without a flush it waits there for the next frame, which may never come
        // (the peer waits for this one). On plain TCP this costs nothing.
        match tokio::time::timeout(self.idle, self.inner.flush()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(WireError::Idle(self.idle)),
        }
    }

    async fn write_frame(
        &mut self,
        head: &[u8],
        body: &[u8],
        mac: Option<blake3::Hash>,
    ) -> Result<(), WireError> {
        if mac.is_some() {
            self.seq += 1;
        }
        let mac = mac.map(|m| *m.as_bytes());
        let tail: &[u8] = mac.as_ref().map_or(&[], |m| &m[..]);
        if self.limiter.is_none() {
            // One gathered write per frame: no small segment for the header on its own.
            return self.put_all(&[head, body, tail]).await;
        }
        self.put_all(&[head]).await?;
        for piece in body.chunks(WRITE_PIECE) {
            self.put_all(&[piece]).await?;
        }
        self.put_all(&[tail]).await
    }

    /// Writes all of `parts`, in order, with as few system calls as the socket allows,
    /// after taking their size from the rate limiter.
    async fn put_all(&mut self, parts: &[&[u8]]) -> Result<(), WireError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        if let Some(limiter) = &self.limiter {
            limiter.acquire(total as u64).await;
        }
        let idle = self.idle;
        let (mut part, mut offset) = (0usize, 0usize);
        while part < parts.len() {
            if offset == parts[part].len() {
                part += 1;
                offset = 0;
                continue;
            }
            let slices: Vec<io::IoSlice<'_>> = std::iter::once(&parts[part][offset..])
                .chain(parts[part + 1..].iter().copied())
                .map(io::IoSlice::new)
                .collect();
            let n = match tokio::time::timeout(idle, self.inner.write_vectored(&slices)).await {
                Ok(r) => r?,
                Err(_) => return Err(WireError::Idle(idle)),
            };
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            if let Some(c) = &self.counter {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
            // Advance over what went out, across part boundaries.
            let mut left = n;
            while left > 0 {
                let room = parts[part].len() - offset;
                if left < room {
                    offset += left;
                    left = 0;
                } else {
                    left -= room;
                    part += 1;
                    offset = 0;
                }
            }
        }
        Ok(())
    }

    /// Closes the write side, so the peer reads a clean end.
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.idle, self.inner.shutdown()).await;
    }
}

/// How a byte stream is read by [`read_frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameStreamMode {
    /// As a receiver reads a connection before authentication: no MACs, small frames.
    Unauthenticated,
    /// As a receiver reads an authenticated connection, under a fixed session key; the
    /// stream's MACs are taken as they are, so frames normally fail the MAC check.
    Keyed,
    /// The stream is frames without their MACs; each gets the right MAC under the fixed
    /// session key before it is read as in `Keyed`, so decoding past the MAC is reached.
    Sealed,
}

/// What [`read_frames`] read before it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameStreamSummary {
    /// The kind byte of each frame that decoded, in order.
    pub kinds: Vec<u8>,
    /// How reading stopped: `None` at a clean end between frames, otherwise the error as
    /// the receiver would report it.
    pub error: Option<String>,
}

/// Reads `stream` as the frames that arrive at a receiver, with the frame reader the
/// receiver uses, until the stream ends or a frame is refused.
///
/// The viaduct never calls this; it exists for the fuzz target in `tests/fuzz` and the
/// test that replays its corpus, which feed it arbitrary bytes. It runs the reader on a
/// runtime of its own, so it must not be called from within an async task.
pub fn read_frames(stream: &[u8], mode: FrameStreamMode) -> FrameStreamSummary {
    let key = fuzzing_key();
    let sealed;
    let stream = if mode == FrameStreamMode::Sealed {
        sealed = seal(stream, &key);
        &sealed[..]
    } else {
        stream
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime can be built");
    runtime.block_on(async {
        let mut reader = FrameReader::new(stream, TO_RECEIVER, MIN_IDLE);
        if mode != FrameStreamMode::Unauthenticated {
            reader.set_session(key);
        }
        let mut body = Vec::new();
        let mut kinds = Vec::new();
        loop {
            match reader.read(&mut body).await {
                Ok(msg) => kinds.push(msg.kind() as u8),
                Err(WireError::Closed) => return FrameStreamSummary { kinds, error: None },
                Err(e) => {
                    return FrameStreamSummary {
                        kinds,
                        error: Some(e.to_string()),
                    }
                }
            }
        }
    })
}

/// The fixed session key of [`read_frames`].
fn fuzzing_key() -> SessionKey {
    super::PresharedKey::from_secret(b"fluidcloud viaduct frame reader fuzzing key")
        .expect("the fixed fuzzing secret is a valid secret")
        .session(&[1; 32], &[2; 32])
}

/// Appends to each frame of `stream` (laid out as the preamble says) its MAC under `key`;
/// a truncated last frame is left as it is.
fn seal(stream: &[u8], key: &SessionKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + MAC_LEN * 8);
    let mut rest = stream;
    let mut seq = 0u64;
    while rest.len() >= PREAMBLE {
        let header_len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let body_len = u32::from_le_bytes([rest[5], rest[6], rest[7], rest[8]]) as usize;
        let Some(frame_len) = (PREAMBLE + header_len)
            .checked_add(body_len)
            .filter(|&n| n <= rest.len())
        else {
            break;
        };
        let (frame, tail) = rest.split_at(frame_len);
        let mut h = key.mac(TO_RECEIVER, seq);
        if frame[0] == Kind::Chunk as u8 {
            h.update(&frame[..PREAMBLE + header_len]);
        } else {
            h.update(frame);
        }
        out.extend_from_slice(frame);
        out.extend_from_slice(h.finalize().as_bytes());
        seq += 1;
        rest = tail;
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viaduct::PresharedKey;

    /// The fuzz target's entry point reads what the writer writes, and its sealing
    /// computes the MACs the writer does.
    #[test]
    fn read_frames_reads_what_the_writer_wrote() {
        let frames = [
            (
                Msg::Hello {
                    version: VERSION,
                    nonce: [3; 32],
                },
                &b""[..],
            ),
            (
                Msg::Chunk {
                    index: 7,
                    encoding: Encoding::Raw,
                    plain_len: 4,
                    digest: blake3::hash(b"data"),
                },
                &b"data"[..],
            ),
            (Msg::error(ErrorCode::Busy, NO_OFFSET, "busy"), &b""[..]),
        ];
        let write = |key: Option<SessionKey>| {
            let frames = frames.clone();
            async move {
                let mut out = Vec::new();
                let mut writer = FrameWriter::new(&mut out, TO_RECEIVER, MIN_IDLE);
                if let Some(key) = key {
                    writer.set_session(key);
                }
                for (msg, body) in &frames {
                    writer.write(msg, body).await.unwrap();
                }
                out
            }
        };
        // `read_frames` runs its own runtime, so the writing happens on another.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let plain = runtime.block_on(write(None));
        let keyed = runtime.block_on(write(Some(fuzzing_key())));
        let clean = |kinds: Vec<u8>| FrameStreamSummary { kinds, error: None };
        assert_eq!(
            read_frames(&plain, FrameStreamMode::Unauthenticated),
            clean(vec![1, 9, 16])
        );
        assert_eq!(
            read_frames(&plain, FrameStreamMode::Sealed),
            clean(vec![1, 9, 16])
        );
        assert_eq!(
            read_frames(&keyed, FrameStreamMode::Keyed),
            clean(vec![1, 9, 16])
        );
        assert_eq!(seal(&plain, &fuzzing_key()), keyed);
        let refused = read_frames(&plain, FrameStreamMode::Keyed);
        assert!(refused.kinds.is_empty(), "{refused:?}");
        assert!(refused.error.is_some(), "{refused:?}");
    }

    fn pair() -> (
        FrameWriter<tokio::io::DuplexStream>,
        FrameReader<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let idle = Duration::from_secs(5);
        (
            FrameWriter::new(a, TO_RECEIVER, idle),
            FrameReader::new(b, TO_RECEIVER, idle),
        )
    }

    /// A stream that, like a TLS stream whose socket was full, keeps what is written until
    /// it is flushed.
    struct HoldsUntilFlushed {
        held: Vec<u8>,
        sent: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.sent.lock().unwrap().extend_from_slice(&held);
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn a_written_frame_is_flushed_so_a_tls_stream_does_not_hold_it_back() {
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stream = HoldsUntilFlushed {
            held: Vec::new(),
            sent: sent.clone(),
        };
        let mut w = FrameWriter::new(stream, TO_SENDER, Duration::from_secs(5));
        w.write(&Msg::DoneAck, &[]).await.unwrap();
        assert!(
            !sent.lock().unwrap().is_empty(),
            "the frame is still held by the stream after write returned"
        );
    }

    #[tokio::test]
    async fn frames_round_trip_with_mac() {
        let (mut w, mut r) = pair();
        let key = PresharedKey::random().session(&[1; 32], &[2; 32]);
        w.set_session(key.clone());
        r.set_session(key);
        let open = Msg::Open {
            length: 12345,
            chunk_size: 65536,
            streams: 3,
            allocated: 999,
            name: "vm/disk.raw".into(),
        };
        w.write(&open, &[]).await.unwrap();
        let chunk = Msg::Chunk {
            index: 7,
            encoding: Encoding::Zstd,
            plain_len: 65536,
            digest: blake3::hash(b"x"),
        };
        w.write(&chunk, b"payload").await.unwrap();
        let mut body = Vec::new();
        match r.read(&mut body).await.unwrap() {
            Msg::Open { name, length, .. } => {
                assert_eq!((name.as_str(), length), ("vm/disk.raw", 12345))
            }
            other => panic!("unexpected {other:?}"),
        }
        match r.read(&mut body).await.unwrap() {
            Msg::Chunk {
                index, encoding, ..
            } => assert_eq!((index, encoding), (7, Encoding::Zstd)),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(body, b"payload");
        drop(w);
        assert!(matches!(r.read(&mut body).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn replayed_or_foreign_frames_fail_the_mac() {
        let (mut w, mut r) = pair();
        let key = PresharedKey::random();
        w.set_session(key.session(&[1; 32], &[2; 32]));
        r.set_session(key.session(&[1; 32], &[3; 32]));
        w.write(&Msg::Keepalive, &[]).await.unwrap();
        let mut body = Vec::new();
        assert!(matches!(
            r.read(&mut body).await,
            Err(WireError::BadMac(Kind::Keepalive, None))
        ));
    }

    #[tokio::test]
    async fn an_altered_chunk_header_names_the_chunk() {
        let (mut w, mut r) = pair();
        let key = PresharedKey::random();
        w.set_session(key.session(&[1; 32], &[2; 32]));
        r.set_session(key.session(&[1; 32], &[9; 32]));
        let chunk = Msg::Chunk {
            index: 42,
            encoding: Encoding::Raw,
            plain_len: 3,
            digest: blake3::hash(b"abc"),
        };
        w.write(&chunk, b"abc").await.unwrap();
        let mut body = Vec::new();
        assert!(matches!(
            r.read(&mut body).await,
            Err(WireError::BadMac(Kind::Chunk, Some(42)))
        ));
    }

    #[tokio::test]
    async fn oversized_unauthenticated_frame_refused() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut raw = a;
        let mut r = FrameReader::new(b, TO_RECEIVER, Duration::from_secs(5));
        let mut pre = vec![Kind::Hello as u8];
        pre.extend_from_slice(&(1u32 << 20).to_le_bytes());
        pre.extend_from_slice(&0u32.to_le_bytes());
        raw.write_all(&pre).await.unwrap();
        let mut body = Vec::new();
        match r.read(&mut body).await {
            Err(WireError::Malformed(m)) => assert!(m.to_string().contains("exceeds"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_header_is_reported() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut raw = a;
        let mut r = FrameReader::new(b, TO_RECEIVER, Duration::from_secs(5));
        let mut frame = vec![Kind::Zero as u8];
        frame.extend_from_slice(&3u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&[1, 2, 3]);
        raw.write_all(&frame).await.unwrap();
        let mut body = Vec::new();
        match r.read(&mut body).await {
            Err(WireError::Malformed(m)) => {
                assert!(matches!(m, FrameError::Truncated(Kind::Zero)), "{m:?}");
                assert!(m.to_string().contains("truncated"), "{m}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
