//! Migrators: in the paper's words, the libraries and services that "carry out one specific
//! task related to (partial) relocation of service instances". The conduit plans a
//! relocation as steps; [`for_step`] gives the [`Migrator`] of each, which [`Migrator::run`]s
//! it forward and [`Migrator::undo`]es it in a rollback. Every migrator gets the same
//! context, a [`Cx`]: the plan, the configuration, both providers, the work directory,
//! cancellation and progress. None of them knows about the journal or the engine.
//!
//! - [`preflight`]: checks both ends before anything is written.
//! - [`volume`]: the pre-copy and final sync of a volume over the viaduct, with [`convert`]
//!   for disks whose format changes (qemu-img conversion, delta write-back), and
//!   [`crossing`] when one end or both are on another host (agent to agent).
//! - [`bucket`]: the copy and final sync of a bucket, with the [`crate::providers::copier`]. A bucket kept at
//!   its source gets no step, only a note in the plan: the apps are pointed at it there.
//! - [`app`]: stops the source's apps and VMs, starts the target's.
//! - [`live`]: moves a running VM to the target without a reboot (disk mirror and memory
//!   migration), falling back to a cold move when it does not converge in time.
//! - [`config`]: rewrites a configuration file for the target (rules in [`rewrite`]).
//! - [`recontextualise`]: hands the target its context document and runs the hook.
//! - [`health`]: the target's health check.
//! - [`cutover`]: the cutover hook that repoints clients.
//! - [`decommission`]: deletes the source's copy after the grace period.
//!
//! [`deploy`] holds the specs and placeholders they deploy with, and makes a service present
//! where it is placed. The commit is the conduit's own: it only switches the placement.
//!
//! The steps themselves are described in [`plan`] (the conduit's planner builds them), and
//! [`hooks`] calls the owner's cutover and re-contextualisation programs or webhooks.

pub mod app;
pub mod bucket;
pub mod config;
pub mod convert;
pub mod crossing;
pub mod cutover;
pub mod decommission;
pub mod deploy;
pub mod health;
pub mod hooks;
pub mod live;
pub mod plan;
pub mod precopy;
pub mod preflight;
pub mod recontextualise;
pub mod rewrite;
pub mod volume;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::{Component, ComponentKind, ServiceSpec};
use crate::providers::{Provider, ProviderError};
use crate::telemetry::Metrics;
use crate::viaduct;
use hooks::HookError;
use plan::{Action, Plan, Step};

/// One task of a relocation, forward and back.
#[async_trait::async_trait]
pub trait Migrator: Send + Sync {
    /// Does the step; idempotent (running it again after a crash gives the same result).
    /// Returns what the journal keeps of it (bytes, digests, how it was verified).
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError>;
    /// Undoes what `run` did or may have done, leaving the source as it was; idempotent.
    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError>;
}

/// The migrator of a step.
pub fn for_step(step: &Step) -> Box<dyn Migrator> {
    match &step.action {
        Action::Preflight => Box::new(preflight::Preflight),
        Action::PrecopyVolume { volume } => Box::new(volume::CopyVolume {
            step: step.name.clone(),
            volume: volume.clone(),
            final_pass: false,
        }),
        Action::SyncVolume { volume } => Box::new(volume::CopyVolume {
            step: step.name.clone(),
            volume: volume.clone(),
            final_pass: true,
        }),
        Action::CopyBucket { bucket } | Action::SyncBucket { bucket } => {
            Box::new(bucket::CopyBucket {
                step: step.name.clone(),
                bucket: bucket.clone(),
            })
        }
        Action::StopSource { app } => Box::new(app::StopSource {
            kind: ComponentKind::App,
            name: app.clone(),
        }),
        Action::StopSourceVm { vm } => Box::new(app::StopSource {
            kind: ComponentKind::Vm,
            name: vm.clone(),
        }),
        Action::WriteConfig { file, app } => Box::new(config::WriteConfig {
            file: file.clone(),
            app: app.clone(),
        }),
        Action::Recontextualise => Box::new(recontextualise::Recontextualise),
        Action::StartTarget { app } => Box::new(app::StartTarget { app: app.clone() }),
        Action::StartTargetVm { vm } => Box::new(app::StartTargetVm { vm: vm.clone() }),
        Action::PrepareTargetVm { vm } => Box::new(live::PrepareTargetVm { vm: vm.clone() }),
        Action::MirrorVm { vm } => Box::new(live::MirrorVm { vm: vm.clone() }),
        Action::MigrateVm { vm } => Box::new(live::MigrateVm { vm: vm.clone() }),
        Action::ResumeTargetVm { vm } => Box::new(live::ResumeTargetVm { vm: vm.clone() }),
        Action::ReleaseSourceVm { vm } => Box::new(live::ReleaseSourceVm { vm: vm.clone() }),
        Action::PrecopyVm { vm, disks } => Box::new(precopy::PrecopyVm {
            vm: vm.clone(),
            disks: disks.clone(),
        }),
        Action::FinalPassVm { vm, disks } => Box::new(precopy::FinishPrecopyVm {
            vm: vm.clone(),
            disks: disks.clone(),
        }),
        Action::HealthCheck => Box::new(health::HealthCheck),
        Action::Cutover => Box::new(cutover::Cutover),
        Action::Commit => Box::new(Commit),
        Action::Decommission => Box::new(decommission::Decommission),
    }
}

/// The commit switches the placement in the conduit's journal; as a migrator it does
/// nothing, and a rollback never reaches past it.
struct Commit;

#[async_trait::async_trait]
impl Migrator for Commit {
    async fn run(&self, _: &Cx) -> Result<Value, MigratorError> {
        Ok(Value::Null)
    }
    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}

/// Hears the transfers of the migrators, for progress bars and the API.
pub trait Observer: Send + Sync {
    fn transfer(&self, relocation: &str, step: &str, progress: &viaduct::Progress);
    /// A bucket copy's progress, a few times a second.
    fn bucket(
        &self,
        relocation: &str,
        step: &str,
        progress: &crate::providers::copier::BucketProgress,
    ) {
        let _ = (relocation, step, progress);
    }
}

/// Opens a provider by name (or gives the one already open).
pub type OpenProvider = Arc<dyn Fn(&str) -> Result<Arc<dyn Provider>, ProviderError> + Send + Sync>;

/// What every migrator of one relocation works with.
pub struct Cx {
    /// The relocation's id.
    pub id: String,
    pub plan: Plan,
    pub config: Arc<Config>,
    pub source: Arc<dyn Provider>,
    pub target: Arc<dyn Provider>,
    /// Reaches the providers that hold the buckets kept at their source.
    pub open: OpenProvider,
    /// The relocation's working files: staging images, manifests, known hashes.
    pub work_dir: PathBuf,
    /// The steps the journal held as done when the relocation was picked up: a volume the
    /// target already holds is this relocation's own when a step of it is among them.
    pub done: Vec<String>,
    /// Cancelled when a transfer fails, so the copies running beside it stop early and the
    /// rollback begins; a child of `cancelled`.
    pub transfers: CancellationToken,
    /// Cancelled by an operator's cancel before the commit.
    pub cancelled: CancellationToken,
    pub observer: Option<Arc<dyn Observer>>,
    pub metrics: Option<Arc<Metrics>>,
}

impl Cx {
    pub fn svc(&self) -> &str {
        &self.plan.service
    }

    pub fn spec(&self) -> Result<&ServiceSpec, MigratorError> {
        self.config.services.get(&self.plan.service).ok_or_else(|| {
            MigratorError::Check(format!(
                "service `{}` is no longer in the configuration",
                self.plan.service
            ))
        })
    }

    pub fn component(&self, kind: ComponentKind, name: &str) -> Result<&Component, MigratorError> {
        self.spec()?
            .components
            .iter()
            .find(|c| c.kind == kind && c.name == name)
            .ok_or_else(|| {
                MigratorError::Check(format!(
                    "service `{}` no longer has {} `{name}`",
                    self.plan.service,
                    kind.as_str()
                ))
            })
    }

    /// The providers holding the buckets of `spec` that stay where they are when it moves.
    pub fn bucket_homes(&self, spec: &ServiceSpec) -> Result<deploy::BucketHomes, ProviderError> {
        deploy::bucket_homes(spec, |name| (self.open)(name))
    }

    /// Reports a volume transfer of `step` to the observer.
    pub fn progress(&self, step: &str) -> Option<viaduct::ProgressFn> {
        let observer = self.observer.clone()?;
        let id = self.id.clone();
        let step = step.to_string();
        Some(Arc::new(move |p: &viaduct::Progress| {
            observer.transfer(&id, &step, p)
        }))
    }

    /// Counts what a transfer of `kind` read and sent.
    pub fn count_bytes(&self, kind: &str, read: u64, sent: u64, started: Instant) {
        if let Some(m) = &self.metrics {
            m.relocation_bytes_read
                .with_label_values(&[kind])
                .inc_by(read);
            m.relocation_bytes_sent
                .with_label_values(&[kind])
                .inc_by(sent);
            let secs = started.elapsed().as_secs_f64();
            if secs > 0.0 {
                m.relocation_throughput
                    .with_label_values(&[kind])
                    .set(read as f64 / secs);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigratorError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Deploy(#[from] deploy::DeployError),
    #[error(transparent)]
    Viaduct(#[from] viaduct::ViaductError),
    #[error(transparent)]
    Rewrite(#[from] rewrite::RewriteError),
    /// A working file or an image could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A task the step ran beside it (a copy, a flush) ended without an answer.
    #[error("the {task} task failed: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A tool (`qemu-img`, `qemu-io`) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed; `output` is what it said.
    #[error("`{command}` failed ({status}): {output}")]
    Tool {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error("bucket `{bucket}`: {source}")]
    Bucket {
        bucket: String,
        #[source]
        source: Box<crate::providers::copier::BucketCopyError>,
    },
    /// `what` names the hook: "the cutover hook (rollback)".
    #[error("{what} failed: {source}")]
    Hook {
        what: String,
        #[source]
        source: Box<HookError>,
    },
    /// Something the step checks does not hold; the message says what, and what to do.
    #[error("{0}")]
    Check(String),
    #[error("cancelled by an operator")]
    Cancelled,
}

impl MigratorError {
    pub(crate) fn file(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        MigratorError::File {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Removes a file that may not exist.
pub(crate) fn remove_file(path: &Path) -> Result<(), MigratorError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(MigratorError::file("remove", path, e)),
    }
}

/// The first few of `names`, quoted, and how many more there are.
pub(crate) fn name_some(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}
