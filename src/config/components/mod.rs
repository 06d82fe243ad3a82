//! A component's `settings` table, read for its kind into [`ComponentSettings`] when the
//! configuration is loaded: [`app`] (an [`AppSpec`](crate::model::AppSpec)), [`vm`] (a
//! [`VmSpec`](crate::model::VmSpec)), [`config_file`] (a
//! [`ConfigFileSpec`](crate::model::ConfigFileSpec)), [`bucket`]; a volume has none. Unknown
//! keys and values of the wrong type are refused, every problem at once, each with its key
//! within the component (`settings.port`), which the validator turns into `file:line:column`.

mod app;
mod config_file;
mod vm;

use std::fmt;
use std::path::{Path, PathBuf};

pub use app::app;
pub use config_file::config_file;
pub use vm::vm;

use crate::model::{BucketSettings, ComponentKind, ComponentSettings, Requirements};

/// Reads the settings of component `name` of `service`, of kind `kind`. `resources` are the
/// service's requirements (a VM's CPUs and memory); `base_dir` is the configuration file's
/// directory, against which relative paths are resolved.
pub fn read(
    service: &str,
    name: &str,
    kind: ComponentKind,
    settings: &toml::Table,
    resources: Requirements,
    base_dir: &Path,
) -> Result<ComponentSettings, SettingsError> {
    Ok(match kind {
        ComponentKind::Vm => {
            ComponentSettings::Vm(vm(service, name, settings, resources, base_dir)?)
        }
        ComponentKind::Volume => {
            Problems::start(service, name, kind, settings, &[]).finish((), |_| Ok(()))?;
            ComponentSettings::Volume
        }
        ComponentKind::Bucket => ComponentSettings::Bucket(bucket(service, name, settings)?),
        ComponentKind::App => ComponentSettings::App(app(service, name, settings, base_dir)?),
        ComponentKind::Config => {
            ComponentSettings::Config(config_file(service, name, settings, base_dir)?)
        }
    })
}

/// Reads a `bucket` component's settings:
///
/// ```toml
/// [services.shop.components.settings]
/// skip_special_files = true   # leave symbolic links and special files at the source
/// ```
pub fn bucket(
    service: &str,
    name: &str,
    settings: &toml::Table,
) -> Result<BucketSettings, SettingsError> {
    let mut problems = Problems::start(
        service,
        name,
        ComponentKind::Bucket,
        settings,
        BucketSettings::KEYS,
    );
    let skip_special_files = match settings.get("skip_special_files") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            problems.add(
                "settings.skip_special_files",
                "must be true or false".into(),
            );
            false
        }
    };
    problems.finish(BucketSettings { skip_special_files }, |_| Ok(()))
}

/// `p` as given when absolute, else below `base_dir`.
fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// The problems found in one component's settings, collected so that all are reported at
/// once.
struct Problems {
    service: String,
    component: String,
    found: Vec<(String, String)>,
}

impl Problems {
    /// Starts with every settings key not in `known`.
    fn start(
        service: &str,
        component: &str,
        kind: ComponentKind,
        settings: &toml::Table,
        known: &[&str],
    ) -> Problems {
        let mut p = Problems {
            service: service.to_string(),
            component: component.to_string(),
            found: Vec::new(),
        };
        for key in settings.keys() {
            if !known.contains(&key.as_str()) {
                let message = if known.is_empty() {
                    format!(
                        "unknown {} setting; a {} has no settings",
                        kind.as_str(),
                        kind.as_str()
                    )
                } else {
                    format!(
                        "unknown {} setting; known settings: {}",
                        kind.as_str(),
                        known.join(", ")
                    )
                };
                p.add(&format!("settings.{key}"), message);
            }
        }
        p
    }

    fn add(&mut self, key: &str, message: String) {
        self.found.push((key.to_string(), message));
    }

    /// `spec` when nothing was found and `validate` accepts it, else every problem.
    fn finish<T>(
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

/// A component's settings that do not describe what its kind needs.
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
