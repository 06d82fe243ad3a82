//! `fluidcloud plan` and `fluidcloud relocate`: one relocation from the command line, with
//! progress bars, run by the same engine the daemon uses.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fluidcloud::conduit::engine::Engine;
use fluidcloud::conduit::journal::{RelocationRecord, StepState};
use fluidcloud::conduit::plan::Step;
use fluidcloud::conduit::{Observer, RelocationRequest, RelocationState};
use fluidcloud::config::Config;
use fluidcloud::migrators::Observer as _;
use fluidcloud::providers::copier::BucketProgress;
use fluidcloud::sys::units::human_bytes;
use fluidcloud::viaduct::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints the plan of a relocation without doing anything.
pub fn plan(config: Config, service: &str, to: &str, json: bool) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async move {
        let engine = Engine::open(Arc::new(config), None, None)?;
        match engine.plan(service, to) {
            Ok(plan) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    print!("{plan}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        }
    })
}

/// Runs one relocation in the foreground until it completes or rolls back.
pub fn relocate(
    mut config: Config,
    service: &str,
    to: &str,
    grace_period: Option<u64>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(g) = grace_period {
        config.conduit.grace_period = Duration::from_secs(g);
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let bars = Arc::new(Bars::new(quiet));
        let observer: Arc<dyn Observer> = bars.clone();
        let config = Arc::new(config);
        let engine = Engine::open(config.clone(), None, Some(observer))?;
        let plan = match engine.plan(service, to) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        };
        // The service must run where it is placed before it can move.
        match engine.deploy(service, &plan.from).await {
            Ok(report) if report.changed() => {
                bars.line(format!("deployed `{service}` on `{}`: {report}", plan.from))
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!(
                    "error: cannot make `{service}` present on `{}`: {e}",
                    plan.from
                );
                return Ok(ExitCode::from(1));
            }
        }
        bars.line(format!(
            "relocating `{service}` from `{}` to `{}` ({} steps; grace period {:?})",
            plan.from,
            plan.to,
            plan.steps.len(),
            config.conduit.grace_period
        ));
        let request = RelocationRequest {
            decision_id: format!("cli-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")),
            service: service.to_string(),
            from: plan.from.clone(),
            to: plan.to.clone(),
            reason: "requested on the command line".to_string(),
            origin: "operator".to_string(),
        };
        let record = match engine.run(request).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        bars.finish();
        print_summary(&engine, &record);
        Ok(match record.state {
            RelocationState::Completed | RelocationState::Grace => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        })
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn print_summary(engine: &Engine, record: &RelocationRecord) {
    let (mut read, mut sent) = (0u64, 0u64);
    let mut verified = Vec::new();
    let mut left = Vec::new();
    for s in &record.steps {
        read += s
            .output
            .get("bytes_read")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        // On the wire between hosts, else written at the target.
        sent += s
            .output
            .get("bytes_sent")
            .or_else(|| s.output.get("bytes_written"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if let Some(v) = s.output.get("verified").and_then(|v| v.as_str()) {
            verified.push(format!("{}: {v}", s.name));
        }
        let kept = s.output.get("left_in_place").and_then(|v| v.as_array());
        left.extend(kept.into_iter().flatten().filter_map(|v| v.as_str()));
    }
    println!();
    println!("relocation {}: {}", record.id, record.state.as_str());
    println!("  {}", record.detail);
    println!("  bytes read: {} ({read} B)", human_bytes(read));
    println!("  bytes sent: {} ({sent} B)", human_bytes(sent));
    match engine.downtime(record) {
        Some(d) => println!("  downtime:   {:.3} s", d.as_secs_f64()),
        None => println!("  downtime:   none (no app was stopped)"),
    }
    if verified.is_empty() {
        println!("  verified:   nothing was copied");
    } else {
        for v in verified {
            println!("  verified:   {v}");
        }
    }
    for l in left {
        println!("  left:       {l}");
    }
}

/// Progress bars for transfers and a line per step.
struct Bars {
    multi: MultiProgress,
    transfers: Mutex<BTreeMap<String, ProgressBar>>,
    quiet: bool,
}

impl Bars {
    fn new(quiet: bool) -> Bars {
        let multi = MultiProgress::new();
        if quiet {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        Bars {
            multi,
            transfers: Mutex::new(BTreeMap::new()),
            quiet,
        }
    }

    fn line(&self, s: String) {
        if self.quiet {
            println!("{s}");
        } else {
            let _ = self.multi.println(s);
        }
    }

    /// Draws (creating it the first time) the progress bar of one transfer step.
    fn bar(&self, step: &str, total: u64, done: u64, message: String) {
        let mut bars = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars.entry(step.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "  {prefix:<24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(step.to_string());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(message);
    }

    fn finish(&self) {
        for (_, bar) in
            std::mem::take(&mut *self.transfers.lock().unwrap_or_else(|e| e.into_inner()))
        {
            bar.finish_and_clear();
        }
    }
}

impl Bars {
    /// One line for a step that changed state; its progress bar goes once it is not running.
    fn step_line(&self, phase: Option<&str>, name: &str, state: StepState, detail: &str) {
        let mark = match state {
            StepState::Running => "…",
            StepState::Done => "✓",
            StepState::Failed => "✗",
            StepState::Compensated => "↺",
            StepState::Pending => " ",
        };
        if state != StepState::Running {
            if let Some(bar) = self
                .transfers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name)
            {
                bar.finish_and_clear();
            }
        }
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        };
        let phase = phase.map(|p| format!("[{p}] ")).unwrap_or_default();
        self.line(format!("{mark} {phase}{name}{detail}"));
    }
}

impl Observer for Bars {
    fn step(&self, _relocation: &str, step: &Step, state: StepState, detail: &str) {
        self.step_line(Some(step.phase.as_str()), &step.name, state, detail);
    }
}

impl fluidcloud::migrators::Observer for Bars {
    fn transfer(&self, _relocation: &str, step: &str, p: &Progress) {
        let done = p
            .image_bytes
            .saturating_mul(p.chunks_done)
            .checked_div(p.chunks_total)
            .unwrap_or(p.image_bytes);
        self.bar(
            step,
            p.image_bytes,
            done,
            format!(
                "read {} sent {}",
                human_bytes(p.bytes_read),
                human_bytes(p.bytes_sent)
            ),
        );
    }

    fn bucket(&self, _relocation: &str, step: &str, p: &BucketProgress) {
        self.bar(
            step,
            p.bytes_total,
            p.bytes_read.min(p.bytes_total),
            format!(
                "{:?} {}/{} objects, {} copied, {} skipped",
                p.phase, p.objects_done, p.objects_total, p.objects_copied, p.objects_skipped
            )
            .to_lowercase(),
        );
    }
}

/// Follows a relocation the daemon runs, with the same bars as `relocate`, until it commits
/// (or rolls back, or fails); then prints its steps.
pub fn watch(a: &crate::ApiArgs, id: &str) -> anyhow::Result<ExitCode> {
    use fluidcloud::conduit::progress::LiveProgress;
    let api = crate::client::Api::new(a)?;
    let path = format!("/v1/relocations/{id}");
    // Bars where someone watches them; one line per step anywhere else.
    let bars = Bars::new(a.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let mut seen: BTreeMap<String, StepState> = BTreeMap::new();
    loop {
        let r = api.call(reqwest::Method::GET, &path)?;
        let steps: Vec<fluidcloud::conduit::journal::StepRecord> =
            serde_json::from_value(r["steps"].clone()).unwrap_or_default();
        for st in &steps {
            if st.state != StepState::Pending && seen.get(&st.name) != Some(&st.state) {
                seen.insert(st.name.clone(), st.state);
                bars.step_line(None, &st.name, st.state, st.error.as_deref().unwrap_or(""));
            }
        }
        let live: BTreeMap<String, LiveProgress> =
            serde_json::from_value(r["progress"].clone()).unwrap_or_default();
        for (step, p) in live {
            match p {
                LiveProgress::Volume(p) => bars.transfer(id, &step, &p),
                LiveProgress::Bucket(p) => bars.bucket(id, &step, &p),
            }
        }
        let state: RelocationState = serde_json::from_value(r["state"].clone())?;
        if state.is_final() || state == RelocationState::Grace {
            bars.finish();
            println!();
            print!("{}", crate::client::describe_relocation(&r));
            return Ok(match state {
                RelocationState::Completed | RelocationState::Grace => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
