//! Deployment: a service's components made present at the provider it is placed on, and the
//! placeholders (`{volume.data.path}`, `{app.web.port}`…) its configuration files are
//! written with.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::config::Config;
use crate::model::{Component, ComponentKind, ServiceSpec};
use crate::providers::{
    self, AppSpec, AppState, Provider, ProviderError, VmSpec, VmState, VolumeSpec,
};

/// Placeholder values by name.
pub type Values = BTreeMap<String, String>;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What [`ensure`] did.
#[derive(Debug, Default)]
pub struct DeployReport {
    pub created: Vec<String>,
    pub started: Vec<String>,
}

impl DeployReport {
    pub fn changed(&self) -> bool {
        !(self.created.is_empty() && self.started.is_empty())
    }
}

impl fmt::Display for DeployReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.created.is_empty() {
            parts.push(format!("created {}", self.created.join(", ")));
        }
        if !self.started.is_empty() {
            parts.push(format!("started {}", self.started.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("nothing to do")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Rewrite(#[from] super::rewrite::RewriteError),
    #[error("service `{service}`: {component}: {message}")]
    Component {
        service: String,
        component: String,
        message: String,
    },
}

/// The size a component asks for, in bytes, rounded up to whole 512-byte sectors.
pub fn volume_bytes(c: &Component) -> u64 {
    ((c.size_gib * GIB) as u64).div_ceil(512) * 512
}

/// The app spec of an `app` component, as the configuration read it (relative paths
/// resolved against the configuration file's directory).
pub fn app_spec(service: &str, c: &Component) -> Result<AppSpec, DeployError> {
    c.app()
        .cloned()
        .ok_or_else(|| wrong_kind(service, c, ComponentKind::App))
}

/// The machine definition of a `vm` component, as the configuration read it (relative paths
/// resolved against the configuration file's directory). Disk format, bus, NIC model and
/// accelerator are the provider's, so the same definition adapts to whichever provider
/// starts it.
pub fn vm_spec(spec: &ServiceSpec, c: &Component) -> Result<VmSpec, DeployError> {
    c.vm()
        .cloned()
        .ok_or_else(|| wrong_kind(&spec.name, c, ComponentKind::Vm))
}

/// A component asked for as `kind` that is of another kind.
pub fn wrong_kind(service: &str, c: &Component, kind: ComponentKind) -> DeployError {
    DeployError::Component {
        service: service.to_string(),
        component: format!("{} `{}`", kind.as_str(), c.name),
        message: format!(
            "kind: must be `{}` for these settings, got `{}`",
            kind.as_str(),
            c.kind.as_str()
        ),
    }
}

/// The providers holding a service's buckets that stay put when it moves, by bucket name.
pub type BucketHomes = std::collections::BTreeMap<String, std::sync::Arc<dyn Provider>>;

/// The providers holding the buckets of `spec` that stay where they are when it moves,
/// each opened by `open`.
pub fn bucket_homes(
    spec: &ServiceSpec,
    open: impl Fn(&str) -> Result<std::sync::Arc<dyn Provider>, ProviderError>,
) -> Result<BucketHomes, ProviderError> {
    spec.components
        .iter()
        .filter(|c| c.kind == ComponentKind::Bucket && c.keep_at_source)
        .map(|c| {
            let home = c.home.as_deref().unwrap_or(&spec.provider);
            Ok((c.name.clone(), open(home)?))
        })
        .collect()
}

/// Placeholder values describing `spec` as deployed at `at`, with the buckets that stay put
/// described at their `homes`.
pub async fn values(
    config: &Config,
    spec: &ServiceSpec,
    at: &dyn Provider,
    homes: &BucketHomes,
) -> Result<Values, DeployError> {
    let mut v = Values::new();
    v.insert("service".into(), spec.name.clone());
    v.insert("provider".into(), at.name().to_string());
    // The address of the host the service runs on (its apps' and VMs' forwarded ports).
    v.insert("host".into(), at.address());
    if let Some(p) = config.providers.get(at.name()) {
        v.insert("region".into(), p.region.clone());
        v.insert("cloud".into(), p.cloud.clone().unwrap_or_default());
    }
    for c in &spec.components {
        match c.kind {
            ComponentKind::Volume => {
                if let Some(info) = at.volume_info(&spec.name, &c.name).await? {
                    if let Some(path) = info.path {
                        v.insert(
                            format!("volume.{}.path", c.name),
                            path.display().to_string(),
                        );
                    }
                    v.insert(
                        format!("volume.{}.format", c.name),
                        info.format.as_str().to_string(),
                    );
                }
            }
            ComponentKind::Bucket => {
                let home = match homes.get(&c.name) {
                    Some(home) if c.keep_at_source => home.as_ref(),
                    _ => at,
                };
                v.insert(
                    format!("bucket.{}.provider", c.name),
                    home.name().to_string(),
                );
                if let Some(loc) = home.bucket_location(&spec.name, &c.name).await? {
                    v.insert(format!("bucket.{}.endpoint", c.name), loc.url);
                    v.insert(format!("bucket.{}.name", c.name), loc.name);
                    if let Some(dir) = loc.path {
                        v.insert(format!("bucket.{}.path", c.name), dir.display().to_string());
                    }
                }
            }
            ComponentKind::App => {
                let app = app_spec(&spec.name, c)?;
                v.insert(format!("app.{}.host", c.name), at.address());
                if let Some(port) = app.port {
                    v.insert(format!("app.{}.port", c.name), port.to_string());
                }
                if let Some(dir) = at.app_dir(&spec.name, &c.name) {
                    v.insert(format!("app.{}.dir", c.name), dir.display().to_string());
                }
            }
            ComponentKind::Vm | ComponentKind::Config => {}
        }
    }
    Ok(v)
}

/// The app a configuration file belongs to: `settings.app`, or the service's only app.
pub fn config_app(spec: &ServiceSpec, c: &Component) -> Option<String> {
    c.config_file().and_then(|f| f.app.clone()).or_else(|| {
        let apps: Vec<&Component> = spec
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::App)
            .collect();
        (apps.len() == 1).then(|| apps[0].name.clone())
    })
}

/// Creates what is missing of `spec` at `at` and starts its apps. Buckets that stay put are
/// made sure of at their `homes` (where the service was first deployed, or their own
/// provider).
///
/// `known` names the volumes (`volume:NAME`) that existed at `at` before: one of them
/// missing now is an error, never replaced by an empty volume.
pub async fn ensure(
    at: &dyn Provider,
    homes: &BucketHomes,
    config: &Config,
    spec: &ServiceSpec,
    known: &std::collections::BTreeSet<String>,
) -> Result<DeployReport, DeployError> {
    let mut report = DeployReport::default();
    let caps = at.capabilities();
    for c in &spec.components {
        // A VM boots from the volume named like it.
        let missing_volume = matches!(c.kind, ComponentKind::Volume | ComponentKind::Vm)
            && caps.block
            && at.volume_info(&spec.name, &c.name).await?.is_none();
        if missing_volume && known.contains(&format!("volume:{}", c.name)) {
            return Err(DeployError::Component {
                service: spec.name.clone(),
                component: format!("volume `{}`", c.name),
                message: format!(
                    "it existed at `{}` and is gone; it is not recreated empty: restore the image",
                    at.name()
                ),
            });
        }
        if missing_volume {
            let op = at
                .create_volume(
                    &spec.name,
                    &VolumeSpec {
                        name: c.name.clone(),
                        size_bytes: volume_bytes(c),
                        format: at.preferred_disk_format(),
                    },
                )
                .await?;
            providers::wait_for(at, &op.id, Duration::from_secs(600)).await?;
            report.created.push(format!("volume `{}`", c.name));
        }
        if c.kind == ComponentKind::Bucket {
            match homes.get(&c.name) {
                Some(home) if c.keep_at_source => home.ensure_bucket(&spec.name, &c.name).await?,
                _ if caps.object => at.ensure_bucket(&spec.name, &c.name).await?,
                _ => {}
            }
        }
    }
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Config)
    {
        if let Some(what) = super::config::write_initial_config(at, homes, config, spec, c).await? {
            report.created.push(what);
        }
    }
    if caps.compute {
        for c in spec
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::Vm)
        {
            let vm = vm_spec(spec, c)?;
            let running = matches!(
                at.vm_status(&spec.name, &c.name).await?,
                Some(s) if s.state == VmState::Running && s.spec == vm
            );
            if !running {
                let op = at.start_vm(&spec.name, &vm).await?;
                providers::wait_for(at, &op.id, Duration::from_secs(120)).await?;
                report.started.push(format!("vm `{}`", c.name));
            }
        }
    }
    if caps.app {
        for c in spec
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::App)
        {
            let app = app_spec(&spec.name, c)?;
            let running = matches!(
                at.app_status(&spec.name, &c.name).await?,
                Some(s) if matches!(s.state, AppState::Running | AppState::Restarting) && s.spec == app
            );
            if !running {
                let op = at.start_app(&spec.name, &app).await?;
                providers::wait_for(at, &op.id, Duration::from_secs(60)).await?;
                report.started.push(format!("app `{}`", c.name));
            }
        }
    }
    Ok(report)
}
