//! The receiving end: accepts authenticated connections, compares what it holds, writes
//! chunks into `<name>.partial` and renames it once the image digest matches.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::auth::{random_bytes, PresharedKey};
use super::chunks::{self, CopyError, Layout};
use super::names::{self, Placement};
use super::wire::{
    BoxRead, BoxWrite, Encoding, ErrorCode, FrameReader, FrameWriter, Kind, Msg, WireError,
    KEEPALIVE_EVERY, MIN_IDLE, NO_OFFSET, TO_RECEIVER, TO_SENDER, VERSION,
};
use super::{check_chunk_size, ImageDigest, ResumedFrom, ViaductError};

/// At most this many chunks per image (the digest list is then 128 MiB).
pub(crate) const MAX_CHUNKS: u64 = 4 << 20;
/// At most this many parallel streams per transfer.
pub(crate) const MAX_STREAMS: usize = 64;

/// How a receiver runs.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Directory under which images land; names are relative paths below it. Must exist.
    pub root: PathBuf,
    /// The key senders must prove they hold.
    pub key: PresharedKey,
    /// Cancelling it stops accepting, ends running transfers (their `.partial` files stay
    /// for a resume) and makes [`serve`] return.
    pub shutdown: CancellationToken,
    /// Flush the image to disk before renaming it into place. Default true: a rename that
    /// survives a power cut over data that did not would leave a corrupt image behind.
    pub fsync: bool,
    /// A connection on which nothing moves for this long is dropped. At least 15 s;
    /// default 60 s.
    pub io_timeout: Duration,
    /// How long a transfer waits for an earlier one of the same name to end (a sender
    /// that reconnects after a drop may arrive before the receiver noticed). Default 10 s.
    pub busy_wait: Duration,
    /// Speak TLS: every sender must present a certificate of the authority naming a
    /// FluidCloud role ([`crate::sys::tls::Identity::server_config`]). `None` accepts plain
    /// TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Told of every image put in place, with the digest checked against the sender's.
    pub on_commit: Option<OnCommit>,
    /// Images are staging copies that nobody else reads while a transfer runs (an agent's
    /// incoming images): a new version is written into the previous one instead of into a
    /// copy of it, and the chunk digests this receiver computed at the previous commit are
    /// trusted when the file is still the one it committed. A transfer after a pre-copy then
    /// starts at once, however large the image. Default false: the previous version stays
    /// whole until the new one is complete.
    pub staging: bool,
}

/// Hears which image the receiver put in place under which name, and its checked digest:
/// whoever uses the image next can then trust it without reading it again.
#[derive(Clone)]
pub struct OnCommit(pub Arc<CommitFn>);

/// What [`OnCommit`] calls: the image's name and its digest.
pub type CommitFn = dyn Fn(&str, &ImageDigest) + Send + Sync;

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCommit")
    }
}

impl ReceiverOptions {
    pub fn new(root: impl Into<PathBuf>, key: PresharedKey) -> Self {
        ReceiverOptions {
            root: root.into(),
            key,
            shutdown: CancellationToken::new(),
            fsync: true,
            io_timeout: Duration::from_secs(60),
            busy_wait: Duration::from_secs(10),
            tls: None,
            on_commit: None,
            staging: false,
        }
    }
}

struct Shared {
    root: PathBuf,
    key: PresharedKey,
    fsync: bool,
    idle: Duration,
    busy_wait: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    on_commit: Option<OnCommit>,
    staging: bool,
    /// In staging mode, the chunk digests of each image as committed, with the file they
    /// describe.
    committed: Mutex<HashMap<PathBuf, Committed>>,
    shutdown: CancellationToken,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    transfers: Mutex<HashMap<[u8; 16], Weak<Transfer>>>,
}

/// A committed image's chunk digests and the file they describe.
struct Committed {
    file: FileId,
    layout: Layout,
    digests: Vec<blake3::Hash>,
}

/// What tells one version of a file from another: the same inode, size and modification
/// time mean nobody wrote to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// One image being received, shared by its streams.
struct Transfer {
    name: String,
    placement: Placement,
    file: Arc<File>,
    layout: Layout,
    /// The digest of every chunk as the partial file holds it now.
    table: Mutex<Vec<blake3::Hash>>,
    /// Held while writing to `file`. The file system serialises writers to one file
    /// anyway; a writer that waits here sleeps, where one waiting on the inode lock spins
    /// and takes a core from the streams that are hashing.
    write_lock: Mutex<()>,
    streams: Mutex<StreamCount>,
    announced_streams: usize,
    /// Cancelled when any stream fails or the first connection ends: the others stop.
    cancel: CancellationToken,
    disk_full: AtomicBool,
    _lock: tokio::sync::OwnedMutexGuard<()>,
}

#[derive(Default)]
struct StreamCount {
    joined: usize,
    done: usize,
}

/// Why the receiver gives up on a connection.
#[derive(Debug)]
struct Fail {
    code: ErrorCode,
    offset: u64,
    message: String,
    /// Whether an error frame can still reach the sender.
    tell: bool,
    /// A consequence of a failure reported elsewhere (another stream, the sender).
    secondary: bool,
}

impl Fail {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Fail {
            code,
            offset: NO_OFFSET,
            message: message.into(),
            tell: true,
            secondary: false,
        }
    }
    fn at(code: ErrorCode, offset: u64, message: impl Into<String>) -> Self {
        Fail {
            offset,
            ..Fail::new(code, message)
        }
    }
    fn wire(e: WireError) -> Self {
        match e {
            WireError::BadMac(..) => Fail::new(ErrorCode::Tampered, e.to_string()),
            WireError::Malformed(_) => Fail::new(ErrorCode::Protocol, e.to_string()),
            _ => Fail {
                tell: false,
                ..Fail::new(ErrorCode::Io, e.to_string())
            },
        }
    }
    fn quiet(message: impl Into<String>) -> Self {
        Fail {
            tell: false,
            secondary: true,
            ..Fail::new(ErrorCode::Io, message)
        }
    }
}

type Reader = FrameReader<BoxRead>;
type Writer = FrameWriter<BoxWrite>;

struct Conn {
    reader: Reader,
    writer: Writer,
    peer: SocketAddr,
}

/// Runs a receiver on `listener` until `opts.shutdown` is cancelled.
pub async fn serve(listener: TcpListener, opts: ReceiverOptions) -> Result<(), ViaductError> {
    if opts.io_timeout < MIN_IDLE {
        return Err(ViaductError::InvalidOptions(format!(
            "io_timeout must be at least {} s (keepalives come every {} s), got {:?}",
            MIN_IDLE.as_secs(),
            KEEPALIVE_EVERY.as_secs(),
            opts.io_timeout
        )));
    }
    let root = std::fs::canonicalize(&opts.root).map_err(|e| ViaductError::Root {
        path: opts.root.clone(),
        detail: format!("cannot resolve it: {e}"),
    })?;
    if !root.is_dir() {
        return Err(ViaductError::Root {
            path: opts.root.clone(),
            detail: "it is not a directory".into(),
        });
    }
    let shared = Arc::new(Shared {
        root,
        key: opts.key,
        fsync: opts.fsync,
        idle: opts.io_timeout,
        busy_wait: opts.busy_wait,
        tls: opts.tls.map(tokio_rustls::TlsAcceptor::from),
        on_commit: opts.on_commit,
        staging: opts.staging,
        committed: Mutex::new(HashMap::new()),
        shutdown: opts.shutdown,
        locks: Mutex::new(HashMap::new()),
        transfers: Mutex::new(HashMap::new()),
    });
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    tracing::info!(
        "The viaduct receiver listens on {local} and writes under {}.",
        shared.root.display()
    );
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tasks.spawn(connection(shared.clone(), stream, peer));
                }
                Err(e) => {
                    // Running out of descriptors must not end the receiver; pause instead
                    // of spinning on the error.
                    tracing::warn!("The viaduct receiver could not accept a connection: {e}.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tracing::info!("The viaduct receiver on {local} is stopping.");
    while tasks.join_next().await.is_some() {}
    tracing::info!("The viaduct receiver on {local} stopped.");
    Ok(())
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = match &shared.tls {
        None => super::wire::split_tcp(stream),
        Some(acceptor) => {
            let tls = match tokio::time::timeout(shared.idle, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(
                        "The viaduct receiver refused a TLS connection from {peer}: {e}."
                    );
                    return;
                }
                Err(_) => {
                    tracing::warn!("The viaduct receiver dropped a connection from {peer}: its TLS handshake did not finish.");
                    return;
                }
            };
            match crate::sys::tls::peer_of(&tls) {
                // Agents send to each other; the daemon sends its own providers' volumes.
                Some(_) => {}
                None => {
                    tracing::warn!(
                        "The viaduct receiver refused a party it does not know from {peer}: its certificate names no FluidCloud role."
                    );
                    return;
                }
            }
            super::wire::split(tls)
        }
    };
    let mut conn = Conn {
        reader: FrameReader::new(rd, TO_RECEIVER, shared.idle),
        writer: FrameWriter::new(wr, TO_SENDER, shared.idle),
        peer,
    };
    let mut name = None;
    let result = tokio::select! {
        r = run_connection(&shared, &mut conn, &mut name) => r,
        _ = shared.shutdown.cancelled() => Err(Fail::new(ErrorCode::Shutdown, "the receiver is shutting down")),
    };
    let Err(fail) = result else {
        conn.writer.shutdown().await;
        return;
    };
    let about = name.map_or_else(String::new, |n: String| format!(" for `{n}`"));
    if fail.secondary {
        tracing::debug!("The connection{about} from {peer} ended: {}.", fail.message);
    } else if fail.code == ErrorCode::WrongKey {
        tracing::warn!("Refused the sender at {peer}: {}.", fail.message);
    } else {
        let partial = match fail.code {
            ErrorCode::DiskFull => "; its partial file is removed to free the space",
            ErrorCode::Tampered
            | ErrorCode::DigestMismatch
            | ErrorCode::Io
            | ErrorCode::Shutdown => "; its partial file, if any, is kept for a resume",
            _ => "",
        };
        tracing::warn!(
            "The transfer{about} from {peer} failed: {}{partial}.",
            fail.message
        );
    }
    if fail.tell {
        let msg = Msg::error(fail.code, fail.offset, fail.message);
        let _ = conn.writer.write(&msg, &[]).await;
        conn.writer.shutdown().await;
    }
}

async fn run_connection(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    name: &mut Option<String>,
) -> Result<(), Fail> {
    handshake(shared, conn).await?;
    let mut body = Vec::new();
    match read_skipping_keepalive(conn, &mut body).await? {
        Msg::Open {
            length,
            chunk_size,
            streams,
            allocated,
            name: n,
        } => {
            *name = Some(n.clone());
            let (transfer, id) =
                open(shared, conn, n, length, chunk_size, streams, allocated).await?;
            // The first connection owns the transfer: when it ends, so do the others.
            let _cancel_on_exit = transfer.cancel.clone().drop_guard();
            let result = async {
                receive_chunks(conn, &transfer).await?;
                commit(shared, conn, &transfer).await
            }
            .await;
            shared
                .transfers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if transfer.disk_full.load(Ordering::Relaxed) {
                // Free the space: the file cannot be finished on this disk anyway.
                let _ = std::fs::remove_file(&transfer.placement.partial);
            }
            result
        }
        Msg::Join { transfer } => {
            let transfer = shared
                .transfers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&transfer)
                .and_then(Weak::upgrade)
                .ok_or_else(|| Fail::new(ErrorCode::Protocol, "no such transfer is open"))?;
            *name = Some(transfer.name.clone());
            {
                let mut s = transfer.streams.lock().unwrap_or_else(|p| p.into_inner());
                if s.joined >= transfer.announced_streams {
                    return Err(Fail::new(
                        ErrorCode::Protocol,
                        format!(
                            "the transfer announced {} streams and all have joined",
                            transfer.announced_streams
                        ),
                    ));
                }
                s.joined += 1;
            }
            conn.writer
                .write(&Msg::Joined, &[])
                .await
                .map_err(Fail::wire)?;
            let result = receive_chunks(conn, &transfer).await;
            if result.is_err() {
                transfer.cancel.cancel();
            }
            result
        }
        other => Err(Fail::new(
            ErrorCode::Protocol,
            format!("expected Open or Join, got {:?}", other.kind()),
        )),
    }
}

async fn handshake(shared: &Shared, conn: &mut Conn) -> Result<(), Fail> {
    let mut body = Vec::new();
    let client_nonce = match conn.reader.read(&mut body).await.map_err(Fail::wire)? {
        Msg::Hello { version, nonce } => {
            if version != VERSION {
                return Err(Fail::new(
                    ErrorCode::Protocol,
                    format!(
                        "the sender speaks protocol version {version}, this receiver {VERSION}"
                    ),
                ));
            }
            nonce
        }
        other => {
            return Err(Fail::new(
                ErrorCode::Protocol,
                format!("expected Hello, got {:?}", other.kind()),
            ))
        }
    };
    let server_nonce: [u8; 32] = random_bytes();
    let proof = shared.key.server_proof(&client_nonce, &server_nonce);
    let challenge = Msg::Challenge {
        version: VERSION,
        nonce: server_nonce,
        proof: *proof.as_bytes(),
    };
    conn.writer
        .write(&challenge, &[])
        .await
        .map_err(Fail::wire)?;
    match conn.reader.read(&mut body).await {
        Ok(Msg::Response { proof }) => {
            let expected = shared.key.client_proof(&client_nonce, &server_nonce);
            if expected != blake3::Hash::from_bytes(proof) {
                return Err(Fail::new(
                    ErrorCode::WrongKey,
                    "its proof does not match this receiver's key: the pre-shared keys differ",
                ));
            }
        }
        Ok(Msg::Error {
            code: ErrorCode::WrongKey,
            ..
        }) => {
            return Err(Fail {
                tell: false,
                ..Fail::new(
                    ErrorCode::WrongKey,
                    "it rejected this receiver's proof: the pre-shared keys differ",
                )
            })
        }
        Ok(other) => {
            return Err(Fail::new(
                ErrorCode::Protocol,
                format!("expected Response, got {:?}", other.kind()),
            ))
        }
        Err(e) => return Err(Fail::wire(e)),
    }
    // AuthOk itself travels without a MAC so that a sender can read it and a refusal alike;
    // everything after it is MAC'd.
    let session = shared.key.session(&client_nonce, &server_nonce);
    conn.reader.set_session(session.clone());
    conn.writer
        .write(&Msg::AuthOk, &[])
        .await
        .map_err(Fail::wire)?;
    conn.writer.set_session(session);
    Ok(())
}

async fn read_skipping_keepalive(conn: &mut Conn, body: &mut Vec<u8>) -> Result<Msg, Fail> {
    loop {
        match conn.reader.read(body).await.map_err(Fail::wire)? {
            Msg::Keepalive => continue,
            Msg::Error { message, .. } => {
                return Err(Fail::quiet(format!("the sender gave up: {message}")))
            }
            msg => return Ok(msg),
        }
    }
}

/// Sends keepalives while `work` runs, so the sender's idle timeout measures silence, not
/// the receiver's hashing or flushing of a large image.
async fn with_keepalive<T>(
    writer: &mut Writer,
    idle: Duration,
    work: impl Future<Output = T>,
) -> Result<T, Fail> {
    let every = KEEPALIVE_EVERY.min(idle / 3);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return Ok(r),
            _ = tick.tick() => writer.write(&Msg::Keepalive, &[]).await.map_err(Fail::wire)?,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    name: String,
    length: u64,
    chunk_size: u32,
    streams: u16,
    allocated: u64,
) -> Result<(Arc<Transfer>, [u8; 16]), Fail> {
    check_chunk_size(chunk_size).map_err(|e| Fail::new(ErrorCode::Invalid, e.to_string()))?;
    let streams = usize::from(streams);
    if !(1..=MAX_STREAMS).contains(&streams) {
        return Err(Fail::new(
            ErrorCode::Invalid,
            format!(
                "between 1 and {MAX_STREAMS} streams are allowed, the sender asked for {streams}"
            ),
        ));
    }
    let layout = Layout::new(length, chunk_size);
    if layout.chunks > MAX_CHUNKS {
        return Err(Fail::new(
            ErrorCode::Invalid,
            format!(
                "an image of {length} bytes in chunks of {chunk_size} bytes has {} chunks; at most {MAX_CHUNKS} are allowed",
                layout.chunks
            ),
        ));
    }
    let root = shared.root.clone();
    let n = name.clone();
    let placement = tokio::task::spawn_blocking(move || names::place(&root, &n))
        .await
        .map_err(|e| Fail::new(ErrorCode::Io, format!("name check failed: {e}")))?
        .map_err(|e| Fail::new(ErrorCode::BadName, e.to_string()))?;
    let lock = shared
        .locks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(placement.target.clone())
        .or_default()
        .clone();
    let guard = tokio::time::timeout(shared.busy_wait, lock.lock_owned())
        .await
        .map_err(|_| Fail::new(ErrorCode::Busy, "another transfer of that name is running"))?;
    let fresh = !placement.partial.exists() && !placement.target.exists();
    if fresh {
        let dir = placement.target.parent().unwrap_or(&shared.root);
        if let Ok(free) = crate::sys::fs::available_bytes(dir) {
            if free < allocated {
                return Err(Fail::new(
                    ErrorCode::DiskFull,
                    format!("the image needs {allocated} bytes, {free} are free"),
                ));
            }
        }
    }
    // A staging image is written into in place: its previous version becomes the partial
    // file, with the digests of its commit when nobody wrote to it since.
    let mut trusted = None;
    if shared.staging && !placement.partial.exists() && placement.target.exists() {
        let remembered = shared
            .committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&placement.target);
        std::fs::rename(&placement.target, &placement.partial)
            .map_err(|e| io_fail("reuse the previous version", &placement.target, e))?;
        trusted = remembered.filter(|c| {
            c.layout.length == layout.length
                && c.layout.chunk_size == layout.chunk_size
                && std::fs::metadata(&placement.partial).is_ok_and(|m| FileId::of(&m) == c.file)
        });
    }
    let (p, l) = (placement.clone(), layout.clone());
    let prepared = with_keepalive(
        &mut conn.writer,
        shared.idle,
        tokio::task::spawn_blocking(move || match trusted {
            Some(c) => reopen(&p, c.digests),
            None => prepare(&p, &l),
        }),
    )
    .await?
    .map_err(|e| Fail::new(ErrorCode::Io, format!("preparing failed: {e}")))?;
    let (file, digests, resumed) = prepared?;
    tracing::info!(
        "Receiving `{name}` ({length} bytes) from {} over {streams} stream(s); compared against {}.",
        conn.peer,
        match resumed {
            ResumedFrom::None => "nothing",
            ResumedFrom::Partial => "an interrupted transfer",
            ResumedFrom::Target => "the previous version",
        }
    );
    let body: Vec<u8> = if resumed == ResumedFrom::None {
        Vec::new()
    } else {
        digests.iter().flat_map(|d| *d.as_bytes()).collect()
    };
    let transfer = Arc::new(Transfer {
        name,
        placement,
        file: Arc::new(file),
        layout,
        table: Mutex::new(digests),
        write_lock: Mutex::new(()),
        streams: Mutex::new(StreamCount { joined: 1, done: 0 }),
        announced_streams: streams,
        cancel: CancellationToken::new(),
        disk_full: AtomicBool::new(false),
        _lock: guard,
    });
    let id: [u8; 16] = random_bytes();
    shared
        .transfers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Arc::downgrade(&transfer));
    let opened = Msg::Opened {
        transfer: id,
        resumed,
        digests: Vec::new(),
    };
    if let Err(e) = conn.writer.write(&opened, &body).await {
        shared
            .transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        return Err(Fail::wire(e));
    }
    Ok((transfer, id))
}

/// Opens the partial file a staging image's previous version became, whose chunk digests
/// are known.
fn reopen(
    placement: &Placement,
    digests: Vec<blake3::Hash>,
) -> Result<(File, Vec<blake3::Hash>, ResumedFrom), Fail> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = &placement.partial;
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|e| io_fail("open", partial, e))?;
    Ok((file, digests, ResumedFrom::Target))
}

/// Sets up `<name>.partial` and hashes what it holds: an interrupted transfer's partial
/// file as it is, else a copy of the previous version (shared blocks where the file system
/// can), else an empty sparse file.
fn prepare(
    placement: &Placement,
    layout: &Layout,
) -> Result<(File, Vec<blake3::Hash>, ResumedFrom), Fail> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = &placement.partial;
    if partial.exists() {
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(partial)
            .map_err(|e| io_fail("open", partial, e))?;
        file.set_len(layout.length)
            .map_err(|e| io_fail("resize", partial, e))?;
        let digests = chunks::hash_file(&file, layout).map_err(|e| io_fail("read", partial, e))?;
        return Ok((file, digests, ResumedFrom::Partial));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|e| io_fail("create", partial, e))?;
    // A copy that failed half-way is worth nothing and may fill the disk: remove it.
    fill_new_partial(file, placement, layout).inspect_err(|_| {
        let _ = std::fs::remove_file(partial);
    })
}

fn fill_new_partial(
    file: File,
    placement: &Placement,
    layout: &Layout,
) -> Result<(File, Vec<blake3::Hash>, ResumedFrom), Fail> {
    use std::os::unix::fs::OpenOptionsExt;
    let (partial, target) = (&placement.partial, &placement.target);
    file.set_len(layout.length)
        .map_err(|e| io_fail("resize", partial, e))?;
    let previous = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let digests = (0..layout.chunks).map(|i| layout.zero_digest(i)).collect();
            return Ok((file, digests, ResumedFrom::None));
        }
        Err(e) => return Err(io_fail("open", target, e)),
    };
    let digests = if chunks::try_clone(&previous, &file) {
        file.set_len(layout.length)
            .map_err(|e| io_fail("resize", partial, e))?;
        chunks::hash_file(&file, layout).map_err(|e| io_fail("read", partial, e))?
    } else {
        chunks::copy_and_hash(&previous, &file, layout).map_err(|e| match e {
            CopyError::Read(e) => io_fail("read", target, e),
            CopyError::Write(e) => io_fail("write", partial, e),
        })?
    };
    Ok((file, digests, ResumedFrom::Target))
}

fn io_fail(what: &str, path: &Path, e: io::Error) -> Fail {
    let code = if is_disk_full(&e) {
        ErrorCode::DiskFull
    } else {
        ErrorCode::Io
    };
    Fail::new(code, format!("cannot {what} {}: {e}", path.display()))
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Reads chunk frames until `Done`, checking and writing each.
async fn receive_chunks(conn: &mut Conn, transfer: &Arc<Transfer>) -> Result<(), Fail> {
    let layout = &transfer.layout;
    let mut frames = 0u64;
    let mut body = Vec::new();
    let mut work = Some(ChunkWork {
        plain: Vec::with_capacity(layout.chunk_size as usize),
        decompressor: None,
    });
    loop {
        let msg = tokio::select! {
            r = conn.reader.read(&mut body) => r.map_err(|e| match e {
                WireError::BadMac(Kind::Chunk, Some(index)) if index < layout.chunks => {
                    let (offset, _) = layout.range(index);
                    Fail::at(ErrorCode::Tampered, offset, format!(
                        "the MAC of the chunk frame for offset {offset} does not match: it was altered on the way"
                    ))
                }
                e => Fail::wire(e),
            })?,
            _ = transfer.cancel.cancelled() => return Err(Fail::quiet("another stream of the transfer failed")),
        };
        match msg {
            Msg::Chunk {
                index,
                encoding,
                plain_len,
                digest,
            } => {
                let (offset, len) = chunk_range(layout, index)?;
                if plain_len as usize != len {
                    return Err(Fail::at(
                        ErrorCode::Protocol,
                        offset,
                        format!("the chunk at offset {offset} claims {plain_len} bytes, the layout says {len}"),
                    ));
                }
                let was_zero = transfer.table.lock().unwrap_or_else(|p| p.into_inner())
                    [index as usize]
                    == layout.zero_digest(index);
                let t = transfer.clone();
                let mut w = work.take().unwrap_or_else(|| ChunkWork {
                    plain: Vec::with_capacity(len),
                    decompressor: None,
                });
                let data = std::mem::take(&mut body);
                let (result, data, w) = tokio::task::spawn_blocking(move || {
                    let target = (&*t.file, &t.write_lock);
                    let r = w.store(target, encoding, &data, len, digest, offset, was_zero);
                    (r, data, w)
                })
                .await
                .map_err(|e| Fail::new(ErrorCode::Io, format!("chunk writer failed: {e}")))?;
                body = data;
                work = Some(w);
                if let Err(fail) = result {
                    if fail.code == ErrorCode::DiskFull {
                        transfer.disk_full.store(true, Ordering::Relaxed);
                    }
                    transfer.cancel.cancel();
                    return Err(fail);
                }
                transfer.table.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = digest;
                frames += 1;
            }
            Msg::Zero { index } => {
                let (offset, len) = chunk_range(layout, index)?;
                let zero = layout.zero_digest(index);
                let held = transfer.table.lock().unwrap_or_else(|p| p.into_inner())[index as usize];
                if held != zero {
                    let file = transfer.file.clone();
                    tokio::task::spawn_blocking(move || {
                        chunks::punch_hole(&file, offset, len as u64)
                    })
                    .await
                    .map_err(|e| Fail::new(ErrorCode::Io, format!("hole punch failed: {e}")))?
                    .map_err(|e| {
                        Fail::at(
                            ErrorCode::Io,
                            offset,
                            format!("cannot clear the chunk at offset {offset}: {e}"),
                        )
                    })?;
                    transfer.table.lock().unwrap_or_else(|p| p.into_inner())[index as usize] = zero;
                }
                frames += 1;
            }
            Msg::Done { frames: sent } => {
                if sent != frames {
                    return Err(Fail::new(
                        ErrorCode::Protocol,
                        format!(
                            "the sender sent {sent} chunk frames on this stream, {frames} arrived"
                        ),
                    ));
                }
                transfer
                    .streams
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .done += 1;
                conn.writer
                    .write(&Msg::DoneAck, &[])
                    .await
                    .map_err(Fail::wire)?;
                return Ok(());
            }
            Msg::Keepalive => {}
            Msg::Error { message, .. } => {
                return Err(Fail::quiet(format!("the sender gave up: {message}")))
            }
            other => {
                return Err(Fail::new(
                    ErrorCode::Protocol,
                    format!("unexpected {:?} frame during the transfer", other.kind()),
                ))
            }
        }
    }
}

fn chunk_range(layout: &Layout, index: u64) -> Result<(u64, usize), Fail> {
    if index >= layout.chunks {
        return Err(Fail::new(
            ErrorCode::Protocol,
            format!(
                "chunk {index} is past the end of the image ({} chunks)",
                layout.chunks
            ),
        ));
    }
    Ok(layout.range(index))
}

/// The reusable state of one stream's chunk writer.
struct ChunkWork {
    plain: Vec<u8>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl ChunkWork {
    /// Decodes, checks and writes one chunk. Nothing is written unless the plain bytes
    /// hash to the digest the (MAC'd) header carries.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        (file, write_lock): (&File, &Mutex<()>),
        encoding: Encoding,
        body: &[u8],
        len: usize,
        digest: blake3::Hash,
        offset: u64,
        was_zero: bool,
    ) -> Result<(), Fail> {
        let tampered = |detail: String| {
            Fail::at(
                ErrorCode::Tampered,
                offset,
                format!("the chunk at offset {offset} {detail}"),
            )
        };
        let data: &[u8] = match encoding {
            Encoding::Raw => body,
            Encoding::Zstd => {
                if self.decompressor.is_none() {
                    self.decompressor = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                        Fail::new(ErrorCode::Io, format!("cannot set up zstd: {e}"))
                    })?);
                }
                let Some(d) = self.decompressor.as_mut() else {
                    return Err(Fail::new(ErrorCode::Io, "cannot set up zstd"));
                };
                self.plain.clear();
                self.plain.reserve(len);
                d.decompress_to_buffer(body, &mut self.plain)
                    .map_err(|e| tampered(format!("does not decompress: {e}")))?;
                &self.plain
            }
        };
        if data.len() != len {
            return Err(tampered(format!(
                "holds {} bytes instead of {len}",
                data.len()
            )));
        }
        if blake3::hash(data) != digest {
            return Err(tampered(
                "does not match the BLAKE3 digest the sender computed".into(),
            ));
        }
        let _writing = write_lock.lock().unwrap_or_else(|p| p.into_inner());
        chunks::write_sparse(file, offset, data, was_zero).map_err(|e| {
            let code = if is_disk_full(&e) {
                ErrorCode::DiskFull
            } else {
                ErrorCode::Io
            };
            Fail::at(
                code,
                offset,
                format!("cannot write the chunk at offset {offset}: {e}"),
            )
        })?;
        Ok(())
    }
}

/// Waits for the sender's digest, checks it against what the partial file holds, and only
/// then makes the image visible under its name.
async fn commit(shared: &Shared, conn: &mut Conn, transfer: &Arc<Transfer>) -> Result<(), Fail> {
    let mut body = Vec::new();
    let claimed = loop {
        let msg = tokio::select! {
            r = conn.reader.read(&mut body) => r.map_err(Fail::wire)?,
            _ = transfer.cancel.cancelled() => return Err(Fail::quiet("another stream of the transfer failed")),
        };
        match msg {
            Msg::Keepalive => {}
            Msg::Commit { digest } => break digest,
            Msg::Error { message, .. } => {
                return Err(Fail::quiet(format!("the sender gave up: {message}")))
            }
            other => {
                return Err(Fail::new(
                    ErrorCode::Protocol,
                    format!("expected Commit, got {:?}", other.kind()),
                ))
            }
        }
    };
    {
        let s = transfer.streams.lock().unwrap_or_else(|p| p.into_inner());
        if s.done != transfer.announced_streams {
            return Err(Fail::new(
                ErrorCode::Protocol,
                format!(
                    "commit after {} of {} streams finished",
                    s.done, transfer.announced_streams
                ),
            ));
        }
    }
    let held = {
        let table = transfer.table.lock().unwrap_or_else(|p| p.into_inner());
        transfer.layout.image_digest(&table)
    };
    if held.0 != claimed {
        return Err(Fail::new(
            ErrorCode::DigestMismatch,
            format!(
                "the sender read {}, the target holds {held}",
                super::ImageDigest(claimed)
            ),
        ));
    }
    let file = transfer.file.clone();
    let placement = transfer.placement.clone();
    let fsync = shared.fsync;
    let finish = tokio::task::spawn_blocking(move || -> io::Result<()> {
        if fsync {
            file.sync_all()?;
        }
        std::fs::rename(&placement.partial, &placement.target)?;
        if fsync {
            if let Some(dir) = placement.target.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    });
    with_keepalive(&mut conn.writer, shared.idle, finish)
        .await?
        .map_err(|e| Fail::new(ErrorCode::Io, format!("finishing failed: {e}")))?
        .map_err(|e| {
            let code = if is_disk_full(&e) {
                ErrorCode::DiskFull
            } else {
                ErrorCode::Io
            };
            Fail::new(
                code,
                format!(
                    "cannot put {} in place: {e}",
                    transfer.placement.target.display()
                ),
            )
        })?;
    if shared.staging {
        if let Ok(meta) = std::fs::metadata(&transfer.placement.target) {
            let digests = transfer
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            shared
                .committed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    transfer.placement.target.clone(),
                    Committed {
                        file: FileId::of(&meta),
                        layout: transfer.layout.clone(),
                        digests,
                    },
                );
        }
    }
    if let Some(hook) = &shared.on_commit {
        (hook.0)(&transfer.name, &held);
    }
    tracing::info!(
        "Received `{}` from {}: {} bytes, digest {held}.",
        transfer.name,
        conn.peer,
        transfer.layout.length
    );
    conn.writer
        .write(&Msg::Committed { digest: held.0 }, &[])
        .await
        .map_err(Fail::wire)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver on loopback in `staging` mode or not; sends `src` to it as `img`.
    struct Staged {
        dir: tempfile::TempDir,
        addr: String,
        key: PresharedKey,
        stop: CancellationToken,
    }

    impl Staged {
        async fn start(staging: bool) -> Staged {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("in")).unwrap();
            let key = PresharedKey::from_secret(&[9u8; 32]).unwrap();
            let mut opts = ReceiverOptions::new(dir.path().join("in"), key.clone());
            opts.staging = staging;
            opts.fsync = false;
            let stop = opts.shutdown.clone();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            tokio::spawn(serve(listener, opts));
            Staged {
                dir,
                addr,
                key,
                stop,
            }
        }

        async fn send(&self, src: &Path) -> super::super::TransferReport {
            let to = super::super::Endpoint::new(&self.addr, self.key.clone());
            super::super::send_file(src, &to, "img", &Default::default(), &|_| {})
                .await
                .unwrap()
        }

        fn target(&self) -> PathBuf {
            self.dir.path().join("in/img")
        }
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = File::options().write(true).open(path).unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[tokio::test]
    async fn a_staging_receiver_writes_a_new_version_into_the_previous_one_without_copying_it() {
        for staging in [false, true] {
            let r = Staged::start(staging).await;
            let src = r.dir.path().join("src.img");
            let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
            std::fs::write(&src, &data).unwrap();
            r.send(&src).await;
            let first = inode(&r.target());
            write_at(&src, 3 << 20, &[1u8; 4096]);
            let again = r.send(&src).await;
            assert_eq!(again.chunks_sent, 1, "{again:?}");
            assert_eq!(
                std::fs::read(r.target()).unwrap(),
                std::fs::read(&src).unwrap()
            );
            // In staging mode the previous version was written into, not copied first.
            assert_eq!(inode(&r.target()) == first, staging, "staging {staging}");
            r.stop.cancel();
        }
    }

    #[tokio::test]
    async fn a_staging_receiver_does_not_trust_digests_of_an_image_changed_after_its_commit() {
        let r = Staged::start(true).await;
        let src = r.dir.path().join("src.img");
        std::fs::write(&src, vec![5u8; 4 << 20]).unwrap();
        r.send(&src).await;
        // Someone writes into the committed image: its remembered digests no longer hold.
        write_at(&r.target(), 2 << 20, &[6u8; 100]);
        let again = r.send(&src).await;
        assert_eq!(again.chunks_sent, 1, "{again:?}");
        assert_eq!(
            std::fs::read(r.target()).unwrap(),
            std::fs::read(&src).unwrap()
        );
        r.stop.cancel();
    }

    #[test]
    fn a_full_disk_is_reported_as_such_with_the_offset() {
        // /dev/full fails every write with ENOSPC.
        let Ok(full) = File::options().write(true).open("/dev/full") else {
            return;
        };
        let mut w = ChunkWork {
            plain: Vec::new(),
            decompressor: None,
        };
        let data = vec![7u8; 8192];
        let fail = w
            .store(
                (&full, &Mutex::new(())),
                Encoding::Raw,
                &data,
                8192,
                blake3::hash(&data),
                65536,
                true,
            )
            .unwrap_err();
        assert_eq!(fail.code, ErrorCode::DiskFull);
        assert_eq!(fail.offset, 65536);
    }

    #[test]
    fn a_changed_chunk_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut w = ChunkWork {
            plain: Vec::new(),
            decompressor: None,
        };
        let data = b"some chunk bytes".repeat(4096);
        let packed = zstd::bulk::compress(&data, 1).unwrap();
        let mut bad = packed.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let fail = w
            .store(
                (&file, &Mutex::new(())),
                Encoding::Zstd,
                &bad,
                data.len(),
                blake3::hash(&data),
                4096,
                true,
            )
            .unwrap_err();
        assert_eq!((fail.code, fail.offset), (ErrorCode::Tampered, 4096));
        assert_eq!(file.metadata().unwrap().len(), 0, "nothing may be written");
        w.store(
            (&file, &Mutex::new(())),
            Encoding::Zstd,
            &packed,
            data.len(),
            blake3::hash(&data),
            4096,
            true,
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[4096..], data[..]);
    }
}
