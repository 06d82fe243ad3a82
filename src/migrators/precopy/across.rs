//! Pre-copy between hosts: the passes are read on the source's host, where the emulator's
//! NBD export is (by the source's agent, or by the daemon for a provider of its own), into
//! a raw staging image per disk there, and each pass's image is sent over the viaduct to
//! the target's host under one staged name ([`crossing::staged`]), so a send after the
//! first carries only the chunks that changed. At cutover the halted guest's last writes
//! are read, the staging image is compared with the halted disk on the source's host, the
//! delta travels, and the target's host makes the staged image its volume (linked into
//! place for a raw target, converted otherwise).
//!
//! Undone like the one-host pre-copy (the tracking ends, the target's volume goes), plus
//! the images staged at the target and the staging images at the source.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use super::{covers, plans, read_pass, staging_path, MAX_DIRTY_PASSES, SMALL_PASS};
use crate::migrators::crossing::{self, adopt_across, host_of, staged, undo_across, Outgoing};
use crate::migrators::plan::VolumePlan;
use crate::migrators::{remove_file, Cx, MigratorError};
use crate::providers::precopy::{compare_held, prepare_staging};
use crate::providers::remote::wire::{precopy_staging_name, PassedDisk, PrecopyPass, SentReport};
use crate::providers::{DiskFormat, DiskPassKind};

/// Why a pass stopped when the relocation's transfers were stopped.
fn stopped(cx: &Cx, vm: &str) -> MigratorError {
    if cx.cancelled.is_cancelled() {
        MigratorError::Cancelled
    } else {
        MigratorError::Check(format!(
            "the pre-copy of VM `{vm}` was stopped: another transfer of the relocation failed"
        ))
    }
}

/// The plan of the disk `volume`, which the pass must be one of.
fn plan_of<'a>(disks: &'a [VolumePlan], volume: &str) -> Result<&'a VolumePlan, MigratorError> {
    disks.iter().find(|v| v.name == volume).ok_or_else(|| {
        MigratorError::Check(format!(
            "the source exports disk `{volume}`, which the plan does not move"
        ))
    })
}

/// Reads a pass of `kind` over the disks of `vm` on the source's host into its staging
/// images; with `compare` (the final pass), compares each with the halted guest's disk
/// there.
async fn read_on_source(
    cx: &Cx,
    vm: &str,
    kind: DiskPassKind,
    compare: bool,
    disks: &[VolumePlan],
) -> Result<Vec<PassedDisk>, MigratorError> {
    let svc = cx.svc();
    if let Some(source) = cx.source.remote() {
        let req = PrecopyPass {
            provider: cx.plan.from.clone(),
            service: svc.to_string(),
            vm: vm.to_string(),
            relocation: cx.id.clone(),
            kind,
            compare,
        };
        let report = tokio::select! {
            r = source.precopy_pass(&req) => r?,
            _ = cx.transfers.cancelled() => return Err(stopped(cx, vm)),
        };
        for d in &report.disks {
            plan_of(disks, &d.volume)?;
        }
        covers(disks, report.disks.iter().map(|d| d.volume.as_str()))?;
        return Ok(report.disks);
    }
    let pass = cx.source.track_vm_disks(svc, vm, kind).await?;
    let planned = plans(disks, &pass)?;
    let mut images = Vec::new();
    for d in &pass.disks {
        let path = staging_path(cx, &d.volume);
        prepare_staging(d, &path)?;
        images.push(path);
    }
    let read = read_pass(cx, vm, &pass, &images).await?;
    let mut out = Vec::new();
    for (((d, r), image), v) in pass.disks.iter().zip(read).zip(&images).zip(planned) {
        let mut verified = None;
        if compare {
            let info = cx.source.volume_info(svc, &d.volume).await?;
            let Some(source) = info.as_ref().and_then(|i| i.path.clone()) else {
                return Err(MigratorError::Check(format!(
                    "disk `{}` of VM `{vm}` has no image on this host",
                    d.volume
                )));
            };
            let format = info.map_or(v.source_format, |i| i.format);
            compare_held(format, &source, image).await?;
            verified = Some(
                "qemu-img compare of the staging image with the halted source disk, on the source's host"
                    .to_string(),
            );
        }
        out.push(PassedDisk {
            volume: d.volume.clone(),
            size: d.size,
            incremental: d.bitmap.is_some(),
            bytes_read: r.bytes,
            staging: image.to_string_lossy().into_owned(),
            verified,
        });
    }
    Ok(out)
}

/// Sends the staging image of every disk a pass read to the target's host.
async fn send_pass(
    cx: &Cx,
    step: &str,
    passed: &[PassedDisk],
    disks: &[VolumePlan],
) -> Result<Vec<(SentReport, crossing::Landing)>, MigratorError> {
    let here = cx.source.remote().is_none();
    let mut out = Vec::new();
    for d in passed {
        let v = plan_of(disks, &d.volume)?;
        let image = Outgoing {
            volume: d.volume.clone(),
            size: d.size,
            path: here.then(|| PathBuf::from(&d.staging)),
            staging: (!here).then(|| d.staging.clone()),
        };
        out.push(crossing::send(cx, step, &image, &staged(cx, v)).await?);
    }
    Ok(out)
}

/// Removes the staging images of `disks` on the source's host.
async fn remove_source_staging(cx: &Cx, disks: &[VolumePlan]) -> Result<(), MigratorError> {
    for v in disks {
        match cx.source.remote() {
            Some(source) => {
                let name = precopy_staging_name(&cx.id, &cx.plan.from, cx.svc(), &v.name);
                source.discard_precopy(&name).await?;
            }
            None => remove_file(&staging_path(cx, &v.name))?,
        }
    }
    Ok(())
}

/// `precopy:vm:<vm>` between hosts: the full pass, then dirty passes until one reads
/// little or stops shrinking, each sent to the target's host.
pub(super) async fn precopy(
    cx: &Cx,
    vm: &str,
    disks: &[VolumePlan],
) -> Result<Value, MigratorError> {
    let step = format!("precopy:vm:{vm}");
    let started = Instant::now();
    let mut passes = Vec::new();
    let (mut total_read, mut total_sent) = (0, 0);
    let mut to = None;
    let mut kind = DiskPassKind::Full;
    let mut last = u64::MAX;
    for _ in 0..=MAX_DIRTY_PASSES {
        let at = Instant::now();
        let passed = read_on_source(cx, vm, kind, false, disks).await?;
        let read: u64 = passed.iter().map(|d| d.bytes_read).sum();
        let read_seconds = at.elapsed().as_secs_f64();
        let sent = send_pass(cx, &step, &passed, disks).await?;
        let on_wire: u64 = sent.iter().map(|(r, _)| r.bytes_sent).sum();
        to = sent.first().map(|(_, l)| l.info.addr.clone()).or(to);
        total_read += read;
        total_sent += on_wire;
        passes.push(json!({
            "bytes": read,
            "bytes_sent": on_wire,
            "read_seconds": read_seconds,
            "seconds": at.elapsed().as_secs_f64(),
        }));
        if kind == DiskPassKind::Dirty {
            if read <= SMALL_PASS || read >= last {
                break;
            }
            last = read;
        }
        kind = DiskPassKind::Dirty;
    }
    cx.count_bytes("volume", total_read, total_sent, started);
    Ok(json!({
        "method": "dirty bitmaps, read on the source's host while the guest runs; each pass sent over the viaduct (host to host)",
        "from": host_of(cx.source.remote()),
        "to": to,
        "passes": passes,
        "bytes_read": total_read,
        "bytes_sent": total_sent,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// `final-pass:vm:<vm>` between hosts: halts the guest, reads and checks its last writes on
/// the source's host, sends them, and makes the staged images the target's volumes.
pub(super) async fn final_pass(
    cx: &Cx,
    vm: &str,
    disks: &[VolumePlan],
) -> Result<Value, MigratorError> {
    let svc = cx.svc();
    let step = format!("final-pass:vm:{vm}");
    let started = Instant::now();
    let halt = cx
        .source
        .halt_vm(svc, vm, cx.config.conduit.stop_timeout)
        .await?;
    let halted = started.elapsed();
    let passed = read_on_source(cx, vm, DiskPassKind::Final, true, disks).await?;
    let read: u64 = passed.iter().map(|d| d.bytes_read).sum();
    let sent = send_pass(cx, &step, &passed, disks).await?;
    let on_wire: u64 = sent.iter().map(|(r, _)| r.bytes_sent).sum();
    let mut adopted = Vec::new();
    for (d, (report, landing)) in passed.iter().zip(&sent) {
        let v = plan_of(disks, &d.volume)?;
        let a = adopt_across(cx, v, DiskFormat::Raw, d.size, report, landing).await?;
        adopted.push(json!({
            "volume": d.volume,
            "incremental": d.incremental,
            "bytes_read": d.bytes_read,
            "bytes_sent": report.bytes_sent,
            "chunks_sent": report.chunks_sent,
            "chunks_skipped_equal": report.chunks_skipped_equal,
            "digest": report.digest,
            "verified_at_source": d.verified,
            "adopted": a,
        }));
    }
    let copied = started.elapsed();
    cx.source.untrack_vm_disks(svc, vm).await?;
    remove_source_staging(cx, disks).await?;
    cx.count_bytes("volume", read, on_wire, started);
    Ok(json!({
        "halted": halt,
        "halt_seconds": halted.as_secs_f64(),
        "bytes_read": read,
        "bytes_sent": on_wire,
        "copy_seconds": (copied - halted).as_secs_f64(),
        "from": host_of(cx.source.remote()),
        "disks": adopted,
        "verified": "qemu-img compare of the staging image with the halted source on its host; image digest checked by the receiver; the adoption checked against it",
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

/// Undoes [`precopy`] (and the volumes [`final_pass`] adopted): ends the tracking, deletes
/// the target's volumes and staged images and the source's staging images.
pub(super) async fn undo(cx: &Cx, vm: &str, disks: &[VolumePlan]) -> Result<(), MigratorError> {
    cx.source.untrack_vm_disks(cx.svc(), vm).await?;
    for v in disks {
        undo_across(cx, v).await?;
    }
    remove_source_staging(cx, disks).await
}
