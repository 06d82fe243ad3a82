//! The plan's data: the ordered steps of one relocation, what each step does ([`Action`]),
//! the phase it belongs to and the steps it waits for. The conduit's planner builds a
//! [`Plan`] and its executor drives it; each step's work is done by its migrator
//! ([`super::for_step`]). Steps are named `<action>:<object>`; the names are the journal's
//! checkpoints.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::providers::DiskFormat;
use crate::sys::units::human_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Precopy,
    Cutover,
    Grace,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Precopy => "pre-copy",
            Phase::Cutover => "cutover",
            Phase::Grace => "grace",
        }
    }
}

/// One step of a relocation. Every action is idempotent: running it again after a crash
/// gives the same result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Checks both providers, the source's components, the target's free space and that
    /// every configuration rule still matches, before anything is written.
    Preflight,
    /// Copies a volume to the target while the source runs.
    PrecopyVolume {
        volume: VolumePlan,
    },
    /// Copies the objects of a bucket while the source runs.
    CopyBucket {
        bucket: String,
    },
    /// Stops a source app: the downtime starts with the first.
    StopSource {
        app: String,
    },
    /// Powers a source VM down through its ACPI power button, never switching it off
    /// unless the configuration allows that: the downtime starts with the first stop.
    StopSourceVm {
        vm: String,
    },
    /// Sends what changed since the pre-copy, converts to the target's format and verifies.
    SyncVolume {
        volume: VolumePlan,
    },
    /// Copies the objects that changed since the first pass and compares manifests.
    SyncBucket {
        bucket: String,
    },
    /// Rewrites a configuration file for the target and checks the result.
    WriteConfig {
        file: String,
        app: String,
    },
    /// Hands the target the context document and runs the re-contextualisation hook.
    Recontextualise,
    StartTarget {
        app: String,
    },
    /// Boots a VM at the target from its relocated disk, with the machine adapted to the
    /// target provider (disk format and bus, NIC model, accelerator).
    StartTargetVm {
        vm: String,
    },
    /// Live migration: starts the VM at the target paused, waiting for the migration, on
    /// empty disks exported for the source's mirrors.
    PrepareTargetVm {
        vm: String,
    },
    /// Live migration: mirrors the VM's disks into the target while it runs, until they
    /// are in step.
    MirrorVm {
        vm: String,
    },
    /// Live migration: moves the VM's memory while it runs; the guest pauses for the last
    /// pass (the downtime starts) and the source stays paused until the commit. One that
    /// does not converge in time falls back to a cold move or fails, as the service says.
    MigrateVm {
        vm: String,
    },
    /// Live migration: the guest goes on at the target, without a reboot.
    ResumeTargetVm {
        vm: String,
    },
    /// After the commit: ends the paused source emulator of a live-migrated VM (its disk is
    /// kept until the decommission).
    ReleaseSourceVm {
        vm: String,
    },
    /// Pre-copy: copies the disks of a running VM in passes over what its guest wrote since
    /// the previous one.
    PrecopyVm {
        vm: String,
        disks: Vec<VolumePlan>,
    },
    /// Pre-copy: halts the VM's guest (the downtime starts), copies what it wrote since the
    /// last pass and verifies the whole disk; the source emulator stays, halted, until the
    /// commit.
    FinalPassVm {
        vm: String,
        disks: Vec<VolumePlan>,
    },
    /// The target must pass its health check; the downtime ends here.
    HealthCheck,
    /// Runs the cutover hook that repoints clients.
    Cutover,
    /// The point of no return: the service's placement becomes the target.
    Commit,
    /// After the grace period: deletes the source's copy.
    Decommission,
}

/// A volume as the plan carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumePlan {
    pub name: String,
    pub size_bytes: u64,
    pub source_format: DiskFormat,
    pub target_format: DiskFormat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub phase: Phase,
    #[serde(flatten)]
    pub action: Action,
    /// Names of the steps that must be done before this one.
    pub after: Vec<String>,
    pub description: String,
}

impl Step {
    /// Steps that copy one volume or bucket and touch nothing else: neighbours of this kind
    /// in one phase run side by side.
    pub fn is_transfer(&self) -> bool {
        matches!(
            self.action,
            Action::PrecopyVolume { .. }
                | Action::CopyBucket { .. }
                | Action::SyncVolume { .. }
                | Action::SyncBucket { .. }
        )
    }

    /// Steps whose undoing puts the service back (as opposed to deleting target data).
    pub fn restores_service(&self) -> bool {
        matches!(
            self.action,
            Action::StopSource { .. }
                | Action::StopSourceVm { .. }
                | Action::FinalPassVm { .. }
                | Action::StartTarget { .. }
                | Action::StartTargetVm { .. }
                | Action::MigrateVm { .. }
                | Action::ResumeTargetVm { .. }
                | Action::Cutover
        )
    }
}

/// The ordered task graph of one relocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub service: String,
    pub from: String,
    pub to: String,
    pub steps: Vec<Step>,
    /// Facts worth telling before anything runs (buckets kept at the source, conversions).
    pub notes: Vec<String>,
    /// Bytes of volume images and buckets the relocation reads at most.
    pub bytes_to_move: u64,
}

impl Plan {
    pub fn step_names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The steps run together from step `start` on: the run of transfers next to each other
    /// in one phase (copies of different volumes and buckets depend on nothing but the
    /// steps before them, so they run side by side), or the single step at `start`.
    pub fn batch_at(&self, start: usize) -> std::ops::Range<usize> {
        let Some(first) = self.steps.get(start) else {
            return start..start;
        };
        let mut end = start + 1;
        if first.is_transfer() {
            while self
                .steps
                .get(end)
                .is_some_and(|s| s.is_transfer() && s.phase == first.phase)
            {
                end += 1;
            }
        }
        start..end
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Relocation of `{}` from `{}` to `{}` ({} steps, up to {} to move)",
            self.service,
            self.from,
            self.to,
            self.steps.len(),
            human_bytes(self.bytes_to_move)
        )?;
        let mut phase = None;
        for (i, s) in self.steps.iter().enumerate() {
            if phase != Some(s.phase) {
                writeln!(f, "\n  {}:", s.phase.as_str())?;
                phase = Some(s.phase);
            }
            writeln!(f, "  {:>3}. {:<28} {}", i + 1, s.name, s.description)?;
            if !s.after.is_empty() {
                writeln!(f, "       {:<28} after: {}", "", s.after.join(", "))?;
            }
            let batch = self.batch_at(i);
            if batch.start == i && batch.len() > 1 {
                let numbers: Vec<String> = batch.map(|k| (k + 1).to_string()).collect();
                writeln!(
                    f,
                    "       {:<28} steps {} run side by side (conduit.transfer_concurrency)",
                    "",
                    numbers.join(", ")
                )?;
            }
        }
        if !self.notes.is_empty() {
            writeln!(f, "\n  notes:")?;
            for n in &self.notes {
                writeln!(f, "  - {n}")?;
            }
        }
        Ok(())
    }
}
