//! The planner: from a service's topology and the two providers, the ordered task graph of
//! one relocation. Planning touches nothing; `fluidcloud plan` prints what it returns.
//!
//! A plan has three phases:
//!
//! 1. **Pre-copy**, while the source runs: preflight checks, then every volume is copied to
//!    the target and every bucket that moves is copied.
//! 2. **Cutover**, the only downtime: the source apps stop, the final delta of each volume
//!    and bucket travels and is verified, configuration files are rewritten for the target,
//!    the target gets its context and starts, its health check must pass, and the cutover
//!    hook repoints clients. `commit` is the point of no return: the placement switches to
//!    the target. Any failure before it rolls back to the running source.
//! 3. **Grace**, after the commit: the source is kept, stopped and intact, for the grace
//!    period, then decommissioned.
//!
//! Steps are named `<action>:<object>`; the names are the journal's checkpoints. The plan's
//! types live with the migrators that run its steps ([`crate::migrators::plan`]) and are
//! re-exported here, beside the planner that makes them.

pub use crate::migrators::plan::{Action, Phase, Plan, Step, VolumePlan};
use crate::sys::units::human_bytes;

use crate::config::{self, Config};
use crate::model::{Component, ComponentKind, Driver, LiveFallback, ServiceSpec, VmMode};
use crate::providers::VmSpec;
use crate::providers::{Capabilities, DiskFormat};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("no service `{0}` in the configuration")]
    UnknownService(String),
    #[error("no provider `{name}` in the configuration; known providers: {known}")]
    UnknownProvider { name: String, known: String },
    #[error("service `{service}` already runs on `{provider}`")]
    SameProvider { service: String, provider: String },
    #[error("cannot move service `{service}` to `{provider}`: {reason}")]
    Incompatible {
        service: String,
        provider: String,
        reason: String,
    },
    /// A conduit that cannot plan (one that only records, in tests).
    #[error("this conduit does not plan")]
    Unsupported,
}

/// Plans the relocation of `service` from `from` (where it runs now) to `to`.
pub fn plan(config: &Config, service: &str, from: &str, to: &str) -> Result<Plan, PlanError> {
    let spec = config
        .services
        .get(service)
        .ok_or_else(|| PlanError::UnknownService(service.to_string()))?;
    let known = || {
        config
            .providers
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let source = config
        .providers
        .get(from)
        .ok_or_else(|| PlanError::UnknownProvider {
            name: from.to_string(),
            known: known(),
        })?;
    let target = config
        .providers
        .get(to)
        .ok_or_else(|| PlanError::UnknownProvider {
            name: to.to_string(),
            known: known(),
        })?;
    if from == to {
        return Err(PlanError::SameProvider {
            service: service.to_string(),
            provider: to.to_string(),
        });
    }
    let mode = spec
        .vm_moves
        .mode
        .or_else(|| config.policies.get(&spec.policy).and_then(|p| p.vm_mode))
        .unwrap_or_default();
    build(spec, source, target, mode)
}

/// Why the disks of a VM cannot be pre-copied from `source`, if they cannot. Any target
/// will do: the passes are read on the source's host (by its agent when one serves it; the
/// daemon's configuration names the driver the agent runs) and, between hosts, sent to the
/// target's host over the viaduct.
fn precopy_blocker(source: &config::Provider) -> Option<String> {
    if source.driver != Driver::Qemu {
        return Some(format!(
            "it needs the qemu driver at the source (`{}` uses `{}`)",
            source.name,
            source.driver.as_str()
        ));
    }
    None
}

/// Why a VM of `spec` cannot move live from `source` to `target`, if it cannot.
fn live_blocker(
    vm: &VmSpec,
    source: &config::Provider,
    target: &config::Provider,
) -> Option<String> {
    if source.driver != Driver::Qemu || target.driver != Driver::Qemu {
        return Some(format!(
            "it needs the qemu driver at both ends (`{}` uses `{}`, `{}` uses `{}`)",
            source.name,
            source.driver.as_str(),
            target.name,
            target.driver.as_str()
        ));
    }
    // Between hosts the emulators talk host to host under TLS (see `migrators::live`).
    // The machine settings of a provider an agent serves are in the agent's configuration,
    // not here: those are compared by QEMU itself, whose refusal fails the migration and
    // rolls the relocation back with the guest running on at the source.
    let (a, b) = match (&source.agent, &target.agent) {
        (None, None) => (
            source.qemu.clone().unwrap_or_default(),
            target.qemu.clone().unwrap_or_default(),
        ),
        _ => Default::default(),
    };
    let mut differ = Vec::new();
    if a.disk_bus != b.disk_bus {
        differ.push(format!(
            "disk bus {} at `{}`, {} at `{}`",
            a.disk_bus.as_str(),
            source.name,
            b.disk_bus.as_str(),
            target.name
        ));
    }
    if a.nic_model != b.nic_model {
        differ.push(format!(
            "NIC {} at `{}`, {} at `{}`",
            a.nic_model, source.name, b.nic_model, target.name
        ));
    }
    if a.accel != b.accel {
        differ.push(format!(
            "accelerator {} at `{}`, {} at `{}`",
            a.accel.as_str(),
            source.name,
            b.accel.as_str(),
            target.name
        ));
    }
    if !differ.is_empty() {
        return Some(format!(
            "the machines differ ({}), and a running guest cannot change its devices",
            differ.join("; ")
        ));
    }
    // Both ends on one host: the daemon's own providers, or one agent's.
    let one_host = source.agent == target.agent;
    if one_host && vm.ports.iter().any(|p| p.host.is_some()) {
        return Some(
            "it forwards fixed host ports, which both emulators would need at once on this host"
                .to_string(),
        );
    }
    None
}

/// Checks the target can hold every component that travels.
fn check_capabilities(spec: &ServiceSpec, target: &config::Provider) -> Result<(), PlanError> {
    let dst_caps = Capabilities::of(target.driver);
    let mut missing = Vec::new();
    for c in &spec.components {
        let (need, what) = match c.kind {
            ComponentKind::Vm => (dst_caps.compute, "compute (virtual machines)"),
            ComponentKind::Volume => (dst_caps.block, "block volumes"),
            ComponentKind::Bucket if c.keep_at_source => (true, ""),
            ComponentKind::Bucket => (dst_caps.object, "object storage"),
            ComponentKind::App | ComponentKind::Config => (dst_caps.app, "apps"),
        };
        if !need {
            missing.push(format!(
                "{} `{}` needs {what}, which the `{}` driver of `{}` lacks",
                c.kind.as_str(),
                c.name,
                target.driver.as_str(),
                target.name
            ));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(PlanError::Incompatible {
        service: spec.name.clone(),
        provider: target.name.clone(),
        reason: missing.join("; "),
    })
}

/// The components of a service, sorted by what a relocation does with them.
struct Parts<'a> {
    apps: Vec<&'a str>,
    /// VMs moved cold (powered down, disk copied, booted at the target).
    vms: Vec<&'a str>,
    /// VMs moved live; their disks are mirrored, not copied as volumes.
    live: Vec<&'a str>,
    /// VMs whose disks are pre-copied while they run, with those disks (not copied as
    /// volumes).
    precopy: Vec<(&'a str, Vec<VolumePlan>)>,
    /// A VM's disk is the volume named like it: it travels like any volume.
    volumes: Vec<VolumePlan>,
    buckets: Vec<&'a Component>,
    configs: Vec<&'a Component>,
}

impl<'a> Parts<'a> {
    fn of(spec: &'a ServiceSpec, source: &config::Provider, target: &config::Provider) -> Self {
        let named = |kind: ComponentKind| {
            spec.components
                .iter()
                .filter(move |c| c.kind == kind)
                .map(|c| c.name.as_str())
                .collect()
        };
        let all = |kind: ComponentKind| spec.components.iter().filter(|c| c.kind == kind).collect();
        Parts {
            apps: named(ComponentKind::App),
            vms: named(ComponentKind::Vm),
            live: Vec::new(),
            precopy: Vec::new(),
            volumes: spec
                .components
                .iter()
                .filter(|c| matches!(c.kind, ComponentKind::Volume | ComponentKind::Vm))
                .map(|c| VolumePlan {
                    name: c.name.clone(),
                    size_bytes: round_up_sector((c.size_gib * GIB) as u64),
                    source_format: source.disk_format,
                    target_format: target.disk_format,
                })
                .collect(),
            buckets: all(ComponentKind::Bucket),
            configs: all(ComponentKind::Config),
        }
    }

    /// The buckets that travel with the service.
    fn moving_buckets(&self) -> impl Iterator<Item = &&'a Component> {
        self.buckets.iter().filter(|b| !b.keep_at_source)
    }
}

/// A plan being built, step by step in plan order.
struct Builder<'a> {
    spec: &'a ServiceSpec,
    source: &'a config::Provider,
    target: &'a config::Provider,
    parts: Parts<'a>,
    steps: Vec<Step>,
    notes: Vec<String>,
}

/// `steps` when there are any, else what they would have waited for.
fn or_else(steps: Vec<String>, before: Vec<String>) -> Vec<String> {
    if steps.is_empty() {
        before
    } else {
        steps
    }
}

fn build(
    spec: &ServiceSpec,
    source: &config::Provider,
    target: &config::Provider,
    mode: VmMode,
) -> Result<Plan, PlanError> {
    check_capabilities(spec, target)?;
    let mut b = Builder {
        spec,
        source,
        target,
        parts: Parts::of(spec, source, target),
        steps: Vec::new(),
        notes: Vec::new(),
    };
    match mode {
        VmMode::Live => b.choose_live(),
        VmMode::Precopy => b.choose_precopy(),
        VmMode::Cold => {}
    }
    b.preflight();
    let mut precopies = b.precopy_volumes();
    precopies.extend(b.copy_buckets());
    precopies.extend(b.mirror_vms());
    precopies.extend(b.precopy_vms());
    let mut stops = b.stop_sources(&precopies);
    stops.extend(b.migrate_vms(&precopies));
    let cut_base = or_else(stops, precopies);
    let synced = b.sync_data(&cut_base);
    let data_ready = or_else(synced, cut_base);
    let configured = b.write_configs(&data_ready);
    let ready = b.recontextualise(data_ready.into_iter().chain(configured).collect());
    let started = b.start_targets(&ready);
    let last = b.health_check(or_else(started, ready));
    let last = b.cutover(last);
    b.commit(last);
    b.release_sources();
    b.decommission();
    Ok(b.finish())
}

impl Builder<'_> {
    /// Adds a step; returns its name.
    fn push(
        &mut self,
        phase: Phase,
        action: Action,
        name: String,
        after: Vec<String>,
        description: String,
    ) -> String {
        self.steps.push(Step {
            name: name.clone(),
            phase,
            action,
            after,
            description,
        });
        name
    }

    /// Moves live the VMs that can be; the others stay cold, with a note saying why.
    fn choose_live(&mut self) {
        for c in &self.spec.components {
            let Some(vm) = c.vm() else {
                continue;
            };
            if let Some(why) = live_blocker(vm, self.source, self.target) {
                self.notes.push(format!(
                    "VM `{}` moves cold: live migration is not possible: {why}",
                    vm.name
                ));
                continue;
            }
            self.parts.vms.retain(|v| *v != vm.name);
            self.parts.live.push(c.name.as_str());
            let disks: Vec<&str> = vm.disks().collect();
            self.parts
                .volumes
                .retain(|v| !disks.contains(&v.name.as_str()));
            let fallback = match self.spec.vm_moves.fallback {
                LiveFallback::Cold => "it moves cold instead",
                LiveFallback::Rollback => "the relocation rolls back",
            };
            self.notes.push(format!(
                "VM `{}` moves live: no reboot, pauses of up to {:?} planned; if the migration does not converge within {:?}, {fallback}",
                vm.name, self.spec.vm_moves.downtime_limit, self.spec.vm_moves.timeout
            ));
        }
    }

    /// Pre-copies the disks of the VMs that can be while they run; the others stay cold,
    /// with a note saying why.
    fn choose_precopy(&mut self) {
        for c in &self.spec.components {
            let Some(vm) = c.vm() else {
                continue;
            };
            if let Some(why) = precopy_blocker(self.source) {
                self.notes.push(format!(
                    "VM `{}` moves cold: its disks cannot be pre-copied while it runs: {why}",
                    vm.name
                ));
                continue;
            }
            self.parts.vms.retain(|v| *v != vm.name);
            let disks: Vec<&str> = vm.disks().collect();
            let (moving, rest) = std::mem::take(&mut self.parts.volumes)
                .into_iter()
                .partition(|v| disks.contains(&v.name.as_str()));
            self.parts.volumes = rest;
            self.parts.precopy.push((c.name.as_str(), moving));
            self.notes.push(format!(
                "VM `{}`'s disks are copied while it runs, whatever their format; it powers down only for the last of what it wrote, then boots at `{}`",
                vm.name, self.target.name
            ));
        }
    }

    /// Copies the disks of each pre-copied VM while it runs.
    fn precopy_vms(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for (vm, disks) in self.parts.precopy.clone() {
            let d = format!(
                "copy the disks of VM `{vm}` to `{}` ({}) while it runs, in passes over what it wrote since the last",
                self.target.name,
                self.target.disk_format.as_str()
            );
            let action = Action::PrecopyVm {
                vm: vm.into(),
                disks,
            };
            let name = format!("precopy:vm:{vm}");
            names.push(self.push(Phase::Precopy, action, name, vec!["preflight".into()], d));
        }
        names
    }

    /// Starts each live VM at the target, waiting, and mirrors its disks there.
    fn mirror_vms(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        let (source, target) = (self.source.name.clone(), self.target.name.clone());
        for vm in self.parts.live.clone() {
            let d = format!(
                "create the disks of VM `{vm}` at `{target}` ({}, empty) and start it there waiting for its migration",
                self.target.disk_format.as_str()
            );
            let prepared = self.push(
                Phase::Precopy,
                Action::PrepareTargetVm { vm: vm.into() },
                format!("prepare-target:vm:{vm}"),
                vec!["preflight".into()],
                d,
            );
            let d = format!("mirror the disks of VM `{vm}` from `{source}` to `{target}` while it runs, until they are in step");
            names.push(self.push(
                Phase::Precopy,
                Action::MirrorVm { vm: vm.into() },
                format!("mirror:vm:{vm}"),
                vec![prepared],
                d,
            ));
        }
        names
    }

    /// Migrates each live VM's memory: the guest pauses for the last pass.
    fn migrate_vms(&mut self, after: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        for vm in self.parts.live.clone() {
            let d = format!(
                "migrate the memory of VM `{vm}` while it runs; it pauses for the last pass (downtime starts) and stays paused at `{}` until the commit",
                self.source.name
            );
            names.push(self.push(
                Phase::Cutover,
                Action::MigrateVm { vm: vm.into() },
                format!("migrate:vm:{vm}"),
                after.to_vec(),
                d,
            ));
        }
        names
    }

    /// Ends the paused source emulators of live-moved VMs, and the halted ones of pre-copied
    /// VMs, once the target is committed.
    fn release_sources(&mut self) {
        let precopied = self.parts.precopy.iter().map(|(vm, _)| *vm);
        for vm in self
            .parts
            .live
            .clone()
            .into_iter()
            .chain(precopied.collect::<Vec<_>>())
        {
            let d = format!(
                "end the paused emulator of VM `{vm}` at `{}` (its disk is kept until the decommission)",
                self.source.name
            );
            self.push(
                Phase::Grace,
                Action::ReleaseSourceVm { vm: vm.into() },
                format!("release-source:vm:{vm}"),
                vec!["commit".into()],
                d,
            );
        }
    }

    fn preflight(&mut self) {
        let d = format!(
            "check `{}` and `{}`, the source's components, free space at the target and the configuration rules",
            self.source.name, self.target.name
        );
        self.push(
            Phase::Precopy,
            Action::Preflight,
            "preflight".into(),
            vec![],
            d,
        );
    }

    /// Copies every volume while the source runs; a volume whose source is not raw is
    /// converted in full during cutover instead.
    fn precopy_volumes(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for v in self.parts.volumes.clone() {
            let d = if v.source_format == DiskFormat::Raw {
                format!(
                    "copy volume `{}` ({}, allocated extents only) to `{}` while the source runs",
                    v.name,
                    human_bytes(v.size_bytes),
                    self.target.name
                )
            } else {
                self.notes.push(format!(
                    "volume `{}` is {} at the source: it is converted in full during cutover, so there is no pre-copy",
                    v.name,
                    v.source_format.as_str()
                ));
                format!(
                    "nothing to pre-copy for volume `{}` ({} source)",
                    v.name,
                    v.source_format.as_str()
                )
            };
            let name = format!("precopy:volume:{}", v.name);
            let action = Action::PrecopyVolume { volume: v };
            names.push(self.push(Phase::Precopy, action, name, vec!["preflight".into()], d));
        }
        names
    }

    /// Copies every bucket that moves while the source runs; one kept at the source only
    /// gets a note.
    fn copy_buckets(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        for b in self.parts.buckets.clone() {
            if b.keep_at_source {
                self.notes.push(format!(
                    "bucket `{}` stays at `{}`; the app is pointed at it there",
                    b.name,
                    b.home.as_deref().unwrap_or(&self.spec.provider)
                ));
                continue;
            }
            let d = format!(
                "copy the objects of bucket `{}` to `{}` while the source runs",
                b.name, self.target.name
            );
            let action = Action::CopyBucket {
                bucket: b.name.clone(),
            };
            let name = format!("copy:bucket:{}", b.name);
            names.push(self.push(Phase::Precopy, action, name, vec!["preflight".into()], d));
        }
        names
    }

    /// Stops the source's apps, then its VMs: the downtime starts.
    fn stop_sources(&mut self, after: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        let source = &self.source.name;
        for app in self.parts.apps.clone() {
            let d = format!("stop app `{app}` at `{source}` (downtime starts; its data is kept)");
            let action = Action::StopSource { app: app.into() };
            let name = format!("stop-source:app:{app}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        for vm in self.parts.vms.clone() {
            let d =
                format!("power VM `{vm}` down at `{source}` (downtime starts; its disk is kept)");
            let action = Action::StopSourceVm { vm: vm.into() };
            let name = format!("stop-source:vm:{vm}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        for (vm, disks) in self.parts.precopy.clone() {
            let d = format!(
                "power VM `{vm}` down at `{source}` (downtime starts; its emulator is kept), copy what it wrote since the last pass, compare the whole disk"
            );
            let action = Action::FinalPassVm {
                vm: vm.into(),
                disks,
            };
            let name = format!("final-pass:vm:{vm}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        names
    }

    /// Sends the final delta of every volume and bucket that moves, and verifies it.
    fn sync_data(&mut self, after: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        for v in self.parts.volumes.clone() {
            let conversion = if v.source_format == v.target_format {
                String::new()
            } else {
                format!(
                    ", convert {} to {} with qemu-img",
                    v.source_format.as_str(),
                    v.target_format.as_str()
                )
            };
            let d = format!(
                "send what changed in volume `{}` since the pre-copy{conversion}, verify",
                v.name
            );
            let name = format!("sync:volume:{}", v.name);
            let action = Action::SyncVolume { volume: v };
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        let buckets: Vec<String> = self
            .parts
            .moving_buckets()
            .map(|b| b.name.clone())
            .collect();
        for bucket in buckets {
            let d = format!("copy what changed in bucket `{bucket}`, compare BLAKE3 manifests");
            let name = format!("sync:bucket:{bucket}");
            let action = Action::SyncBucket { bucket };
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        names
    }

    /// Rewrites every configuration file for the target.
    fn write_configs(&mut self, after: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        for c in self.parts.configs.clone() {
            let app = crate::migrators::deploy::config_app(self.spec, c).unwrap_or_default();
            let d = format!(
                "rewrite `{}` of app `{app}` for `{}` and check it",
                c.name, self.target.name
            );
            let action = Action::WriteConfig {
                file: c.name.clone(),
                app,
            };
            let name = format!("write-config:{}", c.name);
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        names
    }

    /// Hands the target its context before its apps start (VMs carry their own); returns
    /// what the starts wait for.
    fn recontextualise(&mut self, ready: Vec<String>) -> Vec<String> {
        if self.parts.apps.is_empty() {
            return ready;
        }
        let d = format!(
            "write the context document for `{}`{}",
            self.target.name,
            if self.spec.recontextualise.is_some() {
                " and run the re-contextualisation hook"
            } else {
                ""
            }
        );
        let name = "recontextualise".to_string();
        vec![self.push(Phase::Cutover, Action::Recontextualise, name, ready, d)]
    }

    /// Starts the target's apps, then boots its VMs.
    fn start_targets(&mut self, after: &[String]) -> Vec<String> {
        let mut names = Vec::new();
        let target = &self.target.name;
        for app in self.parts.apps.clone() {
            let d = format!("start app `{app}` at `{target}`");
            let action = Action::StartTarget { app: app.into() };
            let name = format!("start-target:app:{app}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        let bus = match &self.target.qemu {
            Some(q) => q.disk_bus.as_str(),
            None => "the provider's bus",
        };
        let precopied = self.parts.precopy.iter().map(|(vm, _)| *vm);
        for vm in self
            .parts
            .vms
            .clone()
            .into_iter()
            .chain(precopied.collect::<Vec<_>>())
        {
            let d = format!(
                "boot VM `{vm}` at `{target}` ({} disk on {bus})",
                self.target.disk_format.as_str(),
            );
            let action = Action::StartTargetVm { vm: vm.into() };
            let name = format!("start-target:vm:{vm}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        for vm in self.parts.live.clone() {
            let d = format!("let VM `{vm}` go on at `{target}`, without a reboot");
            let action = Action::ResumeTargetVm { vm: vm.into() };
            let name = format!("resume-target:vm:{vm}");
            names.push(self.push(Phase::Cutover, action, name, after.to_vec(), d));
        }
        names
    }

    /// The target must prove healthy: the downtime ends.
    fn health_check(&mut self, after: Vec<String>) -> String {
        let apps = &self.parts.apps;
        let vms: Vec<&str> = (self.parts.vms.iter().copied())
            .chain(self.parts.precopy.iter().map(|(vm, _)| *vm))
            .collect();
        let d = match &self.spec.health_check {
            Some(h) => format!(
                "run the service's health check at `{}` (up to {:?}; downtime ends)",
                self.target.name, h.timeout
            ),
            None if apps.is_empty() && vms.is_empty() => {
                "verify every component is present at the target".into()
            }
            None if apps.is_empty() => "wait until every VM runs".into(),
            None => "wait until every app runs and accepts connections on its port".into(),
        };
        let name = "health-check".to_string();
        self.push(Phase::Cutover, Action::HealthCheck, name, after, d)
    }

    /// Repoints clients when the service has a cutover hook; returns the last step so far.
    fn cutover(&mut self, last: String) -> String {
        if self.spec.cutover.is_none() {
            return last;
        }
        let d = "run the cutover hook to repoint clients from the old to the new endpoint";
        let name = "cutover".to_string();
        self.push(Phase::Cutover, Action::Cutover, name, vec![last], d.into())
    }

    fn commit(&mut self, last: String) {
        let d = format!(
            "switch the placement of `{}` to `{}` (no rollback after this)",
            self.spec.name, self.target.name
        );
        self.push(
            Phase::Cutover,
            Action::Commit,
            "commit".into(),
            vec![last],
            d,
        );
    }

    fn decommission(&mut self) {
        let d = format!(
            "after the grace period, delete the copy at `{}`{}",
            self.source.name,
            if self.parts.buckets.iter().any(|b| b.keep_at_source) {
                " (buckets that stay put are kept)"
            } else {
                ""
            }
        );
        let after = vec!["commit".into()];
        self.push(
            Phase::Grace,
            Action::Decommission,
            "decommission".into(),
            after,
            d,
        );
    }

    fn finish(self) -> Plan {
        let precopied = self.parts.precopy.iter().flat_map(|(_, disks)| disks);
        let bytes_to_move = (self.parts.volumes.iter().chain(precopied))
            .map(|v| v.size_bytes)
            .sum::<u64>()
            + self
                .parts
                .moving_buckets()
                .map(|b| (b.size_gib * GIB) as u64)
                .sum::<u64>();
        Plan {
            service: self.spec.name.clone(),
            from: self.source.name.clone(),
            to: self.target.name.clone(),
            steps: self.steps,
            notes: self.notes,
            bytes_to_move,
        }
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn round_up_sector(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[daemon]
state_dir = "state"

[broker]
evaluate_schedule = "0 0 0 1 1 *"

[providers.a]
driver = "local"
region = "us-east-1"
root = "providers/a"
disk_format = "qcow2"

[providers.b]
driver = "local"
region = "eu-central-1"
root = "providers/b"

[policies.watch]
file = "policy.rhai"
mode = "audit"

[services.shop]
provider = "a"
policy = "watch"
cutover = { command = ["/bin/true"] }

[[services.shop.components]]
kind = "app"
name = "web"
[services.shop.components.settings]
command = "/bin/true"

[[services.shop.components]]
kind = "config"
name = "web.toml"

[[services.shop.components]]
kind = "volume"
name = "data"
size_gib = 1

[[services.shop.components]]
kind = "bucket"
name = "assets"
size_gib = 1

[[services.shop.components]]
kind = "bucket"
name = "archive"
size_gib = 3
keep_at_source = true
"#;

    fn config() -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.rhai"), "").unwrap();
        let path = dir.path().join("fluidcloud.toml");
        Config::parse(&path, CONFIG).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_plan_orders_its_steps_by_phase_and_dependency() {
        let plan = plan(&config(), "shop", "a", "b").unwrap();
        assert_eq!(
            plan.step_names(),
            [
                "preflight",
                "precopy:volume:data",
                "copy:bucket:assets",
                "stop-source:app:web",
                "sync:volume:data",
                "sync:bucket:assets",
                "write-config:web.toml",
                "recontextualise",
                "start-target:app:web",
                "health-check",
                "cutover",
                "commit",
                "decommission",
            ]
        );
        let after = |name: &str| plan.steps[plan.index_of(name).unwrap()].after.clone();
        assert_eq!(
            after("stop-source:app:web"),
            ["precopy:volume:data", "copy:bucket:assets"]
        );
        assert_eq!(
            after("recontextualise"),
            [
                "sync:volume:data",
                "sync:bucket:assets",
                "write-config:web.toml"
            ]
        );
        assert_eq!(after("commit"), ["cutover"]);
        assert_eq!(plan.bytes_to_move, 2 * GIB as u64);
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        assert!(
            plan.notes[0].contains("qcow2 at the source"),
            "{:?}",
            plan.notes
        );
        assert!(
            plan.notes[1].contains("`archive` stays at `a`"),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn a_target_that_cannot_hold_a_component_is_refused() {
        let mut config = config();
        config.providers.get_mut("b").unwrap().driver = crate::model::Driver::S3;
        let err = plan(&config, "shop", "a", "b").unwrap_err();
        assert!(
            matches!(&err, PlanError::Incompatible { reason, .. } if reason.contains("app `web` needs apps")),
            "{err}"
        );
    }

    #[test]
    fn a_provider_on_another_host_gets_the_same_steps_as_one_here() {
        let mut config = config();
        let here = plan(&config, "shop", "a", "b").unwrap();
        config.providers.get_mut("b").unwrap().agent = Some("https://10.0.0.3:7481".into());
        let there = plan(&config, "shop", "a", "b").unwrap();
        let names = |p: &Plan| p.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&here), names(&there));
    }

    const VM_CONFIG: &str = r#"
[daemon]
state_dir = "state"

[broker]
evaluate_schedule = "0 0 0 1 1 *"

[providers.q1]
driver = "qemu"
region = "lab"
root = "q1"
disk_format = "qcow2"
qemu = { binary = "/bin/true" }

[providers.q2]
driver = "qemu"
region = "lab"
root = "q2"
qemu = { binary = "/bin/true" }

[policies.watch]
file = "policy.rhai"

[services.box]
provider = "q1"
policy = "watch"
vm_mode = "live"
live = { fallback = "rollback", timeout_secs = 30 }

[[services.box.components]]
kind = "vm"
name = "guest"
size_gib = 1
[services.box.components.settings]
ports = [{ guest = 80 }]

[[services.box.components]]
kind = "volume"
name = "data"
size_gib = 1
"#;

    fn vm_config(edit: impl FnOnce(&str) -> String) -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.rhai"), "").unwrap();
        let path = dir.path().join("fluidcloud.toml");
        Config::parse(&path, &edit(VM_CONFIG)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_live_vm_is_mirrored_and_migrated_instead_of_stopped_and_copied() {
        let plan = plan(&vm_config(str::to_string), "box", "q1", "q2").unwrap();
        assert_eq!(
            plan.step_names(),
            [
                "preflight",
                "precopy:volume:data",
                "prepare-target:vm:guest",
                "mirror:vm:guest",
                "migrate:vm:guest",
                "sync:volume:data",
                "resume-target:vm:guest",
                "health-check",
                "commit",
                "release-source:vm:guest",
                "decommission",
            ]
        );
        let after = |name: &str| plan.steps[plan.index_of(name).unwrap()].after.clone();
        assert_eq!(after("mirror:vm:guest"), ["prepare-target:vm:guest"]);
        assert_eq!(
            after("migrate:vm:guest"),
            ["precopy:volume:data", "mirror:vm:guest"]
        );
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("moves live") && n.contains("rolls back")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn a_precopied_vm_is_copied_while_it_runs_and_halted_only_for_its_last_writes() {
        let config = vm_config(|c| c.replace("vm_mode = \"live\"", "vm_mode = \"precopy\""));
        let plan = plan(&config, "box", "q1", "q2").unwrap();
        assert_eq!(
            plan.step_names(),
            [
                "preflight",
                "precopy:volume:data",
                "precopy:vm:guest",
                "final-pass:vm:guest",
                "sync:volume:data",
                "start-target:vm:guest",
                "health-check",
                "commit",
                "release-source:vm:guest",
                "decommission",
            ]
        );
        let step = &plan.steps[plan.index_of("precopy:vm:guest").unwrap()];
        // The VM's disk travels with the VM, not as a volume of its own.
        let Action::PrecopyVm { disks, .. } = &step.action else {
            panic!("{step:?}");
        };
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].name, "guest");
        assert!(!plan.step_names().contains(&"precopy:volume:guest"));
        let after = |name: &str| plan.steps[plan.index_of(name).unwrap()].after.clone();
        assert_eq!(
            after("final-pass:vm:guest"),
            ["precopy:volume:data", "precopy:vm:guest"]
        );
        assert!(plan.steps[plan.index_of("final-pass:vm:guest").unwrap()].restores_service());

        // Between hosts too, whichever end an agent serves: the passes are read on the
        // source's host and sent to the target's.
        for (q1, q2) in [
            (None, Some("https://10.0.0.3:7481")),
            (Some("https://10.0.0.2:7481"), None),
            (Some("https://10.0.0.2:7481"), Some("https://10.0.0.3:7481")),
        ] {
            let across = vm_config_on(
                |c| c.replace("vm_mode = \"live\"", "vm_mode = \"precopy\""),
                q1,
                q2,
            );
            let plan = super::plan(&across, "box", "q1", "q2").unwrap();
            let names = plan.step_names();
            assert!(names.contains(&"precopy:vm:guest"), "{q1:?} {q2:?}: {plan}");
            assert!(
                names.contains(&"final-pass:vm:guest"),
                "{q1:?} {q2:?}: {plan}"
            );
            assert!(
                !names.contains(&"stop-source:vm:guest"),
                "{q1:?} {q2:?}: {plan}"
            );
            assert!(
                !plan
                    .notes
                    .iter()
                    .any(|n| n.contains("cannot be pre-copied")),
                "{q1:?} {q2:?}: {:?}",
                plan.notes
            );
        }

        // A source that is not qemu has no dirty bitmaps to read.
        let mut local = config.providers["q1"].clone();
        local.driver = Driver::Local;
        let why = precopy_blocker(&local).expect("a local source cannot be pre-copied");
        assert!(why.contains("qemu driver"), "{why}");
        assert!(precopy_blocker(&config.providers["q1"]).is_none());
    }

    #[test]
    fn a_vm_that_cannot_move_live_moves_cold_with_a_note_saying_why() {
        for (edit, why) in [
            (
                (
                    "qemu = { binary = \"/bin/true\" }\n\n[policies",
                    "qemu = { binary = \"/bin/true\", disk_bus = \"sata\" }\n\n[policies",
                ),
                "disk bus virtio at `q1`, sata at `q2`",
            ),
            (
                ("{ guest = 80 }", "{ guest = 80, host = 8080 }"),
                "fixed host ports",
            ),
            (("vm_mode = \"live\"", "vm_mode = \"cold\""), ""),
        ] {
            let config = vm_config(|c| c.replace(edit.0, edit.1));
            let plan = plan(&config, "box", "q1", "q2").unwrap();
            assert!(plan.index_of("stop-source:vm:guest").is_some(), "{plan}");
            assert!(plan.index_of("migrate:vm:guest").is_none(), "{plan}");
            if !why.is_empty() {
                assert!(
                    plan.notes
                        .iter()
                        .any(|n| n.contains("moves cold") && n.contains(why)),
                    "{why}: {:?}",
                    plan.notes
                );
            }
        }
    }

    /// The VM configuration with `q1` and `q2` served by agents at these addresses.
    fn vm_config_on(
        edit: impl FnOnce(&str) -> String,
        q1: Option<&str>,
        q2: Option<&str>,
    ) -> Config {
        let mut config = vm_config(edit);
        for (name, agent) in [("q1", q1), ("q2", q2)] {
            let p = config.providers.get_mut(name).unwrap();
            p.agent = agent.map(str::to_string);
            if agent.is_some() {
                // An agent's machine settings are in the agent's configuration.
                p.qemu = None;
            }
        }
        config
    }

    #[test]
    fn a_vm_on_an_agents_provider_moves_live_too() {
        let sata = |c: &str| {
            c.replace(
                "root = \"q1\"\ndisk_format = \"qcow2\"\nqemu = { binary = \"/bin/true\" }",
                "root = \"q1\"\ndisk_format = \"qcow2\"\nqemu = { binary = \"/bin/true\", disk_bus = \"sata\" }",
            )
        };
        for (q1, q2) in [
            (Some("https://10.0.0.2:7481"), Some("https://10.0.0.3:7481")),
            (None, Some("https://10.0.0.3:7481")),
            (Some("https://10.0.0.2:7481"), None),
        ] {
            let plan = plan(&vm_config_on(sata, q1, q2), "box", "q1", "q2").unwrap();
            assert!(plan.index_of("migrate:vm:guest").is_some(), "{plan}");
            assert!(plan.index_of("stop-source:vm:guest").is_none(), "{plan}");
        }
    }

    #[test]
    fn fixed_host_ports_block_a_live_move_on_one_host_only() {
        let ports = |c: &str| c.replace("{ guest = 80 }", "{ guest = 80, host = 8080 }");
        let one_agent = Some("https://10.0.0.3:7481");
        for (q1, q2, live) in [
            (None, None, false),
            (one_agent, one_agent, false),
            (None, one_agent, true),
            (Some("https://10.0.0.2:7481"), one_agent, true),
        ] {
            let plan = plan(&vm_config_on(ports, q1, q2), "box", "q1", "q2").unwrap();
            assert_eq!(plan.index_of("migrate:vm:guest").is_some(), live, "{plan}");
            if !live {
                assert!(
                    plan.notes.iter().any(|n| n.contains("fixed host ports")),
                    "{:?}",
                    plan.notes
                );
            }
        }
    }

    #[test]
    fn a_policy_chooses_the_vm_mode_of_services_that_do_not() {
        let config = vm_config(|c| {
            c.replace("vm_mode = \"live\"\n", "").replace(
                "file = \"policy.rhai\"",
                "file = \"policy.rhai\"\nvm_mode = \"live\"",
            )
        });
        let plan = plan(&config, "box", "q1", "q2").unwrap();
        assert!(plan.index_of("migrate:vm:guest").is_some(), "{plan}");
    }
}
