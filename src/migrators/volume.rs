//! The volume migrator: copies a volume to the target while the source runs (the pre-copy),
//! then sends what changed since at cutover (the final sync), converting it to the target's
//! disk format ([`super::convert`]) and verifying it. Its undo deletes the target's volume
//! and the staging files. Between hosts, [`super::crossing`] does both.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::convert::{chunk_ranges, compare, convert, write_ranges};
use super::crossing::{copy_across, crosses_hosts, undo_across};
use super::plan::VolumePlan;
use super::{remove_file, Cx, Migrator, MigratorError};
use crate::providers::{self, DiskFormat, VolumeSpec};
use crate::viaduct;

/// `pre-copy:<volume>` (`final_pass` false) and `sync:<volume>` (true).
pub struct CopyVolume {
    /// The step's name, for progress reports.
    pub step: String,
    pub volume: VolumePlan,
    pub final_pass: bool,
}

#[async_trait::async_trait]
impl Migrator for CopyVolume {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        if crosses_hosts(cx) {
            return copy_across(cx, &self.step, &self.volume, self.final_pass).await;
        }
        copy_volume(cx, &self.step, &self.volume, self.final_pass).await
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let v = &self.volume;
        if crosses_hosts(cx) {
            return undo_across(cx, v).await;
        }
        let op = cx.target.delete_volume(cx.svc(), &v.name).await?;
        providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
        remove_file(&staging_path(cx, v))?;
        remove_file(&manifest_path(cx, v))?;
        Ok(())
    }
}

fn staging_path(cx: &Cx, v: &VolumePlan) -> PathBuf {
    cx.work_dir.join(format!("{}.raw", v.name))
}

fn manifest_path(cx: &Cx, v: &VolumePlan) -> PathBuf {
    cx.work_dir.join(format!("{}.manifest", v.name))
}

/// The manifest of the staging image the target's converted image was made from.
fn converted_path(cx: &Cx, v: &VolumePlan) -> PathBuf {
    cx.work_dir.join(format!("{}.converted", v.name))
}

pub(super) async fn ensure_target_volume(
    cx: &Cx,
    v: &VolumePlan,
    size: u64,
    fresh: bool,
) -> Result<PathBuf, MigratorError> {
    let svc = cx.svc();
    if fresh {
        let op = cx.target.delete_volume(svc, &v.name).await?;
        providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
    }
    let op = cx
        .target
        .create_volume(
            svc,
            &VolumeSpec {
                name: v.name.clone(),
                size_bytes: size,
                format: v.target_format,
            },
        )
        .await?;
    providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
    cx.target
        .volume_info(svc, &v.name)
        .await?
        .and_then(|i| i.path)
        .ok_or_else(|| {
            MigratorError::Check(format!(
                "volume `{svc}/{}` at `{}` is not reachable from this machine",
                v.name, cx.plan.to
            ))
        })
}

async fn copy_volume(
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
    let src = info.path.clone().ok_or_else(|| {
        MigratorError::Check(format!("volume `{svc}/{}` is not reachable", v.name))
    })?;
    if v.source_format != DiskFormat::Raw {
        if !final_pass {
            return Ok(json!({ "skipped": "a non-raw source is converted in full at cutover" }));
        }
        let dst = ensure_target_volume(cx, v, info.virtual_size, true).await?;
        let started = Instant::now();
        convert(v.source_format, &src, v.target_format, &dst).await?;
        compare(v.source_format, &src, v.target_format, &dst).await?;
        cx.count_bytes(
            "volume",
            info.allocated_bytes,
            info.allocated_bytes,
            started,
        );
        return Ok(json!({
            "method": "qemu-img convert",
            "bytes_read": info.allocated_bytes,
            "bytes_written": info.allocated_bytes,
            "from_format": v.source_format.as_str(),
            "to_format": v.target_format.as_str(),
            "verified": "qemu-img compare",
            "seconds": started.elapsed().as_secs_f64(),
        }));
    }
    // Raw source: the viaduct's copy carries allocated extents only, verified by digest.
    let raw_target = v.target_format == DiskFormat::Raw;
    let staging = if raw_target {
        ensure_target_volume(cx, v, info.virtual_size, false).await?
    } else {
        staging_path(cx, v)
    };
    // The pre-copy and the final delta write into the same staging image; the manifest of
    // the previous pass says which chunks it holds, so the delta reads the source and
    // writes only what changed.
    let manifest = manifest_path(cx, v);
    let base = viaduct::ChunkManifest::load_if_exists(&manifest).unwrap_or(None);
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = viaduct::LocalCopyOptions {
        in_place: true,
        base,
        progress: cx.progress(step),
        cancel: Some(cancel.clone()),
        ..viaduct::LocalCopyOptions::default()
    };
    let watch = {
        let token = cx.transfers.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let (src2, staging2) = (src.clone(), staging.clone());
    let copied =
        tokio::task::spawn_blocking(move || viaduct::copy_local(&src2, &staging2, &opts)).await;
    watch.abort();
    let report = copied.map_err(|source| MigratorError::Task {
        task: "copy",
        source,
    })??;
    cx.count_bytes(
        "volume",
        report.bytes_read,
        report.bytes_sent,
        Instant::now() - report.duration,
    );
    report.manifest.save(&manifest)?;
    let mut out = json!({
        "method": "viaduct (local)",
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_sent,
        "chunks_sent": report.chunks_sent,
        "chunks_skipped_zero": report.chunks_skipped_zero,
        "chunks_skipped_equal": report.chunks_skipped_equal,
        "digest": report.digest.to_hex(),
        "seconds": report.duration.as_secs_f64(),
    });
    if raw_target {
        out["verified"] = json!("image digest");
        return Ok(out);
    }
    // A target in another format: the pre-copy converts the whole staging image while the
    // source runs; the final pass writes only the chunks that changed since into it and
    // reads them back, so the downtime does not grow with the image.
    let converted = converted_path(cx, v);
    let previous = viaduct::ChunkManifest::load_if_exists(&converted).unwrap_or(None);
    let delta = previous
        .as_ref()
        .and_then(|p| p.changed_chunks(&report.manifest));
    match (final_pass, delta) {
        (true, Some(chunks)) => {
            let dst = ensure_target_volume(cx, v, info.virtual_size, false).await?;
            let ranges = chunk_ranges(&chunks, &report.manifest);
            let chunk = u64::from(report.manifest.chunk_size);
            let scratch = cx.work_dir.join("delta");
            write_ranges(&scratch, &staging, v.target_format, &dst, &ranges, chunk).await?;
            remove_file(&staging)?;
            remove_file(&converted)?;
            out["converted_to"] = json!(v.target_format.as_str());
            out["delta_chunks_converted"] = json!(chunks.len());
            out["verified"] = json!(
                "image digest; the pre-copy's conversion by qemu-img compare, the changed chunks read back"
            );
        }
        (final_pass, _) => {
            let dst = ensure_target_volume(cx, v, info.virtual_size, true).await?;
            remove_file(&converted)?;
            convert(DiskFormat::Raw, &staging, v.target_format, &dst).await?;
            compare(DiskFormat::Raw, &staging, v.target_format, &dst).await?;
            out["converted_to"] = json!(v.target_format.as_str());
            out["verified"] = json!("image digest, then qemu-img compare");
            if final_pass {
                remove_file(&staging)?;
            } else {
                // Flush the converted image now, while the source runs: otherwise the
                // cutover's first flush of it (qemu-io's) writes the whole image back.
                let synced = dst.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&synced).and_then(|f| f.sync_all())
                })
                .await
                .map_err(|source| MigratorError::Task {
                    task: "flush",
                    source,
                })?
                .map_err(|e| MigratorError::file("flush", &dst, e))?;
                report.manifest.save(&converted)?;
            }
        }
    }
    Ok(out)
}
