//! Pre-copy of a running VM's disks through QMP ([`crate::providers::precopy`] has the
//! sequence):
//!
//! - tracking: a dirty bitmap `fc-pc<n>` on every disk's node; a pass after the first adds
//!   `fc-pc<n+1>` and freezes `fc-pc<n>` in one `transaction`, so no write falls between
//!   the two;
//! - reading: `nbd-server-start` on `nbd.sock` in the VM's directory and a read-only
//!   `block-export-add` per disk and pass, `fc-pc-disk<i>-<pass>` carrying the frozen bitmap
//!   (`fc-pc-disk<i>-final<n>` for the last pass, so asking again finds it);
//! - halting: `set-action` `shutdown: pause` keeps the emulator when the guest powers down,
//!   so the last bitmap can still be read; `system_reset` and `cont` boot it again when the
//!   relocation rolls back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{exports, node_of, says, text, QemuProvider, Qmp};
use crate::providers::{
    object, DiskExport, DiskPass, DiskPassKind, Halt, ProviderError, SocketAddress,
};

/// Dirty bitmaps are `<prefix><n>`.
const BITMAP: &str = "fc-pc";
/// Exports are `<prefix><i>-<pass>` and `<prefix><i>-final<n>`.
const EXPORT: &str = "fc-pc-disk";
/// How often a halting guest is looked at.
const POLL: Duration = Duration::from_millis(100);
/// How often the power button is pressed again while the guest does not react.
const PRESS_AGAIN: Duration = Duration::from_secs(5);
/// How long deleted exports get to let go of their bitmaps.
const LET_GO: Duration = Duration::from_secs(10);
/// How long a rollback waits for a guest whose power button was pressed to finish powering
/// down before it pauses it (and then boots it again).
const FINISH_HALT: Duration = Duration::from_secs(60);
/// Written in the VM's directory before the power button is first pressed for a halt: once
/// pressed, a guest shuts down whatever happens to the call that pressed it, so a rollback
/// must see that a halt began even when the guest still runs.
const HALTING: &str = "precopy-halting";

/// One disk as QEMU holds it.
struct Disk {
    volume: String,
    node: String,
    size: u64,
    /// The numbers of its `fc-pc<n>` bitmaps, with whether each still records.
    bitmaps: Vec<(u32, bool)>,
}

impl Disk {
    fn newest(&self) -> Option<(u32, bool)> {
        self.bitmaps.iter().copied().max_by_key(|(n, _)| *n)
    }
}

fn bitmap(n: u32) -> String {
    format!("{BITMAP}{n}")
}

impl QemuProvider {
    /// The VM's disks in its disk order, with their nodes and pre-copy bitmaps.
    async fn precopy_disks(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<Vec<Disk>, ProviderError> {
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let spec = self
            .read_state(service, vm)?
            .ok_or_else(|| ProviderError::NotFound {
                provider: self.name.clone(),
                object: object::vm(service, vm),
            })?
            .spec;
        let blocks = qmp
            .execute("query-block", None)
            .await
            .map_err(failed("list its block devices"))?;
        let mut disks = Vec::new();
        for (i, volume) in spec.disks().enumerate() {
            let device = format!("disk{i}");
            let node = node_of(qmp, &device)
                .await
                .map_err(failed("find its disk's block node"))?;
            let block = blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["device"] == json!(device));
            let size = block
                .and_then(|b| b["inserted"]["image"]["virtual-size"].as_u64())
                .unwrap_or(0);
            let bitmaps = block
                .and_then(|b| b["inserted"]["dirty-bitmaps"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|m| {
                    let n = text(m, "name").strip_prefix(BITMAP)?.parse().ok()?;
                    Some((n, m["recording"] != json!(false)))
                })
                .collect();
            disks.push(Disk {
                volume: volume.to_string(),
                node,
                size,
                bitmaps,
            });
        }
        Ok(disks)
    }

    /// Deletes the pre-copy exports in `ids` and waits until QEMU let go of them.
    async fn drop_exports(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
        ids: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        for id in ids {
            if let Err(e) = qmp
                .execute(
                    "block-export-del",
                    Some(json!({ "id": id, "mode": "hard" })),
                )
                .await
            {
                if !says(&e, "not found") {
                    return Err(failed("remove a pre-copy export")(e));
                }
            }
        }
        let deadline = Instant::now() + LET_GO;
        loop {
            let left = exports(qmp).await.map_err(failed("list its NBD exports"))?;
            if left.is_disjoint(ids) || Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn precopy_exports(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<BTreeSet<String>, ProviderError> {
        let all =
            exports(qmp)
                .await
                .map_err(self.qmp_failed(service, vm, "list its NBD exports"))?;
        Ok(all
            .into_iter()
            .filter(|id| id.starts_with(EXPORT))
            .collect())
    }

    async fn export(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
        id: &str,
        disk: &Disk,
        bitmap: Option<&str>,
    ) -> Result<(), ProviderError> {
        let mut args = json!({ "type": "nbd", "id": id, "node-name": disk.node, "name": id, "writable": false });
        if let Some(b) = bitmap {
            args["bitmaps"] = json!([b]);
        }
        qmp.execute("block-export-add", Some(args))
            .await
            .map_err(self.qmp_failed(service, vm, "export its disk over NBD"))?;
        Ok(())
    }

    pub(in crate::providers::qemu) async fn track(
        &self,
        service: &str,
        vm: &str,
        kind: DiskPassKind,
    ) -> Result<DiskPass, ProviderError> {
        let mut qmp = self.live_qmp(service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let status = self.run_state(&mut qmp, service, vm).await?;
        let halted = matches!(status.as_str(), "shutdown" | "paused");
        match kind {
            DiskPassKind::Final if !halted => {
                return Err(self.conflict(
                    service,
                    vm,
                    format!("its guest still runs (status `{status}`): the last pass of a pre-copy reads a halted guest's disks"),
                ))
            }
            DiskPassKind::Full | DiskPassKind::Dirty if status != "running" => {
                return Err(self.conflict(
                    service,
                    vm,
                    format!("its guest does not run (status `{status}`): a pre-copy pass reads a running guest's disks"),
                ))
            }
            DiskPassKind::Full => {
                // A pre-copy starts with its guest running: no halt has begun.
                let _ = std::fs::remove_file(self.vm_dir(service, vm).join(HALTING));
            }
            _ => {}
        }
        if kind == DiskPassKind::Full {
            self.untrack_with(&mut qmp, service, vm).await?;
        }
        let disks = self.precopy_disks(&mut qmp, service, vm).await?;
        let have = self.precopy_exports(&mut qmp, service, vm).await?;
        let dir = self.vm_dir(service, vm);
        let nbd = SocketAddress::Unix {
            path: dir.join(super::NBD_SOCKET).to_string_lossy().into_owned(),
        };
        if let Err(e) = qmp
            .execute(
                "nbd-server-start",
                Some(json!({ "addr": super::legacy(&nbd) })),
            )
            .await
        {
            if !says(&e, "already running") {
                return Err(failed("start its NBD server")(e));
            }
        }
        let mut out = Vec::new();
        match kind {
            DiskPassKind::Full => {
                let actions: Vec<Value> = disks
                    .iter()
                    .map(|d| json!({ "type": "block-dirty-bitmap-add", "data": { "node": d.node, "name": bitmap(0) } }))
                    .collect();
                qmp.execute("transaction", Some(json!({ "actions": actions })))
                    .await
                    .map_err(failed("start tracking its disks' writes"))?;
                for (i, d) in disks.iter().enumerate() {
                    let id = format!("{EXPORT}{i}-0");
                    self.export(&mut qmp, service, vm, &id, d, None).await?;
                    out.push((d, id, None));
                }
            }
            DiskPassKind::Dirty => {
                let Some((n, _)) = disks.first().and_then(Disk::newest) else {
                    return Err(self.conflict(
                        service,
                        vm,
                        "no pre-copy of its disks is under way".into(),
                    ));
                };
                // A new bitmap takes over from the newest one, on every disk at once.
                let mut actions = Vec::new();
                for d in &disks {
                    if d.newest() != Some((n, true)) {
                        return Err(self.conflict(
                            service,
                            vm,
                            format!(
                                "the tracking of its disk `{}` is not where the pre-copy left it",
                                d.volume
                            ),
                        ));
                    }
                    actions.push(json!({ "type": "block-dirty-bitmap-add", "data": { "node": d.node, "name": bitmap(n + 1) } }));
                    actions.push(json!({ "type": "block-dirty-bitmap-disable", "data": { "node": d.node, "name": bitmap(n) } }));
                }
                qmp.execute("transaction", Some(json!({ "actions": actions })))
                    .await
                    .map_err(failed(
                        "hand the tracking of its disks' writes to a new bitmap",
                    ))?;
                self.drop_exports(&mut qmp, service, vm, &have).await?;
                for (i, d) in disks.iter().enumerate() {
                    for (old, _) in d.bitmaps.iter().filter(|(m, _)| *m < n) {
                        let _ = qmp
                            .execute(
                                "block-dirty-bitmap-remove",
                                Some(json!({ "node": d.node, "name": bitmap(*old) })),
                            )
                            .await;
                    }
                    let id = format!("{EXPORT}{i}-{}", n + 1);
                    let b = bitmap(n);
                    self.export(&mut qmp, service, vm, &id, d, Some(&b)).await?;
                    out.push((d, id, Some(b)));
                }
            }
            DiskPassKind::Final => {
                for (i, d) in disks.iter().enumerate() {
                    let prefix = format!("{EXPORT}{i}-final");
                    // The same answer as the first time this was asked.
                    if let Some(id) = have.iter().find(|id| id.starts_with(&prefix)) {
                        let b = id[prefix.len()..].parse::<u32>().ok().map(bitmap);
                        out.push((d, id.clone(), b));
                        continue;
                    }
                    let stale: BTreeSet<String> = have
                        .iter()
                        .filter(|id| id.starts_with(&format!("{EXPORT}{i}-")))
                        .cloned()
                        .collect();
                    self.drop_exports(&mut qmp, service, vm, &stale).await?;
                    match d.newest() {
                        Some((n, recording)) => {
                            if recording {
                                qmp.execute(
                                    "block-dirty-bitmap-disable",
                                    Some(json!({ "node": d.node, "name": bitmap(n) })),
                                )
                                .await
                                .map_err(failed("freeze the tracking of its disk's writes"))?;
                            }
                            let id = format!("{prefix}{n}");
                            let b = bitmap(n);
                            self.export(&mut qmp, service, vm, &id, d, Some(&b)).await?;
                            out.push((d, id, Some(b)));
                        }
                        // Nothing tracked the writes (the emulator was restarted): the
                        // whole disk is read.
                        None => {
                            self.export(&mut qmp, service, vm, &prefix, d, None).await?;
                            out.push((d, prefix, None));
                        }
                    }
                }
            }
        }
        Ok(DiskPass {
            nbd,
            disks: out
                .into_iter()
                .map(|(d, export, bitmap)| DiskExport {
                    volume: d.volume.clone(),
                    export,
                    size: d.size,
                    bitmap,
                })
                .collect(),
        })
    }

    pub(in crate::providers::qemu) async fn halt(
        &self,
        service: &str,
        vm: &str,
        timeout: Duration,
    ) -> Result<Halt, ProviderError> {
        let mut qmp = self.live_qmp(service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let started = Instant::now();
        let mut pressed: Option<Instant> = None;
        loop {
            match self.run_state(&mut qmp, service, vm).await?.as_str() {
                "shutdown" => return Ok(Halt::PoweredDown),
                "paused" => return Ok(Halt::Paused),
                "running" => {}
                other => {
                    return Err(self.conflict(
                        service,
                        vm,
                        format!("its guest cannot be halted from status `{other}`"),
                    ))
                }
            }
            if started.elapsed() >= timeout {
                tracing::warn!(provider = %self.name, "{} did not power down within {timeout:?}; pausing it for the last pass.", object::vm(service, vm));
                qmp.execute("stop", None)
                    .await
                    .map_err(failed("pause its guest"))?;
                continue;
            }
            // The button is pressed again every few seconds: a guest still booting misses
            // a press, as a real machine would.
            if pressed.is_none_or(|at| at.elapsed() >= PRESS_AGAIN) {
                let marker = self.vm_dir(service, vm).join(HALTING);
                std::fs::write(&marker, b"").map_err(|e| ProviderError::Io {
                    provider: self.name.clone(),
                    object: object::vm(service, vm),
                    action: format!("note that its halt began in {}", marker.display()),
                    source: e,
                })?;
                qmp.execute("set-action", Some(json!({ "shutdown": "pause" })))
                    .await
                    .map_err(failed("keep its emulator when the guest powers down"))?;
                qmp.execute("system_powerdown", None)
                    .await
                    .map_err(failed("press the power button"))?;
                pressed = Some(Instant::now());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub(in crate::providers::qemu) async fn untrack(
        &self,
        service: &str,
        vm: &str,
    ) -> Result<(), ProviderError> {
        let mut qmp = self.live_qmp(service, vm).await?;
        self.untrack_with(&mut qmp, service, vm).await
    }

    /// [`Self::untrack`] on a QMP connection already open (QEMU serves one at a time).
    async fn untrack_with(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<(), ProviderError> {
        let have = self.precopy_exports(qmp, service, vm).await?;
        self.drop_exports(qmp, service, vm, &have).await?;
        for d in self.precopy_disks(qmp, service, vm).await? {
            for (n, _) in d.bitmaps {
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({ "node": d.node, "name": bitmap(n) })),
                )
                .await
                .map_err(self.qmp_failed(
                    service,
                    vm,
                    "stop tracking its disk's writes",
                ))?;
            }
        }
        if exports(qmp)
            .await
            .map_err(self.qmp_failed(service, vm, "list its NBD exports"))?
            .is_empty()
        {
            if let Err(e) = qmp.execute("nbd-server-stop", None).await {
                if !says(&e, "not running") {
                    return Err(self.qmp_failed(service, vm, "stop its NBD server")(e));
                }
            }
        }
        Ok(())
    }

    /// Boots again a guest halted for the last pass of a pre-copy that was rolled back;
    /// `false` when the VM was not halted so.
    pub(in crate::providers::qemu) async fn wake(
        &self,
        service: &str,
        vm: &str,
    ) -> Result<bool, ProviderError> {
        let marker = self.vm_dir(service, vm).join(HALTING);
        let Ok(mut qmp) = self.live_qmp(service, vm).await else {
            return Ok(false);
        };
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let mut status = self.run_state(&mut qmp, service, vm).await?;
        if status == "running" && marker.exists() {
            // Its power button was pressed and its guest may be shutting down still: let the
            // halt finish (QEMU serves one QMP client at a time), then boot it again.
            drop(qmp);
            self.halt(service, vm, FINISH_HALT).await?;
            qmp = self.live_qmp(service, vm).await?;
            status = self.run_state(&mut qmp, service, vm).await?;
        }
        let tracked = self
            .precopy_disks(&mut qmp, service, vm)
            .await?
            .iter()
            .any(|d| !d.bitmaps.is_empty());
        match status.as_str() {
            "shutdown" => {}
            "paused" if tracked => {}
            _ => return Ok(false),
        }
        self.untrack_with(&mut qmp, service, vm).await?;
        qmp.execute("set-action", Some(json!({ "shutdown": "poweroff" })))
            .await
            .map_err(failed("restore its power-off action"))?;
        if status == "shutdown" {
            qmp.execute("system_reset", None)
                .await
                .map_err(failed("reset it"))?;
        }
        qmp.execute("cont", None)
            .await
            .map_err(failed("let its guest run"))?;
        if let Err(e) = std::fs::remove_file(&marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(provider = %self.name, "Cannot remove {}: {e}.", marker.display());
            }
        }
        Ok(true)
    }
}
