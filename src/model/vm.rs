//! [`VmSpec`]: what a provider needs to run a virtual machine, as a `vm` component's
//! `settings` and the service's CPU and memory requirements describe it (the configuration
//! reads them).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::names::validate_name;

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

/// Least memory a guest is given; less does not boot a current Linux kernel.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most virtual CPUs qemu's default x86 machine takes.
pub const MAX_VCPUS: u32 = 255;

impl VmSpec {
    /// Settings keys a `vm` component understands.
    pub const KEYS: &'static [&'static str] = &["kernel", "initrd", "append", "ports", "volumes"];

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
