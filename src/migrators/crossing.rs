//! Volumes between hosts: when the source or the target of a relocation is served by an
//! agent, a volume's image goes over the network viaduct straight from the host that holds
//! it to the host that receives it, over mutual TLS.
//!
//! - Both ends have agents: the daemon asks the target's agent for its receiver and tells
//!   the source's agent to send there; the image never passes through the daemon.
//! - The source is the daemon's own: the daemon sends to the target's agent.
//! - The target is the daemon's own: the daemon runs a receiver for the transfer, on the
//!   address its host uses toward the source's agent, and the agent sends to it.
//!
//! Every pass lands in the same staged image at the receiver (named by
//! [`staged_name`]), so the final pass sends only the chunks that changed since the
//! pre-copy. A VM's pre-copy ([`super::precopy`]) sends the staging image each pass read
//! on the source's host ([`Outgoing::staging`]) the same way. A send that fails (a broken link, a restarted agent) is sent again; the receiver
//! keeps what it verified, so it resumes from there. The final pass then makes the staged
//! image the target's volume ([`adopt_staged`]: renamed into place or converted).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::plan::VolumePlan;
use super::{remove_file, Cx, MigratorError};
use crate::agent::transfers::{adopt_staged, random_secret, sent_report, Received, TransferError};
use crate::providers::remote::wire::{
    staged_name, AdoptVolume, Adopted, ReceiverInfo, SendStaging, SendVolume, SentReport,
    TransferState,
};
use crate::providers::remote::RemoteProvider;
use crate::providers::{self, DiskFormat};
use crate::sys::retry::{BackoffBuilder, ExponentialBuilder};
use crate::sys::tls::server_name;
use crate::viaduct::{self, Endpoint, EndpointTls, PresharedKey, SendOptions};

/// Sends after the first that may fail before the step gives up.
const RESENDS: usize = 4;
/// How often a send's agent is asked how it is doing.
const POLL: Duration = Duration::from_millis(250);

/// Whether the volume moves between hosts (one end or both served by an agent).
pub fn crosses_hosts(cx: &Cx) -> bool {
    cx.source.remote().is_some() || cx.target.remote().is_some()
}

/// The name the volume is staged under at the receiver.
pub(super) fn staged(cx: &Cx, v: &VolumePlan) -> String {
    staged_name(&cx.id, &cx.plan.to, cx.svc(), &v.name)
}

/// Where the daemon stages images it receives for a target of its own.
fn incoming(cx: &Cx) -> PathBuf {
    cx.work_dir.join("incoming")
}

/// A pass of `v` across hosts: the pre-copy (`final_pass` false) or the final sync, which
/// also makes the staged image the target's volume.
pub async fn copy_across(
    cx: &Cx,
    step: &str,
    v: &VolumePlan,
    final_pass: bool,
) -> Result<Value, MigratorError> {
    let svc = cx.svc();
    let info = cx.source.volume_info(svc, &v.name).await?.ok_or_else(|| {
        MigratorError::Check(format!(
            "volume `{svc}/{}` vanished from `{}`",
            v.name, cx.plan.from
        ))
    })?;
    if v.source_format != DiskFormat::Raw && !final_pass {
        // The image of a disk in another format is only consistent once its VM is off.
        return Ok(json!({ "skipped": "a non-raw source is sent in full at cutover" }));
    }
    let name = staged(cx, v);
    let started = Instant::now();
    let image = Outgoing {
        volume: info.name.clone(),
        size: info.virtual_size,
        path: info.path.clone(),
        staging: None,
    };
    let (sent, landing) = send(cx, step, &image, &name).await?;
    cx.count_bytes("volume", sent.bytes_read, sent.bytes_sent, started);
    let mut out = json!({
        "method": "viaduct (host to host)",
        "from": host_of(cx.source.remote()),
        "to": landing.info.addr,
        "bytes_read": sent.bytes_read,
        "bytes_sent": sent.bytes_sent,
        "chunks_sent": sent.chunks_sent,
        "chunks_skipped_zero": sent.chunks_skipped_zero,
        "chunks_skipped_equal": sent.chunks_skipped_equal,
        "streams": sent.streams,
        "digest": sent.digest,
        "verified": "image digest, checked by the receiver",
        "seconds": started.elapsed().as_secs_f64(),
    });
    if !final_pass {
        return Ok(out);
    }
    let adopted = adopt_across(cx, v, v.source_format, info.virtual_size, &sent, &landing).await?;
    out["adopted"] = json!(adopted);
    Ok(out)
}

/// Makes the image staged for `v` at the target (in `format`, `size` bytes to the guest,
/// sent as `sent` reports, to `landing`) the target's volume, and removes the staged image.
pub(super) async fn adopt_across(
    cx: &Cx,
    v: &VolumePlan,
    format: DiskFormat,
    size: u64,
    sent: &SentReport,
    landing: &Landing,
) -> Result<Adopted, MigratorError> {
    let name = staged(cx, v);
    let req = AdoptVolume {
        provider: cx.plan.to.clone(),
        service: cx.svc().to_string(),
        volume: v.name.clone(),
        name: name.clone(),
        format,
        size_bytes: size,
        digest: sent.digest.clone(),
    };
    match cx.target.remote() {
        Some(target) => {
            let adopted = target.adopt_volume(&req).await?;
            target.discard(&name).await?;
            Ok(adopted)
        }
        None => {
            let path = incoming(cx).join(&name);
            let known = landing.received.digest_of(&name);
            let adopted = adopt_staged(cx.target.as_ref(), &path, known, &req)
                .await
                .map_err(transfer_error)?;
            remove_staged(cx, &name)?;
            Ok(adopted)
        }
    }
}

/// Deletes the target's volume and what is staged for it.
pub async fn undo_across(cx: &Cx, v: &VolumePlan) -> Result<(), MigratorError> {
    let op = cx.target.delete_volume(cx.svc(), &v.name).await?;
    providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
    let name = staged(cx, v);
    match cx.target.remote() {
        Some(target) => target.discard(&name).await?,
        None => remove_staged(cx, &name)?,
    }
    Ok(())
}

fn remove_staged(cx: &Cx, name: &str) -> Result<(), MigratorError> {
    let path = incoming(cx).join(name);
    remove_file(&path)?;
    let mut partial = path.clone().into_os_string();
    partial.push(".partial");
    remove_file(&PathBuf::from(partial))?;
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

pub(super) fn host_of(remote: Option<&RemoteProvider>) -> String {
    remote.map_or_else(|| "this host".to_string(), |r| r.host().to_string())
}

fn transfer_error(e: TransferError) -> MigratorError {
    match e {
        TransferError::Provider(p) => MigratorError::Provider(p),
        TransferError::Viaduct(v) => MigratorError::Viaduct(v),
        other => MigratorError::Check(other.to_string()),
    }
}

/// An image a send carries to the target's host.
pub(super) struct Outgoing {
    /// The volume it is an image of.
    pub volume: String,
    /// The size the guest sees.
    pub size: u64,
    /// Where it is, when it is on this host (the source is the daemon's own).
    pub path: Option<PathBuf>,
    /// At the source's agent: the name of the pre-copy staging image to send, rather than
    /// the volume's own image.
    pub staging: Option<String>,
}

/// The receiver a volume lands at.
pub(super) struct Landing {
    pub info: ReceiverInfo,
    /// What a receiver of the daemon's own verified (empty for an agent's).
    received: Received,
    /// Stops the daemon's own receiver when the pass ends.
    _stop: Option<tokio_util::sync::DropGuard>,
}

impl Landing {
    async fn open(cx: &Cx) -> Result<Landing, MigratorError> {
        if let Some(target) = cx.target.remote() {
            return Ok(Landing {
                info: target.receiver().await?,
                received: Received::default(),
                _stop: None,
            });
        }
        let source = cx
            .source
            .remote()
            .expect("a volume crossing hosts has an agent at one end at least");
        let setup = |detail: String| {
            MigratorError::Check(format!(
                "cannot receive volumes from `{}` on this host: {detail}",
                cx.plan.from
            ))
        };
        // The address this host's packets to the source's agent leave from is one the agent
        // reaches it at.
        let ip = route_to(source.host()).map_err(|e| {
            setup(format!(
                "no route to its agent at {}: {e}",
                source.agent_url()
            ))
        })?;
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|e| setup(format!("cannot listen on {ip}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| setup(e.to_string()))?
            .port();
        let root = incoming(cx);
        std::fs::create_dir_all(&root).map_err(|e| MigratorError::file("create", &root, e))?;
        let secret = random_secret();
        let key = PresharedKey::from_secret(secret.as_bytes())
            .expect("64 hex digits are a long enough secret");
        let (tls, me) = source.server_tls();
        let received = Received::default();
        let mut opts = viaduct::ReceiverOptions::new(&root, key);
        opts.tls = Some(tls);
        opts.on_commit = Some(received.hook());
        opts.staging = true;
        let stop = CancellationToken::new();
        opts.shutdown = stop.clone();
        tokio::spawn(viaduct::serve(listener, opts));
        let host = match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        Ok(Landing {
            info: ReceiverInfo {
                addr: format!("{host}:{port}"),
                server_name: me.to_string(),
                secret,
            },
            received,
            _stop: Some(stop.drop_guard()),
        })
    }
}

/// The local address this host sends from toward `host`.
pub(super) fn route_to(host: &str) -> std::io::Result<IpAddr> {
    let probe = std::net::UdpSocket::bind(if host.contains(':') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })?;
    probe.connect((host, 9))?;
    Ok(probe.local_addr()?.ip())
}

/// Sends the source's image of `info` to the target's receiver as `name`, again after a
/// failure (each send resumes from what the receiver verified; a restarted agent's receiver
/// is asked for again), until it arrives whole or the step is cancelled.
pub(super) async fn send(
    cx: &Cx,
    step: &str,
    info: &Outgoing,
    name: &str,
) -> Result<(SentReport, Landing), MigratorError> {
    // 2, 4, 8, 16 s, each stretched by a random part of itself: the sends of relocations
    // that failed together do not come back in step.
    let mut pauses = ExponentialBuilder::new()
        .with_min_delay(Duration::from_secs(2))
        .with_max_delay(Duration::from_secs(16))
        .with_max_times(RESENDS)
        .with_jitter()
        .build();
    let mut attempt = 0;
    loop {
        let result = match Landing::open(cx).await {
            Ok(landing) => {
                let to = &landing.info;
                match cx.source.remote() {
                    Some(source) => send_from_agent(cx, source, step, info, to, name).await,
                    None => send_from_here(cx, step, info, to, name).await,
                }
                .map(|report| (report, landing))
            }
            Err(e) => Err(Sent::Failed(e)),
        };
        match result {
            Ok(done) => return Ok(done),
            Err(Sent::Cancelled) => {
                return Err(if cx.cancelled.is_cancelled() {
                    MigratorError::Cancelled
                } else {
                    MigratorError::Check(format!(
                        "the copy of volume `{}/{}` was stopped: another transfer of the relocation failed",
                        cx.svc(),
                        info.volume
                    ))
                })
            }
            Err(Sent::Failed(e)) => {
                let Some(wait) = pauses.next() else {
                    return Err(e);
                };
                attempt += 1;
                tracing::warn!(
                    "Relocation {}: sending volume `{}/{}` failed ({e}); sending again in {wait:?}, from what arrived (attempt {} of {}).",
                    cx.id,
                    cx.svc(),
                    info.volume,
                    attempt + 1,
                    RESENDS + 1
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cx.transfers.cancelled() => {}
                }
            }
        }
    }
}

/// Why one send ended without the image.
enum Sent {
    Cancelled,
    Failed(MigratorError),
}

impl<E: Into<MigratorError>> From<E> for Sent {
    fn from(e: E) -> Self {
        Sent::Failed(e.into())
    }
}

async fn send_from_agent(
    cx: &Cx,
    source: &RemoteProvider,
    step: &str,
    info: &Outgoing,
    to: &ReceiverInfo,
    name: &str,
) -> Result<SentReport, Sent> {
    let req = SendVolume {
        provider: cx.plan.from.clone(),
        service: cx.svc().to_string(),
        volume: info.volume.clone(),
        to: to.clone(),
        name: name.to_string(),
        streams: None,
        max_bytes_per_sec: cx.config.conduit.volume_max_bytes_per_sec,
    };
    let id = match &info.staging {
        Some(staging) => {
            source
                .send_staging(&SendStaging {
                    send: req,
                    staging: staging.clone(),
                })
                .await?
        }
        None => source.send_volume(&req).await?,
    };
    let progress = cx.progress(step);
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cx.transfers.cancelled() => {
                if let Err(e) = source.cancel_transfer(&id.id).await {
                    tracing::warn!("Relocation {}: could not stop the send of volume `{}/{}` at `{}`: {e}.", cx.id, cx.svc(), info.volume, cx.plan.from);
                }
                return Err(Sent::Cancelled);
            }
        }
        match source.transfer(&id.id).await? {
            TransferState::Running {
                chunks_total,
                chunks_done,
                bytes_read,
                bytes_sent,
            } => {
                if let Some(p) = &progress {
                    p(&viaduct::Progress {
                        phase: viaduct::Phase::Transferring,
                        image_bytes: info.size,
                        chunks_total,
                        chunks_done,
                        bytes_read,
                        bytes_sent,
                        elapsed: started.elapsed(),
                    });
                }
            }
            TransferState::Done { report } => return Ok(report),
            TransferState::Failed { error } => {
                return Err(Sent::Failed(MigratorError::Check(format!(
                    "`{}` could not send volume `{}/{}` to {}: {error}",
                    cx.plan.from,
                    cx.svc(),
                    info.volume,
                    to.addr
                ))))
            }
        }
    }
}

/// Sends an image on the daemon's host to the target's agent.
async fn send_from_here(
    cx: &Cx,
    step: &str,
    info: &Outgoing,
    to: &ReceiverInfo,
    name: &str,
) -> Result<SentReport, Sent> {
    let target = cx
        .target
        .remote()
        .expect("a volume crossing hosts from here goes to an agent");
    let path = info.path.clone().ok_or_else(|| {
        MigratorError::Check(format!(
            "volume `{}/{}` at `{}` has no image on this host",
            cx.svc(),
            info.volume,
            cx.plan.from
        ))
    })?;
    let key = PresharedKey::from_secret(to.secret.as_bytes())
        .map_err(|e| MigratorError::Check(format!("the receiver's secret: {e}")))?;
    let server = server_name(&to.server_name)
        .map_err(|e| MigratorError::Check(format!("the receiver's name: {e}")))?;
    let endpoint = Endpoint::new(&to.addr, key).with_tls(EndpointTls {
        config: target.client_tls(),
        server_name: server,
    });
    let cancel = cx.transfers.child_token();
    let opts = SendOptions {
        max_bytes_per_sec: cx.config.conduit.volume_max_bytes_per_sec,
        cancel: cancel.clone(),
        ..SendOptions::default()
    };
    let progress = cx.progress(step);
    let report = viaduct::send_file(&path, &endpoint, name, &opts, &|p| {
        if let Some(f) = &progress {
            f(&p)
        }
    })
    .await;
    match report {
        Ok(r) => Ok(sent_report(&r)),
        Err(_) if cancel.is_cancelled() => Err(Sent::Cancelled),
        Err(e) => Err(e.into()),
    }
}
