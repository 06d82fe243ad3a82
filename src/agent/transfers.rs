//! Volumes moving between agents: the receiving agent stages what its viaduct receiver gets
//! under its incoming directory, the sending agent reads a volume of its own provider and
//! sends it there, and the receiving agent then adopts the staged image as its provider's
//! volume (converting its format where the two providers differ). The daemon only directs:
//! no byte of the image passes through it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::providers::precopy::PassError;
use crate::providers::remote::wire::{
    AdoptVolume, Adopted, Discard, ReceiverInfo, SendStaging, SendVolume, SentReport, TransferId,
    TransferState,
};
use crate::providers::{self, DiskFormat, Provider, ProviderError, VolumeSpec};
use crate::sys::qemu_img::{qemu_img, QemuImgError};
use crate::sys::tls::{server_name, Identity};
use crate::telemetry::AgentMetrics;
use crate::viaduct::{
    self, Endpoint, EndpointTls, ImageDigest, OnCommit, PresharedKey, SendOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Invalid(String),
    #[error("transfer `{0}` is not known to this agent")]
    UnknownTransfer(String),
    #[error("this agent runs no viaduct receiver (`viaduct_listen` is not set)")]
    NoReceiver,
    #[error("the staged image `{name}` is not here: {detail}")]
    NotStaged { name: String, detail: String },
    #[error("volume `{service}/{volume}` at `{provider}` has no image on this host")]
    NoPath {
        provider: String,
        service: String,
        volume: String,
    },
    #[error(transparent)]
    Viaduct(#[from] viaduct::ViaductError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Tool(#[from] QemuImgError),
    #[error("the adopted volume's digest {got} is not the sent image's {expected}")]
    Digest { expected: String, got: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A send and when it started.
struct Tracked {
    state: Arc<Mutex<TransferState>>,
    started: Instant,
    cancel: CancellationToken,
}

/// A finished send is answered for this long, then forgotten (the daemon asks within
/// seconds; the journal keeps its report).
const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// The agent's viaduct receiver as senders reach it.
pub struct Receiver {
    pub info: ReceiverInfo,
    /// Where received images are staged.
    pub incoming: PathBuf,
    pub received: Received,
}

/// The images a viaduct receiver put in place during this process's life, by name, with
/// the digest it checked against the sender's: adopting one of them needs no second read.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<HashMap<String, ImageDigest>>>);

impl Received {
    /// The hook that tells it of each image the receiver commits.
    pub fn hook(&self) -> OnCommit {
        let map = self.0.clone();
        OnCommit(Arc::new(move |name: &str, digest: &ImageDigest| {
            map.lock().unwrap().insert(name.to_string(), *digest);
        }))
    }

    pub fn digest_of(&self, name: &str) -> Option<ImageDigest> {
        self.0.lock().unwrap().get(name).copied()
    }

    pub fn forget(&self, name: &str) {
        self.0.lock().unwrap().remove(name);
    }
}

/// The transfers of one agent.
pub struct Transfers {
    pub receiver: Option<Receiver>,
    /// Where pre-copy passes of this host's VMs are read into, to be sent from.
    precopy: PathBuf,
    identity_tls: Arc<rustls::ClientConfig>,
    metrics: AgentMetrics,
    running: Mutex<HashMap<String, Tracked>>,
    /// The transfer each staged name is being sent under, so a repeated request (the daemon
    /// asking again after a restart) joins the running send instead of starting a second.
    by_name: Mutex<HashMap<String, String>>,
}

/// A fresh random secret for the receiver, hex.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key_from_hex(secret: &str) -> Result<PresharedKey, TransferError> {
    if secret.len() < 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TransferError::Invalid(
            "the receiver's secret must be at least 64 hex digits".into(),
        ));
    }
    PresharedKey::from_secret(secret.as_bytes()).map_err(|e| TransferError::Invalid(e.to_string()))
}

impl Transfers {
    pub fn new(
        receiver: Option<Receiver>,
        precopy: PathBuf,
        identity: &Identity,
        metrics: AgentMetrics,
    ) -> Result<Self, crate::sys::tls::TlsError> {
        Ok(Transfers {
            receiver,
            precopy,
            identity_tls: identity.client_config()?,
            metrics,
            running: Mutex::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
        })
    }

    pub fn receiver_info(&self) -> Result<ReceiverInfo, TransferError> {
        self.receiver
            .as_ref()
            .map(|r| r.info.clone())
            .ok_or(TransferError::NoReceiver)
    }

    /// Where pre-copy passes are read into.
    pub fn precopy_dir(&self) -> &Path {
        &self.precopy
    }

    /// The send already running under the staged name `name`, if one is.
    fn running_send(&self, name: &str) -> Option<TransferId> {
        let id = self.by_name.lock().unwrap().get(name).cloned()?;
        let running = self
            .running
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|t| matches!(*t.state.lock().unwrap(), TransferState::Running { .. }));
        running.then_some(TransferId { id })
    }

    /// Starts sending the staging image a pre-copy pass read on this host; answers at once
    /// with the transfer's id.
    pub async fn send_staging(
        self: &Arc<Self>,
        provider: Arc<dyn Provider>,
        req: SendStaging,
    ) -> Result<TransferId, TransferError> {
        let SendStaging { send, staging } = req;
        if let Some(id) = self.running_send(&send.name) {
            return Ok(id);
        }
        viaduct::check_name(&staging).map_err(|e| TransferError::Invalid(e.to_string()))?;
        // Only the staging image of the volume the request names.
        let own = format!(
            "{}.{}.{}.precopy.raw",
            provider.name(),
            send.service,
            send.volume
        );
        if Path::new(&staging).file_name() != Some(std::ffi::OsStr::new(&own)) {
            return Err(TransferError::Invalid(format!(
                "`{staging}` is not a pre-copy image of volume `{}/{}` of `{}`",
                send.service,
                send.volume,
                provider.name()
            )));
        }
        let path = self.precopy.join(&staging);
        if !path.is_file() {
            return Err(TransferError::NotStaged {
                name: staging,
                detail: "no pre-copy pass was read into it on this host".into(),
            });
        }
        self.start(send, path)
    }

    /// Starts sending a volume of `provider`; answers at once with the transfer's id.
    pub async fn send(
        self: &Arc<Self>,
        provider: Arc<dyn Provider>,
        req: SendVolume,
    ) -> Result<TransferId, TransferError> {
        if let Some(id) = self.running_send(&req.name) {
            return Ok(id);
        }
        let info = provider
            .volume_info(&req.service, &req.volume)
            .await?
            .ok_or_else(|| ProviderError::NotFound {
                provider: req.provider.clone(),
                object: format!("volume `{}/{}`", req.service, req.volume),
            })?;
        let path = info.path.ok_or_else(|| TransferError::NoPath {
            provider: req.provider.clone(),
            service: req.service.clone(),
            volume: req.volume.clone(),
        })?;
        self.start(req, path)
    }

    /// Sends the image at `path` as `req` asks.
    fn start(
        self: &Arc<Self>,
        req: SendVolume,
        path: PathBuf,
    ) -> Result<TransferId, TransferError> {
        let key = key_from_hex(&req.to.secret)?;
        let name =
            server_name(&req.to.server_name).map_err(|e| TransferError::Invalid(e.to_string()))?;
        let endpoint = Endpoint::new(&req.to.addr, key).with_tls(EndpointTls {
            config: self.identity_tls.clone(),
            server_name: name,
        });
        let cancel = CancellationToken::new();
        let mut opts = SendOptions {
            max_bytes_per_sec: req.max_bytes_per_sec,
            cancel: cancel.clone(),
            ..SendOptions::default()
        };
        if let Some(s) = req.streams {
            opts.streams = s;
        }
        let id = random_secret()[..16].to_string();
        let state = Arc::new(Mutex::new(TransferState::Running {
            chunks_total: 0,
            chunks_done: 0,
            bytes_read: 0,
            bytes_sent: 0,
        }));
        {
            let mut running = self.running.lock().unwrap();
            running.retain(|_, t| {
                t.started.elapsed() < KEEP_FINISHED
                    || matches!(*t.state.lock().unwrap(), TransferState::Running { .. })
            });
            running.insert(
                id.clone(),
                Tracked {
                    state: state.clone(),
                    started: Instant::now(),
                    cancel,
                },
            );
            let mut by_name = self.by_name.lock().unwrap();
            by_name.retain(|_, id| running.contains_key(id));
            by_name.insert(req.name.clone(), id.clone());
        }
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let progress_state = state.clone();
            let progress = move |p: viaduct::Progress| {
                *progress_state.lock().unwrap() = TransferState::Running {
                    chunks_total: p.chunks_total,
                    chunks_done: p.chunks_done,
                    bytes_read: p.bytes_read,
                    bytes_sent: p.bytes_sent,
                };
            };
            let result = viaduct::send_file(&path, &endpoint, &req.name, &opts, &progress).await;
            let end = match result {
                Ok(r) => {
                    metrics.viaduct_bytes("sent", r.bytes_sent);
                    metrics.transfer("sent", true);
                    tracing::info!(
                        "Sent volume `{}/{}` of `{}` to {} as `{}`: {} bytes on the wire, digest {}.",
                        req.service,
                        req.volume,
                        req.provider,
                        req.to.addr,
                        req.name,
                        r.bytes_sent,
                        r.digest
                    );
                    TransferState::Done {
                        report: sent_report(&r),
                    }
                }
                Err(e) => {
                    metrics.transfer("sent", false);
                    tracing::warn!(
                        "Sending volume `{}/{}` of `{}` to {} failed: {e}.",
                        req.service,
                        req.volume,
                        req.provider,
                        req.to.addr
                    );
                    TransferState::Failed {
                        error: e.to_string(),
                    }
                }
            };
            *state.lock().unwrap() = end;
        });
        Ok(TransferId { id })
    }

    /// Stops a running send; the receiver keeps what arrived for a resume.
    pub fn cancel(&self, id: &str) -> Result<(), TransferError> {
        self.running
            .lock()
            .unwrap()
            .get(id)
            .map(|t| t.cancel.cancel())
            .ok_or_else(|| TransferError::UnknownTransfer(id.to_string()))
    }

    pub fn status(&self, id: &str) -> Result<TransferState, TransferError> {
        self.running
            .lock()
            .unwrap()
            .get(id)
            .map(|t| t.state.lock().unwrap().clone())
            .ok_or_else(|| TransferError::UnknownTransfer(id.to_string()))
    }

    fn staged(&self, name: &str) -> Result<PathBuf, TransferError> {
        let r = self.receiver.as_ref().ok_or(TransferError::NoReceiver)?;
        viaduct::check_name(name).map_err(|e| TransferError::Invalid(e.to_string()))?;
        Ok(r.incoming.join(name))
    }

    /// Makes the staged image the provider's volume and checks it.
    pub async fn adopt(
        &self,
        provider: Arc<dyn Provider>,
        req: AdoptVolume,
    ) -> Result<Adopted, TransferError> {
        let staged = self.staged(&req.name)?;
        let received = self.receiver.as_ref().map(|r| &r.received);
        let known = received.and_then(|r| r.digest_of(&req.name));
        let adopted = adopt_staged(provider.as_ref(), &staged, known, &req).await?;
        if let Some(r) = received {
            r.forget(&req.name);
        }
        self.metrics.transfer("received", true);
        Ok(adopted)
    }

    /// Removes a staged image (and its directory when it is then empty), or a pre-copy's
    /// staging image.
    pub fn discard(&self, req: &Discard) -> Result<(), TransferError> {
        if req.precopy {
            return self.discard_precopy(&req.name);
        }
        let staged = self.staged(&req.name)?;
        for path in [staged.clone(), partial_of(&staged)] {
            remove_if_there(path)?;
        }
        if let Some(dir) = staged.parent() {
            let incoming = &self.receiver.as_ref().expect("checked by staged").incoming;
            if dir != incoming.as_path() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        self.by_name.lock().unwrap().remove(&req.name);
        Ok(())
    }
}

/// Removes the file at `path`; one already gone is fine.
fn remove_if_there(path: PathBuf) -> Result<(), TransferError> {
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TransferError::Io {
            action: "remove",
            path,
            source: e,
        }),
        _ => Ok(()),
    }
}

impl Transfers {
    fn discard_precopy(&self, name: &str) -> Result<(), TransferError> {
        viaduct::check_name(name).map_err(|e| TransferError::Invalid(e.to_string()))?;
        let path = self.precopy.join(name);
        remove_if_there(path.clone())?;
        if let Some(dir) = path.parent() {
            if dir != self.precopy.as_path() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }
}

fn partial_of(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// What a send carried, as the daemon journals it.
pub fn sent_report(r: &viaduct::TransferReport) -> SentReport {
    SentReport {
        image_bytes: r.image_bytes,
        bytes_read: r.bytes_read,
        bytes_sent: r.bytes_sent,
        chunks_total: r.chunks_total,
        chunks_sent: r.chunks_sent,
        chunks_skipped_zero: r.chunks_skipped_zero,
        chunks_skipped_equal: r.chunks_skipped_equal,
        digest: r.digest.to_hex(),
        seconds: r.duration.as_secs_f64(),
        streams: r.streams,
    }
}

/// Makes the image staged at `staged` (received under `req.name`) the volume `req.volume` of
/// `provider`, created in the provider's preferred format, and checks it. `known` is the
/// digest the receiver checked when it put the image in place, if it did in this process's
/// life; otherwise the staged image is read and hashed before it is used.
///
/// A raw image for a raw volume on the same file system is linked into place (no copy: a
/// cutover then does not wait for the image to be written twice); elsewhere it is copied
/// with the viaduct's local copy, or converted and compared with qemu-img.
pub async fn adopt_staged(
    provider: &dyn Provider,
    staged: &Path,
    known: Option<ImageDigest>,
    req: &AdoptVolume,
) -> Result<Adopted, TransferError> {
    if !staged.is_file() {
        return Err(TransferError::NotStaged {
            name: req.name.clone(),
            detail: "nothing was received under that name".into(),
        });
    }
    let started = Instant::now();
    let format = provider.preferred_disk_format();
    let op = provider
        .create_volume(
            &req.service,
            &VolumeSpec {
                name: req.volume.clone(),
                size_bytes: req.size_bytes,
                format,
            },
        )
        .await?;
    providers::wait_for(provider, &op.id, Duration::from_secs(600)).await?;
    let dst = provider
        .volume_info(&req.service, &req.volume)
        .await?
        .and_then(|i| i.path)
        .ok_or_else(|| TransferError::NoPath {
            provider: req.provider.clone(),
            service: req.service.clone(),
            volume: req.volume.clone(),
        })?;
    if req.format == DiskFormat::Raw && format == DiskFormat::Raw {
        let digest = match known {
            Some(d) => d,
            None => {
                let path = staged.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    viaduct::image_digest(&path, viaduct::DEFAULT_CHUNK_SIZE)
                })
                .await
                .map_err(|e| TransferError::Invalid(format!("the hashing task failed: {e}")))??
            }
        };
        if digest.to_hex() != req.digest {
            return Err(TransferError::Digest {
                expected: req.digest.clone(),
                got: digest.to_hex(),
            });
        }
        let verified = if known.is_some() {
            "image digest, checked by the receiver against the sender's"
        } else {
            "image digest of the staged image, equal to the sender's"
        };
        if let Some(adopted) = link_into(staged, &dst)? {
            return Ok(Adopted {
                method: adopted.into(),
                verified: verified.into(),
                bytes_written: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let opts = viaduct::LocalCopyOptions {
            in_place: true,
            ..viaduct::LocalCopyOptions::default()
        };
        let (src, to) = (staged.to_path_buf(), dst.clone());
        let report = tokio::task::spawn_blocking(move || viaduct::copy_local(&src, &to, &opts))
            .await
            .map_err(|e| TransferError::Invalid(format!("the copy task failed: {e}")))??;
        if report.digest != digest {
            return Err(TransferError::Digest {
                expected: req.digest.clone(),
                got: report.digest.to_hex(),
            });
        }
        return Ok(Adopted {
            method: "viaduct (local)".into(),
            verified: verified.into(),
            bytes_written: report.bytes_sent,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let (from, to) = (req.format.as_str(), format.as_str());
    let (src, dst_os) = (staged.as_os_str(), dst.as_os_str());
    qemu_img([
        "convert".as_ref(),
        "-n".as_ref(),
        "-f".as_ref(),
        from.as_ref(),
        "-O".as_ref(),
        to.as_ref(),
        src,
        dst_os,
    ])
    .await?;
    qemu_img([
        "compare".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        from.as_ref(),
        "-F".as_ref(),
        to.as_ref(),
        src,
        dst_os,
    ])
    .await?;
    Ok(Adopted {
        method: "qemu-img convert".into(),
        verified: "qemu-img compare against the staged image, whose digest the viaduct checked"
            .into(),
        bytes_written: std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Puts `staged` in place of the volume image `dst` as a second name of the same file, when
/// both are regular files on one file system; `None` when they are not (a block device,
/// another file system). The staged name stays: a later send under it compares against it
/// (and the receiver writes that send into a copy, so the volume is never changed by it).
fn link_into(staged: &Path, dst: &Path) -> Result<Option<&'static str>, TransferError> {
    use std::os::unix::fs::MetadataExt;
    let meta = |path: &Path| {
        std::fs::metadata(path).map_err(|source| TransferError::Io {
            action: "inspect",
            path: path.to_path_buf(),
            source,
        })
    };
    let (s, d) = (meta(staged)?, meta(dst)?);
    if !d.is_file() || s.dev() != d.dev() {
        return Ok(None);
    }
    let mut linking = dst.as_os_str().to_owned();
    linking.push(".adopting");
    let linking = PathBuf::from(linking);
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| TransferError::Io {
            action,
            path,
            source,
        }
    };
    match std::fs::remove_file(&linking) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &linking)(e)),
    }
    std::fs::hard_link(staged, &linking).map_err(io("link", &linking))?;
    std::fs::rename(&linking, dst).map_err(io("rename into place", dst))?;
    Ok(Some("linked into place"))
}
