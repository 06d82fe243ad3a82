//! A volume moved between two hosts: the agents' viaduct against the paper's `dd | nc`,
//! `rsync --sparse` (with and without `-z`) and `zstd | nc`, side by side over one shaped
//! link, then the bytes a second send re-sends after 1 % of the image changed.
//!
//! `cargo bench --bench hosts -- [--rate 1gbit,100mbit] [--size-gib 4] [--allocated-gib 1.5]
//! [--streams N] [--repeat N] [--only METHOD[,METHOD...]] [--dir DIR] [--tag TAG]`
//! (root only; `scripts/bench-hosts.sh` installs the tools, builds the demo app and cleans up
//! after a kill).
//!
//! Two network namespaces, A and B, hang off one bridge by veth pairs; both ends of each pair
//! are shaped with a token bucket (`tc qdisc ... tbf`) to the rate under test. A real
//! `fluidcloud agent` (the release binary cargo builds beside this benchmark) runs in each,
//! with certificates from `fluidcloud certs`, each serving its own `local` provider. The
//! image is a volume of A's provider; this process plays the daemon: it asks A's agent to send
//! the volume to B's viaduct receiver (`send_volume`) and polls `transfer` until it is done,
//! and no byte of the image passes through it. The other methods run as processes inside the
//! namespaces, A to B, against a listener (`nc`, an `rsync` daemon) in B.
//!
//! "wire" is what B's link carried towards B while the method ran (the bytes the token bucket
//! on B's veth end on the bridge let through: Ethernet, IP and TCP headers of every segment
//! included, as the bucket counts them), the same counter for every method. The viaduct's floor is that figure
//! divided by the link rate: the time the link alone needs for what the viaduct chose to send.
//!
//! Every method starts with the source's data read once (in the page cache, or in memory on a
//! tmpfs) and its target absent. The viaduct runs last in every round, so that its copy is
//! the previous version the re-sync compares against.
//!
//! Then the cutover: a service `shopIrN` (the demo app, its configuration file and one raw
//! volume of the same size, built the same way) is deployed on A's provider and relocated to
//! B's by the relocation engine in this process, the daemon's side, whose providers `a` and
//! `b` are the agents (`agent = "https://HOST:7481"` and a `[tls]` section): the pre-copy and
//! the final delta go agent to agent. As in the same-host benchmark (`benches/relocation.rs`),
//! the engine's observer is told when the pre-copy is done and, before the source app is
//! stopped, 1 % of the volume's 1 MiB blocks are rewritten; the figures come from the
//! journal, downtime being from the source app's stop to the target's health check passing
//! (`Engine::downtime`). The app at B is reached from here over the bridge, as the daemon
//! would reach it. The target image is compared with the source as it was at the cutover.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use fluidcloud::model::{DiskFormat, Driver};
use fluidcloud::providers::remote::wire::{staged_name, SendVolume, SentReport, TransferState};
use fluidcloud::providers::remote::RemoteProvider;
use fluidcloud::providers::{wait_for, Provider, VolumeSpec};
use fluidcloud::sys::tls::{Identity, TlsFiles};
use fluidcloud::viaduct::{image_digest, DEFAULT_CHUNK_SIZE};

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/common/config.rs"]
mod config;
use common::{at_least_one, build_image, fill_random, load_average, XorShift, MIB};
use config::ConfigBuilder;

/// A volume from one host to another: the agents' viaduct against `dd | nc`, `rsync` and
/// `zstd | nc` over a shaped link.
#[derive(Parser, Debug)]
#[command(name = "hosts", bin_name = "cargo bench --bench hosts --")]
struct Args {
    /// Link rates to measure at, one run each, in `tc` syntax.
    #[arg(long, default_value = "1gbit,100mbit", value_delimiter = ',')]
    rate: Vec<String>,
    /// The image's size: one value for every rate, or one per rate.
    #[arg(long, default_value = "4", value_delimiter = ',')]
    size_gib: Vec<f64>,
    /// How much of the image holds data: one value for every rate, or one per rate.
    #[arg(long, default_value = "1.5", value_delimiter = ',')]
    allocated_gib: Vec<f64>,
    /// The viaduct's parallel streams (`SendVolume::streams`); default the agent's.
    #[arg(long)]
    streams: Option<usize>,
    /// Runs of each method per rate; the best counts (of the cutover, the median).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>)]
    repeat: usize,
    /// Only these methods, comma-separated (viaduct, dd, rsync, rsync-z, zstd, cutover); the
    /// re-sync runs with the viaduct.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Where the hosts' files live (a temporary directory under it). Default /dev/shm, a
    /// tmpfs: the link, not a disk, is what is measured, and `dd | nc` writes every zero.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Prefix of the namespaces', bridge's and links' names (at most 8 characters); default
    /// one from the process id. The script passes its own, to clean up after a kill.
    #[arg(long)]
    tag: Option<String>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

/// What each rate runs with, after the checks across arguments.
struct Plan {
    rate: String,
    bits_per_sec: f64,
    size: u64,
    allocated: u64,
}

impl Args {
    fn plans(&self) -> Vec<Plan> {
        let n = self.rate.len();
        let pick = |v: &[f64], what: &str, i: usize| -> f64 {
            match v.len() {
                1 => v[0],
                l if l == n => v[i],
                _ => common::invalid::<Args>(format!(
                    "--{what} takes one value or one per rate ({n})"
                )),
            }
        };
        (0..n)
            .map(|i| {
                let rate = self.rate[i].trim().to_string();
                let Some(bits_per_sec) = parse_rate(&rate) else {
                    common::invalid::<Args>(format!(
                        "--rate `{rate}` is not a tc rate such as 1gbit or 100mbit"
                    ))
                };
                let size_gib = pick(&self.size_gib, "size-gib", i);
                let allocated_gib = pick(&self.allocated_gib, "allocated-gib", i);
                if size_gib <= 0.0 || allocated_gib <= 0.0 || allocated_gib > size_gib {
                    common::invalid::<Args>(
                        "--allocated-gib must be above zero and at most --size-gib",
                    );
                }
                // Whole MiB: the image is built and changed in 1 MiB blocks.
                let mib = |gib: f64| ((gib * 1024.0).round() as u64).max(1) * MIB;
                Plan {
                    rate,
                    bits_per_sec,
                    size: mib(size_gib),
                    allocated: mib(allocated_gib),
                }
            })
            .collect()
    }

    fn wants(&self, method: Method) -> bool {
        self.wants_key(method.key())
    }

    fn wants_key(&self, key: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|o| o.trim() == key))
    }

    /// Whether any of the transfer methods runs (the cutover aside).
    fn wants_a_method(&self) -> bool {
        Method::ALL.into_iter().any(|m| self.wants(m))
    }

    /// Checks `--only` names known methods.
    fn checked(self) -> Args {
        if let Some(only) = &self.only {
            for o in only {
                let o = o.trim();
                if o != CUTOVER && !Method::ALL.into_iter().any(|m| m.key() == o) {
                    common::invalid::<Args>(format!(
                        "--only takes viaduct, dd, rsync, rsync-z, zstd and {CUTOVER}, not `{o}`"
                    ));
                }
            }
        }
        self
    }
}

/// A `tc` rate (`1gbit`, `100mbit`, `12500kbps`, `1gibit`) in bits per second.
fn parse_rate(text: &str) -> Option<f64> {
    let t = text.to_ascii_lowercase();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let (unit, bytes) = match unit.strip_suffix("bit") {
        Some(u) => (u, false),
        None => (unit.strip_suffix("bps")?, true),
    };
    let scale = match unit {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * scale * if bytes { 8.0 } else { 1.0 })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Viaduct,
    DdNc,
    Rsync,
    RsyncZ,
    ZstdNc,
}

impl Method {
    /// The viaduct last: its copy stays for the re-sync.
    const ALL: [Method; 5] = [
        Method::DdNc,
        Method::Rsync,
        Method::RsyncZ,
        Method::ZstdNc,
        Method::Viaduct,
    ];

    fn key(self) -> &'static str {
        match self {
            Method::Viaduct => "viaduct",
            Method::DdNc => "dd",
            Method::Rsync => "rsync",
            Method::RsyncZ => "rsync-z",
            Method::ZstdNc => "zstd",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Method::Viaduct => "viaduct, agent to agent (mutual TLS)",
            Method::DdNc => "`dd bs=1M | nc` (the paper)",
            Method::Rsync => "`rsync --sparse` (daemon in B)",
            Method::RsyncZ => "`rsync --sparse -z` (daemon in B)",
            Method::ZstdNc => "`zstd -1 -T0 | nc`",
        }
    }
}

// ---------------------------------------------------------------------------------------
// The two hosts.

/// The names of everything the hosts are made of; removing them needs nothing else, so a
/// signal handler can do it too.
#[derive(Clone)]
struct NetNames {
    bridge: String,
    /// Namespace and the veth end on the bridge, per host.
    hosts: [(String, String); 2],
}

/// One host: a namespace with one address, reached through `link` on the bridge.
struct Host {
    ns: String,
    addr: Ipv4Addr,
    link: String,
}

/// Hosts A and B on one bridge in this process's namespace.
struct Net {
    names: NetNames,
    a: Host,
    b: Host,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNames {
    fn new(tag: &str) -> Self {
        NetNames {
            bridge: format!("{tag}br"),
            hosts: [
                (format!("{tag}a"), format!("{tag}va")),
                (format!("{tag}b"), format!("{tag}vb")),
            ],
        }
    }

    /// Kills whatever still runs in the namespaces (only this benchmark's processes can be
    /// there) and removes the namespaces, links and bridge. Quiet about what is already gone.
    fn remove(&self) {
        for (ns, link) in &self.hosts {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<libc::pid_t>() {
                        // SAFETY: kill with a pid and a signal number; no memory is passed.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", link])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

impl Net {
    fn create(tag: &str) -> Result<Net> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("this benchmark makes network namespaces: run it as root");
        }
        let names = NetNames::new(tag);
        // 10.250.Y.0/24, Y from the process id: apart from the tests' 10.100-199 subnets.
        let y = (std::process::id() % 250) as u8;
        let subnet = |h: u8| Ipv4Addr::new(10, 250, y, h);
        let host = |i: usize| Host {
            ns: names.hosts[i].0.clone(),
            addr: subnet(10 + i as u8),
            link: names.hosts[i].1.clone(),
        };
        let net = Net {
            a: host(0),
            b: host(1),
            names,
        };
        // From here on, Drop removes whatever was made.
        let bridge = net.names.bridge.as_str();
        ip(&["link", "add", bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", subnet(1)), "dev", bridge])?;
        ip(&["link", "set", bridge, "up"])?;
        for (i, h) in [&net.a, &net.b].into_iter().enumerate() {
            let inner = format!("{tag}p{i}");
            ip(&["netns", "add", &h.ns])?;
            ip(&[
                "link", "add", &h.link, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &h.ns])?;
            ip(&["link", "set", &h.link, "master", bridge])?;
            ip(&["link", "set", &h.link, "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &h.ns, "link", "set", &inner, "name", "eth0"])?;
            ip(&[
                "-n",
                &h.ns,
                "addr",
                "add",
                &format!("{}/24", h.addr),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// Shapes both ends of both hosts' links to `rate` with a token bucket.
    fn shape(&self, rate: &str) -> Result<()> {
        for h in [&self.a, &self.b] {
            for (ns, dev) in [(None, h.link.as_str()), (Some(h.ns.as_str()), "eth0")] {
                let mut args = vec![];
                if let Some(ns) = ns {
                    args.extend(["-n", ns]);
                }
                args.extend([
                    "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
                    "latency", "50ms",
                ]);
                let out = Command::new("tc")
                    .args(&args)
                    .output()
                    .context("cannot run `tc`")?;
                if !out.status.success() {
                    bail!(
                        "`tc {}` failed: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        Ok(())
    }

    /// Bytes B's link has carried towards B, and from B, headers included: what the token
    /// buckets on its two ends let through. Their count has the headers of every TCP segment
    /// as a 1500-byte-MTU wire carries it; the interfaces' own `tx_bytes` count one header per
    /// offloaded (GSO) batch of up to 64 KiB, about 4 % less for a bulk transfer.
    fn counters(&self) -> Result<(u64, u64)> {
        let towards_b = qdisc_sent_bytes(None, &self.b.link)?;
        let from_b = qdisc_sent_bytes(Some(&self.b.ns), "eth0")?;
        Ok((towards_b, from_b))
    }
}

/// The bytes the root qdisc of `dev` (in namespace `ns`) has sent.
fn qdisc_sent_bytes(ns: Option<&str>, dev: &str) -> Result<u64> {
    let mut c = Command::new("tc");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    let out = c
        .args(["-s", "qdisc", "show", "dev", dev, "root"])
        .output()
        .context("cannot run `tc`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no byte count in `tc -s qdisc show dev {dev}`: {text}"))
}

impl Drop for Net {
    fn drop(&mut self) {
        self.names.remove();
    }
}

impl Host {
    /// `program`, to be run inside this host.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Whether something in this host listens on TCP `port`.
    fn listening(&self, port: u16) -> bool {
        let hex = format!(":{port:04X} ");
        self.command("cat")
            .arg("/proc/net/tcp")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.contains(&hex) && l.contains(" 0A "))
            })
            .unwrap_or(false)
    }

    fn wait_listening(&self, port: u16, child: &mut Child, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.listening(port) {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited before listening: {status}");
            }
            if Instant::now() > deadline {
                bail!("{what} did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// A process killed when dropped (agents, the rsync daemon, a listener left by a failure).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Certificates and agents.

fn fluidcloud(args: &[&str]) -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(args)
        .output()
        .context("cannot run fluidcloud")?;
    if !out.status.success() {
        bail!(
            "`fluidcloud {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `fluidcloud agent` in `host`, serving the `local` provider `name`.
fn start_agent(host: &Host, dir: &Path, pki: &Path, name: &str) -> Result<Running> {
    let p = |s: &str| pki.join(s).display().to_string();
    fluidcloud(&[
        "certs",
        "issue",
        "--dir",
        &p(""),
        "--agent",
        &format!("host-{name}"),
        "--host",
        &host.addr.to_string(),
        "--days",
        "2",
    ])?;
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[agent]
advertise = "{addr}"
listen = "{addr}:7481"
viaduct_listen = "{addr}:7482"
state_dir = "{state}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[providers.{name}]
driver = "local"
region = "r"
root = "{root}"
"#,
            addr = host.addr,
            state = dir.join(format!("{name}-state")).display(),
            root = dir.join(format!("{name}-root")).display(),
            ca = p("ca.pem"),
            cert = p(&format!("host-{name}.pem")),
            key = p(&format!("host-{name}-key.pem")),
        ),
    )?;
    let log = File::create(dir.join(format!("{name}.log")))?;
    let child = host
        .command(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(["agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start the agent")?;
    Ok(Running(child))
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// The methods.

struct Row {
    method: Method,
    seconds: f64,
    /// Bytes B's link carried towards B (headers included), and back.
    wire: u64,
    back: u64,
    note: String,
}

/// What the methods share within one rate.
struct Bench<'a> {
    net: &'a Net,
    rt: &'a tokio::runtime::Runtime,
    a: &'a RemoteProvider,
    b: &'a RemoteProvider,
    streams: Option<usize>,
    /// The volume at A and its image.
    volume: String,
    src: PathBuf,
    size: u64,
    digest: fluidcloud::viaduct::ImageDigest,
    /// Where `nc` and `rsync` write in B.
    files: PathBuf,
    /// Where B's agent stages what its receiver gets.
    incoming: PathBuf,
    staged: String,
    rsync_port: u16,
    next_port: std::cell::Cell<u16>,
}

fn sh(host: &Host, script: &str) -> Command {
    let mut c = host.command("sh");
    c.args(["-c", script]).stdin(Stdio::null());
    c
}

impl Bench<'_> {
    fn port(&self) -> u16 {
        let p = self.next_port.get();
        self.next_port.set(p + 1);
        p
    }

    fn check(&self, out: &Path) -> Result<String> {
        let d = image_digest(out, DEFAULT_CHUNK_SIZE)
            .with_context(|| format!("cannot read {}", out.display()))?;
        if d != self.digest {
            bail!("{} differs from the source image", out.display());
        }
        let alloc = std::fs::metadata(out)?.blocks() * 512;
        Ok(format!("copy verified, allocates {}", gib(alloc)))
    }

    /// Runs `method` once, from the same start as every other: the source's data read, the
    /// target absent, dirty pages flushed.
    fn run(&self, method: Method) -> Result<Row> {
        let out = self.files.join("copy.raw");
        let _ = std::fs::remove_file(&out);
        if method == Method::Viaduct {
            self.rt.block_on(self.b.discard(&self.staged))?;
        }
        let _ = Command::new("sync").status();
        pre_read(&self.src);
        let src = self.src.display().to_string();
        let (b_addr, out_s) = (self.net.b.addr, out.display().to_string());
        let before = self.net.counters()?;
        let mut report = None;
        let seconds = match method {
            Method::Viaduct => {
                let (r, t) = self.rt.block_on(self.viaduct())?;
                report = Some(r);
                t
            }
            Method::DdNc => self.piped(
                &format!("nc -l -s {b_addr} -p {{port}} > {out_s}"),
                &format!("dd if={src} bs=1M 2>/dev/null | nc -q0 {b_addr} {{port}}"),
            )?,
            Method::ZstdNc => self.piped(
                &format!("nc -l -s {b_addr} -p {{port}} | zstd -d -q -f -o {out_s}"),
                &format!("zstd -1 -T0 -q -c {src} | nc -q0 {b_addr} {{port}}"),
            )?,
            Method::Rsync | Method::RsyncZ => {
                let z = if method == Method::RsyncZ { " -z" } else { "" };
                let t = Instant::now();
                let cmd = format!(
                    "rsync --sparse{z} {src} rsync://{b_addr}:{}/bench/copy.raw",
                    self.rsync_port
                );
                let o = sh(&self.net.a, &cmd).output()?;
                if !o.status.success() {
                    bail!(
                        "`{cmd}` failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
                t.elapsed().as_secs_f64()
            }
        };
        let after = self.net.counters()?;
        let (wire, back) = (after.0 - before.0, after.1 - before.1);
        let note = match &report {
            Some(r) => {
                let staged = self.incoming.join(&self.staged);
                format!(
                    "{}; {} streams, {} read, {} sent (payload), agent's own time {:.2} s",
                    self.check(&staged)?,
                    r.streams,
                    gib(r.bytes_read),
                    gib(r.bytes_sent),
                    r.seconds
                )
            }
            None => {
                let n = self.check(&out)?;
                let _ = std::fs::remove_file(&out);
                n
            }
        };
        Ok(Row {
            method,
            seconds,
            wire,
            back,
            note,
        })
    }

    /// A listener in B (`{port}` in `receive` stands for the port), then `send` in A; the
    /// time runs from the start of `send` until the listener has written everything.
    fn piped(&self, receive: &str, send: &str) -> Result<f64> {
        let port = self.port().to_string();
        let receive = receive.replace("{port}", &port);
        let send = send.replace("{port}", &port);
        let mut listener = Running(
            sh(&self.net.b, &receive)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?,
        );
        self.net
            .b
            .wait_listening(port.parse()?, &mut listener.0, &receive)?;
        let t = Instant::now();
        let sent = sh(&self.net.a, &send).stderr(Stdio::piped()).output()?;
        let received = listener.0.wait()?;
        let elapsed = t.elapsed().as_secs_f64();
        if !sent.status.success() || !received.success() {
            let mut err = String::new();
            if let Some(mut e) = listener.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!(
                "`{send}` → `{receive}` failed: sender {} ({}), receiver {received} ({})",
                sent.status,
                String::from_utf8_lossy(&sent.stderr).trim(),
                err.trim()
            );
        }
        Ok(elapsed)
    }

    /// Asks A's agent to send the volume to B's receiver and waits until it is done.
    async fn viaduct(&self) -> Result<(SentReport, f64)> {
        // The receiver's address is asked before the clock starts (the daemon knows it when
        // it plans a relocation); the call's few bytes cross B's link before the count.
        let to = self.b.receiver().await?;
        let t = Instant::now();
        let id = self
            .a
            .send_volume(&SendVolume {
                provider: "a".into(),
                service: "bench".into(),
                volume: self.volume.clone(),
                to,
                name: self.staged.clone(),
                streams: self.streams,
                max_bytes_per_sec: None,
            })
            .await?;
        loop {
            match self.a.transfer(&id.id).await? {
                TransferState::Running { .. } => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                TransferState::Done { report } => {
                    return Ok((report, t.elapsed().as_secs_f64()));
                }
                TransferState::Failed { error } => bail!("the viaduct send failed: {error}"),
            }
        }
    }
}

/// Reads the data of the image at `path` once (holes are skipped), so that every method
/// starts with the source in the page cache.
fn pre_read(path: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(path) else { return };
    let len = f.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; 256 << 10];
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (mut at, end) = (data as u64, (hole.max(data) as u64).min(len));
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            match f.read_at(&mut buf[..n], at) {
                Ok(0) | Err(_) => return,
                Ok(k) => at += k as u64,
            }
        }
        pos = end.max(pos + 1);
    }
}

/// Rewrites 1 % of the image's 1 MiB blocks, spread over the whole image, with new random
/// data; returns how many.
fn change_one_percent(img: &Path, size: u64) -> Result<u64> {
    let picked = one_percent_blocks(size, 0x5151_2026);
    change_blocks(img, &picked, 1_000_000)?;
    File::open(img)?.sync_all()?;
    Ok(picked.len() as u64)
}

/// 1 % of the 1 MiB blocks of an image of `size` (at least one), picked at random over the
/// whole image from `seed`, in order.
fn one_percent_blocks(size: u64, seed: u64) -> Vec<u64> {
    let blocks = size / MIB;
    let changed = (blocks / 100).max(1);
    let mut rng = XorShift(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        picked.insert(rng.below(blocks));
    }
    picked.into_iter().collect()
}

/// Overwrites `blocks` of the image at `path` with new random data (block `b` gets the data
/// of seed `base + b`).
fn change_blocks(path: &Path, blocks: &[u64], base: u64) -> std::io::Result<()> {
    let f = File::options().write(true).open(path)?;
    let mut buf = vec![0u8; MIB as usize];
    for b in blocks {
        fill_random(&mut buf, base + b);
        f.write_all_at(&buf, b * MIB)?;
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args = Args::parse().checked();
    let plans = args.plans();
    if let Err(e) = run(&args, &plans) {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args, plans: &[Plan]) -> Result<()> {
    let tag = match &args.tag {
        Some(t) if t.len() <= 8 && t.chars().all(|c| c.is_ascii_alphanumeric()) => t.clone(),
        Some(t) => bail!("--tag `{t}` must be at most 8 letters and digits"),
        None => format!("hb{:05x}", std::process::id() & 0xfffff),
    };
    let base = args.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let work = tempfile::Builder::new()
        .prefix("hosts-bench.")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory under {}", base.display()))?;
    let dir = work.path().to_path_buf();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    // A kill by Ctrl-C or SIGTERM skips every Drop: remove the hosts and files from here.
    let names = Arc::new(NetNames::new(&tag));
    {
        let (names, dir) = (names.clone(), dir.clone());
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!("interrupted: removing the hosts and {} ...", dir.display());
            names.remove();
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(130);
        });
    }

    eprintln!(
        "Making hosts A and B ({tag}a, {tag}b) in {} ...",
        dir.display()
    );
    let net = Net::create(&tag)?;
    let pki = dir.join("pki");
    let pki_s = pki.display().to_string();
    fluidcloud(&["certs", "ca", "--dir", &pki_s, "--days", "2"])?;
    fluidcloud(&[
        "certs", "issue", "--dir", &pki_s, "--daemon", "bench", "--days", "2",
    ])?;
    let identity = Identity::load(&TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join("bench.pem"),
        key: pki.join("bench-key.pem"),
    })?;
    let _agent_a = start_agent(&net.a, &dir, &pki, "a")?;
    let _agent_b = start_agent(&net.b, &dir, &pki, "b")?;
    let remote = |name: &str, host: &Host| {
        RemoteProvider::new(
            name,
            Driver::Local,
            DiskFormat::Raw,
            &format!("https://{}:7481", host.addr),
            &identity,
        )
    };
    let (a, b) = (remote("a", &net.a)?, remote("b", &net.b)?);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.free_bytes().await.is_err() || b.free_bytes().await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the agents did not come up within 30 s; A's log:\n{}\nB's log:\n{}",
                    log_tail(&dir, "a"),
                    log_tail(&dir, "b")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })?;

    let files = dir.join("b-files");
    std::fs::create_dir(&files)?;
    let rsync_port = 8873;
    let _rsyncd = if args.wants(Method::Rsync) || args.wants(Method::RsyncZ) {
        let conf = dir.join("rsyncd.conf");
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nuid = root\ngid = root\npid file = {}\n\n[bench]\npath = {}\nread only = no\n",
                dir.join("rsyncd.pid").display(),
                files.display()
            ),
        )?;
        let mut d = Running(
            net.b
                .command("rsync")
                .args(["--daemon", "--no-detach"])
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--address={}", net.b.addr))
                .arg(format!("--port={rsync_port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start the rsync daemon")?,
        );
        net.b
            .wait_listening(rsync_port, &mut d.0, "rsync --daemon")?;
        Some(d)
    } else {
        None
    };

    let cutover_env = if args.wants_key(CUTOVER) {
        Some(CutoverEnv {
            net: &net,
            rt: &rt,
            dir: dir.clone(),
            pki: pki.clone(),
            a: &a,
            b: &b,
            app: demo_app()?,
        })
    } else {
        None
    };
    for (i, plan) in plans.iter().enumerate() {
        eprintln!("== link {} ==", plan.rate);
        net.shape(&plan.rate)?;
        let mut section = format!(
            "\n### Link {} (tbf on both ends of both hosts' veth links)\n\n",
            plan.rate
        );
        if args.wants_a_method() {
            section.push_str(&transfers(
                args, plan, i, &net, &rt, &a, &b, &dir, rsync_port,
            )?);
        }
        if let Some(env) = &cutover_env {
            section.push_str(&cutover(env, plan, i, args.repeat)?);
        }
        print!("{section}");
    }
    eprintln!("Removing the hosts and {} ...", dir.display());
    drop(_rsyncd);
    drop(_agent_a);
    drop(_agent_b);
    drop(net);
    drop(work);
    Ok(())
}

/// The transfer methods at one rate on a fresh image, then the re-sync; the part of the
/// report they make. Leaves nothing of theirs behind at A or B.
#[allow(clippy::too_many_arguments)]
fn transfers(
    args: &Args,
    plan: &Plan,
    i: usize,
    net: &Net,
    rt: &tokio::runtime::Runtime,
    a: &RemoteProvider,
    b: &RemoteProvider,
    dir: &Path,
    rsync_port: u16,
) -> Result<String> {
    let files = dir.join("b-files");
    let volume = format!("data{i}");
    let spec = VolumeSpec {
        name: volume.clone(),
        size_bytes: plan.size,
        format: DiskFormat::Raw,
    };
    let src = rt.block_on(async {
        let op = a.create_volume("bench", &spec).await?;
        wait_for(a, &op.id, Duration::from_secs(60)).await?;
        // The agent answers for its host and names no path; the local provider keeps
        // its volumes at ROOT/volumes/SERVICE/VOLUME.raw.
        let path = dir.join(format!("a-root/volumes/bench/{volume}.raw"));
        if !path.is_file() {
            bail!("A's volume bench/{volume} is not at {}", path.display());
        }
        Ok(path)
    })?;
    eprintln!(
        "Building a {} image with {} allocated as A's volume bench/{volume} ...",
        gib(plan.size),
        gib(plan.allocated)
    );
    build_image(&src, plan.size, plan.allocated, 0x9e37_79b9_7f4a_7c15)
        .context("cannot build the image")?;
    let digest = image_digest(&src, DEFAULT_CHUNK_SIZE)?;
    let bench = Bench {
        net,
        rt,
        a,
        b,
        streams: args.streams,
        volume: volume.clone(),
        src: src.clone(),
        size: plan.size,
        digest,
        files: files.clone(),
        incoming: dir.join("b-state/incoming"),
        staged: staged_name(&format!("bench-{i}"), "b", "bench", &volume),
        rsync_port,
        next_port: std::cell::Cell::new(9000 + 100 * i as u16),
    };
    let section = measure(args, plan, &bench)?;
    rt.block_on(async {
        b.discard(&bench.staged).await?;
        let op = a.delete_volume("bench", &volume).await?;
        wait_for(a, &op.id, Duration::from_secs(60)).await?;
        anyhow::Ok(())
    })?;
    Ok(section)
}

/// Every method at one rate, then the re-sync; the section of the report it makes.
fn measure(args: &Args, plan: &Plan, bench: &Bench) -> Result<String> {
    use std::fmt::Write;
    let methods: Vec<Method> = Method::ALL.into_iter().filter(|m| args.wants(*m)).collect();
    let mut best: Vec<Option<Row>> = methods.iter().map(|_| None).collect();
    for round in 1..=args.repeat {
        // The others take turns at going first; the viaduct stays last.
        let others = methods.len() - usize::from(methods.contains(&Method::Viaduct));
        let order = (0..others)
            .map(|k| (k + round - 1) % others)
            .chain(others..methods.len());
        for i in order {
            let m = methods[i];
            eprintln!("{} round {round}: {} ...", plan.rate, m.key());
            let row = bench.run(m)?;
            eprintln!(
                "  {:.2} s, {} towards B, {}",
                row.seconds,
                mb(row.wire),
                row.note
            );
            if best[i].as_ref().is_none_or(|b| row.seconds < b.seconds) {
                best[i] = Some(row);
            }
        }
    }
    let rows: Vec<Row> = best.into_iter().flatten().collect();
    let viaduct = rows.iter().find(|r| r.method == Method::Viaduct);

    let mut s = String::new();
    let alloc = std::fs::metadata(&bench.src)?.blocks() * 512;
    writeln!(
        s,
        "Image: {} raw, {} allocated (random, text, allocated zeros), a `local` volume of A's \
         agent. Best of {} round(s); {} CPUs; load average at the end: {}.",
        gib(plan.size),
        gib(alloc),
        args.repeat,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| method | seconds | wire towards B | back | vs viaduct | wire rate | notes |"
    )?;
    writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | --- |")?;
    for r in &rows {
        let ratio = viaduct.map_or("–".to_string(), |v| {
            format!("{:.2}×", r.seconds / v.seconds)
        });
        writeln!(
            s,
            "| {} | {:.2} | {} | {} | {ratio} | {:.0} Mbit/s | {} |",
            r.method.label().replace('|', "\\|"),
            r.seconds,
            mb(r.wire),
            mb(r.back),
            r.wire as f64 * 8.0 / r.seconds / 1e6,
            r.note
        )?;
    }
    writeln!(s)?;
    if let Some(v) = viaduct {
        let floor = v.wire as f64 * 8.0 / plan.bits_per_sec;
        let over = v.seconds / floor;
        writeln!(
            s,
            "Viaduct floor (its wire bytes ÷ the link rate): {floor:.2} s; its time ÷ floor: \
             {over:.2}×."
        )?;
        let dd = rows.iter().find(|r| r.method == Method::DdNc);
        let best_other = rows
            .iter()
            .filter(|r| r.method != Method::Viaduct)
            .min_by(|x, y| x.seconds.total_cmp(&y.seconds));
        let heading = if plan.bits_per_sec == 1e9 {
            "Targets (at 1 Gbit/s)"
        } else {
            "The 1 Gbit/s targets, for reference"
        };
        let mut checks = Vec::new();
        if let Some(dd) = dd {
            let x = dd.seconds / v.seconds;
            checks.push(format!(
                "≥ 5× faster than `dd | nc`: {x:.2}× {}",
                mark(x >= 5.0)
            ));
        }
        if let Some(o) = best_other {
            checks.push(format!(
                "faster than the best other ({}, {:.2} s): {:.2}× {}",
                o.method.label(),
                o.seconds,
                o.seconds / v.seconds,
                mark(v.seconds < o.seconds)
            ));
        }
        checks.push(format!(
            "within 1.15× of the floor: {over:.2}× {}",
            mark(over <= 1.15)
        ));
        writeln!(s, "{heading}: {}.", checks.join("; "))?;
        writeln!(s)?;
        writeln!(s, "{}", resync(bench)?)?;
        writeln!(s)?;
    }
    Ok(s)
}

/// Changes 1 % of the image's blocks and sends it again to the same staged name, where B
/// holds the previous version; says what travelled.
fn resync(bench: &Bench) -> Result<String> {
    let changed = change_one_percent(&bench.src, bench.size)?;
    eprintln!("re-sync after {changed} blocks changed ...");
    let _ = Command::new("sync").status();
    pre_read(&bench.src);
    let before = bench.net.counters()?;
    let (report, seconds) = bench.rt.block_on(bench.viaduct())?;
    let after = bench.net.counters()?;
    let wire = after.0 - before.0;
    let staged = bench.incoming.join(&bench.staged);
    let verified =
        image_digest(&staged, DEFAULT_CHUNK_SIZE)? == image_digest(&bench.src, DEFAULT_CHUNK_SIZE)?;
    let pct = |b: u64| b as f64 * 100.0 / bench.size as f64;
    Ok(format!(
        "Re-sync with the viaduct after {changed} of {} 1 MiB blocks (1 %, spread over the \
         image) changed, to the same staged name: {:.2} s, {} chunks of {} sent, {} bytes of \
         payload ({:.2} % of the image), {} bytes on the wire towards B ({:.2} % of the image; \
         target ≤ 1.2 % {}), copy verified: {}.",
        bench.size / MIB,
        seconds,
        report.chunks_sent,
        report.chunks_total,
        report.bytes_sent,
        pct(report.bytes_sent),
        wire,
        pct(wire),
        mark(pct(wire) <= 1.2),
        if verified { "yes" } else { "NO" }
    ))
}

// ---------------------------------------------------------------------------------------
// The cutover: a service relocated from A's agent to B's by the engine.

/// The `--only` key of the cutover.
const CUTOVER: &str = "cutover";

/// The demo app's port at either host (each host has its own addresses).
const APP_PORT: u16 = 8480;

/// What the cutover at every rate shares.
struct CutoverEnv<'a> {
    net: &'a Net,
    rt: &'a tokio::runtime::Runtime,
    dir: PathBuf,
    pki: PathBuf,
    a: &'a RemoteProvider,
    b: &'a RemoteProvider,
    /// The release demo app.
    app: PathBuf,
}

/// The demo app cargo built beside the `fluidcloud` this benchmark starts.
fn demo_app() -> Result<PathBuf> {
    let app = Path::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .parent()
        .map(|release| release.join("examples/demo-app"))
        .ok_or_else(|| anyhow!("the fluidcloud binary has no directory"))?;
    if !app.exists() {
        bail!(
            "{} is missing: run `cargo build --release --example demo-app` first \
             (scripts/bench-hosts.sh does), or leave `{CUTOVER}` out of --only",
            app.display()
        );
    }
    Ok(app)
}

/// Rewrites the source volume when the engine reports its pre-copy done, before the next
/// step (stopping the source app) begins: the engine calls its observer synchronously
/// between steps. Then notes B's link counter, so the cutover's wire bytes can be told
/// from the pre-copy's.
struct ChangeAfterPrecopy {
    volume: PathBuf,
    blocks: Vec<u64>,
    base: u64,
    /// B's veth end on the bridge.
    link: String,
    /// How long the change took and the counter after it.
    changed: std::sync::Mutex<Option<Result<(f64, u64), String>>>,
}

impl fluidcloud::conduit::Observer for ChangeAfterPrecopy {
    fn step(
        &self,
        _relocation: &str,
        step: &fluidcloud::conduit::plan::Step,
        state: fluidcloud::conduit::journal::StepState,
        _detail: &str,
    ) {
        if step.name == "precopy:volume:data"
            && state == fluidcloud::conduit::journal::StepState::Done
        {
            let started = Instant::now();
            let outcome = change_blocks(&self.volume, &self.blocks, self.base)
                .map_err(|e| format!("cannot change {}: {e}", self.volume.display()))
                .map(|()| started.elapsed().as_secs_f64())
                .and_then(|took| {
                    qdisc_sent_bytes(None, &self.link)
                        .map(|wire| (took, wire))
                        .map_err(|e| e.to_string())
                });
            *self.changed.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        }
    }
}

impl fluidcloud::migrators::Observer for ChangeAfterPrecopy {
    fn transfer(&self, _relocation: &str, _step: &str, _progress: &fluidcloud::viaduct::Progress) {}
}

/// Asks `url` until it answers with a success, for up to 30 s; returns the body.
async fn wait_answer(url: &str) -> Result<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(r.text().await?);
            }
        }
        if Instant::now() > deadline {
            bail!("nothing answered {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step_secs(record: &fluidcloud::conduit::journal::RelocationRecord, name: &str) -> Option<f64> {
    let s = record.steps.iter().find(|s| s.name == name)?;
    Some(
        (s.finished_at? - s.started_at?)
            .to_std()
            .ok()?
            .as_secs_f64(),
    )
}

fn output_u64(
    record: &fluidcloud::conduit::journal::RelocationRecord,
    name: &str,
    key: &str,
) -> u64 {
    record
        .steps
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.output.get(key))
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// One cutover's figures.
struct CutRound {
    total: f64,
    precopy: f64,
    change: f64,
    downtime: f64,
    delta: f64,
    delta_sent: u64,
    delta_read: u64,
    delta_chunks: u64,
    precopy_sent: u64,
    /// What B's link carried towards B from the end of the pre-copy to the end.
    wire: u64,
    /// Seconds of each cutover step, in plan order.
    steps: Vec<(String, f64)>,
    /// The changed blocks, and what the target image allocates.
    changed: usize,
    alloc: u64,
    load: String,
}

/// `--repeat` cutovers at one rate, each of a fresh service (`shopIrN`: the demo app and a
/// volume of the plan's size) deployed on A's provider, its image built into the volume,
/// relocated to B's by the engine with 1 % of the volume changed between the pre-copy and
/// the cutover, then removed from both hosts; the part of the report they make.
fn cutover(env: &CutoverEnv, plan: &Plan, i: usize, repeat: usize) -> Result<String> {
    use std::fmt::Write;
    let mut rounds = Vec::new();
    for round in 1..=repeat {
        let service = format!("shop{i}r{round}");
        let result = cutover_run(env, plan, &service, i * 100 + round);
        // Whatever happened, nothing of the service stays running or allocated.
        env.rt.block_on(async {
            for p in [env.a, env.b] {
                let stop = fluidcloud::providers::StopOptions {
                    timeout: Duration::from_secs(5),
                    kill_after_timeout: true,
                };
                let _ = p.stop_app(&service, "web", stop).await;
                let _ = p.remove_app(&service, "web").await;
                if let Ok(op) = p.delete_volume(&service, "data").await {
                    let _ = wait_for(p, &op.id, Duration::from_secs(60)).await;
                }
            }
        });
        let _ = std::fs::remove_dir_all(env.dir.join(format!("daemon-{service}")));
        let r = result?;
        eprintln!(
            "  round {round}: total {:.2} s, pre-copy {:.2} s, downtime {:.3} s, final delta \
             {:.2} s sending {}",
            r.total,
            r.precopy,
            r.downtime,
            r.delta,
            mb(r.delta_sent)
        );
        rounds.push(r);
    }
    let first = &rounds[0];
    let pct = |b: u64| b as f64 * 100.0 / plan.size as f64;
    let m = |f: fn(&CutRound) -> f64| common::median(rounds.iter().map(f).collect());
    let downtime = m(|r| r.downtime);

    let mut s = String::new();
    writeln!(
        s,
        "Cutover: a service (the demo app, its configuration file and a {} raw volume with {} \
         allocated, built as the transfers' image is) relocated from A's agent to B's by the \
         relocation engine in this process (the daemon's side: providers `a` and `b` are the \
         agents, over mutual TLS), with pre-copy and a 1 s grace period; the volume's \
         pre-copy and final delta went agent to agent. Between the pre-copy and the stop of \
         the source app, {} of {} 1 MiB blocks (1 %, spread over the image) were rewritten \
         (\"change\"). Downtime: the source app's stop to the target app's health check \
         passing (from the journal, as in the same-host benchmark). {repeat} round(s), each \
         with a fresh service; every target image verified against the source with its \
         changes, and the app at B serves B's volume.",
        gib(plan.size),
        gib(first.alloc),
        first.changed,
        plan.size / MIB,
    )?;
    writeln!(s)?;
    writeln!(
        s,
        "| round | total s | pre-copy s | change s | downtime s | final delta s | delta sent \
         (payload) | % of image | wire towards B after the pre-copy | load at the start |"
    )?;
    writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )?;
    for (k, r) in rounds.iter().enumerate() {
        writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} | {} | {:.2} % | {} | {} |",
            k + 1,
            r.total,
            r.precopy,
            r.change,
            r.downtime,
            r.delta,
            mb(r.delta_sent),
            pct(r.delta_sent),
            mb(r.wire),
            r.load
        )?;
    }
    if rounds.len() > 1 {
        writeln!(
            s,
            "| median | {:.2} | {:.2} | {:.3} | {downtime:.3} | {:.2} | | | | |",
            m(|r| r.total),
            m(|r| r.precopy),
            m(|r| r.change),
            m(|r| r.delta)
        )?;
    }
    writeln!(s)?;
    let heading = if plan.bits_per_sec == 1e9 {
        "Target (at 1 Gbit/s)"
    } else {
        "The 1 Gbit/s target, for reference"
    };
    writeln!(
        s,
        "{heading}: downtime ≤ 1 s{}: {downtime:.3} s {}.",
        if rounds.len() > 1 { " (median)" } else { "" },
        mark(downtime <= 1.0)
    )?;
    writeln!(s)?;
    for (k, r) in rounds.iter().enumerate() {
        let steps: Vec<String> = r.steps.iter().map(|(n, t)| format!("{n} {t:.3}")).collect();
        writeln!(
            s,
            "- round {}: pre-copy sent {} (payload); the final delta read {} and sent {} \
             chunks; cutover steps (s): {}.",
            k + 1,
            mb(r.precopy_sent),
            mb(r.delta_read),
            r.delta_chunks,
            steps.join(", ")
        )?;
    }
    writeln!(s)?;
    Ok(s)
}

/// One cutover of `service`; `seed` picks the changed blocks and their data.
fn cutover_run(env: &CutoverEnv, plan: &Plan, service: &str, seed: usize) -> Result<CutRound> {
    use fluidcloud::conduit::engine::Engine;
    use fluidcloud::conduit::{RelocationRequest, RelocationState};

    // The daemon's side: its configuration and state in a directory of its own.
    let home = env.dir.join(format!("daemon-{service}"));
    std::fs::create_dir_all(&home)?;
    std::fs::write(
        home.join("demo.toml.in"),
        "listen = \"{app.web.host}:{app.web.port}\"\ndata_file = \"{volume.data.path}\"\n",
    )?;
    let pki = |f: &str| env.pki.join(f).display().to_string();
    let tls = format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki("ca.pem"),
        pki("bench.pem"),
        pki("bench-key.pem")
    );
    let agent = |h: &Host| format!("https://{}:7481", h.addr);
    let text = ConfigBuilder::new()
        .daemon("listen", "127.0.0.1:9")
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 5)
        .conduit("health_timeout_secs", 30)
        .provider("a", "local", "r", |p| p.set("agent", agent(&env.net.a)))
        .provider("b", "local", "r", |p| p.set("agent", agent(&env.net.b)))
        .policy("watch", "cheapest", "audit", |p| p)
        .service(service, "a", "watch", |s| {
            s.health_url(&format!("http://{{app.web.host}}:{APP_PORT}/health"), 30)
                // The quickstart's rules: the file is rewritten for each provider from the one
                // running at the source, the address it listens on included.
                .app(
                    "web",
                    &env.app.display().to_string(),
                    &["demo.toml"],
                    APP_PORT,
                )
                .config_file(
                    "demo.toml",
                    "demo.toml.in",
                    &[
                        (
                            r#"data_file = "[^"]*""#,
                            r#"data_file = "{volume.data.path}""#,
                        ),
                        (
                            r#"listen = "[^"]*""#,
                            r#"listen = "{app.web.host}:{app.web.port}""#,
                        ),
                    ],
                )
                .volume("data", plan.size as f64 / (1u64 << 30) as f64)
        })
        .raw(&tls)
        .render();
    let path = home.join("fluidcloud.toml");
    std::fs::write(&path, &text)?;
    let config = Arc::new(
        fluidcloud::config::Config::parse(&path, &text)
            .map_err(|e| anyhow!("the cutover's configuration: {e}"))?,
    );

    let source = env.dir.join(format!("a-root/volumes/{service}/data.raw"));
    let target = env.dir.join(format!("b-root/volumes/{service}/data.raw"));
    let blocks = one_percent_blocks(plan.size, 0xc07_0000 + seed as u64);
    let base = 2_000_000 + 10_000_000 * seed as u64;
    let hook = Arc::new(ChangeAfterPrecopy {
        volume: source.clone(),
        blocks: blocks.clone(),
        base,
        link: env.net.b.link.clone(),
        changed: std::sync::Mutex::new(None),
    });
    let observer: Arc<dyn fluidcloud::conduit::Observer> = hook.clone();
    // The engine spawns its tasks on the runtime it is opened in.
    let _runtime = env.rt.enter();
    let engine = Engine::open(config, None, Some(observer))
        .map_err(|e| anyhow!("cannot open the engine: {e}"))?;
    let at = |h: &Host, what: &str| format!("http://{}:{APP_PORT}{what}", h.addr);

    eprintln!(
        "{} cutover: deploying {service} on A, building its {} volume ...",
        plan.rate,
        gib(plan.size)
    );
    env.rt.block_on(async {
        engine
            .deploy(service, "a")
            .await
            .map_err(|e| anyhow!("cannot deploy `{service}` on `a`: {e}"))?;
        wait_answer(&at(&env.net.a, "/health")).await?;
        anyhow::Ok(())
    })?;
    if !source.is_file() {
        bail!("A's volume {service}/data is not at {}", source.display());
    }
    build_image(&source, plan.size, plan.allocated, 0x2545_f491_4f6c_dd1d)
        .context("cannot build the image")?;
    // What the target must hold: the source as it will be at the cutover.
    let expected = home.join("expected.raw");
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(&source)
        .arg(&expected)
        .status()?;
    if !cp.success() {
        bail!("cp --sparse=always {} failed: {cp}", source.display());
    }
    change_blocks(&expected, &blocks, base)?;
    let want = image_digest(&expected, DEFAULT_CHUNK_SIZE)?;
    std::fs::remove_file(&expected)?;
    let _ = Command::new("sync").status();
    pre_read(&source);
    let load = load_average();

    eprintln!(
        "{} cutover: relocating {service} from A to B ...",
        plan.rate
    );
    let request = RelocationRequest {
        decision_id: format!("bench-cutover-{service}"),
        service: service.to_string(),
        from: "a".into(),
        to: "b".into(),
        reason: "benchmark".into(),
        origin: "operator".into(),
    };
    let (record, downtime, served) = env.rt.block_on(async {
        let record = engine
            .run(request)
            .await
            .map_err(|e| anyhow!("the relocation was refused: {e}"))?;
        if record.state != RelocationState::Completed {
            let failed: Vec<String> = record
                .steps
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.name)))
                .collect();
            let app_log = env
                .dir
                .join(format!("b-root/apps/{service}/web/stderr.log"));
            bail!(
                "the relocation ended {}: {} {}\nA's log:\n{}\nB's log:\n{}\nThe app's \
                 errors at B:\n{}",
                record.state.as_str(),
                record.detail,
                failed.join("; "),
                log_tail(&env.dir, "a"),
                log_tail(&env.dir, "b"),
                std::fs::read_to_string(&app_log).unwrap_or_default()
            );
        }
        let downtime = engine
            .downtime(&record)
            .ok_or_else(|| anyhow!("the journal gives no downtime"))?;
        let served = wait_answer(&at(&env.net.b, "/config")).await?;
        anyhow::Ok((record, downtime.as_secs_f64(), served))
    })?;
    let wire_end = qdisc_sent_bytes(None, &env.net.b.link)?;
    let (change, wire_start) = match hook
        .changed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        Some(Ok(c)) => c,
        Some(Err(e)) => bail!(e),
        None => bail!("the engine never reported the pre-copy done"),
    };
    if !served.contains(&format!("b-root/volumes/{service}/data")) {
        bail!("after the relocation the app at B serves another data file: {served}");
    }
    if image_digest(&target, DEFAULT_CHUNK_SIZE)? != want {
        bail!(
            "{} differs from the source image with its changes",
            target.display()
        );
    }

    let first = record
        .steps
        .iter()
        .filter_map(|s| s.started_at)
        .min()
        .ok_or_else(|| anyhow!("the journal has no started step"))?;
    let committed = record
        .steps
        .iter()
        .find(|s| s.name == "commit")
        .and_then(|s| s.finished_at)
        .ok_or_else(|| anyhow!("the journal has no finished commit"))?;
    let total = (committed - first).to_std()?.as_secs_f64();
    let precopy = step_secs(&record, "precopy:volume:data").unwrap_or(0.0);
    let sync = "sync:volume:data";
    let delta = step_secs(&record, sync).unwrap_or(0.0);
    let delta_sent = output_u64(&record, sync, "bytes_sent");
    let delta_read = output_u64(&record, sync, "bytes_read");
    let delta_chunks = output_u64(&record, sync, "chunks_sent");
    let precopy_sent = output_u64(&record, "precopy:volume:data", "bytes_sent");
    let stop = record
        .steps
        .iter()
        .position(|s| s.name.starts_with("stop-source:"))
        .ok_or_else(|| anyhow!("the plan has no stop-source step"))?;
    let steps = record.steps[stop..]
        .iter()
        .take_while(|s| s.name != "commit")
        .map(|s| (s.name.clone(), step_secs(&record, &s.name).unwrap_or(0.0)))
        .collect();
    Ok(CutRound {
        total,
        precopy,
        change,
        downtime,
        delta,
        delta_sent,
        delta_read,
        delta_chunks,
        precopy_sent,
        wire: wire_end.saturating_sub(wire_start),
        steps,
        changed: blocks.len(),
        alloc: std::fs::metadata(&target)?.blocks() * 512,
        load,
    })
}
