//! A `vm` component's settings.

use std::path::{Path, PathBuf};

use super::{resolve, Problems, SettingsError};
use crate::model::{ComponentKind, PortForward, Requirements, VmSpec};

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
pub fn vm(
    service: &str,
    name: &str,
    settings: &toml::Table,
    resources: Requirements,
    base_dir: &Path,
) -> Result<VmSpec, SettingsError> {
    let mut problems = Problems::start(service, name, ComponentKind::Vm, settings, VmSpec::KEYS);
    let mut problem = |key: &str, message: String| problems.add(key, message);
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
        name: name.to_string(),
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

    fn read(settings: &str, res: Requirements, base: &str) -> Result<VmSpec, SettingsError> {
        let table: toml::Table = toml::from_str(settings).expect("settings parse");
        vm("shop", "web", &table, res, Path::new(base))
    }

    fn resources(vcpus: u32, memory_gib: f64) -> Requirements {
        Requirements { vcpus, memory_gib }
    }

    #[test]
    fn settings_are_read_and_paths_resolved_against_the_file() {
        let spec = read(
            r#"
kernel = "images/vmlinuz"
initrd = "/boot/initrd.gz"
append = "console=ttyS0 quiet"
ports = [8080, { guest = 22, host = 2222 }]
volumes = ["data"]
"#,
            resources(2, 0.5),
            "/etc/fc",
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
        let spec = read("", resources(1, 0.3), "/").expect("valid");
        assert_eq!(spec.kernel, None);
        assert_eq!(spec.memory_mib, 308, "0.3 GiB is 307.2 MiB, rounded up");
    }

    #[test]
    fn every_mistake_is_named_with_its_key() {
        let err = read(
            r#"
kernal = "x"
initrd = 5
append = ["a"]
ports = [0, { guest = 70000 }, { host = 1 }, { guest = 1, hots = 2 }, "22"]
volumes = [1]
"#,
            resources(1, 1.0),
            "/",
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
            let err = read(settings, res, "/").expect_err(settings);
            assert!(err.to_string().contains(words), "{settings}: {err}");
        }
    }
}
