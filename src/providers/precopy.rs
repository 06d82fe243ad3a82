//! What a pre-copy of a running VM's disks asks of the source's emulator: dirty tracking
//! of every disk and read-only exports to read them through, pass by pass
//! ([`super::Provider::track_vm_disks`]), and a halt at cutover that keeps the emulator
//! ([`super::Provider::halt_vm`]) so the last pass reads what the guest wrote last.
//!
//! The sequence, driven by the conduit:
//!
//! 1. [`DiskPassKind::Full`]: tracking starts afresh (a dirty bitmap per disk) and every
//!    disk is exported whole; the reader copies its allocated extents.
//! 2. [`DiskPassKind::Dirty`], as often as it pays: a new bitmap takes over the tracking in
//!    one transaction with the freezing of the previous one, which is exported; the reader
//!    copies the extents it marks.
//! 3. [`super::Provider::halt_vm`]: the guest powers down (or, when it does not in time,
//!    is paused), and the emulator stays.
//! 4. [`DiskPassKind::Final`]: the bitmap that tracked since the last pass is frozen and
//!    exported; asking again gives the same extents, so a final pass interrupted by a crash
//!    is simply read again.
//! 5. [`super::Provider::untrack_vm_disks`]: exports and bitmaps go.

use serde::{Deserialize, Serialize};

use super::SocketAddress;

/// Which pass over a running VM's disks to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskPassKind {
    /// Start tracking afresh; read everything allocated.
    Full,
    /// Read what was written since the previous pass began.
    Dirty,
    /// After [`super::Provider::halt_vm`]: read what was written since the last pass began.
    Final,
}

/// One pass over the disks of a VM: where to read them and what to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPass {
    /// The NBD server exporting the disks, read-only.
    pub nbd: SocketAddress,
    /// Each disk, in the VM's disk order.
    pub disks: Vec<DiskExport>,
}

/// One disk of a [`DiskPass`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskExport {
    /// The volume the disk is.
    pub volume: String,
    /// The NBD export to read it through.
    pub export: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// The dirty bitmap the export carries (NBD context `qemu:dirty-bitmap:<name>`): read
    /// the extents it marks. `None`: read every allocated extent (`base:allocation`).
    pub bitmap: Option<String>,
}

/// How a VM's guest was halted for the last pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Halt {
    /// The guest shut down through its power button; its disk is clean.
    PoweredDown,
    /// The guest did not shut down in time and was paused: its disk is as after a power
    /// cut.
    Paused,
}
