//! The executor: drives one relocation through its plan, checkpointing every step in the
//! journal before and after it runs.
//!
//! # What happens after a crash
//!
//! - Before the cutover began (no source app stopped yet), the relocation **resumes**: the
//!   step that was in flight runs again (every step is idempotent) and the rest follow.
//! - During the cutover and before `commit`, it **rolls back**: the service has been down
//!   since the source stopped, and the quickest way back to a running service is the
//!   source, whose data was only ever read.
//! - After `commit`, it **resumes forward**: the target is live; only the grace period and
//!   the decommissioning remain.
//!
//! A rollback first puts the service back (cutover hook undone, target apps stopped, source
//! apps started), then deletes what the relocation wrote at the target.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::buckets;
use super::deploy::{self, DeployError};
use super::engine::Inner;
use super::hooks::{
    self, AppEndpoint, BucketContext, ContextDocument, HookEvent, HookPhase, CONTEXT_FILE_NAME,
};
use super::journal::{RelocationRecord, StepState};
use super::plan::{Action, Phase, Plan, Step, VolumePlan};
use super::rewrite::{self, Placeholders};
use super::RelocationState;
use crate::config::{Component, Config, ServiceSpec};
use crate::migrators::config::config_spec;
use crate::model::ComponentKind;
use crate::providers::{
    self, AppState, DiskFormat, Provider, ProviderError, StopOptions, VolumeSpec,
};
use crate::viaduct;

/// Hears what a relocation does, for progress bars and logs.
pub trait Observer: Send + Sync {
    fn step(&self, relocation: &str, step: &Step, state: StepState, detail: &str);
    fn transfer(&self, relocation: &str, step: &str, progress: &viaduct::Progress);
    /// A bucket copy's progress, a few times a second.
    fn bucket(&self, relocation: &str, step: &str, progress: &buckets::BucketProgress) {
        let _ = (relocation, step, progress);
    }
}

/// How many times a rollback action is tried before the relocation is marked failed.
const COMPENSATE_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error(transparent)]
    Viaduct(#[from] viaduct::ViaductError),
    #[error(transparent)]
    Rewrite(#[from] rewrite::RewriteError),
    #[error("{0}")]
    Other(String),
}

fn other(s: impl Into<String>) -> StepError {
    StepError::Other(s.into())
}

struct Ctx {
    inner: Arc<Inner>,
    id: String,
    plan: Plan,
    config: Arc<Config>,
    source: Arc<dyn Provider>,
    target: Arc<dyn Provider>,
    /// Cancelled when a transfer fails, so the copies running beside it stop early and the
    /// rollback begins; a child of `cancelled`.
    transfers: CancellationToken,
    /// Cancelled by an operator's cancel before the commit.
    cancelled: CancellationToken,
}

/// The rollback reason of a relocation an operator cancelled.
const CANCELLED: &str = "cancelled by an operator";

impl Ctx {
    fn spec(&self) -> Result<&ServiceSpec, StepError> {
        self.config.services.get(&self.plan.service).ok_or_else(|| {
            other(format!(
                "service `{}` is no longer in the configuration",
                self.plan.service
            ))
        })
    }

    fn component(&self, kind: ComponentKind, name: &str) -> Result<&Component, StepError> {
        self.spec()?
            .components
            .iter()
            .find(|c| c.kind == kind && c.name == name)
            .ok_or_else(|| {
                other(format!(
                    "service `{}` no longer has {} `{name}`",
                    self.plan.service,
                    kind.as_str()
                ))
            })
    }

    fn svc(&self) -> &str {
        &self.plan.service
    }

    fn work_dir(&self) -> PathBuf {
        self.inner.work_dir(&self.id)
    }

    fn set_state(&self, state: RelocationState, detail: &str) {
        if let Err(e) = self.inner.journal.set_state(&self.id, state, detail) {
            tracing::error!("Relocation {}: cannot journal its state: {e}.", self.id);
        }
    }

    fn checkpoint(
        &self,
        seq: usize,
        state: StepState,
        output: Option<&Value>,
        error: Option<&str>,
    ) {
        // A checkpoint that cannot be written is fatal for this process's view of the
        // relocation, but the step itself is idempotent, so the next start repeats it.
        if let Err(e) = self
            .inner
            .journal
            .set_step(&self.id, seq as u32, state, output, error)
        {
            tracing::error!("Relocation {}: cannot checkpoint step {seq}: {e}.", self.id);
        }
        kill_point(&self.plan.steps[seq].name, state);
        if let Some(o) = &self.inner.observer {
            o.step(
                &self.id,
                &self.plan.steps[seq],
                state,
                error.unwrap_or_default(),
            );
        }
    }

    fn progress(&self, step: &str) -> Option<viaduct::ProgressFn> {
        let observer = self.inner.observer.clone()?;
        let id = self.id.clone();
        let step = step.to_string();
        Some(Arc::new(move |p: &viaduct::Progress| {
            observer.transfer(&id, &step, p)
        }))
    }
}

/// Fault injection for crash tests: `FLUIDCLOUD_KILL_AT=<step>:<state>` makes the process
/// kill itself with SIGKILL right after that checkpoint reached the journal, exactly as a
/// power cut or the OOM killer would.
fn kill_point(step: &str, state: StepState) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("FLUIDCLOUD_KILL_AT").ok());
    if let Some(p) = point {
        if p.rsplit_once(':') == Some((step, state.as_str())) {
            tracing::warn!("FLUIDCLOUD_KILL_AT={p}: killing this process.");
            // SAFETY: sends a signal to this very process; no memory is involved.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// Drives the relocation `id` as far as it can go. `resumed` says it was found unfinished
/// at start rather than submitted to this process.
pub(super) async fn drive(inner: Arc<Inner>, id: String, resumed: bool) {
    let record = match inner.journal.get(&id) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::error!("Relocation {id}: cannot read it from the journal: {e}.");
            return;
        }
    };
    // Every relocation that leaves the queue counts as started, whatever happens next, so
    // that requested = started = finished once the conduit is idle.
    if record.state == RelocationState::Queued {
        if let Some(m) = &inner.metrics {
            m.relocations_started
                .with_label_values(&[&record.request.origin])
                .inc();
        }
    }
    let plan: Plan = match inner
        .journal
        .plan(&id)
        .map_err(|e| e.to_string())
        .and_then(|p| p.ok_or_else(|| "it has no plan".to_string()))
        .and_then(|p| serde_json::from_value(p).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            let detail = format!("cannot read its plan from the journal: {e}");
            tracing::error!("Relocation {id}: {detail}.");
            let _ = inner
                .journal
                .set_state(&id, RelocationState::Failed, &detail);
            count_finished(&inner, "failed");
            return;
        }
    };
    let config = inner.config();
    let open = |name: &str| inner.provider(name);
    let (source, target) = match (open(&plan.from), open(&plan.to)) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            // Nothing can be done without both ends; a queued relocation that never
            // started harmed nothing and is marked failed, anything else waits for a
            // restart with the provider back.
            tracing::error!("Relocation {id}: {e}.");
            if record.steps.iter().all(|s| s.state == StepState::Pending) {
                let _ = inner.journal.set_state(
                    &id,
                    RelocationState::RolledBack,
                    &format!("not started: {e}"),
                );
                count_finished(&inner, "rolled_back");
            }
            return;
        }
    };
    let cancelled = inner.cancel_token(&id);
    let ctx = Ctx {
        inner: inner.clone(),
        id: id.clone(),
        plan,
        config,
        source,
        target,
        transfers: cancelled.child_token(),
        cancelled,
    };
    let committed = step_state(&ctx, &record, "commit") == Some(StepState::Done);
    match record.state {
        s if s.is_final() => {}
        RelocationState::Grace => grace(&ctx).await,
        RelocationState::RollingBack => rollback(&ctx, &record.detail).await,
        _ if committed => {
            after_commit(&ctx).await;
        }
        _ if resumed && cutover_began(&ctx, &record) => {
            rollback(
                &ctx,
                "the process stopped during the cutover; rolling back to the source",
            )
            .await
        }
        _ => forward(&ctx, &record).await,
    }
}

fn step_state(ctx: &Ctx, record: &RelocationRecord, name: &str) -> Option<StepState> {
    let i = ctx.plan.index_of(name)?;
    record.steps.get(i).map(|s| s.state)
}

fn cutover_began(ctx: &Ctx, record: &RelocationRecord) -> bool {
    ctx.plan
        .steps
        .iter()
        .zip(&record.steps)
        .any(|(step, rec)| step.phase == Phase::Cutover && rec.state != StepState::Pending)
}

fn count_finished(inner: &Inner, outcome: &str) {
    if let Some(m) = &inner.metrics {
        m.relocations_finished.with_label_values(&[outcome]).inc();
    }
}

fn observe_phase(inner: &Inner, phase: &str, secs: f64) {
    if let Some(m) = &inner.metrics {
        m.relocation_phase_duration
            .with_label_values(&[phase])
            .observe(secs);
    }
}

async fn forward(ctx: &Ctx, record: &RelocationRecord) {
    tracing::info!(
        "Relocation {}: moving `{}` from `{}` to `{}`.",
        ctx.id,
        ctx.svc(),
        ctx.plan.from,
        ctx.plan.to
    );
    let mut phase_started = Instant::now();
    let mut phase = Phase::Precopy;
    let steps = &ctx.plan.steps;
    let mut i = 0;
    while i < steps.len() && steps[i].phase != Phase::Grace {
        if steps[i].phase != phase {
            observe_phase(&ctx.inner, "precopy", phase_started.elapsed().as_secs_f64());
            phase = steps[i].phase;
            phase_started = Instant::now();
        }
        // Copies of different volumes and buckets run side by side, each checkpointed on
        // its own.
        let batch = ctx.plan.batch_at(i);
        i = batch.end;
        let todo: Vec<usize> = batch
            .filter(|&k| record.steps.get(k).map(|s| s.state) != Some(StepState::Done))
            .collect();
        if todo.is_empty() {
            continue;
        }
        // An operator's cancel is honoured between steps, and at the commit for the last time.
        let commit = todo
            .iter()
            .any(|&k| matches!(steps[k].action, Action::Commit));
        if ctx.cancelled.is_cancelled() || (commit && !ctx.inner.begin_commit(&ctx.id)) {
            rollback(ctx, CANCELLED).await;
            return;
        }
        let names: Vec<&str> = todo.iter().map(|&k| steps[k].name.as_str()).collect();
        let numbers: Vec<String> = todo.iter().map(|k| (k + 1).to_string()).collect();
        ctx.set_state(
            RelocationState::Running,
            &format!(
                "step{} {}: {}",
                if todo.len() > 1 { "s" } else { "" },
                numbers.join(", "),
                names.join(", ")
            ),
        );
        // A failure stops the other transfers of the batch; each one's outcome is journalled
        // before the rollback undoes them. The first to fail is the cause.
        let failures: Vec<(usize, String)> = stream::iter(todo)
            .map(|k| async move {
                ctx.checkpoint(k, StepState::Running, None, None);
                let run = async {
                    if matches!(steps[k].action, Action::Commit) {
                        return execute(ctx, &steps[k]).await;
                    }
                    // A cancel stops the step where it is (a health check that may wait
                    // for minutes, say); the rollback undoes what it did.
                    tokio::select! {
                        r = execute(ctx, &steps[k]) => r,
                        _ = ctx.cancelled.cancelled() => Err(other(CANCELLED)),
                    }
                };
                match run.await {
                    Ok(output) => {
                        ctx.checkpoint(k, StepState::Done, Some(&output), None);
                        None
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        tracing::warn!(
                            "Relocation {}: step `{}` failed: {msg}.",
                            ctx.id,
                            steps[k].name
                        );
                        ctx.transfers.cancel();
                        ctx.checkpoint(k, StepState::Failed, None, Some(&msg));
                        Some((k, msg))
                    }
                }
            })
            .buffer_unordered(ctx.config.conduit.transfer_concurrency.max(1))
            .filter_map(|f| async move { f })
            .collect()
            .await;
        if ctx.cancelled.is_cancelled() {
            rollback(ctx, CANCELLED).await;
            return;
        }
        if let Some((k, msg)) = failures.into_iter().next() {
            rollback(ctx, &format!("step `{}` failed: {msg}", steps[k].name)).await;
            return;
        }
    }
    observe_phase(&ctx.inner, "cutover", phase_started.elapsed().as_secs_f64());
    after_commit(ctx).await;
}

/// Records the cutover's figures, then waits out the grace period.
async fn after_commit(ctx: &Ctx) {
    if let Some(record) = ctx.inner.journal.get(&ctx.id).ok().flatten() {
        if record.state != RelocationState::Grace {
            if let Some(d) = downtime(&ctx.plan, &record) {
                if let Some(m) = &ctx.inner.metrics {
                    m.cutover_downtime.observe(d.as_secs_f64());
                    m.cutover_downtime_last
                        .with_label_values(&[ctx.svc()])
                        .set(d.as_secs_f64());
                }
            }
            count_finished(&ctx.inner, "completed");
            let until = Utc::now()
                + chrono::Duration::from_std(ctx.config.conduit.grace_period)
                    .unwrap_or(chrono::Duration::MAX);
            ctx.set_state(
                RelocationState::Grace,
                &format!(
                    "`{}` runs on `{}`; the source at `{}` is kept until {}",
                    ctx.svc(),
                    ctx.plan.to,
                    ctx.plan.from,
                    until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
            );
            tracing::info!(
                "Relocation {}: `{}` now runs on `{}`; the source is kept for {:?}.",
                ctx.id,
                ctx.svc(),
                ctx.plan.to,
                ctx.config.conduit.grace_period
            );
        }
    }
    grace(ctx).await;
}

/// Downtime of a cutover: from the first source app or VM stopping to the health check passing.
pub fn downtime(plan: &Plan, record: &RelocationRecord) -> Option<Duration> {
    let stopped = plan
        .steps
        .iter()
        .zip(&record.steps)
        .filter(|(s, _)| {
            matches!(
                s.action,
                Action::StopSource { .. } | Action::StopSourceVm { .. }
            )
        })
        .filter_map(|(_, r)| r.started_at)
        .min()?;
    let healthy = plan
        .steps
        .iter()
        .zip(&record.steps)
        .find(|(s, _)| matches!(s.action, Action::HealthCheck))
        .and_then(|(_, r)| r.finished_at)?;
    (healthy - stopped).to_std().ok()
}

async fn grace(ctx: &Ctx) {
    let Some(record) = ctx.inner.journal.get(&ctx.id).ok().flatten() else {
        return;
    };
    let committed_at = ctx
        .plan
        .index_of("commit")
        .and_then(|i| record.steps.get(i))
        .and_then(|s| s.finished_at)
        .unwrap_or_else(Utc::now);
    let grace = chrono::Duration::from_std(ctx.config.conduit.grace_period)
        .unwrap_or(chrono::Duration::MAX);
    let remaining = (committed_at + grace - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    tokio::time::sleep(remaining).await;
    let Some(i) = ctx.plan.index_of("decommission") else {
        ctx.set_state(RelocationState::Completed, "completed");
        return;
    };
    let started = Instant::now();
    ctx.checkpoint(i, StepState::Running, None, None);
    match decommission(ctx).await {
        Ok(out) => {
            ctx.checkpoint(i, StepState::Done, Some(&out), None);
            observe_phase(&ctx.inner, "decommission", started.elapsed().as_secs_f64());
            ctx.set_state(
                RelocationState::Completed,
                &format!(
                    "`{}` runs on `{}`; the source at `{}` was decommissioned",
                    ctx.svc(),
                    ctx.plan.to,
                    ctx.plan.from
                ),
            );
            tracing::info!(
                "Relocation {}: the source at `{}` was decommissioned.",
                ctx.id,
                ctx.plan.from
            );
        }
        Err(e) => {
            // The target is live; a source that cannot be deleted costs money but harms
            // nothing. The next start tries again.
            let msg = e.to_string();
            ctx.checkpoint(i, StepState::Failed, None, Some(&msg));
            ctx.set_state(
                RelocationState::Grace,
                &format!(
                    "decommissioning the source failed (tried again at the next start): {msg}"
                ),
            );
            tracing::warn!("Relocation {}: decommissioning failed: {msg}.", ctx.id);
        }
    }
}

async fn rollback(ctx: &Ctx, reason: &str) {
    let started = Instant::now();
    ctx.set_state(RelocationState::RollingBack, reason);
    tracing::warn!("Relocation {}: rolling back: {reason}.", ctx.id);
    let Some(record) = ctx.inner.journal.get(&ctx.id).ok().flatten() else {
        return;
    };
    let touched: Vec<usize> = (0..ctx.plan.steps.len())
        .rev()
        .filter(|&i| {
            matches!(
                record.steps.get(i).map(|s| s.state),
                Some(StepState::Running | StepState::Done | StepState::Failed)
            )
        })
        .collect();
    // The service first, the target's data after: the source runs again as soon as it can.
    let order = touched
        .iter()
        .filter(|&&i| ctx.plan.steps[i].restores_service())
        .chain(
            touched
                .iter()
                .filter(|&&i| !ctx.plan.steps[i].restores_service()),
        );
    for &i in order {
        let step = &ctx.plan.steps[i];
        let mut last = None;
        for attempt in 1..=COMPENSATE_ATTEMPTS {
            match compensate(ctx, step).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "Relocation {}: undoing `{}` failed (attempt {attempt}): {e}.",
                        ctx.id,
                        step.name
                    );
                    last = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        }
        if let Some(e) = last {
            let detail = format!(
                "{reason}; the rollback could not undo `{}`: {e}. The source's data was never written; check the source is running",
                step.name
            );
            ctx.checkpoint(i, StepState::Failed, None, Some(&e));
            ctx.set_state(RelocationState::Failed, &detail);
            count_finished(&ctx.inner, "failed");
            tracing::error!("Relocation {}: {detail}.", ctx.id);
            return;
        }
        ctx.checkpoint(i, StepState::Compensated, None, None);
    }
    let _ = std::fs::remove_dir_all(ctx.work_dir());
    observe_phase(&ctx.inner, "rollback", started.elapsed().as_secs_f64());
    ctx.set_state(
        RelocationState::RolledBack,
        &format!(
            "rolled back; `{}` runs on `{}`: {reason}",
            ctx.svc(),
            ctx.plan.from
        ),
    );
    count_finished(&ctx.inner, "rolled_back");
    tracing::info!(
        "Relocation {}: rolled back; `{}` runs on `{}` again.",
        ctx.id,
        ctx.svc(),
        ctx.plan.from
    );
}

async fn execute(ctx: &Ctx, step: &Step) -> Result<Value, StepError> {
    match &step.action {
        Action::Preflight => preflight(ctx).await,
        Action::PrecopyVolume { volume } => copy_volume(ctx, step, volume, false).await,
        Action::SyncVolume { volume } => copy_volume(ctx, step, volume, true).await,
        Action::CopyBucket { bucket } | Action::SyncBucket { bucket } => {
            copy_bucket(ctx, step, bucket).await
        }
        Action::StopSource { app } => stop_source(ctx, ComponentKind::App, app).await,
        Action::StopSourceVm { vm } => stop_source(ctx, ComponentKind::Vm, vm).await,
        Action::WriteConfig { file, app } => write_config(ctx, file, app).await,
        Action::Recontextualise => recontextualise(ctx).await,
        Action::StartTarget { app } => start_target(ctx, app).await,
        Action::StartTargetVm { vm } => start_target_vm(ctx, vm).await,
        Action::HealthCheck => health_check(ctx).await,
        Action::Cutover => cutover(ctx, "cutover").await,
        Action::Commit => {
            let journal = &ctx.inner.journal;
            for s in &ctx.plan.steps {
                if let Action::SyncVolume { volume } = &s.action {
                    journal
                        .set_deployed(ctx.svc(), &ctx.plan.to, &format!("volume:{}", volume.name))
                        .map_err(|e| other(e.to_string()))?;
                }
            }
            journal
                .set_placement(ctx.svc(), &ctx.plan.to, &ctx.id)
                .map_err(|e| other(e.to_string()))?;
            Ok(json!({ "placement": ctx.plan.to }))
        }
        Action::Decommission => decommission(ctx).await,
    }
}

async fn compensate(ctx: &Ctx, step: &Step) -> Result<(), StepError> {
    let svc = ctx.svc();
    match &step.action {
        Action::Preflight | Action::HealthCheck | Action::Commit | Action::Decommission => Ok(()),
        Action::PrecopyVolume { volume } | Action::SyncVolume { volume } => {
            let op = ctx.target.delete_volume(svc, &volume.name).await?;
            providers::wait_for(ctx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
            remove_file(&staging_path(ctx, volume))?;
            remove_file(&manifest_path(ctx, volume))?;
            Ok(())
        }
        Action::CopyBucket { bucket } | Action::SyncBucket { bucket } => {
            for o in ctx.target.list_objects(svc, bucket).await.or_else(|e| {
                if e.is_not_found() {
                    Ok(Vec::new())
                } else {
                    Err(e)
                }
            })? {
                ctx.target.delete_object(svc, bucket, &o.key).await?;
            }
            ctx.target.delete_bucket(svc, bucket).await?;
            Ok(())
        }
        Action::StopSource { app } => {
            let c = ctx.component(ComponentKind::App, app)?;
            let spec = deploy::app_spec(&ctx.config, svc, c)?;
            let op = ctx.source.start_app(svc, &spec).await?;
            providers::wait_for(ctx.source.as_ref(), &op.id, Duration::from_secs(60)).await?;
            Ok(())
        }
        Action::StopSourceVm { vm } => {
            let spec = ctx.spec()?;
            let vm = deploy::vm_spec(&ctx.config, spec, ctx.component(ComponentKind::Vm, vm)?)?;
            let op = ctx.source.start_vm(svc, &vm).await?;
            providers::wait_for(ctx.source.as_ref(), &op.id, Duration::from_secs(120)).await?;
            Ok(())
        }
        Action::StartTargetVm { vm } => {
            ctx.target
                .stop_vm(
                    svc,
                    vm,
                    StopOptions {
                        timeout: ctx.config.conduit.stop_timeout,
                        // The target never served anyone for real: it may be switched off.
                        kill_after_timeout: true,
                    },
                )
                .await?;
            ctx.target.remove_vm(svc, vm).await?;
            Ok(())
        }
        Action::StartTarget { app } => {
            ctx.target
                .stop_app(
                    svc,
                    app,
                    StopOptions {
                        timeout: ctx.config.conduit.stop_timeout,
                        // The target never served anyone for real: it may be killed.
                        kill_after_timeout: true,
                    },
                )
                .await?;
            ctx.target.remove_app(svc, app).await?;
            Ok(())
        }
        Action::WriteConfig { app, .. } => {
            if !matches!(
                ctx.target.app_status(svc, app).await?,
                Some(s) if s.state != AppState::Stopped
            ) {
                ctx.target.remove_app(svc, app).await?;
            }
            Ok(())
        }
        Action::Recontextualise => Ok(()),
        Action::Cutover => cutover(ctx, "rollback").await.map(|_| ()),
    }
}

fn remove_file(path: &Path) -> Result<(), StepError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(other(format!("cannot remove {}: {e}", path.display()))),
    }
}

// --- steps -----------------------------------------------------------------------------

async fn preflight(ctx: &Ctx) -> Result<Value, StepError> {
    ctx.spec()?;
    let svc = ctx.svc();
    let mut needed: u64 = 0;
    let mut checked = Vec::new();
    for step in &ctx.plan.steps {
        if let Action::PrecopyVolume { volume } = &step.action {
            let info = ctx
                .source
                .volume_info(svc, &volume.name)
                .await?
                .ok_or_else(|| {
                    other(format!(
                        "volume `{svc}/{}` does not exist at `{}`",
                        volume.name, ctx.plan.from
                    ))
                })?;
            if info.format != volume.source_format {
                return Err(other(format!(
                    "volume `{svc}/{}` at `{}` is {}, the plan expected {}",
                    volume.name,
                    ctx.plan.from,
                    info.format.as_str(),
                    volume.source_format.as_str()
                )));
            }
            if info.path.is_none() {
                return Err(other(format!(
                    "volume `{svc}/{}` at `{}` is not reachable from this machine",
                    volume.name, ctx.plan.from
                )));
            }
            if volume.source_format != DiskFormat::Raw {
                qemu_img(
                    // `-U`: a running VM holds a write lock on its disk; the check only reads.
                    &["check", "-U", "-f", volume.source_format.as_str()],
                    &[info.path.as_deref().unwrap_or(Path::new(""))],
                )
                .await
                .map_err(|e| {
                    other(format!(
                        "volume `{svc}/{}` at `{}` is damaged: {e}",
                        volume.name, ctx.plan.from
                    ))
                })?;
            }
            if ctx.target.volume_info(svc, &volume.name).await?.is_some()
                && !ctx
                    .inner
                    .journal
                    .get(&ctx.id)
                    .ok()
                    .flatten()
                    .is_some_and(|r| {
                        r.steps
                            .iter()
                            .any(|s| s.name.ends_with(&volume.name) && s.state == StepState::Done)
                    })
            {
                return Err(other(format!(
                    "`{}` already holds a volume `{svc}/{}`; it is not this relocation's, so it is left alone (remove it, or relocate elsewhere)",
                    ctx.plan.to, volume.name
                )));
            }
            needed += info.allocated_bytes;
            checked.push(format!("volume {}", volume.name));
        }
        if let Action::CopyBucket { bucket } = &step.action {
            let objects = ctx.source.list_objects(svc, bucket).await?;
            needed += objects.iter().map(|o| o.size).sum::<u64>();
            // What is not an object is not copied: moving without it must be asked for.
            let others = ctx.source.list_non_objects(svc, bucket).await?;
            if others.is_empty() {
                checked.push(format!("bucket {bucket} ({} objects)", objects.len()));
            } else if ctx
                .component(ComponentKind::Bucket, bucket)?
                .skip_special_files()
            {
                checked.push(format!(
                    "bucket {bucket} ({} objects; {} entries that are not objects stay at `{}`: {})",
                    objects.len(),
                    others.len(),
                    ctx.plan.from,
                    name_some(&others)
                ));
            } else {
                return Err(other(format!(
                    "bucket `{svc}/{bucket}` at `{}` holds {} entries that are not objects and cannot be copied (symbolic links, other files that are not regular, names that are no valid keys): {}; remove them, or set `skip_special_files = true` in the bucket's settings to leave them behind at the source",
                    ctx.plan.from,
                    others.len(),
                    name_some(&others)
                )));
            }
        }
        if let Action::StopSource { app } = &step.action {
            let status = ctx.source.app_status(svc, app).await?;
            if !matches!(&status, Some(s) if s.state == AppState::Running) {
                return Err(other(format!(
                    "app `{svc}/{app}` is not running at `{}` ({}); relocate a running service, or deploy it first",
                    ctx.plan.from,
                    status.map(|s| format!("{:?}", s.state).to_lowercase()).unwrap_or_else(|| "unknown".into())
                )));
            }
            checked.push(format!("app {app}"));
        }
        if let Action::StopSourceVm { vm } = &step.action {
            let status = ctx.source.vm_status(svc, vm).await?;
            if !matches!(&status, Some(s) if s.state == providers::VmState::Running) {
                return Err(other(format!(
                    "VM `{svc}/{vm}` is not running at `{}` ({}); relocate a running service, or deploy it first",
                    ctx.plan.from,
                    status
                        .map(|s| s.detail.unwrap_or_else(|| format!("{:?}", s.state).to_lowercase()))
                        .unwrap_or_else(|| "unknown".into())
                )));
            }
            // The machine definition must suit the target before anything stops.
            let spec = deploy::vm_spec(
                &ctx.config,
                ctx.spec()?,
                ctx.component(ComponentKind::Vm, vm)?,
            )?;
            ctx.target.check_vm(svc, &spec).await?;
            checked.push(format!("vm {vm}"));
        }
        if let Action::WriteConfig { file, app } = &step.action {
            // A rule that matches nothing fails here, before the source is touched.
            render_target_config(ctx, file, app).await?;
            checked.push(format!("config {file}"));
        }
    }
    if let Some(free) = ctx.target.free_bytes().await? {
        // Allocated bytes plus a margin for metadata and conversions.
        let want = needed + needed / 20 + (64 << 20);
        if free < want {
            return Err(other(format!(
                "the target `{}` has {} free, the relocation needs about {}",
                ctx.plan.to,
                super::plan::human_bytes(free),
                super::plan::human_bytes(want)
            )));
        }
    }
    std::fs::create_dir_all(ctx.work_dir())
        .map_err(|e| other(format!("cannot create {}: {e}", ctx.work_dir().display())))?;
    Ok(json!({ "checked": checked, "bytes_needed": needed }))
}

fn staging_path(ctx: &Ctx, v: &VolumePlan) -> PathBuf {
    ctx.work_dir().join(format!("{}.raw", v.name))
}

fn manifest_path(ctx: &Ctx, v: &VolumePlan) -> PathBuf {
    ctx.work_dir().join(format!("{}.manifest", v.name))
}

async fn ensure_target_volume(
    ctx: &Ctx,
    v: &VolumePlan,
    size: u64,
    fresh: bool,
) -> Result<PathBuf, StepError> {
    let svc = ctx.svc();
    if fresh {
        let op = ctx.target.delete_volume(svc, &v.name).await?;
        providers::wait_for(ctx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
    }
    let op = ctx
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
    providers::wait_for(ctx.target.as_ref(), &op.id, Duration::from_secs(600)).await?;
    ctx.target
        .volume_info(svc, &v.name)
        .await?
        .and_then(|i| i.path)
        .ok_or_else(|| {
            other(format!(
                "volume `{svc}/{}` at `{}` is not reachable from this machine",
                v.name, ctx.plan.to
            ))
        })
}

async fn copy_volume(
    ctx: &Ctx,
    step: &Step,
    v: &VolumePlan,
    final_pass: bool,
) -> Result<Value, StepError> {
    let svc = ctx.svc();
    let info = ctx.source.volume_info(svc, &v.name).await?.ok_or_else(|| {
        other(format!(
            "volume `{svc}/{}` vanished from `{}`",
            v.name, ctx.plan.from
        ))
    })?;
    let src = info
        .path
        .clone()
        .ok_or_else(|| other(format!("volume `{svc}/{}` is not reachable", v.name)))?;
    if v.source_format != DiskFormat::Raw {
        if !final_pass {
            return Ok(json!({ "skipped": "a non-raw source is converted in full at cutover" }));
        }
        let dst = ensure_target_volume(ctx, v, info.virtual_size, true).await?;
        let started = Instant::now();
        convert(v.source_format, &src, v.target_format, &dst).await?;
        compare(v.source_format, &src, v.target_format, &dst).await?;
        count_bytes(
            ctx,
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
        ensure_target_volume(ctx, v, info.virtual_size, false).await?
    } else {
        staging_path(ctx, v)
    };
    // The pre-copy and the final delta write into the same staging image; the manifest of
    // the previous pass says which chunks it holds, so the delta reads the source and
    // writes only what changed.
    let manifest = manifest_path(ctx, v);
    let base = viaduct::ChunkManifest::load_if_exists(&manifest).unwrap_or(None);
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = viaduct::LocalCopyOptions {
        in_place: true,
        base,
        progress: ctx.progress(&step.name),
        cancel: Some(cancel.clone()),
        ..viaduct::LocalCopyOptions::default()
    };
    let watch = {
        let token = ctx.transfers.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let (src2, staging2) = (src.clone(), staging.clone());
    let copied =
        tokio::task::spawn_blocking(move || viaduct::copy_local(&src2, &staging2, &opts)).await;
    watch.abort();
    let report = copied.map_err(|e| other(format!("the copy task failed: {e}")))??;
    count_bytes(
        ctx,
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
    let converted = converted_path(ctx, v);
    let previous = viaduct::ChunkManifest::load_if_exists(&converted).unwrap_or(None);
    let delta = previous
        .as_ref()
        .and_then(|p| p.changed_chunks(&report.manifest));
    match (final_pass, delta) {
        (true, Some(chunks)) => {
            let dst = ensure_target_volume(ctx, v, info.virtual_size, false).await?;
            let ranges = chunk_ranges(&chunks, &report.manifest);
            let chunk = u64::from(report.manifest.chunk_size);
            write_ranges(ctx, &staging, v.target_format, &dst, &ranges, chunk).await?;
            remove_file(&staging)?;
            remove_file(&converted)?;
            out["converted_to"] = json!(v.target_format.as_str());
            out["delta_chunks_converted"] = json!(chunks.len());
            out["verified"] = json!(
                "image digest; the pre-copy's conversion by qemu-img compare, the changed chunks read back"
            );
        }
        (final_pass, _) => {
            let dst = ensure_target_volume(ctx, v, info.virtual_size, true).await?;
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
                .map_err(|e| other(format!("the flush task failed: {e}")))?
                .map_err(|e| other(format!("cannot flush {}: {e}", dst.display())))?;
                report.manifest.save(&converted)?;
            }
        }
    }
    Ok(out)
}

/// The manifest of the staging image the target's converted image was made from.
fn converted_path(ctx: &Ctx, v: &VolumePlan) -> PathBuf {
    ctx.work_dir().join(format!("{}.converted", v.name))
}

/// Byte ranges `(offset, length)` covering `chunks` (ascending), adjacent chunks merged.
fn chunk_ranges(chunks: &[u64], manifest: &viaduct::ChunkManifest) -> Vec<(u64, u64)> {
    let size = u64::from(manifest.chunk_size);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &c in chunks {
        let start = c * size;
        let len = size.min(manifest.length.saturating_sub(start));
        match ranges.last_mut() {
            Some((o, l)) if *o + *l == start => *l += len,
            _ => ranges.push((start, len)),
        }
    }
    ranges
}

/// `qemu-img dd` read-backs run at the same time after a delta was written.
const READ_BACK_CONCURRENCY: usize = 4;
/// Most commands one `qemu-io` process is given.
const QEMU_IO_BATCH: usize = 256;

/// Writes `ranges` of the raw image `raw` into the image `dst` (format `format`) with
/// `qemu-io`, all-zero ranges as zero writes, then reads every range back with `qemu-img
/// dd` (in blocks of `chunk` bytes, which divides every offset) and compares it with `raw`.
async fn write_ranges(
    ctx: &Ctx,
    raw: &Path,
    format: DiskFormat,
    dst: &Path,
    ranges: &[(u64, u64)],
    chunk: u64,
) -> Result<(), StepError> {
    let scratch = ctx.work_dir().join("delta");
    std::fs::create_dir_all(&scratch)
        .map_err(|e| other(format!("cannot create {}: {e}", scratch.display())))?;
    let mut commands = Vec::new();
    for (i, &(offset, len)) in ranges.iter().enumerate() {
        let data = read_range(raw, offset, len)?;
        if data.iter().all(|&b| b == 0) {
            commands.push(format!("write -q -z {offset} {len}"));
        } else {
            let piece = scratch.join(format!("{i}.raw"));
            std::fs::write(&piece, &data)
                .map_err(|e| other(format!("cannot write {}: {e}", piece.display())))?;
            commands.push(format!("write -q -s {} {offset} {len}", piece.display()));
        }
    }
    for batch in commands.chunks(QEMU_IO_BATCH) {
        let mut args: Vec<String> = vec!["-f".into(), format.as_str().into()];
        for c in batch {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(dst.display().to_string());
        run_tool("qemu-io", &args).await?;
    }
    // Read every range back through qemu, as the guest or app will see it, a few at a time
    // (each `qemu-img dd` is mostly start-up). `count` is given as the end block: some
    // qemu-img versions apply it before `skip`.
    // By index: a closure over borrowed items would be generic over their lifetime, and the
    // compiler could not then prove the relocation's future `Send`.
    let checks = (0..ranges.len()).map(|i| {
        let (offset, len) = ranges[i];
        let back = scratch.join(format!("back-{i}.raw"));
        async move {
            let args: Vec<String> = vec![
                "dd".into(),
                "-f".into(),
                format.as_str().into(),
                "-O".into(),
                "raw".into(),
                format!("if={}", dst.display()),
                format!("of={}", back.display()),
                format!("bs={chunk}"),
                format!("skip={}", offset / chunk),
                format!("count={}", (offset + len).div_ceil(chunk)),
            ];
            run_tool("qemu-img", &args).await?;
            let got = read_range(&back, 0, len)?;
            let _ = std::fs::remove_file(&back);
            if got != read_range(raw, offset, len)? {
                return Err(other(format!(
                    "{} differs from the staging image in bytes {offset}..{} after the delta was written",
                    dst.display(),
                    offset + len
                )));
            }
            Ok(())
        }
    });
    let results: Vec<Result<(), StepError>> = stream::iter(checks)
        .buffer_unordered(READ_BACK_CONCURRENCY)
        .collect()
        .await;
    results
        .into_iter()
        .collect::<Result<Vec<()>, StepError>>()?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// `len` bytes of the file at `path` from `offset`.
fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, StepError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)
        .map_err(|e| other(format!("cannot open {}: {e}", path.display())))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| other(format!("cannot seek in {}: {e}", path.display())))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| other(format!("cannot read {}: {e}", path.display())))?;
    Ok(buf)
}

async fn run_tool(program: &str, args: &[String]) -> Result<(), StepError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| other(format!("cannot run {program}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn count_bytes(ctx: &Ctx, kind: &str, read: u64, sent: u64, started: Instant) {
    if let Some(m) = &ctx.inner.metrics {
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

async fn convert(
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), StepError> {
    // -n: write into the image the provider created; --target-is-zero: it is fresh, so
    // zero ranges of the source (found through block status) are skipped.
    qemu_img(
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-f",
            from.as_str(),
            "-O",
            to.as_str(),
        ],
        &[src, dst],
    )
    .await
    .map(|_| ())
}

async fn compare(
    from: DiskFormat,
    src: &Path,
    to: DiskFormat,
    dst: &Path,
) -> Result<(), StepError> {
    qemu_img(
        &["compare", "-q", "-f", from.as_str(), "-F", to.as_str()],
        &[src, dst],
    )
    .await
    .map(|_| ())
    .map_err(|e| other(format!("the copy differs from the source: {e}")))
}

async fn qemu_img(args: &[&str], paths: &[&Path]) -> Result<String, StepError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .args(paths)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| other(format!("cannot run qemu-img: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        Err(other(format!(
            "`qemu-img {}` failed ({}): {}",
            args.first().copied().unwrap_or_default(),
            out.status,
            format!("{} {}", stderr.trim(), stdout.trim()).trim()
        )))
    }
}

/// Where the hashes a bucket's pre-copy learned wait for its final sync.
fn known_hashes_path(ctx: &Ctx, bucket: &str) -> PathBuf {
    ctx.work_dir().join(format!("bucket-{bucket}.hashes.json"))
}

fn load_known_hashes(path: &Path) -> buckets::KnownHashes {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Default::default(),
        Err(e) => {
            tracing::warn!(
                "Cannot read {}: {e}; objects are hashed again.",
                path.display()
            );
            return Default::default();
        }
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| {
        tracing::warn!(
            "{} is damaged ({e}); objects are hashed again.",
            path.display()
        );
        Default::default()
    })
}

async fn copy_bucket(ctx: &Ctx, step: &Step, bucket: &str) -> Result<Value, StepError> {
    let svc = ctx.svc();
    let hashes = known_hashes_path(ctx, bucket);
    let options = buckets::BucketCopyOptions {
        concurrency: ctx.config.conduit.bucket_concurrency,
        max_bytes_per_sec: ctx.config.conduit.bucket_max_bytes_per_sec,
        known: load_known_hashes(&hashes),
        cancel: ctx.transfers.child_token(),
        ..Default::default()
    };
    let (observer, id, name) = (
        ctx.inner.observer.clone(),
        ctx.id.clone(),
        step.name.clone(),
    );
    let progress: Box<dyn Fn(buckets::BucketProgress) + Send + Sync> =
        Box::new(move |p: buckets::BucketProgress| {
            if let Some(o) = &observer {
                o.bucket(&id, &name, &p);
            }
        });
    let report = buckets::copy_bucket(
        ctx.source.as_ref(),
        svc,
        bucket,
        ctx.target.as_ref(),
        svc,
        bucket,
        &options,
        &*progress,
    )
    .await
    .map_err(|e| other(format!("bucket `{bucket}`: {e}")))?;
    // The target bucket is this relocation's own: objects deleted at the source since the
    // pre-copy go at the sync, so the target ends as an exact copy.
    for key in &report.extra_at_target {
        ctx.target.delete_object(svc, bucket, key).await?;
    }
    count_bytes(
        ctx,
        "bucket",
        report.bytes_read,
        report.bytes_copied,
        Instant::now() - report.duration,
    );
    // The sync at cutover reads only objects changed since: its time is downtime.
    let saved = serde_json::to_vec(&report.known)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            std::fs::create_dir_all(ctx.work_dir())?;
            crate::providers::local::write_atomic(&hashes, &json)
        });
    if let Err(e) = saved {
        tracing::warn!(
            "Cannot save {}: {e}; the next pass hashes every object again.",
            hashes.display()
        );
    }
    Ok(json!({
        "objects": report.objects_total,
        "copied": report.objects_copied,
        "skipped": report.objects_skipped,
        "recopied": report.recopied.len(),
        "removed_at_target": report.extra_at_target.len(),
        "bytes": report.bytes_total,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_copied,
        "manifest_blake3": report.manifest_digest,
        "verified": format!(
            "BLAKE3 manifests of both sides equal ({} objects)",
            report.objects_total
        ),
    }))
}

/// Stops a source app or powers a source VM down, killing it after the stop timeout only
/// where the configuration allows.
async fn stop_source(ctx: &Ctx, kind: ComponentKind, name: &str) -> Result<Value, StepError> {
    let options = StopOptions {
        timeout: ctx.config.conduit.stop_timeout,
        kill_after_timeout: ctx.config.conduit.kill_after_stop_timeout,
    };
    let outcome = match kind {
        ComponentKind::Vm => ctx.source.stop_vm(ctx.svc(), name, options).await?,
        _ => ctx.source.stop_app(ctx.svc(), name, options).await?,
    };
    Ok(json!({ "outcome": outcome }))
}

async fn start_target_vm(ctx: &Ctx, vm: &str) -> Result<Value, StepError> {
    let spec = ctx.spec()?;
    let vm = deploy::vm_spec(&ctx.config, spec, ctx.component(ComponentKind::Vm, vm)?)?;
    let op = ctx.target.start_vm(ctx.svc(), &vm).await?;
    let op = providers::wait_for(ctx.target.as_ref(), &op.id, Duration::from_secs(120)).await?;
    Ok(json!({ "detail": op.detail }))
}

/// Placeholder values for the target. Before the target's volumes exist (at preflight),
/// their paths are stand-ins, so rules can be checked without writing anything.
async fn target_values(ctx: &Ctx) -> Result<Placeholders, StepError> {
    let spec = ctx.spec()?;
    let homes = ctx.inner.bucket_homes(spec)?;
    let mut values = deploy::values(&ctx.config, spec, ctx.target.as_ref(), &homes).await?;
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Volume)
    {
        values
            .entry(format!("volume.{}.path", c.name))
            .or_insert_with(|| format!("(volume {} at {})", c.name, ctx.plan.to));
    }
    Ok(values.into_iter().collect())
}

/// The configuration file `file` of `app` as the target needs it: the source's current
/// file with the rules applied, checked.
async fn render_target_config(ctx: &Ctx, file: &str, app: &str) -> Result<String, StepError> {
    let svc = ctx.svc();
    let c = ctx.component(ComponentKind::Config, file)?;
    let cfs = config_spec(&ctx.config, svc, c)?;
    let current = ctx
        .source
        .read_app_file(svc, app, file)
        .await?
        .ok_or_else(|| {
            other(format!(
                "configuration file `{file}` of app `{svc}/{app}` does not exist at `{}`",
                ctx.plan.from
            ))
        })?;
    let text = String::from_utf8(current).map_err(|_| {
        other(format!(
            "configuration file `{file}` of app `{svc}/{app}` is not UTF-8 text"
        ))
    })?;
    let values = target_values(ctx).await?;
    let rewritten = rewrite::rewrite(&text, &cfs, &values).map_err(|e| cfs.in_file(e))?;
    cfs.check(&rewritten.text)?;
    Ok(rewritten.text)
}

async fn write_config(ctx: &Ctx, file: &str, app: &str) -> Result<Value, StepError> {
    let text = render_target_config(ctx, file, app).await?;
    let path = ctx
        .target
        .write_app_file(ctx.svc(), app, file, text.as_bytes())
        .await?;
    Ok(json!({ "path": path, "bytes": text.len(), "checked": true }))
}

async fn recontextualise(ctx: &Ctx) -> Result<Value, StepError> {
    let spec = ctx.spec()?;
    let svc = ctx.svc();
    let provider = ctx.config.providers.get(&ctx.plan.to);
    let mut doc = ContextDocument::new(
        svc,
        ctx.plan.to.clone(),
        provider.map(|p| p.region.clone()).unwrap_or_default(),
        provider.and_then(|p| p.cloud.clone()),
        ctx.id.clone(),
    );
    let values = target_values(ctx).await?;
    for c in &spec.components {
        match c.kind {
            ComponentKind::App => {
                let app = deploy::app_spec(&ctx.config, svc, c)?;
                if let Some(port) = app.port {
                    doc.endpoints.insert(
                        c.name.clone(),
                        AppEndpoint {
                            host: "127.0.0.1".into(),
                            port,
                        },
                    );
                }
            }
            ComponentKind::Volume => {
                if let Some(p) = values.get(&format!("volume.{}.path", c.name)) {
                    doc.volumes.insert(c.name.clone(), p.to_string());
                }
            }
            ComponentKind::Bucket => {
                doc.buckets.insert(
                    c.name.clone(),
                    BucketContext {
                        path: values
                            .get(&format!("bucket.{}.path", c.name))
                            .map(str::to_string),
                        endpoint: values
                            .get(&format!("bucket.{}.endpoint", c.name))
                            .map(str::to_string),
                    },
                );
            }
            _ => {}
        }
    }
    let json_doc = serde_json::to_vec_pretty(&doc).expect("context serialises");
    let mut written = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        let path = ctx
            .target
            .write_app_file(svc, &c.name, CONTEXT_FILE_NAME, &json_doc)
            .await?;
        written.push(path);
    }
    let hook = match &spec.recontextualise {
        Some(h) => {
            let event = HookEvent::new(
                ctx.id.clone(),
                svc,
                HookPhase::Recontextualise,
                ctx.plan.from.clone(),
                ctx.plan.to.clone(),
            )
            .with_fact(
                "context_file",
                written
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            );
            let outcome = hooks::run_hook(h, &event)
                .await
                .map_err(|e| other(format!("the re-contextualisation hook failed: {e}")))?;
            serde_json::to_value(outcome).unwrap_or(Value::Null)
        }
        None => Value::Null,
    };
    Ok(json!({ "context_files": written, "hook": hook }))
}

async fn start_target(ctx: &Ctx, app: &str) -> Result<Value, StepError> {
    let c = ctx.component(ComponentKind::App, app)?;
    let spec = deploy::app_spec(&ctx.config, ctx.svc(), c)?;
    let op = ctx.target.start_app(ctx.svc(), &spec).await?;
    let op = providers::wait_for(ctx.target.as_ref(), &op.id, Duration::from_secs(120)).await?;
    Ok(json!({ "detail": op.detail }))
}

async fn health_check(ctx: &Ctx) -> Result<Value, StepError> {
    let spec = ctx.spec()?;
    if let Some(check) = &spec.health_check {
        let report = ctx.target.health_check(ctx.svc(), check).await?;
        return Ok(json!({ "detail": report.detail, "attempts": report.attempts }));
    }
    // Without a check of its own, every volume and bucket must be there, every VM must run
    // and every app must run and accept connections on its port.
    let mut present = Vec::new();
    for c in &spec.components {
        match c.kind {
            ComponentKind::Vm => {
                let status = ctx.target.vm_status(ctx.svc(), &c.name).await?;
                if !matches!(&status, Some(s) if s.state == providers::VmState::Running) {
                    return Err(other(format!(
                        "VM `{}/{}` is not running at `{}` ({})",
                        ctx.svc(),
                        c.name,
                        ctx.plan.to,
                        status
                            .map(|s| s
                                .detail
                                .unwrap_or_else(|| format!("{:?}", s.state).to_lowercase()))
                            .unwrap_or_else(|| "unknown".to_string())
                    )));
                }
                present.push(format!("vm {}", c.name));
            }
            ComponentKind::Volume => {
                if ctx.target.volume_info(ctx.svc(), &c.name).await?.is_none() {
                    return Err(other(format!(
                        "volume `{}/{}` is missing at `{}`",
                        ctx.svc(),
                        c.name,
                        ctx.plan.to
                    )));
                }
                present.push(format!("volume {}", c.name));
            }
            ComponentKind::Bucket if !c.keep_at_source => {
                ctx.target.list_objects(ctx.svc(), &c.name).await?;
                present.push(format!("bucket {}", c.name));
            }
            _ => {}
        }
    }
    let deadline = Instant::now() + ctx.config.conduit.health_timeout;
    let mut checked = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        loop {
            let status = ctx.target.app_status(ctx.svc(), &c.name).await?;
            let ok = match &status {
                Some(s) if s.state == AppState::Running => match &s.endpoint {
                    Some(ep) => tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
                        .await
                        .is_ok(),
                    None => true,
                },
                _ => false,
            };
            if ok {
                checked.push(c.name.clone());
                break;
            }
            if Instant::now() >= deadline {
                return Err(other(format!(
                    "app `{}/{}` at `{}` did not come up within {:?}: {}",
                    ctx.svc(),
                    c.name,
                    ctx.plan.to,
                    ctx.config.conduit.health_timeout,
                    status
                        .and_then(|s| s.last_exit.or(s.last_error))
                        .unwrap_or_else(|| "it does not accept connections".into())
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(json!({ "present": present, "apps_up": checked }))
}

/// The endpoints clients use, `host:port` by app, at a provider.
fn endpoints(ctx: &Ctx) -> Result<Option<String>, StepError> {
    let spec = ctx.spec()?;
    let mut out = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        if let Some(port) = deploy::app_spec(&ctx.config, ctx.svc(), c)?.port {
            out.push(format!("127.0.0.1:{port}"));
        }
    }
    Ok((!out.is_empty()).then(|| out.join(",")))
}

async fn cutover(ctx: &Ctx, phase: &str) -> Result<Value, StepError> {
    let spec = ctx.spec()?;
    let Some(hook) = &spec.cutover else {
        return Ok(Value::Null);
    };
    let endpoint = endpoints(ctx)?;
    let mut event = HookEvent::new(
        ctx.id.clone(),
        ctx.svc(),
        HookPhase::Cutover,
        ctx.plan.from.clone(),
        ctx.plan.to.clone(),
    )
    .with_endpoints(endpoint.clone(), endpoint);
    if phase == "rollback" {
        event = event.rollback();
    }
    let outcome = hooks::run_hook(hook, &event)
        .await
        .map_err(|e| other(format!("the cutover hook ({phase}) failed: {e}")))?;
    Ok(serde_json::to_value(outcome).unwrap_or(Value::Null))
}

async fn decommission(ctx: &Ctx) -> Result<Value, StepError> {
    let spec = ctx.spec()?;
    let svc = ctx.svc();
    let mut removed = Vec::new();
    let mut left = Vec::new();
    for c in &spec.components {
        match c.kind {
            ComponentKind::App => {
                ctx.source
                    .stop_app(
                        svc,
                        &c.name,
                        StopOptions {
                            timeout: ctx.config.conduit.stop_timeout,
                            kill_after_timeout: false,
                        },
                    )
                    .await?;
                ctx.source.remove_app(svc, &c.name).await?;
                removed.push(format!("app {}", c.name));
            }
            ComponentKind::Volume => {
                let op = ctx.source.delete_volume(svc, &c.name).await?;
                providers::wait_for(ctx.source.as_ref(), &op.id, Duration::from_secs(600)).await?;
                removed.push(format!("volume {}", c.name));
            }
            ComponentKind::Vm => {
                // Powered down at cutover; never switched off here.
                ctx.source
                    .stop_vm(
                        svc,
                        &c.name,
                        StopOptions {
                            timeout: ctx.config.conduit.stop_timeout,
                            kill_after_timeout: false,
                        },
                    )
                    .await?;
                ctx.source.remove_vm(svc, &c.name).await?;
                let op = ctx.source.delete_volume(svc, &c.name).await?;
                providers::wait_for(ctx.source.as_ref(), &op.id, Duration::from_secs(600)).await?;
                removed.push(format!("vm {} and its disk", c.name));
            }
            ComponentKind::Bucket if !c.keep_at_source => {
                match ctx.source.list_objects(svc, &c.name).await {
                    Ok(objects) => {
                        for o in objects {
                            ctx.source.delete_object(svc, &c.name, &o.key).await?;
                        }
                        // Never copied, so never deleted: the bucket stays with them.
                        let others = ctx.source.list_non_objects(svc, &c.name).await?;
                        if !others.is_empty() {
                            tracing::warn!(
                                "Relocation {}: bucket `{svc}/{}` at `{}` keeps {} entries that are not objects and were not copied: {}.",
                                ctx.id,
                                c.name,
                                ctx.plan.from,
                                others.len(),
                                name_some(&others)
                            );
                            left.push(format!(
                                "bucket {}: {} entries that are not objects were not copied and stay at `{}`: {}",
                                c.name,
                                others.len(),
                                ctx.plan.from,
                                name_some(&others)
                            ));
                            continue;
                        }
                        ctx.source.delete_bucket(svc, &c.name).await?;
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
                removed.push(format!("bucket {}", c.name));
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(ctx.work_dir());
    ctx.inner
        .journal
        .clear_deployed(svc, &ctx.plan.from)
        .map_err(|e| other(e.to_string()))?;
    if left.is_empty() {
        Ok(json!({ "removed": removed }))
    } else {
        Ok(json!({ "removed": removed, "left_in_place": left }))
    }
}

/// The first few of `names`, quoted, and how many more there are.
fn name_some(names: &[String]) -> String {
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
