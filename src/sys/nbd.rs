//! A client of the Network Block Device protocol, enough to copy the disk of a running QEMU
//! VM: QEMU exports the disk read-only over NBD, and [`NbdClient`] asks which extents hold
//! data ([`NbdClient::allocated_extents`], metadata context `base:allocation`) or changed
//! since a dirty bitmap was added ([`NbdClient::dirty_extents`], context
//! `qemu:dirty-bitmap:NAME`), and reads them ([`NbdClient::read`]).
//!
//! The handshake, per the protocol's "fixed newstyle" negotiation: the server greets with
//! `NBDMAGIC` `IHAVEOPT` and its handshake flags; the client answers with its flags, then
//! sends options one at a time, each answered by one or more option replies:
//! `NBD_OPT_STRUCTURED_REPLY` (chunked replies, needed for block status and for reads that
//! skip holes), `NBD_OPT_SET_META_CONTEXT` (the contexts asked for; the server grants each
//! with an id) and `NBD_OPT_GO` (the export, with a request for its block size
//! constraints), after whose `NBD_REP_ACK` the transmission phase begins. There the client
//! sends one request at a time and reads its reply before the next; a reply is either a
//! simple reply or a series of structured chunks ending with one flagged `DONE`.
//!
//! Supported: unix sockets and TCP, without TLS; `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and
//! `NBD_CMD_DISC`. Not supported: oldstyle or non-fixed newstyle servers, servers without
//! `NBD_OPT_GO` (no fallback to `NBD_OPT_EXPORT_NAME`, which cannot report errors), writes,
//! extended headers, several requests in flight.
//!
//! Every exchange runs under a timeout, and nothing is allocated from a length the server
//! announced without a cap. After a timeout, an I/O error or a reply that breaks the
//! protocol the connection is out of step and every later call fails with
//! [`NbdError::Broken`]; an error the server reports for a request (an error chunk) leaves
//! the connection usable.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

#[cfg(test)]
mod tests;

// Handshake magics.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
const NBD_FLAG_READ_ONLY: u16 = 1 << 1;

// Options.
const NBD_OPT_GO: u32 = 7;
const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;

// Information types of `NBD_REP_INFO`.
const NBD_INFO_EXPORT: u16 = 0;
const NBD_INFO_BLOCK_SIZE: u16 = 3;

// Transmission: requests and replies.
const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_DISC: u16 = 2;
const NBD_CMD_BLOCK_STATUS: u16 = 7;
const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
const NBD_REPLY_TYPE_NONE: u16 = 0;
const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation`: the extent is not allocated in the backing storage.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent was written since the bitmap was added or cleared.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// The metadata context of allocation status.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of the metadata context of QEMU's dirty bitmap NAME.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// How long one exchange (connecting with its handshake, or one request with its reply)
/// may take unless [`NbdClient::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest read request: the payload every server must accept (2^25 bytes).
const MAX_READ_REQUEST: u32 = 1 << 25;
/// The longest string the protocol allows (export names, context names, messages).
const MAX_STRING: usize = 4096;
/// Caps on what the server announces: one option reply, one error chunk, one block status
/// chunk (the spec's 2^20 descriptors), and the chunks of one reply.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
const MAX_ERROR_CHUNK: u32 = 64 * 1024;
const MAX_BLOCK_STATUS_CHUNK: u32 = 4 + 8 * (1 << 20);
const MAX_CHUNKS_PER_REPLY: usize = 1 << 16;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix socket {}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to the NBD server at {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error("{what} on {at} took longer than {timeout:?}")]
    Timeout {
        at: String,
        what: String,
        timeout: Duration,
    },
    #[error("{what} on {at} failed: {source}")]
    Io {
        at: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the server broke the NBD protocol in {what} on {at}: {detail}")]
    Protocol {
        at: String,
        what: String,
        detail: String,
    },
    #[error(
        "the server of {at} does not support {feature}, which this client needs{}",
        said(message)
    )]
    Unsupported {
        at: String,
        feature: &'static str,
        message: String,
    },
    #[error("the NBD server has no {at}{}", said(message))]
    UnknownExport { at: String, message: String },
    #[error("the server of {at} refused {option} with {reply}{}", said(message))]
    OptionRefused {
        at: String,
        option: &'static str,
        reply: &'static str,
        message: String,
    },
    #[error(
        "the server of {at} did not grant the metadata context `{context}` (granted: {granted:?})"
    )]
    ContextNotGranted {
        at: String,
        context: String,
        granted: Vec<String>,
    },
    #[error("{command} of {length} bytes at offset {offset} on {at} failed with {}{}{}",
        errno_name(*code), offset_of(*error_offset), said(message))]
    Command {
        at: String,
        command: &'static str,
        offset: u64,
        length: u64,
        /// The protocol's error value (`NBD_EIO` = 5, ...).
        code: u32,
        /// Where the error happened, if the server said.
        error_offset: Option<u64>,
        message: String,
    },
    #[error("{length} bytes at offset {offset} lie beyond the end ({size} bytes) of {at}")]
    OutOfRange {
        at: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("invalid request to {at}: {detail}")]
    Invalid { at: String, detail: String },
    #[error("the connection to {at} is unusable after an earlier failure")]
    Broken { at: String },
}

fn said(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn offset_of(offset: Option<u64>) -> String {
    offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default()
}

/// The name of a transmission error value, with its meaning.
fn errno_name(code: u32) -> String {
    let name = match code {
        1 => "NBD_EPERM (operation not permitted)",
        5 => "NBD_EIO (input/output error)",
        12 => "NBD_ENOMEM (cannot allocate memory)",
        22 => "NBD_EINVAL (invalid argument)",
        28 => "NBD_ENOSPC (no space left on device)",
        75 => "NBD_EOVERFLOW (value too large)",
        95 => "NBD_ENOTSUP (operation not supported)",
        108 => "NBD_ESHUTDOWN (server is shutting down)",
        _ => return format!("error {code}"),
    };
    name.to_string()
}

fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

fn rep_err_name(reply: u32) -> &'static str {
    match reply & !NBD_REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown error reply",
    }
}

/// A run of bytes with one status, as a metadata context reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// The context's status flags ([`NBD_STATE_HOLE`], [`NBD_STATE_DIRTY`], ...).
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A metadata context the server granted, with the id its replies carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// The export's size constraints (the protocol's defaults unless the server announced
/// others): requests are multiples of `minimum` and reads at most `maximum_read` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    /// The server's maximum payload, capped at 32 MiB and rounded down to `minimum`.
    pub maximum_read: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum_read: MAX_READ_REQUEST,
        }
    }
}

/// What went wrong inside one exchange, before it is told where.
#[derive(Debug)]
enum Fault {
    Io(io::Error),
    Protocol(String),
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    NotGranted {
        context: String,
        granted: Vec<String>,
    },
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

fn protocol<T>(detail: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Protocol(detail.into()))
}

/// An error the server reported for one request; the connection stays in step.
#[derive(Debug)]
struct ServerError {
    code: u32,
    offset: Option<u64>,
    message: String,
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// The byte stream with the protocol's framing.
struct Wire {
    io: BufReader<Box<dyn Conn>>,
    next_cookie: u64,
    structured: bool,
}

/// The header of one reply message.
enum Reply {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, length: u32 },
}

impl Wire {
    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), Fault> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.io.write_all(&msg).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// One option reply to `option`: its type and data. An error reply is a
    /// [`Fault::Refused`] carrying the server's message.
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), Fault> {
        let magic = self.io.read_u64().await?;
        if magic != NBD_REP_MAGIC {
            return protocol(format!("option reply magic {magic:#x}"));
        }
        let replied_to = self.io.read_u32().await?;
        if replied_to != option {
            return protocol(format!(
                "a reply to option {replied_to} while waiting for {}",
                option_name(option)
            ));
        }
        let kind = self.io.read_u32().await?;
        let length = self.io.read_u32().await?;
        if length > MAX_OPTION_REPLY {
            return protocol(format!("an option reply of {length} bytes"));
        }
        let mut data = vec![0; length as usize];
        self.io.read_exact(&mut data).await?;
        if kind & NBD_REP_FLAG_ERROR != 0 {
            return Err(Fault::Refused {
                option,
                reply: kind,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        Ok((kind, data))
    }

    async fn send_request(&mut self, command: u16, offset: u64, length: u32) -> Result<u64, Fault> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        // Bytes 4..6 are the command flags: none are used.
        msg[6..8].copy_from_slice(&command.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&length.to_be_bytes());
        self.io.write_all(&msg).await?;
        self.io.flush().await?;
        Ok(cookie)
    }

    async fn reply(&mut self, cookie: u64) -> Result<Reply, Fault> {
        let magic = self.io.read_u32().await?;
        let reply = match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let error = self.io.read_u32().await?;
                self.check_cookie(cookie).await?;
                Reply::Simple { error }
            }
            NBD_STRUCTURED_REPLY_MAGIC if self.structured => {
                let flags = self.io.read_u16().await?;
                let kind = self.io.read_u16().await?;
                self.check_cookie(cookie).await?;
                let length = self.io.read_u32().await?;
                Reply::Chunk {
                    flags,
                    kind,
                    length,
                }
            }
            _ => return protocol(format!("reply magic {magic:#x}")),
        };
        Ok(reply)
    }

    async fn check_cookie(&mut self, cookie: u64) -> Result<(), Fault> {
        let got = self.io.read_u64().await?;
        if got != cookie {
            return protocol(format!("a reply for cookie {got}, expected {cookie}"));
        }
        Ok(())
    }

    /// The payload of an error chunk of `length` bytes.
    async fn error_chunk(&mut self, kind: u16, length: u32) -> Result<ServerError, Fault> {
        if !(6..=MAX_ERROR_CHUNK).contains(&length) {
            return protocol(format!("an error chunk of {length} bytes"));
        }
        let code = self.io.read_u32().await?;
        let message_len = u32::from(self.io.read_u16().await?);
        if message_len > length - 6 {
            return protocol(format!(
                "an error message of {message_len} bytes in a chunk of {length}"
            ));
        }
        let mut message = vec![0; message_len as usize];
        self.io.read_exact(&mut message).await?;
        let mut rest = length - 6 - message_len;
        let mut offset = None;
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET && rest >= 8 {
            offset = Some(self.io.read_u64().await?);
            rest -= 8;
        }
        self.skip(rest.into()).await?;
        Ok(ServerError {
            code,
            offset,
            message: String::from_utf8_lossy(&message).into_owned(),
        })
    }

    async fn skip(&mut self, n: u64) -> Result<(), Fault> {
        let copied = tokio::io::copy(&mut (&mut self.io).take(n), &mut tokio::io::sink()).await?;
        if copied != n {
            return Err(Fault::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }
}

/// The byte ranges a read reply has filled so far, merged, to catch overlapping chunks and
/// replies that leave a gap.
#[derive(Default)]
struct Coverage {
    ranges: Vec<(u64, u64)>,
}

impl Coverage {
    fn add(&mut self, start: u64, end: u64) -> Result<(), Fault> {
        let i = self.ranges.partition_point(|r| r.0 < start);
        let overlaps_prev = i > 0 && self.ranges[i - 1].1 > start;
        let overlaps_next = i < self.ranges.len() && self.ranges[i].0 < end;
        if overlaps_prev || overlaps_next {
            return protocol(format!("overlapping content chunks at {start}..{end}"));
        }
        let joins_prev = i > 0 && self.ranges[i - 1].1 == start;
        let joins_next = i < self.ranges.len() && self.ranges[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => self.ranges.insert(i, (start, end)),
        }
        Ok(())
    }

    fn is(&self, start: u64, end: u64) -> bool {
        self.ranges == [(start, end)]
    }
}

/// A connection to one export of an NBD server, in the transmission phase.
pub struct NbdClient {
    wire: Wire,
    /// "export `NAME` at unix socket PATH", for errors.
    at: String,
    size: u64,
    transmission_flags: u16,
    block_size: BlockSize,
    contexts: Vec<MetaContext>,
    timeout: Duration,
    broken: bool,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("at", &self.at)
            .field("size", &self.size)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects to the server on the unix socket `path`, opens `export` and selects the
    /// metadata `contexts` (none to only read), with [`DEFAULT_TIMEOUT`].
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
    ) -> Result<NbdClient, NbdError> {
        let endpoint = Endpoint::Unix(path.as_ref().to_path_buf());
        Self::connect(endpoint, export, contexts, DEFAULT_TIMEOUT).await
    }

    /// Connects to the server at `addr` (`host:port`) over TCP, like [`Self::connect_unix`].
    pub async fn connect_tcp(
        addr: &str,
        export: &str,
        contexts: &[&str],
    ) -> Result<NbdClient, NbdError> {
        let endpoint = Endpoint::Tcp(addr.to_string());
        Self::connect(endpoint, export, contexts, DEFAULT_TIMEOUT).await
    }

    /// Connects to `endpoint` and negotiates: `timeout` bounds connecting with the whole
    /// handshake, and then each request with its reply.
    pub async fn connect(
        endpoint: Endpoint,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<NbdClient, NbdError> {
        let at = format!("export `{export}` at {endpoint}");
        let connected = tokio::time::timeout(timeout, async {
            let conn: Box<dyn Conn> = match &endpoint {
                Endpoint::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
                Endpoint::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr.as_str()).await?;
                    stream.set_nodelay(true)?;
                    Box::new(stream)
                }
            };
            Ok::<_, io::Error>(conn)
        })
        .await;
        let conn = match connected {
            Ok(Ok(conn)) => conn,
            Ok(Err(source)) => return Err(NbdError::Connect { endpoint, source }),
            Err(_) => {
                return Err(NbdError::Timeout {
                    at,
                    what: "connecting".into(),
                    timeout,
                })
            }
        };
        Self::handshake(conn, at, export, contexts, timeout).await
    }

    async fn handshake(
        conn: Box<dyn Conn>,
        at: String,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<NbdClient, NbdError> {
        for name in std::iter::once(&export).chain(contexts) {
            if name.len() > MAX_STRING {
                return Err(NbdError::Invalid {
                    at,
                    detail: format!("a name of {} bytes (at most {MAX_STRING})", name.len()),
                });
            }
        }
        let mut wire = Wire {
            io: BufReader::new(conn),
            next_cookie: 1,
            structured: false,
        };
        let negotiated =
            tokio::time::timeout(timeout, negotiate(&mut wire, export, contexts)).await;
        let what = "the handshake";
        let negotiated = match negotiated {
            Err(_) => {
                return Err(NbdError::Timeout {
                    at,
                    what: what.into(),
                    timeout,
                })
            }
            Ok(Err(fault)) => return Err(fault_error(fault, &at, what)),
            Ok(Ok(negotiated)) => negotiated,
        };
        Ok(NbdClient {
            wire,
            at,
            size: negotiated.size,
            transmission_flags: negotiated.flags,
            block_size: negotiated.block_size,
            contexts: negotiated.contexts,
            timeout,
            broken: false,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server exports read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & NBD_FLAG_READ_ONLY != 0
    }

    /// The transmission flags the server sent (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// The metadata contexts the server granted.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.contexts
    }

    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Bounds each later request with its reply (at most `timeout` each).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The extents, in order and covering `offset..offset + length` exactly, that the
    /// granted metadata `context` reports: the range is asked again from where the
    /// server's answer stopped until it is covered. Adjacent extents with the same flags
    /// are merged.
    pub async fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let Some(id) = self
            .contexts
            .iter()
            .find(|c| c.name == context)
            .map(|c| c.id)
        else {
            return Err(NbdError::Invalid {
                at: self.at.clone(),
                detail: format!(
                    "block status of the metadata context `{context}`, which was not negotiated"
                ),
            });
        };
        let end = self.check_range(offset, length)?;
        // The largest aligned request length that fits the 32-bit field.
        let max_request = u64::from(u32::MAX) & !(u64::from(self.block_size.minimum) - 1);
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(max_request) as u32;
            let what = || format!("block status of {ask} bytes at offset {pos} in `{context}`");
            self.usable()?;
            let timeout = self.timeout;
            let ids: Vec<u32> = self.contexts.iter().map(|c| c.id).collect();
            let answer = tokio::time::timeout(
                timeout,
                block_status_once(&mut self.wire, &ids, id, pos, ask),
            )
            .await;
            let answer = self.settle(answer, what)?;
            let answer =
                answer.map_err(|e| self.command_error("block status", pos, ask.into(), e))?;
            for mut extent in answer {
                if extent.offset >= end {
                    break;
                }
                extent.length = extent.length.min(end - extent.offset);
                pos = extent.end();
                match extents.last_mut() {
                    Some(last) if last.flags == extent.flags => last.length += extent.length,
                    _ => extents.push(extent),
                }
            }
        }
        Ok(extents)
    }

    /// The byte ranges of `range` whose content is not known to be zeros, by the
    /// `base:allocation` context: extents flagged [`NBD_STATE_ZERO`] need no reading,
    /// every other one (allocated, or a hole of undefined content) does.
    pub async fn allocated_extents(
        &mut self,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, NbdError> {
        let length = range.end.saturating_sub(range.start);
        let extents = self
            .block_status(BASE_ALLOCATION, range.start, length)
            .await?;
        Ok(merged(extents, |flags| flags & NBD_STATE_ZERO == 0))
    }

    /// The byte ranges of `range` that QEMU's dirty `bitmap` marks as written, by the
    /// context `qemu:dirty-bitmap:BITMAP`.
    pub async fn dirty_extents(
        &mut self,
        bitmap: &str,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, NbdError> {
        let context = format!("{QEMU_DIRTY_BITMAP}{bitmap}");
        let length = range.end.saturating_sub(range.start);
        let extents = self.block_status(&context, range.start, length).await?;
        Ok(merged(extents, |flags| flags & NBD_STATE_DIRTY != 0))
    }

    /// Fills `buf` with the export's bytes from `offset`, in requests of at most
    /// [`BlockSize::maximum_read`] bytes; holes the server reports read as zeros.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        let step = self.block_size.maximum_read as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(step);
            let at = offset + done as u64;
            let what = || format!("reading {n} bytes at offset {at}");
            self.usable()?;
            let timeout = self.timeout;
            let part = &mut buf[done..done + n];
            let answer = tokio::time::timeout(timeout, read_once(&mut self.wire, at, part)).await;
            self.settle(answer, what)?
                .map_err(|e| self.command_error("read", at, n as u64, e))?;
            done += n;
        }
        Ok(())
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`); the server closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        self.usable()?;
        let wire = &mut self.wire;
        let sent = tokio::time::timeout(self.timeout, async {
            wire.send_request(NBD_CMD_DISC, 0, 0).await?;
            wire.io.shutdown().await?;
            Ok(())
        })
        .await;
        self.settle(sent, || "disconnecting".to_string())
    }

    fn usable(&self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken {
                at: self.at.clone(),
            });
        }
        Ok(())
    }

    /// Checks that a request lies within the export and keeps to its block size; returns
    /// its end.
    fn check_range(&self, offset: u64, length: u64) -> Result<u64, NbdError> {
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| NbdError::OutOfRange {
                at: self.at.clone(),
                offset,
                length,
                size: self.size,
            })?;
        let minimum = u64::from(self.block_size.minimum);
        if !offset.is_multiple_of(minimum) || (!end.is_multiple_of(minimum) && end != self.size) {
            return Err(NbdError::Invalid {
                at: self.at.clone(),
                detail: format!(
                    "{length} bytes at offset {offset} are not aligned to the export's minimum block size of {minimum} bytes"
                ),
            });
        }
        Ok(end)
    }

    /// Turns the outcome of one exchange into the caller's error, marking the connection
    /// broken when the exchange did not finish in step.
    fn settle<T>(
        &mut self,
        outcome: Result<Result<T, Fault>, tokio::time::error::Elapsed>,
        what: impl FnOnce() -> String,
    ) -> Result<T, NbdError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(fault)) => {
                self.broken = true;
                Err(fault_error(fault, &self.at, &what()))
            }
            Err(_) => {
                self.broken = true;
                Err(NbdError::Timeout {
                    at: self.at.clone(),
                    what: what(),
                    timeout: self.timeout,
                })
            }
        }
    }

    fn command_error(
        &self,
        command: &'static str,
        offset: u64,
        length: u64,
        e: ServerError,
    ) -> NbdError {
        NbdError::Command {
            at: self.at.clone(),
            command,
            offset,
            length,
            code: e.code,
            error_offset: e.offset,
            message: e.message,
        }
    }
}

fn fault_error(fault: Fault, at: &str, what: &str) -> NbdError {
    let at = at.to_string();
    match fault {
        Fault::Io(source) => NbdError::Io {
            at,
            what: what.to_string(),
            source,
        },
        Fault::Protocol(detail) => NbdError::Protocol {
            at,
            what: what.to_string(),
            detail,
        },
        Fault::Refused { reply, message, .. } if reply == NBD_REP_ERR_UNKNOWN => {
            NbdError::UnknownExport { at, message }
        }
        Fault::Refused {
            option,
            reply,
            message,
        } if reply == NBD_REP_ERR_UNSUP => NbdError::Unsupported {
            at,
            feature: option_name(option),
            message,
        },
        Fault::Refused {
            option,
            reply,
            message,
        } => NbdError::OptionRefused {
            at,
            option: option_name(option),
            reply: rep_err_name(reply),
            message,
        },
        Fault::NotGranted { context, granted } => NbdError::ContextNotGranted {
            at,
            context,
            granted,
        },
    }
}

/// The ranges of the extents whose flags `keep` accepts, adjacent ones merged.
fn merged(extents: Vec<Extent>, keep: impl Fn(u32) -> bool) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for e in extents.into_iter().filter(|e| keep(e.flags)) {
        match ranges.last_mut() {
            Some(last) if last.end == e.offset => last.end = e.end(),
            _ => ranges.push(e.offset..e.end()),
        }
    }
    ranges
}

struct Negotiated {
    size: u64,
    flags: u16,
    block_size: BlockSize,
    contexts: Vec<MetaContext>,
}

fn put_string(data: &mut Vec<u8>, s: &str) {
    data.extend_from_slice(&(s.len() as u32).to_be_bytes());
    data.extend_from_slice(s.as_bytes());
}

/// The fixed newstyle handshake, from the server's greeting to `NBD_OPT_GO`'s ack.
async fn negotiate(wire: &mut Wire, export: &str, contexts: &[&str]) -> Result<Negotiated, Fault> {
    let magic = wire.io.read_u64().await?;
    if magic != NBDMAGIC {
        return protocol(format!("greeting magic {magic:#x}, not NBDMAGIC"));
    }
    match wire.io.read_u64().await? {
        IHAVEOPT => {}
        CLISERV_MAGIC => return protocol("the server speaks the oldstyle handshake"),
        other => return protocol(format!("greeting magic {other:#x}, not IHAVEOPT")),
    }
    let handshake_flags = wire.io.read_u16().await?;
    if handshake_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return protocol("the server does not speak the fixed newstyle handshake");
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    wire.io.write_all(&client_flags.to_be_bytes()).await?;

    wire.send_option(NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    match wire.option_reply(NBD_OPT_STRUCTURED_REPLY).await {
        Ok((NBD_REP_ACK, _)) => wire.structured = true,
        Ok((kind, _)) => return protocol(format!("reply type {kind} to NBD_OPT_STRUCTURED_REPLY")),
        // Reads work with simple replies too; only block status needs structured ones.
        Err(Fault::Refused { reply, .. }) if reply == NBD_REP_ERR_UNSUP && contexts.is_empty() => {}
        Err(e) => return Err(e),
    }

    let mut granted = Vec::new();
    if !contexts.is_empty() {
        let mut data = Vec::new();
        put_string(&mut data, export);
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for context in contexts {
            put_string(&mut data, context);
        }
        wire.send_option(NBD_OPT_SET_META_CONTEXT, &data).await?;
        loop {
            match wire.option_reply(NBD_OPT_SET_META_CONTEXT).await? {
                (NBD_REP_ACK, _) => break,
                (NBD_REP_META_CONTEXT, data) if data.len() >= 4 => {
                    if granted.len() >= contexts.len() {
                        return protocol("more metadata contexts granted than asked for");
                    }
                    let id = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                    let name = String::from_utf8_lossy(&data[4..]).into_owned();
                    granted.push(MetaContext { id, name });
                }
                (kind, data) => {
                    return protocol(format!(
                        "reply type {kind} of {} bytes to NBD_OPT_SET_META_CONTEXT",
                        data.len()
                    ))
                }
            }
        }
        for context in contexts {
            if !granted.iter().any(|g| g.name == *context) {
                return Err(Fault::NotGranted {
                    context: context.to_string(),
                    granted: granted.into_iter().map(|g| g.name).collect(),
                });
            }
        }
    }

    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    wire.send_option(NBD_OPT_GO, &data).await?;
    let mut export_info = None;
    let mut block_size = BlockSize::default();
    loop {
        match wire.option_reply(NBD_OPT_GO).await? {
            (NBD_REP_ACK, _) => break,
            (NBD_REP_INFO, data) if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                let body = &data[2..];
                match info {
                    NBD_INFO_EXPORT if body.len() == 10 => {
                        let size = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([body[8], body[9]]);
                        export_info = Some((size, flags));
                    }
                    NBD_INFO_BLOCK_SIZE if body.len() == 12 => {
                        block_size = block_size_of(body)?;
                    }
                    NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => {
                        return protocol(format!("information {info} of {} bytes", data.len()))
                    }
                    // Names and descriptions, or information this client does not know.
                    _ => {}
                }
            }
            (kind, _) => return protocol(format!("reply type {kind} to NBD_OPT_GO")),
        }
    }
    let Some((size, flags)) = export_info else {
        return protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
    };
    Ok(Negotiated {
        size,
        flags,
        block_size,
        contexts: granted,
    })
}

/// Checks the server's size constraints and derives the read request size from them.
fn block_size_of(body: &[u8]) -> Result<BlockSize, Fault> {
    let word = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let (minimum, preferred, maximum) = (word(0), word(4), word(8));
    if !minimum.is_power_of_two() || minimum > 1 << 16 || maximum < minimum {
        return protocol(format!(
            "block sizes minimum {minimum}, preferred {preferred}, maximum {maximum}"
        ));
    }
    Ok(BlockSize {
        minimum,
        preferred,
        maximum_read: maximum.min(MAX_READ_REQUEST) & !(minimum - 1),
    })
}

/// One `NBD_CMD_READ` of `buf.len()` bytes at `offset`, reassembled from its chunks.
async fn read_once(
    wire: &mut Wire,
    offset: u64,
    buf: &mut [u8],
) -> Result<Result<(), ServerError>, Fault> {
    let end = offset + buf.len() as u64;
    let cookie = wire
        .send_request(NBD_CMD_READ, offset, buf.len() as u32)
        .await?;
    let mut coverage = Coverage::default();
    let mut error = None;
    for _ in 0..MAX_CHUNKS_PER_REPLY {
        let (flags, kind, length) = match wire.reply(cookie).await? {
            Reply::Simple { error: 0 } if wire.structured => {
                return protocol("a simple reply without error to a read");
            }
            Reply::Simple { error: 0 } => {
                wire.io.read_exact(buf).await?;
                return Ok(Ok(()));
            }
            Reply::Simple { error: code } => {
                return Ok(Err(ServerError {
                    code,
                    offset: None,
                    message: String::new(),
                }))
            }
            Reply::Chunk {
                flags,
                kind,
                length,
            } => (flags, kind, length),
        };
        match kind {
            NBD_REPLY_TYPE_NONE if length == 0 => {}
            NBD_REPLY_TYPE_OFFSET_DATA if length > 8 => {
                let start = wire.io.read_u64().await?;
                let stop = start.checked_add(u64::from(length - 8));
                let stop = within(start, stop, offset, end)?;
                coverage.add(start, stop)?;
                let range = (start - offset) as usize..(stop - offset) as usize;
                wire.io.read_exact(&mut buf[range]).await?;
            }
            NBD_REPLY_TYPE_OFFSET_HOLE if length == 12 => {
                let start = wire.io.read_u64().await?;
                let size = wire.io.read_u32().await?;
                if size == 0 {
                    return protocol("an empty hole");
                }
                let stop = within(start, start.checked_add(size.into()), offset, end)?;
                coverage.add(start, stop)?;
                buf[(start - offset) as usize..(stop - offset) as usize].fill(0);
            }
            kind if kind & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                let e = wire.error_chunk(kind, length).await?;
                error.get_or_insert(e);
            }
            kind => {
                return protocol(format!(
                    "a chunk of type {kind} and {length} bytes to a read"
                ))
            }
        }
        if flags & NBD_REPLY_FLAG_DONE != 0 {
            if let Some(e) = error {
                return Ok(Err(e));
            }
            if !coverage.is(offset, end) {
                return protocol(format!(
                    "the reply to a read of {offset}..{end} covered only {:?}",
                    coverage.ranges
                ));
            }
            return Ok(Ok(()));
        }
    }
    protocol(format!(
        "more than {MAX_CHUNKS_PER_REPLY} chunks in one reply"
    ))
}

/// The end of a content chunk at `start..stop`, if it lies within the request.
fn within(start: u64, stop: Option<u64>, offset: u64, end: u64) -> Result<u64, Fault> {
    match stop {
        Some(stop) if start >= offset && stop <= end => Ok(stop),
        _ => protocol(format!(
            "a content chunk at {start}..{stop:?} outside the request {offset}..{end}"
        )),
    }
}

/// One `NBD_CMD_BLOCK_STATUS` of `length` bytes at `offset`: the extents of context `id`
/// (one chunk per negotiated context arrives; the others are skipped).
async fn block_status_once(
    wire: &mut Wire,
    negotiated: &[u32],
    id: u32,
    offset: u64,
    length: u32,
) -> Result<Result<Vec<Extent>, ServerError>, Fault> {
    let cookie = wire
        .send_request(NBD_CMD_BLOCK_STATUS, offset, length)
        .await?;
    let mut extents = None;
    let mut error = None;
    for _ in 0..MAX_CHUNKS_PER_REPLY {
        let (flags, kind, chunk_length) = match wire.reply(cookie).await? {
            Reply::Simple { error: 0 } => {
                return protocol("a simple reply without error to block status")
            }
            Reply::Simple { error: code } => {
                return Ok(Err(ServerError {
                    code,
                    offset: None,
                    message: String::new(),
                }))
            }
            Reply::Chunk {
                flags,
                kind,
                length,
            } => (flags, kind, length),
        };
        match kind {
            NBD_REPLY_TYPE_NONE if chunk_length == 0 => {}
            NBD_REPLY_TYPE_BLOCK_STATUS
                if chunk_length >= 12
                    && (chunk_length - 4).is_multiple_of(8)
                    && chunk_length <= MAX_BLOCK_STATUS_CHUNK =>
            {
                let context = wire.io.read_u32().await?;
                let count = (chunk_length - 4) / 8;
                if context != id {
                    if !negotiated.contains(&context) {
                        return protocol(format!("block status for unknown context id {context}"));
                    }
                    wire.skip(u64::from(chunk_length - 4)).await?;
                } else if extents.is_some() {
                    return protocol(format!("two block status chunks for context id {id}"));
                } else {
                    let mut list = Vec::new();
                    let mut at = offset;
                    for _ in 0..count {
                        let length = u64::from(wire.io.read_u32().await?);
                        let flags = wire.io.read_u32().await?;
                        if length == 0 {
                            return protocol("an extent of length 0");
                        }
                        list.push(Extent {
                            offset: at,
                            length,
                            flags,
                        });
                        let Some(next) = at.checked_add(length) else {
                            return protocol("extents beyond 2^64 bytes");
                        };
                        at = next;
                    }
                    extents = Some(list);
                }
            }
            kind if kind & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                let e = wire.error_chunk(kind, chunk_length).await?;
                error.get_or_insert(e);
            }
            kind => {
                return protocol(format!(
                    "a chunk of type {kind} and {chunk_length} bytes to block status"
                ))
            }
        }
        if flags & NBD_REPLY_FLAG_DONE != 0 {
            return match (error, extents) {
                (Some(e), _) => Ok(Err(e)),
                (None, Some(extents)) => Ok(Ok(extents)),
                (None, None) => protocol(format!("no block status for context id {id}")),
            };
        }
    }
    protocol(format!(
        "more than {MAX_CHUNKS_PER_REPLY} chunks in one reply"
    ))
}
