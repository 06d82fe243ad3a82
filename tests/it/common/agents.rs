//! Real `fluidcloud agent` processes in the namespaces of [`super::netns`], with
//! certificates from a private authority made for the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fluidcloud::sys::certs;
use fluidcloud::sys::tls::Role;

use super::netns::Host;

/// The authority of a test and the daemon's certificate.
pub struct Pki {
    pub dir: PathBuf,
    /// The `[tls]` section the daemon runs with.
    pub daemon_tls: String,
}

impl Pki {
    pub fn create(dir: &Path) -> Pki {
        let pki = dir.join("pki");
        certs::create_authority(&pki, 30).unwrap();
        let daemon = certs::issue(&pki, Role::Daemon, "broker", &[], 30).unwrap();
        Pki {
            daemon_tls: tls_section(&pki, &daemon.cert, &daemon.key),
            dir: pki,
        }
    }
}

fn tls_section(pki: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.join("ca.pem").display(),
        cert.display(),
        key.display()
    )
}

/// An agent running in a host's namespace; killed when dropped.
pub struct Agent {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub url: String,
    ns: String,
}

impl Agent {
    /// Starts the agent `name` in `host`, serving `providers` (TOML `[providers.X]`
    /// sections; relative roots are under `dir`), its state under `dir/NAME-state`.
    pub fn start(host: &Host, dir: &Path, pki: &Pki, name: &str, providers: &str) -> Agent {
        Agent::start_with(host, dir, pki, name, providers, "")
    }

    /// [`Agent::start`] with more lines for its `[agent]` section.
    pub fn start_with(
        host: &Host,
        dir: &Path,
        pki: &Pki,
        name: &str,
        providers: &str,
        agent_lines: &str,
    ) -> Agent {
        let cert = certs::issue(
            &pki.dir,
            Role::Agent,
            &format!("host-{name}"),
            &[host.addr.to_string()],
            30,
        )
        .unwrap();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\nadvertise = \"{addr}\"\nlisten = \"{addr}:7481\"\n\
                 viaduct_listen = \"{addr}:7482\"\nmetrics_listen = \"{addr}:7483\"\n\
                 state_dir = \"{name}-state\"\n{agent_lines}\n{tls}\n{providers}",
                addr = host.addr,
                tls = tls_section(&pki.dir, &cert.cert, &cert.key),
            ),
        )
        .unwrap();
        let mut agent = Agent {
            child: None,
            log: dir.join(format!("{name}.log")),
            url: format!("https://{}:7481", host.addr),
            config,
            ns: host.ns.clone(),
        };
        agent.restart();
        agent
    }

    /// Starts the agent again on the same configuration (after a kill).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // `ip netns exec` runs the agent in place of itself: the child is the agent.
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(env!("CARGO_BIN_EXE_fluidcloud"))
            .args(["agent", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its API accepts connections.
    pub fn wait_up(&self, host: &Host) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host.connects(host.addr, 7481) {
            assert!(
                Instant::now() < deadline,
                "the agent did not come up:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `rchar` and `wchar` of process `pid`: every byte it read and wrote, sockets included.
pub fn process_io(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
    };
    (field("rchar:"), field("wchar:"))
}
