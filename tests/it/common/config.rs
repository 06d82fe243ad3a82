//! `fluidcloud.toml` for the tests and benchmarks, built with typed methods and rendered to
//! TOML text, so every test still goes through the daemon's own parser:
//!
//! ```ignore
//! let text = ConfigBuilder::new()
//!     .listen_on_placeholder_port()
//!     .provider_local("a", "us-east-1")
//!     .policy("watch", "cheapest", "audit", |p| p)
//!     .service("shop", "a", "watch", |s| s.volume("data", 1.0))
//!     .render();
//! ```
//!
//! Strings may hold the placeholders `Daemon::start` fills in (`{DIR}`, `{PORT}`, `{REPO}`).
//! Tests about the TOML itself (bad input, positions of errors) write their text by hand.
//! Shared with the benchmarks through `#[path]`, so it uses nothing else of `common`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// The repository's `policies/NAME.rhai`.
pub fn policy_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(format!("{name}.rhai"))
        .display()
        .to_string()
}

/// A TOML table filled key by key; the settings of a component, a provider's pricing or
/// driver table.
#[derive(Clone, Debug, Default)]
pub struct Section(Table);

impl Section {
    pub fn new() -> Section {
        Section::default()
    }

    /// Any key: `&str`, `String`, `i64`, `f64`, `bool`, `Vec<_>`, or a `toml::Value`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Section {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// A nested table.
    pub fn table(self, key: &str, f: impl FnOnce(Section) -> Section) -> Section {
        let inner = f(self.get_table(key));
        self.set(key, Value::Table(inner.0))
    }

    fn get_table(&self, key: &str) -> Section {
        match self.0.get(key) {
            Some(Value::Table(t)) => Section(t.clone()),
            _ => Section::new(),
        }
    }
}

impl From<Section> for Value {
    fn from(s: Section) -> Value {
        Value::Table(s.0)
    }
}

/// An inline table from key-value pairs: `table([("guest", 80.into()), ("host", 8080.into())])`.
pub fn table<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A provider: `driver`, `region`, and what its driver takes.
#[derive(Clone, Debug)]
pub struct Provider(Section);

impl Provider {
    pub fn set(self, key: &str, value: impl Into<Value>) -> Provider {
        Provider(self.0.set(key, value))
    }
    pub fn cloud(self, cloud: &str) -> Provider {
        self.set("cloud", cloud)
    }
    pub fn root(self, root: &str) -> Provider {
        self.set("root", root)
    }
    pub fn disk_format(self, format: &str) -> Provider {
        self.set("disk_format", format)
    }
    /// The `[providers.NAME.pricing]` table: `format`, `url` and what else `f` sets.
    pub fn pricing(self, format: &str, url: &str, f: impl FnOnce(Section) -> Section) -> Provider {
        Provider(
            self.0
                .table("pricing", |p| f(p.set("format", format).set("url", url))),
        )
    }
    /// The driver's own table (`s3`, `swift`, `qemu`, `benchmark`…).
    pub fn table(self, key: &str, f: impl FnOnce(Section) -> Section) -> Provider {
        Provider(self.0.table(key, f))
    }
    /// The `qemu` driver's table.
    pub fn qemu(self, qemu: Qemu) -> Provider {
        self.set("qemu", qemu.0)
    }
}

/// The `qemu` driver's table: the emulator, where it finds its firmware and libraries, and
/// how the guests it starts are wired.
#[derive(Clone, Debug)]
pub struct Qemu(Section);

impl Qemu {
    /// `binary` under TCG (no KVM needed), with `firmware_dirs` and `library_path`.
    pub fn tcg(binary: &Path, firmware_dirs: &[PathBuf], library_path: &[PathBuf]) -> Qemu {
        Qemu(
            Section::new()
                .set("binary", path_text(binary))
                .set("firmware_dirs", paths(firmware_dirs))
                .set("library_path", paths(library_path))
                .set("accel", "tcg"),
        )
    }
    pub fn set(self, key: &str, value: impl Into<Value>) -> Qemu {
        Qemu(self.0.set(key, value))
    }
    /// The bus the guests' disks hang on (`virtio`, `sata`…).
    pub fn disk_bus(self, bus: &str) -> Qemu {
        self.set("disk_bus", bus)
    }
    /// The guests' network card (`virtio-net-pci`, `e1000`, `none`).
    pub fn nic_model(self, nic: &str) -> Qemu {
        self.set("nic_model", nic)
    }
    pub fn powerdown_timeout_secs(self, secs: u64) -> Qemu {
        self.set("powerdown_timeout_secs", secs as i64)
    }
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

fn paths(paths: &[PathBuf]) -> Vec<Value> {
    paths.iter().map(|p| Value::from(path_text(p))).collect()
}

/// A policy: its script, mode and rails.
#[derive(Clone, Debug)]
pub struct Policy(Section);

impl Policy {
    pub fn set(self, key: &str, value: impl Into<Value>) -> Policy {
        Policy(self.0.set(key, value))
    }
    pub fn confirmations(self, n: i64) -> Policy {
        self.set("confirmations", n)
    }
    pub fn min_residency_secs(self, secs: i64) -> Policy {
        self.set("min_residency_secs", secs)
    }
    pub fn move_duration_secs(self, secs: i64) -> Policy {
        self.set("move_duration_secs", secs)
    }
    pub fn cooldown_secs(self, secs: i64) -> Policy {
        self.set("cooldown_secs", secs)
    }
}

/// A service: where it runs, its size, health check and components.
#[derive(Clone, Debug)]
pub struct Service {
    table: Section,
    components: Vec<Value>,
}

impl Service {
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Service {
        self.table = self.table.set(key, value);
        self
    }
    pub fn size(self, vcpus: i64, memory_gib: f64) -> Service {
        self.set("vcpus", vcpus).set("memory_gib", memory_gib)
    }
    pub fn pinned(self) -> Service {
        self.set("pinned", true)
    }
    pub fn health_url(self, url: &str, timeout_secs: i64) -> Service {
        self.set(
            "health_check",
            table([("url", url.into()), ("timeout_secs", timeout_secs.into())]),
        )
    }
    pub fn health_command(self, command: &[&str], timeout_secs: i64) -> Service {
        let command: Vec<Value> = command.iter().map(|c| Value::from(*c)).collect();
        self.set(
            "health_check",
            table([
                ("command", command.into()),
                ("timeout_secs", timeout_secs.into()),
            ]),
        )
    }
    /// Any component: `kind`, `name` and what `f` sets (`size_gib`, `provider`, `settings`).
    pub fn component(
        mut self,
        kind: &str,
        name: &str,
        f: impl FnOnce(Section) -> Section,
    ) -> Service {
        let c = f(Section::new().set("kind", kind).set("name", name));
        self.components.push(c.into());
        self
    }
    pub fn volume(self, name: &str, size_gib: f64) -> Service {
        self.component("volume", name, |c| c.set("size_gib", size_gib))
    }
    pub fn bucket(self, name: &str, size_gib: f64) -> Service {
        self.component("bucket", name, |c| c.set("size_gib", size_gib))
    }
    /// A bucket that lives at another provider than the service.
    pub fn bucket_at(self, name: &str, size_gib: f64, provider: &str) -> Service {
        self.component("bucket", name, |c| {
            c.set("size_gib", size_gib).set("provider", provider)
        })
    }
    /// An app: a command with its arguments, listening on `port`.
    pub fn app(self, name: &str, command: &str, args: &[&str], port: u16) -> Service {
        let args: Vec<Value> = args.iter().map(|a| Value::from(*a)).collect();
        self.component("app", name, |c| {
            c.table("settings", |s| {
                s.set("command", command)
                    .set("args", args)
                    .set("port", i64::from(port))
            })
        })
    }
    /// The demo app (`examples/demo-app` at `app`) as component `web` on `port`, reading
    /// `demo.toml`, which is rendered from the template `demo.toml.in` with its `data_file`
    /// pointed at volume `data` of `volume_gib`. The service's other components (buckets)
    /// and its health check are the caller's.
    pub fn demo_app_with_data(self, app: &Path, port: u16, volume_gib: f64) -> Service {
        self.app("web", &path_text(app), &["demo.toml"], port)
            .config_file(
                "demo.toml",
                "demo.toml.in",
                &[(
                    r#"data_file = "[^"]*""#,
                    r#"data_file = "{volume.data.path}""#,
                )],
            )
            .volume("data", volume_gib)
    }
    /// A VM booting `kernel` with `initrd` and the command line `append`, its disk of
    /// `size_gib`, and `(guest, host)` ports forwarded from the host's loopback (host port
    /// 0: one the provider picks).
    pub fn vm(
        self,
        name: &str,
        size_gib: f64,
        kernel: &Path,
        initrd: &Path,
        append: &str,
        ports: &[(u16, u16)],
    ) -> Service {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(guest, host)| match host {
                0 => table([("guest", i64::from(*guest).into())]),
                _ => table([
                    ("guest", i64::from(*guest).into()),
                    ("host", i64::from(*host).into()),
                ]),
            })
            .collect();
        self.component("vm", name, |c| {
            c.set("size_gib", size_gib).table("settings", |s| {
                s.set("kernel", path_text(kernel))
                    .set("initrd", path_text(initrd))
                    .set("append", append)
                    .set("ports", ports)
            })
        })
    }
    /// A configuration file from `template`, with `(match, replace)` rewrite rules.
    pub fn config_file(self, name: &str, template: &str, rules: &[(&str, &str)]) -> Service {
        let rules: Vec<Value> = rules
            .iter()
            .map(|(m, r)| table([("match", (*m).into()), ("replace", (*r).into())]))
            .collect();
        self.component("config", name, |c| {
            c.table("settings", |s| {
                s.set("template", template).set("rules", rules)
            })
        })
    }
}

/// A whole `fluidcloud.toml`.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    root: Section,
    services: Vec<(String, Service)>,
    raw: String,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder::new()
    }
}

impl ConfigBuilder {
    /// `[daemon] state_dir = "state"` (beside the configuration file) and nothing else.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            root: Section::new().table("daemon", |d| d.set("state_dir", "state")),
            services: Vec::new(),
            raw: String::new(),
        }
    }

    /// The daemon's state under `{DIR}/state` and its API on `127.0.0.1:{PORT}`, both filled
    /// in by `Daemon::start`.
    pub fn for_daemon() -> ConfigBuilder {
        ConfigBuilder::new()
            .daemon("state_dir", "{DIR}/state")
            .daemon("listen", "127.0.0.1:{PORT}")
    }

    /// The daemon listens on `{PORT}` (filled in by `Daemon::start`).
    pub fn listen_on_placeholder_port(self) -> ConfigBuilder {
        self.daemon("listen", "127.0.0.1:{PORT}")
    }

    /// `key` of the top-level `[table]` (`regions`, `daemon`…).
    pub fn set(mut self, table: &str, key: &str, value: impl Into<Value>) -> ConfigBuilder {
        self.root = self.root.table(table, |t| t.set(key, value));
        self
    }

    pub fn daemon(self, key: &str, value: impl Into<Value>) -> ConfigBuilder {
        self.set("daemon", key, value)
    }
    pub fn broker(self, key: &str, value: impl Into<Value>) -> ConfigBuilder {
        self.set("broker", key, value)
    }
    pub fn conduit(self, key: &str, value: impl Into<Value>) -> ConfigBuilder {
        self.set("conduit", key, value)
    }

    /// The broker never evaluates on its own (once a year, on 1 January).
    pub fn broker_idle(self) -> ConfigBuilder {
        self.broker("evaluate_schedule", "0 0 0 1 1 *")
    }

    /// The broker evaluates every second, may move every service at once.
    pub fn broker_every_second(self) -> ConfigBuilder {
        self.broker("evaluate_schedule", "* * * * * *")
            .broker("max_relocations_percent", 100)
    }

    /// A provider of any driver; `f` adds the rest.
    pub fn provider(
        mut self,
        name: &str,
        driver: &str,
        region: &str,
        f: impl FnOnce(Provider) -> Provider,
    ) -> ConfigBuilder {
        let p = f(Provider(
            Section::new().set("driver", driver).set("region", region),
        ));
        self.root = self.root.table("providers", |ps| ps.set(name, p.0));
        self
    }

    /// A `local` provider under `providers/NAME`.
    pub fn provider_local(self, name: &str, region: &str) -> ConfigBuilder {
        self.provider_local_with(name, region, |p| p)
    }

    /// A `local` provider under `providers/NAME`; `f` adds the rest.
    pub fn provider_local_with(
        self,
        name: &str,
        region: &str,
        f: impl FnOnce(Provider) -> Provider,
    ) -> ConfigBuilder {
        let root = format!("providers/{name}");
        self.provider(name, "local", region, |p| f(p.root(&root)))
    }

    /// A policy running the repository's `policies/SCRIPT.rhai` in `mode`.
    pub fn policy(
        self,
        name: &str,
        script: &str,
        mode: &str,
        f: impl FnOnce(Policy) -> Policy,
    ) -> ConfigBuilder {
        self.policy_file(name, &policy_path(script), |p| f(p.set("mode", mode)))
    }

    /// A policy running the script at `file`; `f` adds the rest.
    pub fn policy_file(
        mut self,
        name: &str,
        file: &str,
        f: impl FnOnce(Policy) -> Policy,
    ) -> ConfigBuilder {
        let p = f(Policy(Section::new().set("file", file)));
        self.root = self.root.table("policies", |ps| ps.set(name, p.0));
        self
    }

    /// A service on `provider` under `policy`; `f` adds its size and components.
    pub fn service(
        mut self,
        name: &str,
        provider: &str,
        policy: &str,
        f: impl FnOnce(Service) -> Service,
    ) -> ConfigBuilder {
        let s = f(Service {
            table: Section::new()
                .set("provider", provider)
                .set("policy", policy),
            components: Vec::new(),
        });
        self.services.retain(|(n, _)| n != name);
        self.services.push((name.to_string(), s));
        self
    }

    /// TOML text appended as it is, after what the builder renders (it must not reopen a
    /// table the builder wrote).
    pub fn raw(mut self, text: &str) -> ConfigBuilder {
        self.raw.push('\n');
        self.raw.push_str(text);
        self
    }

    /// The configuration as TOML text.
    pub fn render(&self) -> String {
        let mut root = self.root.clone();
        for (name, s) in &self.services {
            let mut t = s.table.clone();
            if !s.components.is_empty() {
                t = t.set("components", s.components.clone());
            }
            root = root.table("services", |ss| ss.set(name, t));
        }
        let mut text = toml::to_string(&root.0).expect("a TOML table renders");
        text.push_str(&self.raw);
        text
    }

    /// Renders into `path`.
    pub fn write(&self, path: &Path) -> String {
        let text = self.render();
        std::fs::write(path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        text
    }
}
