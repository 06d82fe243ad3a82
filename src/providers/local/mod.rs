//! The `local` driver: a provider that lives in one directory on this machine and needs
//! nothing else running.
//!
//! ```text
//! ROOT/volumes/<service>/<volume>.<raw|qcow2|vmdk|vhdx>   disk images, made by qemu-img
//! ROOT/buckets/<service>/<bucket>/<key…>                  objects as files; `/` in keys = directories;
//!                                                         content type and metadata in `user.*` xattrs
//! ROOT/apps/<service>/<app>/spec.json                     the AppSpec it was started with
//!                          /desired                       `running` or `stopped`
//!                          /pid                           pid and /proc start time of the process
//!                          /stdout.log, stderr.log        the app's output
//! ROOT/operations/<id>.json                               finished operations, for the journal
//! ROOT/tmp/                                               objects being written
//! ROOT/.lock                                              held while a daemon uses the root
//! ```
//!
//! Apps are supervised processes in their own session: one that exits on its own is started
//! again with backoff. Dropping the provider stops supervising but leaves the processes
//! running; the next [`LocalProvider`] on the same root adopts them from their pid files,
//! checking the process start time so that a reused pid is never taken for an app.

mod apps;
mod buckets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;

use super::host::disks::Volumes;
use super::host::operations::{self, OpStore};
use super::host::{
    available_bytes, check_name, conflict, invalid, io_err, lock_root, not_found, write_atomic,
    RootLock,
};
use super::{
    object, AppSpec, AppStatus, BucketLocation, Capabilities, DiskFormat, Endpoint, ObjectBody,
    ObjectInfo, ObjectMeta, ObjectStat, ObjectStream, Operation, OperationId, OperationKind,
    Provider, ProviderError, StopOptions, StopOutcome, VolumeInfo, VolumeSpec,
};
use crate::config;
use crate::model::Driver;

/// Every live provider in this process by canonical root: opening a root twice hands out the
/// same instance, because two supervisors of one app would fight over it.
static OPEN: Mutex<BTreeMap<PathBuf, Weak<LocalProvider>>> = Mutex::new(BTreeMap::new());

pub struct LocalProvider {
    name: String,
    root: PathBuf,
    disk_format: DiskFormat,
    ops: OpStore,
    volumes: Volumes,
    buckets: buckets::Buckets,
    apps: apps::Apps,
    /// The address its apps are reached at (see [`config::Provider::address`]).
    address: std::sync::RwLock<String>,
    /// Declared last so it is released only after the supervisors have been stopped.
    _root_lock: Arc<RootLock>,
}

impl LocalProvider {
    /// Opens the provider a configuration names; it must use the `local` driver and have a
    /// `root`. Must be called inside a tokio runtime (apps are supervised by tasks).
    pub fn open(provider: &config::Provider) -> Result<Arc<LocalProvider>, ProviderError> {
        if provider.driver != Driver::Local {
            return Err(ProviderError::Setup {
                provider: provider.name.clone(),
                reason: format!(
                    "it uses the `{}` driver, not `local`",
                    provider.driver.as_str()
                ),
            });
        }
        let root = provider.root.as_ref().ok_or_else(|| ProviderError::Setup {
            provider: provider.name.clone(),
            reason: "the local driver needs `root`, the directory it keeps services in".to_string(),
        })?;
        let opened = Self::open_at(&provider.name, root, provider.disk_format)?;
        opened.volumes.set_devices(&provider.devices)?;
        if let Some(address) = &provider.address {
            *opened.address.write().unwrap_or_else(|e| e.into_inner()) = address.clone();
        }
        Ok(opened)
    }

    /// An app's status with its endpoint at this provider's address.
    fn reached(&self, mut status: AppStatus) -> AppStatus {
        if let Some(ep) = &mut status.endpoint {
            ep.host = self.address();
        }
        status
    }

    /// Opens (creating it if needed) a local provider in `root`.
    pub fn open_at(
        name: &str,
        root: &Path,
        disk_format: DiskFormat,
    ) -> Result<Arc<LocalProvider>, ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: name.to_string(),
            reason,
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            setup("the local driver must be opened inside a tokio runtime; it supervises apps with tasks".to_string())
        })?;
        std::fs::create_dir_all(root)
            .map_err(|e| setup(format!("cannot create its root {}: {e}", root.display())))?;
        let root = root
            .canonicalize()
            .map_err(|e| setup(format!("cannot resolve its root {}: {e}", root.display())))?;

        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = open.get(&root).and_then(Weak::upgrade) {
            if existing.name == name && existing.disk_format == disk_format {
                return Ok(existing);
            }
            return Err(setup(format!(
                "its root {} is already used by provider `{}` in this daemon; each provider needs a root of its own",
                root.display(),
                existing.name
            )));
        }
        open.retain(|_, w| w.strong_count() > 0);

        let root_lock = lock_root(&root, name).map_err(|e| setup(e.to_string()))?;
        for sub in ["volumes", "buckets", "apps", "operations", "tmp"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Whatever is left in tmp/ belonged to a write that never finished; the root lock
        // guarantees nobody is writing now.
        clear_dir(&root.join("tmp"))
            .map_err(|e| setup(format!("cannot clear {}: {e}", root.join("tmp").display())))?;
        let ops = OpStore::new(name, root.join("operations"));
        ops.prune(operations::KEEP);
        let volumes = Volumes::new(name, root.join("volumes"));
        volumes.remove_leftovers();
        let buckets = buckets::Buckets::new(name, root.join("buckets"), root.join("tmp"));
        let apps = apps::Apps::load(name, root.join("apps"), runtime)?;
        let provider = Arc::new(LocalProvider {
            name: name.to_string(),
            root: root.clone(),
            disk_format,
            ops,
            volumes,
            buckets,
            apps,
            address: std::sync::RwLock::new(super::LOOPBACK.to_string()),
            _root_lock: root_lock,
        });
        open.insert(root, Arc::downgrade(&provider));
        Ok(provider)
    }

    /// The provider's directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an app: its spec, pid file and logs.
    pub fn app_dir(&self, service: &str, app: &str) -> PathBuf {
        self.root.join("apps").join(service).join(app)
    }
}

pub(crate) fn clear_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[async_trait]
impl Provider for LocalProvider {
    fn address(&self) -> String {
        self.address
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> Driver {
        Driver::Local
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of(Driver::Local)
    }

    fn preferred_disk_format(&self) -> DiskFormat {
        self.disk_format
    }

    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        self.ops.get(id)
    }

    async fn volume_info(
        &self,
        service: &str,
        volume: &str,
    ) -> Result<Option<VolumeInfo>, ProviderError> {
        self.volumes.info(service, volume).await
    }

    async fn list_volumes(&self, service: &str) -> Result<Vec<VolumeInfo>, ProviderError> {
        self.volumes.list(service).await
    }

    async fn create_volume(
        &self,
        service: &str,
        spec: &VolumeSpec,
    ) -> Result<Operation, ProviderError> {
        let detail = self.volumes.create(service, spec).await?;
        self.ops.succeeded(
            OperationKind::CreateVolume,
            object::volume(service, &spec.name),
            detail,
        )
    }

    async fn delete_volume(&self, service: &str, volume: &str) -> Result<Operation, ProviderError> {
        let detail = self.volumes.delete(service, volume).await?;
        self.ops.succeeded(
            OperationKind::DeleteVolume,
            object::volume(service, volume),
            detail,
        )
    }

    async fn ensure_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        self.buckets.ensure(service, bucket).await
    }

    async fn delete_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        self.buckets.delete(service, bucket).await
    }

    async fn list_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        self.buckets.list(service, bucket).await
    }

    async fn list_non_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<String>, ProviderError> {
        self.buckets.non_objects(service, bucket).await
    }

    async fn read_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        self.buckets.read(service, bucket, key).await
    }

    async fn write_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
    ) -> Result<ObjectInfo, ProviderError> {
        self.buckets
            .write(service, bucket, key, body, &ObjectMeta::default())
            .await
    }

    async fn write_object_with_meta(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        self.buckets.write(service, bucket, key, body, meta).await
    }

    async fn stat_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        self.buckets.stat(service, bucket, key).await
    }

    async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        self.buckets.delete_object(service, bucket, key).await
    }

    async fn bucket_location(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Option<BucketLocation>, ProviderError> {
        let dir = self.buckets.bucket_dir(service, bucket)?;
        Ok(Some(BucketLocation {
            url: format!("file://{}", dir.display()),
            name: bucket.to_string(),
            path: Some(dir),
        }))
    }

    fn object_path(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<PathBuf>, ProviderError> {
        self.buckets.path(service, bucket, key).map(Some)
    }

    async fn start_app(&self, service: &str, spec: &AppSpec) -> Result<Operation, ProviderError> {
        let detail = self.apps.start(service, spec)?;
        self.ops.succeeded(
            OperationKind::StartApp,
            object::app(service, &spec.name),
            detail,
        )
    }

    async fn stop_app(
        &self,
        service: &str,
        app: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        self.apps.stop(service, app, options).await
    }

    async fn app_status(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<AppStatus>, ProviderError> {
        Ok(self.apps.status(service, app).map(|s| self.reached(s)))
    }

    async fn app_endpoint(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<Endpoint>, ProviderError> {
        match self.apps.status(service, app) {
            Some(status) => Ok(self.reached(status).endpoint),
            None => Err(not_found(&self.name, object::app(service, app))),
        }
    }

    async fn remove_app(&self, service: &str, app: &str) -> Result<(), ProviderError> {
        self.apps.remove(service, app)
    }

    async fn write_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
        content: &[u8],
    ) -> Result<PathBuf, ProviderError> {
        let obj = || format!("file `{name}` of {}", object::app(service, app));
        check_name(&self.name, obj, "service name", service)?;
        check_name(&self.name, obj, "app name", app)?;
        super::validate_file_name(name).map_err(|e| invalid(&self.name, obj(), e))?;
        let dir = self.app_dir(service, app);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(&self.name, obj(), format!("create {}", dir.display()), e))?;
        let path = dir.join(name);
        write_atomic(&path, content)
            .map_err(|e| io_err(&self.name, obj(), format!("write {}", path.display()), e))?;
        Ok(path)
    }

    async fn read_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ProviderError> {
        let obj = || format!("file `{name}` of {}", object::app(service, app));
        check_name(&self.name, obj, "service name", service)?;
        check_name(&self.name, obj, "app name", app)?;
        super::validate_file_name(name).map_err(|e| invalid(&self.name, obj(), e))?;
        let path = self.app_dir(service, app).join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(
                &self.name,
                obj(),
                format!("read {}", path.display()),
                e,
            )),
        }
    }

    fn app_dir(&self, service: &str, app: &str) -> Option<PathBuf> {
        Some(LocalProvider::app_dir(self, service, app))
    }

    async fn free_bytes(&self) -> Result<Option<u64>, ProviderError> {
        let dir = self.root.join("volumes");
        let stat = available_bytes(&dir).map_err(|e| {
            io_err(
                &self.name,
                format!("directory {}", dir.display()),
                "measure free space",
                e,
            )
        })?;
        Ok(Some(stat))
    }
}
