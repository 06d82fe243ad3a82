//! Operation records of the local driver. Its operations finish before the call returns, but
//! the journal may poll an id again after a daemon restart, so each one is kept as a small
//! JSON file under `operations/` for a week.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use chrono::Utc;

use super::{io_err, write_atomic};
use crate::providers::{
    object, Operation, OperationId, OperationKind, OperationState, ProviderError,
};

/// How long finished operations stay answerable.
pub(crate) const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) struct OpStore {
    provider: String,
    dir: PathBuf,
}

impl OpStore {
    pub(crate) fn new(provider: &str, dir: PathBuf) -> Self {
        OpStore {
            provider: provider.to_string(),
            dir,
        }
    }

    /// Records an operation that already succeeded and returns it.
    pub(crate) fn succeeded(
        &self,
        kind: OperationKind,
        object: String,
        detail: String,
    ) -> Result<Operation, ProviderError> {
        let now = Utc::now();
        let id = OperationId::new(format!(
            "op-{}-{:016x}",
            now.timestamp_millis(),
            fastrand::u64(..)
        ));
        let op = Operation {
            id: id.clone(),
            kind,
            object,
            state: OperationState::Succeeded,
            detail,
            started_at: now,
            updated_at: now,
        };
        let bytes = serde_json::to_vec_pretty(&op).map_err(|e| ProviderError::Invalid {
            provider: self.provider.clone(),
            object: object::operation(&id),
            reason: format!("cannot encode the operation record: {e}"),
        })?;
        write_atomic(&self.path(&id), &bytes).map_err(|e| {
            io_err(
                &self.provider,
                object::operation(&id),
                format!("write {}", self.path(&id).display()),
                e,
            )
        })?;
        Ok(op)
    }

    pub(crate) fn get(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        let well_formed = id.as_str().starts_with("op-")
            && id
                .as_str()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !well_formed {
            return Err(ProviderError::Invalid {
                provider: self.provider.clone(),
                object: object::operation(id),
                reason: "this is not an operation id the local driver hands out".to_string(),
            });
        }
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProviderError::NotFound {
                    provider: self.provider.clone(),
                    object: format!(
                        "{} (records are kept for {} days)",
                        object::operation(id),
                        KEEP.as_secs() / 86_400
                    ),
                })
            }
            Err(e) => {
                return Err(io_err(
                    &self.provider,
                    object::operation(id),
                    format!("read {}", path.display()),
                    e,
                ))
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Invalid {
            provider: self.provider.clone(),
            object: object::operation(id),
            reason: format!("its record {} is damaged: {e}", path.display()),
        })
    }

    /// Removes records older than `max_age`; failures only cost disk space, so they are
    /// logged, not returned.
    pub(crate) fn prune(&self, max_age: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > max_age);
            if old {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(
                        provider = %self.provider,
                        "Could not remove the old operation record {}: {e}.",
                        entry.path().display()
                    );
                }
            }
        }
    }

    fn path(&self, id: &OperationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}
