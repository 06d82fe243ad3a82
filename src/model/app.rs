//! [`AppSpec`]: what a provider needs to run an app, as an `app` component's `settings`
//! describe it (the configuration reads them).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::names::validate_name;

/// Environment variables of a process, by name.
pub type Env = BTreeMap<String, String>;

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

impl AppSpec {
    /// Settings keys an `app` component understands.
    pub const KEYS: &'static [&'static str] = &["command", "args", "env", "workdir", "port"];

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
