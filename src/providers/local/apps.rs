//! Apps of the local driver: supervised processes, one directory each under
//! `apps/<service>/<app>/`.
//!
//! Each app has a slot shared by the API calls and one supervisor task. The supervisor waits
//! for the process to end and, while the app is wanted running, starts it again after a
//! backoff that doubles up to [`MAX_BACKOFF`] and resets once a run lasted [`STABLE_AFTER`].
//! A supervisor is tied to a generation of its slot, so one left over from before a stop and
//! start can never touch the new process.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{check_name, conflict, invalid, io_err, write_atomic};
use crate::providers::host::process::{self, ProcessId};
use crate::providers::{
    object, AppSpec, AppState, AppStatus, Endpoint, ProviderError, StopOptions, StopOutcome,
};
use crate::sys::retry::{BackoffBuilder, ExponentialBuilder};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Pauses before restarts: from [`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`].
const RESTARTS: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(FIRST_BACKOFF)
    .with_max_delay(MAX_BACKOFF)
    .without_max_times();
/// A run this long counts as healthy: the next crash restarts after the first backoff again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long a stop waits for the process to vanish after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
const STOP_POLL: Duration = Duration::from_millis(25);
/// Variables an app inherits from the daemon unless its spec sets them; nothing else leaks
/// (the daemon's environment may carry credentials).
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TZ"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Running,
    Stopped,
}

impl Desired {
    fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    id: ProcessId,
    since: Instant,
}

struct SlotState {
    spec: AppSpec,
    desired: Desired,
    run: Option<Run>,
    restarts: u32,
    adopted: bool,
    last_exit: Option<String>,
    last_error: Option<String>,
    /// Bumped whenever a new supervisor takes over.
    generation: u64,
    /// The provider was dropped: nothing may be started any more.
    closed: bool,
}

struct Slot {
    provider: String,
    service: String,
    name: String,
    dir: PathBuf,
    base_env: Arc<Vec<(OsString, OsString)>>,
    state: Mutex<SlotState>,
    /// Cuts a supervisor's backoff short when the app is stopped.
    wake: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn object(&self) -> String {
        object::app(&self.service, &self.name)
    }

    fn workdir(&self, spec: &AppSpec) -> PathBuf {
        spec.workdir.clone().unwrap_or_else(|| self.dir.clone())
    }

    /// Starts the process and records it. Runs with the state lock held, so that a stop or a
    /// dropped provider is either seen before or sees the new process.
    fn launch(&self, st: &mut SlotState) -> Result<ProcessId, String> {
        let workdir = self.workdir(&st.spec);
        if !workdir.is_dir() {
            return Err(format!(
                "its working directory {} does not exist",
                workdir.display()
            ));
        }
        let id = process::spawn(&st.spec, &self.dir, &workdir, &self.base_env).map_err(|e| {
            format!(
                "cannot start `{}` in {}: {e}",
                st.spec.command,
                workdir.display()
            )
        })?;
        st.run = Some(Run {
            id,
            since: Instant::now(),
        });
        if let Err(e) = write_atomic(&self.dir.join("pid"), id.to_pid_file().as_bytes()) {
            // The process runs and is supervised; only adoption after a daemon restart
            // would miss it, so say so loudly rather than kill a working app.
            tracing::error!(
                provider = %self.provider,
                "Could not write the pid file of {} (pid {}): {e}. It will not be re-adopted after a daemon restart.",
                self.object(),
                id.pid
            );
        }
        Ok(id)
    }

    fn write_desired(&self, desired: Desired) -> Result<(), ProviderError> {
        let path = self.dir.join("desired");
        write_atomic(&path, format!("{}\n", desired.as_str()).as_bytes()).map_err(|e| {
            io_err(
                &self.provider,
                self.object(),
                format!("write {}", path.display()),
                e,
            )
        })
    }

    /// Removes the pid file if it still names `id`.
    fn clear_pid_file(&self, id: ProcessId) {
        let path = self.dir.join("pid");
        let names_it = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| ProcessId::parse_pid_file(&t).ok())
            == Some(id);
        if names_it {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(provider = %self.provider, "Could not remove {}: {e}.", path.display());
            }
        }
    }

    fn status(&self) -> AppStatus {
        let st = self.lock();
        let running = st.run.filter(|r| r.id.is_running());
        let state = match (st.desired, running) {
            (Desired::Running, Some(_)) => AppState::Running,
            (Desired::Running, None) => AppState::Restarting,
            (Desired::Stopped, Some(_)) => AppState::Stopping,
            (Desired::Stopped, None) => AppState::Stopped,
        };
        AppStatus {
            service: self.service.clone(),
            name: self.name.clone(),
            state,
            pid: running.map(|r| r.id.pid),
            restarts: st.restarts,
            adopted: st.adopted,
            last_exit: st.last_exit.clone(),
            last_error: st.last_error.clone(),
            endpoint: st.spec.port.map(|port| Endpoint {
                host: "127.0.0.1".to_string(),
                port,
            }),
            spec: st.spec.clone(),
        }
    }
}

pub(super) struct Apps {
    provider: String,
    dir: PathBuf,
    runtime: Handle,
    base_env: Arc<Vec<(OsString, OsString)>>,
    slots: Mutex<BTreeMap<(String, String), Arc<Slot>>>,
}

impl Apps {
    /// Loads every app under `dir`, adopts the processes its pid files name when they are
    /// still the same processes, and supervises the apps wanted running.
    pub(super) fn load(
        provider: &str,
        dir: PathBuf,
        runtime: Handle,
    ) -> Result<Apps, ProviderError> {
        let base_env: Vec<(OsString, OsString)> = INHERITED_ENV
            .iter()
            .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
            .collect();
        let apps = Apps {
            provider: provider.to_string(),
            dir,
            runtime,
            base_env: Arc::new(base_env),
            slots: Mutex::new(BTreeMap::new()),
        };
        let services = std::fs::read_dir(&apps.dir).map_err(|e| {
            io_err(
                provider,
                "apps".to_string(),
                format!("list {}", apps.dir.display()),
                e,
            )
        })?;
        for service in services.flatten() {
            let Ok(names) = std::fs::read_dir(service.path()) else {
                continue;
            };
            let service = service.file_name().to_string_lossy().into_owned();
            for app in names.flatten() {
                let name = app.file_name().to_string_lossy().into_owned();
                if super::super::validate_name(&service).is_err()
                    || super::super::validate_name(&name).is_err()
                {
                    continue;
                }
                match apps.load_one(&service, &name, &app.path()) {
                    Ok(slot) => {
                        let mut slots = apps.slots_lock();
                        slots.insert((service.clone(), name.clone()), slot);
                    }
                    Err(e) => tracing::warn!(
                        provider = %provider,
                        "Skipping {}: {e}.",
                        object::app(&service, &name)
                    ),
                }
            }
        }
        Ok(apps)
    }

    fn load_one(&self, service: &str, name: &str, dir: &Path) -> Result<Arc<Slot>, String> {
        let spec_path = dir.join("spec.json");
        let bytes = std::fs::read(&spec_path)
            .map_err(|e| format!("cannot read {}: {e}", spec_path.display()))?;
        let spec: AppSpec = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is damaged: {e}", spec_path.display()))?;
        if spec.name != name {
            return Err(format!(
                "{} describes app `{}`, not `{name}`",
                spec_path.display(),
                spec.name
            ));
        }
        let desired = match std::fs::read_to_string(dir.join("desired"))
            .as_deref()
            .map(str::trim)
        {
            Ok("running") => Desired::Running,
            // A start that never recorded its wish did not succeed.
            _ => Desired::Stopped,
        };
        let pid_path = dir.join("pid");
        let run = match std::fs::read_to_string(&pid_path) {
            Err(_) => None,
            Ok(text) => match ProcessId::parse_pid_file(&text) {
                Ok(id) if id.is_running() => Some(Run {
                    id,
                    since: Instant::now(),
                }),
                Ok(id) => {
                    tracing::warn!(
                        provider = %self.provider,
                        "The pid file of {} names pid {} started at tick {}, which is no longer that process; not adopting it.",
                        object::app(service, name),
                        id.pid,
                        id.start_time
                    );
                    let _ = std::fs::remove_file(&pid_path);
                    None
                }
                Err(e) => {
                    tracing::warn!(
                        provider = %self.provider,
                        "Ignoring the damaged pid file {}: {e}.",
                        pid_path.display()
                    );
                    let _ = std::fs::remove_file(&pid_path);
                    None
                }
            },
        };
        let adopted = run.is_some();
        if let Some(r) = run {
            tracing::info!(
                provider = %self.provider,
                "Adopted {} (pid {}).",
                object::app(service, name),
                r.id.pid
            );
        }
        let slot = Arc::new(Slot {
            provider: self.provider.clone(),
            service: service.to_string(),
            name: name.to_string(),
            dir: dir.to_path_buf(),
            base_env: self.base_env.clone(),
            state: Mutex::new(SlotState {
                spec,
                desired,
                run,
                restarts: 0,
                adopted,
                last_exit: None,
                last_error: None,
                generation: 0,
                closed: false,
            }),
            wake: Notify::new(),
            task: Mutex::new(None),
        });
        if adopted || desired == Desired::Running {
            let mut st = slot.lock();
            self.supervise(&slot, &mut st);
        }
        Ok(slot)
    }

    fn slots_lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, service: &str, app: &str) -> Option<Arc<Slot>> {
        self.slots_lock()
            .get(&(service.to_string(), app.to_string()))
            .cloned()
    }

    /// Hands the slot to a new supervisor task; an earlier one stops at its next look.
    fn supervise(&self, slot: &Arc<Slot>, st: &mut SlotState) {
        st.generation += 1;
        let generation = st.generation;
        let handle = self.runtime.spawn(supervisor(slot.clone(), generation));
        let old = slot
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(handle);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Starts the app unless it runs with this very spec. Returns what happened.
    pub(super) fn start(&self, service: &str, spec: &AppSpec) -> Result<String, ProviderError> {
        let obj = || object::app(service, &spec.name);
        check_name(&self.provider, obj, "service name", service)?;
        spec.validate()
            .map_err(|e| invalid(&self.provider, obj(), e))?;
        let mut slots = self.slots_lock();
        let key = (service.to_string(), spec.name.clone());
        if let Some(slot) = slots.get(&key).cloned() {
            let mut st = slot.lock();
            let running = st.run.filter(|r| r.id.is_running());
            match (st.desired, running) {
                (Desired::Running, _) if st.spec == *spec => {
                    return Ok(match running {
                        Some(r) => format!("already running as pid {}", r.id.pid),
                        None => {
                            "already wanted running; its supervisor is restarting it".to_string()
                        }
                    });
                }
                (Desired::Running, _) => {
                    return Err(conflict(
                        &self.provider,
                        obj(),
                        "it runs with a different spec; stop it first",
                    ))
                }
                (Desired::Stopped, Some(r)) if st.spec == *spec => {
                    // A stop that timed out left it running: wanting it again keeps it.
                    slot.write_desired(Desired::Running)?;
                    st.desired = Desired::Running;
                    self.supervise(&slot, &mut st);
                    return Ok(format!(
                        "it was asked to stop but still runs as pid {}; kept running",
                        r.id.pid
                    ));
                }
                (Desired::Stopped, Some(r)) => {
                    return Err(conflict(
                        &self.provider,
                        obj(),
                        format!(
                            "it is still stopping (pid {}); wait for it or stop it with kill",
                            r.id.pid
                        ),
                    ))
                }
                (Desired::Stopped, None) => {}
            }
            if let Some(old) = st.run.take() {
                process::reap_if_zombie(old.id);
            }
            self.write_spec(&slot.dir, spec, obj)?;
            st.spec = spec.clone();
            slot.write_desired(Desired::Running)?;
            st.desired = Desired::Running;
            return match slot.launch(&mut st) {
                Ok(id) => {
                    st.last_error = None;
                    st.adopted = false;
                    self.supervise(&slot, &mut st);
                    Ok(format!("started as pid {}", id.pid))
                }
                Err(e) => {
                    st.desired = Desired::Stopped;
                    let _ = slot.write_desired(Desired::Stopped);
                    Err(invalid(&self.provider, obj(), e))
                }
            };
        }
        let dir = self.dir.join(service).join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| {
            io_err(
                &self.provider,
                obj(),
                format!("create {}", dir.display()),
                e,
            )
        })?;
        self.write_spec(&dir, spec, obj)?;
        let slot = Arc::new(Slot {
            provider: self.provider.clone(),
            service: service.to_string(),
            name: spec.name.clone(),
            dir,
            base_env: self.base_env.clone(),
            state: Mutex::new(SlotState {
                spec: spec.clone(),
                desired: Desired::Running,
                run: None,
                restarts: 0,
                adopted: false,
                last_exit: None,
                last_error: None,
                generation: 0,
                closed: false,
            }),
            wake: Notify::new(),
            task: Mutex::new(None),
        });
        slot.write_desired(Desired::Running)?;
        let mut st = slot.lock();
        match slot.launch(&mut st) {
            Ok(id) => {
                self.supervise(&slot, &mut st);
                drop(st);
                slots.insert(key, slot);
                Ok(format!("started as pid {}", id.pid))
            }
            Err(e) => {
                st.desired = Desired::Stopped;
                let _ = slot.write_desired(Desired::Stopped);
                drop(st);
                // Keep the slot: its spec is on disk and a later start may fix the cause.
                slots.insert(key, slot);
                Err(invalid(&self.provider, obj(), e))
            }
        }
    }

    fn write_spec(
        &self,
        dir: &Path,
        spec: &AppSpec,
        obj: impl Fn() -> String,
    ) -> Result<(), ProviderError> {
        let path = dir.join("spec.json");
        let bytes = serde_json::to_vec_pretty(spec).map_err(|e| {
            invalid(
                &self.provider,
                obj(),
                format!("cannot encode its spec: {e}"),
            )
        })?;
        write_atomic(&path, &bytes).map_err(|e| {
            io_err(
                &self.provider,
                obj(),
                format!("write {}", path.display()),
                e,
            )
        })
    }

    pub(super) async fn stop(
        &self,
        service: &str,
        app: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        let obj = || object::app(service, app);
        check_name(&self.provider, obj, "service name", service)?;
        check_name(&self.provider, obj, "app name", app)?;
        let Some(slot) = self.slot(service, app) else {
            return Ok(StopOutcome::AlreadyStopped);
        };
        let run = {
            let mut st = slot.lock();
            if st.desired != Desired::Stopped {
                slot.write_desired(Desired::Stopped)?;
                st.desired = Desired::Stopped;
            }
            st.run
        };
        slot.wake.notify_one();
        let Some(run) = run else {
            return Ok(StopOutcome::AlreadyStopped);
        };
        let started = Instant::now();
        let signal = |sig: i32| {
            run.id.signal(sig).map_err(|e| {
                io_err(
                    &self.provider,
                    obj(),
                    format!("send {} to pid {}", process::signal_name(sig), run.id.pid),
                    e,
                )
            })
        };
        if !signal(libc::SIGTERM)? {
            slot.clear_pid_file(run.id);
            return Ok(StopOutcome::AlreadyStopped);
        }
        if wait_gone(run.id, options.timeout).await {
            slot.clear_pid_file(run.id);
            return Ok(StopOutcome::Stopped {
                after: started.elapsed(),
            });
        }
        if !options.kill_after_timeout {
            return Err(ProviderError::StopTimedOut {
                provider: self.provider.clone(),
                object: obj(),
                waited: started.elapsed(),
                asked: "SIGTERM",
            });
        }
        tracing::warn!(
            provider = %self.provider,
            "{} (pid {}) did not stop within {:?} of SIGTERM; killing it as asked.",
            obj(),
            run.id.pid,
            options.timeout
        );
        signal(libc::SIGKILL)?;
        if wait_gone(run.id, KILL_GRACE).await {
            slot.clear_pid_file(run.id);
            return Ok(StopOutcome::Killed {
                after: started.elapsed(),
            });
        }
        Err(ProviderError::Tool {
            provider: self.provider.clone(),
            object: obj(),
            program: "kill".to_string(),
            detail: format!(
                "pid {} is still there {KILL_GRACE:?} after SIGKILL (stuck in the kernel?)",
                run.id.pid
            ),
        })
    }

    /// Forgets a stopped app and deletes its directory.
    pub(super) fn remove(&self, service: &str, app: &str) -> Result<(), ProviderError> {
        let obj = || object::app(service, app);
        check_name(&self.provider, obj, "service name", service)?;
        check_name(&self.provider, obj, "app name", app)?;
        let mut slots = self.slots_lock();
        let key = (service.to_string(), app.to_string());
        if let Some(slot) = slots.get(&key).cloned() {
            let mut st = slot.lock();
            if st.desired != Desired::Stopped || st.run.is_some_and(|r| r.id.is_running()) {
                return Err(conflict(
                    &self.provider,
                    obj(),
                    "it is not stopped; stop it before removing it",
                ));
            }
            st.closed = true;
            if let Some(task) = slot.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
            drop(st);
            slots.remove(&key);
        }
        let dir = self.dir.join(service).join(app);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(
                &self.provider,
                obj(),
                format!("remove {}", dir.display()),
                e,
            )),
        }
    }

    pub(super) fn status(&self, service: &str, app: &str) -> Option<AppStatus> {
        self.slot(service, app).map(|s| s.status())
    }
}

impl Drop for Apps {
    /// Stops supervising and leaves every process running, for the next provider on this
    /// root to adopt.
    fn drop(&mut self) {
        for slot in self.slots_lock().values() {
            slot.lock().closed = true;
            if let Some(task) = slot.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
    }
}

async fn wait_gone(id: ProcessId, timeout: Duration) -> bool {
    crate::providers::host::wait_gone(id, timeout, STOP_POLL).await
}

/// Watches one app: waits for its process to end and starts it again while it is wanted
/// running. Returns when the app is stopped, the provider is dropped, or a newer supervisor
/// has taken over.
async fn supervisor(slot: Arc<Slot>, generation: u64) {
    let mut backoff = RESTARTS.build();
    // An app found wanted running but not running (the machine rebooted, say) starts at once.
    let mut pause = Duration::ZERO;
    loop {
        let run = {
            let st = slot.lock();
            if st.generation != generation || st.closed {
                return;
            }
            st.run
        };
        if let Some(run) = run {
            let how = process::wait_exit(run.id).await;
            let mut st = slot.lock();
            if st.generation != generation || st.closed {
                return;
            }
            st.run = None;
            slot.clear_pid_file(run.id);
            if st.desired == Desired::Stopped {
                tracing::info!(provider = %slot.provider, "{} (pid {}) stopped: {how}.", slot.object(), run.id.pid);
                st.last_exit = Some(how);
                return;
            }
            if run.since.elapsed() >= STABLE_AFTER {
                backoff = RESTARTS.build();
            }
            pause = backoff.next().unwrap_or(MAX_BACKOFF);
            tracing::warn!(
                provider = %slot.provider,
                "{} (pid {}) {how}; starting it again in {pause:?}.",
                slot.object(),
                run.id.pid
            );
            st.last_exit = Some(how);
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = slot.wake.notified() => {}
        }
        let mut st = slot.lock();
        if st.generation != generation || st.closed || st.desired == Desired::Stopped {
            return;
        }
        match slot.launch(&mut st) {
            Ok(id) => {
                st.restarts += 1;
                st.adopted = false;
                st.last_error = None;
                tracing::info!(provider = %slot.provider, "Started {} again as pid {}.", slot.object(), id.pid);
            }
            Err(e) => {
                pause = backoff.next().unwrap_or(MAX_BACKOFF);
                tracing::warn!(provider = %slot.provider, "{}: {e}; trying again in {pause:?}.", slot.object());
                st.last_error = Some(e);
            }
        }
    }
}
