//! The `[providers.NAME]` sections: which driver serves each provider, where, in which
//! disk format, and the settings of the `qemu` driver. Object stores' settings are in
//! [`super::object_stores`], price and benchmark feeds in [`super::feeds`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawProvider, RawQemu};
use super::{
    check_name, normalize, BenchmarkKind, BenchmarkSource, ObjectStoreSettings, PricingSource,
    Validator,
};
use crate::model::{DiskFormat, Driver, RegionInfo};

#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    pub name: String,
    pub driver: Driver,
    /// The cloud the region belongs to, for the region table; `None` matches any.
    pub cloud: Option<String>,
    pub region: String,
    pub root: Option<PathBuf>,
    /// Format new volumes get at this provider (a relocation converts to it). Default raw.
    pub disk_format: DiskFormat,
    pub pricing: Option<PricingSource>,
    pub benchmark: Option<BenchmarkSource>,
    /// Overrides of the shipped region table for this provider.
    pub region_overrides: Option<RawRegionOverride>,
    /// Settings of the `s3` and `swift` drivers; `None` for the others.
    pub object_store: Option<ObjectStoreSettings>,
    /// Settings of the `qemu` driver; `None` for the others.
    pub qemu: Option<QemuSettings>,
    /// The agent that serves this provider on another host (`https://HOST:PORT`); `None`
    /// when the driver runs in this process.
    pub agent: Option<String>,
    /// The `[tls]` files the daemon calls the agent with (set when `agent` is).
    pub tls: Option<crate::sys::tls::TlsFiles>,
    /// The address this provider's apps are reached at from other hosts: an agent's
    /// `advertise` for the providers it serves; `None` (127.0.0.1) in the daemon.
    pub address: Option<String>,
    /// Volumes that live on block devices instead of image files (`[providers.NAME.devices]`,
    /// `local` and `qemu` drivers), by `SERVICE/VOLUME`. Whether each path is a block device
    /// is checked when the provider opens.
    pub devices: BTreeMap<String, PathBuf>,
}

/// Settings of the `qemu` driver (`[providers.NAME.qemu]`). The provider's `root` holds its
/// disk pool and the runtime state of its VMs; `disk_format` is the format of the pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuSettings {
    /// The emulator (`binary`): a path (relative to the configuration file) or a name looked
    /// up in `PATH`. Default: `$FLUIDCLOUD_QEMU_SYSTEM` when set when the driver opens, else
    /// `qemu-system-x86_64`.
    pub binary: Option<PathBuf>,
    /// Extra firmware directories (`firmware_dirs`), passed as `-L` before qemu's own.
    pub firmware_dirs: Vec<PathBuf>,
    /// `LD_LIBRARY_PATH` of the emulator (`library_path`), for a qemu unpacked outside the
    /// system's library directories. Default: none.
    pub library_path: Vec<PathBuf>,
    /// `accel`: default auto.
    pub accel: Accel,
    /// How disks are attached (`disk_bus`). Default virtio.
    pub disk_bus: DiskBus,
    /// The emulated network card (`nic_model`), or `none` for no network. Default
    /// `virtio-net-pci`.
    pub nic_model: String,
    /// Least time a guest gets to power down after the ACPI power button
    /// (`powerdown_timeout_secs`); a stop waits the longer of this and the caller's
    /// timeout. Default 60 s.
    pub powerdown_timeout: Duration,
}

/// Which accelerator runs the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and a probe guest runs under it, else TCG.
    Auto,
    Kvm,
    /// Emulation: slow, but works everywhere.
    Tcg,
}

impl Accel {
    pub const NAMES: &'static [&'static str] = &["auto", "kvm", "tcg"];

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How a VM's disks are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk: `/dev/vdX` in a Linux guest.
    Virtio,
    /// The PIIX IDE controller (at most four disks).
    Ide,
    /// virtio-scsi with `scsi-hd` disks.
    Scsi,
    /// An AHCI controller with SATA disks (at most six).
    Sata,
}

impl DiskBus {
    pub const NAMES: &'static [&'static str] = &["virtio", "ide", "scsi", "sata"];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Ide => "ide",
            DiskBus::Scsi => "scsi",
            DiskBus::Sata => "sata",
        }
    }
}

/// Network cards `nic_model` accepts: what qemu-system-x86_64 emulates with a driver in
/// common guests, and `none`.
pub const NIC_MODELS: &[&str] = &[
    "virtio-net-pci",
    "e1000",
    "e1000e",
    "rtl8139",
    "vmxnet3",
    "pcnet",
    "ne2k_pci",
    "none",
];

/// Region facts given in the configuration; `None` keeps the table's value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RawRegionOverride {
    pub country: Option<String>,
    pub subdivision: Option<String>,
    pub eu: Option<bool>,
    pub eea: Option<bool>,
    pub tags: Option<Vec<String>>,
}

impl RawRegionOverride {
    pub fn apply(&self, base: &mut RegionInfo) {
        if let Some(v) = &self.country {
            base.country = v.clone();
        }
        if let Some(v) = &self.subdivision {
            base.subdivision = v.clone();
        }
        if let Some(v) = self.eu {
            base.eu = v;
        }
        if let Some(v) = self.eea {
            base.eea = v;
        }
        if let Some(v) = &self.tags {
            base.tags = v.clone();
        }
    }
}

impl Validator<'_> {
    /// Two providers with the same root, or two volumes on the same block device, would
    /// overwrite each other's images.
    pub(super) fn distinct_roots(&mut self, providers: &BTreeMap<String, Provider>) {
        let mut owners: BTreeMap<PathBuf, &str> = BTreeMap::new();
        for (name, p) in providers {
            let Some(root) = &p.root else { continue };
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| normalize(root));
            if let Some(first) = owners.insert(root.clone(), name) {
                owners.insert(root.clone(), first);
                self.err(
                    format!("providers.{name}.root"),
                    format!(
                        "{} is already the root of provider `{first}`; each provider needs a directory of its own",
                        root.display()
                    ),
                );
            }
        }
        // Within one provider this was checked with its other keys; across providers here.
        let mut devices: BTreeMap<&Path, (&str, &str)> = BTreeMap::new();
        for (name, p) in providers {
            for (volume, device) in &p.devices {
                match devices.get(device.as_path()) {
                    Some((other, other_volume)) if other != name => {
                        let msg = format!(
                            "{} is already the device of `{other_volume}` at provider `{other}`; each volume needs a device of its own",
                            device.display()
                        );
                        self.err(format!("providers.{name}.devices.{volume}"), msg);
                    }
                    Some(_) => {}
                    None => {
                        devices.insert(device, (name, volume));
                    }
                }
            }
        }
    }

    pub(super) fn provider(&mut self, name: &str, raw: RawProvider) -> Provider {
        let key = format!("providers.{name}");
        check_name(self, &key, name);
        let driver = Driver::parse(&raw.driver).unwrap_or_else(|| {
            self.err(
                format!("{key}.driver"),
                format!(
                    "`{}` is not a known driver; known drivers: {}",
                    raw.driver,
                    Driver::NAMES.join(", ")
                ),
            );
            Driver::Local
        });
        if raw.region.trim().is_empty() {
            self.err(format!("{key}.region"), "must not be empty");
        }
        let disk_format = match raw.disk_format.as_deref() {
            None => DiskFormat::Raw,
            Some(f) => DiskFormat::parse(f).unwrap_or_else(|| {
                self.err(
                    format!("{key}.disk_format"),
                    format!("`{f}` is not one of {}", DiskFormat::NAMES.join(", ")),
                );
                DiskFormat::Raw
            }),
        };
        let pricing = raw
            .pricing
            .map(|p| self.pricing(&format!("{key}.pricing"), name, &raw.region, p));
        let benchmark = raw
            .benchmark
            .map(|b| self.benchmark(&format!("{key}.benchmark"), b));
        let region_overrides = raw.region_info.map(|r| {
            if let Some(c) = &r.country {
                if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_uppercase()) {
                    self.err(
                        format!("{key}.region_info.country"),
                        format!("`{c}` is not an ISO 3166-1 alpha-2 code such as DE"),
                    );
                }
            }
            RawRegionOverride {
                country: r.country,
                subdivision: r.subdivision,
                eu: r.eu,
                eea: r.eea,
                tags: r.tags,
            }
        });
        let object_store = self.object_store(&key, name, driver, &raw.region, raw.s3, raw.swift);
        if let Some(agent) = &raw.agent {
            self.provider_agent(&key, driver, agent);
            for (set, what) in [
                (raw.root.is_some(), "root"),
                (raw.qemu.is_some(), "qemu"),
                (raw.devices.is_some(), "devices"),
            ] {
                if set {
                    self.err(
                        format!("{key}.{what}"),
                        "belongs in the configuration of the agent that serves this provider",
                    );
                }
            }
            if let Some(BenchmarkSource {
                kind: BenchmarkKind::Builtin { .. },
                ..
            }) = &benchmark
            {
                self.err(
                    format!("{key}.benchmark"),
                    "the builtin benchmark measures a disk of the daemon's host, not of the agent's: use `kind = \"command\"` with a program that measures the agent's host, or leave it out",
                );
            }
        }
        let qemu = if raw.agent.is_some() {
            None
        } else {
            self.qemu(&key, driver, raw.qemu)
        };
        let devices = if raw.agent.is_some() {
            BTreeMap::new()
        } else {
            self.devices(&key, driver, disk_format, raw.devices)
        };
        if driver == Driver::Qemu && raw.root.is_none() && raw.agent.is_none() {
            self.err(
                format!("{key}.root"),
                "a qemu provider needs `root`, the directory holding its disk pool and VMs",
            );
        }
        Provider {
            name: name.to_string(),
            driver,
            cloud: raw.cloud,
            region: raw.region,
            root: raw.root.map(|r| self.path(&r)),
            disk_format,
            pricing,
            benchmark,
            region_overrides,
            object_store,
            qemu,
            agent: raw.agent,
            tls: None,
            address: None,
            devices,
        }
    }

    /// `[providers.NAME.devices]`: keys `SERVICE/VOLUME`, values absolute paths, no device
    /// twice. The devices hold raw images, so the provider's `disk_format` must be raw (the
    /// planner creates a provider's volumes in that format).
    fn devices(
        &mut self,
        key: &str,
        driver: Driver,
        disk_format: DiskFormat,
        raw: Option<BTreeMap<String, String>>,
    ) -> BTreeMap<String, PathBuf> {
        let Some(raw) = raw else {
            return BTreeMap::new();
        };
        let key = format!("{key}.devices");
        if !matches!(driver, Driver::Local | Driver::Qemu) {
            self.err(
                key,
                "belongs to providers with driver = \"local\" or \"qemu\"",
            );
            return BTreeMap::new();
        }
        if !raw.is_empty() && disk_format != DiskFormat::Raw {
            self.err(
                &key,
                format!(
                    "volumes on block devices hold raw images, but the provider's disk_format is {disk_format}; set disk_format = \"raw\""
                ),
            );
        }
        let mut out = BTreeMap::new();
        let mut seen: BTreeMap<PathBuf, String> = BTreeMap::new();
        for (volume, path) in raw {
            // Unquoted, so that the error is located at the key (names hold no `.`).
            let entry = format!("{key}.{volume}");
            let names = volume.split_once('/').map(|(s, v)| {
                (
                    crate::model::names::validate_name(s),
                    crate::model::names::validate_name(v),
                )
            });
            match names {
                Some((Ok(()), Ok(()))) => {}
                Some((Err(e), _)) | Some((_, Err(e))) => {
                    self.err(&entry, format!("the key must be SERVICE/VOLUME: {e}"));
                    continue;
                }
                None => {
                    self.err(&entry, "the key must be SERVICE/VOLUME");
                    continue;
                }
            }
            if !path.starts_with('/') {
                self.err(
                    &entry,
                    format!(
                        "`{path}` must be the absolute path of a block device, such as /dev/xvdf"
                    ),
                );
                continue;
            }
            let path = normalize(Path::new(&path));
            if let Some(other) = seen.insert(path.clone(), volume.clone()) {
                self.err(
                    &entry,
                    format!(
                        "{} is already the device of `{other}`; each volume needs a device of its own",
                        path.display()
                    ),
                );
                continue;
            }
            out.insert(volume, path);
        }
        out
    }

    fn qemu(&mut self, key: &str, driver: Driver, raw: Option<RawQemu>) -> Option<QemuSettings> {
        if driver != Driver::Qemu {
            if raw.is_some() {
                self.err(
                    format!("{key}.qemu"),
                    "belongs to providers with driver = \"qemu\"",
                );
            }
            return None;
        }
        let raw = raw.unwrap_or_default();
        let key = format!("{key}.qemu");
        let binary = match raw.binary {
            None => None,
            Some(b) if b.trim().is_empty() => {
                self.err(format!("{key}.binary"), "must not be empty");
                None
            }
            // A bare name is looked up in PATH when the driver runs it, as a shell would.
            Some(b) if !b.contains('/') => Some(PathBuf::from(b)),
            Some(b) => Some(self.path(&b)),
        };
        let dirs = |this: &mut Self, field: &str, list: Option<Vec<String>>| {
            let mut out = Vec::new();
            for (i, d) in list.unwrap_or_default().into_iter().enumerate() {
                if d.trim().is_empty() || d.contains(':') {
                    this.err(
                        format!("{key}.{field}[{i}]"),
                        format!("`{d}` must be a non-empty directory path without `:`"),
                    );
                } else {
                    out.push(this.path(&d));
                }
            }
            out
        };
        let firmware_dirs = dirs(self, "firmware_dirs", raw.firmware_dirs);
        let library_path = dirs(self, "library_path", raw.library_path);
        let accel = match raw.accel.as_deref() {
            None | Some("auto") => Accel::Auto,
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            Some(other) => {
                self.err(
                    format!("{key}.accel"),
                    format!("`{other}` is not one of {}", Accel::NAMES.join(", ")),
                );
                Accel::Auto
            }
        };
        let disk_bus = match raw.disk_bus.as_deref() {
            None | Some("virtio") => DiskBus::Virtio,
            Some("ide") => DiskBus::Ide,
            Some("scsi") => DiskBus::Scsi,
            Some("sata") => DiskBus::Sata,
            Some(other) => {
                self.err(
                    format!("{key}.disk_bus"),
                    format!("`{other}` is not one of {}", DiskBus::NAMES.join(", ")),
                );
                DiskBus::Virtio
            }
        };
        let nic_model = raw
            .nic_model
            .unwrap_or_else(|| "virtio-net-pci".to_string());
        if !NIC_MODELS.contains(&nic_model.as_str()) {
            self.err(
                format!("{key}.nic_model"),
                format!("`{nic_model}` is not one of {}", NIC_MODELS.join(", ")),
            );
        }
        let powerdown_timeout = Duration::from_secs(self.at_least(
            &format!("{key}.powerdown_timeout_secs"),
            raw.powerdown_timeout_secs,
            60,
            1,
        ));
        Some(QemuSettings {
            binary,
            firmware_dirs,
            library_path,
            accel,
            disk_bus,
            nic_model,
            powerdown_timeout,
        })
    }
}
