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
    /// How a relocation moves the service's VMs.
    pub vm_moves: VmMoves,
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

/// How a relocation moves a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmMode {
    /// Power the VM down, copy what is left of its disk, boot it at the target.
    #[default]
    Cold,
    /// Copy its disk while it runs, in passes over what it wrote since the last one; power
    /// it down, copy only what it wrote last, boot it at the target.
    Precopy,
    /// Mirror its disk and migrate its memory while it runs; it goes on at the target
    /// without a reboot.
    Live,
}

impl VmMode {
    pub const NAMES: &'static [&'static str] = &["cold", "precopy", "live"];

    pub fn as_str(self) -> &'static str {
        match self {
            VmMode::Cold => "cold",
            VmMode::Precopy => "precopy",
            VmMode::Live => "live",
        }
    }

    pub fn parse(s: &str) -> Option<VmMode> {
        match s {
            "cold" => Some(VmMode::Cold),
            "precopy" => Some(VmMode::Precopy),
            "live" => Some(VmMode::Live),
            _ => None,
        }
    }
}

/// What a live migration that does not converge in time turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveFallback {
    /// The VM is moved cold instead: powered down, its disk copied, booted at the target.
    #[default]
    Cold,
    /// The relocation rolls back; the VM runs on at the source as if nothing happened.
    Rollback,
}

/// `[services.NAME]`'s `vm_mode` and `[services.NAME.live]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmMoves {
    /// The service's own choice; without one the policy's `vm_mode` holds, else cold.
    pub mode: Option<VmMode>,
    /// The longest pause QEMU may plan for the last pass of memory. Default 300 ms.
    pub downtime_limit: Duration,
    /// How long the memory migration may take before it is cancelled. Default 300 s.
    pub timeout: Duration,
    /// Cap on the memory stream, MiB/s; `None` for none.
    pub max_mib_per_sec: Option<f64>,
    pub fallback: LiveFallback,
}

impl Default for VmMoves {
    fn default() -> Self {
        VmMoves {
            mode: None,
            downtime_limit: Duration::from_millis(300),
            timeout: Duration::from_secs(300),
            max_mib_per_sec: None,
            fallback: LiveFallback::Cold,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn component(settings: ComponentSettings, size_gib: f64, keep: bool) -> Component {
        Component {
            kind: settings.kind(),
            name: "c".into(),
            size_gib,
            keep_at_source: keep,
            home: None,
            settings,
        }
    }

    #[test]
    fn a_component_answers_for_its_own_kind_only() {
        let vm = component(ComponentSettings::Vm(VmSpec::new("c")), 1.0, false);
        assert_eq!(vm.vm().map(|v| v.name.as_str()), Some("c"));
        assert!(vm.app().is_none() && vm.config_file().is_none());
        assert!(!vm.skip_special_files());
        let skip = BucketSettings {
            skip_special_files: true,
        };
        assert!(component(ComponentSettings::Bucket(skip), 1.0, false).skip_special_files());
    }

    #[test]
    fn buckets_kept_at_the_source_do_not_move_and_are_not_block_storage() {
        let spec = ServiceSpec {
            name: "s".into(),
            provider: "a".into(),
            policy: "p".into(),
            flavor: None,
            requirements: Requirements {
                vcpus: 1,
                memory_gib: 1.0,
            },
            pinned: false,
            health_check: None,
            components: vec![
                component(ComponentSettings::Vm(VmSpec::new("c")), 2.0, false),
                component(ComponentSettings::Volume, 3.0, false),
                component(
                    ComponentSettings::Bucket(BucketSettings::default()),
                    5.0,
                    true,
                ),
            ],
            cutover: None,
            recontextualise: None,
            vm_moves: VmMoves::default(),
        };
        assert_eq!(spec.storage_gib(), 5.0);
        assert_eq!(spec.bytes_to_move(), (5.0 * GIB) as u64);
    }
}
