//! The dashboards and alert rules against a real Prometheus (Debian's, unpacked by
//! `scripts/test-env.sh`): Prometheus scrapes a daemon running the quickstart, which relocates
//! `shop` on its own, and every query of every dashboard in `dashboards/` must return data.
//! `promtool` lints the daemon's exposition and checks and unit-tests `dashboards/alerts.yml`.
//! The dashboards' layout conventions are checked on the JSON alone.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{demo_app, free_port, repo, servers::env_vars, Daemon};
use regex::Regex;
use serde_json::{json, Value};

/// `prometheus` and `promtool` as `scripts/test-env.sh` wrote them down.
fn binaries() -> (PathBuf, PathBuf) {
    let vars = env_vars();
    let get = |name: &str| {
        let path = PathBuf::from(vars.get(name).unwrap_or_else(|| {
            panic!(
                "{name} is not set and {} does not name it; run scripts/test-env.sh first",
                common::servers::env_file().display()
            )
        }));
        assert!(
            path.exists(),
            "{name}={} does not exist; run scripts/test-env.sh again",
            path.display()
        );
        path
    };
    (get("FLUIDCLOUD_PROMETHEUS"), get("FLUIDCLOUD_PROMTOOL"))
}

/// Runs `promtool ARGS` (with `stdin`, if any) and returns its output; fails with it unless
/// it exits 0.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let (_, promtool) = binaries();
    let mut child = Command::new(&promtool)
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_load_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "dashboards/alerts.yml"], None);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "dashboards/alerts_test.yml"], None);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let dash: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.file_name().unwrap().to_string_lossy().into(), dash));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no dashboards/*.json");
    out
}

fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

fn uses_our_datasource(ds: &Value) -> bool {
    ds["uid"] == "${datasource}"
}

/// What Prometheus cannot tell: the conventions the dashboards follow so that they import
/// anywhere and read well. Every panel takes its data source from the `datasource` variable,
/// has a description and a unit, and fits the 24-column grid without overlapping another.
#[test]
fn the_dashboards_follow_the_layout_conventions() {
    let mut problems = Vec::new();
    for (file, dash) in dashboards() {
        let mut problem = |p: String| problems.push(format!("{file}: {p}"));
        if file == "fluidcloud.json" {
            for (key, want) in [
                ("uid", json!("fluidcloud-broker")),
                ("title", json!("FluidCloud Broker")),
                ("schemaVersion", json!(39)),
            ] {
                if dash[key] != want {
                    problem(format!("{key} is {}, expected {want}", dash[key]));
                }
            }
        }
        let variables: BTreeMap<&str, &Value> = dash["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?, v)))
            .collect();
        match variables.get("datasource") {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            _ => problem("no `datasource` variable of type datasource for prometheus".into()),
        }
        // The cost and market panels filter by these.
        if file == "fluidcloud.json" {
            for name in ["service", "source"] {
                if !variables.contains_key(name) {
                    problem(format!("template variable `{name}` is missing"));
                }
            }
        }
        for (name, v) in &variables {
            if v["type"] == "query" && !uses_our_datasource(&v["datasource"]) {
                problem(format!(
                    "variable {name}: datasource must be ${{datasource}}"
                ));
            }
        }
        let mut ids = BTreeMap::new();
        let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
        for p in panels(&dash) {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if let Some(other) = ids.insert(p["id"].to_string(), title.clone()) {
                problem(format!(
                    "panel {title:?}: id {} is also {other:?}'s",
                    p["id"]
                ));
            }
            let g = &p["gridPos"];
            let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap_or(0));
            if w <= 0 || h <= 0 || x < 0 || x + w > 24 {
                problem(format!(
                    "panel {title:?}: gridPos {g} leaves the 24-column grid"
                ));
            }
            'overlap: for cx in x..x + w {
                for cy in y..y + h {
                    if let Some(other) = cells.insert((cx, cy), title.clone()) {
                        problem(format!("panel {title:?} overlaps {other:?}"));
                        break 'overlap;
                    }
                }
            }
            if p["type"] == "row" {
                continue;
            }
            if !uses_our_datasource(&p["datasource"]) {
                problem(format!(
                    "panel {title:?}: datasource must be ${{datasource}}"
                ));
            }
            if p["description"].as_str().unwrap_or("").trim().is_empty() {
                problem(format!("panel {title:?}: no description"));
            }
            if p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or("")
                .is_empty()
            {
                problem(format!("panel {title:?}: no unit"));
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problem(format!("panel {title:?}: no query"));
            }
            for t in &targets {
                if !uses_our_datasource(&t["datasource"]) {
                    problem(format!(
                        "panel {title:?} query {}: datasource must be ${{datasource}}",
                        t["refId"]
                    ));
                }
            }
        }
        for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
            if a["builtIn"].as_i64() != Some(1) && !uses_our_datasource(&a["datasource"]) {
                problem(format!(
                    "annotation {}: datasource must be ${{datasource}}",
                    a["name"]
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A Prometheus on loopback, scraping `target` every second; stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    log: PathBuf,
    started: SystemTime,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let (prometheus, _) = binaries();
        let port = free_port();
        // The job name the dashboard's `up{job="fluidcloud"}` expects (dashboards/README.md).
        let config = json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "fluidcloud",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }],
        });
        let config_path = dir.join("prometheus.yml");
        // JSON is YAML.
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(&prometheus)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", prometheus.display()));
        let mut p = Prometheus {
            child,
            port,
            log,
            started: SystemTime::now(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {status}:\n{}", p.logs());
            }
            if p.get("/-/ready", &[]).is_some_and(|(s, _)| s == 200) {
                return p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus not ready within a minute:\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str, query: &[(&str, String)]) -> Option<(u16, String)> {
        let req = self
            .http
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .query(query)
            .timeout(Duration::from_secs(30));
        self.rt.block_on(async {
            let r = req.send().await.ok()?;
            let status = r.status().as_u16();
            Some((status, r.text().await.ok()?))
        })
    }

    /// The `data` of a successful API call; fails with Prometheus's error otherwise.
    fn api(&self, path: &str, query: &[(&str, String)]) -> Value {
        let (status, body) = self
            .get(path, query)
            .unwrap_or_else(|| panic!("prometheus did not answer {path}"));
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} {query:?}: {e}: {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "{path} {query:?}: HTTP {status}: {body}"
        );
        v["data"].clone()
    }

    /// The series an instant query returns now.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr.to_string())]);
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => data["result"].as_array().unwrap().clone(),
            // A scalar or a string is one value.
            _ => vec![data["result"].clone()],
        }
    }

    /// The series a range query over the whole scrape so far returns, as Grafana asks for
    /// annotations.
    fn query_range(&self, expr: &str) -> Vec<Value> {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let data = self.api(
            "/api/v1/query_range",
            &[
                ("query", expr.to_string()),
                ("start", secs(self.started).to_string()),
                // Rounded up: the last scrape may lie within the current second.
                ("end", (secs(SystemTime::now()) + 1).to_string()),
                ("step", "1".into()),
            ],
        );
        data["result"].as_array().unwrap().clone()
    }

    /// Waits until `expr` returns a series whose value satisfies `ok`.
    fn wait_until(&self, expr: &str, limit: Duration, ok: impl Fn(f64) -> bool) {
        let start = Instant::now();
        loop {
            let values: Vec<f64> = self
                .query(expr)
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                .collect();
            if values.iter().any(|v| ok(*v)) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{expr} did not come within {limit:?} (now {values:?}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The quickstart of examples/quickstart in `dir`, as tests/it/quickstart.rs runs it: this
/// test's ports and paths, a three-second grace period, an evaluation every 3 s (the feeds
/// are polled every 5 s: the policy's two confirmations, each on new prices, come within
/// seconds), and a minimum residency of 15 s for `shop` so that Prometheus scrapes the daemon
/// before it moves.
fn quickstart_config(dir: &Path, app_port: u16) -> String {
    let qs = repo().join("examples/quickstart");
    std::fs::create_dir_all(dir.join("feeds")).unwrap();
    for (from, to) in [
        (qs.clone(), dir.to_path_buf()),
        (qs.join("feeds"), dir.join("feeds")),
    ] {
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    let config = std::fs::read_to_string(dir.join("fluidcloud.toml"))
        .unwrap()
        .replace("127.0.0.1:7480", "127.0.0.1:{PORT}")
        .replace("8480", &app_port.to_string())
        .replace(
            "../../policies/",
            &format!("{}/policies/", repo().display()),
        )
        .replace(
            "\"../../target/release/examples/demo-app\"",
            &format!("\"{}\"", demo_app().display()),
        )
        .replace("grace_period_secs = 60", "grace_period_secs = 3")
        // The `cheapest` policy's, the first in the file.
        .replacen("min_residency_secs = 0", "min_residency_secs = 15", 1)
        .replace("\"*/15 * * * * *\"", "\"*/3 * * * * *\"");
    assert!(config.contains("grace_period_secs = 3"), "{config}");
    assert_eq!(
        config.matches("schedule = \"*/5 * * * * *\"").count(),
        2,
        "both feeds polled every 5 s: {config}"
    );
    assert!(config.contains("\"*/3 * * * * *\""), "{config}");
    assert!(config.contains("min_residency_secs = 15"), "{config}");
    config
}

/// One PromQL expression of a dashboard, where it is, and how Grafana shows it.
struct Query {
    place: String,
    expr: String,
    legend: Option<String>,
    annotation: bool,
}

fn queries(file: &str, dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    place: format!("{file}: panel {} query {}", p["title"], t["refId"]),
                    expr: expr.to_string(),
                    legend: t["legendFormat"].as_str().map(String::from),
                    annotation: false,
                });
            }
        }
    }
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Query {
                place: format!("{file}: annotation {}", a["name"]),
                expr: expr.to_string(),
                legend: a["textFormat"].as_str().map(String::from),
                annotation: true,
            });
        }
    }
    out
}

/// What Grafana puts in place of its variables for one choice of the dashboard's own ones:
/// the built-in intervals, and `$name`/`${name}` for each variable.
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    // Longest names first, so that `$service` does not eat `$services`.
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &values[name])
            .replace(&format!("${name}"), &values[name]);
    }
    out
}

/// Every vector selector of the daemon's series (and `up`) in `expr`: the selector, the
/// metric name, and the range written after it, if any.
fn selectors(expr: &str) -> Vec<(String, String, Option<String>, usize)> {
    let re = Regex::new(r"\b(fluidcloud_[a-z0-9_]+|up)\b\s*(\{[^}]*\})?\s*(\[[^\]]*\])?").unwrap();
    re.captures_iter(expr)
        .map(|c| {
            let name = c[1].to_string();
            let selector = format!("{name}{}", c.get(2).map_or("", |m| m.as_str()));
            let range = c.get(3).map(|m| m.as_str().to_string());
            (selector, name, range, c.get(0).unwrap().start())
        })
        .collect()
}

/// Checks what the types of the series say about an expression: counters and histogram
/// buckets only under a range function, `rate` over `$__rate_interval`, buckets only in a
/// `histogram_quantile` grouped by `le`, gauges never under `rate`/`increase`.
fn type_problems(q: &Query, types: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let grouped_by_le = Regex::new(r"by\s*\(([^)]*)\)")
        .unwrap()
        .captures_iter(&q.expr)
        .any(|c| c[1].split(',').any(|l| l.trim() == "le"));
    for (selector, name, range, at) in selectors(&q.expr) {
        let (base, part) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram"))
                    .then(|| (base.to_string(), *suffix))
            })
            .unwrap_or((name.clone(), ""));
        let kind = match name.as_str() {
            "up" => "gauge",
            _ => types.get(&base).map(String::as_str).unwrap_or("unknown"),
        };
        let before = q.expr[..at].trim_end();
        let under_rate = ["rate(", "irate(", "increase("]
            .iter()
            .any(|f| before.ends_with(f));
        match kind {
            "counter" | "histogram" => {
                if range.is_none() || !under_rate {
                    problems.push(format!(
                        "{selector}: a {kind}, use it under rate() or increase()"
                    ));
                }
                if before.ends_with("rate(") && range.as_deref() != Some("[$__rate_interval]") {
                    problems.push(format!(
                        "{selector}: rate() over [$__rate_interval], not {range:?}"
                    ));
                }
                if part == "_bucket" {
                    if !q.expr.trim_start().starts_with("histogram_quantile(") || !grouped_by_le {
                        problems.push(format!(
                            "{selector}: buckets belong in histogram_quantile(…, sum by (…, le) (…))"
                        ));
                    }
                } else if kind == "histogram" && part.is_empty() {
                    problems.push(format!(
                        "{selector}: a histogram: use _bucket, _sum or _count"
                    ));
                }
            }
            "gauge" => {
                if under_rate {
                    problems.push(format!("{selector}: a gauge under rate()/increase()"));
                }
            }
            other => problems.push(format!(
                "{selector}: Prometheus knows no metric {name} (type {other})"
            )),
        }
    }
    problems
        .into_iter()
        .map(|p| format!("{}: {p}", q.place))
        .collect()
}

/// A single value of a variable as Grafana writes it into a PromQL regex matcher: the regex
/// metacharacters escaped, the backslash doubled for the PromQL string.
fn grafana_regex_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "\\^$*+?.()|[]{}".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

fn legend_labels(legend: &str) -> Vec<String> {
    Regex::new(r"\{\{\s*(\w+)\s*\}\}")
        .unwrap()
        .captures_iter(legend)
        .map(|c| c[1].to_string())
        .collect()
}

/// The quickstart scraped by Prometheus every second: once `shop` has moved on its own and
/// the configuration has been reloaded, every query of every dashboard returns data, for
/// "All" and for one real value of each variable, and so does each selector in it on its
/// own; legends name labels the results carry; the series' types (from the daemon's
/// `# TYPE` lines, through Prometheus's metadata) fit the functions around them. The
/// failure counters (poll errors, rejected rows, refusals, cancels, policy errors) are
/// created at zero, so their queries return a zero series rather than nothing.
#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let _apps = common::Apps(dir.path());
    let app_port = free_port();
    let config = quickstart_config(dir.path(), app_port);
    let mut d = Daemon::start(dir.path(), &config);
    let target = d.base.trim_start_matches("http://").to_string();
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let p = Prometheus::start(&prom_dir, &target);

    // promtool's lint of the exposition, with every series the run below creates.
    // Prometheus scrapes before the policy may move `shop` (its minimum residency), so the
    // relocation and the reload are increases it sees.
    p.wait_until("up{job=\"fluidcloud\"}", Duration::from_secs(15), |v| {
        v == 1.0
    });
    let requested = p.query("sum(fluidcloud_relocations_requested_total)");
    assert_eq!(
        requested[0]["value"][1], "0",
        "shop was relocated before Prometheus's first scrape; raise min_residency_secs"
    );
    let relocation = d.eventually("shop relocated by policy", Duration::from_secs(120), |d| {
        let r = d.get("/v1/relocations");
        r.as_array()?
            .iter()
            .find(|r| r["request"]["service"] == "shop" && r["state"] == "completed")
            .cloned()
    });
    assert_eq!(relocation["request"]["origin"], "policy");
    let (status, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let lint = promtool(&["check", "metrics"], Some(&d.metrics()));
    assert!(lint.trim().is_empty(), "promtool check metrics: {lint}");

    // Prometheus has seen the relocation end and the reload, and scraped twice since.
    p.wait_until(
        "fluidcloud_relocations_finished_total{outcome=\"completed\"}",
        Duration::from_secs(30),
        |v| v >= 1.0,
    );
    p.wait_until(
        "fluidcloud_config_reloads_total{result=\"ok\"}",
        Duration::from_secs(30),
        |v| v >= 1.0,
    );
    p.wait_until(
        "count_over_time(up{job=\"fluidcloud\"}[3s])",
        Duration::from_secs(10),
        |v| v >= 2.0,
    );
    p.wait_until("up{job=\"fluidcloud\"}", Duration::from_secs(10), |v| {
        v == 1.0
    });
    // Two more scrape intervals, so the samples after the reload are in every window the
    // queries below look at, also on a loaded machine.
    std::thread::sleep(Duration::from_secs(2));

    // The types the daemon declares, as Prometheus read them.
    let metadata = p.api("/api/v1/metadata", &[]);
    let types: BTreeMap<String, String> = metadata
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(name, m)| Some((name.clone(), m[0]["type"].as_str()?.to_string())))
        .collect();

    let mut problems = Vec::new();
    let mut evaluated = 0;
    let label_values = Regex::new(r"^\s*label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)\s*$").unwrap();
    for (file, dash) in dashboards() {
        // Each query variable (label_values(metric, label)) must offer values. Every query
        // runs with "All" (the variable's allValue), and with single values: the first value
        // of each variable, then the second… until one has data (a service that never moved
        // has no cutover downtime, but the one that did must show it).
        let mut all = BTreeMap::new();
        let mut offered: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in dash["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] != "query" {
                continue;
            }
            let name = v["name"].as_str().unwrap().to_string();
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            let Some(c) = label_values.captures(q) else {
                problems.push(format!(
                    "{file}: variable {name}: not label_values(metric, label): {q}"
                ));
                continue;
            };
            let values = p.api(
                &format!("/api/v1/label/{}/values", &c[2]),
                &[("match[]", c[1].to_string())],
            );
            let values: Vec<String> = values
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| Some(v.as_str()?.to_string()))
                .collect();
            if values.is_empty() {
                problems.push(format!("{file}: variable {name}: {q} offers no value"));
                continue;
            }
            all.insert(
                name.clone(),
                v["allValue"].as_str().unwrap_or(".*").to_string(),
            );
            offered.insert(
                name,
                values.iter().map(|v| grafana_regex_escape(v)).collect(),
            );
        }
        let most = offered.values().map(Vec::len).max().unwrap_or(0);
        let singles: Vec<BTreeMap<String, String>> = (0..most)
            .map(|i| {
                offered
                    .iter()
                    .map(|(name, values)| (name.clone(), values[i.min(values.len() - 1)].clone()))
                    .collect()
            })
            .collect();
        for q in queries(&file, &dash) {
            problems.extend(type_problems(&q, &types));
            let run = |expr: &str| {
                if q.annotation {
                    p.query_range(expr)
                } else {
                    p.query(expr)
                }
            };
            let mut checked = vec![substitute(&q.expr, &all)];
            let single = singles
                .iter()
                .map(|values| substitute(&q.expr, values))
                .filter(|expr| *expr != checked[0])
                .collect::<Vec<_>>();
            if !single.is_empty() {
                match single.iter().find(|expr| !run(expr).is_empty()) {
                    Some(expr) => checked.push(expr.clone()),
                    None => problems.push(format!(
                        "{}: no data for any single value: {}",
                        q.place,
                        single.join(", ")
                    )),
                }
            }
            for expr in checked {
                evaluated += 1;
                let result = run(&expr);
                if result.is_empty() {
                    problems.push(format!("{}: no data for {expr}", q.place));
                    continue;
                }
                for label in legend_labels(q.legend.as_deref().unwrap_or("")) {
                    if let Some(s) = result.iter().find(|s| s["metric"].get(&label).is_none()) {
                        problems.push(format!(
                            "{}: the legend names {label}, which {} lacks",
                            q.place, s["metric"]
                        ));
                    }
                }
                // Each selector on its own: an `or vector(0)` must not hide a misspelt
                // label or value.
                for (selector, ..) in selectors(&expr) {
                    if p.query(&selector).is_empty() {
                        problems.push(format!("{}: no series matches {selector}", q.place));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(evaluated >= 40, "only {evaluated} queries evaluated");
    let used: BTreeSet<String> = dashboards()
        .iter()
        .flat_map(|(f, d)| queries(f, d))
        .flat_map(|q| selectors(&q.expr).into_iter().map(|s| s.1))
        .collect();
    eprintln!("{evaluated} dashboard queries returned data; series used: {used:?}");

    // Stop the demo app the daemon started.
    let pid_file = dir
        .path()
        .join("state/providers/home-frankfurt/apps/shop/web/pid");
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
    {
        // SAFETY: signals the app the daemon started for this test.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
