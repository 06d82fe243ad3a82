//! [`AppSpec`]: what a provider needs to run an app, read from an `app` component's
//! `settings` table.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::names::validate_name;
use super::Env;
use crate::config::Component;
use crate::model::ComponentKind;

/// An app as a provider runs it: a program with arguments, environment and working
/// directory, listening on `port` when it serves anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// The component's name.
    pub name: String,
    /// The program: a path, or a name looked up in `PATH`.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The app's whole environment besides `PATH`, `HOME`, `LANG` and `TZ`, which it
    /// inherits from the daemon unless set here. Nothing else leaks from the daemon.
    #[serde(default)]
    pub env: Env,
    /// Where it runs; by default the provider picks a directory of the app's own.
    pub workdir: Option<PathBuf>,
    /// The TCP port it listens on, if it serves anything.
    pub port: Option<u16>,
}

/// Settings keys an `app` component understands.
const KEYS: &[&str] = &["command", "args", "env", "workdir", "port"];

impl AppSpec {
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> Self {
        AppSpec {
            name: name.into(),
            command: command.into(),
            args: Vec::new(),
            env: Env::new(),
            workdir: None,
            port: None,
        }
    }

    /// Reads the spec from an `app` component's `settings`:
    ///
    /// ```toml
    /// [services.shop.components.settings]
    /// command = "bin/demo-app"          # relative paths with a `/` start at `base_dir`
    /// args = ["demo.toml"]
    /// env = { RUST_LOG = "info" }
    /// workdir = "data"                  # relative to `base_dir`
    /// port = 8080
    /// ```
    ///
    /// `base_dir` is the configuration file's directory, against which the rest of the
    /// configuration resolves relative paths too. Every problem is reported at once.
    pub fn from_component(
        service: &str,
        component: &Component,
        base_dir: &Path,
    ) -> Result<AppSpec, SettingsError> {
        let mut problems = Problems::start(service, component, ComponentKind::App, KEYS);
        let mut problem = |key: &str, message: String| problems.add(key, message);
        let settings = &component.settings;
        let resolve = |p: &str| resolve(base_dir, p);
        let command = match settings.get("command") {
            None => {
                problem(
                    "settings.command",
                    "missing: an app needs the program to run".to_string(),
                );
                String::new()
            }
            Some(toml::Value::String(s)) if s.trim().is_empty() => {
                problem("settings.command", "must not be empty".to_string());
                String::new()
            }
            Some(toml::Value::String(s)) if s.contains('/') => {
                resolve(s).to_string_lossy().into_owned()
            }
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => {
                problem(
                    "settings.command",
                    format!(
                        "must be a string (arguments go in `args`), got {}",
                        v.type_str()
                    ),
                );
                String::new()
            }
        };
        let mut args = Vec::new();
        match settings.get("args") {
            None => {}
            Some(toml::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    match v {
                        toml::Value::String(s) => args.push(s.clone()),
                        other => problem(
                            &format!("settings.args[{i}]"),
                            format!("must be a string, got {}", other.type_str()),
                        ),
                    }
                }
            }
            Some(v) => problem(
                "settings.args",
                format!("must be an array of strings, got {}", v.type_str()),
            ),
        }
        let mut env = Env::new();
        match settings.get("env") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (k, v) in t {
                    match v {
                        toml::Value::String(s) => {
                            env.insert(k.clone(), s.clone());
                        }
                        other => problem(
                            &format!("settings.env.{k}"),
                            format!("must be a string, got {}", other.type_str()),
                        ),
                    }
                }
            }
            Some(v) => problem(
                "settings.env",
                format!(
                    "must be a table of strings such as {{ RUST_LOG = \"info\" }}, got {}",
                    v.type_str()
                ),
            ),
        }
        let workdir = match settings.get("workdir") {
            None => None,
            Some(toml::Value::String(s)) if s.is_empty() => {
                problem("settings.workdir", "must not be empty".to_string());
                None
            }
            Some(toml::Value::String(s)) => Some(resolve(s)),
            Some(v) => {
                problem(
                    "settings.workdir",
                    format!("must be a string, got {}", v.type_str()),
                );
                None
            }
        };
        let port = match settings.get("port") {
            None => None,
            Some(toml::Value::Integer(p)) => match u16::try_from(*p) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    problem(
                        "settings.port",
                        format!("must be a TCP port from 1 to 65535, got {p}"),
                    );
                    None
                }
            },
            Some(v) => {
                problem(
                    "settings.port",
                    format!("must be an integer, got {}", v.type_str()),
                );
                None
            }
        };
        let spec = AppSpec {
            name: component.name.clone(),
            command,
            args,
            env,
            workdir,
            port,
        };
        problems.finish(spec, AppSpec::validate)
    }

    /// Checks what a process launch would trip on. Returns the reason it is refused.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name).map_err(|e| format!("app name: {e}"))?;
        if self.command.trim().is_empty() {
            return Err("the command is empty".to_string());
        }
        if self.command.contains('\0') {
            return Err("the command holds a NUL byte".to_string());
        }
        if let Some(i) = self.args.iter().position(|a| a.contains('\0')) {
            return Err(format!("argument {i} holds a NUL byte"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!(
                    "environment variable name `{k}` is empty or holds `=` or NUL"
                ));
            }
            if v.contains('\0') {
                return Err(format!("environment variable `{k}` holds a NUL byte"));
            }
        }
        if let Some(w) = &self.workdir {
            if w.as_os_str().is_empty() {
                return Err("the working directory is empty".to_string());
            }
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port an app can be reached at".to_string());
        }
        Ok(())
    }
}

/// `p` as given when absolute, else below `base_dir`.
pub(crate) fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// The problems found in one component's settings, collected so that all are reported at
/// once.
pub(crate) struct Problems {
    service: String,
    component: String,
    found: Vec<(String, String)>,
}

impl Problems {
    /// Starts with what is wrong with the component's kind (it must be `kind`) and with
    /// every settings key not in `known`.
    pub(crate) fn start(
        service: &str,
        component: &Component,
        kind: ComponentKind,
        known: &[&str],
    ) -> Problems {
        let mut p = Problems {
            service: service.to_string(),
            component: component.name.clone(),
            found: Vec::new(),
        };
        if component.kind != kind {
            p.add(
                "kind",
                format!(
                    "must be `{}` for these settings, got `{}`",
                    kind.as_str(),
                    component.kind.as_str()
                ),
            );
        }
        for key in component.settings.keys() {
            if !known.contains(&key.as_str()) {
                p.add(
                    &format!("settings.{key}"),
                    format!(
                        "unknown {} setting; known settings: {}",
                        kind.as_str(),
                        known.join(", ")
                    ),
                );
            }
        }
        p
    }

    pub(crate) fn add(&mut self, key: &str, message: String) {
        self.found.push((key.to_string(), message));
    }

    /// `spec` when nothing was found and `validate` accepts it, else every problem.
    pub(crate) fn finish<T>(
        mut self,
        spec: T,
        validate: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, SettingsError> {
        if self.found.is_empty() {
            if let Err(reason) = validate(&spec) {
                self.add("settings", reason);
            }
        }
        if self.found.is_empty() {
            Ok(spec)
        } else {
            Err(SettingsError {
                service: self.service,
                component: self.component,
                problems: self.found,
            })
        }
    }
}

/// An `app` component's settings that do not describe a runnable app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub service: String,
    pub component: String,
    /// Key path within the component (e.g. `settings.port`) and what is wrong with it.
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service `{}`, component `{}`: ",
            self.service, self.component
        )?;
        for (i, (key, message)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{key}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsError {}
