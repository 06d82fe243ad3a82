//! Volumes of the local driver: one disk image per volume, `volumes/<service>/<name>.<fmt>`,
//! created and inspected with `qemu-img`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{check_name, conflict, invalid, io_err};
use crate::providers::{object, DiskFormat, ProviderError, VolumeInfo, VolumeSpec};
use crate::sys::{self, qemu_img::QEMU_IMG};

/// Prefix of images being created; volume names cannot start with `.`.
const TMP_PREFIX: &str = ".tmp-";

pub(crate) struct Volumes {
    provider: String,
    dir: PathBuf,
    /// Creating and deleting look before they act; one at a time keeps that honest within
    /// the daemon (the root lock keeps other daemons out).
    lock: tokio::sync::Mutex<()>,
}

impl Volumes {
    pub(crate) fn new(provider: &str, dir: PathBuf) -> Self {
        Volumes {
            provider: provider.to_string(),
            dir,
            lock: tokio::sync::Mutex::new(()),
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

    /// The volume's image and format, if it exists.
    fn find(
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
            Some((path, format)) => self.inspect(service, name, &path, format).await.map(Some),
        }
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
            if DiskFormat::parse(ext).is_some() && crate::providers::validate_name(name).is_ok() {
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
        if let Some((path, format)) = self.find(service, name)? {
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

    /// Deletes the image; a volume that does not exist is already deleted.
    pub(crate) async fn delete(&self, service: &str, name: &str) -> Result<String, ProviderError> {
        self.check(service, name)?;
        let _guard = self.lock.lock().await;
        let Some((path, _)) = self.find(service, name)? else {
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
