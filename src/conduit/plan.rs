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
//! types live with the migrators that run its steps ([`crate::migrators::plan`]); they are
//! re-exported here under their old paths.

pub use crate::migrators::plan::{Action, Phase, Plan, Step, VolumePlan};
pub use crate::sys::units::human_bytes;

use crate::config::{self, Config, Driver, ServiceSpec};
use crate::model::ComponentKind;
use crate::providers::{Capabilities, DiskFormat};

/// What a driver can do, known without opening the provider.
pub fn driver_capabilities(driver: Driver) -> Capabilities {
    match driver {
        Driver::Local => Capabilities {
            compute: false,
            block: true,
            object: true,
            app: true,
        },
        Driver::Qemu => Capabilities {
            compute: true,
            block: true,
            object: false,
            app: false,
        },
        Driver::S3 | Driver::Swift => Capabilities {
            compute: false,
            block: false,
            object: true,
            app: false,
        },
    }
}

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
    build(spec, source, target)
}

fn build(
    spec: &ServiceSpec,
    source: &config::Provider,
    target: &config::Provider,
) -> Result<Plan, PlanError> {
    let incompatible = |reason: String| PlanError::Incompatible {
        service: spec.name.clone(),
        provider: target.name.clone(),
        reason,
    };
    let dst_caps = driver_capabilities(target.driver);
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
                crate::providers::driver_name(target.driver),
                target.name
            ));
        }
    }
    if !missing.is_empty() {
        return Err(incompatible(missing.join("; ")));
    }
    let apps: Vec<&str> = spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
        .map(|c| c.name.as_str())
        .collect();
    let vms: Vec<&str> = spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Vm)
        .map(|c| c.name.as_str())
        .collect();
    // A VM's disk is the volume named like it: it travels like any volume.
    let volumes: Vec<VolumePlan> = spec
        .components
        .iter()
        .filter(|c| matches!(c.kind, ComponentKind::Volume | ComponentKind::Vm))
        .map(|c| VolumePlan {
            name: c.name.clone(),
            size_bytes: round_up_sector((c.size_gib * GIB) as u64),
            source_format: source.disk_format,
            target_format: target.disk_format,
        })
        .collect();
    let buckets: Vec<&config::Component> = spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Bucket)
        .collect();
    let configs: Vec<&config::Component> = spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Config)
        .collect();

    let mut steps: Vec<Step> = Vec::new();
    let mut notes = Vec::new();
    let mut push = |phase: Phase, action: Action, name: String, after: Vec<String>, d: String| {
        steps.push(Step {
            name,
            phase,
            action,
            after,
            description: d,
        });
    };

    push(
        Phase::Precopy,
        Action::Preflight,
        "preflight".into(),
        vec![],
        format!(
            "check `{}` and `{}`, the source's components, free space at the target and the configuration rules",
            source.name, target.name
        ),
    );
    let mut precopies = Vec::new();
    for v in &volumes {
        let name = format!("precopy:volume:{}", v.name);
        let d = if v.source_format == DiskFormat::Raw {
            format!(
                "copy volume `{}` ({}, allocated extents only) to `{}` while the source runs",
                v.name,
                human_bytes(v.size_bytes),
                target.name
            )
        } else {
            notes.push(format!(
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
        push(
            Phase::Precopy,
            Action::PrecopyVolume { volume: v.clone() },
            name.clone(),
            vec!["preflight".into()],
            d,
        );
        precopies.push(name);
    }
    for b in &buckets {
        if b.keep_at_source {
            notes.push(format!(
                "bucket `{}` stays at `{}`; the app is pointed at it there",
                b.name,
                b.home.as_deref().unwrap_or(&spec.provider)
            ));
            continue;
        }
        let name = format!("copy:bucket:{}", b.name);
        push(
            Phase::Precopy,
            Action::CopyBucket {
                bucket: b.name.clone(),
            },
            name.clone(),
            vec!["preflight".into()],
            format!(
                "copy the objects of bucket `{}` to `{}` while the source runs",
                b.name, target.name
            ),
        );
        precopies.push(name);
    }
    let mut stops = Vec::new();
    for app in &apps {
        let name = format!("stop-source:app:{app}");
        push(
            Phase::Cutover,
            Action::StopSource {
                app: app.to_string(),
            },
            name.clone(),
            precopies.clone(),
            format!(
                "stop app `{app}` at `{}` (downtime starts; its data is kept)",
                source.name
            ),
        );
        stops.push(name);
    }
    for vm in &vms {
        let name = format!("stop-source:vm:{vm}");
        push(
            Phase::Cutover,
            Action::StopSourceVm { vm: vm.to_string() },
            name.clone(),
            precopies.clone(),
            format!(
                "power VM `{vm}` down at `{}` (downtime starts; its disk is kept)",
                source.name
            ),
        );
        stops.push(name);
    }
    let cut_base = if stops.is_empty() {
        precopies.clone()
    } else {
        stops.clone()
    };
    let mut synced = Vec::new();
    for v in &volumes {
        let name = format!("sync:volume:{}", v.name);
        let conversion = if v.source_format == v.target_format {
            String::new()
        } else {
            format!(
                ", convert {} to {} with qemu-img",
                v.source_format.as_str(),
                v.target_format.as_str()
            )
        };
        push(
            Phase::Cutover,
            Action::SyncVolume { volume: v.clone() },
            name.clone(),
            cut_base.clone(),
            format!(
                "send what changed in volume `{}` since the pre-copy{conversion}, verify",
                v.name
            ),
        );
        synced.push(name);
    }
    for b in buckets.iter().filter(|b| !b.keep_at_source) {
        let name = format!("sync:bucket:{}", b.name);
        push(
            Phase::Cutover,
            Action::SyncBucket {
                bucket: b.name.clone(),
            },
            name.clone(),
            cut_base.clone(),
            format!(
                "copy what changed in bucket `{}`, compare BLAKE3 manifests",
                b.name
            ),
        );
        synced.push(name);
    }
    let data_ready = if synced.is_empty() {
        cut_base.clone()
    } else {
        synced.clone()
    };
    let mut configured = Vec::new();
    for c in &configs {
        let app = crate::migrators::deploy::config_app(spec, c).unwrap_or_default();
        let name = format!("write-config:{}", c.name);
        push(
            Phase::Cutover,
            Action::WriteConfig {
                file: c.name.clone(),
                app: app.clone(),
            },
            name.clone(),
            data_ready.clone(),
            format!(
                "rewrite `{}` of app `{app}` for `{}` and check it",
                c.name, target.name
            ),
        );
        configured.push(name);
    }
    let mut ready = data_ready.clone();
    ready.extend(configured);
    if !apps.is_empty() {
        push(
            Phase::Cutover,
            Action::Recontextualise,
            "recontextualise".into(),
            ready.clone(),
            format!(
                "write the context document for `{}`{}",
                target.name,
                if spec.recontextualise.is_some() {
                    " and run the re-contextualisation hook"
                } else {
                    ""
                }
            ),
        );
        ready = vec!["recontextualise".into()];
    }
    let mut started = Vec::new();
    for app in &apps {
        let name = format!("start-target:app:{app}");
        push(
            Phase::Cutover,
            Action::StartTarget {
                app: app.to_string(),
            },
            name.clone(),
            ready.clone(),
            format!("start app `{app}` at `{}`", target.name),
        );
        started.push(name);
    }
    for vm in &vms {
        let name = format!("start-target:vm:{vm}");
        push(
            Phase::Cutover,
            Action::StartTargetVm { vm: vm.to_string() },
            name.clone(),
            ready.clone(),
            format!(
                "boot VM `{vm}` at `{}` ({} disk on {})",
                target.name,
                target.disk_format.as_str(),
                target
                    .qemu
                    .as_ref()
                    .map(|q| q.disk_bus.as_str())
                    .unwrap_or("the provider's bus")
            ),
        );
        started.push(name);
    }
    let before_health = if started.is_empty() {
        ready.clone()
    } else {
        started
    };
    push(
        Phase::Cutover,
        Action::HealthCheck,
        "health-check".into(),
        before_health,
        match &spec.health_check {
            Some(h) => format!(
                "run the service's health check at `{}` (up to {:?}; downtime ends)",
                target.name, h.timeout
            ),
            None if apps.is_empty() && vms.is_empty() => {
                "verify every component is present at the target".into()
            }
            None if apps.is_empty() => "wait until every VM runs".into(),
            None => "wait until every app runs and accepts connections on its port".into(),
        },
    );
    let mut last = "health-check".to_string();
    if spec.cutover.is_some() {
        push(
            Phase::Cutover,
            Action::Cutover,
            "cutover".into(),
            vec![last.clone()],
            "run the cutover hook to repoint clients from the old to the new endpoint".into(),
        );
        last = "cutover".into();
    }
    push(
        Phase::Cutover,
        Action::Commit,
        "commit".into(),
        vec![last],
        format!(
            "switch the placement of `{}` to `{}` (no rollback after this)",
            spec.name, target.name
        ),
    );
    push(
        Phase::Grace,
        Action::Decommission,
        "decommission".into(),
        vec!["commit".into()],
        format!(
            "after the grace period, delete the copy at `{}`{}",
            source.name,
            if buckets.iter().any(|b| b.keep_at_source) {
                " (buckets that stay put are kept)"
            } else {
                ""
            }
        ),
    );
    let bytes_to_move = volumes.iter().map(|v| v.size_bytes).sum::<u64>()
        + buckets
            .iter()
            .filter(|b| !b.keep_at_source)
            .map(|b| (b.size_gib * GIB) as u64)
            .sum::<u64>();
    Ok(Plan {
        service: spec.name.clone(),
        from: source.name.clone(),
        to: target.name.clone(),
        steps,
        notes,
        bytes_to_move,
    })
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn round_up_sector(n: u64) -> u64 {
    n.div_ceil(512) * 512
}
