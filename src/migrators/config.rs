//! The configuration-file migrator: a service's `config` component rewritten for the
//! target with its rules ([`super::rewrite`]) and checked; its undo removes the target's app
//! if it never started. Also writes a configuration file from its template at a first
//! deployment.

use serde_json::{json, Value};

use super::deploy::{self, DeployError};
use super::rewrite::{self, ConfigFileSpec, Placeholders};
use super::{Cx, Migrator, MigratorError};
use crate::config::Config;
use crate::model::{Component, ComponentKind, ServiceSpec};
use crate::providers::{AppState, Provider};

/// `config:<file>`: rewrites the configuration file `file` of `app` for the target.
pub struct WriteConfig {
    pub file: String,
    pub app: String,
}

#[async_trait::async_trait]
impl Migrator for WriteConfig {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let text = render_target_config(cx, &self.file, &self.app).await?;
        let path = cx
            .target
            .write_app_file(cx.svc(), &self.app, &self.file, text.as_bytes())
            .await?;
        Ok(json!({ "path": path, "bytes": text.len(), "checked": true }))
    }

    /// The file lives in the target app's directory: it goes with the app, unless the app
    /// runs there.
    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let svc = cx.svc();
        if !matches!(
            cx.target.app_status(svc, &self.app).await?,
            Some(s) if s.state != AppState::Stopped
        ) {
            cx.target.remove_app(svc, &self.app).await?;
        }
        Ok(())
    }
}

/// Placeholder values for the target. Before the target's volumes exist (at preflight),
/// their paths are stand-ins, so rules can be checked without writing anything.
pub async fn target_values(cx: &Cx) -> Result<Placeholders, MigratorError> {
    let spec = cx.spec()?;
    let homes = cx.bucket_homes(spec)?;
    let mut values = deploy::values(&cx.config, spec, cx.target.as_ref(), &homes).await?;
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Volume)
    {
        values
            .entry(format!("volume.{}.path", c.name))
            .or_insert_with(|| format!("(volume {} at {})", c.name, cx.plan.to));
    }
    Ok(values.into_iter().collect())
}

/// The configuration file `file` of `app` as the target needs it: the source's current
/// file with the rules applied, checked.
pub async fn render_target_config(cx: &Cx, file: &str, app: &str) -> Result<String, MigratorError> {
    let svc = cx.svc();
    let c = cx.component(ComponentKind::Config, file)?;
    let cfs = config_spec(svc, c)?;
    let current = cx
        .source
        .read_app_file(svc, app, file)
        .await?
        .ok_or_else(|| {
            MigratorError::Check(format!(
                "configuration file `{file}` of app `{svc}/{app}` does not exist at `{}`",
                cx.plan.from
            ))
        })?;
    let text = String::from_utf8(current).map_err(|_| {
        MigratorError::Check(format!(
            "configuration file `{file}` of app `{svc}/{app}` is not UTF-8 text"
        ))
    })?;
    let values = target_values(cx).await?;
    let rewritten = rewrite::rewrite(&text, &cfs, &values).map_err(|e| cfs.in_file(e))?;
    cfs.check(&rewritten.text)?;
    Ok(rewritten.text)
}

/// Writes a configuration file from its template where the service is deployed, unless it
/// exists. Returns what it created.
pub async fn write_initial_config(
    at: &dyn Provider,
    homes: &deploy::BucketHomes,
    config: &Config,
    spec: &ServiceSpec,
    c: &Component,
) -> Result<Option<String>, DeployError> {
    let cfs = config_spec(&spec.name, c)?;
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

fn config_spec(service: &str, c: &Component) -> Result<ConfigFileSpec, DeployError> {
    c.config_file()
        .cloned()
        .ok_or_else(|| deploy::wrong_kind(service, c, ComponentKind::Config))
}
