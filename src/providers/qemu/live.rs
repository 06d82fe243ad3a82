//! Live migration between two emulators of this driver (the sequence is in
//! [`crate::providers::live`]), through QMP:
//!
//! - target: started with `-incoming defer -S`; `nbd-server-start` on `nbd.sock` in the VM's
//!   directory, `block-export-add` (writable) of every disk as `disk<i>`, and
//!   `migrate-incoming` on `migrate.sock`;
//! - source: `blockdev-add` of an NBD client node per disk, `blockdev-mirror` (`sync: full`)
//!   into it, then `migrate` with `downtime-limit`, `max-bandwidth` and auto-converge;
//!   once the migration completes the mirrors are cancelled, which in their ready state
//!   drains them (the target then holds the disk as the paused guest left it), and the
//!   client nodes are deleted;
//! - target: the exports and the NBD server go, and `cont` lets the guest run.
//!
//! Between hosts ([`Reception::Network`]) the target's NBD server and migration listen on
//! TCP on the address it is given (ports picked once and kept in `incoming.json` in the
//! VM's directory), and both emulators get a `tls-creds-psk` object named `fc-live-tls`
//! whose directory (`live-tls/`, 0700) holds the relocation's key in `keys.psk` (0600):
//! the server end at the target, the client end at the source. The NBD server, the NBD
//! client nodes and the migration (`tls-creds` parameter, both sides) all use it, so
//! neither a plain NBD client nor a plain migration stream gets in. The object and the
//! key file go once the mirrors are drained (source) and the guest is resumed (target), or
//! with the VM's directory when it is removed.
//!
//! Every step first looks at what QEMU already has (jobs, nodes, exports, migration
//! status), so running one again after a crash goes on from where the last one stopped.

mod precopy;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{QemuProvider, Qmp, QmpError, MIGRATION_SOCKET, NBD_SOCKET};
use crate::providers::{
    object, IncomingVm, LiveKey, LiveLimits, MigrationReport, MirrorReport, ProviderError,
    Reception, SocketAddress, VmSpec,
};

/// The source's NBD client node and mirror job of disk `i` are both named `<prefix><i>`.
const MIRROR: &str = "fc-mirror-disk";
/// The target's export of disk `i` has the id `<prefix><i>` (and the name `disk<i>`).
const EXPORT: &str = "fc-in-disk";
/// How often a migration or a mirror is looked at.
const POLL: Duration = Duration::from_millis(50);
/// How long cancelled mirrors and migrations get to wind down.
const WIND_DOWN: Duration = Duration::from_secs(60);
/// `max-bandwidth` for a migration without a limit (QEMU's default is 128 MiB/s).
const UNLIMITED: u64 = 1 << 40;
/// The id of the TLS credentials object of a migration between hosts.
const CREDS: &str = "fc-live-tls";
/// The directory (in the VM's) holding the key file of [`CREDS`].
const TLS_DIR: &str = "live-tls";
/// The user name the key is filed under (QEMU's default for a PSK client is `qemu`).
const PSK_USER: &str = "fluidcloud";
/// Where the target keeps the TCP addresses it listens on, for a call made again.
const INCOMING_FILE: &str = "incoming.json";

/// The QMP `RunState`s of a VM whose guest does not run because of a migration.
pub(super) fn migration_paused(status: &str) -> bool {
    matches!(status, "inmigrate" | "postmigrate" | "finish-migrate")
}

impl QemuProvider {
    fn qmp_failed(
        &self,
        service: &str,
        vm: &str,
        action: &str,
    ) -> impl Fn(QmpError) -> ProviderError {
        let (provider, object, action) = (
            self.name.clone(),
            object::vm(service, vm),
            action.to_string(),
        );
        move |e| ProviderError::Remote {
            provider: provider.clone(),
            object: object.clone(),
            action: action.clone(),
            detail: e.to_string(),
        }
    }

    fn conflict(&self, service: &str, vm: &str, detail: String) -> ProviderError {
        ProviderError::Conflict {
            provider: self.name.clone(),
            object: object::vm(service, vm),
            detail,
        }
    }

    /// Connects to a running VM's QMP socket; a VM that does not run is an error.
    async fn live_qmp(&self, service: &str, vm: &str) -> Result<Qmp, ProviderError> {
        self.check(service, vm)?;
        if self.running(service, vm).is_none() {
            return Err(ProviderError::NotFound {
                provider: self.name.clone(),
                object: format!("{} (it does not run)", object::vm(service, vm)),
            });
        }
        self.qmp(service, vm).await
    }

    /// `query-status`'s `status`.
    async fn run_state(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<String, ProviderError> {
        let v = qmp
            .execute("query-status", None)
            .await
            .map_err(self.qmp_failed(service, vm, "query its status"))?;
        Ok(text(&v, "status"))
    }

    pub(super) async fn receive(
        &self,
        service: &str,
        spec: &VmSpec,
        how: &Reception,
    ) -> Result<IncomingVm, ProviderError> {
        let vm = spec.name.as_str();
        self.check(service, vm)?;
        spec.validate()
            .map_err(|r| self.invalid(object::vm(service, vm), r))?;
        let dir = self.vm_dir(service, vm);
        {
            let lock = self.vm_lock(service, vm);
            let _guard = lock.lock().await;
            if self.running(service, vm).is_none() {
                self.forget_process(service, vm);
                self.launch(service, spec, true).await?;
                // Addresses kept by an emulator that is gone are free for anyone now.
                remove_if_there(&dir.join(INCOMING_FILE))
                    .map_err(|e| self.file_failed(service, vm, "remove its old addresses", e))?;
            }
        }
        let mut qmp = self.live_qmp(service, vm).await?;
        let status = self.run_state(&mut qmp, service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let have = exports(&mut qmp)
            .await
            .map_err(failed("list its NBD exports"))?;
        // One whose migration came in and that has not been resumed is still this one.
        let received = status == "paused" && have.iter().any(|id| id.starts_with(EXPORT));
        if status != "inmigrate" && !received {
            return Err(self.conflict(
                service,
                vm,
                format!("it runs already (status `{status}`); only a VM started to wait for a live migration takes one"),
            ));
        }
        let (nbd, migration) = match how {
            Reception::Local => (
                SocketAddress::Unix {
                    path: dir.join(NBD_SOCKET).to_string_lossy().into_owned(),
                },
                SocketAddress::Unix {
                    path: dir.join(MIGRATION_SOCKET).to_string_lossy().into_owned(),
                },
            ),
            Reception::Network { host, key } => {
                if !received {
                    self.add_creds(&mut qmp, service, vm, key, "server").await?;
                }
                self.tcp_addresses(service, vm, &dir, host)?
            }
        };
        let tls = matches!(how, Reception::Network { .. });
        if have.is_empty() {
            let mut args = json!({ "addr": legacy(&nbd) });
            if tls {
                args["tls-creds"] = json!(CREDS);
            }
            let started = qmp.execute("nbd-server-start", Some(args)).await;
            if let Err(e) = started {
                if !says(&e, "already running") {
                    return Err(failed("start its NBD server")(e));
                }
            }
        }
        let mut names = Vec::new();
        for (i, _) in spec.disks().enumerate() {
            let id = format!("{EXPORT}{i}");
            let name = format!("disk{i}");
            if !have.contains(&id) {
                let node = node_of(&mut qmp, &name)
                    .await
                    .map_err(failed("find its disk's block node"))?;
                qmp.execute(
                    "block-export-add",
                    Some(json!({ "type": "nbd", "id": id, "node-name": node, "name": name, "writable": true })),
                )
                .await
                .map_err(failed("export its disk over NBD"))?;
            }
            names.push(name);
        }
        if tls && !received {
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "tls-creds": CREDS })),
            )
            .await
            .map_err(failed("require TLS of its incoming migration"))?;
        }
        let listening = match received {
            true => Ok(Value::Null),
            false => {
                qmp.execute(
                    "migrate-incoming",
                    Some(json!({ "uri": migration.to_uri() })),
                )
                .await
            }
        };
        if let Err(e) = listening {
            if !says(&e, "already been started") {
                return Err(failed("listen for the migration")(e));
            }
        }
        Ok(IncomingVm {
            migration,
            nbd,
            exports: names,
            key: None,
        })
    }

    fn file_failed(
        &self,
        service: &str,
        vm: &str,
        action: &str,
        e: std::io::Error,
    ) -> ProviderError {
        ProviderError::Io {
            provider: self.name.clone(),
            object: object::vm(service, vm),
            action: action.to_string(),
            source: e,
        }
    }

    /// The TCP addresses (NBD, migration) the target listens on at `host`: the ones picked
    /// by an earlier call, or two free ports now.
    fn tcp_addresses(
        &self,
        service: &str,
        vm: &str,
        dir: &Path,
        host: &str,
    ) -> Result<(SocketAddress, SocketAddress), ProviderError> {
        let path = dir.join(INCOMING_FILE);
        let kept = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<(SocketAddress, SocketAddress)>(&b).ok());
        if let Some((nbd, migration)) = kept {
            if matches!(&nbd, SocketAddress::Tcp { host: h, .. } if h == host) {
                return Ok((nbd, migration));
            }
        }
        let failed = |e| self.file_failed(service, vm, &format!("pick ports on {host}"), e);
        // Both held at once so that they differ; QEMU binds them right after.
        let a = std::net::TcpListener::bind((host, 0)).map_err(failed)?;
        let b = std::net::TcpListener::bind((host, 0)).map_err(failed)?;
        let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(failed);
        let tcp = |port| SocketAddress::Tcp {
            host: host.to_string(),
            port,
        };
        let picked = (tcp(port(&a)?), tcp(port(&b)?));
        drop((a, b));
        let bytes = serde_json::to_vec(&picked).unwrap_or_default();
        crate::sys::fs::write_atomic(&path, &bytes)
            .map_err(|e| self.file_failed(service, vm, "keep its addresses", e))?;
        Ok(picked)
    }

    /// Adds the TLS credentials of a migration between hosts (`endpoint` `server` at the
    /// target, `client` at the source), with `key` in a 0600 file only QEMU and the agent
    /// read. Succeeds when they are there already.
    async fn add_creds(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
        key: &LiveKey,
        endpoint: &str,
    ) -> Result<(), ProviderError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.vm_dir(service, vm).join(TLS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| self.file_failed(service, vm, "create its TLS directory", e))?;
        let line = format!("{PSK_USER}:{}\n", key.to_hex());
        crate::sys::fs::write_atomic(&dir.join("keys.psk"), line.as_bytes())
            .map_err(|e| self.file_failed(service, vm, "write its migration key", e))?;
        let mut args = json!({
            "qom-type": "tls-creds-psk",
            "id": CREDS,
            "endpoint": endpoint,
            "dir": dir.to_string_lossy(),
        });
        if endpoint == "client" {
            args["username"] = json!(PSK_USER);
        }
        match qmp.execute("object-add", Some(args)).await {
            Err(e) if !says(&e, "duplicate") => {
                Err(self.qmp_failed(service, vm, "add its TLS credentials")(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes what [`Self::add_creds`] added; nothing there is fine.
    async fn drop_creds(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<(), ProviderError> {
        let dir = self.vm_dir(service, vm).join(TLS_DIR);
        let had =
            named_objects(qmp)
                .await
                .map_err(self.qmp_failed(service, vm, "list its objects"))?;
        if had.contains(CREDS) {
            qmp.execute("migrate-set-parameters", Some(json!({ "tls-creds": "" })))
                .await
                .map_err(self.qmp_failed(service, vm, "stop requiring TLS of its migration"))?;
            qmp.execute("object-del", Some(json!({ "id": CREDS })))
                .await
                .map_err(self.qmp_failed(service, vm, "remove its TLS credentials"))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(self.file_failed(service, vm, "remove its migration key", e))
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn mirror(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
    ) -> Result<MirrorReport, ProviderError> {
        let started = Instant::now();
        let mut qmp = self.live_qmp(service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let running = jobs(&mut qmp)
            .await
            .map_err(failed("list its block jobs"))?;
        let nodes = named_nodes(&mut qmp)
            .await
            .map_err(failed("list its block nodes"))?;
        let tls = self.outgoing_tls(&mut qmp, service, vm, to).await?;
        for (i, export) in to.exports.iter().enumerate() {
            let id = format!("{MIRROR}{i}");
            if running.iter().any(|j| job_id(j) == id) {
                continue;
            }
            if !nodes.contains(&id) {
                let mut args = json!({ "driver": "nbd", "node-name": id, "server": to.nbd.to_qmp(), "export": export });
                if tls {
                    args["tls-creds"] = json!(CREDS);
                }
                qmp.execute("blockdev-add", Some(args))
                    .await
                    .map_err(failed("connect to the target's disk export"))?;
            }
            let node = node_of(&mut qmp, &format!("disk{i}"))
                .await
                .map_err(failed("find its disk's block node"))?;
            qmp.execute(
                "blockdev-mirror",
                Some(json!({ "job-id": id, "device": node, "target": id, "sync": "full", "auto-dismiss": false })),
            )
            .await
            .map_err(failed("start mirroring its disk"))?;
        }
        loop {
            let jobs = jobs(&mut qmp)
                .await
                .map_err(failed("list its block jobs"))?;
            let mine: Vec<&Value> = jobs
                .iter()
                .filter(|j| job_id(j).starts_with(MIRROR))
                .collect();
            if let Some(j) = mine.iter().find(|j| text(j, "status") == "concluded") {
                let detail = job_error(&mut qmp, &job_id(j)).await;
                return Err(self.migration_failed(
                    service,
                    vm,
                    format!("could not mirror its disk: {detail}"),
                    false,
                ));
            }
            if mine.len() == to.exports.len() && mine.iter().all(|j| j["ready"] == json!(true)) {
                return Ok(MirrorReport {
                    disk_bytes: mine.iter().map(|j| j["len"].as_u64().unwrap_or(0)).sum(),
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether the streams to `to` need TLS (it is on another host); adds the client's
    /// credentials when they do. A TCP address without a key is refused: nothing of a guest
    /// crosses the network in clear text.
    async fn outgoing_tls(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
        to: &IncomingVm,
    ) -> Result<bool, ProviderError> {
        let tcp = [&to.nbd, &to.migration]
            .iter()
            .any(|a| matches!(a, SocketAddress::Tcp { .. }));
        match (&to.key, tcp) {
            (_, false) => Ok(false),
            (Some(key), true) => {
                self.add_creds(qmp, service, vm, key, "client").await?;
                Ok(true)
            }
            (None, true) => Err(self.invalid(
                object::vm(service, vm),
                "a live migration to another host needs its key: its disks and memory never cross the network in clear text",
            )),
        }
    }

    fn migration_failed(
        &self,
        service: &str,
        vm: &str,
        reason: String,
        timed_out: bool,
    ) -> ProviderError {
        ProviderError::MigrationFailed {
            provider: self.name.clone(),
            object: object::vm(service, vm),
            reason,
            timed_out,
        }
    }

    pub(super) async fn migrate(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
        limits: &LiveLimits,
    ) -> Result<MigrationReport, ProviderError> {
        let mut qmp = self.live_qmp(service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let started = Instant::now();
        let mut status = text(
            &qmp.execute("query-migrate", None)
                .await
                .map_err(failed("query its migration"))?,
            "status",
        );
        if !matches!(status.as_str(), "completed") && !active(&status) {
            // Memory must never travel ahead of the disks: the guest would go on at the
            // target on disks that miss what the mirrors had not copied.
            let all = jobs(&mut qmp)
                .await
                .map_err(failed("list its block jobs"))?;
            let ready = all
                .iter()
                .filter(|j| job_id(j).starts_with(MIRROR) && j["ready"] == json!(true))
                .count();
            if ready != to.exports.len() {
                return Err(self.migration_failed(
                    service,
                    vm,
                    format!(
                        "was not started: {ready} of its {} disks are mirrored and in step",
                        to.exports.len()
                    ),
                    false,
                ));
            }
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] })),
            )
            .await
            .map_err(failed("set its migration capabilities"))?;
            let tls = self.outgoing_tls(&mut qmp, service, vm, to).await?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({
                    "downtime-limit": limits.downtime_limit.as_millis() as u64,
                    "max-bandwidth": limits.max_bytes_per_sec.unwrap_or(UNLIMITED),
                    "tls-creds": if tls { CREDS } else { "" },
                })),
            )
            .await
            .map_err(failed("set its migration parameters"))?;
            qmp.execute("migrate", Some(json!({ "uri": to.migration.to_uri() })))
                .await
                .map_err(failed("start its migration"))?;
        }
        let mut paused_at: Option<Instant> = None;
        let last = loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(failed("query its migration"))?;
            status = text(&info, "status");
            match status.as_str() {
                "completed" => break info,
                "failed" | "cancelled" => {
                    self.ensure_running(&mut qmp, service, vm).await?;
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("ended without saying why");
                    return Err(self.migration_failed(
                        service,
                        vm,
                        format!("{status}: {why}"),
                        false,
                    ));
                }
                "device" | "pre-switchover" if paused_at.is_none() => {
                    paused_at = Some(Instant::now())
                }
                _ => {}
            }
            if started.elapsed() >= limits.timeout {
                qmp.execute("migrate_cancel", None)
                    .await
                    .map_err(failed("cancel its migration"))?;
                let ended = self.wind_down_migration(&mut qmp, service, vm).await?;
                if ended["status"] == json!("completed") {
                    break ended;
                }
                self.ensure_running(&mut qmp, service, vm).await?;
                let ram = &ended["ram"];
                return Err(self.migration_failed(
                    service,
                    vm,
                    format!(
                        "did not converge within {:?} ({} bytes of memory left, {} pages dirtied per second, {} passes)",
                        limits.timeout,
                        number(ram, "remaining"),
                        number(ram, "dirty-pages-rate"),
                        number(ram, "dirty-sync-count"),
                    ),
                    true,
                ));
            }
            tokio::time::sleep(POLL).await;
        };
        let qemu_downtime_ms = number(&last, "downtime");
        let paused_at =
            paused_at.unwrap_or_else(|| Instant::now() - Duration::from_millis(qemu_downtime_ms));
        let disk_bytes = self.drain_mirrors(&mut qmp, service, vm, false).await?;
        let ram = &last["ram"];
        Ok(MigrationReport {
            total_ms: number(&last, "total-time"),
            qemu_downtime_ms,
            paused_ms: paused_at.elapsed().as_millis() as u64,
            memory_bytes: number(ram, "transferred"),
            memory_total_bytes: number(ram, "total"),
            passes: number(ram, "dirty-sync-count"),
            dirty_pages_rate: number(ram, "dirty-pages-rate"),
            disk_bytes,
        })
    }

    /// Waits for a cancelled migration to end; returns the last `query-migrate`.
    async fn wind_down_migration(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<Value, ProviderError> {
        let deadline = Instant::now() + WIND_DOWN;
        loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(self.qmp_failed(service, vm, "query its migration"))?;
            if !active(&text(&info, "status")) || Instant::now() >= deadline {
                return Ok(info);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Lets a guest paused by a migration that did not happen run again.
    async fn ensure_running(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
    ) -> Result<(), ProviderError> {
        let status = self.run_state(qmp, service, vm).await?;
        if status != "running" {
            qmp.execute("cont", None).await.map_err(self.qmp_failed(
                service,
                vm,
                "let it run again",
            ))?;
        }
        Ok(())
    }

    /// Ends the mirror jobs and removes their NBD client nodes. In the ready state a
    /// cancel (without `force`) first copies what is still dirty, so after a completed
    /// migration the target holds the disk as the paused guest left it; `force` ends them
    /// at once. Returns the bytes the mirrors covered.
    async fn drain_mirrors(
        &self,
        qmp: &mut Qmp,
        service: &str,
        vm: &str,
        force: bool,
    ) -> Result<u64, ProviderError> {
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let mut covered = 0;
        let all = jobs(qmp).await.map_err(failed("list its block jobs"))?;
        for j in all.iter().filter(|j| job_id(j).starts_with(MIRROR)) {
            let id = job_id(j);
            covered += j["len"].as_u64().unwrap_or(0);
            if text(j, "status") != "concluded" {
                qmp.execute(
                    "block-job-cancel",
                    Some(json!({ "device": id, "force": force })),
                )
                .await
                .map_err(failed("end the mirror of its disk"))?;
            }
        }
        let deadline = Instant::now() + WIND_DOWN;
        let mut errors = Vec::new();
        loop {
            let all = jobs(qmp).await.map_err(failed("list its block jobs"))?;
            let left: Vec<&Value> = all
                .iter()
                .filter(|j| job_id(j).starts_with(MIRROR))
                .collect();
            let mut pending = false;
            for j in left {
                let id = job_id(j);
                if text(j, "status") == "concluded" {
                    let e = job_error(qmp, &id).await;
                    if !e.is_empty() && !force {
                        errors.push(format!("{id}: {e}"));
                    }
                    qmp.execute("job-dismiss", Some(json!({ "id": id })))
                        .await
                        .map_err(failed("dismiss the mirror of its disk"))?;
                } else {
                    pending = true;
                }
            }
            if !pending {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.migration_failed(
                    service,
                    vm,
                    format!("left its disk mirrors running {WIND_DOWN:?} after they were ended"),
                    false,
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        for node in named_nodes(qmp)
            .await
            .map_err(failed("list its block nodes"))?
        {
            if node.starts_with(MIRROR) {
                qmp.execute("blockdev-del", Some(json!({ "node-name": node })))
                    .await
                    .map_err(failed("remove the target's disk export from it"))?;
            }
        }
        self.drop_creds(qmp, service, vm).await?;
        if !errors.is_empty() {
            return Err(self.migration_failed(
                service,
                vm,
                format!("could not finish mirroring its disk: {}", errors.join("; ")),
                false,
            ));
        }
        Ok(covered)
    }

    pub(super) async fn cancel_mirrors(
        &self,
        service: &str,
        vm: &str,
    ) -> Result<(), ProviderError> {
        self.check(service, vm)?;
        if self.running(service, vm).is_none() {
            return Ok(());
        }
        let mut qmp = self.qmp(service, vm).await?;
        self.drain_mirrors(&mut qmp, service, vm, true)
            .await
            .map(|_| ())
    }

    pub(super) async fn resume(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        let mut qmp = self.live_qmp(service, vm).await?;
        let failed = |action: &str| self.qmp_failed(service, vm, action);
        let status = self.run_state(&mut qmp, service, vm).await?;
        match status.as_str() {
            "inmigrate" => {
                return Err(self.conflict(
                    service,
                    vm,
                    "it still waits for its incoming migration, so it has nothing to run".into(),
                ))
            }
            "running" | "paused" | "postmigrate" | "finish-migrate" => {}
            other => {
                return Err(self.conflict(
                    service,
                    vm,
                    format!("it cannot go on from status `{other}`"),
                ))
            }
        }
        // An outgoing migration that is still under way, and mirrors left from one.
        let info = qmp
            .execute("query-migrate", None)
            .await
            .map_err(failed("query its migration"))?;
        if active(&text(&info, "status")) {
            qmp.execute("migrate_cancel", None)
                .await
                .map_err(failed("cancel its migration"))?;
            self.wind_down_migration(&mut qmp, service, vm).await?;
        }
        self.drain_mirrors(&mut qmp, service, vm, true).await?;
        // What an incoming migration left: the exports and the NBD server.
        let have = exports(&mut qmp)
            .await
            .map_err(failed("list its NBD exports"))?;
        for id in have.iter().filter(|id| id.starts_with(EXPORT)) {
            qmp.execute("block-export-del", Some(json!({ "id": id })))
                .await
                .map_err(failed("remove its disk export"))?;
        }
        if let Err(e) = qmp.execute("nbd-server-stop", None).await {
            if !says(&e, "not running") {
                return Err(failed("stop its NBD server")(e));
            }
        }
        self.drop_creds(&mut qmp, service, vm).await?;
        remove_if_there(&self.vm_dir(service, vm).join(INCOMING_FILE))
            .map_err(|e| self.file_failed(service, vm, "remove its kept addresses", e))?;
        self.ensure_running(&mut qmp, service, vm).await
    }
}

/// `addr` as `nbd-server-start` takes it (QMP's older `SocketAddressLegacy`).
fn legacy(addr: &SocketAddress) -> Value {
    match addr {
        SocketAddress::Unix { path } => json!({ "type": "unix", "data": { "path": path } }),
        SocketAddress::Tcp { host, port } => {
            json!({ "type": "inet", "data": { "host": host, "port": port.to_string() } })
        }
    }
}

/// The id of a `query-block-jobs` entry (named `device` there, for older clients).
fn job_id(j: &Value) -> String {
    text(j, "device")
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A migration status that will still change on its own.
fn active(status: &str) -> bool {
    matches!(
        status,
        "setup"
            | "active"
            | "device"
            | "pre-switchover"
            | "wait-unplug"
            | "cancelling"
            | "postcopy-active"
    )
}

/// A QMP command error whose description contains `needle`.
fn says(e: &QmpError, needle: &str) -> bool {
    matches!(e, QmpError::Command { desc, .. } if desc.contains(needle))
}

/// The block node behind the `-drive` of `device`.
async fn node_of(qmp: &mut Qmp, device: &str) -> Result<String, QmpError> {
    let blocks = qmp.execute("query-block", None).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["device"] == json!(device))
        .and_then(|b| b["inserted"]["node-name"].as_str())
        .map(str::to_string)
        .ok_or_else(|| QmpError::Protocol(format!("no block device `{device}` with a medium")))
}

async fn jobs(qmp: &mut Qmp) -> Result<Vec<Value>, QmpError> {
    let v = qmp.execute("query-block-jobs", None).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The error a concluded job ended with; empty when it ended well.
async fn job_error(qmp: &mut Qmp, id: &str) -> String {
    let Ok(all) = qmp.execute("query-jobs", None).await else {
        return "its state could not be read".to_string();
    };
    all.as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] == json!(id))
        .map(|j| text(j, "error"))
        .unwrap_or_default()
}

async fn named_nodes(qmp: &mut Qmp) -> Result<BTreeSet<String>, QmpError> {
    let v = qmp
        .execute("query-named-block-nodes", Some(json!({ "flat": true })))
        .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .collect())
}

/// The ids of the user-created objects (`/objects/ID`).
async fn named_objects(qmp: &mut Qmp) -> Result<BTreeSet<String>, QmpError> {
    let v = qmp
        .execute("qom-list", Some(json!({ "path": "/objects" })))
        .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect())
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn exports(qmp: &mut Qmp) -> Result<BTreeSet<String>, QmpError> {
    let v = qmp.execute("query-block-exports", None).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect())
}
