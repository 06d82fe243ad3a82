//! The preflight migrator: checks both providers, the source's components, the target's
//! free space and that every configuration rule still matches, before anything is written.

use std::path::Path;

use serde_json::{json, Value};

use super::convert::qemu_img;
use super::plan::Action;
use super::{config, deploy, name_some, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;
use crate::providers::{AppState, DiskFormat, VmState};
use crate::sys::units::human_bytes;

pub struct Preflight;

#[async_trait::async_trait]
impl Migrator for Preflight {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        preflight(cx).await
    }

    /// A preflight writes nothing but the work directory, which the rollback removes.
    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}

fn check(message: String) -> MigratorError {
    MigratorError::Check(message)
}

async fn preflight(cx: &Cx) -> Result<Value, MigratorError> {
    cx.spec()?;
    let svc = cx.svc();
    let mut needed: u64 = 0;
    let mut checked = Vec::new();
    for step in &cx.plan.steps {
        if let Action::PrecopyVolume { volume } = &step.action {
            let info = cx
                .source
                .volume_info(svc, &volume.name)
                .await?
                .ok_or_else(|| {
                    check(format!(
                        "volume `{svc}/{}` does not exist at `{}`",
                        volume.name, cx.plan.from
                    ))
                })?;
            if info.format != volume.source_format {
                return Err(check(format!(
                    "volume `{svc}/{}` at `{}` is {}, the plan expected {}",
                    volume.name,
                    cx.plan.from,
                    info.format.as_str(),
                    volume.source_format.as_str()
                )));
            }
            let here = cx.source.remote().is_none();
            if here && info.path.is_none() {
                return Err(check(format!(
                    "volume `{svc}/{}` at `{}` is not reachable from this machine",
                    volume.name, cx.plan.from
                )));
            }
            // An agent's image is checked there, when qemu-img reads it to convert it.
            if here && volume.source_format != DiskFormat::Raw {
                qemu_img(
                    // `-U`: a running VM holds a write lock on its disk; the check only reads.
                    &["check", "-U", "-f", volume.source_format.as_str()],
                    &[info.path.as_deref().unwrap_or(Path::new(""))],
                )
                .await
                .map_err(|e| {
                    check(format!(
                        "volume `{svc}/{}` at `{}` is damaged: {e}",
                        volume.name, cx.plan.from
                    ))
                })?;
            }
            if cx.target.volume_info(svc, &volume.name).await?.is_some()
                && !cx.done.iter().any(|name| name.ends_with(&volume.name))
            {
                return Err(check(format!(
                    "`{}` already holds a volume `{svc}/{}`; it is not this relocation's, so it is left alone (remove it, or relocate elsewhere)",
                    cx.plan.to, volume.name
                )));
            }
            needed += info.allocated_bytes;
            checked.push(format!("volume {}", volume.name));
        }
        if let Action::CopyBucket { bucket } = &step.action {
            let objects = cx.source.list_objects(svc, bucket).await?;
            needed += objects.iter().map(|o| o.size).sum::<u64>();
            // What is not an object is not copied: moving without it must be asked for.
            let others = cx.source.list_non_objects(svc, bucket).await?;
            if others.is_empty() {
                checked.push(format!("bucket {bucket} ({} objects)", objects.len()));
            } else if cx
                .component(ComponentKind::Bucket, bucket)?
                .skip_special_files()
            {
                checked.push(format!(
                    "bucket {bucket} ({} objects; {} entries that are not objects stay at `{}`: {})",
                    objects.len(),
                    others.len(),
                    cx.plan.from,
                    name_some(&others)
                ));
            } else {
                return Err(check(format!(
                    "bucket `{svc}/{bucket}` at `{}` holds {} entries that are not objects and cannot be copied (symbolic links, other files that are not regular, names that are no valid keys): {}; remove them, or set `skip_special_files = true` in the bucket's settings to leave them behind at the source",
                    cx.plan.from,
                    others.len(),
                    name_some(&others)
                )));
            }
        }
        if let Action::StopSource { app } = &step.action {
            let status = cx.source.app_status(svc, app).await?;
            if !matches!(&status, Some(s) if s.state == AppState::Running) {
                return Err(check(format!(
                    "app `{svc}/{app}` is not running at `{}` ({}); relocate a running service, or deploy it first",
                    cx.plan.from,
                    status.map(|s| format!("{:?}", s.state).to_lowercase()).unwrap_or_else(|| "unknown".into())
                )));
            }
            checked.push(format!("app {app}"));
        }
        if let Action::PrecopyVm { disks, .. } = &step.action {
            // A staging image and, for a target in another format, the converted volume.
            for disk in disks {
                if let Some(info) = cx.source.volume_info(svc, &disk.name).await? {
                    let copies = if disk.target_format == crate::providers::DiskFormat::Raw {
                        1
                    } else {
                        2
                    };
                    needed += copies * info.allocated_bytes;
                }
            }
        }
        if let Action::MigrateVm { vm } = &step.action {
            // The live VM's disks travel through its mirrors: the target needs their room.
            let spec = deploy::vm_spec(cx.spec()?, cx.component(ComponentKind::Vm, vm)?)?;
            for disk in spec.disks() {
                if let Some(info) = cx.source.volume_info(svc, disk).await? {
                    needed += info.allocated_bytes;
                }
            }
        }
        if let Action::StopSourceVm { vm }
        | Action::MigrateVm { vm }
        | Action::FinalPassVm { vm, .. } = &step.action
        {
            let status = cx.source.vm_status(svc, vm).await?;
            // Live and pre-copied VMs need the guest running, not merely its emulator.
            let live = matches!(
                step.action,
                Action::MigrateVm { .. } | Action::FinalPassVm { .. }
            );
            let running = |s: &crate::providers::VmStatus| {
                s.state == VmState::Running && (!live || s.detail.as_deref() == Some("running"))
            };
            if !matches!(&status, Some(s) if running(s)) {
                return Err(check(format!(
                    "VM `{svc}/{vm}` is not running at `{}` ({}); relocate a running service, or deploy it first",
                    cx.plan.from,
                    status
                        .map(|s| s.detail.unwrap_or_else(|| format!("{:?}", s.state).to_lowercase()))
                        .unwrap_or_else(|| "unknown".into())
                )));
            }
            // The machine definition must suit the target before anything stops.
            let spec = deploy::vm_spec(cx.spec()?, cx.component(ComponentKind::Vm, vm)?)?;
            cx.target.check_vm(svc, &spec).await?;
            checked.push(format!("vm {vm}"));
        }
        if let Action::WriteConfig { file, app } = &step.action {
            // A rule that matches nothing fails here, before the source is touched.
            config::render_target_config(cx, file, app).await?;
            checked.push(format!("config {file}"));
        }
    }
    if let Some(free) = cx.target.free_bytes().await? {
        // Allocated bytes plus a margin for metadata and conversions.
        let want = needed + needed / 20 + (64 << 20);
        if free < want {
            return Err(check(format!(
                "the target `{}` has {} free, the relocation needs about {}",
                cx.plan.to,
                human_bytes(free),
                human_bytes(want)
            )));
        }
    }
    std::fs::create_dir_all(&cx.work_dir)
        .map_err(|e| MigratorError::file("create", &cx.work_dir, e))?;
    Ok(json!({ "checked": checked, "bytes_needed": needed }))
}
