//! The `[services.NAME]` sections: where a service runs, under which policy, its
//! components (with their settings read by [`super::components`]), health check and hooks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::raw::{RawHook, RawLive, RawService};
use super::{check_name, components, list, PolicySpec, Provider, SettingsError, Validator};
use crate::model::names::{validate_file_name, validate_name};
use crate::model::{
    Component, ComponentKind, ComponentSettings, HealthCheck, HookSpec, HookTarget, LiveFallback,
    Requirements, ServiceSpec, VmMoves,
};

impl Validator<'_> {
    pub(super) fn service(
        &mut self,
        name: &str,
        raw: RawService,
        providers: &BTreeMap<String, Provider>,
        policies: &BTreeMap<String, PolicySpec>,
    ) -> ServiceSpec {
        let key = format!("services.{name}");
        check_name(self, &key, name);
        if !providers.contains_key(&raw.provider) {
            self.err(
                format!("{key}.provider"),
                format!(
                    "unknown provider `{}`; configured providers: {}",
                    raw.provider,
                    list(providers.keys())
                ),
            );
        }
        if !policies.contains_key(&raw.policy) {
            self.err(
                format!("{key}.policy"),
                format!(
                    "unknown policy `{}`; configured policies: {}",
                    raw.policy,
                    list(policies.keys())
                ),
            );
        }
        // Components as written; their settings are read once the service's requirements
        // (a VM's CPUs and memory) are known.
        let mut written = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let (mut vcpus, mut memory) = (0u32, 0.0f64);
        let mut unknown_kinds = BTreeSet::new();
        for (i, c) in raw.components.into_iter().enumerate() {
            let ck = format!("{key}.components[{i}]");
            let kind = match c.kind.as_str() {
                "vm" => ComponentKind::Vm,
                "volume" => ComponentKind::Volume,
                "bucket" => ComponentKind::Bucket,
                "app" => ComponentKind::App,
                "config" => ComponentKind::Config,
                other => {
                    self.err(
                        format!("{ck}.kind"),
                        format!("`{other}` is not one of vm, volume, bucket, app, config"),
                    );
                    unknown_kinds.insert(i);
                    ComponentKind::App
                }
            };
            let name_ok = if kind == ComponentKind::Config {
                validate_file_name(&c.name)
            } else {
                validate_name(&c.name)
            };
            if let Err(reason) = name_ok {
                self.err(format!("{ck}.name"), reason);
            }
            if !seen.insert(c.name.clone()) {
                self.err(
                    format!("{ck}.name"),
                    format!("component name `{}` is used twice in this service", c.name),
                );
            }
            if let Some(n) = c.vcpus {
                if n == 0 {
                    self.err(format!("{ck}.vcpus"), "must be at least 1, got 0");
                }
            }
            if c.memory_gib.is_some() {
                self.positive(&format!("{ck}.memory_gib"), c.memory_gib, 1.0);
            }
            let size_gib = self.non_negative(&format!("{ck}.size_gib"), c.size_gib, 0.0);
            if matches!(kind, ComponentKind::Volume | ComponentKind::Bucket) && c.size_gib.is_none()
            {
                self.err(
                    format!("{ck}.size_gib"),
                    format!(
                        "a {} needs `size_gib` to price storage and the move",
                        kind.as_str()
                    ),
                );
            }
            if c.keep_at_source && kind != ComponentKind::Bucket {
                self.err(
                    format!("{ck}.keep_at_source"),
                    "only a bucket can be kept at the source",
                );
            }
            if let Some(home) = &c.provider {
                match providers.get(home) {
                    _ if kind != ComponentKind::Bucket => self.err(
                        format!("{ck}.provider"),
                        "only a bucket can live at a provider of its own",
                    ),
                    None => self.err(
                        format!("{ck}.provider"),
                        format!(
                            "unknown provider `{home}`; configured providers: {}",
                            list(providers.keys())
                        ),
                    ),
                    Some(p) if !p.driver.has_object_storage() => self.err(
                        format!("{ck}.provider"),
                        format!(
                            "`{home}` uses the `{}` driver, which has no object storage",
                            p.driver
                        ),
                    ),
                    Some(_) => {}
                }
            }
            if kind == ComponentKind::Vm {
                vcpus += c.vcpus.unwrap_or(0);
                memory += c.memory_gib.unwrap_or(0.0);
            }
            written.push((kind, size_gib, c));
        }
        if raw.vcpus == Some(0) {
            self.err(format!("{key}.vcpus"), "must be at least 1, got 0");
        }
        if raw.memory_gib.is_some() {
            self.positive(&format!("{key}.memory_gib"), raw.memory_gib, 1.0);
        }
        let requirements = Requirements {
            vcpus: raw.vcpus.unwrap_or(vcpus.max(1)),
            memory_gib: raw
                .memory_gib
                .unwrap_or(if memory > 0.0 { memory } else { 1.0 }),
        };
        // Settings are read here, once, into what the relocations use; a component whose kind
        // or name was refused above is not read further.
        let base = self.base;
        let components: Vec<Component> = written
            .into_iter()
            .enumerate()
            .map(|(i, (kind, size_gib, c))| {
                let read = !unknown_kinds.contains(&i)
                    && (kind == ComponentKind::Config || validate_name(&c.name).is_ok());
                let settings = if read {
                    components::read(name, &c.name, kind, &c.settings, requirements, base)
                } else {
                    Err(SettingsError {
                        service: name.to_string(),
                        component: c.name.clone(),
                        problems: Vec::new(),
                    })
                };
                let settings = settings.unwrap_or_else(|e| {
                    for (k, message) in e.problems {
                        self.err(format!("{key}.components[{i}].{k}"), message);
                    }
                    // Never used: the configuration is refused.
                    ComponentSettings::Volume
                });
                Component {
                    kind,
                    name: c.name,
                    size_gib,
                    keep_at_source: c.keep_at_source || c.provider.is_some(),
                    home: c.provider,
                    settings,
                }
            })
            .collect();
        let health_check = raw.health_check.map(|h| {
            if h.url.is_none() && h.command.is_none() {
                self.err(format!("{key}.health_check"), "needs `url` or `command`");
            }
            HealthCheck {
                url: h.url,
                command: h.command,
                timeout: Duration::from_secs(h.timeout_secs.unwrap_or(10)),
            }
        });
        for (i, c) in components.iter().enumerate() {
            let Some(spec) = c.config_file() else {
                continue;
            };
            if let Err(message) = spec.resolve_app(&components) {
                let ck = format!("{key}.components[{i}]");
                let at = if spec.app.is_some() {
                    format!("{ck}.settings.app")
                } else {
                    ck
                };
                self.err(at, message);
            }
        }
        let cutover = raw.cutover.map(|h| self.hook(&format!("{key}.cutover"), h));
        let recontextualise = raw
            .recontextualise
            .map(|h| self.hook(&format!("{key}.recontextualise"), h));
        let vm_moves = self.vm_moves(&key, raw.vm_mode.as_deref(), raw.live);
        ServiceSpec {
            name: name.to_string(),
            provider: raw.provider,
            policy: raw.policy,
            flavor: raw.flavor,
            requirements,
            pinned: raw.pinned,
            health_check,
            components,
            cutover,
            recontextualise,
            vm_moves,
        }
    }

    fn vm_moves(&mut self, key: &str, mode: Option<&str>, live: Option<RawLive>) -> VmMoves {
        let mut moves = VmMoves {
            mode: mode.and_then(|m| self.vm_mode(&format!("{key}.vm_mode"), m)),
            ..VmMoves::default()
        };
        let Some(live) = live else {
            return moves;
        };
        let key = format!("{key}.live");
        if let Some(ms) = live.downtime_limit_ms {
            if ms == 0 {
                self.err(
                    format!("{key}.downtime_limit_ms"),
                    "must be at least 1, got 0",
                );
            }
            moves.downtime_limit = Duration::from_millis(ms);
        }
        if let Some(secs) = live.timeout_secs {
            if secs == 0 {
                self.err(format!("{key}.timeout_secs"), "must be at least 1, got 0");
            }
            moves.timeout = Duration::from_secs(secs);
        }
        if let Some(rate) = live.max_mib_per_sec {
            if !(rate.is_finite() && rate > 0.0) {
                self.err(
                    format!("{key}.max_mib_per_sec"),
                    format!("must be a positive number of MiB/s, got {rate}"),
                );
            }
            moves.max_mib_per_sec = Some(rate);
        }
        match live.fallback.as_deref() {
            None | Some("cold") => {}
            Some("rollback") => moves.fallback = LiveFallback::Rollback,
            Some(other) => self.err(
                format!("{key}.fallback"),
                format!("`{other}` is not one of cold, rollback"),
            ),
        }
        moves
    }

    fn hook(&mut self, key: &str, raw: RawHook) -> HookSpec {
        let timeout = self.at_least(&format!("{key}.timeout_secs"), raw.timeout_secs, 30, 1);
        let target = match (raw.command, raw.url) {
            (Some(_), Some(_)) => {
                self.err(
                    key,
                    "set either `command` or `url`, not both: a hook is one program or one webhook",
                );
                None
            }
            (None, None) => {
                self.err(
                    key,
                    "needs `command` (a program and its arguments) or `url` (a webhook); \
                     leave the table out if there is nothing to call",
                );
                None
            }
            (Some(argv), None) => {
                if raw.token_file.is_some() {
                    self.err(
                        format!("{key}.token_file"),
                        "belongs to a webhook (`url`), not to a command",
                    );
                }
                self.hook_command(key, argv)
            }
            (None, Some(url)) => {
                match reqwest::Url::parse(&url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                    Ok(u) => self.err(
                        format!("{key}.url"),
                        format!("`{url}` must be http:// or https://, not {}://", u.scheme()),
                    ),
                    Err(e) => self.err(format!("{key}.url"), format!("`{url}` is not a URL: {e}")),
                }
                Some(HookTarget::Webhook {
                    url,
                    token_file: raw.token_file.map(|f| self.path(&f)),
                })
            }
        };
        HookSpec {
            target: target.unwrap_or(HookTarget::Command {
                argv: Vec::new(),
                workdir: self.base.to_path_buf(),
            }),
            timeout: Duration::from_secs(timeout),
        }
    }

    fn hook_command(&mut self, key: &str, mut argv: Vec<String>) -> Option<HookTarget> {
        let Some(program) = argv.first_mut() else {
            self.err(
                format!("{key}.command"),
                "must name a program, e.g. [\"scripts/repoint.sh\"]",
            );
            return None;
        };
        if program.trim().is_empty() {
            self.err(format!("{key}.command[0]"), "the program must not be empty");
            return None;
        }
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            self.err(format!("{key}.command[{i}]"), "holds a NUL byte");
            return None;
        }
        let program = &mut argv[0];
        if program.contains('/') {
            let path = self.path(program);
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    use std::os::unix::fs::PermissionsExt;
                    if m.permissions().mode() & 0o111 == 0 {
                        self.err(
                            format!("{key}.command[0]"),
                            format!("{} is not executable; run `chmod +x` on it", path.display()),
                        );
                    }
                }
                _ => self.err(
                    format!("{key}.command[0]"),
                    format!("program {} does not exist", path.display()),
                ),
            }
            *program = path.to_string_lossy().into_owned();
        }
        Some(HookTarget::Command {
            argv,
            workdir: self.base.to_path_buf(),
        })
    }
}
