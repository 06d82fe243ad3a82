//! The sending end: reads the source's allocated extents, skips what the receiver already
//! holds, and sends the rest over parallel authenticated streams.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::auth::{random_bytes, PresharedKey};
use super::chunks::{self, Layout};
use super::manifest::ChunkManifest;
use super::names;
use super::receiver::{MAX_CHUNKS, MAX_STREAMS};
use super::wire::{
    BoxRead, BoxWrite, Encoding, ErrorCode, FrameReader, FrameWriter, Msg, WireError,
    KEEPALIVE_EVERY, MIN_IDLE, TO_RECEIVER, TO_SENDER, VERSION,
};
use super::{
    check_chunk_size, Phase, Progress, ResumedFrom, TransferReport, ViaductError,
    DEFAULT_CHUNK_SIZE,
};
use crate::sys::rate::RateLimiter;

/// A receiver: where it listens and the key it holds.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    pub key: PresharedKey,
    /// Speak TLS to it; `None` speaks plain TCP (frames are still authenticated, but not
    /// encrypted).
    pub tls: Option<EndpointTls>,
}

/// How a sender speaks TLS to a receiver.
#[derive(Debug, Clone)]
pub struct EndpointTls {
    /// The sender's certificate and the authority it trusts
    /// ([`crate::sys::tls::Identity::client_config`]).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the receiver's certificate must carry: its host name or IP address.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl Endpoint {
    pub fn new(addr: impl Into<String>, key: PresharedKey) -> Self {
        Endpoint {
            addr: addr.into(),
            key,
            tls: None,
        }
    }

    /// The same receiver, reached over TLS.
    pub fn with_tls(self, tls: EndpointTls) -> Self {
        Endpoint {
            tls: Some(tls),
            ..self
        }
    }
}

/// How a transfer runs.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Bytes per chunk: the unit of comparison, compression and integrity checks. A
    /// multiple of 4 KiB between 64 KiB and 64 MiB; default 1 MiB.
    pub chunk_size: u32,
    /// Parallel TCP streams (1 to 64); each takes the next chunk when it is free. Default 4.
    pub streams: usize,
    /// Cap on the bytes put on the wire per second, shared by all streams. Default none.
    pub max_bytes_per_sec: Option<u64>,
    /// zstd level for chunks that compress (0 sends everything raw). Default 1.
    pub compression_level: i32,
    /// Compress only while it saves time: when the wire (or the rate cap) is slower than
    /// the compressor. On a fast link the CPU is the bottleneck and chunks go raw; on a
    /// slow one every chunk that shrinks is compressed. A receiver on a loopback address
    /// without a rate cap gets raw chunks: both ends share this host's cores, and the
    /// "wire" is a memory copy. When false, every chunk that shrinks is compressed.
    /// Default true.
    pub adaptive_compression: bool,
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// A connection on which nothing moves for this long is given up. At least 15 s;
    /// default 60 s.
    pub io_timeout: Duration,
    /// Cancelling it stops the transfer; the receiver keeps what arrived for a resume.
    pub cancel: CancellationToken,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            streams: 4,
            max_bytes_per_sec: None,
            compression_level: 1,
            adaptive_compression: true,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            cancel: CancellationToken::new(),
        }
    }
}

impl SendOptions {
    fn check(&self) -> Result<(), ViaductError> {
        let bad = ViaductError::InvalidOptions;
        check_chunk_size(self.chunk_size).map_err(|e| bad(e.to_string()))?;
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return Err(bad(format!(
                "streams must be between 1 and {MAX_STREAMS}, got {}",
                self.streams
            )));
        }
        if self.max_bytes_per_sec == Some(0) {
            return Err(bad("max_bytes_per_sec must be above zero when set".into()));
        }
        if !(0..=19).contains(&self.compression_level) {
            return Err(bad(format!(
                "compression_level must be between 0 and 19, got {}",
                self.compression_level
            )));
        }
        if self.io_timeout < MIN_IDLE {
            return Err(bad(format!(
                "io_timeout must be at least {} s (keepalives come every {} s), got {:?}",
                MIN_IDLE.as_secs(),
                KEEPALIVE_EVERY.as_secs(),
                self.io_timeout
            )));
        }
        Ok(())
    }
}

type Reader = FrameReader<BoxRead>;
type Writer = FrameWriter<BoxWrite>;

struct Conn {
    reader: Reader,
    writer: Writer,
    /// The receiver is on this host: the bytes never leave its memory.
    loopback: bool,
}

#[derive(Default)]
struct Stats {
    bytes_read: AtomicU64,
    bytes_sent: Arc<AtomicU64>,
    chunks_done: AtomicU64,
    chunks_sent: AtomicU64,
    skipped_zero: AtomicU64,
    skipped_equal: AtomicU64,
}

/// What every stream of one transfer shares.
struct Job {
    path: PathBuf,
    peer: String,
    name: String,
    file: File,
    extents: Vec<Range<u64>>,
    layout: Layout,
    /// What the receiver holds, chunk by chunk.
    remote: Vec<blake3::Hash>,
    /// What the source holds, filled in as chunks are read.
    digests: Mutex<Vec<blake3::Hash>>,
    next: AtomicU64,
    level: i32,
    adaptive: bool,
    stats: Stats,
    cancel: CancellationToken,
}

/// Sends the image at `src` to the receiver at `to`, where it lands as `name` under the
/// receiver's root. `progress` is called a few times a second from this task.
pub async fn send_file(
    src: &Path,
    to: &Endpoint,
    name: &str,
    opts: &SendOptions,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<TransferReport, ViaductError> {
    let started = Instant::now();
    opts.check()?;
    let peer = to.addr.clone();
    names::check_name(name).map_err(|e| ViaductError::NameRefused {
        peer: peer.clone(),
        name: name.to_string(),
        detail: e.to_string(),
    })?;
    let path = src.to_path_buf();
    let (file, length, extents) = tokio::task::spawn_blocking(move || {
        let file = chunks::open_source(&path)?;
        let source = |source| ViaductError::Source {
            path: path.clone(),
            source,
        };
        let length = chunks::image_length(&file).map_err(source)?;
        let extents = chunks::data_extents(&file, length).map_err(source)?;
        Ok::<_, ViaductError>((file, length, extents))
    })
    .await
    .map_err(|e| ViaductError::Internal(format!("the source reader failed: {e}")))??;
    let layout = Layout::new(length, opts.chunk_size);
    if layout.chunks > MAX_CHUNKS {
        return Err(ViaductError::InvalidOptions(format!(
            "{} has {} chunks of {} bytes; at most {MAX_CHUNKS} are allowed: use larger chunks",
            src.display(),
            layout.chunks,
            opts.chunk_size
        )));
    }
    let allocated: u64 = extents.iter().map(|e| e.end - e.start).sum();
    let streams = opts.streams.min(layout.chunks.max(1) as usize);
    let stats = Stats::default();
    let limiter = opts
        .max_bytes_per_sec
        .map(|r| Arc::new(RateLimiter::new(r)));
    let snapshot = |phase, stats: &Stats| Progress {
        phase,
        image_bytes: length,
        chunks_total: layout.chunks,
        chunks_done: stats.chunks_done.load(Ordering::Relaxed),
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_sent: stats.bytes_sent.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    };
    progress(snapshot(Phase::Comparing, &stats));

    let cancel = opts.cancel.child_token();
    let link = Link {
        to,
        opts,
        counter: stats.bytes_sent.clone(),
        limiter: limiter.clone(),
    };
    let opening = async {
        let mut control = link.connect().await?;
        let open = Msg::Open {
            length,
            chunk_size: opts.chunk_size,
            streams: streams as u16,
            allocated,
            name: name.to_string(),
        };
        control
            .writer
            .write(&open, &[])
            .await
            .map_err(|e| wire_error(&peer, e))?;
        let (transfer, resumed, digests) = match read_reply(&mut control, &peer, name).await? {
            Msg::Opened {
                transfer,
                resumed,
                digests,
            } => (transfer, resumed, digests),
            other => return Err(unexpected(&peer, "Opened", &other)),
        };
        let remote = if resumed == ResumedFrom::None {
            (0..layout.chunks).map(|i| layout.zero_digest(i)).collect()
        } else if digests.len() as u64 == layout.chunks {
            digests
        } else {
            return Err(ViaductError::Protocol {
                peer: peer.clone(),
                detail: format!(
                    "the receiver reported {} chunk digests for {} chunks",
                    digests.len(),
                    layout.chunks
                ),
            });
        };
        let joins = (1..streams).map(|_| link.join(transfer, name));
        let mut conns = vec![control];
        conns.extend(futures_util::future::try_join_all(joins).await?);
        Ok::<_, ViaductError>((conns, resumed, remote))
    };
    let (conns, resumed, remote) = tokio::select! {
        r = opening => r?,
        _ = opts.cancel.cancelled() => return Err(ViaductError::Cancelled),
    };
    let loopback = conns.iter().all(|c| c.loopback);

    let job = Arc::new(Job {
        path: src.to_path_buf(),
        peer: peer.clone(),
        name: name.to_string(),
        file,
        extents,
        digests: Mutex::new(vec![
            blake3::Hash::from_bytes([0; 32]);
            layout.chunks as usize
        ]),
        layout: layout.clone(),
        remote,
        next: AtomicU64::new(0),
        level: if compression_pays(opts, loopback) {
            opts.compression_level
        } else {
            0
        },
        adaptive: opts.adaptive_compression,
        stats,
        cancel: cancel.clone(),
    });
    let mut workers = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        workers.spawn(run_stream(i, conn, job.clone()));
    }
    let snapshot = |phase| snapshot(phase, &job.stats);
    let keepalive_every = KEEPALIVE_EVERY;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut control: Option<Conn> = None;
    let mut last_keepalive = Instant::now();
    let failure = loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                None => break None,
                Some(Ok(Ok((0, conn)))) => {
                    control = Some(conn);
                    last_keepalive = Instant::now();
                }
                Some(Ok(Ok(_))) => {}
                Some(Ok(Err(e))) => break Some(e),
                Some(Err(e)) => break Some(ViaductError::Internal(format!("a stream task failed: {e}"))),
            },
            _ = tick.tick() => {
                progress(snapshot(Phase::Transferring));
                // The first stream idles while the others finish: keep the receiver from
                // timing it out.
                if let Some(c) = control.as_mut() {
                    if last_keepalive.elapsed() >= keepalive_every {
                        last_keepalive = Instant::now();
                        if let Err(e) = c.writer.write(&Msg::Keepalive, &[]).await {
                            break Some(wire_error(&peer, e));
                        }
                    }
                }
            }
            _ = opts.cancel.cancelled() => break Some(ViaductError::Cancelled),
        }
    };
    if let Some(e) = failure {
        cancel.cancel();
        workers.abort_all();
        return Err(e);
    }
    let Some(mut control) = control else {
        return Err(ViaductError::Internal(
            "the first stream ended without handing back its connection".into(),
        ));
    };

    progress(snapshot(Phase::Verifying));
    let (digest, manifest) = {
        let digests = job.digests.lock().unwrap_or_else(|p| p.into_inner());
        (
            layout.image_digest(&digests),
            ChunkManifest::from_hashes(&layout, &digests),
        )
    };
    let committing = async {
        control
            .writer
            .write(&Msg::Commit { digest: digest.0 }, &[])
            .await
            .map_err(|e| wire_error(&peer, e))?;
        match read_reply(&mut control, &peer, name).await? {
            Msg::Committed { digest: held } if held == digest.0 => Ok(()),
            Msg::Committed { digest: held } => Err(ViaductError::DigestMismatch {
                at: peer.clone(),
                detail: format!(
                    "the sender read {digest}, the receiver committed {}",
                    super::ImageDigest(held)
                ),
            }),
            other => Err(unexpected(&peer, "Committed", &other)),
        }
    };
    tokio::select! {
        r = committing => r?,
        _ = opts.cancel.cancelled() => return Err(ViaductError::Cancelled),
    }
    control.writer.shutdown().await;
    let stats = &job.stats;
    let report = TransferReport {
        image_bytes: length,
        chunk_size: opts.chunk_size,
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_sent: stats.bytes_sent.load(Ordering::Relaxed),
        chunks_total: layout.chunks,
        chunks_sent: stats.chunks_sent.load(Ordering::Relaxed),
        chunks_skipped_zero: stats.skipped_zero.load(Ordering::Relaxed),
        chunks_skipped_equal: stats.skipped_equal.load(Ordering::Relaxed),
        digest,
        duration: started.elapsed(),
        streams,
        resumed_from: resumed,
        manifest,
    };
    progress(snapshot(Phase::Verifying));
    Ok(report)
}

/// Whether compressing chunks can save time. Over loopback without a rate cap it cannot:
/// the bytes never leave the host's memory, so the "wire" is a memory copy, and sender and
/// receiver share the host's cores, so every CPU second spent compressing and decompressing
/// is taken from hashing and copying. The adaptive rule would see the receiver's CPU-bound
/// pace as a slow wire and compress anyway.
fn compression_pays(opts: &SendOptions, loopback: bool) -> bool {
    opts.compression_level > 0
        && !(opts.adaptive_compression && loopback && opts.max_bytes_per_sec.is_none())
}

fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// What opening a connection needs.
struct Link<'a> {
    to: &'a Endpoint,
    opts: &'a SendOptions,
    counter: Arc<AtomicU64>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Link<'_> {
    /// Connects and authenticates: the receiver proves it holds the key before the sender
    /// proves it does.
    async fn connect(&self) -> Result<Conn, ViaductError> {
        let peer = &self.to.addr;
        let stream = tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(peer))
            .await
            .map_err(|_| ViaductError::Connect {
                peer: peer.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {} s",
                        self.opts.connect_timeout.as_secs_f64()
                    ),
                ),
            })?
            .map_err(|source| ViaductError::Connect {
                peer: peer.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let loopback = stream.peer_addr().is_ok_and(|a| is_loopback(a.ip()));
        let (rd, wr) = match &self.to.tls {
            None => super::wire::split_tcp(stream),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let handshake = connector.connect(tls.server_name.clone(), stream);
                let stream = tokio::time::timeout(self.opts.connect_timeout, handshake)
                    .await
                    .map_err(|_| ViaductError::Connect {
                        peer: peer.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the TLS handshake did not finish in time",
                        ),
                    })?
                    .map_err(|source| ViaductError::Connect {
                        peer: peer.clone(),
                        source,
                    })?;
                let server = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::sys::tls::party_of);
                if server.is_none() {
                    return Err(ViaductError::Connect {
                        peer: peer.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            "the receiver's certificate names no FluidCloud role",
                        ),
                    });
                }
                super::wire::split(stream)
            }
        };
        let idle = self.opts.io_timeout;
        let mut conn = Conn {
            reader: FrameReader::new(rd, TO_SENDER, idle),
            writer: FrameWriter::new(wr, TO_RECEIVER, idle),
            loopback,
        };
        conn.writer.set_counter(self.counter.clone());
        conn.writer.set_limiter(self.limiter.clone());
        let wire = |e| wire_error(peer, e);
        let client_nonce: [u8; 32] = random_bytes();
        let hello = Msg::Hello {
            version: VERSION,
            nonce: client_nonce,
        };
        conn.writer.write(&hello, &[]).await.map_err(wire)?;
        let mut body = Vec::new();
        let (server_nonce, proof) = match conn.reader.read(&mut body).await.map_err(wire)? {
            Msg::Challenge {
                version,
                nonce,
                proof,
            } => {
                if version != VERSION {
                    return Err(ViaductError::Protocol {
                        peer: peer.clone(),
                        detail: format!(
                            "the receiver speaks protocol version {version}, this sender {VERSION}"
                        ),
                    });
                }
                (nonce, proof)
            }
            Msg::Error {
                code,
                offset,
                message,
            } => return Err(remote_error(peer, "", code, offset, message)),
            other => return Err(unexpected(peer, "Challenge", &other)),
        };
        let key = &self.to.key;
        if key.server_proof(&client_nonce, &server_nonce) != blake3::Hash::from_bytes(proof) {
            let refusal = Msg::error(
                ErrorCode::WrongKey,
                u64::MAX,
                "the receiver's proof does not match the sender's key",
            );
            let _ = conn.writer.write(&refusal, &[]).await;
            conn.writer.shutdown().await;
            return Err(ViaductError::WrongKey {
                peer: peer.clone(),
                detail: "the receiver's proof does not match this sender's key: the pre-shared keys differ".into(),
            });
        }
        let response = Msg::Response {
            proof: *key.client_proof(&client_nonce, &server_nonce).as_bytes(),
        };
        conn.writer.write(&response, &[]).await.map_err(wire)?;
        let session = key.session(&client_nonce, &server_nonce);
        conn.writer.set_session(session.clone());
        match conn.reader.read(&mut body).await.map_err(wire)? {
            Msg::AuthOk => {}
            Msg::Error {
                code,
                offset,
                message,
            } => return Err(remote_error(peer, "", code, offset, message)),
            other => return Err(unexpected(peer, "AuthOk", &other)),
        }
        conn.reader.set_session(session);
        Ok(conn)
    }

    async fn join(&self, transfer: [u8; 16], name: &str) -> Result<Conn, ViaductError> {
        let peer = &self.to.addr;
        let mut conn = self.connect().await?;
        conn.writer
            .write(&Msg::Join { transfer }, &[])
            .await
            .map_err(|e| wire_error(peer, e))?;
        match read_reply(&mut conn, peer, name).await? {
            Msg::Joined => Ok(conn),
            other => Err(unexpected(peer, "Joined", &other)),
        }
    }
}

/// Reads the receiver's next frame other than a keepalive, turning an error frame into
/// the matching error.
async fn read_reply(conn: &mut Conn, peer: &str, name: &str) -> Result<Msg, ViaductError> {
    let mut body = Vec::new();
    loop {
        match conn.reader.read(&mut body).await {
            Ok(Msg::Keepalive) => {}
            Ok(Msg::Error {
                code,
                offset,
                message,
            }) => return Err(remote_error(peer, name, code, offset, message)),
            Ok(msg) => return Ok(msg),
            Err(e) => return Err(wire_error(peer, e)),
        }
    }
}

fn unexpected(peer: &str, wanted: &str, got: &Msg) -> ViaductError {
    ViaductError::Protocol {
        peer: peer.to_string(),
        detail: format!("expected {wanted}, got {:?}", got.kind()),
    }
}

fn wire_error(peer: &str, e: WireError) -> ViaductError {
    let peer = peer.to_string();
    match e {
        WireError::Closed => ViaductError::ConnectionDropped {
            peer,
            detail: "the receiver closed the connection".into(),
        },
        WireError::Io(e) => ViaductError::ConnectionDropped {
            peer,
            detail: e.to_string(),
        },
        WireError::Idle(d) => ViaductError::ConnectionDropped {
            peer,
            detail: format!("nothing arrived for {} s", d.as_secs_f64()),
        },
        WireError::Malformed(m) => ViaductError::Protocol {
            peer,
            detail: m.to_string(),
        },
        e @ WireError::BadMac(..) => ViaductError::Protocol {
            peer,
            detail: format!("a frame from the receiver failed authentication: {e}"),
        },
    }
}

/// Turns the receiver's error frame into the error the caller can act on.
fn remote_error(
    peer: &str,
    name: &str,
    code: ErrorCode,
    offset: u64,
    message: String,
) -> ViaductError {
    let peer = peer.to_string();
    match code {
        ErrorCode::WrongKey => ViaductError::WrongKey {
            peer,
            detail: format!("the receiver refused this sender: {message}"),
        },
        ErrorCode::BadName => ViaductError::NameRefused {
            peer,
            name: name.to_string(),
            detail: message,
        },
        ErrorCode::Busy => ViaductError::Busy {
            peer,
            name: name.to_string(),
        },
        ErrorCode::DiskFull => ViaductError::TargetDiskFull {
            what: format!("`{name}` at {peer}"),
            detail: message,
        },
        ErrorCode::Tampered => ViaductError::Tampered {
            peer,
            offset,
            detail: message,
        },
        ErrorCode::DigestMismatch => ViaductError::DigestMismatch {
            at: peer,
            detail: message,
        },
        ErrorCode::Shutdown => ViaductError::ConnectionDropped {
            peer,
            detail: message,
        },
        ErrorCode::Io | ErrorCode::Protocol | ErrorCode::Invalid => ViaductError::Remote {
            peer,
            detail: message,
        },
    }
}

/// A frame ready to go, prepared off the async runtime.
enum Prepared {
    Frame { msg: Msg, body: Vec<u8> },
    Failed(ViaductError),
}

/// Runs one stream: a blocking producer reads, hashes and compresses chunks while this
/// task writes them and listens for the receiver's verdict.
async fn run_stream(
    index: usize,
    mut conn: Conn,
    job: Arc<Job>,
) -> Result<(usize, Conn), ViaductError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Prepared>(2);
    let (recycle_tx, recycle_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let meter = Arc::new(WireMeter::default());
    let producer_job = job.clone();
    let producer_meter = meter.clone();
    let producer = tokio::task::spawn_blocking(move || {
        produce(&producer_job, &producer_meter, tx, recycle_rx)
    });
    let peer = job.peer.as_str();
    let result = {
        let Conn { reader, writer, .. } = &mut conn;
        let send = async {
            let mut frames = 0u64;
            while let Some(prepared) = rx.recv().await {
                match prepared {
                    Prepared::Frame { msg, body } => {
                        let started = Instant::now();
                        writer
                            .write(&msg, &body)
                            .await
                            .map_err(|e| wire_error(peer, e))?;
                        if !body.is_empty() {
                            meter.record(body.len(), started.elapsed());
                        }
                        job.stats.chunks_done.fetch_add(1, Ordering::Relaxed);
                        let _ = recycle_tx.send(body);
                        frames += 1;
                    }
                    Prepared::Failed(e) => return Err(e),
                }
            }
            if job.cancel.is_cancelled() {
                return Err(ViaductError::Cancelled);
            }
            writer
                .write(&Msg::Done { frames }, &[])
                .await
                .map_err(|e| wire_error(peer, e))
        };
        let listen = async {
            let mut body = Vec::new();
            loop {
                match reader.read(&mut body).await {
                    Ok(Msg::Keepalive) => {}
                    Ok(Msg::DoneAck) => return Ok(()),
                    Ok(Msg::Error {
                        code,
                        offset,
                        message,
                    }) => return Err(remote_error(peer, &job.name, code, offset, message)),
                    Ok(other) => return Err(unexpected(peer, "DoneAck", &other)),
                    Err(e) => return Err(wire_error(peer, e)),
                }
            }
        };
        tokio::pin!(listen);
        tokio::select! {
            r = &mut listen => match r {
                // The receiver answered before the stream was done: only an error can do that.
                Ok(()) => Err(ViaductError::Protocol {
                    peer: peer.to_string(),
                    detail: "the receiver acknowledged a stream before its end".into(),
                }),
                Err(e) => Err(e),
            },
            r = send => match r {
                Ok(()) => listen.await,
                // A failed write usually means the receiver gave up; its reason is worth more
                // than the broken pipe.
                Err(e) => match tokio::time::timeout(Duration::from_secs(2), &mut listen).await {
                    Ok(Err(remote)) if !matches!(remote, ViaductError::ConnectionDropped { .. }) => Err(remote),
                    _ => Err(e),
                },
            },
        }
    };
    if result.is_err() {
        job.cancel.cancel();
    }
    drop(rx);
    let _ = producer.await;
    result.map(|()| (index, conn))
}

/// Takes chunks off the shared counter until none are left: reads, hashes, compares with
/// the receiver's digest, and prepares a frame for each chunk that must travel.
fn produce(
    job: &Job,
    meter: &WireMeter,
    tx: tokio::sync::mpsc::Sender<Prepared>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let layout = &job.layout;
    let stats = &job.stats;
    let mut packer = if job.level > 0 {
        zstd::bulk::Compressor::new(job.level)
            .ok()
            .map(|c| Packer::new(c, job.adaptive))
    } else {
        None
    };
    let mut spare: Option<Vec<u8>> = None;
    loop {
        if job.cancel.is_cancelled() {
            return;
        }
        let index = job.next.fetch_add(1, Ordering::Relaxed);
        if index >= layout.chunks {
            return;
        }
        let (offset, len) = layout.range(index);
        let mut buf = spare
            .take()
            .or_else(|| recycled.try_recv().ok())
            .unwrap_or_default();
        buf.resize(len, 0);
        let zero = if chunks::overlaps(&job.extents, offset, len as u64) {
            match chunks::read_sparse(&job.file, &job.extents, offset, &mut buf) {
                Ok(read) => {
                    stats.bytes_read.fetch_add(read, Ordering::Relaxed);
                }
                Err(source) => {
                    let _ = tx.blocking_send(Prepared::Failed(ViaductError::Source {
                        path: job.path.clone(),
                        source,
                    }));
                    return;
                }
            }
            chunks::is_zero(&buf)
        } else {
            true
        };
        let digest = if zero {
            layout.zero_digest(index)
        } else {
            blake3::hash(&buf)
        };
        job.digests.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = digest;
        let held = job.remote[index as usize];
        if zero {
            stats.skipped_zero.fetch_add(1, Ordering::Relaxed);
        }
        if held == digest {
            if !zero {
                stats.skipped_equal.fetch_add(1, Ordering::Relaxed);
            }
            stats.chunks_done.fetch_add(1, Ordering::Relaxed);
            spare = Some(buf);
            continue;
        }
        let prepared = if zero {
            spare = Some(buf);
            Prepared::Frame {
                msg: Msg::Zero { index },
                body: Vec::new(),
            }
        } else {
            let mut packed = recycled.try_recv().unwrap_or_default();
            let packs = match packer.as_mut() {
                Some(p) => p.pack(&buf, &mut packed, meter.secs_per_byte()),
                None => false,
            };
            let encoding = if packs { Encoding::Zstd } else { Encoding::Raw };
            let body = if encoding == Encoding::Zstd {
                spare = Some(buf);
                packed
            } else {
                spare = Some(packed);
                buf
            };
            stats.chunks_sent.fetch_add(1, Ordering::Relaxed);
            Prepared::Frame {
                msg: Msg::Chunk {
                    index,
                    encoding,
                    plain_len: len as u32,
                    digest,
                },
                body,
            }
        };
        if tx.blocking_send(prepared).is_err() {
            return;
        }
    }
}

/// How long the wire takes per byte on one stream, writes and rate-limit waits included.
/// Bytes and seconds are averaged separately and divided, so that a small frame that
/// waits out the previous large frame's share of the rate cap does not skew the figure.
#[derive(Default)]
struct WireMeter {
    /// Decaying sums of bytes written and seconds spent writing them.
    sums: Mutex<(f64, f64)>,
}

impl WireMeter {
    fn record(&self, bytes: usize, took: Duration) {
        let mut s = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0 * 0.8 + bytes as f64;
        s.1 = s.1 * 0.8 + took.as_secs_f64();
    }

    fn secs_per_byte(&self) -> Option<f64> {
        let s = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        (s.0 > 0.0 && s.1 > 0.0).then(|| s.1 / s.0)
    }
}

const SAMPLE_BYTES: usize = 8 << 10;
const SAMPLES: usize = 4;

/// Decides per chunk whether compression pays, and compresses.
struct Packer {
    zstd: zstd::bulk::Compressor<'static>,
    adaptive: bool,
    /// Moving average of the compressor's time per input byte.
    secs_per_byte: Option<f64>,
    sample: Vec<u8>,
}

impl Packer {
    fn new(zstd: zstd::bulk::Compressor<'static>, adaptive: bool) -> Self {
        Packer {
            zstd,
            adaptive,
            secs_per_byte: None,
            sample: Vec::new(),
        }
    }

    /// Whether compressing to `ratio` (packed / plain) saves more wire time than it costs:
    /// `(1 - ratio) * wire > cpu`, both per byte. Unknown speeds count as paying, so that
    /// the first chunks measure them.
    fn pays(&self, ratio: f64, wire: Option<f64>) -> bool {
        match (wire, self.secs_per_byte) {
            (Some(w), Some(c)) if self.adaptive => (1.0 - ratio) * w > c,
            _ => true,
        }
    }

    /// Compresses `chunk` into `out` when it pays. Four 8 KiB samples spread over the chunk
    /// estimate the ratio at a small fraction of the cost of trying the whole chunk (random
    /// or already compressed data never shrinks by the tenth asked for); the whole chunk
    /// must then shrink by a sixteenth.
    fn pack(&mut self, chunk: &[u8], out: &mut Vec<u8>, wire: Option<f64>) -> bool {
        // Not even a perfect ratio would pay: skip the samples too.
        if !self.pays(0.0, wire) {
            return false;
        }
        if chunk.len() >= SAMPLES * SAMPLE_BYTES * 2 {
            let stride = chunk.len() / SAMPLES;
            let mut packed = 0;
            for k in 0..SAMPLES {
                let part = &chunk[k * stride..k * stride + SAMPLE_BYTES];
                self.sample.clear();
                self.sample
                    .reserve(zstd::zstd_safe::compress_bound(SAMPLE_BYTES));
                match self.zstd.compress_to_buffer(part, &mut self.sample) {
                    Ok(n) => packed += n,
                    Err(_) => return false,
                }
            }
            let ratio = packed as f64 / (SAMPLES * SAMPLE_BYTES) as f64;
            if ratio > 0.9 || !self.pays(ratio, wire) {
                return false;
            }
        }
        let budget = chunk.len() - chunk.len() / 16;
        out.clear();
        out.reserve(budget);
        let started = Instant::now();
        let result = self.zstd.compress_to_buffer(chunk, out);
        let now = started.elapsed().as_secs_f64() / chunk.len().max(1) as f64;
        self.secs_per_byte = Some(self.secs_per_byte.map_or(now, |old| old * 0.7 + now * 0.3));
        matches!(result, Ok(n) if n <= budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_is_skipped_for_random_data_and_used_for_text() {
        let mut p = Packer::new(zstd::bulk::Compressor::new(1).unwrap(), false);
        let mut out = Vec::new();
        let mut random = vec![0u8; 1 << 20];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut random);
        assert!(!p.pack(&random, &mut out, None));
        assert!(p.secs_per_byte.is_none(), "the samples alone ruled it out");
        let text = b"the quick brown fox jumps over the lazy dog; ".repeat(30_000);
        assert!(p.pack(&text[..1 << 20], &mut out, None));
        assert!(out.len() < (1 << 20) / 10);
        assert_eq!(
            zstd::bulk::decompress(&out, 1 << 20).unwrap(),
            &text[..1 << 20]
        );
    }

    #[test]
    fn adaptive_compression_follows_the_wire() {
        let mut p = Packer::new(zstd::bulk::Compressor::new(1).unwrap(), true);
        let mut out = Vec::new();
        let text = b"the quick brown fox jumps over the lazy dog; ".repeat(30_000);
        let chunk = &text[..1 << 20];
        // Nothing measured yet: try, and learn the compressor's speed.
        assert!(p.pack(chunk, &mut out, None));
        let cpu = p.secs_per_byte.unwrap();
        // A wire much faster than the compressor: raw is quicker.
        assert!(!p.pack(chunk, &mut out, Some(cpu / 10.0)));
        // A wire much slower (a rate cap, a long link): compress.
        assert!(p.pack(chunk, &mut out, Some(cpu * 100.0)));
    }

    #[test]
    fn receiver_errors_become_the_matching_variants() {
        let e = |code| remote_error("10.0.0.2:7000", "vm/disk.raw", code, 4096, "why".into());
        match e(ErrorCode::DiskFull) {
            ViaductError::TargetDiskFull { what, detail } => {
                assert!(what.contains("vm/disk.raw") && what.contains("10.0.0.2:7000"));
                assert_eq!(detail, "why");
            }
            other => panic!("{other}"),
        }
        assert!(matches!(
            e(ErrorCode::Tampered),
            ViaductError::Tampered { offset: 4096, .. }
        ));
        assert!(matches!(
            e(ErrorCode::WrongKey),
            ViaductError::WrongKey { .. }
        ));
        assert!(matches!(
            e(ErrorCode::BadName),
            ViaductError::NameRefused { .. }
        ));
        assert!(matches!(e(ErrorCode::Busy), ViaductError::Busy { .. }));
        assert!(matches!(
            e(ErrorCode::DigestMismatch),
            ViaductError::DigestMismatch { .. }
        ));
        assert!(matches!(
            e(ErrorCode::Shutdown),
            ViaductError::ConnectionDropped { .. }
        ));
    }

    #[test]
    fn bad_options_are_named() {
        let mut o = SendOptions {
            streams: 0,
            ..SendOptions::default()
        };
        assert!(o.check().unwrap_err().to_string().contains("streams"));
        o.streams = 2;
        o.chunk_size = 100_000;
        assert!(o
            .check()
            .unwrap_err()
            .to_string()
            .contains("multiple of 4096"));
        o.chunk_size = DEFAULT_CHUNK_SIZE;
        o.io_timeout = Duration::from_secs(1);
        assert!(o.check().unwrap_err().to_string().contains("io_timeout"));
        o.io_timeout = Duration::from_secs(60);
        o.max_bytes_per_sec = Some(0);
        assert!(o
            .check()
            .unwrap_err()
            .to_string()
            .contains("max_bytes_per_sec"));
    }
}
