//! Real object stores on loopback for the integration tests: `s3s-fs` (an S3 server on a
//! directory, which checks SigV4) and a single-node OpenStack Swift with tempauth (proxy,
//! account, container and object servers, and memcached for its tokens).
//!
//! `scripts/test-env.sh` installs them and writes `$FLUIDCLOUD_TEST_ENV/env` (default
//! `~/.cache/fluidcloud-test-env/env`); [`TestEnv::load`] reads it. Every server listens on a
//! free port, is waited for until it answers, and is stopped by its pid when dropped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Where the installed servers are.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub s3s_fs: PathBuf,
    /// The Swift virtualenv's `bin/`.
    pub swift_bin: PathBuf,
    pub memcached: PathBuf,
    /// Libraries unpacked beside memcached, when the system lacks them.
    pub memcached_libs: Option<PathBuf>,
}

impl TestEnv {
    /// Reads the env file of `scripts/test-env.sh`; variables set in the environment win.
    /// Panics with what to run when something is missing.
    pub fn load() -> TestEnv {
        let file = env_file();
        let vars = env_vars();
        let get = |name: &str| -> PathBuf {
            let path = vars.get(name).map(PathBuf::from).unwrap_or_else(|| {
                panic!(
                    "{name} is not set and {} does not name it; run scripts/test-env.sh first",
                    file.display()
                )
            });
            assert!(
                path.exists(),
                "{name}={} does not exist; run scripts/test-env.sh again",
                path.display()
            );
            path
        };
        TestEnv {
            s3s_fs: get("FLUIDCLOUD_S3S_FS"),
            swift_bin: get("FLUIDCLOUD_SWIFT_BIN"),
            memcached: get("FLUIDCLOUD_MEMCACHED"),
            memcached_libs: vars.get("FLUIDCLOUD_MEMCACHED_LIBS").map(PathBuf::from),
        }
    }
}

/// `$FLUIDCLOUD_TEST_ENV/env`, default `~/.cache/fluidcloud-test-env/env`.
pub fn env_file() -> PathBuf {
    let cache = std::env::var_os("FLUIDCLOUD_TEST_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("$HOME is set");
            Path::new(&home).join(".cache/fluidcloud-test-env")
        });
    cache.join("env")
}

/// The variables of the env file, overridden by `FLUIDCLOUD_*` variables of the
/// environment.
pub fn env_vars() -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = std::fs::read_to_string(env_file())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in std::env::vars() {
        if k.starts_with("FLUIDCLOUD_") {
            vars.insert(k, v);
        }
    }
    vars
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Server {
    fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Server {
        std::fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Server {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its output, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills it at once, as a crash would.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn signal(&mut self, sig: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signals a child this process started and has not reaped yet, so the
            // pid cannot have been reused.
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Waits until `ready` says yes, failing with its output if it exits or takes too long.
    fn wait(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) {
        let started = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if started.elapsed() > limit {
                panic!(
                    "{} was not ready within {limit:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// One HTTP/1.0 request on loopback; returns the status code and the headers, lowercased.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, HashMap<String, String>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = String::new();
    // Only the head is needed; the body may be cut short.
    let _ = s.read_to_string(&mut answer);
    let mut lines = answer.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers))
}

/// Sends SIGKILL to the process a provider's pid file names (its first word), if the file
/// exists: cleans up apps and emulators a test or benchmark left running.
pub fn kill_from_pid_file(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
        // SAFETY: signals a process a provider of the caller started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// An `s3s-fs` server on a directory.
pub struct S3sFs {
    env: TestEnv,
    pub port: u16,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// Where it keeps buckets (one directory each) and objects.
    pub data: PathBuf,
    logs: PathBuf,
    pub server: Option<Server>,
}

impl S3sFs {
    pub fn start(env: &TestEnv, dir: &Path) -> S3sFs {
        let data = dir.join("s3-data");
        std::fs::create_dir_all(&data).unwrap();
        let port = free_port();
        let mut s = S3sFs {
            env: env.clone(),
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: "fluidcloud-test".to_string(),
            secret_key: format!("secret-{:016x}", fastrand::u64(..)),
            data,
            logs: dir.join("logs"),
            server: None,
        };
        s.restart();
        s
    }

    /// Starts it (again) on the same port and data.
    pub fn restart(&mut self) {
        assert!(self.server.is_none(), "s3s-fs is already running");
        let mut server = Server::spawn(
            "s3s-fs",
            Command::new(&self.env.s3s_fs)
                .args(["--host", "127.0.0.1", "--port"])
                .arg(self.port.to_string())
                .args([
                    "--access-key",
                    &self.access_key,
                    "--secret-key",
                    &self.secret_key,
                ])
                .arg(&self.data),
            &self.logs,
        );
        let port = self.port;
        server.wait(Duration::from_secs(20), || accepts(port));
        self.server = Some(server);
    }

    /// Kills it at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.kill();
        }
    }
}

/// A single-node Swift with tempauth (user `test:tester`, a random key) and its memcached.
pub struct SwiftServer {
    env: TestEnv,
    dir: PathBuf,
    pub proxy_port: u16,
    pub memcached_port: u16,
    pub auth_url: String,
    pub user: String,
    pub key: String,
    pub proxy: Option<Server>,
    _storage: Vec<Server>,
    _memcached: Server,
}

impl SwiftServer {
    pub fn start(env: &TestEnv, dir: &Path) -> SwiftServer {
        let dir = dir.join("swift");
        let logs = dir.join("logs");
        std::fs::create_dir_all(dir.join("srv/node/d1")).unwrap();
        let p = free_ports(5);
        let (memcached_port, account, container, object, proxy) = (p[0], p[1], p[2], p[3], p[4]);

        let mut memcached_cmd = Command::new(&env.memcached);
        if let Some(libs) = &env.memcached_libs {
            memcached_cmd.env("LD_LIBRARY_PATH", libs);
        }
        memcached_cmd
            .args(["-l", "127.0.0.1", "-U", "0", "-m", "32", "-p"])
            .arg(memcached_port.to_string());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // memcached refuses to run as root unless told which user to be.
            memcached_cmd.args(["-u", "root"]);
        }
        let mut memcached = Server::spawn("memcached", &mut memcached_cmd, &logs);
        memcached.wait(Duration::from_secs(10), || accepts(memcached_port));

        // A key of its own per server, so a test can look for it in what the daemon shows.
        let key = format!("swift-key-{:016x}", fastrand::u64(..));
        write_confs(
            &dir,
            account,
            container,
            object,
            proxy,
            memcached_port,
            &key,
        );
        for (ring, port) in [
            ("account", account),
            ("container", container),
            ("object", object),
        ] {
            let builder = dir.join(format!("{ring}.builder"));
            let b = builder.to_str().unwrap();
            for args in [
                vec![b, "create", "10", "1", "1"],
                vec![b, "add", &format!("r1z1-127.0.0.1:{port}/d1"), "100"],
                vec![b, "rebalance"],
            ] {
                let out = Command::new(env.swift_bin.join("swift-ring-builder"))
                    .args(&args)
                    .current_dir(&dir)
                    .output()
                    .expect("swift-ring-builder runs");
                // `rebalance` exits 1 with a warning on a single-device ring; the ring file
                // is what matters.
                if !out.status.success() && args[1] != "rebalance" {
                    panic!(
                        "swift-ring-builder {args:?} failed: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            assert!(
                dir.join(format!("{ring}.ring.gz")).exists(),
                "swift-ring-builder made no {ring} ring"
            );
        }

        let mut storage = Vec::new();
        for (kind, port) in [
            ("account", account),
            ("container", container),
            ("object", object),
        ] {
            let mut s = Server::spawn(
                &format!("swift-{kind}-server"),
                Command::new(env.swift_bin.join(format!("swift-{kind}-server")))
                    .arg(dir.join(format!("{kind}-server.conf")))
                    .arg("-v"),
                &logs,
            );
            s.wait(Duration::from_secs(60), || {
                http(port, "GET", "/healthcheck", &[]).is_some_and(|(s, _)| s == 200)
            });
            storage.push(s);
        }
        let mut swift = SwiftServer {
            env: env.clone(),
            dir,
            proxy_port: proxy,
            memcached_port,
            auth_url: format!("http://127.0.0.1:{proxy}/auth/v1.0"),
            user: "test:tester".to_string(),
            key,
            proxy: None,
            _storage: storage,
            _memcached: memcached,
        };
        swift.restart_proxy();
        swift
    }

    /// Starts the proxy (again) on the same port, and waits until a login works.
    pub fn restart_proxy(&mut self) {
        assert!(self.proxy.is_none(), "the Swift proxy is already running");
        let mut p = Server::spawn(
            "swift-proxy-server",
            Command::new(self.env.swift_bin.join("swift-proxy-server"))
                .arg(self.dir.join("proxy-server.conf"))
                .arg("-v"),
            &self.dir.join("logs"),
        );
        let (port, user, key) = (self.proxy_port, self.user.clone(), self.key.clone());
        p.wait(Duration::from_secs(60), || {
            http(
                port,
                "GET",
                "/auth/v1.0",
                &[("X-Auth-User", &user), ("X-Auth-Key", &key)],
            )
            .is_some_and(|(s, h)| s == 200 && h.contains_key("x-auth-token"))
        });
        self.proxy = Some(p);
    }

    /// Kills the proxy at once, as a crash would; storage servers and tokens stay.
    pub fn kill_proxy(&mut self) {
        if let Some(p) = self.proxy.take() {
            p.kill();
        }
    }

    /// Forgets every token, as when they expire or memcached restarts.
    pub fn flush_tokens(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.memcached_port)).unwrap();
        s.write_all(b"flush_all\r\n").unwrap();
        let mut answer = [0u8; 16];
        let n = s.read(&mut answer).unwrap();
        assert_eq!(&answer[..n], b"OK\r\n");
    }
}

fn write_confs(
    dir: &Path,
    account: u16,
    container: u16,
    object: u16,
    proxy: u16,
    memcached: u16,
    key: &str,
) {
    let d = dir.display();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write(
        "swift.conf",
        "[swift-hash]\nswift_hash_path_prefix = fluidcloud\nswift_hash_path_suffix = test\n\n\
         [storage-policy:0]\nname = only\ndefault = yes\n"
            .to_string(),
    );
    // workers = 0: a forked worker dies silently here (no /dev/log for its logger).
    let common = |port: u16| {
        format!(
            "[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {port}\nworkers = 0\nswift_dir = {d}\n\
             devices = {d}/srv/node\nmount_check = false\ndisable_fallocate = true\n\
             log_level = WARNING\n"
        )
    };
    for (kind, port) in [
        ("account", account),
        ("container", container),
        ("object", object),
    ] {
        write(
            &format!("{kind}-server.conf"),
            format!(
                "{}\n[pipeline:main]\npipeline = healthcheck {kind}-server\n\n\
                 [filter:healthcheck]\nuse = egg:swift#healthcheck\n\n\
                 [app:{kind}-server]\nuse = egg:swift#{kind}\n",
                common(port)
            ),
        );
    }
    let filters = [
        ("catch_errors", "catch_errors"),
        ("gatekeeper", "gatekeeper"),
        ("healthcheck", "healthcheck"),
        ("proxy-logging", "proxy_logging"),
        ("listing_formats", "listing_formats"),
        ("copy", "copy"),
        ("slo", "slo"),
        ("dlo", "dlo"),
    ]
    .iter()
    .map(|(section, egg)| format!("[filter:{section}]\nuse = egg:swift#{egg}\n"))
    .collect::<Vec<_>>()
    .join("\n");
    write(
        "proxy-server.conf",
        format!(
            "[DEFAULT]\nbind_ip = 127.0.0.1\nbind_port = {proxy}\nworkers = 0\nswift_dir = {d}\n\
             log_level = WARNING\n\n\
             [pipeline:main]\npipeline = catch_errors gatekeeper healthcheck proxy-logging cache \
             listing_formats tempauth copy slo dlo proxy-logging proxy-server\n\n\
             [app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n\
             [filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = {key} .admin\n\n\
             [filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = 127.0.0.1:{memcached}\n\n\
             {filters}"
        ),
    );
}

/// `n` distinct free ports: the listeners are held until all are drawn, since the kernel may
/// hand a port just released to the next `bind` (two servers would then share one).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
