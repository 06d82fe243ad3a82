//! Hosts for cross-host tests: network namespaces joined to the test's own namespace by veth
//! pairs on a bridge, so a process started in one (`ip netns exec`) reaches the others by
//! their addresses, and the test's process (the daemon's side) reaches all of them.
//!
//! Every address lives only in namespaces and on the bridge this helper made; everything is
//! removed when the [`Hosts`] is dropped, also after a failed assertion. Without root (or
//! without `ip netns`) [`Hosts::create`] says why and returns `None` so the test can skip;
//! under CI (`CI=true`) that is a failure instead, so a skip never passes unnoticed.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One host: a namespace with one address.
pub struct Host {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The veth end in the test's namespace (on the bridge): cut the host off with
    /// [`Host::cut`].
    pub link: String,
}

/// Two or more hosts on one bridge in the test's namespace.
pub struct Hosts {
    pub hosts: Vec<Host>,
    pub bridge: String,
    /// The bridge's address: how the hosts reach the test's namespace (the daemon).
    pub gateway: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// Makes `n` hosts, or says why it cannot (then `None`; under CI a panic).
    pub fn create(n: usize) -> Option<Hosts> {
        match Self::try_create(n) {
            Ok(h) => Some(h),
            Err(why) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("cross-host test cannot make its network namespaces under CI: {why}");
                }
                eprintln!("SKIPPED: cannot make network namespaces for hosts: {why}");
                None
            }
        }
    }

    fn try_create(n: usize) -> Result<Hosts, String> {
        assert!((1..=8).contains(&n));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the test does not run as root".into());
        }
        let pid = std::process::id();
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes: "fc" + 5 hex of the pid + seq + role.
        let tag = format!("fc{:05x}{:x}", pid & 0xfffff, seq & 0xf);
        // 10.X.Y.0/24 with X, Y from the pid and sequence: tests running at once (threads of
        // one process, or several processes) get different subnets.
        let x = 100 + (seq % 100) as u8;
        let y = (pid % 251) as u8;
        let subnet = |host: u8| Ipv4Addr::new(10, x, y, host);
        let mut hosts = Hosts {
            hosts: Vec::new(),
            bridge: format!("{tag}br"),
            gateway: subnet(1),
        };
        // From here on, Drop removes whatever was made.
        ip(&["link", "add", &hosts.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", hosts.gateway),
            "dev",
            &hosts.bridge,
        ])?;
        ip(&["link", "set", &hosts.bridge, "up"])?;
        for i in 0..n {
            let ns = format!("{tag}h{i}");
            let link = format!("{tag}v{i}");
            let inner = format!("{tag}p{i}");
            let addr = subnet(10 + i as u8);
            ip(&["netns", "add", &ns])?;
            hosts.hosts.push(Host {
                ns: ns.clone(),
                addr,
                link: link.clone(),
            });
            ip(&["link", "add", &link, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &link, "master", &hosts.bridge])?;
            ip(&["link", "set", &link, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    pub fn a(&self) -> &Host {
        &self.hosts[0]
    }

    pub fn b(&self) -> &Host {
        &self.hosts[1]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Processes still in the namespace keep it alive but unnamed; the tests kill
            // theirs first.
            let _ = ip(&["netns", "del", &h.ns]);
            let _ = ip(&["link", "del", &h.link]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

impl Host {
    /// `program` to be run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Cuts the host off the network (its link goes down) until [`Host::mend`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]).expect("link down");
    }

    pub fn mend(&self) {
        ip(&["link", "set", &self.link, "up"]).expect("link up");
    }

    /// Shapes what this host receives and sends to `rate` (e.g. "1gbit") with a token
    /// bucket on both ends of its link.
    pub fn shape(&self, rate: &str) {
        for (ns, dev) in [(None, self.link.as_str()), (Some(self.ns.as_str()), "eth0")] {
            let mut args = vec![];
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            args.extend([
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms",
            ]);
            let out = Command::new("tc").args(&args).output().expect("run tc");
            assert!(
                out.status.success(),
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Whether a TCP connection from this host to `to:port` is accepted within 2 s.
    pub fn connects(&self, to: Ipv4Addr, port: u16) -> bool {
        let script = format!(
            "import socket,sys\ntry:\n socket.create_connection(('{to}',{port}),timeout=2).close()\nexcept OSError:\n sys.exit(1)"
        );
        self.command("python3")
            .args(["-c", &script])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// A process in this host that accepts TCP connections on `port` until killed.
    pub fn listen(&self, port: u16) -> std::process::Child {
        let script = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{}',{port}))\ns.listen()\nprint('ready',flush=True)\nwhile True:\n s.accept()[0].close()",
            self.addr
        );
        let mut child = self
            .command("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a listener");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }
}
