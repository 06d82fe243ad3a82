//! [`Loaded`]: a configuration with everything it names read and checked. `check`, the
//! daemon's start and a reload all load a file this one way, so "valid" means the same to
//! all three.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::broker::regions;
use crate::config::{Config, ConfigError, ConfigErrors};
use crate::model::MarketSnapshot;
use crate::policy::{Limits, Policy};
use crate::sys::secret::ApiTokenPath;

/// Policies compiled for one configuration, by policy name.
pub type Policies = BTreeMap<String, Arc<Policy>>;

pub struct Loaded {
    pub(super) config: Arc<Config>,
    pub(super) policies: Arc<Policies>,
    pub(super) regions: regions::RegionTable,
}

impl Loaded {
    /// Reads and validates the file, compiles its policies, reads its region table and
    /// checks the API token the daemon would read; every problem at once.
    pub fn from_file(path: &std::path::Path) -> Result<Loaded, ConfigErrors> {
        Config::load(path).and_then(Loaded::load)
    }

    fn load(config: Config) -> Result<Loaded, ConfigErrors> {
        let mut all = Vec::new();
        let policies = compile_policies(&config).map_err(|e| all.extend(e.0));
        let regions = region_table(&config).map_err(|e| all.extend(e.0));
        let token = ApiTokenPath::locate(
            config.daemon.api_token_file.as_deref(),
            &config.daemon.state_dir,
        );
        if let Err(e) = token.check() {
            all.push(ConfigError {
                file: config.path.clone(),
                location: None,
                key: "daemon.api_token_file".into(),
                message: e.to_string(),
            });
        }
        all.extend(secret_files(&config));
        match (policies, regions) {
            (Ok(p), Ok(r)) if all.is_empty() => Ok(Loaded {
                config: Arc::new(config),
                policies: Arc::new(p),
                regions: r,
            }),
            _ => Err(ConfigErrors(all)),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn policies(&self) -> usize {
        self.policies.len()
    }

    /// Refuses `self` (a reloaded configuration) when it changes what only a restart of the
    /// daemon can apply, compared with the running `old` one.
    pub(super) fn reloadable_over(self, old: &Config) -> Result<Loaded, ConfigErrors> {
        let (old, new) = (&old.daemon, &self.config.daemon);
        let mut errors = Vec::new();
        let mut changed = |key: &str, from: String, to: String| {
            if from != to {
                errors.push(ConfigError {
                    file: self.config.path.clone(),
                    location: None,
                    key: key.into(),
                    message: format!(
                        "changed from {from} to {to}, which needs a restart of the daemon; the running configuration stays in force"
                    ),
                });
            }
        };
        changed(
            "daemon.listen",
            old.listen.to_string(),
            new.listen.to_string(),
        );
        changed(
            "daemon.state_dir",
            old.state_dir.display().to_string(),
            new.state_dir.display().to_string(),
        );
        let token_file = |d: &crate::config::DaemonSettings| match &d.api_token_file {
            Some(p) => p.display().to_string(),
            None => "(none)".into(),
        };
        changed("daemon.api_token_file", token_file(old), token_file(new));
        changed(
            "daemon.log_format",
            format!("{:?}", old.log_format).to_lowercase(),
            format!("{:?}", new.log_format).to_lowercase(),
        );
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Puts the region of every configured provider into `market`.
    pub(super) fn refresh_regions(&self, market: &mut MarketSnapshot) {
        market.regions.clear();
        for (name, p) in &self.config.providers {
            if let Some(info) = regions::resolve(&self.regions, p) {
                market.regions.insert(name.clone(), info);
            }
        }
    }
}

/// Refuses the secret files `config` names (object stores' credentials, webhooks' tokens)
/// that other users can read, as they would be refused when used: up front, by `check`,
/// the daemon's start and a reload, rather than in the middle of a relocation.
fn secret_files(config: &Config) -> Vec<ConfigError> {
    use crate::config::ObjectStoreSettings;
    use crate::model::HookTarget;
    let mut files: Vec<(String, &std::path::Path, &'static str)> = Vec::new();
    for (name, p) in &config.providers {
        let credentials = match &p.object_store {
            Some(ObjectStoreSettings::S3(s)) => &s.credentials,
            Some(ObjectStoreSettings::Swift(s)) => &s.credentials,
            None => continue,
        };
        if let Some(f) = &credentials.file {
            let driver = match &p.object_store {
                Some(ObjectStoreSettings::S3(_)) => "s3",
                _ => "swift",
            };
            files.push((
                format!("providers.{name}.{driver}.credentials_file"),
                f,
                "the credentials file",
            ));
        }
    }
    for (name, s) in &config.services {
        for (phase, hook) in [
            ("cutover", &s.cutover),
            ("recontextualise", &s.recontextualise),
        ] {
            if let Some(HookTarget::Webhook {
                token_file: Some(f),
                ..
            }) = hook.as_ref().map(|h| &h.target)
            {
                files.push((
                    format!("services.{name}.{phase}.token_file"),
                    f,
                    "the token file",
                ));
            }
        }
    }
    files
        .into_iter()
        .filter_map(|(key, path, what)| {
            // Only the rule is checked here: a file still missing is reported when it is
            // used, as it was.
            crate::sys::secret::read(path, what)
                .err()
                .filter(|e| matches!(e, crate::sys::secret::SecretError::OpenToOthers { .. }))
                .map(|e| ConfigError {
                    file: config.path.clone(),
                    location: None,
                    key,
                    message: e.to_string(),
                })
        })
        .collect()
}

/// Compiles every policy of `config`; all errors at once.
pub fn compile_policies(config: &Config) -> Result<Policies, ConfigErrors> {
    let limits = Limits::from(&config.broker);
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, spec) in &config.policies {
        let compiled = std::fs::read_to_string(&spec.file)
            .map_err(|e| format!("cannot read the policy file: {e}"))
            .and_then(|source| {
                Policy::compile(name.clone(), &source, &limits).map_err(|e| e.to_string())
            });
        match compiled {
            Ok(p) => {
                out.insert(name.clone(), Arc::new(p));
            }
            Err(e) => errors.push(ConfigError {
                file: spec.file.clone(),
                location: None,
                key: format!("policies.{name}"),
                message: e,
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads the region table of a configuration (shipped table plus the configured file).
fn region_table(config: &Config) -> Result<regions::RegionTable, ConfigErrors> {
    let base = regions::RegionTable::builtin();
    match &config.regions_file {
        None => Ok(base),
        Some(path) => regions::RegionTable::load(path)
            .map(|t| base.merged(&t))
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: path.clone(),
                    location: None,
                    key: "regions.file".into(),
                    message: e.to_string(),
                }])
            }),
    }
}
