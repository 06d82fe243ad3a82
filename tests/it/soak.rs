//! The soak: the real daemon runs for a while (`FLUIDCLOUD_SOAK_SECS`, 120 s by default)
//! with 20 or more services (`FLUIDCLOUD_SOAK_SERVICES`) under the shipped policies, priced
//! from a catalogue served over HTTP whose prices change on a seeded schedule
//! (`FLUIDCLOUD_SOAK_SEED`), and invariants are checked every second all along.
//!
//! Each service is the demo app with a small volume and a small bucket on one of three
//! `local` providers (`a` in the US, `b` and `c` in the EU). Services come in four sizes
//! (1 to 4 vCPUs), and each size has its own flavor, whose cheap provider the schedule
//! changes phase by phase (`FLUIDCLOUD_SOAK_PHASE_SECS`, 20 s): a move there pays (30 %
//! cheaper), then a later phase makes the old provider the cheap one again (the move pays
//! back, and services move back), or prices equal out and nothing pays. The sizes' phases
//! are staggered so that one size at a time asks to move. Most services run `cheapest` in
//! `enforce` mode, some `balanced` (also `enforce`), two `eu-only` in `approve` mode, whose
//! pending decisions the soak approves. The guard rails stay in effect, shortened to fit
//! the run: two confirmations, a residency and a cooldown of a few seconds, budgets of
//! concurrent and windowed relocations, and the all-or-nothing share per tick.
//!
//! What is checked, every second while it runs:
//! - every `submitted` or `approved` decision in the decision log has exactly one relocation
//!   in the journal, under its id, and every relocation has its decision (a few seconds of
//!   lag between the two writes are allowed);
//! - no relocation stays unfinished (queued, running, rolling back, in its grace period)
//!   longer than `FLUIDCLOUD_SOAK_STUCK_SECS` (60 s);
//! - the daemon's RSS (`VmRSS`) is sampled.
//!
//! Halfway through the daemon is stopped (SIGTERM; `FLUIDCLOUD_SOAK_SIGNAL=KILL` for
//! SIGKILL) and started again on the same state directory. Then: no decision of the log is
//! lost, a relocation that had ended is not touched again, one that had not ends completed
//! or rolled back. At the end the prices hold still until the daemon is idle, and: no
//! relocation failed; the relocations of each service form one chain (each leaves where
//! the one before it left the service, so none ran twice) that ends where the daemon says
//! the service runs, where the app serves the data it started with; the counters of the
//! daemon's last life agree (`requested` = `started` = `finished`, once relocations found
//! unfinished at its start are accounted for); some services moved at least twice on their
//! own; the RSS stayed bounded (see `RSS_GROWTH` and `RSS_CAP_MIB`).
//!
//! With `--nocapture` the soak prints its table; `scripts/soak.sh` runs it for an hour.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::config::ConfigBuilder;
use common::{demo_app, free_ports, Apps, Body, Daemon, FeedServer};
use fluidcloud::conduit::journal::Journal;
use fluidcloud::conduit::RelocationState;
use serde_json::Value;

/// The providers: name, region.
const PROVIDERS: [(&str, &str); 3] = [
    ("a", "us-east-1"),
    ("b", "eu-central-1"),
    ("c", "eu-west-1"),
];

/// Service sizes: the vCPUs (and GiB of memory) of sizes 1..=SIZES, one flavor each.
const SIZES: usize = 4;

/// The cheap provider of a flavor costs this share of the others' price: 30 % less, a move
/// that pays whatever the rails add, and a drop the market-shock rail (50 %) lets through.
const CHEAP: f64 = 0.7;

/// How long a decision may wait for its relocation in the journal (and the other way round)
/// before the pair counts as broken: the two are written one after the other.
const MATCH_LAG: Duration = Duration::from_secs(10);

/// The RSS of the last half of the run may be at most this many times the first plateau
/// (the largest sample of the first quarter, past the first 10 s of start-up), plus
/// `RSS_SLACK_MIB` for the allocator's arenas settling: growth beyond that over the run is a
/// leak, not warm-up.
const RSS_GROWTH: f64 = 1.5;
const RSS_SLACK_MIB: f64 = 32.0;
/// Whatever the plateau, the daemon of 20-odd small services never needs more than this.
const RSS_CAP_MIB: f64 = 512.0;

/// After the run, how long the prices hold still for the daemon to finish what it started.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// What the checks ask every second: the most recent relocations, as a monitor would (at
/// most 60 start a minute, so 500 reach minutes back).
const RECENT: &str = "/v1/relocations?limit=500";
/// The largest page of `GET /v1/relocations`: the final checks page back through them all.
const PAGE: usize = 1000;

/// Every relocation, oldest first, a page at a time, for the checks once the daemon is idle.
fn every_relocation(d: &Daemon) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let path = match all.first() {
            None => format!("/v1/relocations?limit={PAGE}"),
            Some(oldest) => format!(
                "/v1/relocations?limit={PAGE}&before={}",
                oldest["id"].as_str().unwrap()
            ),
        };
        let page = d.get(&path).as_array().unwrap().clone();
        let full = page.len() == PAGE;
        all.splice(0..0, page);
        if !full {
            return all;
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}=`{v}` is not a number")),
        Err(_) => default,
    }
}

/// The run's settings, from the environment.
struct Settings {
    secs: u64,
    services: usize,
    seed: u64,
    phase_secs: u64,
    stuck: Duration,
    kill: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let services = env_u64("FLUIDCLOUD_SOAK_SERVICES", 20) as usize;
        assert!(services >= 4, "FLUIDCLOUD_SOAK_SERVICES must be at least 4");
        let signal = std::env::var("FLUIDCLOUD_SOAK_SIGNAL").unwrap_or_else(|_| "TERM".into());
        assert!(
            signal == "TERM" || signal == "KILL",
            "FLUIDCLOUD_SOAK_SIGNAL is TERM or KILL, not `{signal}`"
        );
        Settings {
            secs: env_u64("FLUIDCLOUD_SOAK_SECS", 120),
            services,
            seed: std::env::var("FLUIDCLOUD_SOAK_SEED")
                .map(|v| v.parse().expect("FLUIDCLOUD_SOAK_SEED is a number"))
                .unwrap_or_else(|_| fastrand::u64(..1 << 48)),
            phase_secs: env_u64("FLUIDCLOUD_SOAK_PHASE_SECS", 20).max(5),
            stuck: Duration::from_secs(env_u64("FLUIDCLOUD_SOAK_STUCK_SECS", 60)),
            kill: signal == "KILL",
        }
    }
}

/// The price schedule: for each size, the cheap provider of each phase (`None`: every
/// provider at the same price, no move pays). Drawn from the seed, phase by phase: half the
/// time back to the provider that was cheap before (the move back pays), a third of the
/// time to another one, otherwise prices equal out.
struct Schedule {
    phase: Duration,
    cheap: Vec<Vec<Option<usize>>>,
}

impl Schedule {
    fn new(seed: u64, phase_secs: u64, phases: usize) -> Schedule {
        let cheap = (0..SIZES)
            .map(|size| {
                let mut rng = fastrand::Rng::with_seed(seed ^ ((size as u64 + 1) * 0x9e37_79b9));
                let mut cheap: Vec<Option<usize>> = vec![Some(rng.usize(..PROVIDERS.len()))];
                let mut before: Option<usize> = None;
                for _ in 1..phases {
                    let now = *cheap.last().unwrap();
                    let roll = rng.f64();
                    let next = if roll < 0.5 && before.is_some() && before != now {
                        before
                    } else if roll < 0.85 {
                        let others: Vec<usize> =
                            (0..PROVIDERS.len()).filter(|p| Some(*p) != now).collect();
                        Some(others[rng.usize(..others.len())])
                    } else {
                        None
                    };
                    if now.is_some() {
                        before = now;
                    }
                    cheap.push(next);
                }
                cheap
            })
            .collect();
        Schedule {
            phase: Duration::from_secs(phase_secs),
            cheap,
        }
    }

    /// The cheap provider of `size` at `elapsed` into the run; the sizes' phases are
    /// staggered by a fraction of a phase each.
    fn cheap_at(&self, size: usize, elapsed: Duration) -> Option<usize> {
        let offset = self.phase.mul_f64(size as f64 / SIZES as f64);
        let phase = (elapsed + offset).as_secs_f64() / self.phase.as_secs_f64();
        let phases = &self.cheap[size];
        phases[(phase as usize).min(phases.len() - 1)]
    }

    /// The catalogue every provider polls at `elapsed` into the run.
    fn catalogue(&self, elapsed: Duration) -> String {
        Schedule::priced(|size| self.cheap_at(size, elapsed))
    }

    /// Every provider at the same price: nothing pays, nothing moves (while the soak sets up).
    fn even() -> String {
        Schedule::priced(|_| None)
    }

    /// Each provider's row for each size's flavor, `cheap(size)` the cheaper provider.
    fn priced(cheap: impl Fn(usize) -> Option<usize>) -> String {
        let mut csv = String::from(
            "provider,region,flavor,vcpus,memory_gib,price_per_hour,storage_price_per_gib_month,egress_price_per_gib,currency\n",
        );
        for size in 0..SIZES {
            let cheap = cheap(size);
            // Each size costs three times the one below it, so a service's cheapest fitting
            // offer is always its own size's flavor, whatever the schedule does.
            let base = 0.01 * 3f64.powi(size as i32 + 1);
            for (p, (name, region)) in PROVIDERS.iter().enumerate() {
                let price = if cheap == Some(p) { base * CHEAP } else { base };
                let vcpus = size + 1;
                csv.push_str(&format!(
                    "{name},{region},s{vcpus},{vcpus},{vcpus},{price:.6},0.05,0.01,USD\n"
                ));
            }
        }
        csv
    }
}

/// One service of the soak: its name, where it starts, its policy, size and app port.
struct Svc {
    name: String,
    provider: &'static str,
    policy: &'static str,
    vcpus: usize,
    port: u16,
}

fn services(n: usize) -> Vec<Svc> {
    let ports = free_ports(n);
    (0..n)
        .map(|i| {
            // Two `eu-only` services start in the US and wait for approval; one in five of
            // the others runs `balanced`.
            let (policy, provider) = match i {
                0 | 1 => ("eu-only", "a"),
                _ if i % 5 == 2 => ("balanced", PROVIDERS[1 + i % 2].0),
                _ => ("cheapest", PROVIDERS[i % PROVIDERS.len()].0),
            };
            Svc {
                name: format!("s{i:02}"),
                provider,
                policy,
                vcpus: i % SIZES + 1,
                port: ports[i],
            }
        })
        .collect()
}

fn config(feeds: &FeedServer, services: &[Svc]) -> String {
    let url = format!("{}/catalogue.csv", feeds.base);
    let mut cfg = ConfigBuilder::for_daemon()
        .broker("evaluate_schedule", "* * * * * *")
        .broker("max_concurrent_relocations", 4)
        .broker("max_relocations_per_window", 60)
        .broker("relocation_window_secs", 60)
        .broker("max_relocations_percent", 50)
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 5)
        .conduit("health_timeout_secs", 20);
    for (name, region) in PROVIDERS {
        cfg = cfg.provider_local_with(name, region, |p| {
            p.cloud("aws").pricing("csv", &url, |t| {
                t.set("catalogue_provider", name)
                    .set("schedule", "* * * * * *")
                    .set("ttl_secs", 0)
            })
        });
    }
    let rails = |p: common::config::Policy| {
        p.confirmations(2)
            .min_residency_secs(5)
            .cooldown_secs(5)
            .move_duration_secs(60)
            .set("expected_downtime_secs", 5)
    };
    cfg = cfg
        .policy("cheapest", "cheapest", "enforce", rails)
        .policy("balanced", "balanced", "enforce", rails)
        .policy("eu-only", "eu-only", "approve", rails);
    let app = demo_app().display().to_string();
    for s in services {
        let vcpus = s.vcpus as i64;
        cfg = cfg.service(&s.name, s.provider, s.policy, |c| {
            c.size(vcpus, vcpus as f64)
                .app("web", &app, &["demo.toml"], s.port)
                .config_file(
                    "demo.toml",
                    "demo.toml.in",
                    &[
                        (
                            r#"data_file = "[^"]*""#,
                            r#"data_file = "{volume.data.path}""#,
                        ),
                        (
                            r#"bucket_dir = "[^"]*""#,
                            r#"bucket_dir = "{bucket.assets.path}""#,
                        ),
                    ],
                )
                .volume("data", 4.0 / 1024.0)
                .bucket("assets", 0.001)
                .health_url(&format!("http://127.0.0.1:{}/health", s.port), 20)
        });
    }
    cfg.render()
}

fn app_get(port: u16, path: &str) -> Option<String> {
    common::http_get(&format!("http://127.0.0.1:{port}{path}"))
}

/// The daemon's resident set, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The decision log, line by line (a last line still being written is left for later).
fn decision_log(state: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(state.join("decisions.jsonl")).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The relocation a `submitted` or `approved` decision asked for.
fn asked_id(d: &Value) -> Option<String> {
    match d["outcome"].as_str()? {
        "submitted" => d["id"].as_str().map(str::to_string),
        "approved" => d["refers_to"]
            .as_str()
            .or(d["id"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn terminal(state: &str) -> bool {
    matches!(state, "completed" | "rolled_back" | "failed")
}

fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the journal held when a daemon's life began. The counters are the process's: a
/// relocation counts as started when it leaves the queue and as finished when it commits or
/// rolls back (or fails), so a life that picks up relocations left by the one before starts
/// those that were queued and finishes those that were queued, running or rolling back.
#[derive(Default)]
struct LifeStart {
    ids: HashSet<String>,
    queued: usize,
    /// Queued, running or rolling back.
    unfinished: usize,
}

impl LifeStart {
    fn read(state: &Path) -> LifeStart {
        let path = state.join("journal.sqlite");
        if !path.exists() {
            return LifeStart::default();
        }
        let records = Journal::open(&path).unwrap().list().unwrap();
        LifeStart {
            ids: records.iter().map(|r| r.id.clone()).collect(),
            queued: records
                .iter()
                .filter(|r| r.state == RelocationState::Queued)
                .count(),
            // A relocation in its grace period was counted finished at its commit, in the
            // life that committed it.
            unfinished: records
                .iter()
                .filter(|r| {
                    matches!(
                        r.state,
                        RelocationState::Queued
                            | RelocationState::Running
                            | RelocationState::RollingBack
                    )
                })
                .count(),
        }
    }
}

/// The journal and the decision log as the stopped daemon left them halfway.
struct AtRestart {
    /// Relocations that had ended: their state and last update.
    ended: BTreeMap<String, (String, String)>,
    unfinished: HashSet<String>,
    /// Every decision id of the log.
    logged: HashSet<String>,
}

/// Everything the soak saw.
struct Soak {
    root: std::path::PathBuf,
    started: Instant,
    violations: Vec<String>,
    /// Keys of the violations already noted, so that a lasting one is noted once.
    noted: HashSet<String>,
    /// When a decision without its relocation, or a relocation without its decision, was
    /// first seen so.
    unmatched_since: HashMap<String, Instant>,
    /// When each relocation was first seen unfinished.
    unfinished_since: HashMap<String, Instant>,
    polls: u64,
    approvals: BTreeMap<u16, u64>,
    answered: HashSet<String>,
    /// (seconds into the run, MiB).
    rss: Vec<(f64, f64)>,
    restarts: u64,
    api_failures_since: Option<Instant>,
    /// How long a relocation may stay unfinished.
    stuck: Duration,
    /// Relocations queued or running at the last check.
    running: usize,
    /// Relocations in the journal at the last check.
    relocations: usize,
    /// Every relocation seen, by id, as last seen: the API lists the most recent ones, as a
    /// monitor asks for them, and a finished one no longer changes.
    seen: BTreeMap<String, Value>,
}

impl Soak {
    fn violation(&mut self, key: &str, what: String) {
        if self.noted.insert(key.to_string()) {
            println!(
                "soak: VIOLATION at {:.0} s: {what}",
                self.started.elapsed().as_secs_f64()
            );
            self.violations.push(what);
        }
    }

    fn state(&self) -> std::path::PathBuf {
        self.root.join("state")
    }

    /// One round of checks against the running daemon.
    fn check(&mut self, d: &Daemon) {
        let now = Instant::now();
        if let Some(mib) = rss_mib(d.child.id()) {
            self.rss.push((self.started.elapsed().as_secs_f64(), mib));
        }
        let relocations = match d.raw("GET", RECENT, true, None) {
            Ok((200, body)) => serde_json::from_str::<Value>(&body).unwrap(),
            other => {
                let since = *self.api_failures_since.get_or_insert(now);
                if now - since > Duration::from_secs(30) {
                    self.violation(
                        "api",
                        format!("the API has not answered for 30 s: {other:?}"),
                    );
                }
                return;
            }
        };
        self.api_failures_since = None;
        for r in relocations.as_array().into_iter().flatten() {
            self.seen
                .insert(r["id"].as_str().unwrap_or_default().to_string(), r.clone());
        }
        let mut relocations: Vec<Value> = self.seen.values().cloned().collect();
        relocations.sort_by_key(|r| r["submitted_at"].as_str().unwrap_or_default().to_string());
        let decisions = decision_log(&self.state());

        // Each `submitted`/`approved` decision has exactly one relocation, and the other way.
        let mut asked: HashMap<String, usize> = HashMap::new();
        for x in &decisions {
            if let Some(id) = asked_id(x) {
                *asked.entry(id).or_default() += 1;
            }
        }
        let mut journalled: HashMap<String, usize> = HashMap::new();
        for r in &relocations {
            let id = r["id"].as_str().unwrap_or_default().to_string();
            if r["request"]["decision_id"].as_str() != Some(id.as_str()) {
                self.violation(
                    &format!("decision-id {id}"),
                    format!(
                        "relocation `{id}` runs for decision {}",
                        r["request"]["decision_id"]
                    ),
                );
            }
            *journalled.entry(id).or_default() += 1;
        }
        let mut unmatched = HashSet::new();
        for (id, n) in &asked {
            if *n > 1 {
                self.violation(
                    &format!("twice {id}"),
                    format!("{n} decisions handed relocation `{id}` to the conduit"),
                );
            }
            if !journalled.contains_key(id) {
                unmatched.insert(format!("decision {id}"));
            }
        }
        for (id, n) in &journalled {
            if *n > 1 {
                self.violation(
                    &format!("dup {id}"),
                    format!("relocation `{id}` is {n} times in the journal"),
                );
            }
            if !asked.contains_key(id) {
                unmatched.insert(format!("relocation {id}"));
            }
        }
        self.unmatched_since.retain(|k, _| unmatched.contains(k));
        for k in unmatched {
            let since = *self.unmatched_since.entry(k.clone()).or_insert(now);
            if now - since > MATCH_LAG {
                let what = if k.starts_with("decision") {
                    format!("{k} was handed to the conduit but has no relocation")
                } else {
                    format!("{k} has no submitted or approved decision")
                };
                self.violation(&k, what);
            }
        }

        // No relocation stays unfinished longer than the bound.
        let mut open = HashSet::new();
        for r in &relocations {
            let id = r["id"].as_str().unwrap_or_default().to_string();
            if terminal(r["state"].as_str().unwrap_or_default()) {
                continue;
            }
            let since = *self.unfinished_since.entry(id.clone()).or_insert(now);
            if now - since > self.stuck_bound() {
                self.violation(
                    &format!("stuck {id}"),
                    format!(
                        "relocation `{id}` of {} still {} after {:?}",
                        r["request"]["service"],
                        r["state"],
                        self.stuck_bound()
                    ),
                );
            }
            open.insert(id);
        }
        self.unfinished_since.retain(|k, _| open.contains(k));
        self.relocations = relocations.len();
        self.running = relocations
            .iter()
            .filter(|r| r["state"] == "running" || r["state"] == "queued")
            .count();

        // The operator's part: approve what waits for approval, once.
        let pending: Vec<String> = decisions
            .iter()
            .filter(|x| x["outcome"] == "pending_approval")
            .filter_map(|x| x["id"].as_str().map(str::to_string))
            .filter(|id| !self.answered.contains(id))
            .collect();
        for id in pending {
            if let Ok((status, _)) =
                d.raw("POST", &format!("/v1/decisions/{id}/approve"), true, None)
            {
                *self.approvals.entry(status).or_default() += 1;
                self.answered.insert(id);
            }
        }
    }

    fn stuck_bound(&self) -> Duration {
        self.stuck
    }
}

/// Stops the daemon with the chosen signal and waits for it to exit.
fn stop(d: &mut Daemon, kill: bool) {
    d.signal(if kill { libc::SIGKILL } else { libc::SIGTERM });
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            d.signal(libc::SIGKILL);
            let _ = d.child.wait();
            panic!(
                "the daemon did not stop within 60 s of SIGTERM:\n{}",
                d.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mib(v: f64) -> String {
    format!("{v:.0} MiB")
}

#[test]
fn the_daemon_keeps_its_invariants_for_a_soak_with_a_restart_in_the_middle() {
    let settings = Settings::from_env();
    let run = Duration::from_secs(settings.secs);
    let phases = (settings.secs / settings.phase_secs + 2) as usize;
    let schedule = Schedule::new(settings.seed, settings.phase_secs, phases);
    println!(
        "soak: {} s, {} services, seed {} (replay: FLUIDCLOUD_SOAK_SEED={}), phases of {} s, \
         restart by SIG{}",
        settings.secs,
        settings.services,
        settings.seed,
        settings.seed,
        settings.phase_secs,
        if settings.kill { "KILL" } else { "TERM" }
    );
    let feeds = FeedServer::start(vec![("/catalogue.csv", Body::Json(Schedule::even()))]);
    let svcs = services(settings.services);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("demo.toml.in"),
        "listen = \"{app.web.host}:{app.web.port}\"\n\
         data_file = \"{volume.data.path}\"\n\
         bucket_dir = \"{bucket.assets.path}\"\n\
         seed_mib = 1\n",
    )
    .unwrap();
    let text = config(&feeds, &svcs);
    let _apps = Apps(dir.path());
    let mut soak = Soak {
        root: dir.path().to_path_buf(),
        started: Instant::now(),
        violations: Vec::new(),
        noted: HashSet::new(),
        unmatched_since: HashMap::new(),
        unfinished_since: HashMap::new(),
        polls: 0,
        approvals: BTreeMap::new(),
        answered: HashSet::new(),
        rss: Vec::new(),
        restarts: 0,
        api_failures_since: None,
        stuck: settings.stuck,
        running: 0,
        relocations: 0,
        seen: BTreeMap::new(),
    };
    let mut d = Daemon::start(dir.path(), &text);

    // Every app answers, and its bucket gets a few objects; what each serves is noted. The
    // prices are even until the run begins, so nothing moves meanwhile.
    let mut served: BTreeMap<String, (String, String)> = BTreeMap::new();
    for s in &svcs {
        d.eventually(
            &format!("{} answering", s.name),
            Duration::from_secs(120),
            |_| app_get(s.port, "/health"),
        );
        let config: Value = serde_json::from_str(&app_get(s.port, "/config").unwrap()).unwrap();
        let bucket = Path::new(config["bucket_dir"].as_str().unwrap()).to_path_buf();
        std::fs::create_dir_all(bucket.join("img")).unwrap();
        for i in 0..3 {
            std::fs::write(
                bucket.join(format!("img/{i}.txt")),
                format!("{} {i}\n", s.name),
            )
            .unwrap();
        }
        let hash = app_get(s.port, "/hash").unwrap();
        let listing = app_get(s.port, "/bucket").unwrap();
        served.insert(s.name.clone(), (hash, listing));
    }

    // The run: new prices every second, checks every second, a restart halfway.
    soak.started = Instant::now();
    let mut life = LifeStart::default();
    let mut before_restart: Option<AtRestart> = None;
    let mut reported = 0;
    while soak.started.elapsed() < run {
        let tick = Instant::now();
        feeds.set(
            "/catalogue.csv",
            Body::Json(schedule.catalogue(soak.started.elapsed())),
        );
        soak.check(&d);
        // Halfway, the restart lands while a relocation runs (or a phase later if none does).
        let halfway = soak.started.elapsed() >= run / 2
            && (soak.running > 0 || soak.started.elapsed() >= run / 2 + schedule.phase);
        if before_restart.is_none() && halfway {
            println!(
                "soak: stopping the daemon with {} relocations queued or running",
                soak.running
            );
            stop(&mut d, settings.kill);
            let records = Journal::open(&soak.state().join("journal.sqlite"))
                .unwrap()
                .list()
                .unwrap();
            let ended: BTreeMap<String, (String, String)> = records
                .iter()
                .filter(|r| terminal(r.state.as_str()))
                .map(|r| {
                    (
                        r.id.clone(),
                        (r.state.as_str().to_string(), r.updated_at.to_rfc3339()),
                    )
                })
                .collect();
            let unfinished: HashSet<String> = records
                .iter()
                .filter(|r| !terminal(r.state.as_str()))
                .map(|r| r.id.clone())
                .collect();
            let logged: HashSet<String> = decision_log(&soak.state())
                .iter()
                .filter_map(|x| x["id"].as_str().map(str::to_string))
                .collect();
            println!(
                "soak: restart at {:.0} s: {} relocations ended, {} unfinished, {} decisions",
                soak.started.elapsed().as_secs_f64(),
                ended.len(),
                unfinished.len(),
                logged.len()
            );
            before_restart = Some(AtRestart {
                ended,
                unfinished,
                logged,
            });
            life = LifeStart::read(&soak.state());
            d = Daemon::start(dir.path(), &text);
            soak.restarts += 1;
            // The new daemon's unfinished clocks start with it; its first minutes recover.
            soak.unfinished_since.clear();
        }
        // A line a minute shows the trend of a long run.
        let minute = soak.started.elapsed().as_secs() / 60;
        if minute > reported {
            reported = minute;
            println!(
                "soak: at {} s: RSS {}, {} relocations, {} decisions",
                soak.started.elapsed().as_secs(),
                mib(soak.rss.last().map(|r| r.1).unwrap_or_default()),
                soak.relocations,
                decision_log(&soak.state()).len()
            );
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let ran = soak.started.elapsed();

    // The prices hold still until the daemon is idle: nothing unfinished, no pending
    // approval unanswered, and no new relocation for 10 s.
    let settle = Instant::now();
    let mut quiet_since = Instant::now();
    let mut last = Value::Null;
    loop {
        soak.check(&d);
        let newest = d.get("/v1/relocations?limit=1")[0]["id"].clone();
        let unfinished = d.get("/v1/relocations?state=active&limit=1");
        if newest != last || !unfinished.as_array().unwrap().is_empty() {
            last = newest;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() > Duration::from_secs(10) {
            break;
        }
        if settle.elapsed() > SETTLE_LIMIT {
            soak.violation(
                "settle",
                format!(
                    "the daemon was not idle within {SETTLE_LIMIT:?} of the prices holding still"
                ),
            );
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    soak.polls = feeds.hits("/catalogue.csv") as u64;

    // The final checks, on the idle daemon.
    let relocations = every_relocation(&d);
    let decisions = decision_log(&soak.state());
    let by_id: HashMap<String, &Value> = relocations
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    let asked: BTreeSet<String> = decisions.iter().filter_map(asked_id).collect();
    let journalled: BTreeSet<String> = by_id.keys().cloned().collect();
    if asked != journalled {
        soak.violation(
            "final match",
            format!(
                "decisions without relocation {:?}, relocations without decision {:?}",
                asked.difference(&journalled).collect::<Vec<_>>(),
                journalled.difference(&asked).collect::<Vec<_>>()
            ),
        );
    }
    for r in &relocations {
        if r["state"] == "failed" {
            soak.violation(
                &format!("failed {}", r["id"]),
                format!(
                    "relocation {} of {} failed: {}",
                    r["id"], r["request"]["service"], r["detail"]
                ),
            );
        }
    }
    if let Some(AtRestart {
        ended,
        unfinished,
        logged,
    }) = &before_restart
    {
        let ids: HashSet<String> = decisions
            .iter()
            .filter_map(|x| x["id"].as_str().map(str::to_string))
            .collect();
        let lost: Vec<&String> = logged.difference(&ids).collect();
        if !lost.is_empty() {
            soak.violation(
                "lost",
                format!("decisions lost across the restart: {lost:?}"),
            );
        }
        for (id, (state, updated)) in ended {
            match by_id.get(id) {
                Some(r) if r["state"] == state.as_str() => {
                    let now = chrono::DateTime::parse_from_rfc3339(
                        r["updated_at"].as_str().unwrap_or_default(),
                    )
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
                    let then = chrono::DateTime::parse_from_rfc3339(updated)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false));
                    if now != then {
                        soak.violation(
                            &format!("touched {id}"),
                            format!("relocation `{id}`, ended before the restart, was updated again ({then:?} → {now:?})"),
                        );
                    }
                }
                other => soak.violation(
                    &format!("changed {id}"),
                    format!(
                        "relocation `{id}` ended {state} before the restart, now {:?}",
                        other.map(|r| r["state"].clone())
                    ),
                ),
            }
        }
        for id in unfinished {
            let state = by_id
                .get(id)
                .map(|r| r["state"].as_str().unwrap_or_default());
            if !matches!(state, Some("completed" | "rolled_back")) {
                soak.violation(
                    &format!("recovered {id}"),
                    format!("relocation `{id}`, unfinished at the restart, ended {state:?}"),
                );
            }
        }
    }

    // Each service's relocations form one chain that ends where it runs, serving its data.
    let placed: HashMap<String, String> = d
        .get("/v1/services")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["provider"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut moves: BTreeMap<String, usize> = BTreeMap::new();
    let mut longest = Duration::ZERO;
    let mut ordered: Vec<&Value> = relocations.iter().collect();
    ordered.sort_by_key(|r| r["submitted_at"].as_str().unwrap_or_default().to_string());
    for s in &svcs {
        let mut at = s.provider.to_string();
        for r in ordered
            .iter()
            .filter(|r| r["request"]["service"] == s.name.as_str())
        {
            if r["request"]["from"] != at.as_str() {
                soak.violation(
                    &format!("chain {}", r["id"]),
                    format!(
                        "relocation {} of {} leaves {} but the service was at {at}",
                        r["id"], s.name, r["request"]["from"]
                    ),
                );
            }
            if r["state"] == "completed" {
                at = r["request"]["to"].as_str().unwrap().to_string();
                if r["request"]["origin"] == "policy" {
                    *moves.entry(s.name.clone()).or_default() += 1;
                }
            }
        }
        if placed.get(&s.name) != Some(&at) {
            soak.violation(
                &format!("placed {}", s.name),
                format!(
                    "{} runs at {:?} by the daemon, at {at} by its relocations",
                    s.name,
                    placed.get(&s.name)
                ),
            );
        }
        let config = app_get(s.port, "/config").unwrap_or_default();
        let (hash, listing) = &served[&s.name];
        if !config.contains(&format!("/providers/{at}/"))
            || app_get(s.port, "/hash").as_ref() != Some(hash)
            || app_get(s.port, "/bucket").as_ref() != Some(listing)
        {
            soak.violation(
                &format!("data {}", s.name),
                format!("{} does not serve its data from {at}: {config}", s.name),
            );
        }
    }
    for r in &relocations {
        let at = |k: &str| chrono::DateTime::parse_from_rfc3339(r[k].as_str().unwrap_or_default());
        if let (Ok(a), Ok(b)) = (at("submitted_at"), at("updated_at")) {
            longest = longest.max((b - a).to_std().unwrap_or_default());
        }
    }

    // The counters of the last life, once idle.
    let metrics = d.metrics();
    let requested = counter_sum(&metrics, "fluidcloud_relocations_requested_total");
    let started = counter_sum(&metrics, "fluidcloud_relocations_started_total");
    let finished = counter_sum(&metrics, "fluidcloud_relocations_finished_total");
    let refused = counter_sum(&metrics, "fluidcloud_relocations_refused_total");
    let new_in_life = journalled
        .iter()
        .filter(|id| !life.ids.contains(*id))
        .count() as f64;
    let expected = (
        new_in_life,
        new_in_life + life.queued as f64,
        new_in_life + life.unfinished as f64,
    );
    if (requested, started, finished) != expected {
        soak.violation(
            "counters",
            format!(
                "requested, started, finished = {:?}; the journal says {expected:?} \
                 ({} queued, {} queued, running or rolling back at the start of this life; {refused} refused)",
                (requested, started, finished),
                life.queued,
                life.unfinished
            ),
        );
    }

    // The RSS stayed bounded.
    let half = ran.as_secs_f64() / 2.0;
    let plateau = soak
        .rss
        .iter()
        .filter(|(t, _)| *t >= 10.0 && *t <= ran.as_secs_f64() / 4.0)
        .map(|(_, m)| *m)
        .fold(0.0, f64::max);
    let late = soak
        .rss
        .iter()
        .filter(|(t, _)| *t >= half)
        .map(|(_, m)| *m)
        .fold(0.0, f64::max);
    let peak = soak.rss.iter().map(|(_, m)| *m).fold(0.0, f64::max);
    if plateau > 0.0 && late > plateau * RSS_GROWTH + RSS_SLACK_MIB {
        soak.violation(
            "rss growth",
            format!(
                "RSS rose from a plateau of {} to {} in the last half",
                mib(plateau),
                mib(late)
            ),
        );
    }
    if peak > RSS_CAP_MIB {
        soak.violation("rss cap", format!("RSS peaked at {}", mib(peak)));
    }

    // The table.
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for x in &decisions {
        *by_outcome
            .entry(x["outcome"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let state_count = |s: &str| relocations.iter().filter(|r| r["state"] == s).count();
    let verdicts = by_outcome
        .iter()
        .map(|(o, n)| format!("{o} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let moved_twice = moves.values().filter(|n| **n >= 2).count();
    println!();
    println!(
        "| duration | services | polls | decisions by outcome | relocations started | completed | \
         rolled back | failed | invariant violations | restarts | RSS start / peak / end | \
         longest relocation |"
    );
    println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    println!(
        "| {:.0} s (+{:.0} s settling) | {} | {} | {verdicts} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {:.1} s |",
        ran.as_secs_f64(),
        settle.elapsed().as_secs_f64(),
        settings.services,
        soak.polls,
        relocations.len(),
        state_count("completed"),
        state_count("rolled_back"),
        state_count("failed"),
        soak.violations.len(),
        soak.restarts,
        mib(soak.rss.first().map(|r| r.1).unwrap_or_default()),
        mib(peak),
        mib(soak.rss.last().map(|r| r.1).unwrap_or_default()),
        longest.as_secs_f64()
    );
    println!();
    println!(
        "soak: policy moves by service {moves:?}; {moved_twice} services moved at least twice; \
         approvals answered by status {:?}; RSS plateau {}, last half peak {}; seed {}",
        soak.approvals,
        mib(plateau),
        mib(late),
        settings.seed
    );

    d.signal(libc::SIGTERM);
    let _ = d.child.wait();
    assert!(
        soak.violations.is_empty(),
        "{} invariant violations (seed {}):\n{}\n{}",
        soak.violations.len(),
        settings.seed,
        soak.violations.join("\n"),
        d.logs()
    );
    assert!(
        moved_twice >= 2,
        "the loop must keep moving: only {moved_twice} services moved twice or more on their own ({moves:?})"
    );
}
