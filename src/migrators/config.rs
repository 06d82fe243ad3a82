//! The configuration-file migrator: a service's `config` component rewritten for the
//! target (see [`super::rewrite`]), and written from its template at a first deployment.

use std::path::Path;

use super::deploy::{self, DeployError};
use super::rewrite::{ConfigFileSpec, Placeholders};
use crate::config::{Component, Config, ServiceSpec};
use crate::providers::Provider;

/// Writes a configuration file from its template where the service is deployed, unless it
/// exists. Returns what it created.
pub async fn write_initial_config(
    at: &dyn Provider,
    homes: &deploy::BucketHomes,
    config: &Config,
    spec: &ServiceSpec,
    c: &Component,
) -> Result<Option<String>, DeployError> {
    let cfs = config_spec(config, &spec.name, c)?;
    let Some(app) = deploy::config_app(spec, c) else {
        return Err(DeployError::Component {
            service: spec.name.clone(),
            component: format!("config `{}`", c.name),
            message: "it names no app, and the service has more than one (set `settings.app`)"
                .to_string(),
        });
    };
    if at.read_app_file(&spec.name, &app, &c.name).await?.is_some() {
        return Ok(None);
    }
    let values: Placeholders = deploy::values(config, spec, at, homes)
        .await?
        .into_iter()
        .collect();
    let Some(text) = cfs.render_initial(&values)? else {
        return Ok(None);
    };
    cfs.check(&text)?;
    at.write_app_file(&spec.name, &app, &c.name, text.as_bytes())
        .await?;
    Ok(Some(format!("config `{}` of app `{app}`", c.name)))
}

pub(crate) fn config_spec(
    config: &Config,
    service: &str,
    c: &Component,
) -> Result<ConfigFileSpec, DeployError> {
    let base = config.path.parent().unwrap_or(Path::new("/"));
    ConfigFileSpec::from_component(service, c, base).map_err(|problems| DeployError::Component {
        service: service.to_string(),
        component: format!("config `{}`", c.name),
        message: problems
            .into_iter()
            .map(|(k, m)| format!("{k}: {m}"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}
