//! A VM moved with a pre-copy of its disks between hosts, with the real binaries: an agent
//! in each of two network namespaces serves a qemu provider (`qa` on host a with qcow2
//! disks, `qb` on host b with raw ones), and `fluidcloud relocate` (in the test's namespace,
//! as the daemon's host) moves the busybox guest of the VM tests from a to b while it keeps
//! writing known blocks to its disk. The passes are read on host a by its agent and sent to
//! host b over the viaduct; at cutover the guest powers down, only what it wrote since the
//! last pass travels, and it boots at host b with every block it wrote. A daemon killed
//! during the final pass ends with the relocation rolled back and the guest serving again at
//! host a with every write.

use crate::common;
use crate::vm_live::{final_lines, power_down_for_hash, sha256, text, BOOT_LIMIT, DISK_BYTES};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agents::{Agent, Pki};
use common::config::{ConfigBuilder, Qemu};
use common::guest::{self, QemuEnv, SERVING_MARKER};
use common::netns::Hosts;
use common::servers::kill_from_pid_file;
use common::{bin, free_port};
use fluidcloud::conduit::journal::{Journal, StepRecord};
use fluidcloud::config::Config;
use fluidcloud::providers::{self, Provider};

/// Where provider `provider` (root `dir/PROVIDER-root`) keeps the state of VM `box/guest`.
fn vm_dir(dir: &Path, provider: &str) -> PathBuf {
    dir.join(format!("{provider}-root/vms/box/guest"))
}

/// Kills, when dropped, the emulators the agents started: they outlive their agent, and a
/// process left in a namespace keeps it alive.
struct Guests(PathBuf);

impl Drop for Guests {
    fn drop(&mut self) {
        for provider in ["qa", "qb"] {
            kill_from_pid_file(&vm_dir(&self.0, provider).join("pid"));
        }
    }
}

/// The `[providers.NAME]` section of an agent: a qemu provider under `NAME-root` keeping
/// `format` disks, on the machine of `vm_live` (virtio disks, an e1000 NIC), under TCG.
fn agent_provider(env: &QemuEnv, name: &str, format: &str) -> String {
    let qemu = Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
        .disk_bus("virtio")
        .nic_model("e1000")
        .powerdown_timeout_secs(60);
    let rendered = ConfigBuilder::new()
        .provider(name, "qemu", "lab", |p| {
            p.root(&format!("{name}-root"))
                .disk_format(format)
                .qemu(qemu)
        })
        .render();
    let mut table: toml::Table = rendered.parse().unwrap();
    table.remove("daemon");
    toml::to_string(&table).unwrap()
}

/// The regular files under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Two hosts with an agent each, the daemon's configuration moving VM `box/guest` from `qa`
/// to `qb` by pre-copy, and the guest running at host a on its disk (half random, half
/// zeros).
struct Lab {
    // Dropped in this order: the emulators, the agents, the namespaces, the files.
    _guests: Guests,
    a: Agent,
    b: Agent,
    hosts: Hosts,
    dir: tempfile::TempDir,
    /// The configuration with `{PORT}` for the daemon's.
    config_text: String,
    config: Config,
    /// The guest's HTTP port, forwarded at whichever host it runs.
    port: u16,
    disk: Vec<u8>,
}

impl Lab {
    async fn start() -> Option<Lab> {
        let env = QemuEnv::load();
        let hosts = Hosts::create(2)?;
        let dir = tempfile::tempdir().unwrap();
        let guests = Guests(dir.path().to_path_buf());
        let initrd = env.initramfs(dir.path());
        let pki = Pki::create(dir.path());
        let a = Agent::start(
            hosts.a(),
            dir.path(),
            &pki,
            "a",
            &agent_provider(&env, "qa", "qcow2"),
        );
        let b = Agent::start(
            hosts.b(),
            dir.path(),
            &pki,
            "b",
            &agent_provider(&env, "qb", "raw"),
        );
        a.wait_up(hosts.a());
        b.wait_up(hosts.b());
        let port = free_port();
        let append = format!("{} fc.hash=skip fc.writer=1", QemuEnv::append("serve", 80));
        let config_text = ConfigBuilder::new()
            .listen_on_placeholder_port()
            .broker_idle()
            .conduit("grace_period_secs", 1)
            .conduit("stop_timeout_secs", 60)
            .provider("qa", "qemu", "lab", |p| {
                p.disk_format("qcow2").set("agent", a.url.clone())
            })
            .provider("qb", "qemu", "lab", |p| {
                p.disk_format("raw").set("agent", b.url.clone())
            })
            .policy("watch", "cheapest", "audit", |p| p)
            .service("box", "qa", "watch", |s| {
                s.set("memory_gib", 0.1875).set("vm_mode", "precopy").vm(
                    "guest",
                    0.03125,
                    &env.kernel,
                    &initrd,
                    &append,
                    &[(80, port)],
                )
            })
            .raw(&pki.daemon_tls)
            .render();
        let path = dir.path().join("fluidcloud.toml");
        let text = config_text.replace("{PORT}", &free_port().to_string());
        std::fs::write(&path, &text).unwrap();
        let config = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));

        let qa = providers::open(&config.providers["qa"]).unwrap();
        let mut disk = vec![0u8; DISK_BYTES as usize];
        fastrand::Rng::with_seed(13).fill(&mut disk[..DISK_BYTES as usize / 2]);
        guest::write_disk(qa.as_ref(), "box", "guest", &disk, dir.path()).await;
        let spec = config.services["box"].components[0].vm().unwrap().clone();
        let op = qa.start_vm("box", &spec).await.unwrap();
        providers::wait_for(qa.as_ref(), &op.id, Duration::from_secs(120))
            .await
            .unwrap();
        guest::wait_for_console(
            &vm_dir(dir.path(), "qa").join("console.log"),
            SERVING_MARKER,
            BOOT_LIMIT,
        );
        Some(Lab {
            _guests: guests,
            a,
            b,
            hosts,
            dir,
            config_text,
            config,
            port,
            disk,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn provider(&self, name: &str) -> Arc<dyn Provider> {
        providers::open(&self.config.providers[name]).unwrap()
    }

    fn logs(&self) -> String {
        format!("agent a:\n{}\nagent b:\n{}", self.a.logs(), self.b.logs())
    }

    /// The boot id the guest serves at host a (`qa`) or b, if it answers.
    fn boot_at(&self, provider: &str) -> Option<String> {
        let host = if provider == "qa" {
            self.hosts.a().addr
        } else {
            self.hosts.b().addr
        };
        let url = format!("http://{host}:{}/boot", self.port);
        std::thread::spawn(move || common::http_get(&url))
            .join()
            .unwrap()
            .map(|b| b.trim().to_string())
    }

    /// The boot id of the guest at `provider` once it serves.
    fn serving_at(&self, provider: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(boot) = self.boot_at(provider) {
                return boot;
            }
            assert!(
                start.elapsed() < BOOT_LIMIT,
                "nothing serves at {provider} within {BOOT_LIMIT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `fluidcloud relocate box --to qb`, killing itself at the checkpoint `kill_at`.
    fn relocate(&self, kill_at: Option<&str>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(["relocate", "--config"])
            .arg(self.path("fluidcloud.toml"))
            .args(["box", "--to", "qb"])
            .env_remove("FLUIDCLOUD_KILL_AT")
            .stdin(Stdio::null());
        if let Some(k) = kill_at {
            cmd.env("FLUIDCLOUD_KILL_AT", k);
        }
        cmd.output().unwrap()
    }

    /// Watches the source's console from now on, until `ended`: the line the guest printed
    /// when it powered down there, if it did.
    fn watch_source(&self, ended: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<String>> {
        watch_console(vm_dir(self.dir.path(), "qa").join("console.log"), ended)
    }

    /// The steps of the last relocation.
    fn steps(&self) -> Vec<StepRecord> {
        let journal = Journal::open(&self.path("state/journal.sqlite")).unwrap();
        journal.list().unwrap().pop().expect("a relocation").steps
    }
}

/// Watches `console` from now on (it goes with its VM), until `ended`: the first final line
/// the guest printed on it, if it did.
fn watch_console(
    console: PathBuf,
    ended: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<String>> {
    std::thread::spawn(move || loop {
        let done = ended.load(Ordering::Relaxed);
        if let Some(l) = final_lines(&console).first() {
            return Some(l.clone());
        }
        if done {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    })
}

fn output<'a>(steps: &'a [StepRecord], name: &str) -> &'a serde_json::Value {
    &steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .output
}

/// The FINAL line a guest printed: its disk's hash and the blocks its writer wrote.
fn final_line(line: &str) -> (String, usize) {
    let mut words = line.split_whitespace();
    let hash = words.next().unwrap().to_string();
    let n = words
        .next()
        .and_then(|w| w.strip_prefix("written="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no written count in {line:?}"));
    (hash, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_precopied_between_hosts_powers_down_only_for_its_last_writes_and_loses_none() {
    let _one = guest::ONE_VM.lock().await;
    let Some(lab) = Lab::start().await else {
        return;
    };
    let boot = lab.serving_at("qa");

    let ended = Arc::new(AtomicBool::new(false));
    let watched = lab.watch_source(ended.clone());
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| lab.relocate(None));
    ended.store(true, Ordering::Relaxed);
    let said = text(&out);
    eprintln!("relocated in {:?}:\n{said}", started.elapsed());
    assert!(out.status.success(), "{said}\n{}", lab.logs());
    assert!(said.contains("completed"), "{said}\n{}", lab.logs());
    assert!(!said.contains("moves cold"), "{said}");

    // The whole disk travelled host to host while the guest ran, in passes; the cutover
    // sent only what its last writes changed.
    let steps = lab.steps();
    let pre = output(&steps, "precopy:vm:guest");
    let fin = output(&steps, "final-pass:vm:guest");
    eprintln!("pre-copy: {pre}\nfinal pass: {fin}");
    let data = DISK_BYTES / 2;
    assert!(
        pre["bytes_read"].as_u64().unwrap() >= data,
        "the pre-copy read less than the disk's data: {pre}"
    );
    let passes = pre["passes"].as_array().unwrap();
    assert!(passes.len() >= 2, "{pre}");
    // The first pass put the disk's data on the wire (its zeros are not sent); the later
    // ones only what changed.
    let first_sent = passes[0]["bytes_sent"].as_u64().unwrap();
    assert!(first_sent >= data / 2, "{pre}");
    assert_eq!(
        pre["to"].as_str().unwrap(),
        format!("{}:7482", lab.hosts.b().addr)
    );
    assert!(pre["from"]
        .as_str()
        .unwrap()
        .contains(&lab.hosts.a().addr.to_string()));
    let last_sent = fin["bytes_sent"].as_u64().unwrap();
    assert!(
        last_sent < DISK_BYTES / 8,
        "the final pass sent {last_sent} bytes of a {DISK_BYTES}-byte disk: {fin}"
    );
    assert!(fin["bytes_read"].as_u64().unwrap() < data / 4, "{fin}");
    assert_eq!(fin["halted"], "powered_down", "{fin}");
    let disk_out = &fin["disks"][0];
    assert_eq!(disk_out["incremental"], true, "{fin}");
    assert!(
        disk_out["verified_at_source"]
            .as_str()
            .unwrap()
            .contains("compare"),
        "{fin}"
    );

    // The source powered down cleanly with every block its writer wrote...
    let line = watched
        .join()
        .unwrap()
        .expect("the guest powered down at host a");
    let (source_hash, n1) = final_line(&line);
    let at_power_down = guest::after_writer(&lab.disk, n1);
    assert_eq!(source_hash, sha256(&at_power_down));
    // ...and the VM booted at host b from that disk, and wrote on.
    let target_boot = lab.serving_at("qb");
    assert_ne!(target_boot, boot, "the guest boots again at the target");
    let qb = lab.provider("qb");
    let console = vm_dir(lab.dir.path(), "qb").join("console.log");
    let (hash, n2) = power_down_for_hash(qb.as_ref(), "qb", &console).await;
    let want = sha256(&guest::after_writer(&at_power_down, n2));
    assert_eq!(hash, want, "the guest's disk at host b ({n2} blocks)");
    assert_eq!(
        guest::sha256_file(&lab.path("qb-root/volumes/box/guest.raw")),
        want
    );

    // The halted source emulator ended after the commit, its disk after the grace period;
    // no staging image is left at either host.
    let qa = lab.provider("qa");
    assert!(qa.vm_status("box", "guest").await.unwrap().is_none());
    assert!(!lab.path("qa-root/volumes/box/guest.qcow2").exists());
    for staging in ["a-state/precopy", "b-state/incoming"] {
        // The directories the passes went through, so that an empty listing means emptied.
        assert!(
            lab.path(staging).is_dir(),
            "{staging} is not where passes go"
        );
        let left = files_under(&lab.path(staging));
        assert!(left.is_empty(), "left in {staging}: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_killed_during_a_precopy_between_hosts_leaves_one_guest_with_every_write() {
    let _one = guest::ONE_VM.lock().await;
    let mut outcomes = Vec::new();
    for (point, expected) in [
        ("precopy:vm:guest:running", "completed"),
        ("final-pass:vm:guest:running", "rolled_back"),
        ("final-pass:vm:guest:done", "rolled_back"),
    ] {
        let Some(lab) = Lab::start().await else {
            return;
        };
        let boot = lab.serving_at("qa");
        let ended = Arc::new(AtomicBool::new(false));
        let watched = lab.watch_source(ended.clone());
        let out = tokio::task::block_in_place(|| lab.relocate(Some(point)));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "{point}: {}\n{}",
            text(&out),
            lab.logs()
        );
        // A daemon takes the relocation over: a pre-copy is run again from its start; a
        // cutover that was not proven is rolled back.
        let last = tokio::task::block_in_place(|| {
            let mut d = common::Daemon::start(lab.dir.path(), &lab.config_text);
            d.eventually("the relocation to end", Duration::from_secs(300), |d| {
                let r = d.get("/v1/relocations");
                let last = r.as_array()?.last()?.clone();
                let state = last["state"].as_str()?.to_string();
                matches!(state.as_str(), "completed" | "rolled_back" | "failed").then_some(last)
            })
        });
        ended.store(true, Ordering::Relaxed);
        assert_eq!(last["state"], expected, "{point}: {last}\n{}", lab.logs());
        let (here, there) = if expected == "completed" {
            ("qb", "qa")
        } else {
            ("qa", "qb")
        };

        // When the guest powered down at host a (for the final pass) it booted again, at
        // host b or back at host a, its disk holding every block it had written; when it
        // was never halted, it runs on at host a as it was.
        let before = match watched.join().unwrap() {
            Some(line) => {
                let (h, n1) = final_line(&line);
                let at = guest::after_writer(&lab.disk, n1);
                assert_eq!(h, sha256(&at), "{point}: the source's disk at power-down");
                assert_ne!(
                    lab.serving_at(here),
                    boot,
                    "{point}: the guest booted again"
                );
                at
            }
            // Killed before the guest was halted: it never stopped.
            None => {
                assert_eq!(here, "qa", "{point}");
                assert_eq!(lab.boot_at(here), Some(boot.clone()), "{point}");
                lab.disk.clone()
            }
        };
        let other = lab.provider(there);
        let status = other.vm_status("box", "guest").await.unwrap();
        assert!(
            status.as_ref().is_none_or(|s| s.pid.is_none()),
            "{point}: a VM still runs at {there}: {status:?}"
        );
        if expected == "rolled_back" {
            assert!(
                other.volume_info("box", "guest").await.unwrap().is_none(),
                "{point}: the target kept the disk"
            );
        }
        for staging in ["a-state/precopy", "b-state/incoming"] {
            let left = files_under(&lab.path(staging));
            assert!(left.is_empty(), "{point}: left in {staging}: {left:?}");
        }

        // Every block it wrote before and after is on its disk where it runs.
        let p = lab.provider(here);
        let console = vm_dir(lab.dir.path(), here).join("console.log");
        let (hash, n2) = power_down_for_hash(p.as_ref(), here, &console).await;
        assert_eq!(
            hash,
            sha256(&guest::after_writer(&before, n2)),
            "{point}: the guest's disk at {here} ({n2} blocks)"
        );
        outcomes.push(format!("{point} -> {expected} at {here}"));
    }
    eprintln!("{outcomes:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_precopied_from_an_agents_host_to_the_daemons_and_back_keeps_every_write() {
    let _one = guest::ONE_VM.lock().await;
    let env = QemuEnv::load();
    let Some(hosts) = Hosts::create(2) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _guests = Guests(dir.path().to_path_buf());
    // The daemon's own emulator, too.
    struct Own(PathBuf);
    impl Drop for Own {
        fn drop(&mut self) {
            kill_from_pid_file(&self.0);
        }
    }
    let _own = Own(vm_dir(dir.path(), "q0").join("pid"));
    let initrd = env.initramfs(dir.path());
    let pki = Pki::create(dir.path());
    let a = Agent::start(
        hosts.a(),
        dir.path(),
        &pki,
        "a",
        &agent_provider(&env, "qa", "qcow2"),
    );
    a.wait_up(hosts.a());
    let qemu = Qemu::tcg(&env.qemu, &env.firmware, std::slice::from_ref(&env.libs))
        .disk_bus("virtio")
        .nic_model("e1000")
        .powerdown_timeout_secs(60);
    let port = free_port();
    let append = format!("{} fc.hash=skip fc.writer=1", QemuEnv::append("serve", 80));
    let path = dir.path().join("fluidcloud.toml");
    let text_of_config = ConfigBuilder::new()
        .broker_idle()
        .conduit("grace_period_secs", 1)
        .conduit("stop_timeout_secs", 60)
        .provider("qa", "qemu", "lab", |p| {
            p.disk_format("qcow2").set("agent", a.url.clone())
        })
        .provider("q0", "qemu", "lab", |p| {
            p.root("q0-root").disk_format("raw").qemu(qemu)
        })
        .policy("watch", "cheapest", "audit", |p| p)
        .service("box", "qa", "watch", |s| {
            s.set("memory_gib", 0.1875).set("vm_mode", "precopy").vm(
                "guest",
                0.03125,
                &env.kernel,
                &initrd,
                &append,
                &[(80, port)],
            )
        })
        .raw(&pki.daemon_tls)
        .write(&path);
    let config = Config::parse(&path, &text_of_config).unwrap_or_else(|e| panic!("{e}"));
    let qa = providers::open(&config.providers["qa"]).unwrap();
    let mut disk = vec![0u8; DISK_BYTES as usize];
    fastrand::Rng::with_seed(17).fill(&mut disk[..DISK_BYTES as usize / 2]);
    guest::write_disk(qa.as_ref(), "box", "guest", &disk, dir.path()).await;
    let spec = config.services["box"].components[0].vm().unwrap().clone();
    let op = qa.start_vm("box", &spec).await.unwrap();
    providers::wait_for(qa.as_ref(), &op.id, Duration::from_secs(120))
        .await
        .unwrap();
    let console = |p: &str| vm_dir(dir.path(), p).join("console.log");
    guest::wait_for_console(&console("qa"), SERVING_MARKER, BOOT_LIMIT);
    // The source's console goes with its VM at the decommission: it is watched during the
    // move.
    let relocate = |to: &str, from: &str| {
        let ended = Arc::new(AtomicBool::new(false));
        let watched = watch_console(console(from), ended.clone());
        let out = Command::new(bin())
            .args(["relocate", "--config"])
            .arg(&path)
            .args(["box", "--to", to])
            .env_remove("FLUIDCLOUD_KILL_AT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        ended.store(true, Ordering::Relaxed);
        let line = watched
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("the guest never powered down at {from}"));
        let said = text(&out);
        assert!(
            out.status.success() && said.contains("completed"),
            "to {to}: {said}\n{}",
            a.logs()
        );
        let journal = Journal::open(&dir.path().join("state/journal.sqlite")).unwrap();
        let steps = journal.list().unwrap().pop().unwrap().steps;
        let pre = output(&steps, "precopy:vm:guest").clone();
        let fin = output(&steps, "final-pass:vm:guest").clone();
        eprintln!("to {to}:\npre-copy: {pre}\nfinal pass: {fin}");
        assert!(pre["passes"].as_array().unwrap().len() >= 2, "{pre}");
        assert!(
            pre["bytes_sent"].as_u64().unwrap() >= DISK_BYTES / 4,
            "{pre}"
        );
        assert!(
            fin["bytes_sent"].as_u64().unwrap() < DISK_BYTES / 8,
            "{fin}"
        );
        assert_eq!(fin["halted"], "powered_down", "{fin}");
        (pre, fin, final_line(&line))
    };

    // From host a to the daemon's host: host a's agent reads and sends, the daemon
    // receives on its address toward host a.
    let (pre, _, (h, n1)) = tokio::task::block_in_place(|| relocate("q0", "qa"));
    assert_eq!(pre["from"], hosts.a().addr.to_string(), "{pre}");
    let at_a = guest::after_writer(&disk, n1);
    assert_eq!(h, sha256(&at_a), "the disk at host a at power-down");
    guest::wait_for_console(&console("q0"), SERVING_MARKER, BOOT_LIMIT);
    assert!(!dir.path().join("qa-root/volumes/box/guest.qcow2").exists());
    // Its writer writes at the daemon's host for a while before it moves back.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // And back: the daemon reads its own emulator's passes and sends them to host a.
    let (pre, fin, (h, n2)) = tokio::task::block_in_place(|| relocate("qa", "q0"));
    assert_eq!(pre["from"], "this host", "{pre}");
    assert_eq!(pre["to"], format!("{}:7482", hosts.a().addr), "{pre}");
    // A raw image into host a's qcow2 volume: converted there.
    assert_eq!(
        fin["disks"][0]["adopted"]["method"], "qemu-img convert",
        "{fin}"
    );
    assert!(n1 > 0 && n2 > 0, "the writer wrote {n1} and {n2} blocks");
    let at_q0 = guest::after_writer(&at_a, n2);
    assert_eq!(
        h,
        sha256(&at_q0),
        "the disk at the daemon's host at power-down"
    );
    // The emulator at host a is a new one, with a new console.
    guest::wait_for_console(&console("qa"), SERVING_MARKER, BOOT_LIMIT);
    let (hash, n3) = power_down_for_hash(qa.as_ref(), "qa", &console("qa")).await;
    assert_eq!(
        hash,
        sha256(&guest::after_writer(&at_q0, n3)),
        "the guest's disk back at host a ({n3} blocks)"
    );
    // No staging or staged image is left on either host.
    let left: Vec<PathBuf> = files_under(dir.path())
        .into_iter()
        .filter(|p| {
            let name = p.to_string_lossy();
            name.ends_with(".precopy.raw") || name.ends_with(".img") || name.ends_with(".partial")
        })
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}
