//! Buckets of the local driver: a directory per bucket, a file per object, `/` in a key a
//! subdirectory. Keys are checked so that none can name anything outside its bucket, and
//! symbolic links inside a bucket are never followed.
//!
//! An object's content type and user metadata live in extended attributes of its file
//! (`user.fluidcloud.content-type`, `user.fluidcloud.meta.<key>`), set on the temporary file
//! before it is renamed into place, so content and metadata change together.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{check_name, conflict, invalid, io_err, not_found};
use crate::providers::{
    object, validate_key, validate_meta, ObjectBody, ObjectInfo, ObjectMeta, ObjectStat,
    ObjectStream, ProviderError,
};

const CHUNK: usize = 256 * 1024;

const XATTR_CONTENT_TYPE: &str = "user.fluidcloud.content-type";
const XATTR_META_PREFIX: &str = "user.fluidcloud.meta.";
/// `<file tag> <BLAKE3 hex>`: the hash of the version the tag names, so a listing reads only
/// files that changed since they were last hashed.
const XATTR_BLAKE3: &str = "user.fluidcloud.blake3";
/// A file modified this shortly before it is hashed could be modified again within the same
/// tick of the file system's clock, leaving its tag unchanged: its hash is not kept.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) struct Buckets {
    provider: String,
    dir: PathBuf,
    tmp: PathBuf,
    /// Held while directories inside a bucket are created or pruned, so that a write does not
    /// lose its parent directory to a concurrent delete.
    tree: Mutex<()>,
}

/// What a key names inside its bucket.
enum Found {
    File(PathBuf),
    Missing(PathBuf),
}

impl Buckets {
    pub(super) fn new(provider: &str, dir: PathBuf, tmp: PathBuf) -> Self {
        Buckets {
            provider: provider.to_string(),
            dir,
            tmp,
            tree: Mutex::new(()),
        }
    }

    pub(super) fn bucket_dir(&self, service: &str, bucket: &str) -> Result<PathBuf, ProviderError> {
        let obj = || object::bucket(service, bucket);
        check_name(&self.provider, obj, "service name", service)?;
        check_name(&self.provider, obj, "bucket name", bucket)?;
        Ok(self.dir.join(service).join(bucket))
    }

    /// The bucket's directory, which must exist.
    fn existing(&self, service: &str, bucket: &str) -> Result<PathBuf, ProviderError> {
        let dir = self.bucket_dir(service, bucket)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(invalid(
                &self.provider,
                object::bucket(service, bucket),
                format!("{} is not a directory", dir.display()),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(not_found(&self.provider, object::bucket(service, bucket)))
            }
            Err(e) => Err(io_err(
                &self.provider,
                object::bucket(service, bucket),
                format!("look at {}", dir.display()),
                e,
            )),
        }
    }

    pub(super) async fn ensure(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let dir = self.bucket_dir(service, bucket)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(conflict(
                    &self.provider,
                    object::bucket(service, bucket),
                    format!("{} exists and is not a directory", dir.display()),
                ))
            }
            Err(_) => {}
        }
        std::fs::create_dir_all(&dir).map_err(|e| {
            io_err(
                &self.provider,
                object::bucket(service, bucket),
                format!("create {}", dir.display()),
                e,
            )
        })
    }

    pub(super) async fn delete(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let dir = match self.existing(service, bucket) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let _tree = self.tree.lock().unwrap_or_else(|e| e.into_inner());
        let (files, others) = self.scan(service, bucket, &dir)?;
        if !files.is_empty() {
            return Err(conflict(
                &self.provider,
                object::bucket(service, bucket),
                format!(
                    "it still holds {} object(s), e.g. `{}`; delete them first",
                    files.len(),
                    files[0].0
                ),
            ));
        }
        // Entries that are not objects were never listed, so never copied anywhere: deleting
        // them with the bucket would destroy the only copy.
        if !others.is_empty() {
            return Err(conflict(
                &self.provider,
                object::bucket(service, bucket),
                format!(
                    "it still holds {} entries that are not objects, e.g. `{}`; they are left in place",
                    others.len(),
                    others[0]
                ),
            ));
        }
        remove_empty_dirs(&dir).map_err(|e| {
            io_err(
                &self.provider,
                object::bucket(service, bucket),
                format!("remove {}", dir.display()),
                e,
            )
        })
    }

    /// The entries of the bucket that are not objects, relative to it and sorted.
    pub(super) async fn non_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let dir = self.existing(service, bucket)?;
        Ok(self.scan(service, bucket, &dir)?.1)
    }

    /// The objects of the bucket in `dir` (key and path), and its entries that are not
    /// objects (relative to it, sorted).
    fn scan(
        &self,
        service: &str,
        bucket: &str,
        dir: &Path,
    ) -> Result<(Vec<Entry>, Vec<String>), ProviderError> {
        let mut files = Vec::new();
        let mut others = Vec::new();
        walk(dir, dir, &mut files, &mut |path, _| {
            others.push(relative(dir, path))
        })
        .map_err(|e| {
            io_err(
                &self.provider,
                object::bucket(service, bucket),
                format!("list {}", dir.display()),
                e,
            )
        })?;
        others.sort();
        Ok((files, others))
    }

    pub(super) async fn list(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        let dir = self.existing(service, bucket)?;
        let provider = self.provider.clone();
        let obj = object::bucket(service, bucket);
        // Hashing reads every byte; keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            walk(&dir, &dir, &mut files, &mut |path, why| {
                tracing::warn!(
                    provider = %provider,
                    "Skipping {} in {obj}: {why}.",
                    path.display()
                );
            })
            .map_err(|e| io_err(&provider, obj.clone(), format!("list {}", dir.display()), e))?;
            let mut out = Vec::with_capacity(files.len());
            for (key, path) in files {
                let info = hash_file(&path).map_err(|e| {
                    io_err(
                        &provider,
                        obj.clone(),
                        format!("read {}", path.display()),
                        e,
                    )
                })?;
                out.push(ObjectInfo { key, ..info });
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| {
            io_err(
                &self.provider,
                object::bucket(service, bucket),
                "list objects",
                std::io::Error::other(e),
            )
        })?
    }

    pub(super) async fn read(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        let obj = || object::key(service, bucket, key);
        let path = match self.locate(service, bucket, key, false)? {
            Found::File(p) => p,
            Found::Missing(_) => return Err(not_found(&self.provider, obj())),
        };
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_err(&self.provider, obj(), format!("open {}", path.display()), e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| io_err(&self.provider, obj(), format!("stat {}", path.display()), e))?
            .len();
        Ok(ObjectBody {
            size,
            stream: Box::pin(file),
        })
    }

    pub(super) async fn write(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        mut body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        let obj = || object::key(service, bucket, key);
        validate_meta(meta).map_err(|e| invalid(&self.provider, obj(), e))?;
        // Check the key before reading any data, and again before the rename.
        self.locate(service, bucket, key, false)?;
        let tmp = self.tmp.join(format!("object-{:016x}", fastrand::u64(..)));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(|e| {
                io_err(
                    &self.provider,
                    obj(),
                    format!("create {}", tmp.display()),
                    e,
                )
            })?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; CHUNK];
            let mut size = 0u64;
            loop {
                let n = body
                    .read(&mut buf)
                    .await
                    .map_err(|e| io_err(&self.provider, obj(), "read the content to store", e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(|e| {
                    io_err(&self.provider, obj(), format!("write {}", tmp.display()), e)
                })?;
                size += n as u64;
            }
            set_meta(&tmp, meta).map_err(|e| {
                let action = if e.kind() == ErrorKind::Unsupported {
                    format!(
                        "keep its content type and metadata: the file system holding {} has no extended attributes",
                        tmp.display()
                    )
                } else {
                    format!("set extended attributes on {}", tmp.display())
                };
                io_err(&self.provider, obj(), action, e)
            })?;
            file.sync_all()
                .await
                .map_err(|e| io_err(&self.provider, obj(), format!("sync {}", tmp.display()), e))?;
            Ok::<_, ProviderError>((size, hasher.finalize().to_hex().to_string()))
        }
        .await;
        let (size, hash) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let placed = {
            let _tree = self.tree.lock().unwrap_or_else(|e| e.into_inner());
            self.locate(service, bucket, key, true).and_then(|found| {
                let target = match found {
                    Found::File(p) | Found::Missing(p) => p,
                };
                std::fs::rename(&tmp, &target)
                    .and_then(|()| match target.parent() {
                        Some(dir) => std::fs::File::open(dir)?.sync_all(),
                        None => Ok(()),
                    })
                    .map_err(|e| {
                        io_err(
                            &self.provider,
                            obj(),
                            format!("move it to {}", target.display()),
                            e,
                        )
                    })
                    .map(|()| target)
            })
        };
        let target = match placed {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let meta = std::fs::metadata(&target).ok();
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            blake3: Some(hash),
            etag: meta.as_ref().map(file_tag),
            modified: meta
                .and_then(|m| m.modified().ok())
                .map(DateTime::<Utc>::from),
        })
    }

    pub(super) async fn stat(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        let obj = || object::key(service, bucket, key);
        let path = match self.locate(service, bucket, key, false)? {
            Found::File(p) => p,
            Found::Missing(_) => return Ok(None),
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(io_err(
                    &self.provider,
                    obj(),
                    format!("stat {}", path.display()),
                    e,
                ))
            }
        };
        let object_meta = get_meta(&path).map_err(|e| {
            io_err(
                &self.provider,
                obj(),
                format!("read extended attributes of {}", path.display()),
                e,
            )
        })?;
        Ok(Some(ObjectStat {
            info: ObjectInfo {
                key: key.to_string(),
                size: meta.len(),
                // Only a full read gives the hash; callers that need it list or read.
                blake3: None,
                etag: Some(file_tag(&meta)),
                modified: meta.modified().ok().map(DateTime::<Utc>::from),
            },
            meta: object_meta,
        }))
    }

    pub(super) async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        let obj = || object::key(service, bucket, key);
        let _tree = self.tree.lock().unwrap_or_else(|e| e.into_inner());
        let path = match self.locate(service, bucket, key, false) {
            Ok(Found::File(p)) => p,
            Ok(Found::Missing(_)) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(io_err(
                    &self.provider,
                    obj(),
                    format!("delete {}", path.display()),
                    e,
                ))
            }
        }
        // Directories exist only to hold keys; drop the ones this delete emptied.
        let bucket_dir = self.bucket_dir(service, bucket)?;
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == bucket_dir || std::fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    pub(super) fn path(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<PathBuf, ProviderError> {
        match self.locate(service, bucket, key, false)? {
            Found::File(p) | Found::Missing(p) => Ok(p),
        }
    }

    /// Maps a key to its file in the bucket, refusing keys that would leave the bucket, pass
    /// through a symbolic link or collide with a directory. With `create`, makes the
    /// directories the key needs.
    fn locate(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        create: bool,
    ) -> Result<Found, ProviderError> {
        let obj = || object::key(service, bucket, key);
        let segments = validate_key(key).map_err(|e| invalid(&self.provider, obj(), e))?;
        let mut path = self.existing(service, bucket)?;
        let (last, parents) = segments
            .split_last()
            .ok_or_else(|| invalid(&self.provider, obj(), "the key is empty"))?;
        let mut missing = false;
        for (i, seg) in parents.iter().enumerate() {
            path.push(seg);
            let prefix = segments[..=i].join("/");
            if missing {
                if create {
                    mkdir(&path).map_err(|e| {
                        io_err(
                            &self.provider,
                            obj(),
                            format!("create {}", path.display()),
                            e,
                        )
                    })?;
                }
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(
                        &self.provider,
                        obj(),
                        format!(
                            "`{prefix}` in the bucket is a symbolic link, which is never followed"
                        ),
                    ))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(conflict(
                        &self.provider,
                        obj(),
                        format!("`{prefix}` is an object, so no key can continue below it"),
                    ))
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    missing = true;
                    if create {
                        mkdir(&path).map_err(|e| {
                            io_err(
                                &self.provider,
                                obj(),
                                format!("create {}", path.display()),
                                e,
                            )
                        })?;
                    }
                }
                Err(e) => {
                    return Err(io_err(
                        &self.provider,
                        obj(),
                        format!("look at {}", path.display()),
                        e,
                    ))
                }
            }
        }
        path.push(last);
        if missing {
            return Ok(Found::Missing(path));
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => Err(invalid(
                &self.provider,
                obj(),
                "it is a symbolic link in the bucket, which is never followed",
            )),
            Ok(m) if m.is_file() => Ok(Found::File(path)),
            Ok(m) if m.is_dir() && create => Err(conflict(
                &self.provider,
                obj(),
                format!("`{key}` is a prefix of other objects (`{key}/…`)"),
            )),
            // A directory is a prefix, not an object.
            Ok(m) if m.is_dir() => Ok(Found::Missing(path)),
            Ok(_) => Err(invalid(
                &self.provider,
                obj(),
                format!("{} is not a regular file", path.display()),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Found::Missing(path)),
            Err(e) => Err(io_err(
                &self.provider,
                obj(),
                format!("look at {}", path.display()),
                e,
            )),
        }
    }
}

fn set_meta(path: &Path, meta: &ObjectMeta) -> std::io::Result<()> {
    if let Some(ct) = &meta.content_type {
        xattr::set(path, XATTR_CONTENT_TYPE, ct.as_bytes())?;
    }
    for (k, v) in &meta.user {
        xattr::set(path, format!("{XATTR_META_PREFIX}{k}"), v.as_bytes())?;
    }
    Ok(())
}

/// Reads what [`set_meta`] stored. Attributes that are not valid UTF-8 were not written here
/// and are ignored; a file system without extended attributes has no metadata to give.
fn get_meta(path: &Path) -> std::io::Result<ObjectMeta> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(ObjectMeta::default()),
        Err(e) => return Err(e),
    };
    let mut meta = ObjectMeta::default();
    for name in names {
        let Some(name) = name.to_str() else { continue };
        let value = || -> std::io::Result<Option<String>> {
            Ok(xattr::get(path, name)?.and_then(|v| String::from_utf8(v).ok()))
        };
        if name == XATTR_CONTENT_TYPE {
            meta.content_type = value()?;
        } else if let Some(key) = name.strip_prefix(XATTR_META_PREFIX) {
            if let Some(v) = value()? {
                meta.user.insert(key.to_string(), v);
            }
        }
    }
    Ok(meta)
}

fn mkdir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

/// Collects `(key, path)` of every regular file below `dir`, without following links;
/// anything else is reported through `skip`.
/// An object found on disk: its key and its file.
type Entry = (String, PathBuf);

fn walk(
    base: &Path,
    dir: &Path,
    out: &mut Vec<Entry>,
    skip: &mut dyn FnMut(&Path, &str),
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(base, &path, out, skip)?;
        } else if kind.is_file() {
            let key = path
                .strip_prefix(base)
                .ok()
                .and_then(Path::to_str)
                .map(str::to_string);
            match key {
                Some(k) if validate_key(&k).is_ok() => out.push((k, path)),
                _ => skip(&path, "its name is not a valid object key"),
            }
        } else if kind.is_symlink() {
            skip(
                &path,
                "symbolic links are not objects and are never followed",
            );
        } else {
            skip(&path, "it is not a regular file");
        }
    }
    Ok(())
}

/// `path` relative to the bucket `base`, for messages.
fn relative(base: &Path, path: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Removes `dir` and the directories below it with `remove_dir` only, which never deletes
/// anything but an empty directory: whatever else is found makes it fail.
fn remove_empty_dirs(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_dirs(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Names one version of a stored file, like a web server's file entity tag: every write
/// renames a new file into place while the old one still exists, so a new version has another
/// inode than the one it replaces even when it has the same size and lands within the same
/// tick of the file system's coarse clock.
fn file_tag(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{:x}-{:x}-{:x}.{:x}",
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

fn hash_file(path: &Path) -> std::io::Result<ObjectInfo> {
    use xattr::FileExt;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let tag = file_tag(&meta);
    let info = |blake3: String| ObjectInfo {
        key: String::new(),
        size: meta.len(),
        blake3: Some(blake3),
        etag: Some(tag.clone()),
        modified: meta.modified().ok().map(DateTime::<Utc>::from),
    };
    // A file system without extended attributes simply hashes every time.
    if let Ok(Some(kept)) = file.get_xattr(XATTR_BLAKE3) {
        let kept = String::from_utf8_lossy(&kept);
        if let Some((kept_tag, hash)) = kept.split_once(' ') {
            if kept_tag == tag && blake3::Hash::from_hex(hash).is_ok() {
                return Ok(info(hash.to_string()));
            }
        }
    }
    let started = std::time::SystemTime::now();
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut file, &mut hasher)?;
    let hash = hasher.finalize().to_hex().to_string();
    let unchanged = file.metadata().is_ok_and(|m| file_tag(&m) == tag) && size == meta.len();
    let settled = meta.modified().is_ok_and(|m| m + RACY <= started);
    if unchanged && settled {
        // Only a cache: a file that cannot keep it is hashed again next time.
        let _ = file.set_xattr(XATTR_BLAKE3, format!("{tag} {hash}").as_bytes());
    }
    Ok(ObjectInfo { size, ..info(hash) })
}
