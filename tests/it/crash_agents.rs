//! The crash suite across hosts: the relocations of `crash_suite` (the demo app, a volume
//! filled with its data, a bucket and a configuration file, from `a` to `b`), with `a` served
//! by an agent on one host and `b` by an agent on another, so the data goes host to host.
//! Each run SIGKILLs the source's agent, the target's agent, or the daemon together with one
//! of them, at a random instant; restarts what it killed (the agent first); and checks the
//! end state as the daemon suite does: relocated or rolled back, whole.
//!
//! The instant is drawn as in `crash_suite` (against an uninterrupted relocation between the
//! same hosts, measured first: three runs in four before the commit, one in four in the grace
//! period); which process dies is drawn from the same seed. The suite prints each run's seed;
//! `FLUIDCLOUD_CRASH_SEED=<n> FLUIDCLOUD_CRASH_AGENT_RUNS=1` replays one.
//! `FLUIDCLOUD_CRASH_AGENT_RUNS` (default 3) and `FLUIDCLOUD_CRASH_MIB` (the volume, default
//! 64) size it; `scripts/reliability.sh` runs the full one. Without network namespaces (not
//! root) it is skipped, as the other tests across hosts are.

use crate::common;
use crate::crash_suite::{
    bucket_digest, check, env_u64, follow, landing, measure_on, panic_message, seconds, setup,
    Draw, Timing, GRACE_SECS, RECOVERY_LIMIT,
};
use crate::relocation::{deploy, relocate_by_hand, Setup};

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::agents::{Agent, Pki};
use common::netns::{Host, Hosts};

/// Which processes a run kills: an agent (the source's or the target's), with or without the
/// daemon.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Source,
    Target,
    DaemonAndSource,
    DaemonAndTarget,
}

impl Victim {
    /// One run in three the source's agent, one the target's, one the daemon with either.
    fn draw(seed: u64) -> Victim {
        // A stream of its own: the seed draws the same instant as in the daemon suite.
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_a9e7_0f0f_a9e7);
        match (rng.u8(..3), rng.bool()) {
            (0, _) => Victim::Source,
            (1, _) => Victim::Target,
            (_, true) => Victim::DaemonAndSource,
            (_, false) => Victim::DaemonAndTarget,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Victim::Source => "source agent",
            Victim::Target => "target agent",
            Victim::DaemonAndSource => "daemon + source agent",
            Victim::DaemonAndTarget => "daemon + target agent",
        }
    }

    fn daemon(self) -> bool {
        matches!(self, Victim::DaemonAndSource | Victim::DaemonAndTarget)
    }

    fn source(self) -> bool {
        matches!(self, Victim::Source | Victim::DaemonAndSource)
    }
}

/// The daemon suite's setup with its providers served by agents: `a` by an agent on one
/// host, `b` by one on another, their roots `providers/a` and `providers/b` under the test's
/// directory as in the daemon suite. Dropped in order: agents, apps, hosts.
pub(crate) struct Across {
    pub(crate) a: Agent,
    pub(crate) b: Agent,
    pub(crate) s: Setup,
    pub(crate) hosts: Hosts,
}

impl Across {
    pub(crate) fn new(volume_mib: u64) -> Option<Across> {
        Across::with_viaducts(volume_mib, |_, _| None)
    }

    /// A failed check's message, with the daemon's and both agents' logs.
    pub(crate) fn explain(&self, e: &(dyn std::any::Any + Send)) -> String {
        let log = |name: &str| std::fs::read_to_string(self.s.path(name)).unwrap_or_default();
        format!(
            "{}\ndaemon:\n{}\nagent a:\n{}\nagent b:\n{}",
            panic_message(e),
            log("daemon.log"),
            log("a.log"),
            log("b.log")
        )
    }

    /// [`Across::new`], with `viaduct_at(hosts, host)` naming, for the agent on `host`, the
    /// address senders are told to reach its viaduct receiver at (`viaduct_advertise`: a
    /// proxy in front of it), or none for its own.
    pub(crate) fn with_viaducts(
        volume_mib: u64,
        mut viaduct_at: impl FnMut(&Hosts, &Host) -> Option<String>,
    ) -> Option<Across> {
        let hosts = Hosts::create(2)?;
        let mut s = setup(volume_mib);
        let dir = s.path("");
        let pki = Pki::create(&dir);
        let providers = |name: &str, region: &str| {
            format!(
                "[providers.{name}]\ndriver = \"local\"\nregion = \"{region}\"\n\
                 root = \"providers/{name}\"\n"
            )
        };
        let mut agent = |host: &Host, name: &str, region: &str| {
            let lines = viaduct_at(&hosts, host)
                .map(|at| format!("viaduct_advertise = \"{at}\"\n"))
                .unwrap_or_default();
            Agent::start_with(host, &dir, &pki, name, &providers(name, region), &lines)
        };
        let a = agent(hosts.a(), "a", "us-east-1");
        let b = agent(hosts.b(), "b", "eu-central-1");
        a.wait_up(hosts.a());
        b.wait_up(hosts.b());
        s.config = s
            .config
            .clone()
            .provider("a", "local", "us-east-1", |p| {
                p.disk_format("raw").set("agent", a.url.clone())
            })
            .provider("b", "local", "eu-central-1", |p| {
                p.disk_format("raw").set("agent", b.url.clone())
            })
            .raw(&pki.daemon_tls);
        s.app_hosts = vec![hosts.a().addr.to_string(), hosts.b().addr.to_string()];
        Some(Across { a, b, s, hosts })
    }
}

/// How one run ended.
struct Run {
    seed: u64,
    victim: Victim,
    delay: Duration,
    landed: String,
    /// `completed`, `rolled_back`, `failed`, or none when the relocation never reached the
    /// journal.
    outcome: Option<String>,
    /// Restart to a terminal state, and to the app answering from where it ended.
    to_terminal: Duration,
    to_serving: Duration,
    problem: Option<String>,
}

/// One seeded run, from a fresh deployment across the hosts to the checked end state.
fn run(draw: Draw, victim: Victim, volume_mib: u64, timing: &Timing) -> Run {
    let delay = draw.delay(timing);
    let context = format!(
        "seed {} ({} killed after {} ms)",
        draw.seed,
        victim.name(),
        delay.as_millis()
    );
    let mut x = Across::new(volume_mib).expect("the hosts were made for the measurement");
    let s = &x.s;
    let (hash, listing) = deploy(s);
    let digest = bucket_digest(&s.path("providers/a/buckets/shop/assets"));

    let mut d = s.daemon();
    let started = Instant::now();
    relocate_by_hand(&d, "b");
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    let (agent, host) = if victim.source() {
        (&mut x.a, x.hosts.a())
    } else {
        (&mut x.b, x.hosts.b())
    };
    if victim.daemon() {
        d.signal(libc::SIGKILL);
    }
    agent.kill();
    if victim.daemon() {
        d.child.wait().unwrap();
    }
    let landed = landing(&s.path("state"));

    let restarted = Instant::now();
    agent.restart();
    let mut recovered = (None, RECOVERY_LIMIT, RECOVERY_LIMIT);
    let checked = catch_unwind(AssertUnwindSafe(|| {
        agent.wait_up(host);
        let d = if victim.daemon() { s.daemon() } else { d };
        let (mut d, outcome, to_terminal, to_serving) = follow(s, d, restarted);
        recovered = (outcome.clone(), to_terminal, to_serving);
        check(s, &hash, &listing, &digest, outcome.as_deref(), &context);
        d.signal(libc::SIGTERM);
        let _ = d.child.wait();
    }));
    let problem = checked.err().map(|e| x.explain(e.as_ref()));
    let (outcome, to_terminal, to_serving) = recovered;
    Run {
        seed: draw.seed,
        victim,
        delay,
        landed,
        outcome,
        to_terminal,
        to_serving,
        problem,
    }
}

impl Run {
    fn outcome(&self) -> &str {
        match (&self.problem, self.outcome.as_deref()) {
            (Some(_), _) => "inconsistent",
            (None, Some(o)) => o,
            (None, None) => "not started",
        }
    }
}

#[test]
fn sigkill_of_agents_at_random_moments_of_relocations_across_hosts_ends_relocated_or_rolled_back() {
    let runs = env_u64("FLUIDCLOUD_CRASH_AGENT_RUNS", 3);
    let volume_mib = env_u64("FLUIDCLOUD_CRASH_MIB", 64);
    let first_seed = std::env::var("FLUIDCLOUD_CRASH_SEED")
        .map(|v| v.parse::<u64>().expect("FLUIDCLOUD_CRASH_SEED is a number"))
        .unwrap_or_else(|_| fastrand::u64(..1 << 48));
    let Some(measured) = Across::new(volume_mib) else {
        return;
    };
    let timing = catch_unwind(AssertUnwindSafe(|| measure_on(&measured.s))).unwrap_or_else(|e| {
        panic!(
            "{}\nagent a:\n{}\nagent b:\n{}",
            panic_message(e.as_ref()),
            measured.a.logs(),
            measured.b.logs()
        )
    });
    drop(measured);
    println!(
        "crash suite with agents: {runs} runs, volume {volume_mib} MiB, an uninterrupted \
         relocation across hosts commits after {} and ends after {} (grace period \
         {GRACE_SECS} s), first seed {first_seed}",
        seconds(timing.to_commit),
        seconds(timing.to_end)
    );
    let mut done = Vec::new();
    for i in 0..runs {
        let seed = first_seed.wrapping_add(i);
        let (draw, victim) = (Draw::new(seed), Victim::draw(seed));
        let r = catch_unwind(|| run(draw, victim, volume_mib, &timing)).unwrap_or_else(|e| Run {
            seed,
            victim,
            delay: draw.delay(&timing),
            landed: "?".to_string(),
            outcome: None,
            to_terminal: RECOVERY_LIMIT,
            to_serving: RECOVERY_LIMIT,
            problem: Some(panic_message(e.as_ref())),
        });
        println!(
            "run {:>3} seed {} {:<21} killed at {:>6} ms in {:<45} -> {:<11} over in {:>6}, \
             serving in {:>6}{}",
            i + 1,
            r.seed,
            r.victim.name(),
            r.delay.as_millis(),
            r.landed,
            r.outcome.as_deref().unwrap_or("not started"),
            seconds(r.to_terminal),
            seconds(r.to_serving),
            if r.problem.is_some() {
                "  INCONSISTENT"
            } else {
                ""
            }
        );
        done.push(r);
    }

    let count = |o: &str| done.iter().filter(|r| r.outcome() == o).count();
    let worst_terminal = done.iter().map(|r| r.to_terminal).max().unwrap_or_default();
    let worst_serving = done.iter().map(|r| r.to_serving).max().unwrap_or_default();
    println!();
    println!(
        "| runs | relocated | rolled back | failed (data intact) | not started | inconsistent | \
         worst recovery: relocation over | worst recovery: app answering |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} |",
        done.len(),
        count("completed"),
        count("rolled_back"),
        count("failed"),
        count("not started"),
        count("inconsistent"),
        seconds(worst_terminal),
        seconds(worst_serving),
    );
    let mut by_victim: BTreeMap<(Victim, String), usize> = BTreeMap::new();
    let mut by_landing: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &done {
        *by_victim
            .entry((r.victim, r.outcome().to_string()))
            .or_default() += 1;
        *by_landing
            .entry((r.landed.clone(), r.outcome().to_string()))
            .or_default() += 1;
    }
    println!();
    println!("| killed | outcome | runs |");
    println!("| --- | --- | ---: |");
    for ((victim, outcome), n) in &by_victim {
        println!("| {} | {outcome} | {n} |", victim.name());
    }
    println!();
    println!("| kill landed in | outcome | runs |");
    println!("| --- | --- | ---: |");
    for ((landed, outcome), n) in &by_landing {
        println!("| {landed} | {outcome} | {n} |");
    }
    let problems: Vec<String> = done
        .iter()
        .filter_map(|r| {
            r.problem.as_ref().map(|p| {
                format!(
                    "seed {} (replay: FLUIDCLOUD_CRASH_SEED={} FLUIDCLOUD_CRASH_AGENT_RUNS=1 \
                     FLUIDCLOUD_CRASH_MIB={volume_mib}): {p}",
                    r.seed, r.seed
                )
            })
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
