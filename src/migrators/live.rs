//! The live VM migrators: a running VM moves to the target without a reboot
//! ([`crate::providers::live`] has the sequence). The guest pauses only for the last pass of
//! its memory and the drain of its disk mirrors; the source stays paused, intact, until the
//! commit, so a rollback lets it go on where it stopped.
//!
//! - `prepare-target:vm:<vm>` creates the VM's disks at the target (empty) and starts it
//!   there waiting for the migration; undone by ending it and deleting the disks.
//! - `mirror:vm:<vm>` mirrors the disks while the guest runs; undone by ending the mirrors.
//! - `migrate:vm:<vm>` moves memory and device state. One that does not converge within
//!   `[services.NAME.live] timeout_secs` is cancelled, and with `fallback = "cold"` (the
//!   default) the VM moves cold instead: powered down, its disk copied, booted at the
//!   target. Any other failure fails the step and the relocation rolls back. Undone by
//!   ending the target's guest and letting the source's run again.
//! - `resume-target:vm:<vm>` lets the guest go on at the target; undone by ending it.
//! - `release-source:vm:<vm>`, after the commit, ends the paused source emulator.
//!
//! Between hosts (an end served by an agent, unless both are the same agent's) the target
//! listens on TCP and the source's emulator connects to it directly, host to host; both
//! streams run under TLS with a key made for the relocation ([`LiveKey`], kept 0600 in its
//! working directory so that a step run again after a crash finds the same one, never in
//! the journal nor in a log).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::plan::VolumePlan;
use super::volume::CopyVolume;
use super::{deploy, Cx, Migrator, MigratorError};
use crate::model::{ComponentKind, LiveFallback, VmSpec};
use crate::providers::{
    self, IncomingVm, LiveKey, LiveLimits, MigrationReport, ProviderError, Reception, StopOptions,
    VmState, VolumeSpec,
};

/// How long a VM start or a volume operation may take.
const OPERATION: Duration = Duration::from_secs(600);

fn vm_of(cx: &Cx, vm: &str) -> Result<VmSpec, MigratorError> {
    let spec = cx.spec()?;
    Ok(deploy::vm_spec(spec, cx.component(ComponentKind::Vm, vm)?)?)
}

/// The target may be ended at any time before the commit: it never served anyone for real.
fn kill(cx: &Cx) -> StopOptions {
    StopOptions {
        timeout: cx.config.conduit.stop_timeout,
        kill_after_timeout: true,
    }
}

/// Where the migration's figures are kept for the steps after it.
fn report_path(cx: &Cx, vm: &str) -> PathBuf {
    cx.work_dir.join(format!("{vm}.migration.json"))
}

/// Where the relocation's key of a VM's migration between hosts is kept.
fn key_path(cx: &Cx, vm: &str) -> PathBuf {
    cx.work_dir.join(format!("{vm}.live.key"))
}

/// The key of the VM's migration between hosts: the one made earlier in the relocation, or
/// a fresh one.
fn live_key(cx: &Cx, vm: &str) -> Result<LiveKey, MigratorError> {
    let path = key_path(cx, vm);
    match std::fs::read_to_string(&path) {
        Ok(hex) => LiveKey::try_from(hex)
            .map_err(|e| MigratorError::file("read", &path, std::io::Error::other(e.to_string()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = LiveKey::random();
            crate::sys::fs::write_atomic(&path, key.to_hex().as_bytes())
                .map_err(|e| MigratorError::file("write", &path, e))?;
            Ok(key)
        }
        Err(e) => Err(MigratorError::file("read", &path, e)),
    }
}

/// How the target receives the VM: over unix sockets when both ends are on one host (the
/// daemon's own providers, or one agent's), else over TCP with TLS on the target host's
/// address toward the source (an agent's host as the daemon reaches it; for a target of
/// the daemon's own, the address this host sends from toward the source's agent).
fn reception(cx: &Cx, vm: &str) -> Result<Reception, MigratorError> {
    let host = match (cx.source.remote(), cx.target.remote()) {
        (None, None) => return Ok(Reception::Local),
        (Some(a), Some(b)) if a.agent_url() == b.agent_url() => return Ok(Reception::Local),
        (_, Some(target)) => target.host().to_string(),
        (Some(source), None) => super::crossing::route_to(source.host())
            .map_err(|e| {
                MigratorError::Check(format!(
                    "cannot find this host's address toward `{}`: {e}",
                    source.host()
                ))
            })?
            .to_string(),
    };
    Ok(Reception::Network {
        host,
        key: live_key(cx, vm)?,
    })
}

/// The target's VM, waiting (started when it is not), and its address as the source needs
/// it (with the key when it is on another host).
async fn receive(cx: &Cx, vm: &VmSpec) -> Result<IncomingVm, MigratorError> {
    let how = reception(cx, &vm.name)?;
    let mut incoming = cx.target.receive_vm(cx.svc(), vm, &how).await?;
    if let Reception::Network { key, .. } = how {
        incoming.key = Some(key);
    }
    Ok(incoming)
}

pub struct PrepareTargetVm {
    pub vm: String,
}

#[async_trait::async_trait]
impl Migrator for PrepareTargetVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let vm = vm_of(cx, &self.vm)?;
        let svc = cx.svc();
        let format = cx.target.preferred_disk_format();
        let mut disks = Vec::new();
        for disk in vm.disks() {
            let info = cx.source.volume_info(svc, disk).await?.ok_or_else(|| {
                MigratorError::Check(format!(
                    "volume `{svc}/{disk}` (a disk of VM `{}`) vanished from `{}`",
                    vm.name, cx.plan.from
                ))
            })?;
            let spec = VolumeSpec {
                name: disk.to_string(),
                size_bytes: info.virtual_size,
                format,
            };
            let op = cx.target.create_volume(svc, &spec).await?;
            providers::wait_for(cx.target.as_ref(), &op.id, OPERATION).await?;
            disks.push(
                json!({ "volume": disk, "bytes": info.virtual_size, "format": format.as_str() }),
            );
        }
        let mut incoming = receive(cx, &vm).await?;
        let encrypted = incoming.key.take().is_some();
        Ok(json!({ "disks": disks, "incoming": incoming, "tls": encrypted }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let vm = vm_of(cx, &self.vm)?;
        let svc = cx.svc();
        cx.target.stop_vm(svc, &vm.name, kill(cx)).await?;
        cx.target.remove_vm(svc, &vm.name).await?;
        for disk in vm.disks() {
            let op = cx.target.delete_volume(svc, disk).await?;
            providers::wait_for(cx.target.as_ref(), &op.id, OPERATION).await?;
        }
        super::remove_file(&report_path(cx, &vm.name))?;
        super::remove_file(&key_path(cx, &vm.name))?;
        Ok(())
    }
}

pub struct MirrorVm {
    pub vm: String,
}

#[async_trait::async_trait]
impl Migrator for MirrorVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let vm = vm_of(cx, &self.vm)?;
        let incoming = receive(cx, &vm).await?;
        let report = cx.source.mirror_vm(cx.svc(), &vm.name, &incoming).await?;
        let method = match incoming.key {
            Some(_) => "QEMU blockdev-mirror over NBD with TLS (PSK), host to host",
            None => "QEMU blockdev-mirror over NBD",
        };
        Ok(json!({
            "disk_bytes": report.disk_bytes,
            "seconds": report.seconds,
            "method": method,
        }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        cx.source.cancel_mirror(cx.svc(), &self.vm).await?;
        Ok(())
    }
}

pub struct MigrateVm {
    pub vm: String,
}

impl MigrateVm {
    /// The VM moves cold after a live migration that did not converge: the mirrors and the
    /// waiting target go, the source powers down, its disks are copied (and converted) as
    /// a cold move copies them, and the VM boots at the target.
    async fn fall_back(&self, cx: &Cx, vm: &VmSpec, why: String) -> Result<Value, MigratorError> {
        let svc = cx.svc();
        tracing::warn!(
            "Relocation {}: {why}; moving VM `{}` cold instead.",
            cx.id,
            vm.name
        );
        cx.source.cancel_mirror(svc, &vm.name).await?;
        cx.target.stop_vm(svc, &vm.name, kill(cx)).await?;
        cx.target.remove_vm(svc, &vm.name).await?;
        let options = StopOptions {
            timeout: cx.config.conduit.stop_timeout,
            kill_after_timeout: cx.config.conduit.kill_after_stop_timeout,
        };
        let stopped = cx.source.stop_vm(svc, &vm.name, options).await?;
        let mut copies = Vec::new();
        for disk in vm.disks() {
            let size = cx
                .source
                .volume_info(svc, disk)
                .await?
                .map(|i| i.virtual_size)
                .unwrap_or_default();
            let copy = CopyVolume {
                step: format!("migrate:vm:{}", vm.name),
                volume: VolumePlan {
                    name: disk.to_string(),
                    size_bytes: size,
                    source_format: cx.source.preferred_disk_format(),
                    target_format: cx.target.preferred_disk_format(),
                },
                final_pass: true,
            };
            copies.push(copy.run(cx).await?);
        }
        let op = cx.target.start_vm(svc, vm).await?;
        providers::wait_for(cx.target.as_ref(), &op.id, OPERATION).await?;
        if let Some(m) = &cx.metrics {
            m.vm_migrations.with_label_values(&["fell_back"]).inc();
        }
        Ok(json!({
            "fell_back": "cold",
            "reason": why,
            "source_stop": stopped,
            "copies": copies,
        }))
    }
}

#[async_trait::async_trait]
impl Migrator for MigrateVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let vm = vm_of(cx, &self.vm)?;
        let svc = cx.svc();
        // A cold fallback that got as far as booting the target is done.
        if cx
            .target
            .vm_status(svc, &vm.name)
            .await?
            .is_some_and(|s| s.state == VmState::Running && s.detail.as_deref() == Some("running"))
        {
            return Ok(json!({ "fell_back": "cold", "reason": "found done after a restart" }));
        }
        let moves = &cx.spec()?.vm_moves;
        let limits = LiveLimits {
            downtime_limit: moves.downtime_limit,
            timeout: moves.timeout,
            max_bytes_per_sec: moves.max_mib_per_sec.map(|r| (r * 1024.0 * 1024.0) as u64),
        };
        let incoming = receive(cx, &vm).await?;
        match cx
            .source
            .migrate_vm(svc, &vm.name, &incoming, &limits)
            .await
        {
            Ok(report) => {
                observe(cx, &report);
                let mut out = serde_json::to_value(&report).unwrap_or(Value::Null);
                out["tls"] = json!(incoming.key.is_some());
                out["bytes_sent"] = json!(report.memory_bytes + report.disk_bytes);
                out["verified"] = json!(
                    "QEMU completed the migration with every disk mirror in step; the mirrors drained with the guest paused (no separate comparison)"
                );
                let path = report_path(cx, &vm.name);
                crate::sys::fs::write_atomic(&path, out.to_string().as_bytes())
                    .map_err(|e| MigratorError::file("write", &path, e))?;
                Ok(out)
            }
            Err(ProviderError::MigrationFailed {
                reason,
                timed_out: true,
                ..
            }) if moves.fallback == LiveFallback::Cold => {
                self.fall_back(cx, &vm, format!("the live migration {reason}"))
                    .await
            }
            Err(e) => {
                if let Some(m) = &cx.metrics {
                    m.vm_migrations.with_label_values(&["failed"]).inc();
                }
                Err(e.into())
            }
        }
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let vm = vm_of(cx, &self.vm)?;
        let svc = cx.svc();
        // Never both: the target's guest (booted by a fallback, or still paused) ends first.
        cx.target.stop_vm(svc, &vm.name, kill(cx)).await?;
        match cx.source.vm_status(svc, &vm.name).await? {
            Some(s) if s.state != VmState::Stopped => cx.source.resume_vm(svc, &vm.name).await?,
            _ => {
                let op = cx.source.start_vm(svc, &vm).await?;
                providers::wait_for(cx.source.as_ref(), &op.id, OPERATION).await?;
            }
        }
        Ok(())
    }
}

fn observe(cx: &Cx, report: &MigrationReport) {
    let Some(m) = &cx.metrics else {
        return;
    };
    m.vm_migrations.with_label_values(&["completed"]).inc();
    m.vm_migration_passes.observe(report.passes as f64);
    m.vm_migration_dirty_rate
        .with_label_values(&[cx.svc()])
        .set(report.dirty_pages_rate as f64);
    m.vm_migration_bytes
        .with_label_values(&["memory"])
        .inc_by(report.memory_bytes);
    m.vm_migration_bytes
        .with_label_values(&["disk"])
        .inc_by(report.disk_bytes);
}

pub struct ResumeTargetVm {
    pub vm: String,
}

#[async_trait::async_trait]
impl Migrator for ResumeTargetVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let svc = cx.svc();
        let status = cx.target.vm_status(svc, &self.vm).await?;
        if status.is_some_and(|s| s.detail.as_deref() == Some("running")) {
            return Ok(json!({ "resumed": "already running" }));
        }
        let started = Instant::now();
        cx.target.resume_vm(svc, &self.vm).await?;
        let resume_ms = started.elapsed().as_millis() as u64;
        // The guest's pause: the migration's last pass and drain, then this resume.
        let paused_ms = std::fs::read(report_path(cx, &self.vm))
            .ok()
            .and_then(|b| serde_json::from_slice::<MigrationReport>(&b).ok())
            .map(|r| r.paused_ms);
        let downtime_ms = paused_ms.map(|p| p + resume_ms);
        if let (Some(m), Some(ms)) = (&cx.metrics, downtime_ms) {
            m.vm_migration_downtime.observe(ms as f64 / 1000.0);
        }
        Ok(json!({ "resume_ms": resume_ms, "downtime_ms": downtime_ms }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        cx.target.stop_vm(cx.svc(), &self.vm, kill(cx)).await?;
        Ok(())
    }
}

pub struct ReleaseSourceVm {
    pub vm: String,
}

#[async_trait::async_trait]
impl Migrator for ReleaseSourceVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let options = StopOptions {
            timeout: cx.config.conduit.stop_timeout,
            kill_after_timeout: cx.config.conduit.kill_after_stop_timeout,
        };
        let outcome = cx.source.stop_vm(cx.svc(), &self.vm, options).await?;
        Ok(json!({ "outcome": outcome }))
    }

    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}
