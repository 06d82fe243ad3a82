//! Shared pieces of the integration tests: a feed server on loopback, a running daemon, and
//! real object stores (`servers`), and a test guest for VMs (`guest`).

#![allow(dead_code)]

pub mod agents;
pub mod config;
pub mod faultproxy;
pub mod guest;
pub mod netns;
pub mod servers;
pub use servers::free_ports;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// An HTTP server on 127.0.0.1 serving fixed bodies by path, counting requests and noting
/// when each came.
pub struct FeedServer {
    pub base: String,
    pub hits: Arc<Mutex<HashMap<String, usize>>>,
    times: Arc<Mutex<Vec<(String, SystemTime)>>>,
    routes: Arc<Mutex<HashMap<String, Arc<Body>>>>,
    _rt: tokio::runtime::Runtime,
}

pub enum Body {
    Json(String),
    Status(u16),
    /// Any status, with headers (`Retry-After`…) and a text body.
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Never answers.
    Hang,
}

impl FeedServer {
    pub fn start(routes: Vec<(&str, Body)>) -> FeedServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let times: Arc<Mutex<Vec<(String, SystemTime)>>> = Arc::default();
        let routes: Arc<Mutex<HashMap<String, Arc<Body>>>> = Arc::new(Mutex::new(
            routes
                .into_iter()
                .map(|(p, b)| (p.to_string(), Arc::new(b)))
                .collect(),
        ));
        let served = routes.clone();
        let h = hits.clone();
        let t = times.clone();
        let base2 = base.clone();
        rt.spawn(async move {
            let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                let routes = served.clone();
                let h = h.clone();
                let t = t.clone();
                let base = base2.clone();
                async move {
                    use axum::response::IntoResponse;
                    let key = match req.uri().query() {
                        Some(q) => format!("{}?{}", req.uri().path(), q),
                        None => req.uri().path().to_string(),
                    };
                    *h.lock().unwrap().entry(key.clone()).or_default() += 1;
                    t.lock().unwrap().push((key.clone(), SystemTime::now()));
                    let body = {
                        let routes = routes.lock().unwrap();
                        routes
                            .get(&key)
                            .or_else(|| routes.get(req.uri().path()))
                            .cloned()
                    };
                    match body.as_deref() {
                        Some(Body::Json(s)) => (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            s.replace("{BASE}", &base),
                        )
                            .into_response(),
                        Some(Body::Status(c)) => axum::http::StatusCode::from_u16(*c)
                            .unwrap()
                            .into_response(),
                        Some(Body::Answer {
                            status,
                            headers,
                            body,
                        }) => {
                            let mut r = (
                                axum::http::StatusCode::from_u16(*status).unwrap(),
                                body.clone(),
                            )
                                .into_response();
                            for (name, value) in headers {
                                r.headers_mut().insert(*name, value.parse().unwrap());
                            }
                            r
                        }
                        Some(Body::Hang) => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            "late".into_response()
                        }
                        None => axum::http::StatusCode::NOT_FOUND.into_response(),
                    }
                }
            });
            axum::serve(listener, app).await.unwrap();
        });
        FeedServer {
            base,
            hits,
            times,
            routes,
            _rt: rt,
        }
    }

    /// Serves `body` at `path` from now on (a feed whose prices change).
    pub fn set(&self, path: &str, body: Body) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), Arc::new(body));
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// When `path` (with its query string, if any) was asked for at or after `since`.
    pub fn hit_times(&self, path: &str, since: SystemTime) -> Vec<SystemTime> {
        self.times
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, t)| p == path && *t >= since)
            .map(|(_, t)| *t)
            .collect()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fluidcloud")
}

/// The demo app's binary. Cargo gives integration tests `CARGO_BIN_EXE_*` for binaries
/// only, not for examples, and `cargo test --test it` does not build examples.
/// So the test builds it itself with the cargo that runs the tests (`$CARGO`), the same
/// profile and the same target directory as this test binary (found from its own path,
/// `<target>/<profile>/deps/…`), which is correct under `CARGO_TARGET_DIR` and `--release`
/// too. Cargo has released its build lock by the time tests run, and an up-to-date example
/// makes this a no-op, so it is done once per run rather than trusting a stale binary.
///
/// The variables cargo sets for a running test (`CARGO_PKG_*`, `CARGO_MANIFEST_DIR`…) are
/// removed first: some build scripts (ring's) watch them, and seeing them change would make
/// the inner and the outer cargo rebuild those crates for each other on every run.
pub fn demo_app() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_for_tests = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"]
                .iter()
                .any(|p| key.starts_with(p))
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&key.as_ref());
            if set_for_tests {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.args([
            "build",
            "--quiet",
            "--example",
            "demo-app",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("run cargo to build the demo app");
        assert!(status.success(), "building the demo-app example failed");
        let bin = profile_dir.join("examples").join("demo-app");
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// The real daemon, started on a temp dir and a free port; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub base: String,
    pub token: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Daemon {
    /// Writes `config` (with `{PORT}` and `{DIR}` filled in) and starts the daemon on it.
    pub fn start(dir: &Path, config: &str) -> Daemon {
        let port = free_port();
        let config_path = dir.join("fluidcloud.toml");
        std::fs::write(
            &config_path,
            config
                .replace("{PORT}", &port.to_string())
                .replace("{DIR}", &dir.display().to_string())
                .replace("{REPO}", &repo().display().to_string()),
        )
        .unwrap();
        let log = dir.join("daemon.log");
        let child = Command::new(bin())
            .args(["daemon", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir: dir.to_path_buf(),
            config: config_path,
            log,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
        };
        d.wait_for("/healthz", Duration::from_secs(60));
        d.token = std::fs::read_to_string(dir.join("state/api-token"))
            .unwrap()
            .trim()
            .to_string();
        d
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until GET `path` answers 200.
    pub fn wait_for(&mut self, path: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited with {status}:\n{}", self.logs());
            }
            if let Ok(r) = self.raw("GET", path, false, None) {
                if r.0 == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < limit,
                "{path} did not answer 200 within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One HTTP call; returns status and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        auth: bool,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String), reqwest::Error> {
        let token = auth.then(|| self.token.clone());
        self.call(method, path, token.as_deref(), body)
    }

    /// One HTTP call with any bearer token (or none).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String), reqwest::Error> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(30));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.rt.block_on(async {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            Ok((status, resp.text().await?))
        })
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.raw("GET", path, true, None).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn metrics(&self) -> String {
        self.raw("GET", "/metrics", false, None).unwrap().1
    }

    /// Value of one series in the exposition (`name{labels}` exactly as printed).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Polls `f` until it returns Some, or fails with the daemon's log.
    pub fn eventually<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Daemon) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited with {status} while waiting for {what}:\n{}",
                    self.logs()
                );
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` with a 10 s timeout: the body of a successful answer, else `None`.
pub fn http_get(url: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    })
}

/// Kills, when dropped, every app a local provider started under `dir` (found by their pid
/// files, `.../apps/SERVICE/APP/pid`, at any depth): apps outlive the daemon or agent that
/// started them, also when a test fails before it stops them.
pub struct Apps<'a>(pub &'a Path);

impl Drop for Apps<'_> {
    fn drop(&mut self) {
        fn walk(dir: &Path, in_apps: bool) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, in_apps || entry.file_name() == "apps");
                } else if in_apps && entry.file_name() == "pid" {
                    servers::kill_from_pid_file(&path);
                }
            }
        }
        walk(self.0, false);
    }
}
