//! The supervisor's parts that run without the network: scheduling, outcomes and views,
//! against a fake conduit and a placement book the test writes.

use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

use super::costs::export_costs;
use super::*;
use crate::broker::decisions::{Decision, Outcome};
use crate::conduit::{Relocation, RelocationRequest, RelocationState};
use crate::model::{Placement, Verdict};

/// Takes every relocation and runs none.
#[derive(Default)]
struct FakeConduit {
    submitted: Mutex<Vec<Relocation>>,
    /// Calls that read every relocation with its steps.
    full_reads: std::sync::atomic::AtomicUsize,
}

impl Conduit for FakeConduit {
    fn submit(&self, request: RelocationRequest) -> Result<Relocation, ConduitError> {
        let r = Relocation {
            id: request.decision_id.clone(),
            request,
            state: RelocationState::Queued,
            submitted_at: Utc::now(),
            updated_at: Utc::now(),
            detail: String::new(),
            steps: Vec::new(),
            progress: BTreeMap::new(),
        };
        self.submitted.lock().unwrap().push(r.clone());
        Ok(r)
    }

    fn relocations(&self) -> Vec<Relocation> {
        self.full_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.submitted.lock().unwrap().clone()
    }

    fn summaries_since(&self, since: DateTime<Utc>) -> Vec<Relocation> {
        self.submitted
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.state.is_active() || r.submitted_at >= since)
            .cloned()
            .collect()
    }

    fn last_relocations(&self) -> BTreeMap<String, DateTime<Utc>> {
        let mut last = BTreeMap::new();
        for r in self.submitted.lock().unwrap().iter() {
            let t = last
                .entry(r.request.service.clone())
                .or_insert(r.submitted_at);
            *t = (*t).max(r.submitted_at);
        }
        last
    }
}

/// A supervisor on a temporary directory with providers `a` and `b` and service `shop` on
/// `a`; `feed` is the base URL of `a`'s price feed.
struct Bench {
    dir: tempfile::TempDir,
    conduit: Arc<FakeConduit>,
    book: Arc<RwLock<Placements>>,
    shutdown: CancellationToken,
}

impl Bench {
    fn new() -> Bench {
        Bench {
            dir: tempfile::tempdir().unwrap(),
            conduit: Arc::default(),
            book: Arc::default(),
            shutdown: CancellationToken::new(),
        }
    }

    fn write_config(&self, feed: Option<&str>) -> PathBuf {
        let dir = self.dir.path().display();
        let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/cheapest.rhai");
        let pricing = |name: &str| {
            match feed {
            Some(base) => format!(
                "[providers.{name}.pricing]\nformat = \"csv\"\nurl = \"{base}/{name}.csv\"\nschedule = \"0 0 * * * *\"\n"
            ),
            None => String::new(),
        }
        };
        let text = format!(
            r#"
[daemon]
state_dir = "{dir}/state"
listen = "127.0.0.1:0"

[providers.a]
driver = "local"
region = "us-east-1"
root = "{dir}/a"
{pa}
[providers.b]
driver = "local"
region = "us-east-1"
root = "{dir}/b"
{pb}
[policies.cheapest]
file = "{policy}"
mode = "enforce"
confirmations = 1
min_residency_secs = 0

[services.shop]
provider = "a"
policy = "cheapest"
vcpus = 2
memory_gib = 4
"#,
            pa = pricing("a"),
            pb = pricing("b"),
        );
        let path = self.dir.path().join("fluidcloud.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn supervisor(&self, feed: Option<&str>) -> Supervisor {
        self.supervisor_and_handle(feed).0
    }

    fn supervisor_and_handle(&self, feed: Option<&str>) -> (Supervisor, BrokerHandle) {
        let loaded = match Loaded::from_file(&self.write_config(feed)) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        Supervisor::new(
            loaded,
            Seams {
                conduit: self.conduit.clone(),
                placements: self.book.clone(),
                metrics: Arc::new(Metrics::new()),
                shutdown: self.shutdown.clone(),
                notify: false,
                clock: Arc::new(crate::broker::clock::SystemClock),
            },
        )
        .unwrap()
    }

    fn place(&self, service: &str, provider: &str) {
        *self.book.write().unwrap() = [Placement {
            service: service.into(),
            provider: provider.into(),
            since: Utc::now(),
            relocation_id: "r1".into(),
        }]
        .into_iter()
        .collect();
    }
}

/// Every source fresh, and every provider's prices new, as after a good poll.
fn fresh(s: &mut Supervisor) {
    let mut market = (*s.market).clone();
    for st in market.sources.values_mut() {
        st.last_success = Some(Utc::now());
    }
    s.publish(market);
    for p in ["a", "b"] {
        s.fresh_prices.insert(p.into(), Utc::now());
    }
}

/// Applies one tick's evaluations, made on the prices the supervisor knows.
fn apply(s: &mut Supervisor, evals: Vec<Evaluation>) {
    let fresh = s.fresh_prices.clone();
    s.apply(evals, &fresh);
}

fn wants_b(provider: &str) -> Evaluation {
    Evaluation {
        service: "shop".into(),
        policy: "cheapest".into(),
        policy_hash: "h".into(),
        input_digest: String::new(),
        provider: provider.into(),
        verdict: Ok(Verdict::Relocate {
            provider: "b".into(),
            reason: "b is cheaper".into(),
            compulsory: false,
        }),
        current_monthly_cost: Some(100.0),
        currency: "USD".into(),
        targets: BTreeMap::from([("b".to_string(), (50.0, 10.0))]),
        target_flavors: BTreeMap::new(),
    }
}

#[test]
fn jobs_keep_the_names_logs_metrics_and_the_api_know() {
    assert_eq!(Job::Evaluate.to_string(), "evaluate");
    assert_eq!(Job::Pricing("aws-va".into()).to_string(), "pricing:aws-va");
    assert_eq!(
        Job::Benchmark("aws-va".into()).to_string(),
        "benchmark:aws-va"
    );
    assert_eq!(Job::Pricing("b".into()).provider(), Some("b"));
    assert_eq!(Job::Evaluate.provider(), None);
}

#[tokio::test]
async fn an_enforced_relocation_that_passes_the_rails_is_submitted_and_logged() {
    let bench = Bench::new();
    let mut s = bench.supervisor(Some("http://127.0.0.1:9"));
    fresh(&mut s);
    apply(&mut s, vec![wants_b("a")]);
    let submitted = bench.conduit.relocations();
    assert_eq!(submitted.len(), 1);
    assert_eq!(
        (
            submitted[0].request.from.as_str(),
            submitted[0].request.to.as_str()
        ),
        ("a", "b")
    );
    let logged = s.decisions(&DecisionQuery::default());
    assert_eq!(logged.len(), 1);
    assert_eq!(
        logged[0].outcome,
        Outcome::Submitted,
        "{:?}",
        logged[0].rails
    );
    assert_eq!(logged[0].id, submitted[0].id);
    // The next tick finds it relocating (and cooling down): nothing more is submitted.
    apply(&mut s, vec![wants_b("a")]);
    assert_eq!(bench.conduit.relocations().len(), 1);
    let last = s.decisions(&DecisionQuery::default()).pop().unwrap();
    assert_eq!(last.outcome, Outcome::Suppressed);
    assert!(last
        .rails
        .iter()
        .any(|r| r.rail == "already_relocating" && !r.passed));
}

/// The journal grows with every relocation a daemon makes in its life; each tick and each
/// status call read all of it, every step's output included.
#[tokio::test]
async fn a_tick_and_the_status_view_read_no_relocations_steps() {
    let bench = Bench::new();
    let mut s = bench.supervisor(Some("http://127.0.0.1:9"));
    fresh(&mut s);
    apply(&mut s, vec![wants_b("a")]);
    apply(&mut s, vec![wants_b("a")]);
    assert!(s.services()[0].relocation.is_some());
    assert_eq!(
        bench
            .conduit
            .full_reads
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        bench
            .conduit
            .summaries_since(DateTime::<Utc>::MIN_UTC)
            .len(),
        1
    );
}

#[tokio::test]
async fn stale_market_data_suppresses_a_relocation() {
    let bench = Bench::new();
    let mut s = bench.supervisor(Some("http://127.0.0.1:9"));
    apply(&mut s, vec![wants_b("a")]);
    assert!(bench.conduit.relocations().is_empty());
    let d = s.decisions(&DecisionQuery::default()).pop().unwrap();
    assert_eq!(d.suppressed_by.as_deref(), Some("stale_data"));
    let status = &s.services()[0];
    assert_eq!(status.last_outcome, Some(Outcome::Suppressed));
    assert_eq!(status.streak_target.as_deref(), Some("b"));
}

#[test]
fn a_tick_that_would_move_too_many_services_moves_none() {
    let bench = Bench::new();
    let s = bench.supervisor(None);
    let submitted = |service: &str| Decision {
        id: String::new(),
        time: Utc::now(),
        service: service.into(),
        policy: "cheapest".into(),
        policy_hash: String::new(),
        input_digest: String::new(),
        mode: "enforce".into(),
        provider: "a".into(),
        verdict: None,
        outcome: Outcome::Submitted,
        suppressed_by: None,
        rails: Vec::new(),
        current_monthly_cost: None,
        target_monthly_cost: None,
        migration_cost: None,
        refers_to: None,
        error: None,
        plan: None,
    };
    let mut broker = s.config().broker.clone();
    broker.max_relocations_percent = 20.0;
    // 2 of 10 is 20 %: allowed.
    let mut two = vec![submitted("x"), submitted("y")];
    outcomes::safety_belt(&mut two, 10, &broker);
    assert!(two.iter().all(|d| d.outcome == Outcome::Submitted));
    // 3 of 10 is too many: none moves, each says why.
    let mut three = vec![submitted("x"), submitted("y"), submitted("z")];
    outcomes::safety_belt(&mut three, 10, &broker);
    for d in &three {
        assert_eq!(d.outcome, Outcome::Suppressed);
        assert_eq!(d.suppressed_by.as_deref(), Some("max_relocations_percent"));
        assert!(d.rails.last().unwrap().detail.contains("3 of 10"));
    }
}

#[tokio::test]
async fn after_a_relocation_the_service_is_evaluated_and_shown_at_its_new_provider() {
    let bench = Bench::new();
    let mut s = bench.supervisor(None);
    assert_eq!(s.services()[0].provider, "a");
    bench.place("shop", "b");
    s.refresh_placements();
    let evals = evaluate_all(
        s.config(),
        &s.loaded.policies,
        &s.placements,
        &s.market,
        &s.metrics,
        Utc::now(),
    );
    assert_eq!(evals[0].provider, "b");
    // The configuration is left as written: it says where the service started.
    assert_eq!(s.config().services["shop"].provider, "a");
    assert_eq!(s.services()[0].provider, "b");
    let refused = s.trigger("shop", "b", None, false).unwrap_err();
    assert!(
        refused.to_string().contains("already runs on `b`"),
        "{refused}"
    );
    s.trigger("shop", "a", None, false).unwrap();
    assert_eq!(bench.conduit.relocations()[0].request.from, "b");
    // A placement at a provider the configuration no longer has is not believed.
    bench.place("shop", "gone");
    s.refresh_placements();
    assert_eq!(s.services()[0].provider, "a");
}

#[tokio::test]
async fn a_relocation_committed_since_the_last_look_restarts_residency_and_streak() {
    let bench = Bench::new();
    let mut s = bench.supervisor(Some("http://127.0.0.1:9"));
    // New prices, but too old a market to act on: the wish is held and remembered.
    s.fresh_prices.insert("b".into(), Utc::now());
    apply(&mut s, vec![wants_b("a")]);
    let before = s.state.services["shop"].clone();
    assert_eq!(before.streak, 1);
    bench.place("shop", "b");
    let mut at_b = wants_b("b");
    at_b.verdict = Ok(Verdict::Relocate {
        provider: "a".into(),
        reason: "a is cheaper now".into(),
        compulsory: false,
    });
    at_b.targets = BTreeMap::from([("a".to_string(), (50.0, 10.0))]);
    apply(&mut s, vec![at_b]);
    let after = &s.state.services["shop"];
    assert_eq!(
        after.placed_since,
        s.placements.get("shop").map(|p| p.since)
    );
    assert_eq!(
        (after.streak_target.as_deref(), after.streak),
        (Some("a"), 1)
    );
}

#[tokio::test]
async fn a_state_file_that_still_holds_placements_loads() {
    let bench = Bench::new();
    let state = bench.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("broker-state.json"),
        r#"{"services": {"shop": {"provider": "b", "placed_since": "2026-06-01T10:00:00Z",
            "last_relocation": null, "streak_target": null, "streak": 0}},
            "pending": {}, "prices": {}}"#,
    )
    .unwrap();
    let s = bench.supervisor(None);
    assert!(s.state.services["shop"].placed_since.is_some());
    // The journal, not the old state file, says where the service runs.
    assert_eq!(s.services()[0].provider, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_feed_stops_its_poller() {
    let bench = Bench::new();
    let mut s = bench.supervisor(Some("http://127.0.0.1:9"));
    s.sync_pollers();
    let jobs: Vec<Job> = s.pollers.keys().cloned().collect();
    assert_eq!(jobs, [Job::Pricing("a".into()), Job::Pricing("b".into())]);
    assert_eq!(s.tasks.len(), 2);
    s.loaded = Loaded::from_file(&bench.write_config(None)).unwrap();
    s.sync_pollers();
    assert!(s.pollers.is_empty());
    for _ in 0..2 {
        let ended = tokio::time::timeout(Duration::from_secs(5), s.tasks.join_next()).await;
        assert!(matches!(ended, Ok(Some(Ok(())))), "a poller did not stop");
    }
    assert!(s.tasks.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_the_run_and_every_poller_even_with_a_poll_in_flight() {
    // A feed that takes connections and never answers: the polls hang until cancelled.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (accepted_tx, mut accepted) = mpsc::channel(8);
    let server = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
            let _ = accepted_tx.send(()).await;
        }
    });
    let bench = Bench::new();
    let s = bench.supervisor(Some(&base));
    let run = tokio::spawn(s.run());
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("no poll reached the feed");
    bench.shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the supervisor did not stop")
        .unwrap()
        .unwrap();
    assert_eq!(stopped.abandoned, 0);
    assert!(stopped.joined >= 2, "{stopped:?}");
    server.abort();
}

fn evaluation(provider: &str, currency: &str, cost: Option<f64>) -> Evaluation {
    Evaluation {
        service: "shop".into(),
        policy: "cheapest".into(),
        policy_hash: String::new(),
        input_digest: String::new(),
        provider: provider.into(),
        verdict: Err(String::new()),
        current_monthly_cost: cost,
        currency: currency.into(),
        targets: BTreeMap::from([("elsewhere".to_string(), (10.0, 1.0))]),
        target_flavors: BTreeMap::new(),
    }
}

fn series(metrics: &Metrics, name: &str) -> Vec<String> {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_moved_service_exports_only_its_new_provider_cost_series() {
    let metrics = Metrics::new();
    let mut exported = BTreeMap::new();
    export_costs(
        &metrics,
        &mut exported,
        &evaluation("aws-va", "USD", Some(70.0)),
    );
    export_costs(
        &metrics,
        &mut exported,
        &evaluation("azure-we", "EUR", Some(30.0)),
    );
    assert_eq!(
        series(&metrics, "fluidcloud_service_monthly_cost"),
        [
            r#"fluidcloud_service_monthly_cost{currency="EUR",provider="azure-we",service="shop"} 30"#
        ]
    );
    assert_eq!(
        series(&metrics, "fluidcloud_service_projected_monthly_savings"),
        [r#"fluidcloud_service_projected_monthly_savings{currency="EUR",service="shop"} 20"#]
    );
    // A cost that is no longer known is not exported at its old value.
    export_costs(
        &metrics,
        &mut exported,
        &evaluation("azure-we", "EUR", None),
    );
    assert!(series(&metrics, "fluidcloud_service_monthly_cost").is_empty());
    assert!(series(&metrics, "fluidcloud_service_projected_monthly_savings").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_command_stops_the_broker_and_its_workers_but_not_the_daemon() {
    let bench = Bench::new();
    let (s, handle) = bench.supervisor_and_handle(Some("http://127.0.0.1:9"));
    let run = tokio::spawn(s.run());
    handle.commands.send(Command::Shutdown).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the supervisor did not stop")
        .unwrap()
        .unwrap();
    assert_eq!(stopped.abandoned, 0);
    assert!(!bench.shutdown.is_cancelled());
}

fn offer(provider: &str, price_per_hour: f64) -> crate::model::Offer {
    crate::model::Offer {
        provider: provider.into(),
        region: "us-east-1".into(),
        flavor: "m.large".into(),
        vcpus: 2,
        memory_gib: 4.0,
        price_per_hour,
        storage_price_per_gib_month: None,
        egress_price_per_gib: None,
        currency: "USD".into(),
    }
}

#[test]
fn the_stale_data_guard_and_the_relocation_times_read_the_injected_clock() {
    let bench = Bench::new();
    let loaded = Loaded::from_file(&bench.write_config(Some("http://127.0.0.1:9"))).unwrap();
    let start: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
    let mut r = Replay::new(loaded, start).unwrap();
    let poll = |r: &mut Replay| {
        r.poll_prices("a", vec![offer("a", 0.10)]);
        r.poll_prices("b", vec![offer("b", 0.05)]);
    };
    poll(&mut r);
    // A day and an hour later by the broker's clock, the prices are older than their
    // default maximum age of a day, however little time really passed.
    r.advance(Duration::from_secs(25 * 3600));
    r.evaluate();
    assert!(r.relocations().is_empty());
    assert_eq!(r.suppressions(), BTreeMap::from([("stale_data".into(), 1)]));
    poll(&mut r);
    r.evaluate();
    let moved = r.relocations();
    assert_eq!(moved.len(), 1, "{:?}", r.suppressions());
    assert_eq!(moved[0].submitted_at, start + chrono::Duration::hours(25));
    assert_eq!(r.provider_of("shop").as_deref(), Some("b"));
}

#[test]
fn a_tick_that_changes_nothing_does_not_write_the_state_again() {
    let bench = Bench::new();
    let loaded = Loaded::from_file(&bench.write_config(Some("http://127.0.0.1:9"))).unwrap();
    let mut r = Replay::new(loaded, "2026-06-01T00:00:00Z".parse().unwrap()).unwrap();
    r.poll_prices("a", vec![offer("a", 0.10)]);
    r.poll_prices("b", vec![offer("b", 0.10)]);
    r.evaluate();
    let file = bench.dir.path().join("state/broker-state.json");
    assert!(
        file.exists(),
        "the first tick remembers where the service runs"
    );
    std::fs::remove_file(&file).unwrap();
    r.advance(Duration::from_secs(60));
    r.evaluate();
    assert!(!file.exists(), "written again although nothing changed");
}

/// Regression: `confirmations` counted evaluations, so with prices polled hourly and
/// policies evaluated every minute a price that held for one poll was confirmed.
#[test]
fn confirmations_count_polls_with_new_prices_not_evaluations() {
    let bench = Bench::new();
    let path = bench.write_config(Some("http://127.0.0.1:9"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("confirmations = 1", "confirmations = 3");
    std::fs::write(&path, text).unwrap();
    let loaded = Loaded::from_file(&path).unwrap();
    let mut r = Replay::new(loaded, "2026-06-01T00:00:00Z".parse().unwrap()).unwrap();
    let minute = Duration::from_secs(60);
    let a = || vec![offer("a", 0.10)];
    let b = || vec![offer("b", 0.05)];
    let confirmations = |r: &Replay| {
        r.decisions()
            .iter()
            .filter(|d| d.suppressed_by.as_deref() == Some("confirmations"))
            .map(|d| {
                let rail = d.rails.iter().find(|v| v.rail == "confirmations").unwrap();
                rail.detail.clone()
            })
            .collect::<Vec<_>>()
    };
    r.poll_prices("a", a());
    r.poll_prices("b", b());
    for _ in 0..60 {
        r.advance(minute);
        r.evaluate();
    }
    // An hour of evaluations of one poll's prices is one confirmation, logged once.
    assert!(r.relocations().is_empty());
    assert_eq!(
        r.suppressions(),
        BTreeMap::from([("confirmations".into(), 60)])
    );
    assert_eq!(
        confirmations(&r),
        ["1 of 3 consecutive polls with new prices asked for `b`; the next confirmation waits for new prices (polled after 2026-06-01T00:00:00Z)"]
    );
    // A poll that reused its cached download is no news.
    r.poll_cached_prices("a", a());
    r.poll_cached_prices("b", b());
    r.advance(minute);
    r.evaluate();
    assert_eq!(confirmations(&r).len(), 1);
    assert_eq!(r.supervisor.state.services["shop"].streak, 1);
    // A fresh poll of the target is, and so is one of where the service runs.
    r.poll_prices("b", b());
    r.advance(minute);
    r.evaluate();
    assert_eq!(r.supervisor.state.services["shop"].streak, 2);
    assert!(r.relocations().is_empty());
    r.advance(minute);
    r.evaluate();
    r.poll_prices("a", a());
    r.advance(minute);
    r.evaluate();
    assert_eq!(r.relocations().len(), 1, "{:?}", confirmations(&r));
    let logged: Vec<Outcome> = r.decisions().iter().map(|d| d.outcome).collect();
    assert_eq!(
        logged,
        [Outcome::Suppressed, Outcome::Suppressed, Outcome::Submitted]
    );
    let submitted = r.decisions().pop().unwrap();
    let rail = submitted
        .rails
        .iter()
        .find(|v| v.rail == "confirmations")
        .unwrap();
    assert_eq!(
        rail.detail,
        "3 of 3 consecutive polls with new prices asked for `b`"
    );
}

#[test]
fn a_stay_between_two_polls_starts_the_confirmations_again() {
    let bench = Bench::new();
    let path = bench.write_config(Some("http://127.0.0.1:9"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("confirmations = 1", "confirmations = 2");
    std::fs::write(&path, text).unwrap();
    let loaded = Loaded::from_file(&path).unwrap();
    let mut r = Replay::new(loaded, "2026-06-01T00:00:00Z".parse().unwrap()).unwrap();
    let hour = Duration::from_secs(3600);
    for (poll, b) in [0.05, 0.10, 0.05, 0.10].into_iter().enumerate() {
        r.poll_prices("a", vec![offer("a", 0.10)]);
        r.poll_prices("b", vec![offer("b", b)]);
        r.advance(hour);
        r.evaluate();
        assert_eq!(
            r.supervisor.state.services["shop"].streak,
            u32::from(poll % 2 == 0),
            "poll {poll}"
        );
    }
    assert!(r.relocations().is_empty());
}
