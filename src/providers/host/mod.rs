//! What the drivers that run on this machine (`local`, `qemu`) share: the lock that keeps
//! one provider root to one process ([`lock_root`]), the pool of disk images
//! ([`disks::Volumes`]), the store of finished operations ([`operations::OpStore`]) and the
//! identity of the processes they start ([`process::ProcessId`], [`wait_gone`]).

pub(crate) mod disks;
pub(crate) mod operations;
pub(crate) mod process;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use self::process::ProcessId;
use crate::providers::ProviderError;
use crate::sys::retry::{self, ConstantBuilder};

pub(crate) use crate::sys::fs::available_bytes;

/// Why a provider root could not be locked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RootLockError {
    #[error("its root {} is already used by provider `{other}` in this process; each provider needs a root of its own", root.display())]
    Shared { root: PathBuf, other: String },
    #[error("its root {} is in use by another process (pid {holder}); two daemons cannot share a local provider", root.display())]
    Busy { root: PathBuf, holder: String },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The lock of one provider root, held by this process while it lives.
pub(crate) struct RootLock {
    provider: String,
    _file: File,
}

/// Root locks this process holds, by canonical root; one root serves one provider.
static HELD_ROOTS: Mutex<BTreeMap<PathBuf, Weak<RootLock>>> = Mutex::new(BTreeMap::new());

/// Set by [`keep_root_locks_until_exit`]: the locks taken are never released.
static KEPT_ROOTS: Mutex<Option<Vec<Arc<RootLock>>>> = Mutex::new(None);

/// Makes every provider root this process locks, now or later, stay locked until the process
/// exits. A daemon calls it at start: it drops providers and opens them again (at a reload,
/// say), and a root must never be free for another process in between. Without it a root is
/// released once no provider of this process uses it.
pub fn keep_root_locks_until_exit() {
    let held = HELD_ROOTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut kept = KEPT_ROOTS.lock().unwrap_or_else(|e| e.into_inner());
    let kept = kept.get_or_insert_with(Vec::new);
    kept.extend(held.values().filter_map(Weak::upgrade));
}

/// Takes the root's lock file so that a second process cannot supervise the same apps or
/// write the same images. `root` is canonical; a root this process holds already for the
/// same `provider` is fine, for another provider it is refused.
pub(crate) fn lock_root(root: &Path, provider: &str) -> Result<Arc<RootLock>, RootLockError> {
    let mut held = HELD_ROOTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(lock) = held.get(root).and_then(Weak::upgrade) {
        if lock.provider == provider {
            return Ok(lock);
        }
        return Err(RootLockError::Shared {
            root: root.to_path_buf(),
            other: lock.provider.clone(),
        });
    }
    let path = root.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| RootLockError::Open {
            path: path.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(RootLockError::Busy {
                root: root.to_path_buf(),
                holder: holder.trim().to_string(),
            });
        }
        Err(e) => {
            return Err(RootLockError::Lock {
                path,
                source: e.into(),
            })
        }
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    let lock = Arc::new(RootLock {
        provider: provider.to_string(),
        _file: file,
    });
    held.insert(root.to_path_buf(), Arc::downgrade(&lock));
    if let Some(kept) = KEPT_ROOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        kept.push(lock.clone());
    }
    Ok(lock)
}

pub(crate) use crate::sys::fs::write_atomic;

pub(crate) fn io_err(
    provider: &str,
    object: String,
    action: impl Into<String>,
    source: std::io::Error,
) -> ProviderError {
    ProviderError::Io {
        provider: provider.to_string(),
        object,
        action: action.into(),
        source,
    }
}

pub(crate) fn invalid(provider: &str, object: String, reason: impl Into<String>) -> ProviderError {
    ProviderError::Invalid {
        provider: provider.to_string(),
        object,
        reason: reason.into(),
    }
}

pub(crate) fn conflict(provider: &str, object: String, detail: impl Into<String>) -> ProviderError {
    ProviderError::Conflict {
        provider: provider.to_string(),
        object,
        detail: detail.into(),
    }
}

pub(crate) fn not_found(provider: &str, object: String) -> ProviderError {
    ProviderError::NotFound {
        provider: provider.to_string(),
        object,
    }
}

/// Checks a service, volume, bucket or app name for use as a directory or file name.
pub(crate) fn check_name(
    provider: &str,
    object: impl FnOnce() -> String,
    what: &str,
    name: &str,
) -> Result<(), ProviderError> {
    crate::providers::validate_name(name)
        .map_err(|e| invalid(provider, object(), format!("{what}: {e}")))
}

/// Waits until the process `id` is gone, looking every `poll`, at most `timeout`. True when
/// it is gone.
pub(crate) async fn wait_gone(id: ProcessId, timeout: Duration, poll: Duration) -> bool {
    let polls = ConstantBuilder::new().with_delay(poll).without_max_times();
    retry::until_deadline(polls, timeout, || async {
        if id.is_running() {
            Err(())
        } else {
            Ok(())
        }
    })
    .await
    .is_ok()
}
