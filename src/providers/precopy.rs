//! What a pre-copy of a running VM's disks asks of the source's emulator: dirty tracking
//! of every disk and read-only exports to read them through, pass by pass
//! ([`super::Provider::track_vm_disks`]), and a halt at cutover that keeps the emulator
//! ([`super::Provider::halt_vm`]) so the last pass reads what the guest wrote last.
//!
//! The sequence, driven by the conduit:
//!
//! 1. [`DiskPassKind::Full`]: tracking starts afresh (a dirty bitmap per disk) and every
//!    disk is exported whole; the reader copies its allocated extents.
//! 2. [`DiskPassKind::Dirty`], as often as it pays: a new bitmap takes over the tracking in
//!    one transaction with the freezing of the previous one, which is exported; the reader
//!    copies the extents it marks.
//! 3. [`super::Provider::halt_vm`]: the guest powers down (or, when it does not in time,
//!    is paused), and the emulator stays.
//! 4. [`DiskPassKind::Final`]: the bitmap that tracked since the last pass is frozen and
//!    exported; asking again gives the same extents, so a final pass interrupted by a crash
//!    is simply read again.
//! 5. [`super::Provider::untrack_vm_disks`]: exports and bitmaps go.
//!
//! A pass is read on the host of the emulator, whose NBD server listens on a unix socket:
//! by the daemon for a provider of its own, by the agent for one it serves. Both read with
//! [`read_pass`] into raw staging images and check the last one with [`compare_held`].

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::SocketAddress;
use crate::model::DiskFormat;
use crate::sys::nbd::{self, NbdClient};
use crate::sys::qemu_img::{qemu_img, QemuImgError};

/// Which pass over a running VM's disks to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskPassKind {
    /// Start tracking afresh; read everything allocated.
    Full,
    /// Read what was written since the previous pass began.
    Dirty,
    /// After [`super::Provider::halt_vm`]: read what was written since the last pass began.
    Final,
}

/// One pass over the disks of a VM: where to read them and what to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPass {
    /// The NBD server exporting the disks, read-only.
    pub nbd: SocketAddress,
    /// Each disk, in the VM's disk order.
    pub disks: Vec<DiskExport>,
}

/// One disk of a [`DiskPass`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskExport {
    /// The volume the disk is.
    pub volume: String,
    /// The NBD export to read it through.
    pub export: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// The dirty bitmap the export carries (NBD context `qemu:dirty-bitmap:<name>`): read
    /// the extents it marks. `None`: read every allocated extent (`base:allocation`).
    pub bitmap: Option<String>,
}

/// How a VM's guest was halted for the last pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Halt {
    /// The guest shut down through its power button; its disk is clean.
    PoweredDown,
    /// The guest did not shut down in time and was paused: its disk is as after a power
    /// cut.
    Paused,
}

/// Bytes read from an export and written to the staging image at a time.
const PIECE: u64 = 4 << 20;
/// How long one NBD request may take.
const NBD_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a pass could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("reading the disks of VM `{vm}` failed: {detail}")]
    Nbd { vm: String, detail: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the staging image {} of a dirty pass is missing: the pre-copy has to start again", path.display())]
    NoStaging { path: PathBuf },
    #[error("the pass was cancelled")]
    Cancelled,
    #[error("the staging image {} differs from the halted source disk {}", staging.display(), disk.display())]
    Differs { disk: PathBuf, staging: PathBuf },
    #[error("cannot compare the staging image with the halted source disk: {0}")]
    Compare(QemuImgError),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PassError {
    let path = path.to_path_buf();
    move |source| PassError::Io {
        action,
        path,
        source,
    }
}

/// What one pass read from one disk.
#[derive(Debug, Clone)]
pub struct DiskRead {
    pub ranges: Vec<Range<u64>>,
    pub bytes: u64,
}

fn endpoint(addr: &SocketAddress) -> nbd::Endpoint {
    match addr {
        SocketAddress::Unix { path } => nbd::Endpoint::Unix(path.into()),
        SocketAddress::Tcp { host, port } => nbd::Endpoint::Tcp(format!("{host}:{port}")),
    }
}

/// Makes `path` a new, empty (sparse) raw image of `size` bytes.
pub fn fresh_image(path: &Path, size: u64) -> Result<(), PassError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", path)(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let f = File::create(path).map_err(io("create", path))?;
    f.set_len(size).map_err(io("size", path))
}

/// The staging image a pass over `disk` writes into: a fresh one when the pass reads the
/// whole disk; the one the earlier passes filled when it reads what a bitmap marks (it
/// must be there: a dirty pass alone is not the disk).
pub fn prepare_staging(disk: &DiskExport, path: &Path) -> Result<(), PassError> {
    if disk.bitmap.is_none() {
        return fresh_image(path, disk.size);
    }
    if !path.is_file() {
        return Err(PassError::NoStaging {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

async fn flush(path: &Path) -> Result<(), PassError> {
    let synced = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        OpenOptions::new()
            .write(true)
            .open(&synced)
            .and_then(|f| f.sync_all())
            .map_err(io("flush", &synced))
    })
    .await
    .map_err(|e| PassError::Io {
        action: "flush",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?
}

/// Reads the extents `pass` names of every disk of VM `vm` into its staging image
/// (`images`, in the pass's disk order), and flushes each image.
pub async fn read_pass(
    vm: &str,
    pass: &DiskPass,
    images: &[PathBuf],
    cancel: &CancellationToken,
) -> Result<Vec<DiskRead>, PassError> {
    let failed = |e: nbd::NbdError| PassError::Nbd {
        vm: vm.to_string(),
        detail: e.to_string(),
    };
    let mut out = Vec::new();
    for (disk, image) in pass.disks.iter().zip(images) {
        let context = match &disk.bitmap {
            Some(b) => format!("qemu:dirty-bitmap:{b}"),
            None => "base:allocation".to_string(),
        };
        let mut client = NbdClient::connect(
            endpoint(&pass.nbd),
            &disk.export,
            &[context.as_str()],
            NBD_TIMEOUT,
        )
        .await
        .map_err(failed)?;
        let whole = 0..client.size();
        let ranges = match &disk.bitmap {
            Some(b) => client.dirty_extents(b, whole).await,
            None => client.allocated_extents(whole).await,
        }
        .map_err(failed)?;
        let file = OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(io("open", image))?;
        let mut buf = Vec::new();
        let mut bytes = 0;
        for r in &ranges {
            let mut at = r.start;
            while at < r.end {
                if cancel.is_cancelled() {
                    return Err(PassError::Cancelled);
                }
                let len = PIECE.min(r.end - at) as usize;
                buf.resize(len, 0);
                client.read(at, &mut buf).await.map_err(failed)?;
                file.write_all_at(&buf, at).map_err(io("write", image))?;
                at += len as u64;
                bytes += len as u64;
            }
        }
        let _ = client.disconnect().await;
        drop(file);
        flush(image).await?;
        out.push(DiskRead { ranges, bytes });
    }
    Ok(out)
}

/// Compares a raw staging image with the source disk `source` (in `format`) that a halted
/// emulator still holds open (`qemu-img compare -U`: nothing writes to it, but its lock
/// would refuse the read).
pub async fn compare_held(
    format: DiskFormat,
    source: &Path,
    staging: &Path,
) -> Result<(), PassError> {
    use std::ffi::OsStr;
    let args: [&OsStr; 9] = [
        OsStr::new("compare"),
        OsStr::new("-q"),
        OsStr::new("-U"),
        OsStr::new("-f"),
        OsStr::new(format.as_str()),
        OsStr::new("-F"),
        OsStr::new("raw"),
        source.as_os_str(),
        staging.as_os_str(),
    ];
    match qemu_img(args).await {
        Ok(_) => Ok(()),
        // `qemu-img compare` exits 1 when the images differ, 2 or more when it failed.
        Err(QemuImgError::Failed { status, .. }) if status.code() == Some(1) => {
            Err(PassError::Differs {
                disk: source.to_path_buf(),
                staging: staging.to_path_buf(),
            })
        }
        Err(e) => Err(PassError::Compare(e)),
    }
}
