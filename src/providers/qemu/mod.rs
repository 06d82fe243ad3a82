//! The `qemu` driver: virtual machines under `qemu-system-x86_64` on this machine, booting
//! disk images from a pool in the provider's directory. Offers [`QemuProvider`] (compute and
//! block capabilities).
//!
//! ```text
//! ROOT/volumes/<service>/<volume>.<fmt>   the disk pool (as the local driver keeps it)
//! ROOT/vms/<service>/<vm>/state.json      the VmSpec and forwarded ports of its last start
//!                        /pid             pid and /proc start time of its emulator
//!                        /qemu.pid        the pid file qemu writes itself
//!                        /qmp.sock        QMP control socket
//!                        /console.log     serial console (the previous boot's in .1)
//!                        /qemu.log        what qemu said while starting
//! ROOT/operations/<id>.json               finished operations, for the journal
//! ROOT/.lock                              held while a daemon uses the root
//! ```
//!
//! Emulators run daemonised (`-daemonize`): they outlive the daemon, and a provider opened
//! again on the same root takes over the VMs its pid files name, checking start time and
//! command line so that a reused pid is never taken for a VM. Stopping presses the ACPI
//! power button through QMP and waits; a guest that does not power off is switched off only
//! when the caller asks for it.

mod accel;
mod live;
mod qmp;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::host::disks::Volumes;
use super::host::operations::{OpStore, KEEP};
use super::host::process::ProcessId;
use super::host::{available_bytes, lock_root, wait_gone, write_atomic, RootLock};
use super::{
    object, Capabilities, DiskFormat, DiskPass, DiskPassKind, ForwardedPort, Halt, IncomingVm,
    LiveLimits, MigrationReport, MirrorReport, Operation, OperationId, OperationKind, Provider,
    ProviderError, StopOptions, StopOutcome, VmSpec, VmState, VmStatus, VolumeInfo, VolumeSpec,
};
use crate::config::{self, Accel, DiskBus, QemuSettings};
use crate::model::Driver;
use crate::sys::retry::{ConstantBuilder, Retryable};
pub use qmp::{Qmp, QmpError};

/// The emulator run when the configuration names none and `$FLUIDCLOUD_QEMU_SYSTEM` is unset.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// Environment variable naming the emulator when the configuration does not.
pub const BINARY_ENV: &str = "FLUIDCLOUD_QEMU_SYSTEM";
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a VM gets to vanish after QMP `quit`, and again after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
const STOP_POLL: Duration = Duration::from_millis(100);
/// How often the power button is pressed again while a guest has not powered down.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(5);
/// How long `qemu -daemonize` may take to set the VM up before its parent returns.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries to start a VM whose automatically chosen host ports another process took.
const PORT_ATTEMPTS: usize = 3;
/// Where a VM waiting for a live migration serves its disks, and takes its memory.
const NBD_SOCKET: &str = "nbd.sock";
const MIGRATION_SOCKET: &str = "migrate.sock";
/// The serial console of the current boot, and of the one before.
const CONSOLE_LOGS: &[&str] = &["console.log", "console.log.1"];

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            binary: None,
            firmware_dirs: Vec::new(),
            library_path: Vec::new(),
            accel: Accel::Auto,
            disk_bus: DiskBus::Virtio,
            nic_model: "virtio-net-pci".to_string(),
            powerdown_timeout: Duration::from_secs(60),
        }
    }
}

/// Why one attempt to start an emulator failed.
enum Launch {
    /// qemu ran and refused; with other host ports it may start.
    Refused {
        detail: String,
        ports_taken: bool,
    },
    Failed(ProviderError),
}

/// What `state.json` holds: how the VM was last started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    spec: VmSpec,
    ports: Vec<ForwardedPort>,
    accel: String,
    started_at: chrono::DateTime<chrono::Utc>,
}

type VmKey = (String, String);

pub struct QemuProvider {
    name: String,
    root: PathBuf,
    disk_format: DiskFormat,
    settings: QemuSettings,
    /// The emulator as it is run (a path, or a name found in `PATH`).
    binary: PathBuf,
    ops: OpStore,
    volumes: Volumes,
    accel: tokio::sync::OnceCell<Accel>,
    /// One start, stop or removal at a time per VM.
    locks: Mutex<BTreeMap<VmKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Emulators this instance started, by VM; any other running one was adopted.
    started: Mutex<BTreeMap<VmKey, u32>>,
    /// Where the guests' forwarded ports listen (see [`config::Provider::address`]).
    address: std::sync::RwLock<String>,
    _root_lock: Arc<RootLock>,
}

impl QemuProvider {
    /// Opens the provider a configuration names; it must use the `qemu` driver and have a
    /// `root`.
    pub fn open(provider: &config::Provider) -> Result<Arc<QemuProvider>, ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: provider.name.clone(),
            reason,
        };
        if provider.driver != Driver::Qemu {
            return Err(setup(format!(
                "it uses the `{}` driver, not `qemu`",
                provider.driver.as_str()
            )));
        }
        let root = provider.root.as_ref().ok_or_else(|| {
            setup(
                "the qemu driver needs `root`, the directory holding its disk pool and VMs"
                    .to_string(),
            )
        })?;
        let settings = provider.qemu.clone().unwrap_or_default();
        let opened = Self::open_at(&provider.name, root, provider.disk_format, settings)?;
        if let Some(address) = &provider.address {
            *opened.address.write().unwrap_or_else(|e| e.into_inner()) = address.clone();
        }
        opened.volumes.set_devices(&provider.devices)?;
        Ok(opened)
    }

    /// Opens (creating it if needed) a qemu provider in `root`.
    pub fn open_at(
        name: &str,
        root: &Path,
        disk_format: DiskFormat,
        settings: QemuSettings,
    ) -> Result<Arc<QemuProvider>, ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: name.to_string(),
            reason,
        };
        let binary = resolve_binary(&settings).map_err(setup)?;
        for dir in settings.firmware_dirs.iter().chain(&settings.library_path) {
            if !dir.is_dir() {
                return Err(setup(format!(
                    "{} (in firmware_dirs or library_path) is not a directory",
                    dir.display()
                )));
            }
        }
        std::fs::create_dir_all(root)
            .map_err(|e| setup(format!("cannot create its root {}: {e}", root.display())))?;
        let root = root
            .canonicalize()
            .map_err(|e| setup(format!("cannot resolve its root {}: {e}", root.display())))?;
        let root_lock = lock_root(&root, name).map_err(|e| setup(e.to_string()))?;
        for sub in ["volumes", "vms", "operations"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
        }
        let ops = OpStore::new(name, root.join("operations"));
        ops.prune(KEEP);
        let volumes = Volumes::new(name, root.join("volumes"));
        volumes.remove_leftovers();
        Ok(Arc::new(QemuProvider {
            name: name.to_string(),
            root,
            disk_format,
            settings,
            binary,
            ops,
            volumes,
            accel: tokio::sync::OnceCell::new(),
            locks: Mutex::new(BTreeMap::new()),
            started: Mutex::new(BTreeMap::new()),
            address: std::sync::RwLock::new(crate::providers::LOOPBACK.to_string()),
            _root_lock: root_lock,
        }))
    }

    /// The provider's directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a VM's runtime state.
    pub fn vm_dir(&self, service: &str, vm: &str) -> PathBuf {
        self.root.join("vms").join(service).join(vm)
    }

    /// The accelerator VMs of this provider run under, probing KVM once for `auto`.
    pub async fn accel(&self) -> Result<Accel, ProviderError> {
        self.accel
            .get_or_try_init(|| async {
                match self.settings.accel {
                    Accel::Tcg => Ok(Accel::Tcg),
                    Accel::Kvm => accel::kvm_usable().map(|()| Accel::Kvm).map_err(|reason| {
                        ProviderError::Setup {
                            provider: self.name.clone(),
                            reason: format!("accel = \"kvm\" but {reason}"),
                        }
                    }),
                    Accel::Auto => Ok(self.probe_kvm().await),
                }
            })
            .await
            .copied()
    }

    async fn probe_kvm(&self) -> Accel {
        if let Err(reason) = accel::kvm_usable() {
            tracing::info!(provider = %self.name, "VMs run under TCG emulation: {reason}.");
            return Accel::Tcg;
        }
        let dir = self.root.join("vms");
        match accel::probe(&self.command(), &dir, Accel::Kvm).await {
            Ok(took) if took <= accel::KVM_PROBE_LIMIT => {
                tracing::info!(provider = %self.name, "VMs run under KVM.");
                Accel::Kvm
            }
            Ok(took) => {
                tracing::warn!(provider = %self.name, "A probe guest took {took:?} under KVM (a sound host needs well under {:?}); VMs run under TCG emulation.", accel::KVM_PROBE_LIMIT);
                Accel::Tcg
            }
            Err(reason) => {
                tracing::warn!(provider = %self.name, "/dev/kvm opens but a probe guest failed under KVM ({reason}); VMs run under TCG emulation.");
                Accel::Tcg
            }
        }
    }

    /// The emulator with its environment and firmware directories, ready for arguments.
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        if !self.settings.library_path.is_empty() {
            let mut joined = OsString::new();
            for (i, d) in self.settings.library_path.iter().enumerate() {
                if i > 0 {
                    joined.push(":");
                }
                joined.push(d);
            }
            cmd.env("LD_LIBRARY_PATH", joined);
        }
        for d in &self.settings.firmware_dirs {
            cmd.arg("-L").arg(d);
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    fn vm_lock(&self, service: &str, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks
            .entry((service.to_string(), vm.to_string()))
            .or_default()
            .clone()
    }

    fn check(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        for (what, name) in [("service name", service), ("vm name", vm)] {
            super::validate_name(name)
                .map_err(|e| self.invalid(object::vm(service, vm), format!("{what}: {e}")))?;
        }
        Ok(())
    }

    fn invalid(&self, object: String, reason: impl Into<String>) -> ProviderError {
        ProviderError::Invalid {
            provider: self.name.clone(),
            object,
            reason: reason.into(),
        }
    }

    fn io(&self, object: String, action: String, source: std::io::Error) -> ProviderError {
        ProviderError::Io {
            provider: self.name.clone(),
            object,
            action,
            source,
        }
    }

    fn read_state(&self, service: &str, vm: &str) -> Result<Option<SavedState>, ProviderError> {
        let path = self.vm_dir(service, vm).join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.invalid(
                    object::vm(service, vm),
                    format!("its state file {} is damaged: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(
                object::vm(service, vm),
                format!("read {}", path.display()),
                e,
            )),
        }
    }

    /// The VM's emulator, if it runs: the process its pid file names, still with the same
    /// start time and still holding this VM's QMP socket on its command line.
    fn running(&self, service: &str, vm: &str) -> Option<ProcessId> {
        let dir = self.vm_dir(service, vm);
        let socket = dir.join("qmp.sock");
        let from_file = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|t| ProcessId::parse_pid_file(&t).ok());
        // A crash between qemu writing its pid file and ours leaves only qemu's; the command
        // line check below still tells our emulator from anything else.
        let id = from_file.or_else(|| {
            std::fs::read_to_string(dir.join("qemu.pid"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .and_then(ProcessId::of)
        })?;
        (id.is_running() && holds_socket(id.pid, &socket)).then_some(id)
    }

    fn adopted(&self, service: &str, vm: &str, pid: u32) -> bool {
        let started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        started.get(&(service.to_string(), vm.to_string())) != Some(&pid)
    }

    async fn qmp(&self, service: &str, vm: &str) -> Result<Qmp, ProviderError> {
        Qmp::connect(&self.vm_dir(service, vm).join("qmp.sock"))
            .await
            .map_err(|e| self.remote(service, vm, "connect to its QMP socket", e))
    }

    fn remote(&self, service: &str, vm: &str, action: &str, e: QmpError) -> ProviderError {
        ProviderError::Remote {
            provider: self.name.clone(),
            object: object::vm(service, vm),
            action: action.to_string(),
            detail: e.to_string(),
        }
    }

    /// What this provider refuses in a machine definition, checked without touching
    /// anything: the disks fit its bus, kernel and initrd exist, forwarded ports have a NIC,
    /// the QMP socket path fits.
    fn check_machine(&self, service: &str, spec: &VmSpec) -> Result<(), ProviderError> {
        let obj = || object::vm(service, &spec.name);
        let dir = self.vm_dir(service, &spec.name);
        let max_disks = match self.settings.disk_bus {
            DiskBus::Ide => 4,
            DiskBus::Sata => 6,
            DiskBus::Virtio | DiskBus::Scsi => 64,
        };
        if spec.disks().count() > max_disks {
            return Err(self.invalid(
                obj(),
                format!(
                    "{} disks do not fit the {} bus, which takes {max_disks}",
                    spec.disks().count(),
                    self.settings.disk_bus.as_str()
                ),
            ));
        }
        for (what, path) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(self.invalid(
                        obj(),
                        format!("its {what} {} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if !spec.ports.is_empty() && self.settings.nic_model == "none" {
            return Err(self.invalid(
                obj(),
                "it forwards ports, but this provider's nic_model is `none`",
            ));
        }
        // The longest of its sockets' names.
        let socket = dir.join(MIGRATION_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(self.invalid(
                obj(),
                format!(
                    "its socket path {} is longer than the {MAX_SOCKET_PATH} bytes a unix socket allows; use a shorter provider root",
                    socket.display()
                ),
            ));
        }
        Ok(())
    }

    /// Starts the VM (the caller holds its lock and found it not running); `incoming`
    /// starts it paused, waiting for a live migration (`-incoming defer -S`).
    async fn launch(
        &self,
        service: &str,
        spec: &VmSpec,
        incoming: bool,
    ) -> Result<String, ProviderError> {
        let obj = || object::vm(service, &spec.name);
        let dir = self.vm_dir(service, &spec.name);
        let mut disks = Vec::new();
        for name in spec.disks() {
            match self.volumes.info(service, name).await? {
                Some(VolumeInfo {
                    path: Some(path),
                    format,
                    ..
                }) => disks.push((path, format)),
                _ => {
                    return Err(ProviderError::NotFound {
                        provider: self.name.clone(),
                        object: format!(
                            "{} ({} of {}; create the volume first)",
                            object::volume(service, name),
                            if name == spec.name {
                                "the boot disk"
                            } else {
                                "a disk"
                            },
                            obj()
                        ),
                    })
                }
            }
        }
        self.check_machine(service, spec)?;
        let accel = self.accel().await?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| self.io(obj(), format!("create {}", dir.display()), e))?;
        for stale in ["pid", "qemu.pid", "qmp.sock", NBD_SOCKET, MIGRATION_SOCKET] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        // Keep the previous boot's console beside the new one.
        let _ = std::fs::rename(dir.join(CONSOLE_LOGS[0]), dir.join(CONSOLE_LOGS[1]));

        let mut attempts = 0;
        let launched = (|| {
            attempts += 1;
            self.launch_once(service, spec, accel, &disks, attempts, incoming)
        })
        .retry(
            ConstantBuilder::new()
                .with_delay(Duration::ZERO)
                .with_max_times(PORT_ATTEMPTS - 1),
        )
        .when(|e| {
            matches!(
                e,
                Launch::Refused {
                    ports_taken: true,
                    ..
                }
            )
        })
        .await;
        launched.map_err(|e| match e {
            Launch::Failed(e) => e,
            Launch::Refused { detail, .. } => self.tool(obj(), detail),
        })
    }

    /// One attempt to start the emulator, with newly picked host ports.
    async fn launch_once(
        &self,
        service: &str,
        spec: &VmSpec,
        accel: Accel,
        disks: &[(PathBuf, DiskFormat)],
        attempt: usize,
        incoming: bool,
    ) -> Result<String, Launch> {
        let dir = &self.vm_dir(service, &spec.name);
        let obj = || object::vm(service, &spec.name);
        let address = self.address();
        let ports = pick_ports(spec, &address)
            .map_err(|e| self.io(obj(), "find free host ports".to_string(), e))
            .map_err(Launch::Failed)?;
        let state = SavedState {
            spec: spec.clone(),
            ports: ports.clone(),
            accel: accel.as_str().to_string(),
            started_at: chrono::Utc::now(),
        };
        let bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| self.invalid(obj(), format!("cannot encode its state: {e}")))
            .map_err(Launch::Failed)?;
        let state_path = dir.join("state.json");
        write_atomic(&state_path, &bytes)
            .map_err(|e| self.io(obj(), format!("write {}", state_path.display()), e))
            .map_err(Launch::Failed)?;

        let mut cmd = self.command();
        cmd.args(qemu_args(
            service,
            spec,
            &self.settings,
            accel,
            disks,
            &ports,
            dir,
        ));
        if incoming {
            cmd.args(["-incoming", "defer", "-S"]);
        }
        let output = match tokio::time::timeout(
            LAUNCH_TIMEOUT,
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output(),
        )
        .await
        {
            Err(_) => {
                return Err(Launch::Failed(self.tool(
                    obj(),
                    format!("did not finish starting the VM within {LAUNCH_TIMEOUT:?}"),
                )))
            }
            Ok(Err(e)) => {
                return Err(Launch::Failed(self.tool(
                    obj(),
                    format!(
                        "cannot run {} ({e}); it comes with the Debian package qemu-system-x86",
                        self.binary.display()
                    ),
                )))
            }
            Ok(Ok(o)) => o,
        };
        let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let _ = std::fs::write(dir.join("qemu.log"), &output.stderr);
        if output.status.success() {
            let id = std::fs::read_to_string(dir.join("qemu.pid"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .and_then(ProcessId::of)
                .ok_or_else(|| {
                    self.tool(
                        obj(),
                        format!(
                            "reported a start, but its pid file {} names no running process",
                            dir.join("qemu.pid").display()
                        ),
                    )
                })
                .map_err(Launch::Failed)?;
            if let Err(e) = write_atomic(&dir.join("pid"), id.to_pid_file().as_bytes()) {
                tracing::warn!(provider = %self.name, "Could not write the pid file of {} (pid {}): {e}; it will be found through qemu's own.", obj(), id.pid);
            }
            self.started
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((service.to_string(), spec.name.clone()), id.pid);
            let shown: Vec<String> = ports
                .iter()
                .map(|p| format!("{}->{}", p.host, p.guest))
                .collect();
            return Ok(format!(
                "started under {} (pid {}, attempt {attempt}){}",
                accel.as_str(),
                id.pid,
                if shown.is_empty() {
                    String::new()
                } else {
                    format!(", ports {}", shown.join(" "))
                }
            ));
        }
        // Ports picked here can be taken by someone else before qemu binds them.
        let chose_ports = spec.ports.iter().any(|p| p.host.is_none());
        Err(Launch::Refused {
            detail: format!("{}: {said}", output.status),
            ports_taken: chose_ports && said.contains("hostfwd"),
        })
    }

    fn tool(&self, object: String, detail: String) -> ProviderError {
        ProviderError::Tool {
            provider: self.name.clone(),
            object,
            program: self.binary.display().to_string(),
            detail,
        }
    }

    async fn wait_gone(id: ProcessId, limit: Duration) -> bool {
        wait_gone(id, limit, STOP_POLL).await
    }

    /// Removes pid files of an emulator that is gone.
    fn forget_process(&self, service: &str, vm: &str) {
        let dir = self.vm_dir(service, vm);
        for f in ["pid", "qemu.pid", "qmp.sock", NBD_SOCKET, MIGRATION_SOCKET] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(service.to_string(), vm.to_string()));
    }

    /// Ends the VM's emulator at once: `quit` as pulling the plug would, SIGKILL for an
    /// emulator too wedged to answer QMP. The caller holds the VM's lock.
    async fn switch_off(
        &self,
        service: &str,
        vm: &str,
        id: ProcessId,
    ) -> Result<(), ProviderError> {
        if let Ok(mut qmp) = self.qmp(service, vm).await {
            let _ = qmp.execute("quit", None).await;
        }
        if !Self::wait_gone(id, KILL_GRACE).await {
            id.signal(libc::SIGKILL).map_err(|e| {
                self.io(
                    object::vm(service, vm),
                    format!("kill its emulator (pid {})", id.pid),
                    e,
                )
            })?;
            if !Self::wait_gone(id, KILL_GRACE).await {
                return Err(ProviderError::Remote {
                    provider: self.name.clone(),
                    object: object::vm(service, vm),
                    action: "switch it off".to_string(),
                    detail: format!(
                        "its emulator (pid {}) survived QMP quit and SIGKILL",
                        id.pid
                    ),
                });
            }
        }
        self.forget_process(service, vm);
        Ok(())
    }

    /// Running VMs of the service that use `volume` as a disk.
    fn users_of(&self, service: &str, volume: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.root.join("vms").join(service)) else {
            return Vec::new();
        };
        let mut users = Vec::new();
        for e in entries.flatten() {
            let Some(vm) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let uses = matches!(self.read_state(service, &vm), Ok(Some(s)) if s.spec.disks().any(|d| d == volume));
            if uses && self.running(service, &vm).is_some() {
                users.push(vm);
            }
        }
        users
    }
}

/// Finds the emulator: the configured one, else `$FLUIDCLOUD_QEMU_SYSTEM`, else
/// `qemu-system-x86_64` in `PATH`.
fn resolve_binary(settings: &QemuSettings) -> Result<PathBuf, String> {
    let (binary, origin) = match (&settings.binary, std::env::var_os(BINARY_ENV)) {
        (Some(b), _) => (b.clone(), "`binary`"),
        (None, Some(b)) if !b.is_empty() => (PathBuf::from(b), BINARY_ENV),
        _ => (PathBuf::from(DEFAULT_BINARY), "the default"),
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if binary.is_file() {
            Ok(binary)
        } else {
            Err(format!(
                "the emulator {} ({origin}) does not exist or is not a file",
                binary.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(&binary))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the emulator `{}` ({origin}) is not in PATH; install the Debian package qemu-system-x86 or set `binary` in [providers.NAME.qemu]",
                binary.display()
            )
        })
}

/// True when the process's command line names `socket` (as this driver's qemu does in
/// its `-qmp` argument).
fn holds_socket(pid: u32, socket: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = socket.as_os_str().as_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.windows(needle.len()).any(|w| w == needle) && arg.starts_with(b"unix:"))
}

/// Host ports for the spec's forwards: the fixed ones, and free ones picked now for the rest.
fn pick_ports(spec: &VmSpec, address: &str) -> std::io::Result<Vec<ForwardedPort>> {
    // Every picked port's listener stays open until all are picked, so no two coincide.
    let mut held = Vec::new();
    let mut out = Vec::new();
    // QEMU wants an IP address: a host name is resolved here, once.
    let ip = std::net::ToSocketAddrs::to_socket_addrs(&(address, 0))?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{address} has no address")))?
        .ip();
    for p in &spec.ports {
        let host = match p.host {
            Some(h) => h,
            None => {
                let l = std::net::TcpListener::bind((ip, 0))?;
                let port = l.local_addr()?.port();
                held.push(l);
                port
            }
        };
        out.push(ForwardedPort {
            guest: p.guest,
            host,
            address: ip.to_string(),
        });
    }
    Ok(out)
}

/// Doubles commas, as qemu's option parser wants them inside a value.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The emulator's arguments for the VM.
fn qemu_args(
    service: &str,
    spec: &VmSpec,
    settings: &QemuSettings,
    accel: Accel,
    disks: &[(PathBuf, DiskFormat)],
    ports: &[ForwardedPort],
    dir: &Path,
) -> Vec<OsString> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!(
            "guest={service}/{},process=qemu-{service}-{}",
            spec.name, spec.name
        ),
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        match accel {
            Accel::Kvm => "kvm",
            _ => "tcg",
        }
        .into(),
    ];
    if accel == Accel::Kvm {
        a.extend(["-cpu".into(), "host".into()]);
    }
    a.extend([
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-chardev".into(),
        format!("file,id=console,path={}", esc(&dir.join(CONSOLE_LOGS[0]))),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", esc(&dir.join("qmp.sock"))),
        "-pidfile".into(),
        dir.join("qemu.pid").to_string_lossy().into_owned(),
        "-daemonize".into(),
    ]);
    match settings.disk_bus {
        DiskBus::Scsi => a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]),
        DiskBus::Sata => a.extend(["-device".into(), "ahci,id=ahci0".into()]),
        DiskBus::Virtio | DiskBus::Ide => {}
    }
    for (i, (path, format)) in disks.iter().enumerate() {
        let drive = format!("file={},format={format},id=disk{i}", esc(path));
        // Only the boot disk is a boot device; with direct kernel boot none is needed.
        let boot = if i == 0 && spec.kernel.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        match settings.disk_bus {
            DiskBus::Virtio => a.extend([
                "-drive".into(),
                format!("{drive},if=none"),
                "-device".into(),
                format!("virtio-blk-pci,drive=disk{i}{boot}"),
            ]),
            DiskBus::Ide => a.extend([
                "-drive".into(),
                format!("{drive},if=none"),
                "-device".into(),
                format!(
                    "ide-hd,drive=disk{i},bus=ide.{},unit={}{boot}",
                    i / 2,
                    i % 2
                ),
            ]),
            DiskBus::Sata => a.extend([
                "-drive".into(),
                format!("{drive},if=none"),
                "-device".into(),
                format!("ide-hd,drive=disk{i},bus=ahci0.{i}{boot}"),
            ]),
            DiskBus::Scsi => a.extend([
                "-drive".into(),
                format!("{drive},if=none"),
                "-device".into(),
                format!("scsi-hd,drive=disk{i},bus=scsi0.0,scsi-id={i},lun=0{boot}"),
            ]),
        }
    }
    if settings.nic_model == "none" {
        a.extend(["-nic".into(), "none".into()]);
    } else {
        let mut netdev = "user,id=net0".to_string();
        for p in ports {
            netdev.push_str(&format!(
                ",hostfwd=tcp:{}:{}-:{}",
                p.address, p.host, p.guest
            ));
        }
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("{},netdev=net0", settings.nic_model),
        ]);
    }
    let mut out: Vec<OsString> = a.into_iter().map(OsString::from).collect();
    if let Some(k) = &spec.kernel {
        out.extend(["-kernel".into(), k.clone().into_os_string()]);
    }
    if let Some(i) = &spec.initrd {
        out.extend(["-initrd".into(), i.clone().into_os_string()]);
    }
    if let Some(line) = &spec.append {
        out.extend(["-append".into(), line.into()]);
    }
    out
}

/// Maps QMP's `RunState` to what callers need to know.
fn vm_state(status: &str) -> VmState {
    match status {
        "running" => VmState::Running,
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" | "watchdog" => {
            VmState::Halted
        }
        _ => VmState::Paused,
    }
}

#[async_trait]
impl Provider for QemuProvider {
    fn address(&self) -> String {
        self.address
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> Driver {
        Driver::Qemu
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of(Driver::Qemu)
    }

    fn preferred_disk_format(&self) -> DiskFormat {
        self.disk_format
    }

    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        self.ops.get(id)
    }

    async fn volume_info(
        &self,
        service: &str,
        volume: &str,
    ) -> Result<Option<VolumeInfo>, ProviderError> {
        self.volumes.info(service, volume).await
    }

    async fn list_volumes(&self, service: &str) -> Result<Vec<VolumeInfo>, ProviderError> {
        self.volumes.list(service).await
    }

    async fn create_volume(
        &self,
        service: &str,
        spec: &VolumeSpec,
    ) -> Result<Operation, ProviderError> {
        let detail = self.volumes.create(service, spec).await?;
        self.ops.succeeded(
            OperationKind::CreateVolume,
            object::volume(service, &spec.name),
            detail,
        )
    }

    async fn delete_volume(&self, service: &str, volume: &str) -> Result<Operation, ProviderError> {
        let users = self.users_of(service, volume);
        if !users.is_empty() {
            return Err(ProviderError::Conflict {
                provider: self.name.clone(),
                object: object::volume(service, volume),
                detail: format!("running VMs use it as a disk: {}", users.join(", ")),
            });
        }
        let detail = self.volumes.delete(service, volume).await?;
        self.ops.succeeded(
            OperationKind::DeleteVolume,
            object::volume(service, volume),
            detail,
        )
    }

    async fn start_vm(&self, service: &str, spec: &VmSpec) -> Result<Operation, ProviderError> {
        let obj = || object::vm(service, &spec.name);
        self.check(service, &spec.name)?;
        spec.validate().map_err(|r| self.invalid(obj(), r))?;
        let lock = self.vm_lock(service, &spec.name);
        let _guard = lock.lock().await;
        let detail = if let Some(id) = self.running(service, &spec.name) {
            let have = self.read_state(service, &spec.name)?;
            match have {
                Some(s) if s.spec == *spec => format!("already running (pid {})", id.pid),
                Some(s) => {
                    return Err(ProviderError::Conflict {
                        provider: self.name.clone(),
                        object: obj(),
                        detail: format!(
                            "it runs (pid {}) with another spec: {}; stop it first",
                            id.pid,
                            serde_json::to_string(&s.spec).unwrap_or_default()
                        ),
                    })
                }
                None => {
                    return Err(ProviderError::Conflict {
                        provider: self.name.clone(),
                        object: obj(),
                        detail: format!(
                            "its emulator runs (pid {}) but its state file is gone; stop it first",
                            id.pid
                        ),
                    })
                }
            }
        } else {
            self.forget_process(service, &spec.name);
            self.launch(service, spec, false).await?
        };
        self.ops.succeeded(OperationKind::StartVm, obj(), detail)
    }

    async fn check_vm(&self, service: &str, spec: &VmSpec) -> Result<(), ProviderError> {
        self.check(service, &spec.name)?;
        self.check_machine(service, spec)
    }

    async fn stop_vm(
        &self,
        service: &str,
        vm: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        self.check(service, vm)?;
        let lock = self.vm_lock(service, vm);
        let _guard = lock.lock().await;
        let Some(id) = self.running(service, vm) else {
            self.forget_process(service, vm);
            return Ok(StopOutcome::AlreadyStopped);
        };
        let started = Instant::now();
        // A guest paused by a migration cannot hear the power button: before an incoming
        // migration there is no guest yet, after an outgoing one it lives on elsewhere.
        // Its emulator is ended at once.
        let status = match self.qmp(service, vm).await {
            Ok(mut qmp) => qmp
                .execute("query-status", None)
                .await
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_string)),
            Err(_) => None,
        };
        if let Some(status) = status.filter(|s| live::migration_paused(s) || s == "shutdown") {
            tracing::info!(provider = %self.name, "{}'s guest is powered down or paused by a migration (`{status}`); ending its emulator.", object::vm(service, vm));
            self.switch_off(service, vm, id).await?;
            return Ok(StopOutcome::Stopped {
                after: started.elapsed(),
            });
        }
        let wait = options.timeout.max(self.settings.powerdown_timeout);
        let deadline = started + wait;
        // The button is pressed again every few seconds: a guest still booting (ACPI not
        // yet up) misses a press, as a real machine would, and one press is not enough.
        loop {
            let pressed = async {
                let mut qmp = self.qmp(service, vm).await?;
                qmp.execute("system_powerdown", None)
                    .await
                    .map_err(|e| self.remote(service, vm, "press the power button", e))
            }
            .await;
            if let Err(e) = pressed {
                if !id.is_running() {
                    self.forget_process(service, vm);
                    return Ok(StopOutcome::Stopped {
                        after: started.elapsed(),
                    });
                }
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if Self::wait_gone(id, left.min(POWER_BUTTON_REPEAT)).await {
                self.forget_process(service, vm);
                return Ok(StopOutcome::Stopped {
                    after: started.elapsed(),
                });
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if !options.kill_after_timeout {
            return Err(ProviderError::StopTimedOut {
                provider: self.name.clone(),
                object: object::vm(service, vm),
                waited: started.elapsed(),
                asked: "the ACPI power button (QMP system_powerdown)",
            });
        }
        tracing::warn!(provider = %self.name, "{} did not power down within {wait:?}; switching it off.", object::vm(service, vm));
        self.switch_off(service, vm, id).await?;
        Ok(StopOutcome::Killed {
            after: started.elapsed(),
        })
    }

    async fn vm_status(&self, service: &str, vm: &str) -> Result<Option<VmStatus>, ProviderError> {
        self.check(service, vm)?;
        let Some(state) = self.read_state(service, vm)? else {
            return Ok(None);
        };
        let console = Some(self.vm_dir(service, vm).join(CONSOLE_LOGS[0]));
        let Some(id) = self.running(service, vm) else {
            return Ok(Some(VmStatus {
                service: service.to_string(),
                name: vm.to_string(),
                state: VmState::Stopped,
                detail: None,
                pid: None,
                adopted: false,
                ports: Vec::new(),
                console,
                spec: state.spec,
            }));
        };
        let queried = async {
            let mut qmp = self.qmp(service, vm).await?;
            qmp.execute("query-status", None)
                .await
                .map_err(|e| self.remote(service, vm, "query its status", e))
        }
        .await;
        let (vm_state, detail) = match queried {
            Ok(v) => {
                let s = v
                    .get("status")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_string();
                (vm_state(&s), Some(s))
            }
            Err(e) => {
                // The emulator may have exited between the two looks.
                if !id.is_running() {
                    return Box::pin(self.vm_status(service, vm)).await;
                }
                tracing::debug!(provider = %self.name, "{e}");
                (VmState::Running, None)
            }
        };
        Ok(Some(VmStatus {
            service: service.to_string(),
            name: vm.to_string(),
            state: vm_state,
            detail,
            pid: Some(id.pid),
            adopted: self.adopted(service, vm, id.pid),
            ports: state.ports,
            console,
            spec: state.spec,
        }))
    }

    async fn vm_console(&self, service: &str, vm: &str) -> Result<Option<PathBuf>, ProviderError> {
        self.check(service, vm)?;
        Ok(self
            .read_state(service, vm)?
            .map(|_| self.vm_dir(service, vm).join(CONSOLE_LOGS[0])))
    }

    async fn remove_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        self.check(service, vm)?;
        let lock = self.vm_lock(service, vm);
        let _guard = lock.lock().await;
        if let Some(id) = self.running(service, vm) {
            return Err(ProviderError::Conflict {
                provider: self.name.clone(),
                object: object::vm(service, vm),
                detail: format!("it is running (pid {}); stop it first", id.pid),
            });
        }
        let dir = self.vm_dir(service, vm);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(
                object::vm(service, vm),
                format!("remove {}", dir.display()),
                e,
            )),
        }
    }

    async fn receive_vm(
        &self,
        service: &str,
        spec: &VmSpec,
        how: &crate::providers::Reception,
    ) -> Result<IncomingVm, ProviderError> {
        self.receive(service, spec, how).await
    }

    async fn mirror_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
    ) -> Result<MirrorReport, ProviderError> {
        self.mirror(service, vm, to).await
    }

    async fn migrate_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
        limits: &LiveLimits,
    ) -> Result<MigrationReport, ProviderError> {
        self.migrate(service, vm, to, limits).await
    }

    async fn resume_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        if self.wake(service, vm).await? {
            return Ok(());
        }
        self.resume(service, vm).await
    }

    async fn cancel_mirror(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        self.cancel_mirrors(service, vm).await
    }

    async fn track_vm_disks(
        &self,
        service: &str,
        vm: &str,
        kind: DiskPassKind,
    ) -> Result<DiskPass, ProviderError> {
        self.track(service, vm, kind).await
    }

    async fn halt_vm(
        &self,
        service: &str,
        vm: &str,
        timeout: Duration,
    ) -> Result<Halt, ProviderError> {
        self.halt(service, vm, timeout).await
    }

    async fn untrack_vm_disks(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        if self.running(service, vm).is_none() {
            return Ok(());
        }
        self.untrack(service, vm).await
    }

    async fn free_bytes(&self) -> Result<Option<u64>, ProviderError> {
        let dir = self.root.join("volumes");
        available_bytes(&dir).map(Some).map_err(|e| {
            self.io(
                format!("directory {}", dir.display()),
                "measure free space".to_string(),
                e,
            )
        })
    }
}

#[cfg(test)]
mod tests;
