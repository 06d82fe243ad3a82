//! Live progress of the relocations this process runs: the latest snapshot of every transfer
//! in flight, by relocation and step, for the API (`GET /v1/relocations/{id}`) and the
//! `fluidcloud relocations show --watch` bars. Snapshots go as soon as their step ends; the
//! journal keeps what each finished step produced.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::journal::StepState;
use crate::migrators;
use crate::migrators::plan::Step;
use crate::providers::copier::BucketProgress;
use crate::viaduct;

/// Hears what a relocation does, for progress bars and logs: every step's checkpoints here,
/// the transfers through [`migrators::Observer`].
pub trait Observer: migrators::Observer {
    fn step(&self, relocation: &str, step: &Step, state: StepState, detail: &str);
}

/// The latest snapshot of one running transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LiveProgress {
    /// A volume on a viaduct.
    Volume(viaduct::Progress),
    Bucket(BucketProgress),
}

/// Keeps the latest [`LiveProgress`] of every running step.
#[derive(Default)]
pub struct Board {
    live: Mutex<BTreeMap<String, BTreeMap<String, LiveProgress>>>,
}

impl Board {
    /// The running transfers of relocation `id`, by step name.
    pub fn of(&self, id: &str) -> BTreeMap<String, LiveProgress> {
        self.lock().get(id).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, LiveProgress>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, id: &str, step: &str, p: LiveProgress) {
        self.lock()
            .entry(id.to_string())
            .or_default()
            .insert(step.to_string(), p);
    }
}

impl Observer for Board {
    fn step(&self, relocation: &str, step: &Step, state: StepState, _detail: &str) {
        if state == StepState::Running {
            return;
        }
        let mut live = self.lock();
        if let Some(steps) = live.get_mut(relocation) {
            steps.remove(&step.name);
            if steps.is_empty() {
                live.remove(relocation);
            }
        }
    }
}

impl migrators::Observer for Board {
    fn transfer(&self, relocation: &str, step: &str, progress: &viaduct::Progress) {
        self.set(relocation, step, LiveProgress::Volume(progress.clone()));
    }

    fn bucket(&self, relocation: &str, step: &str, progress: &BucketProgress) {
        self.set(relocation, step, LiveProgress::Bucket(progress.clone()));
    }
}

/// Hands every event to the board and to one more observer (the command line's bars).
pub(super) struct Tee(pub Arc<Board>, pub Arc<dyn Observer>);

impl Observer for Tee {
    fn step(&self, relocation: &str, step: &Step, state: StepState, detail: &str) {
        self.0.step(relocation, step, state, detail);
        self.1.step(relocation, step, state, detail);
    }
}

impl migrators::Observer for Tee {
    fn transfer(&self, relocation: &str, step: &str, progress: &viaduct::Progress) {
        self.0.transfer(relocation, step, progress);
        self.1.transfer(relocation, step, progress);
    }

    fn bucket(&self, relocation: &str, step: &str, progress: &BucketProgress) {
        self.0.bucket(relocation, step, progress);
        self.1.bucket(relocation, step, progress);
    }
}
