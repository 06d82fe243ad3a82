//! What kind of place a provider is: its [`Driver`], the [`DiskFormat`] its volumes are
//! kept in, and how many objects a bucket copy between two of them moves at once.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The driver that serves a configured provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Local,
    Qemu,
    S3,
    Swift,
}

impl Driver {
    pub const NAMES: &'static [&'static str] = &["local", "qemu", "s3", "swift"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => Driver::Local,
            "qemu" => Driver::Qemu,
            "s3" => Driver::S3,
            "swift" => Driver::Swift,
            _ => return None,
        })
    }

    /// The name the configuration's `driver` key gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Local => "local",
            Driver::Qemu => "qemu",
            Driver::S3 => "s3",
            Driver::Swift => "swift",
        }
    }

    /// Whether the driver keeps buckets (a bucket can live at such a provider of its own).
    pub fn has_object_storage(self) -> bool {
        matches!(self, Driver::Local | Driver::S3 | Driver::Swift)
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk image format, as `qemu-img` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl DiskFormat {
    pub const NAMES: &'static [&'static str] = &["raw", "qcow2", "vmdk", "vhdx"];
    pub const ALL: [DiskFormat; 4] = [
        DiskFormat::Raw,
        DiskFormat::Qcow2,
        DiskFormat::Vmdk,
        DiskFormat::Vhdx,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => DiskFormat::Raw,
            "qcow2" => DiskFormat::Qcow2,
            "vmdk" => DiskFormat::Vmdk,
            "vhdx" => DiskFormat::Vhdx,
            _ => return None,
        })
    }

    /// The name `qemu-img -f`/`-O` takes, also used as the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many objects a bucket copy moves at the same time: the copier's bounds, which the
/// configuration's `conduit.bucket_concurrency` is checked against.
pub mod bucket_copy {
    /// Objects copied at the same time unless the options say otherwise.
    pub const DEFAULT_CONCURRENCY: usize = 8;
    /// The most objects copied at the same time.
    pub const MAX_CONCURRENCY: usize = 256;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_as_they_are_written() {
        for name in Driver::NAMES {
            assert_eq!(Driver::parse(name).map(Driver::as_str), Some(*name));
        }
        for f in DiskFormat::ALL {
            assert_eq!(DiskFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(Driver::parse("ec2"), None);
        assert!(!Driver::Qemu.has_object_storage());
    }
}
