//! One policy tick at scale, on one core: 10,000 services, each looking at 100 candidate
//! offers, evaluated by `policies/cheapest.rhai` and `policies/balanced.rhai`.
//!
//! Prints the time to build the decision contexts and to evaluate them, separately, and
//! per service. The target is under one second per tick (build + evaluate) in a release
//! build. Run with `cargo bench --bench policy_eval`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use clap::Parser;
use fluidcloud::config::{Mode, PolicySpec};
use fluidcloud::model::VmSpec;
use fluidcloud::model::{Component, ComponentSettings, ServiceSpec};
use fluidcloud::model::{
    ComponentKind, IoFigures, MarketSnapshot, Offer, RegionInfo, Requirements, Verdict,
};
use fluidcloud::policy::{DecisionContext, Limits, Market, Policy};

#[path = "common/mod.rs"]
mod common;

const SERVICES: usize = 10_000;
const PROVIDERS: usize = 11;
const FLAVORS_PER_PROVIDER: usize = 10;

/// A small deterministic generator, so every run measures the same market.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn market(rng: &mut Lcg) -> MarketSnapshot {
    let now = Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap();
    let mut snapshot = MarketSnapshot {
        taken_at: Some(now),
        ..MarketSnapshot::default()
    };
    for p in 0..PROVIDERS {
        let provider = format!("provider-{p:02}");
        let offers: Vec<Offer> = (0..FLAVORS_PER_PROVIDER)
            .map(|f| Offer {
                provider: provider.clone(),
                region: format!("region-{p}"),
                flavor: format!("flavor-{f}"),
                vcpus: 2 + f as u32,
                memory_gib: 4.0 + 2.0 * f as f64,
                price_per_hour: 0.02 + 0.3 * rng.next(),
                storage_price_per_gib_month: Some(0.05 + 0.1 * rng.next()),
                egress_price_per_gib: if p % 3 == 0 { None } else { Some(0.09) },
                currency: "USD".into(),
            })
            .collect();
        snapshot.offers.insert(provider.clone(), Arc::new(offers));
        // One provider was never measured: policies must cope with missing IO.
        if p != 4 {
            snapshot.io.insert(
                provider.clone(),
                IoFigures {
                    seq_write_mb_s: 100.0 + 900.0 * rng.next(),
                    seq_read_mb_s: 100.0 + 1900.0 * rng.next(),
                    rand_read_iops: 1_000.0 + 50_000.0 * rng.next(),
                    rand_read_latency_seconds: 0.0001 + 0.002 * rng.next(),
                    measured_at: now,
                },
            );
        }
        let eu = p % 2 == 0;
        snapshot.regions.insert(
            provider,
            RegionInfo {
                country: if eu { "DE".into() } else { "US".into() },
                subdivision: String::new(),
                eu,
                eea: eu,
                tags: if eu {
                    vec!["gdpr".into()]
                } else {
                    vec!["cloud-act".into()]
                },
            },
        );
    }
    snapshot
}

fn services(rng: &mut Lcg, policy: &str) -> Vec<ServiceSpec> {
    (0..SERVICES)
        .map(|i| ServiceSpec {
            name: format!("service-{i:05}"),
            provider: format!("provider-{:02}", i % PROVIDERS),
            policy: policy.to_string(),
            flavor: None,
            requirements: Requirements {
                vcpus: 1,
                memory_gib: 2.0,
            },
            pinned: false,
            health_check: None,
            components: vec![
                Component {
                    kind: ComponentKind::Vm,
                    name: "vm".into(),
                    size_gib: 20.0,
                    keep_at_source: false,
                    home: None,
                    settings: ComponentSettings::Vm(VmSpec::new("vm")),
                },
                Component {
                    kind: ComponentKind::Volume,
                    name: "data".into(),
                    size_gib: (10.0 + 500.0 * rng.next()).round(),
                    keep_at_source: false,
                    home: None,
                    settings: ComponentSettings::Volume,
                },
            ],
            cutover: None,
            recontextualise: None,
            vm_moves: Default::default(),
        })
        .collect()
}

fn policy_spec(name: &str, file: &Path) -> PolicySpec {
    PolicySpec {
        name: name.to_string(),
        file: file.to_path_buf(),
        mode: Mode::Audit,
        min_improvement_ratio: 0.10,
        confirmations: 3,
        min_residency: Duration::from_secs(86_400),
        cooldown: Duration::from_secs(3_600),
        break_even_horizon_days: 30.0,
        expected_downtime: Duration::from_secs(60),
        move_duration: Duration::from_secs(3_600),
        downtime_cost_per_hour: 10.0,
        blackouts: Vec::new(),
        vm_mode: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time of this thread: what the tick itself used, whatever else the machine runs.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of one phase.
#[derive(Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: Duration,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Timing) {
    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    let out = f();
    let timing = Timing {
        wall: wall.elapsed(),
        cpu: thread_cpu_time() - cpu,
    };
    (out, timing)
}

/// Ticks measured per policy; the median is reported so that a neighbour's burst on a
/// shared machine does not decide the figure.
const TICKS: usize = 5;

fn median(mut v: Vec<Timing>) -> Timing {
    v.sort_by_key(|t| t.wall);
    v[v.len() / 2]
}

/// One policy tick at scale, on one core. It takes no arguments of its own.
#[derive(Parser, Debug)]
#[command(name = "policy_eval", bin_name = "cargo bench --bench policy_eval --")]
struct Args {
    #[command(flatten)]
    cargo: common::CargoBench,
}

fn main() {
    Args::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut rng = Lcg(0x5eed);
    let snapshot = market(&mut rng);
    let now = Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap();
    let limits = Limits::default();
    let candidates = (PROVIDERS - 1) * FLAVORS_PER_PROVIDER;
    println!(
        "policy tick: {SERVICES} services x {candidates} candidate offers, one core, \
         median of {TICKS} ticks (wall / thread CPU)"
    );

    for name in ["cheapest", "balanced"] {
        let file = root.join("policies").join(format!("{name}.rhai"));
        let policy = match Policy::load(&file, &limits) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let spec = policy_spec(name, &file);
        let services = services(&mut rng, name);

        let mut builds = Vec::new();
        let mut evals = Vec::new();
        let mut totals = Vec::new();
        let mut outcome = (0, 0, 0);
        let mut last_contexts = Vec::new();
        // One extra tick first: first-use costs (allocator growth, caches) are not a tick's.
        for tick in 0..=TICKS {
            let (contexts, build) = timed(|| {
                let market = Market::new(&snapshot);
                services
                    .iter()
                    .map(|s| DecisionContext::build_in(&market, s, &spec, now))
                    .collect::<Result<Vec<_>, _>>()
                    .expect("every service has a current offer")
            });
            let (verdicts, eval) = timed(|| policy.decide_all(&contexts));
            assert!(contexts.iter().all(|c| c.candidates.len() == candidates));
            let (mut stay, mut relocate, mut errors) = (0, 0, 0);
            for v in &verdicts {
                match v {
                    Ok(Verdict::Stay { .. }) => stay += 1,
                    Ok(Verdict::Relocate { .. }) => relocate += 1,
                    Err(e) => {
                        if errors == 0 {
                            eprintln!("first error: {e}");
                        }
                        errors += 1;
                    }
                }
            }
            outcome = (stay, relocate, errors);
            if tick > 0 {
                builds.push(build);
                evals.push(eval);
                totals.push(Timing {
                    wall: build.wall + eval.wall,
                    cpu: build.cpu + eval.cpu,
                });
            }
            last_contexts = contexts;
        }
        let (build, eval, total) = (median(builds), median(evals), median(totals));

        println!("\n{name}.rhai");
        println!(
            "  build contexts   {:7.1} ms / {:7.1} ms",
            ms(build.wall),
            ms(build.cpu)
        );
        println!(
            "  evaluate         {:7.1} ms / {:7.1} ms",
            ms(eval.wall),
            ms(eval.cpu)
        );
        println!(
            "  tick             {:7.1} ms / {:7.1} ms   {:.1} us per service (target: tick < 1000 ms)",
            ms(total.wall),
            ms(total.cpu),
            total.wall.as_secs_f64() * 1e6 / SERVICES as f64
        );
        let (stay, relocate, errors) = outcome;
        println!("  verdicts         {stay} stay, {relocate} relocate, {errors} errors");

        if name == "cheapest" {
            // For comparison: handing the same contexts to Rhai as plain maps, every offer
            // converted for every service, before evaluating anything.
            let (_, naive) = timed(|| {
                for c in &last_contexts {
                    let v = rhai::serde::to_dynamic(c).expect("a context converts");
                    assert!(v.is_map());
                }
            });
            println!(
                "  (for comparison, converting the contexts to plain Rhai maps alone: \
                 {:.1} ms / {:.1} ms)",
                ms(naive.wall),
                ms(naive.cpu)
            );
        }
    }
}
