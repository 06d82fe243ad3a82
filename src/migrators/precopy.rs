//! The pre-copy VM migrators (`vm_mode = "precopy"`): a VM's disks are copied while its
//! guest runs, in passes over what it wrote since the previous one, whatever their format;
//! at cutover the guest powers down and only what it wrote since the last pass travels,
//! then it boots at the target ([`crate::providers::precopy`] has the source's side).
//!
//! - `precopy:vm:<vm>` reads every disk's allocated extents through the source emulator's
//!   read-only NBD export into a raw staging image (the target's volume itself when the
//!   target keeps raw disks), then the extents the dirty bitmap of the previous pass marks,
//!   until a pass reads little or stops shrinking; a target in another format gets the
//!   staging image converted while the guest still runs. Undone by ending the tracking and
//!   deleting the target's volumes and the staging images.
//! - `final-pass:vm:<vm>` halts the guest (power button; paused when it does not shut down
//!   within `conduit.stop_timeout_secs`; the downtime starts), reads what the last bitmap
//!   marks into the staging image and the target's volume, and compares the whole target
//!   with the source (`qemu-img compare`). The source emulator stays, halted, until the
//!   commit. Undone by booting the source's guest again.
//!
//! Between hosts ([`across`]) the passes are read on the source's host and sent over the
//! viaduct to the target's, where the last one becomes the target's volume.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod across;

use super::convert::{compare, compare_held, convert, write_ranges};
use super::crossing::crosses_hosts;
use super::plan::VolumePlan;
use super::volume::ensure_target_volume;
use super::{remove_file, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;
use crate::providers::precopy::{self, DiskRead, PassError};
use crate::providers::{self, DiskFormat, DiskPass, DiskPassKind, VmState};

/// Passes after the first one at most.
const MAX_DIRTY_PASSES: u32 = 8;
/// A pass that reads no more than this ends the pre-copy: the final pass will be about as
/// short.
const SMALL_PASS: u64 = 16 << 20;
/// The unit the delta of a converted image is written and read back in: a multiple of
/// QEMU's dirty-bitmap granularity and of the NBD block size.
const DELTA_BLOCK: u64 = 64 << 10;
/// How long the undo of a final pass keeps trying to let the source's guest run again.
const WAKE_FOR: Duration = Duration::from_secs(300);
/// How long a volume operation may take.
const OPERATION: Duration = Duration::from_secs(600);

fn staging_path(cx: &Cx, disk: &str) -> PathBuf {
    cx.work_dir.join(format!("{disk}.precopy.raw"))
}

impl From<PassError> for MigratorError {
    fn from(e: PassError) -> Self {
        match e {
            PassError::Io {
                action,
                path,
                source,
            } => MigratorError::File {
                action,
                path,
                source,
            },
            PassError::Cancelled => MigratorError::Cancelled,
            other => MigratorError::Check(other.to_string()),
        }
    }
}

/// A new, empty (sparse) raw image of `size` bytes at `path`.
fn fresh_image(path: &Path, size: u64) -> Result<(), MigratorError> {
    remove_file(path)?;
    let f = File::create(path).map_err(|e| MigratorError::file("create", path, e))?;
    f.set_len(size)
        .map_err(|e| MigratorError::file("size", path, e))
}

fn flush(path: &Path) -> Result<(), MigratorError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| MigratorError::file("flush", path, e))
}

/// Reads the extents `pass` names of every disk into its staging image (`images`, in the
/// pass's disk order).
async fn read_pass(
    cx: &Cx,
    vm: &str,
    pass: &DiskPass,
    images: &[PathBuf],
) -> Result<Vec<DiskRead>, MigratorError> {
    Ok(precopy::read_pass(vm, pass, images, &cx.transfers).await?)
}

/// The disk plan of each disk of `pass`, in its order.
fn plans<'a>(
    disks: &'a [VolumePlan],
    pass: &DiskPass,
) -> Result<Vec<&'a VolumePlan>, MigratorError> {
    covers(disks, pass.disks.iter().map(|d| d.volume.as_str()))?;
    pass.disks
        .iter()
        .map(|d| {
            disks.iter().find(|v| v.name == d.volume).ok_or_else(|| {
                MigratorError::Check(format!(
                    "the source exports disk `{}`, which the plan does not move",
                    d.volume
                ))
            })
        })
        .collect()
}

/// Fails unless the source exports every disk the plan moves: a disk left out would be
/// neither copied nor compared, and would be lost with the source.
fn covers<'a>(
    disks: &[VolumePlan],
    exported: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), MigratorError> {
    match disks
        .iter()
        .find(|v| !exported.clone().any(|e| e == v.name))
    {
        Some(v) => Err(MigratorError::Check(format!(
            "the running VM does not export disk `{}`, which the plan moves; it may have been \
             started with another disk list: restart it at the source, then relocate",
            v.name
        ))),
        None => Ok(()),
    }
}

/// Where each disk's pass lands: the target's volume for a raw target, else a staging image.
async fn staging(
    cx: &Cx,
    v: &VolumePlan,
    size: u64,
    fresh: bool,
) -> Result<PathBuf, MigratorError> {
    if v.target_format == DiskFormat::Raw {
        return ensure_target_volume(cx, v, size, fresh).await;
    }
    let path = staging_path(cx, &v.name);
    if fresh || !path.exists() {
        fresh_image(&path, size)?;
    }
    Ok(path)
}

pub struct PrecopyVm {
    pub vm: String,
    pub disks: Vec<VolumePlan>,
}

#[async_trait::async_trait]
impl Migrator for PrecopyVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        if crosses_hosts(cx) {
            return across::precopy(cx, &self.vm, &self.disks).await;
        }
        let (svc, vm) = (cx.svc(), self.vm.as_str());
        let started = Instant::now();
        let pass = cx
            .source
            .track_vm_disks(svc, vm, DiskPassKind::Full)
            .await?;
        let disks = plans(&self.disks, &pass)?;
        let mut images = Vec::new();
        for (d, v) in pass.disks.iter().zip(&disks) {
            images.push(staging(cx, v, d.size, true).await?);
        }
        let first = Instant::now();
        let read = read_pass(cx, vm, &pass, &images).await?;
        let mut total: u64 = read.iter().map(|r| r.bytes).sum();
        let mut passes = vec![json!({ "bytes": total, "seconds": first.elapsed().as_secs_f64() })];
        let mut last = u64::MAX;
        for _ in 0..MAX_DIRTY_PASSES {
            let at = Instant::now();
            let pass = cx
                .source
                .track_vm_disks(svc, vm, DiskPassKind::Dirty)
                .await?;
            let bytes: u64 = read_pass(cx, vm, &pass, &images)
                .await?
                .iter()
                .map(|r| r.bytes)
                .sum();
            total += bytes;
            passes.push(json!({ "bytes": bytes, "seconds": at.elapsed().as_secs_f64() }));
            if bytes <= SMALL_PASS || bytes >= last {
                break;
            }
            last = bytes;
        }
        // A target in another format gets the staging image converted now, while the guest
        // runs; the final pass writes only the delta into it.
        let mut converted = Vec::new();
        for ((d, v), image) in pass.disks.iter().zip(&disks).zip(&images) {
            if v.target_format == DiskFormat::Raw {
                continue;
            }
            let dst = ensure_target_volume(cx, v, d.size, true).await?;
            convert(DiskFormat::Raw, image, v.target_format, &dst).await?;
            compare(DiskFormat::Raw, image, v.target_format, &dst).await?;
            let synced = dst.clone();
            tokio::task::spawn_blocking(move || flush(&synced))
                .await
                .map_err(|source| MigratorError::Task {
                    task: "flush",
                    source,
                })??;
            converted.push(json!({ "volume": v.name, "to_format": v.target_format.as_str() }));
        }
        cx.count_bytes("volume", total, total, started);
        Ok(json!({
            "method": "dirty bitmaps, read through QEMU's NBD export while the guest runs",
            "passes": passes,
            "bytes_read": total,
            "bytes_written": total,
            "converted": converted,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        if crosses_hosts(cx) {
            return across::undo(cx, &self.vm, &self.disks).await;
        }
        let svc = cx.svc();
        cx.source.untrack_vm_disks(svc, &self.vm).await?;
        for v in &self.disks {
            let op = cx.target.delete_volume(svc, &v.name).await?;
            providers::wait_for(cx.target.as_ref(), &op.id, OPERATION).await?;
            remove_file(&staging_path(cx, &v.name))?;
        }
        Ok(())
    }
}

pub struct FinishPrecopyVm {
    pub vm: String,
    pub disks: Vec<VolumePlan>,
}

#[async_trait::async_trait]
impl Migrator for FinishPrecopyVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        if crosses_hosts(cx) {
            return across::final_pass(cx, &self.vm, &self.disks).await;
        }
        let (svc, vm) = (cx.svc(), self.vm.as_str());
        let started = Instant::now();
        let halt = cx
            .source
            .halt_vm(svc, vm, cx.config.conduit.stop_timeout)
            .await?;
        let halted = started.elapsed();
        let pass = cx
            .source
            .track_vm_disks(svc, vm, DiskPassKind::Final)
            .await?;
        let disks = plans(&self.disks, &pass)?;
        let mut images = Vec::new();
        for (d, v) in pass.disks.iter().zip(&disks) {
            // Without a bitmap the whole disk is read again, into a fresh image.
            images.push(staging(cx, v, d.size, d.bitmap.is_none()).await?);
        }
        let read = read_pass(cx, vm, &pass, &images).await?;
        let bytes: u64 = read.iter().map(|r| r.bytes).sum();
        let copied = started.elapsed();
        for (((d, v), image), r) in pass.disks.iter().zip(&disks).zip(&images).zip(&read) {
            if v.target_format == DiskFormat::Raw {
                continue;
            }
            let dst = ensure_target_volume(cx, v, d.size, d.bitmap.is_none()).await?;
            if d.bitmap.is_none() {
                convert(DiskFormat::Raw, image, v.target_format, &dst).await?;
                continue;
            }
            let ranges = aligned(&r.ranges, d.size);
            let scratch = cx.work_dir.join(format!("{}.delta", v.name));
            write_ranges(&scratch, image, v.target_format, &dst, &ranges, DELTA_BLOCK).await?;
        }
        // The whole target against the whole source, which nothing writes to any more.
        for (d, v) in pass.disks.iter().zip(&disks) {
            let (Some(src), Some(dst)) = (
                volume_path(cx, true, &d.volume).await?,
                volume_path(cx, false, &d.volume).await?,
            ) else {
                return Err(MigratorError::Check(format!(
                    "disk `{}` of VM `{vm}` is not reachable from this machine at both ends",
                    d.volume
                )));
            };
            compare_held(v.source_format, &src, v.target_format, &dst).await?;
        }
        cx.source.untrack_vm_disks(svc, vm).await?;
        for v in &disks {
            remove_file(&staging_path(cx, &v.name))?;
        }
        cx.count_bytes("volume", bytes, bytes, started);
        Ok(json!({
            "halted": halt,
            "halt_seconds": halted.as_secs_f64(),
            "bytes_read": bytes,
            "bytes_written": bytes,
            "copy_seconds": (copied - halted).as_secs_f64(),
            "verified": "qemu-img compare of the whole disk with the halted source",
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        // The guest may be down at the source: keep trying for minutes, not seconds, so
        // that an agent restarting (the likeliest reason the final pass failed) does not
        // leave it down with the relocation given up.
        crate::sys::retry::until_deadline(crate::sys::retry::jittered(usize::MAX), WAKE_FOR, || {
            self.wake(cx)
        })
        .await
    }
}

impl FinishPrecopyVm {
    /// Lets the source's guest run again: booted again when it was halted (or its emulator
    /// gone), left alone when it never stopped.
    async fn wake(&self, cx: &Cx) -> Result<(), MigratorError> {
        let svc = cx.svc();
        let status = cx.source.vm_status(svc, &self.vm).await?;
        if status.is_some_and(|s| s.pid.is_some() && s.state != VmState::Stopped) {
            cx.source.resume_vm(svc, &self.vm).await?;
            return Ok(());
        }
        let spec = cx.spec()?;
        let vm = super::deploy::vm_spec(spec, cx.component(ComponentKind::Vm, &self.vm)?)?;
        let op = cx.source.start_vm(svc, &vm).await?;
        providers::wait_for(cx.source.as_ref(), &op.id, Duration::from_secs(120)).await?;
        Ok(())
    }
}

/// `ranges` widened to whole [`DELTA_BLOCK`]s (the last one may end at `size`), merged.
fn aligned(ranges: &[Range<u64>], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        let start = r.start / DELTA_BLOCK * DELTA_BLOCK;
        let end = r
            .end
            .div_ceil(DELTA_BLOCK)
            .saturating_mul(DELTA_BLOCK)
            .min(size);
        match out.last_mut() {
            Some((o, l)) if *o + *l >= start => *l = (*l).max(end - *o),
            _ => out.push((start, end - start)),
        }
    }
    out
}

async fn volume_path(
    cx: &Cx,
    source: bool,
    volume: &str,
) -> Result<Option<PathBuf>, MigratorError> {
    let p = if source { &cx.source } else { &cx.target };
    Ok(p.volume_info(cx.svc(), volume).await?.and_then(|i| i.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a disk the plan moves but the running VM did not export was neither
    /// copied nor compared, and the final pass succeeded without it.
    #[test]
    fn a_pass_that_leaves_out_a_planned_disk_is_refused() {
        let plan = |name: &str| VolumePlan {
            name: name.into(),
            size_bytes: 1 << 20,
            source_format: DiskFormat::Qcow2,
            target_format: DiskFormat::Raw,
        };
        let disks = [plan("root"), plan("data")];
        assert!(covers(&disks, ["root", "data"].into_iter()).is_ok());
        let e = covers(&disks, ["root"].into_iter())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`data`"), "{e}");
    }

    #[test]
    fn dirty_ranges_widen_to_whole_blocks_and_merge() {
        let k = 1024;
        let ranges = [0..4 * k, 60 * k..70 * k, 200 * k..201 * k];
        assert_eq!(
            aligned(&ranges, 1 << 20),
            vec![(0, 128 * k), (192 * k, 64 * k)]
        );
        // The last block ends at the disk's end.
        assert_eq!(
            aligned(&[1000 * k..1001 * k, 1001 * k..1001 * k], 1001 * k),
            vec![(960 * k, 41 * k)]
        );
    }
}
