//! The fault suite: the daemon talks to its object stores and its pricing feeds through
//! fault-injecting proxies (`common::faultproxy`: resets, stalls, `503`/`500`/`429` answers,
//! truncated bodies) and must keep its promises anyway.
//!
//! Relocations: service `archive` (one bucket of assorted objects, one larger than the part
//! size) moves between a real S3 server and a real Swift, back and forth, asked of the
//! running daemon through its API, with every request to either store going through a proxy
//! at `FLUIDCLOUD_FAULT_RATE` (default 0.2). Each run ends relocated (the target holds the
//! same BLAKE3 manifest, the source bucket is gone) or rolled back (the source holds the
//! same manifest, nothing is left at the target), never in between; the daemon keeps running
//! throughout. `FLUIDCLOUD_FAULT_RUNS` (default 4) and `FLUIDCLOUD_FAULT_SEED` size and replay
//! the suite; `scripts/faults.sh` runs the full one.
//!
//! Between hosts: the viaduct receiver of the target's agent behind a TCP proxy that resets
//! and stalls connections in the middle of the volume's copy (see
//! `relocations_between_hosts_through_a_faulty_viaduct_end_relocated_or_rolled_back`).
//!
//! Feeds: with the feeds behind a proxy, no decision is made on prices older than the feed's
//! `max_age_secs`; when the feed stalls and fails for longer than that, the stale-data guard
//! suppresses the decisions instead.

use crate::common;
use crate::crash_agents::Across;
use crate::crash_suite::{self, bucket_digest, follow};
use crate::relocation::{deploy, relocate_by_hand};

use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::{ConfigBuilder, Section};
use common::faultproxy::{Counts, FaultProxy, Lost, Rates};
use common::servers::{S3sFs, SwiftServer, TestEnv};
use common::{Body, Daemon, FeedServer};
use fluidcloud::config::Config;
use fluidcloud::providers::copier::{bucket_manifest, BucketManifest};
use fluidcloud::providers::{self, ObjectStream, Provider};
use serde_json::{json, Value};

/// Larger than the 5 MiB part size configured below, so it travels in parts.
const BIG: usize = 6 * (1 << 20) + 1234;

/// The stores' client timeout, and how long a stalled connection holds: longer.
const STORE_TIMEOUT_SECS: u64 = 3;
const STALL: Duration = Duration::from_secs(5);

/// How long one relocation may take before the run counts as inconsistent.
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}=`{v}` is not a number")),
        Err(_) => default,
    }
}

fn fault_rate() -> f64 {
    match std::env::var("FLUIDCLOUD_FAULT_RATE") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("FLUIDCLOUD_FAULT_RATE=`{v}` is not a number")),
        Err(_) => 0.2,
    }
}

fn seed() -> u64 {
    std::env::var("FLUIDCLOUD_FAULT_SEED")
        .map(|v| v.parse::<u64>().expect("FLUIDCLOUD_FAULT_SEED is a number"))
        .unwrap_or_else(|_| fastrand::u64(..1 << 48))
}

fn secret_file(dir: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

fn body(bytes: Vec<u8>) -> ObjectStream {
    Box::pin(std::io::Cursor::new(bytes))
}

/// Real S3 and Swift, each behind a fault proxy.
struct Stores {
    dir: tempfile::TempDir,
    s3: S3sFs,
    swift: SwiftServer,
    s3_proxy: FaultProxy,
    swift_proxy: FaultProxy,
}

impl Stores {
    fn start(rates: Rates, seed: u64) -> Stores {
        let env = TestEnv::load();
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3sFs::start(&env, dir.path());
        let swift = SwiftServer::start(&env, dir.path());
        let s3_proxy = FaultProxy::http(&s3.endpoint, rates, seed, STALL);
        let swift_proxy = FaultProxy::http(&swift.auth_url, rates, seed ^ 0x5eed, STALL);
        secret_file(
            dir.path(),
            "s3.credentials",
            &format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                s3.access_key, s3.secret_key
            ),
        );
        secret_file(
            dir.path(),
            "swift.credentials",
            &format!(
                "username = \"{}\"\npassword = \"{}\"\n",
                swift.user, swift.key
            ),
        );
        Stores {
            dir,
            s3,
            swift,
            s3_proxy,
            swift_proxy,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Providers `s3` and `swift` (through the proxies when `proxied`) and service
    /// `archive` at `s3`.
    fn config(&self, proxied: bool) -> ConfigBuilder {
        let dir = self.dir.path().display().to_string();
        let store = |t: Section, credentials: &str| {
            t.set("credentials_file", format!("{dir}/{credentials}"))
                .set("part_size_mib", 5)
                .set("timeout_secs", STORE_TIMEOUT_SECS as i64)
        };
        let (s3, swift) = if proxied {
            (
                self.s3_proxy.url(&self.s3.endpoint),
                self.swift_proxy.url(&self.swift.auth_url),
            )
        } else {
            (self.s3.endpoint.clone(), self.swift.auth_url.clone())
        };
        ConfigBuilder::for_daemon()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .conduit("stop_timeout_secs", 5)
            .conduit("health_timeout_secs", 20)
            .provider("s3", "s3", "lab", |p| {
                p.table("s3", |t| {
                    store(
                        t.set("endpoint", s3.as_str())
                            .set("region", "eu-test-1")
                            .set("path_style", true),
                        "s3.credentials",
                    )
                })
            })
            .provider("swift", "swift", "lab", |p| {
                p.table("swift", |t| {
                    store(t.set("auth_url", swift.as_str()), "swift.credentials")
                })
            })
            .policy("watch", "cheapest", "audit", |p| p)
            .service("archive", "s3", "watch", |s| s.bucket("media", 0.05))
    }

    /// The stores as the suite sees them: direct, without faults.
    fn direct(&self) -> Config {
        self.parsed(false)
    }

    /// The stores as the daemon sees them (through the proxies when `proxied`).
    fn parsed(&self, proxied: bool) -> Config {
        let path = self.path(if proxied {
            "proxied.toml"
        } else {
            "direct.toml"
        });
        let text = self
            .config(proxied)
            .render()
            .replace("{DIR}", &self.dir.path().display().to_string())
            .replace("{PORT}", "0");
        std::fs::write(&path, &text).unwrap();
        Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn counts(&self) -> Counts {
        let mut c = self.s3_proxy.counts();
        c.add(&self.swift_proxy.counts());
        c
    }
}

fn open(config: &Config, name: &str) -> Arc<dyn Provider> {
    providers::open(&config.providers[name]).unwrap_or_else(|e| panic!("{e}"))
}

async fn fill(p: &dyn Provider, n: usize) {
    p.ensure_bucket("archive", "media").await.unwrap();
    for i in 0..n {
        let key = match i % 3 {
            0 => format!("img/{i:04}.jpg"),
            1 => format!("docs/{i}.txt"),
            _ => format!("top-{i}"),
        };
        p.write_object(
            "archive",
            "media",
            &key,
            body(content(i as u64, (i * 4099) % 200_000)),
        )
        .await
        .unwrap();
    }
    p.write_object("archive", "media", "video/big.mp4", body(content(7, BIG)))
        .await
        .unwrap();
}

async fn manifest(p: &dyn Provider) -> Result<BucketManifest, String> {
    bucket_manifest(p, "archive", "media", 8)
        .await
        .map_err(|e| e.to_string())
}

/// Objects left in the bucket at `p` (none when the bucket is gone).
async fn left(p: &dyn Provider) -> usize {
    p.list_objects("archive", "media")
        .await
        .map(|l| l.len())
        .unwrap_or(0)
}

/// How one relocation ended.
struct Run {
    from: &'static str,
    to: &'static str,
    outcome: String,
    took: Duration,
    error: Option<String>,
    problem: Option<String>,
}

/// Asks the daemon to move `archive` to `to` and follows it to its end.
fn relocate(d: &Daemon, to: &str) -> (String, Duration, Option<String>) {
    let started = Instant::now();
    let (status, answer) = d
        .raw(
            "POST",
            "/v1/services/archive/relocate",
            true,
            Some(json!({ "to": to })),
        )
        .unwrap();
    assert_eq!(status, 202, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    loop {
        let r = d.get(&format!("/v1/relocations/{id}"));
        let state = r["state"].as_str().unwrap_or_default().to_string();
        if matches!(state.as_str(), "completed" | "rolled_back" | "failed") {
            // Why it did not complete: the relocation's detail and its failed steps' errors.
            let error = (state != "completed").then(|| {
                let mut why = r["detail"].as_str().unwrap_or_default().to_string();
                for step in r["steps"].as_array().into_iter().flatten() {
                    if let Some(e) = step["error"].as_str() {
                        why.push_str(&format!("; {}: {e}", step["name"].as_str().unwrap_or("?")));
                    }
                }
                why
            });
            return (state, started.elapsed(), error);
        }
        assert!(
            started.elapsed() < RUN_LIMIT,
            "relocation {id} still {state} after {RUN_LIMIT:?}: {r}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The end state is whole: where the service ended holds the original manifest, and nothing
/// is left at the other side.
async fn check(
    direct: &Config,
    original: &BucketManifest,
    at: &str,
    other: &str,
) -> Result<(), String> {
    let (at_p, other_p) = (open(direct, at), open(direct, other));
    let found = manifest(at_p.as_ref())
        .await
        .map_err(|e| format!("the bucket at `{at}` cannot be read: {e}"))?;
    if &found != original {
        return Err(format!(
            "the bucket at `{at}` holds {} objects, not the {} it should",
            found.entries.len(),
            original.entries.len()
        ));
    }
    let n = left(other_p.as_ref()).await;
    if n > 0 {
        return Err(format!("{n} objects are left in the bucket at `{other}`"));
    }
    Ok(())
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[test]
fn relocations_through_faulty_stores_end_relocated_or_rolled_back() {
    let runs = env_u64("FLUIDCLOUD_FAULT_RUNS", 4);
    let rate = fault_rate();
    let seed = seed();
    let stores = Stores::start(Rates::none(), seed);
    let direct = stores.direct();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let original = rt.block_on(async {
        let s3 = open(&direct, "s3");
        fill(s3.as_ref(), 40).await;
        manifest(s3.as_ref()).await.unwrap()
    });
    let mut d = Daemon::start(stores.dir.path(), &stores.config(true).render());
    let http = rate > 0.0;
    stores.s3_proxy.set_rates(Rates::spread(rate, http));
    stores.swift_proxy.set_rates(Rates::spread(rate, http));
    println!(
        "fault suite: {runs} relocations of a bucket of {} objects ({:.1} MiB) between S3 and \
         Swift, {:.0} % faults on every connection and request to either, seed {seed}",
        original.entries.len(),
        original.entries.values().map(|e| e.size).sum::<u64>() as f64 / (1 << 20) as f64,
        rate * 100.0
    );

    let mut at = "s3";
    let mut done: Vec<Run> = Vec::new();
    for i in 0..runs {
        let to = if at == "s3" { "swift" } else { "s3" };
        let before = stores.counts();
        let (outcome, took, error) = relocate(&d, to);
        let injected = stores.counts().faults() - before.faults();
        let ended_at = if outcome == "completed" { to } else { at };
        let other = if ended_at == "s3" { "swift" } else { "s3" };
        let mut problem = rt
            .block_on(check(&direct, &original, ended_at, other))
            .err();
        if outcome == "failed" && problem.is_none() {
            problem = Some(format!("failed, not rolled back: {error:?}"));
        }
        if let Some(status) = d.child.try_wait().unwrap() {
            problem = Some(format!("the daemon exited with {status}"));
        }
        println!(
            "run {:>3} {at:>5} -> {to:<5} {injected:>4} faults injected -> {outcome:<11} in {:>7}{}{}",
            i + 1,
            seconds(took),
            error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            if problem.is_some() {
                "  INCONSISTENT"
            } else {
                ""
            }
        );
        let stop = problem.is_some() && d.child.try_wait().unwrap().is_some();
        done.push(Run {
            from: at,
            to,
            outcome,
            took,
            error,
            problem,
        });
        if stop {
            break;
        }
        at = ended_at;
    }
    let counts = stores.counts();
    let count = |f: &dyn Fn(&Run) -> bool| done.iter().filter(|r| f(r)).count();
    let inconsistent = count(&|r| r.problem.is_some());
    println!();
    println!("proxies: {counts}");
    println!();
    println!(
        "| runs | relocated | rolled back | inconsistent | worst recovery time | faults injected |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {} | {} | {inconsistent} | {} | {} |",
        done.len(),
        count(&|r| r.problem.is_none() && r.outcome == "completed"),
        count(&|r| r.problem.is_none() && r.outcome == "rolled_back"),
        seconds(done.iter().map(|r| r.took).max().unwrap_or_default()),
        counts.faults(),
    );
    let problems: Vec<String> = done
        .iter()
        .filter_map(|r| {
            r.problem.as_ref().map(|p| {
                format!(
                    "{} -> {} ended {}: {p} ({:?})",
                    r.from, r.to, r.outcome, r.error
                )
            })
        })
        .collect();
    assert!(
        problems.is_empty(),
        "seed {seed}:\n{}\n{}",
        problems.join("\n"),
        d.logs()
    );
    if rate > 0.0 {
        assert!(counts.faults() > 0, "no fault was injected: {counts}");
    }
    // The daemon still answers.
    d.wait_for("/healthz", Duration::from_secs(5));
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success(), "{}", d.logs());
}

/// How one relocation between hosts through a faulty viaduct ended.
struct HostRun {
    seed: u64,
    outcome: Option<String>,
    took: Duration,
    injected: Counts,
    problem: Option<String>,
}

/// Relocations between hosts with the viaduct behind the proxy: the crash suite's service
/// (the demo app, its volume, bucket and configuration) moves from `a`, served by an agent on
/// one host, to `b`, served by one on another, and the target's agent tells senders to reach
/// its viaduct receiver through a TCP fault proxy (`viaduct_advertise`), which resets or
/// stalls connections at `FLUIDCLOUD_FAULT_RATE` anywhere in the volume's bytes. Each run
/// (a fresh deployment, `FLUIDCLOUD_FAULT_HOST_RUNS`, default 2; `FLUIDCLOUD_FAULT_MIB`,
/// default 64) must end relocated or rolled back, whole, as the crash suite checks it, never
/// failed. Needs root for the hosts' namespaces, as every test across hosts.
#[test]
fn relocations_between_hosts_through_a_faulty_viaduct_end_relocated_or_rolled_back() {
    let runs = env_u64("FLUIDCLOUD_FAULT_HOST_RUNS", 2);
    let volume_mib = env_u64("FLUIDCLOUD_FAULT_MIB", 64);
    let rate = fault_rate();
    let first_seed = seed();
    println!(
        "fault suite between hosts: {runs} relocations of a {volume_mib} MiB volume, its \
         bucket and configuration from one agent's host to another's, {:.0} % of the \
         viaduct's connections reset or stalled, first seed {first_seed}",
        rate * 100.0
    );
    let mut done: Vec<HostRun> = Vec::new();
    for i in 0..runs {
        let seed = first_seed.wrapping_add(i);
        let mut proxies = Vec::new();
        let made = Across::with_viaducts(volume_mib, |hosts, host| {
            // Only the target's receiver is sent to: the rollback sends nothing back.
            if host.addr != hosts.b().addr {
                return None;
            }
            let proxy = FaultProxy::tcp_on(
                hosts.gateway.into(),
                SocketAddr::new(host.addr.into(), 7482),
                Rates::spread(rate, false),
                seed,
                STALL,
            );
            // Each of the sender's four streams carries about an eighth of the volume on the
            // wire (half of the demo's data is text, which compresses): the faults land in
            // the handshakes, the control exchanges and anywhere in the copy.
            proxy.set_strike_spread((volume_mib << 20) / 8);
            let at = proxy.addr.to_string();
            proxies.push(proxy);
            Some(at)
        });
        let Some(x) = made else {
            return;
        };
        let s = &x.s;
        let (hash, listing) = deploy(s);
        let digest = bucket_digest(&s.path("providers/a/buckets/shop/assets"));
        let d = s.daemon();
        let started = Instant::now();
        relocate_by_hand(&d, "b");
        let context = format!("seed {seed}");
        let mut ended = (None, RUN_LIMIT);
        let checked = catch_unwind(AssertUnwindSafe(|| {
            let (mut d, outcome, took, _) = follow(s, d, started);
            ended = (outcome.clone(), took);
            crash_suite::check(s, &hash, &listing, &digest, outcome.as_deref(), &context);
            assert_ne!(
                outcome.as_deref(),
                Some("failed"),
                "failed, not rolled back"
            );
            d.signal(libc::SIGTERM);
            assert!(d.child.wait().unwrap().success(), "{}", d.logs());
        }));
        let mut injected = Counts::default();
        for p in &proxies {
            injected.add(&p.counts());
        }
        let r = HostRun {
            seed,
            outcome: ended.0,
            took: ended.1,
            injected,
            problem: checked.err().map(|e| x.explain(e.as_ref())),
        };
        println!(
            "run {:>3} seed {} {:>3} connections, {} resets, {} stalls -> {:<11} in {:>7}{}",
            i + 1,
            r.seed,
            r.injected.connections,
            r.injected.resets,
            r.injected.stalls,
            r.outcome.as_deref().unwrap_or("not started"),
            seconds(r.took),
            if r.problem.is_some() {
                "  INCONSISTENT"
            } else {
                ""
            }
        );
        done.push(r);
    }
    let mut total = Counts::default();
    for r in &done {
        total.add(&r.injected);
    }
    let count = |f: &dyn Fn(&HostRun) -> bool| done.iter().filter(|r| f(r)).count();
    println!();
    println!("viaduct proxies: {total}");
    println!();
    println!(
        "| runs between hosts | relocated | rolled back | inconsistent | worst recovery time | faults injected |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {} | {} | {} | {} | {} |",
        done.len(),
        count(&|r| r.problem.is_none() && r.outcome.as_deref() == Some("completed")),
        count(&|r| r.problem.is_none() && r.outcome.as_deref() == Some("rolled_back")),
        count(&|r| r.problem.is_some()),
        seconds(done.iter().map(|r| r.took).max().unwrap_or_default()),
        total.faults(),
    );
    let problems: Vec<String> = done
        .iter()
        .filter_map(|r| {
            r.problem.as_ref().map(|p| {
                format!(
                    "seed {} (replay: FLUIDCLOUD_FAULT_SEED={} FLUIDCLOUD_FAULT_HOST_RUNS=1 \
                     FLUIDCLOUD_FAULT_MIB={volume_mib}): {p}",
                    r.seed, r.seed
                )
            })
        })
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    // The senders went through the proxy: the agent told them its address.
    assert!(
        runs == 0 || total.connections > 0,
        "no viaduct connection came through the proxy: {total}"
    );
    if rate > 0.0 && runs > 0 {
        assert!(total.faults() > 0, "no fault was injected: {total}");
    }
}

/// Regression: S3 servers (s3s-fs among them) answer `BucketAlreadyExists` to the bucket's
/// owner as well, so a create whose answer was lost on the way, and which the driver sent
/// again, failed with "the name is taken by another account".
#[test]
fn a_bucket_create_whose_answer_was_lost_succeeds_when_the_bucket_is_ours() {
    let stores = Stores::start(Rates::none(), seed());
    let (direct, proxied) = (stores.direct(), stores.parsed(true));
    // The first PUT is the bucket's create: s3s-fs makes the bucket, the answer is lost.
    stores.s3_proxy.fail_next("PUT", "/", Lost::Answer, 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s3 = open(&proxied, "s3");
        s3.ensure_bucket("archive", "media")
            .await
            .unwrap_or_else(|e| panic!("the create sent again must succeed: {e}"));
        assert_eq!(
            stores.s3_proxy.scripted_left(),
            0,
            "the answer was not lost"
        );
        s3.write_object("archive", "media", "k", body(content(1, 1000)))
            .await
            .unwrap();
        let listed = open(&direct, "s3")
            .list_objects("archive", "media")
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
    });
}

/// Regression: the decommission deleted the source bucket's objects once each, behind only
/// the store client's own retries; a delete failing more often than those left the
/// relocation in its grace period until the daemon's next start.
#[test]
fn a_decommission_delete_failing_more_often_than_the_store_client_retries_is_retried() {
    let stores = Stores::start(Rates::none(), seed());
    let direct = stores.direct();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let original = rt.block_on(async {
        let s3 = open(&direct, "s3");
        fill(s3.as_ref(), 6).await;
        manifest(s3.as_ref()).await.unwrap()
    });
    let mut d = Daemon::start(stores.dir.path(), &stores.config(true).render());
    // One delete by the driver is up to 16 requests (four tries of the store client's four);
    // the copy to Swift deletes nothing at S3, so these are the decommission's.
    stores.s3_proxy.fail_next("DELETE", "/", Lost::Request, 17);
    let (outcome, took, error) = relocate(&d, "swift");
    assert_eq!(
        (outcome.as_str(), error),
        ("completed", None),
        "{}",
        d.logs()
    );
    assert_eq!(
        stores.s3_proxy.scripted_left(),
        0,
        "the deletes did not fail"
    );
    rt.block_on(check(&direct, &original, "swift", "s3"))
        .unwrap_or_else(|e| panic!("{e}"));
    println!("relocated in {} with 17 deletes failed", seconds(took));
    d.signal(libc::SIGTERM);
    assert!(d.child.wait().unwrap().success(), "{}", d.logs());
}

/// Feed rows for the normalised CSV catalogue: `provider`'s one flavor at `price` an hour.
fn catalogue(rows: &[(&str, &str, f64)]) -> Body {
    let mut text =
        String::from("provider,region,flavor,vcpus,memory_gib,price_per_hour,currency\n");
    for (provider, region, price) in rows {
        text.push_str(&format!("{provider},{region},m.large,2,8,{price},USD\n"));
    }
    Body::Answer {
        status: 200,
        headers: vec![("content-type", "text/csv".into())],
        body: text,
    }
}

const MAX_AGE_SECS: u64 = 3;

#[test]
fn no_decision_is_made_on_feed_data_older_than_its_max_age() {
    let seed = seed();
    let rate = fault_rate();
    let feeds = FeedServer::start(vec![
        ("/a.csv", catalogue(&[("a", "us-east-1", 0.20)])),
        ("/b.csv", catalogue(&[("b", "us-east-1", 0.05)])),
    ]);
    let proxy = FaultProxy::http(&feeds.base, Rates::spread(rate, true), seed, STALL);
    let priced = |p: common::config::Provider, path: &str| {
        p.pricing("csv", &proxy.url(&format!("{}{path}", feeds.base)), |t| {
            t.set("schedule", "* * * * * *")
                .set("ttl_secs", 0)
                .set("timeout_secs", 2)
                .set("max_age_secs", MAX_AGE_SECS as i64)
        })
    };
    // `b` is four times cheaper: the policy asks to move at every evaluation, and the
    // confirmations it needs never come, so what each decision rests on stays visible.
    let cfg = ConfigBuilder::for_daemon()
        .broker_every_second()
        .provider("a", "local", "us-east-1", |p| priced(p, "/a.csv"))
        .provider("b", "local", "us-east-1", |p| priced(p, "/b.csv"))
        .policy("cheapest", "cheapest", "enforce", |p| {
            p.confirmations(100_000)
                .min_residency_secs(0)
                .move_duration_secs(60)
        })
        .service("shop", "a", "cheapest", |s| s.size(2, 8.0));
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &cfg.render());
    let started = Instant::now();
    // A while with the faults of the suite: decisions rest on fresh data, or are held back.
    std::thread::sleep(Duration::from_secs(12));
    let faulty = proxy.counts();
    // Then the feeds fail on every request (stalls, resets, 5xx, 429, cut bodies) for much
    // longer than their data may be used.
    // Every connection resets or stalls, every request that gets through is failed.
    proxy.set_rates(Rates {
        reset: 0.5,
        stall: 0.5,
        error: 0.5,
        truncate: 0.5,
    });
    let broken_at = Instant::now();
    std::thread::sleep(Duration::from_secs(4 * MAX_AGE_SECS + 4));
    let decisions = d
        .get("/v1/decisions?service=shop&limit=10000")
        .as_array()
        .unwrap()
        .clone();
    let counts = proxy.counts();
    println!(
        "feed proxy after {:.0} s: {counts}",
        started.elapsed().as_secs_f64()
    );
    println!("of which under {:.0} % faults: {faulty}", rate * 100.0);

    // Each decision the stale-data guard let through rests on prices fetched at most
    // `max_age_secs` before (with a second for the poll itself).
    let now_wall = chrono::Utc::now();
    let now = Instant::now();
    let clean: Vec<Vec<Instant>> = ["/a.csv", "/b.csv"]
        .iter()
        .map(|p| proxy.clean_answers(p))
        .collect();
    let mut fresh_passed = 0;
    let mut stale_held = 0;
    for decision in &decisions {
        let time: chrono::DateTime<chrono::Utc> =
            decision["time"].as_str().unwrap().parse().unwrap();
        let ago = (now_wall - time).to_std().unwrap_or_default();
        let Some(at) = now.checked_sub(ago) else {
            continue;
        };
        let stale_rail = decision["rails"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["rail"] == "stale_data"));
        let Some(rail) = stale_rail else {
            continue;
        };
        let data_age = clean
            .iter()
            .map(|times| {
                times
                    .iter()
                    .filter(|t| **t <= at)
                    .map(|t| at - *t)
                    .min()
                    .unwrap_or(Duration::MAX)
            })
            .max()
            .unwrap();
        if rail["passed"] == true {
            fresh_passed += 1;
            assert!(
                data_age <= Duration::from_secs(MAX_AGE_SECS + 1),
                "a decision rests on data {data_age:?} old (max age {MAX_AGE_SECS} s): \
                 {decision}"
            );
        } else if at > broken_at {
            stale_held += 1;
        }
        assert_ne!(decision["outcome"], "submitted", "{decision}");
    }
    // The guard held decisions back once the feeds had failed for long enough, and still
    // does (the log notes a decision when it differs from the one before; oldest first).
    assert!(stale_held > 0, "{decisions:#?}");
    let last = decisions.last().expect("a decision");
    assert_eq!(last["suppressed_by"], "stale_data", "{last}");
    assert!(counts.faults() > faulty.faults(), "{counts}");
    println!(
        "{} decisions: {fresh_passed} on fresh data, {stale_held} held back by the stale-data \
         guard after the feeds broke",
        decisions.len()
    );
    assert!(d.child.try_wait().unwrap().is_none(), "{}", d.logs());
    d.signal(libc::SIGTERM);
    let _ = d.child.wait();
}
