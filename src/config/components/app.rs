//! An `app` component's settings.

use std::path::Path;

use super::{resolve, Problems, SettingsError};
use crate::model::{AppSpec, ComponentKind, Env};

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
pub fn app(
    service: &str,
    name: &str,
    settings: &toml::Table,
    base_dir: &Path,
) -> Result<AppSpec, SettingsError> {
    let mut problems = Problems::start(service, name, ComponentKind::App, settings, AppSpec::KEYS);
    let mut problem = |key: &str, message: String| problems.add(key, message);
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
        name: name.to_string(),
        command,
        args,
        env,
        workdir,
        port,
    };
    problems.finish(spec, AppSpec::validate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(settings: &str, base: &str) -> Result<AppSpec, SettingsError> {
        let table: toml::Table = toml::from_str(settings).expect("test settings are TOML");
        app("shop", "web", &table, Path::new(base))
    }

    #[test]
    fn every_setting_is_read_and_paths_resolved_against_the_config() {
        let spec = read(
            r#"
            command = "bin/demo-app"
            args = ["--config", "demo.toml"]
            env = { RUST_LOG = "info", MODE = "prod" }
            workdir = "data"
            port = 8080
            "#,
            "/etc/fc",
        )
        .unwrap();
        assert_eq!(spec.name, "web");
        assert_eq!(spec.command, "/etc/fc/bin/demo-app");
        assert_eq!(spec.args, vec!["--config", "demo.toml"]);
        assert_eq!(spec.env.get("MODE").map(String::as_str), Some("prod"));
        assert_eq!(spec.workdir.as_deref(), Some(Path::new("/etc/fc/data")));
        assert_eq!(spec.port, Some(8080));

        // A bare program name is looked up in PATH, not made relative.
        let spec = read(r#"command = "python3""#, "/etc/fc").unwrap();
        assert_eq!(spec.command, "python3");
        assert_eq!(spec.workdir, None);
    }

    #[test]
    fn errors_name_service_component_and_every_bad_key() {
        let err = read(
            r#"
            args = "--verbose"
            port = 70000
            env = { A = 1 }
            colour = "blue"
            "#,
            "/",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("service `shop`, component `web`: "),
            "{text}"
        );
        let keys: Vec<&str> = err.problems.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "settings.command",
            "settings.args",
            "settings.port",
            "settings.env.A",
            "settings.colour",
        ] {
            assert!(keys.contains(&k), "{k} not reported in {text}");
        }
        assert!(text.contains("got 70000"), "{text}");

        let err = read(
            r#"
            command = "x"
            env = { "A=B" = "1" }
            "#,
            "/",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`A=B`"), "{err}");
    }
}
