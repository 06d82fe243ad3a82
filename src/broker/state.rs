//! What the Broker keeps across restarts: per-service memory (residency, streaks, last
//! relocation), decisions waiting for approval and the prices the market-shock rail trusts.
//! Written atomically after each change. Where a service runs is not kept here: the
//! relocation journal says it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::guard::ServiceMemory;
use super::shock::FlavorWatch;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    #[serde(default)]
    pub services: BTreeMap<String, ServiceMemory>,
    /// Pending decision id by service.
    #[serde(default)]
    pub pending: BTreeMap<String, String>,
    /// The market-shock rail's trusted prices, by provider and flavor: a restart must not
    /// make a glitched price the reference.
    #[serde(default)]
    pub prices: BTreeMap<String, BTreeMap<String, FlavorWatch>>,
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join("broker-state.json"),
        }
    }

    /// Loads the state; a missing file is an empty state, an unreadable one is reported and
    /// replaced by an empty state (the decision log still holds the history).
    pub fn load(&self) -> PersistedState {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "The broker state {} is unreadable ({e}); starting with empty memory.",
                    self.path.display()
                );
                PersistedState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PersistedState::default(),
            Err(e) => {
                tracing::warn!(
                    "Cannot read the broker state {} ({e}); starting with empty memory.",
                    self.path.display()
                );
                PersistedState::default()
            }
        }
    }

    /// Writes through a temporary file and a rename, so a crash leaves the old or the new
    /// state, never half of one.
    pub fn save(&self, state: &PersistedState) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        crate::sys::fs::write_atomic(&self.path, &bytes)
    }
}
