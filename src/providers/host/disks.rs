//! Volumes of the local driver: one disk image per volume, `volumes/<service>/<name>.<fmt>`,
//! created and inspected with `qemu-img`, or a block device at a path.
//!
//! # Volumes on block devices
//!
//! A provider's configuration may map volumes to block devices (`[providers.NAME.devices]`,
//! `"SERVICE/VOLUME" = "/dev/xvdf"`): a cloud volume attached to the worker that runs the
//! agent, say. Such a volume holds a raw image; its path is the device and its virtual size
//! the device's. The mapping says where the volume would live, not that it exists: creating
//! it takes the device (when it is at least the size asked, and the format asked is raw) and
//! records that in `volumes/<service>/<name>.device`, a symbolic link to the configured path;
//! deleting it removes that record and nothing else. The device node and the data on it are
//! never removed or cleared by the provider: the device belongs to whoever attached it, and a
//! wrong mapping must not cost another volume its data. So a deleted (decommissioned)
//! volume's data stays on the device until the device is cleared or detached by hand; the
//! operation record and the log say so.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{check_name, conflict, invalid, io_err};
use crate::providers::{object, DiskFormat, ProviderError, VolumeInfo, VolumeSpec};
use crate::sys::{self, qemu_img::QEMU_IMG};

/// Prefix of images being created; volume names cannot start with `.`.
const TMP_PREFIX: &str = ".tmp-";

/// Extension of the record that a volume was created on its mapped block device.
const DEVICE_EXT: &str = "device";

/// The block devices volumes are mapped to, by (service, volume): the configured paths.
pub(crate) type DeviceMap = BTreeMap<(String, String), PathBuf>;

/// Where a volume that exists lives.
enum Found {
    Image(PathBuf, DiskFormat),
    /// On its block device, at the configured path.
    Device(PathBuf),
}

pub(crate) struct Volumes {
    provider: String,
    dir: PathBuf,
    /// Set when the provider opens, replaced when it is opened again with a new configuration.
    devices: std::sync::RwLock<DeviceMap>,
    /// Creating and deleting look before they act; one at a time keeps that honest within
    /// the daemon (the root lock keeps other daemons out).
    lock: tokio::sync::Mutex<()>,
}

impl Volumes {
    pub(crate) fn new(provider: &str, dir: PathBuf) -> Self {
        Volumes {
            provider: provider.to_string(),
            dir,
            devices: std::sync::RwLock::new(BTreeMap::new()),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Maps volumes to block devices (`[providers.NAME.devices]`, keys `SERVICE/VOLUME`).
    /// Every path must be a block device now (a symbolic link to one is fine, and followed
    /// each time the volume is used), and no two volumes may share one; otherwise nothing
    /// changes and the error names the key.
    pub(crate) fn set_devices(
        &self,
        devices: &BTreeMap<String, PathBuf>,
    ) -> Result<(), ProviderError> {
        let setup = |key: &str, reason: String| ProviderError::Setup {
            provider: self.provider.clone(),
            reason: format!("providers.{}.devices.\"{key}\": {reason}", self.provider),
        };
        let mut map = DeviceMap::new();
        let mut seen: BTreeMap<PathBuf, &str> = BTreeMap::new();
        for (key, path) in devices {
            let Some((service, name)) = key.split_once('/').filter(|(s, n)| {
                crate::providers::validate_name(s).is_ok()
                    && crate::providers::validate_name(n).is_ok()
            }) else {
                return Err(setup(key, "the key must be SERVICE/VOLUME".to_string()));
            };
            let real = block_device(path).map_err(|reason| setup(key, reason))?;
            if let Some(other) = seen.insert(real.clone(), key) {
                return Err(setup(
                    key,
                    format!(
                        "{} is the same device as `{other}`; each volume needs a device of its own",
                        real.display()
                    ),
                ));
            }
            map.insert((service.to_string(), name.to_string()), path.clone());
        }
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    /// The configured block device of a volume, if it is mapped to one.
    fn mapped(&self, service: &str, name: &str) -> Option<PathBuf> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(service.to_string(), name.to_string()))
            .cloned()
    }

    fn record_path(&self, service: &str, name: &str) -> PathBuf {
        self.dir.join(service).join(format!("{name}.{DEVICE_EXT}"))
    }

    /// The device a volume was created on, from its record, if it has one.
    fn recorded(&self, service: &str, name: &str) -> Result<Option<PathBuf>, ProviderError> {
        let record = self.record_path(service, name);
        match std::fs::read_link(&record) {
            Ok(device) => Ok(Some(device)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(
                &self.provider,
                object::volume(service, name),
                format!("read the device record {}", record.display()),
                e,
            )),
        }
    }

    /// Removes images a crash left half-created.
    pub(crate) fn remove_leftovers(&self) {
        let Ok(services) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for service in services.flatten() {
            let Ok(files) = std::fs::read_dir(service.path()) else {
                continue;
            };
            for f in files.flatten() {
                if f.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    if let Err(e) = std::fs::remove_file(f.path()) {
                        tracing::warn!(
                            provider = %self.provider,
                            "Could not remove the unfinished image {}: {e}.",
                            f.path().display()
                        );
                    }
                }
            }
        }
    }

    fn check(&self, service: &str, name: &str) -> Result<(), ProviderError> {
        let obj = || object::volume(service, name);
        check_name(&self.provider, obj, "service name", service)?;
        check_name(&self.provider, obj, "volume name", name)
    }

    /// Where the volume lives, if it exists: its block device (when it was created on the
    /// device the configuration maps it to) or its image.
    fn find(&self, service: &str, name: &str) -> Result<Option<Found>, ProviderError> {
        let images = self.find_image(service, name)?;
        let obj = || object::volume(service, name);
        let mapped = self.mapped(service, name);
        match (self.recorded(service, name)?, mapped, images) {
            (Some(device), None, _) => Err(invalid(
                &self.provider,
                obj(),
                format!(
                    "it was created on the block device {}, which `providers.{}.devices` no longer maps; map it again, or remove {} to forget the volume (the device is left as it is)",
                    device.display(),
                    self.provider,
                    self.record_path(service, name).display()
                ),
            )),
            (Some(device), Some(mapped), _) if device != mapped => Err(conflict(
                &self.provider,
                obj(),
                format!(
                    "it was created on the block device {}, the configuration now maps it to {}; restore the mapping, or delete the volume first",
                    device.display(),
                    mapped.display()
                ),
            )),
            (Some(device), Some(_), Some((image, _))) | (None, Some(device), Some((image, _))) => {
                Err(conflict(
                    &self.provider,
                    obj(),
                    format!(
                        "it is mapped to the block device {} and also has the image {}; move or remove the image",
                        device.display(),
                        image.display()
                    ),
                ))
            }
            (Some(device), Some(_), None) => Ok(Some(Found::Device(device))),
            (None, _, image) => Ok(image.map(|(path, format)| Found::Image(path, format))),
        }
    }

    /// The volume's image and format, if it has one.
    fn find_image(
        &self,
        service: &str,
        name: &str,
    ) -> Result<Option<(PathBuf, DiskFormat)>, ProviderError> {
        let mut found = Vec::new();
        for format in DiskFormat::ALL {
            let path = self.path(service, name, format);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => found.push((path, format)),
                Ok(_) => {
                    return Err(invalid(
                        &self.provider,
                        object::volume(service, name),
                        format!("{} is not a regular file", path.display()),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(io_err(
                        &self.provider,
                        object::volume(service, name),
                        format!("look at {}", path.display()),
                        e,
                    ))
                }
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(conflict(
                &self.provider,
                object::volume(service, name),
                format!(
                    "it has more than one image: {}; remove the stray one",
                    found
                        .iter()
                        .map(|(p, _)| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    fn path(&self, service: &str, name: &str, format: DiskFormat) -> PathBuf {
        self.dir.join(service).join(format!("{name}.{format}"))
    }

    pub(crate) async fn info(
        &self,
        service: &str,
        name: &str,
    ) -> Result<Option<VolumeInfo>, ProviderError> {
        self.check(service, name)?;
        match self.find(service, name)? {
            None => Ok(None),
            Some(Found::Image(path, format)) => {
                self.inspect(service, name, &path, format).await.map(Some)
            }
            Some(Found::Device(device)) => self.inspect_device(service, name, &device).map(Some),
        }
    }

    /// A volume on a block device: raw, as large as the device. Its path is the device
    /// node the configured path leads to now (the configured one may be a link such as
    /// `/dev/disk/by-id/…`), which copies open without following links.
    fn inspect_device(
        &self,
        service: &str,
        name: &str,
        device: &Path,
    ) -> Result<VolumeInfo, ProviderError> {
        let obj = || object::volume(service, name);
        let real = block_device(device).map_err(|reason| invalid(&self.provider, obj(), reason))?;
        let size = device_size(&real).map_err(|e| {
            io_err(
                &self.provider,
                obj(),
                format!("measure {}", real.display()),
                e,
            )
        })?;
        Ok(VolumeInfo {
            service: service.to_string(),
            name: name.to_string(),
            format: DiskFormat::Raw,
            virtual_size: size,
            // A device has no holes to leave out: all of it is the volume's.
            allocated_bytes: size,
            path: Some(real),
        })
    }

    pub(crate) async fn list(&self, service: &str) -> Result<Vec<VolumeInfo>, ProviderError> {
        check_name(
            &self.provider,
            || object::service(service),
            "service name",
            service,
        )?;
        let dir = self.dir.join(service);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io_err(
                    &self.provider,
                    object::service(service),
                    format!("list {}", dir.display()),
                    e,
                ))
            }
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            let Some((name, ext)) = file.rsplit_once('.') else {
                continue;
            };
            if (DiskFormat::parse(ext).is_some() || ext == DEVICE_EXT)
                && crate::providers::validate_name(name).is_ok()
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        names.dedup();
        let mut out = Vec::new();
        for name in names {
            if let Some(info) = self.info(service, &name).await? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Creates the image unless one with the same format and size exists. Returns what
    /// happened, for the operation record.
    pub(crate) async fn create(
        &self,
        service: &str,
        spec: &VolumeSpec,
    ) -> Result<String, ProviderError> {
        let name = &spec.name;
        self.check(service, name)?;
        let obj = || object::volume(service, name);
        if spec.size_bytes == 0 || !spec.size_bytes.is_multiple_of(512) {
            return Err(invalid(
                &self.provider,
                obj(),
                format!(
                    "size {} bytes is not a positive multiple of 512 (disks have 512-byte sectors)",
                    spec.size_bytes
                ),
            ));
        }
        let _guard = self.lock.lock().await;
        let found = self.find(service, name)?;
        if let Some(device) = self.mapped(service, name) {
            return self.create_on_device(service, spec, &device, found.is_some());
        }
        if let Some(Found::Image(path, format)) = found {
            let have = self.inspect(service, name, &path, format).await?;
            if have.format == spec.format && have.virtual_size == spec.size_bytes {
                return Ok("already existed with the same format and size".to_string());
            }
            return Err(conflict(
                &self.provider,
                obj(),
                format!(
                    "it exists as {} of {} bytes, asked for {} of {} bytes",
                    have.format, have.virtual_size, spec.format, spec.size_bytes
                ),
            ));
        }
        let dir = self.dir.join(service);
        std::fs::create_dir_all(&dir).map_err(|e| {
            io_err(
                &self.provider,
                obj(),
                format!("create {}", dir.display()),
                e,
            )
        })?;
        // qemu-img writes into a temporary name first, so a crash never leaves a half-made
        // image under the volume's own name.
        let final_path = self.path(service, name, spec.format);
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{name}-{:08x}.{}",
            fastrand::u32(..),
            spec.format
        ));
        let size = spec.size_bytes.to_string();
        let created = qemu_img(
            &self.provider,
            &obj(),
            &[
                OsStr::new("create"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new(spec.format.as_str()),
                tmp.as_os_str(),
                OsStr::new(&size),
            ],
        )
        .await;
        if let Err(e) = created {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // A disk holds the service's data: only the provider's user may read it.
        let renamed =
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .and_then(|()| std::fs::rename(&tmp, &final_path))
                .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(
                &self.provider,
                obj(),
                format!("move the new image to {}", final_path.display()),
                e,
            ));
        }
        Ok(format!(
            "created {} ({} bytes)",
            final_path.display(),
            spec.size_bytes
        ))
    }

    /// Takes the mapped block device for a volume: it must be at least the size asked and
    /// the format raw. The device's content is left as it is (a relocation overwrites it
    /// and verifies what it wrote). `exists`: the volume was created before.
    fn create_on_device(
        &self,
        service: &str,
        spec: &VolumeSpec,
        device: &Path,
        exists: bool,
    ) -> Result<String, ProviderError> {
        let name = &spec.name;
        let obj = || object::volume(service, name);
        let have = self.inspect_device(service, name, device)?;
        if spec.format != DiskFormat::Raw {
            return Err(conflict(
                &self.provider,
                obj(),
                format!(
                    "it is mapped to the block device {}, which holds a raw image; asked for {}",
                    device.display(),
                    spec.format
                ),
            ));
        }
        if have.virtual_size < spec.size_bytes {
            return Err(conflict(
                &self.provider,
                obj(),
                format!(
                    "it is mapped to the block device {}, which holds {} bytes; asked for {} bytes",
                    device.display(),
                    have.virtual_size,
                    spec.size_bytes
                ),
            ));
        }
        let size = if have.virtual_size == spec.size_bytes {
            format!("{} bytes, the size asked", have.virtual_size)
        } else {
            format!(
                "{} bytes, more than the {} asked: the volume is as large as the device",
                have.virtual_size, spec.size_bytes
            )
        };
        if exists {
            return Ok(format!(
                "already existed on the block device {} ({size})",
                device.display()
            ));
        }
        let dir = self.dir.join(service);
        let io = |what: String| move |e| io_err(&self.provider, obj(), what, e);
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let record = self.record_path(service, name);
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{name}-{:08x}.{DEVICE_EXT}",
            fastrand::u32(..)
        ));
        let made = std::os::unix::fs::symlink(device, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &record))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(format!("record the device in {}", record.display()))(e));
        }
        Ok(format!(
            "took the block device {} ({size}); its content was left as it is",
            device.display()
        ))
    }

    /// Deletes the image; a volume that does not exist is already deleted. A volume on a
    /// block device is only forgotten: the device and its data stay.
    pub(crate) async fn delete(&self, service: &str, name: &str) -> Result<String, ProviderError> {
        self.check(service, name)?;
        let _guard = self.lock.lock().await;
        // The record goes even when the mapping changed or went since it was made.
        if let Some(device) = self.recorded(service, name)? {
            let record = self.record_path(service, name);
            std::fs::remove_file(&record)
                .and_then(|()| std::fs::File::open(self.dir.join(service))?.sync_all())
                .map_err(|e| {
                    io_err(
                        &self.provider,
                        object::volume(service, name),
                        format!("remove the device record {}", record.display()),
                        e,
                    )
                })?;
            tracing::warn!(
                provider = %self.provider,
                "Volume `{service}/{name}` was deleted; it was on the block device {}, which was \
                 left as it is, with the volume's data on it: clear or detach it by hand once \
                 the data is no longer needed.",
                device.display()
            );
            return Ok(format!(
                "released the block device {}; the device and the data on it were left as they are (not erased)",
                device.display()
            ));
        }
        let Some(Found::Image(path, _)) = self.find(service, name)? else {
            return Ok("did not exist".to_string());
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(format!("deleted {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("did not exist".to_string()),
            Err(e) => Err(io_err(
                &self.provider,
                object::volume(service, name),
                format!("delete {}", path.display()),
                e,
            )),
        }
    }

    async fn inspect(
        &self,
        service: &str,
        name: &str,
        path: &Path,
        format: DiskFormat,
    ) -> Result<VolumeInfo, ProviderError> {
        let obj = object::volume(service, name);
        // -f: never let qemu-img guess the format of an image (a raw image can look like
        // anything); -U: answer even while a VM or a copy holds the image open.
        let out = qemu_img(
            &self.provider,
            &obj,
            &[
                OsStr::new("info"),
                OsStr::new("-U"),
                OsStr::new("-f"),
                OsStr::new(format.as_str()),
                OsStr::new("--output=json"),
                path.as_os_str(),
            ],
        )
        .await?;
        let bad = |what: String| ProviderError::Tool {
            provider: self.provider.clone(),
            object: obj.clone(),
            program: QEMU_IMG.to_string(),
            detail: what,
        };
        let json: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
            bad(format!(
                "`info --output=json` printed something that is not JSON: {e}"
            ))
        })?;
        let virtual_size = json
            .get("virtual-size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("`info` reported no virtual-size".to_string()))?;
        let allocated_bytes = match json.get("actual-size").and_then(serde_json::Value::as_u64) {
            Some(n) => n,
            None => {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(path)
                    .map(|m| m.blocks() * 512)
                    .map_err(|e| {
                        io_err(
                            &self.provider,
                            obj.clone(),
                            format!("stat {}", path.display()),
                            e,
                        )
                    })?
            }
        };
        Ok(VolumeInfo {
            service: service.to_string(),
            name: name.to_string(),
            format,
            virtual_size,
            allocated_bytes,
            path: Some(path.to_path_buf()),
        })
    }
}

/// The block device `path` leads to (following links), or why it is not one.
fn block_device(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let real = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
    let meta =
        std::fs::metadata(&real).map_err(|e| format!("cannot look at {}: {e}", real.display()))?;
    if !meta.file_type().is_block_device() {
        return Err(format!("{} is not a block device", real.display()));
    }
    Ok(real)
}

/// The size of the block device at `path`: where its end is.
fn device_size(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(path)?.seek(SeekFrom::End(0))
}

/// Runs `qemu-img` for `obj` and returns its standard output.
async fn qemu_img(provider: &str, obj: &str, args: &[&OsStr]) -> Result<Vec<u8>, ProviderError> {
    sys::qemu_img::qemu_img(args)
        .await
        .map_err(|e| ProviderError::Tool {
            provider: provider.to_string(),
            object: obj.to_string(),
            program: QEMU_IMG.to_string(),
            detail: e.to_string(),
        })
}
