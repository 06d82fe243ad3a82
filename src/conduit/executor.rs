//! The executor: drives one relocation through its plan, checkpointing every step in the
//! journal before and after it runs. It is the state machine only: each step's work is done
//! by its migrator ([`crate::migrators::for_step`]), run forward here and undone in a
//! rollback; the commit, which only switches the placement in the journal, is its own.
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::journal::{JournalError, RelocationRecord, StepState};
use super::plan::{Action, Phase, Plan, Step};
use super::progress::Observer;
use super::shared::Shared;
use super::RelocationState;
use crate::migrators::{self, Cx, MigratorError};
use crate::providers::copier;
use crate::viaduct;

/// Hands the migrators the transfer half of the conduit's observer.
struct Transfers(Arc<dyn Observer>);

impl migrators::Observer for Transfers {
    fn transfer(&self, relocation: &str, step: &str, progress: &viaduct::Progress) {
        self.0.transfer(relocation, step, progress)
    }
    fn bucket(&self, relocation: &str, step: &str, progress: &copier::BucketProgress) {
        self.0.bucket(relocation, step, progress)
    }
}

/// How many times a rollback action is tried before the relocation is marked failed.
const COMPENSATE_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Migrator(#[from] MigratorError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// One relocation being driven: the state it shares with the engine (the journal, the
/// providers, the observers), and what its migrators get.
struct Ctx {
    inner: Arc<Shared>,
    cx: Cx,
}

/// The state machine reads the plan, the configuration and the id through the migrators'
/// context rather than keeping a second copy.
impl std::ops::Deref for Ctx {
    type Target = Cx;
    fn deref(&self) -> &Cx {
        &self.cx
    }
}

/// The rollback reason of a relocation an operator cancelled.
const CANCELLED: &str = "cancelled by an operator";

impl Ctx {
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
        #[cfg(feature = "crash-points")]
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
}

/// Fault injection for crash tests: `FLUIDCLOUD_KILL_AT=<step>:<state>` makes the process
/// kill itself with SIGKILL right after that checkpoint reached the journal, exactly as a
/// power cut or the OOM killer would. Only in builds with the `crash-points` feature: a
/// production binary carries no switch that kills it.
#[cfg(feature = "crash-points")]
fn kill_point(step: &str, state: StepState) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("FLUIDCLOUD_KILL_AT").ok());
    if let Some(p) = point {
        if p.rsplit_once(':') == Some((step, state.as_str())) {
            tracing::warn!("FLUIDCLOUD_KILL_AT={p}: killing this process.");
            use rustix::process::{getpid, kill_process, Signal};
            let _ = kill_process(getpid(), Signal::KILL);
        }
    }
}

/// Drives the relocation `id` as far as it can go. `resumed` says it was found unfinished
/// at start rather than submitted to this process.
pub(super) async fn drive(inner: Arc<Shared>, id: String, resumed: bool) {
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
    let plan = match read_plan(&inner, &id) {
        Ok(p) => p,
        // The relocation and its plan are journalled by two writes: a process killed between
        // them leaves one that never started, with nothing to undo.
        Err(PlanReadError::Missing)
            if record.steps.iter().all(|s| s.state == StepState::Pending) =>
        {
            let _ = inner.journal.set_state(
                &id,
                RelocationState::RolledBack,
                "not started: the process stopped before its plan was journalled",
            );
            count_finished(&inner, "rolled_back");
            return;
        }
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
    let open = inner.clone();
    let ctx = Ctx {
        cx: Cx {
            id: id.clone(),
            plan,
            config,
            source,
            target,
            open: Arc::new(move |name: &str| open.provider(name)),
            work_dir: inner.work_dir(&id),
            done: record
                .steps
                .iter()
                .filter(|s| s.state == StepState::Done)
                .map(|s| s.name.clone())
                .collect(),
            transfers: cancelled.child_token(),
            cancelled,
            observer: inner
                .observer
                .clone()
                .map(|o| Arc::new(Transfers(o)) as Arc<dyn migrators::Observer>),
            metrics: inner.metrics.clone(),
        },
        inner: inner.clone(),
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

/// Why a relocation's plan cannot be read back from the journal.
#[derive(Debug, thiserror::Error)]
enum PlanReadError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("it has no plan")]
    Missing,
    #[error(transparent)]
    Decode(#[from] serde_json::Error),
}

fn read_plan(inner: &Shared, id: &str) -> Result<Plan, PlanReadError> {
    let plan = inner.journal.plan(id)?.ok_or(PlanReadError::Missing)?;
    Ok(serde_json::from_value(plan)?)
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

fn count_finished(inner: &Shared, outcome: &str) {
    if let Some(m) = &inner.metrics {
        m.relocations_finished.with_label_values(&[outcome]).inc();
    }
}

fn observe_phase(inner: &Shared, phase: &str, secs: f64) {
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
                        _ = ctx.cancelled.cancelled() => Err(MigratorError::Cancelled.into()),
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

/// Downtime of a cutover: from the first source app or VM stopping (for a VM moved live, its
/// pause for the last pass of memory) to the health check passing.
pub fn downtime(plan: &Plan, record: &RelocationRecord) -> Option<Duration> {
    let stopped = plan
        .steps
        .iter()
        .zip(&record.steps)
        .filter_map(|(s, r)| match s.action {
            Action::StopSource { .. }
            | Action::StopSourceVm { .. }
            | Action::FinalPassVm { .. } => r.started_at,
            Action::MigrateVm { .. } => {
                let paused = r
                    .output
                    .get("paused_ms")
                    .and_then(serde_json::Value::as_u64);
                match paused {
                    Some(ms) => r
                        .finished_at
                        .map(|f| f - chrono::Duration::milliseconds(ms as i64)),
                    // A cold fallback: the source stopped within the step.
                    None => r.started_at,
                }
            }
            _ => None,
        })
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
    release_sources(ctx, &record).await;
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
    let decommissioned = async {
        let out = migrators::for_step(&ctx.plan.steps[i]).run(ctx).await?;
        ctx.inner
            .journal
            .clear_deployed(ctx.svc(), &ctx.plan.from)?;
        Ok::<_, StepError>(out)
    };
    match decommissioned.await {
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

/// Runs the grace phase's steps other than the decommission at once (the source emulators
/// a live migration left paused); one that fails is tried again at the next start.
async fn release_sources(ctx: &Ctx, record: &RelocationRecord) {
    for (i, step) in ctx.plan.steps.iter().enumerate() {
        let pending = record.steps.get(i).map(|s| s.state) != Some(StepState::Done);
        if step.phase != Phase::Grace || matches!(step.action, Action::Decommission) || !pending {
            continue;
        }
        ctx.checkpoint(i, StepState::Running, None, None);
        match execute(ctx, step).await {
            Ok(out) => ctx.checkpoint(i, StepState::Done, Some(&out), None),
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!("Relocation {}: step `{}` failed: {msg}.", ctx.id, step.name);
                ctx.checkpoint(i, StepState::Failed, None, Some(&msg));
            }
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
            match migrators::for_step(step).undo(ctx).await {
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
    let _ = std::fs::remove_dir_all(&ctx.work_dir);
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

/// Runs a step forward: the commit here (it is the journal's state switch), every other
/// step through its migrator.
async fn execute(ctx: &Ctx, step: &Step) -> Result<Value, StepError> {
    if !matches!(step.action, Action::Commit) {
        return Ok(migrators::for_step(step).run(ctx).await?);
    }
    let journal = &ctx.inner.journal;
    for s in &ctx.plan.steps {
        if let Action::SyncVolume { volume } = &s.action {
            journal.set_deployed(ctx.svc(), &ctx.plan.to, &format!("volume:{}", volume.name))?;
        }
    }
    journal.set_placement(ctx.svc(), &ctx.plan.to, &ctx.id)?;
    Ok(json!({ "placement": ctx.plan.to }))
}
