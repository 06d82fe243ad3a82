//! A service instance as the owner configured it: its [`ServiceSpec`], its [`Component`]s
//! with their settings read for their kind, and the hooks the conduit calls on its behalf.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::{AppSpec, ComponentKind, ConfigFileSpec, Requirements, VmSpec};

#[derive(Debug, Clone, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub provider: String,
    pub policy: String,
    pub flavor: Option<String>,
    pub requirements: Requirements,
    pub pinned: bool,
    pub health_check: Option<HealthCheck>,
    pub components: Vec<Component>,
    /// Repoints clients (DNS record, floating IP, proxy) at the relocated service; called
    /// again with phase `rollback` to point them back.
    pub cutover: Option<HookSpec>,
    /// Hands environment data to the relocated instance, after the conduit wrote its
    /// context file.
    pub recontextualise: Option<HookSpec>,
}

impl ServiceSpec {
    /// Bytes a relocation carries (volumes, VM disks, buckets not kept at the source).
    pub fn bytes_to_move(&self) -> u64 {
        self.components
            .iter()
            .filter(|c| !(c.kind == ComponentKind::Bucket && c.keep_at_source))
            .map(|c| (c.size_gib * GIB) as u64)
            .sum()
    }

    /// GiB of block storage the service keeps at its provider.
    pub fn storage_gib(&self) -> f64 {
        self.components
            .iter()
            .filter(|c| matches!(c.kind, ComponentKind::Vm | ComponentKind::Volume))
            .map(|c| c.size_gib)
            .sum()
    }
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, Clone, Serialize)]
pub struct HealthCheck {
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub timeout: Duration,
}

/// A program or webhook the conduit calls at one step of a relocation
/// (`[services.NAME.cutover]`, `[services.NAME.recontextualise]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookSpec {
    pub target: HookTarget,
    /// The hook is stopped (a command's whole process group killed) after this. Default 30 s.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HookTarget {
    /// Run without a shell; a program path with a `/` is resolved against the configuration's
    /// directory, a bare name is looked up in `PATH`.
    Command {
        argv: Vec<String>,
        /// The configuration's directory, where the command runs.
        workdir: PathBuf,
    },
    /// An HTTP POST of the event as JSON.
    Webhook {
        url: String,
        /// Holds the bearer token sent in `Authorization`.
        token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub kind: ComponentKind,
    pub name: String,
    pub size_gib: f64,
    /// A bucket that stays where it is when the service moves: kept at the service's
    /// provider, or at its own `home`.
    pub keep_at_source: bool,
    /// The provider a bucket lives at when not the service's own (`provider` of the
    /// component); such a bucket is kept there.
    pub home: Option<String>,
    /// What the component's `settings` table says, read for its kind.
    pub settings: ComponentSettings,
}

impl Component {
    /// A bucket's `settings.skip_special_files`: a relocation leaves the bucket's entries
    /// that are not objects (symbolic links, special files) behind at the source instead of
    /// refusing to start. Off by default.
    pub fn skip_special_files(&self) -> bool {
        matches!(
            &self.settings,
            ComponentSettings::Bucket(BucketSettings {
                skip_special_files: true
            })
        )
    }

    /// The app an `app` component runs.
    pub fn app(&self) -> Option<&AppSpec> {
        match &self.settings {
            ComponentSettings::App(a) => Some(a),
            _ => None,
        }
    }

    /// The machine a `vm` component runs.
    pub fn vm(&self) -> Option<&VmSpec> {
        match &self.settings {
            ComponentSettings::Vm(v) => Some(v),
            _ => None,
        }
    }

    /// The file a `config` component describes.
    pub fn config_file(&self) -> Option<&ConfigFileSpec> {
        match &self.settings {
            ComponentSettings::Config(f) => Some(f),
            _ => None,
        }
    }
}

/// A component's `settings`, read for its kind when the configuration is loaded: the
/// configuration check and the relocations use the same value.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ComponentSettings {
    /// With the service's CPU and memory requirements.
    Vm(VmSpec),
    /// A volume has no settings.
    Volume,
    Bucket(BucketSettings),
    App(AppSpec),
    Config(ConfigFileSpec),
}

impl ComponentSettings {
    /// The kind of component these settings belong to.
    pub fn kind(&self) -> ComponentKind {
        match self {
            ComponentSettings::Vm(_) => ComponentKind::Vm,
            ComponentSettings::Volume => ComponentKind::Volume,
            ComponentSettings::Bucket(_) => ComponentKind::Bucket,
            ComponentSettings::App(_) => ComponentKind::App,
            ComponentSettings::Config(_) => ComponentKind::Config,
        }
    }
}

/// A `bucket` component's settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BucketSettings {
    /// Leave the entries that are not objects behind at the source when moving.
    pub skip_special_files: bool,
}

impl BucketSettings {
    /// Settings keys a `bucket` component understands.
    pub const KEYS: &'static [&'static str] = &["skip_special_files"];
}
