//! [`VmSpec`]: what a provider needs to run a virtual machine, read from a `vm` component's
//! `settings` table and the service's CPU and memory requirements.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::names::validate_name;
use super::spec::{resolve, Problems};
use super::SettingsError;
use crate::config::Component;
use crate::model::{ComponentKind, Requirements};

/// A guest TCP port reachable on the host's loopback interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub guest: u16,
    /// The host port on 127.0.0.1; `None` lets the provider pick a free one at each start.
    pub host: Option<u16>,
}

/// A VM as a provider runs it. Its boot disk is the service's volume named like the VM, in
/// the provider's disk pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The component's name, also the name of its boot volume.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Direct kernel boot: the kernel image; without it the guest boots from its disk.
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the kernel command line.
    pub append: Option<String>,
    /// Guest TCP ports forwarded from host loopback ports (user-mode networking).
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// More volumes of the service attached after the boot disk, in this order.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// Settings keys a `vm` component understands.
const KEYS: &[&str] = &["kernel", "initrd", "append", "ports", "volumes"];
/// Least memory a guest is given; less does not boot a current Linux kernel.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most virtual CPUs qemu's default x86 machine takes.
pub const MAX_VCPUS: u32 = 255;

impl VmSpec {
    /// A VM with one CPU and 256 MiB that boots from its disk.
    pub fn new(name: impl Into<String>) -> Self {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: None,
            initrd: None,
            append: None,
            ports: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// Reads the spec from a `vm` component's `settings`:
    ///
    /// ```toml
    /// [services.shop.components.settings]
    /// kernel = "images/vmlinuz"            # optional direct kernel boot, relative to the file
    /// initrd = "images/initrd.gz"
    /// append = "console=ttyS0 root=/dev/vda1"
    /// ports = [8080, { guest = 22, host = 2222 }]   # a bare number: any free host port
    /// volumes = ["data"]                   # more disks after the boot disk
    /// ```
    ///
    /// CPUs and memory come from `resources`, the service's requirements (which sum its VM
    /// components' `vcpus` and `memory_gib`). Every problem is reported at once.
    pub fn from_component(
        service: &str,
        component: &Component,
        resources: Requirements,
        base_dir: &Path,
    ) -> Result<VmSpec, SettingsError> {
        let mut problems = Problems::start(service, component, ComponentKind::Vm, KEYS);
        let mut problem = |key: &str, message: String| problems.add(key, message);
        let settings = &component.settings;
        let mut path = |key: &str| -> Option<PathBuf> {
            match settings.get(key)? {
                toml::Value::String(s) if s.trim().is_empty() => {
                    problem(&format!("settings.{key}"), "must not be empty".to_string());
                    None
                }
                toml::Value::String(s) => Some(resolve(base_dir, s)),
                v => {
                    problem(
                        &format!("settings.{key}"),
                        format!("must be a path, got {}", v.type_str()),
                    );
                    None
                }
            }
        };
        let kernel = path("kernel");
        let initrd = path("initrd");
        let append = match settings.get("append") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(v) => {
                problem(
                    "settings.append",
                    format!(
                        "must be the kernel command line as one string, got {}",
                        v.type_str()
                    ),
                );
                None
            }
        };
        let mut ports = Vec::new();
        match settings.get("ports") {
            None => {}
            Some(toml::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    match port_forward(v) {
                        Ok(p) => ports.push(p),
                        Err(m) => problem(&format!("settings.ports[{i}]"), m),
                    }
                }
            }
            Some(v) => problem(
                "settings.ports",
                format!(
                    "must be an array of guest ports or {{ guest = N, host = M }} tables, got {}",
                    v.type_str()
                ),
            ),
        }
        let mut volumes = Vec::new();
        match settings.get("volumes") {
            None => {}
            Some(toml::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    match v {
                        toml::Value::String(s) => volumes.push(s.clone()),
                        other => problem(
                            &format!("settings.volumes[{i}]"),
                            format!("must be a volume name, got {}", other.type_str()),
                        ),
                    }
                }
            }
            Some(v) => problem(
                "settings.volumes",
                format!("must be an array of volume names, got {}", v.type_str()),
            ),
        }
        let memory_mib = (resources.memory_gib * 1024.0).ceil();
        let spec = VmSpec {
            name: component.name.clone(),
            vcpus: resources.vcpus,
            memory_mib: if memory_mib.is_finite() && memory_mib > 0.0 {
                memory_mib as u64
            } else {
                0
            },
            kernel,
            initrd,
            append,
            ports,
            volumes,
        };
        problems.finish(spec, VmSpec::validate)
    }

    /// Checks what a qemu launch would trip on (files are looked at when the VM starts).
    /// Returns the reason it is refused.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name).map_err(|e| format!("vm name: {e}"))?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(format!(
                "{} virtual CPUs; a VM has 1 to {MAX_VCPUS}",
                self.vcpus
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(format!(
                "{} MiB of memory is less than the {MIN_MEMORY_MIB} MiB a guest needs",
                self.memory_mib
            ));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return Err(
                "`initrd` and `append` are for direct kernel boot and need `kernel`".to_string(),
            );
        }
        if let Some(a) = &self.append {
            if a.contains(['\0', '\n']) {
                return Err("the kernel command line holds a NUL or a line break".to_string());
            }
        }
        let (mut guest, mut host) = (BTreeSet::new(), BTreeSet::new());
        for p in &self.ports {
            if p.guest == 0 || p.host == Some(0) {
                return Err("port 0 cannot be forwarded".to_string());
            }
            if !guest.insert(p.guest) {
                return Err(format!("guest port {} is forwarded twice", p.guest));
            }
            if let Some(h) = p.host {
                if !host.insert(h) {
                    return Err(format!("host port {h} is used twice"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for v in &self.volumes {
            validate_name(v).map_err(|e| format!("volume `{v}`: {e}"))?;
            if *v == self.name {
                return Err(format!(
                    "volume `{v}` is the boot disk already; list only the other volumes"
                ));
            }
            if !seen.insert(v) {
                return Err(format!("volume `{v}` is attached twice"));
            }
        }
        Ok(())
    }

    /// Every volume the VM uses, the boot disk first.
    pub fn disks(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.volumes.iter().map(String::as_str))
    }
}

fn port_forward(v: &toml::Value) -> Result<PortForward, String> {
    let port = |v: &toml::Value, what: &str| -> Result<u16, String> {
        match v {
            toml::Value::Integer(p) => u16::try_from(*p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{what} must be a TCP port from 1 to 65535, got {p}")),
            other => Err(format!(
                "{what} must be an integer, got {}",
                other.type_str()
            )),
        }
    };
    match v {
        toml::Value::Integer(_) => Ok(PortForward {
            guest: port(v, "the guest port")?,
            host: None,
        }),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| !matches!(k.as_str(), "guest" | "host")) {
                return Err(format!(
                    "unknown key `{k}`; a forward has `guest` and `host`"
                ));
            }
            let guest = t
                .get("guest")
                .ok_or("a forward needs `guest`, the port inside the VM")?;
            Ok(PortForward {
                guest: port(guest, "`guest`")?,
                host: t.get("host").map(|h| port(h, "`host`")).transpose()?,
            })
        }
        other => Err(format!(
            "must be a guest port or a {{ guest = N, host = M }} table, got {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(settings: &str) -> Component {
        Component {
            kind: ComponentKind::Vm,
            name: "web".to_string(),
            size_gib: 1.0,
            keep_at_source: false,
            home: None,
            settings: toml::from_str(settings).expect("settings parse"),
        }
    }

    fn resources(vcpus: u32, memory_gib: f64) -> Requirements {
        Requirements { vcpus, memory_gib }
    }

    #[test]
    fn settings_are_read_and_paths_resolved_against_the_file() {
        let spec = VmSpec::from_component(
            "shop",
            &vm(r#"
kernel = "images/vmlinuz"
initrd = "/boot/initrd.gz"
append = "console=ttyS0 quiet"
ports = [8080, { guest = 22, host = 2222 }]
volumes = ["data"]
"#),
            resources(2, 0.5),
            Path::new("/etc/fc"),
        )
        .expect("valid");
        assert_eq!(spec.name, "web");
        assert_eq!(spec.vcpus, 2);
        assert_eq!(spec.memory_mib, 512);
        assert_eq!(
            spec.kernel.as_deref(),
            Some(Path::new("/etc/fc/images/vmlinuz"))
        );
        assert_eq!(spec.initrd.as_deref(), Some(Path::new("/boot/initrd.gz")));
        assert_eq!(spec.append.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(
            spec.ports,
            [
                PortForward {
                    guest: 8080,
                    host: None
                },
                PortForward {
                    guest: 22,
                    host: Some(2222)
                }
            ]
        );
        assert_eq!(spec.disks().collect::<Vec<_>>(), ["web", "data"]);
    }

    #[test]
    fn a_disk_booted_vm_needs_no_settings_and_memory_rounds_up() {
        let spec = VmSpec::from_component("shop", &vm(""), resources(1, 0.3), Path::new("/"))
            .expect("valid");
        assert_eq!(spec.kernel, None);
        assert_eq!(spec.memory_mib, 308, "0.3 GiB is 307.2 MiB, rounded up");
    }

    #[test]
    fn every_mistake_is_named_with_its_key() {
        let err = VmSpec::from_component(
            "shop",
            &vm(r#"
kernal = "x"
initrd = 5
append = ["a"]
ports = [0, { guest = 70000 }, { host = 1 }, { guest = 1, hots = 2 }, "22"]
volumes = [1]
"#),
            resources(1, 1.0),
            Path::new("/"),
        )
        .expect_err("refused");
        let text = err.to_string();
        for (key, words) in [
            ("settings.kernal", "unknown vm setting"),
            ("settings.initrd", "must be a path, got integer"),
            ("settings.append", "one string"),
            ("settings.ports[0]", "from 1 to 65535, got 0"),
            ("settings.ports[1]", "got 70000"),
            ("settings.ports[2]", "needs `guest`"),
            ("settings.ports[3]", "unknown key `hots`"),
            ("settings.ports[4]", "got string"),
            ("settings.volumes[0]", "must be a volume name"),
        ] {
            assert!(
                err.problems
                    .iter()
                    .any(|(k, m)| k == key && m.contains(words)),
                "no `{key}` … `{words}` in {text}"
            );
        }
        assert_eq!(err.problems.len(), 9, "{text}");
        assert!(
            text.starts_with("service `shop`, component `web`: "),
            "{text}"
        );
    }

    #[test]
    fn inconsistent_specs_are_refused() {
        let cases: [(&str, Requirements, &str); 7] = [
            (r#"append = "quiet""#, resources(1, 1.0), "need `kernel`"),
            ("", resources(0, 1.0), "0 virtual CPUs"),
            ("", resources(1, 0.01), "less than the 64 MiB"),
            (
                r#"kernel = "k"
ports = [80, { guest = 80, host = 8080 }]"#,
                resources(1, 1.0),
                "guest port 80 is forwarded twice",
            ),
            (
                "ports = [{ guest = 80, host = 9 }, { guest = 81, host = 9 }]",
                resources(1, 1.0),
                "host port 9 is used twice",
            ),
            (
                r#"volumes = ["web"]"#,
                resources(1, 1.0),
                "boot disk already",
            ),
            (
                r#"volumes = ["a", "a"]"#,
                resources(1, 1.0),
                "attached twice",
            ),
        ];
        for (settings, res, words) in cases {
            let err = VmSpec::from_component("shop", &vm(settings), res, Path::new("/"))
                .expect_err(settings);
            assert!(err.to_string().contains(words), "{settings}: {err}");
        }
    }

    #[test]
    fn only_vm_components_describe_vms() {
        let mut c = vm("");
        c.kind = ComponentKind::App;
        let err = VmSpec::from_component("shop", &c, resources(1, 1.0), Path::new("/"))
            .expect_err("an app is not a vm");
        assert!(err.to_string().contains("kind: must be `vm`"), "{err}");
    }
}
