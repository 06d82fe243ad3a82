//! Configuration: a TOML file parsed into [`raw::RawConfig`] (unknown keys are errors), then
//! validated into [`Config`]. Validation collects every problem at once; each
//! [`ConfigError`] names the key path and, where the file has it, `file:line:column`.
//!
//! Relative paths in the file are resolved against the file's own directory, so an example
//! configuration works from wherever the daemon is started.
//!
//! Each section's types and rules are read in one file: `daemon` (`[daemon]`, `[broker]`,
//! `[conduit]`), `providers` (with `object_stores` and the price and benchmark `feeds`),
//! `policies`, `services`, and [`components`], which reads each component's `settings` into
//! the typed [`ComponentSettings`] the daemon later uses as they are. `locate` maps key
//! paths to `line:column`. The domain nouns themselves ([`ServiceSpec`], [`Component`],
//! [`Driver`], [`DiskFormat`], …) live in [`crate::model`] and are re-exported here.

pub mod components;
mod daemon;
mod feeds;
mod hosts;
mod locate;
mod object_stores;
mod policies;
mod providers;
pub mod raw;
mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::ServiceSpec;
pub use components::SettingsError;
pub use daemon::{BrokerSettings, ConduitSettings, DaemonSettings, LogFormat};
pub use feeds::{BenchmarkKind, BenchmarkMap, BenchmarkSource, PricingFormat, PricingSource};
pub use hosts::AgentSettings;
pub use object_stores::{
    check_remote_name_template, CredentialsSource, ObjectStoreSettings, S3Settings, SwiftAuth,
    SwiftSettings, DEFAULT_REMOTE_NAME,
};
pub use policies::{Blackout, Mode, PolicySpec};
pub use providers::{Accel, DiskBus, Provider, QemuSettings, RawRegionOverride, NIC_MODELS};

use locate::Locator;
use raw::RawConfig;

/// The validated configuration. Every field has already been checked.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    pub daemon: DaemonSettings,
    pub broker: BrokerSettings,
    pub conduit: ConduitSettings,
    /// Optional region table that extends or replaces rows of the shipped one.
    pub regions_file: Option<PathBuf>,
    pub providers: BTreeMap<String, Provider>,
    pub policies: BTreeMap<String, PolicySpec>,
    pub services: BTreeMap<String, ServiceSpec>,
    /// The certificate this process proves who it is with on other hosts (`[tls]`).
    pub tls: Option<crate::sys::tls::TlsFiles>,
    /// Set in an agent's configuration: what `fluidcloud agent` serves (`[agent]`).
    pub agent: Option<AgentSettings>,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, where known.
    pub location: Option<(usize, usize)>,
    /// Dotted key path, e.g. `services.shop.provider`; empty for syntax errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.location {
            write!(f, ":{l}:{c}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// All problems of one file; displays one per line.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        // An absolute path makes every relative path in the file absolute too, so the daemon
        // does not depend on its working directory after start.
        let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                location: None,
                key: String::new(),
                message: format!("cannot read the configuration file: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text` as if read from `path`. Every problem is reported: a
    /// syntax error stops the reading, but unknown keys and values of the wrong type are
    /// collected and the rest of the file is still validated.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let locator = Locator::new(text);
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let location = e.span().map(|s| locator.line_col(s.start));
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                location,
                key: String::new(),
                message: e.message().trim().to_string(),
            }])
        })?;
        let (raw, refused) = raw::read_all(table);
        let mut errors: Vec<ConfigError> = refused
            .into_iter()
            .map(|r| ConfigError {
                file: PathBuf::new(),
                location: if r.unknown_key {
                    locator.find_key(&r.key)
                } else {
                    locator.find(&r.key)
                },
                key: r.key,
                message: r.message,
            })
            .collect();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut v = Validator {
            locator: &locator,
            base: &base,
            errors: Vec::new(),
        };
        let config = raw.map(|raw| v.config(path, raw));
        // A key refused while reading is not reported a second time (as missing, or as what
        // its table then lacks).
        let refused: BTreeSet<String> = errors.iter().map(|e| e.key.clone()).collect();
        let follows_from_refused = |key: &str| {
            refused.iter().any(|r| {
                r == key
                    || r.strip_prefix(key)
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            })
        };
        errors.extend(
            v.errors
                .into_iter()
                .filter(|e| !follows_from_refused(&e.key)),
        );
        for e in &mut errors {
            e.file = path.to_path_buf();
        }
        // In the order of the file; problems without a place last.
        errors.sort_by_key(|e| e.location.unwrap_or((usize::MAX, 0)));
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// Where pricing downloads are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.daemon.state_dir.join("cache")
    }

    /// The decision log, one JSON object per line.
    pub fn decision_log_path(&self) -> PathBuf {
        self.daemon.state_dir.join("decisions.jsonl")
    }
}

/// Turns the raw file into a [`Config`], collecting every problem. Each section's rules are
/// in the file named after it.
struct Validator<'a> {
    locator: &'a Locator,
    base: &'a Path,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let location = self.locator.find(&key);
        self.errors.push(ConfigError {
            file: PathBuf::new(),
            location,
            key,
            message: message.into(),
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn schedule(&mut self, key: &str, s: Option<String>, default: &str) -> String {
        let s = s.unwrap_or_else(|| default.to_string());
        if let Err(e) = parse_cron(&s) {
            self.err(
                key,
                format!("`{s}` is not a cron schedule with seconds (like \"0 */5 * * * *\"): {e}"),
            );
        }
        s
    }

    fn positive(&mut self, key: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            self.err(key, format!("must be a positive number, got {v}"));
        }
        v
    }

    fn non_negative(&mut self, key: &str, v: Option<f64>, default: f64) -> f64 {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v >= 0.0) {
            self.err(key, format!("must be zero or a positive number, got {v}"));
        }
        v
    }

    fn at_least(&mut self, key: &str, v: Option<u64>, default: u64, min: u64) -> u64 {
        let v = v.unwrap_or(default);
        if v < min {
            self.err(key, format!("must be at least {min}, got {v}"));
        }
        v
    }

    fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let daemon = self.daemon(raw.daemon);
        let broker = self.broker(raw.broker);
        let conduit = self.conduit(raw.conduit);
        let regions_file = raw.regions.file.as_deref().map(|f| self.path(f));
        if let Some(f) = &regions_file {
            if !f.is_file() {
                self.err(
                    "regions.file",
                    format!("region table {} does not exist", f.display()),
                );
            }
        }
        let tls = self.tls(raw.tls);
        let is_agent = raw.agent.is_some();
        let agent = self.agent(raw.agent, &tls);
        let mut providers: BTreeMap<_, _> = raw
            .providers
            .into_iter()
            .map(|(name, p)| {
                let v = self.provider(&name, p);
                (name, v)
            })
            .collect();
        self.distinct_roots(&providers);
        self.hosts(&mut providers, &tls, is_agent);
        let policies: BTreeMap<_, _> = raw
            .policies
            .into_iter()
            .map(|(name, p)| {
                let v = self.policy(&name, p);
                (name, v)
            })
            .collect();
        let services: BTreeMap<_, _> = raw
            .services
            .into_iter()
            .map(|(name, s)| {
                let v = self.service(&name, s, &providers, &policies);
                (name, v)
            })
            .collect();
        for e in &mut self.errors {
            e.file = path.to_path_buf();
        }
        Config {
            path: path.to_path_buf(),
            daemon,
            broker,
            conduit,
            regions_file,
            providers,
            policies,
            services,
            tls,
            agent,
        }
    }
}

fn check_name(v: &mut Validator<'_>, key: &str, name: &str) {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        v.err(
            key,
            format!("name `{name}` may hold only letters, digits, `-` and `_`"),
        );
    }
}

/// `path` without `.` and `..` components (for paths that do not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(", ")
    }
}

/// Parses a cron schedule the way the scheduler does: seconds first, day-of-month and
/// day-of-week both honoured.
pub fn parse_cron(s: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::Cron::new(s)
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
}

#[cfg(test)]
mod tests;
