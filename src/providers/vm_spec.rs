//! [`VmSpec`]: what a provider needs to run a virtual machine. The type is the model's; the
//! configuration reads it from a `vm` component's `settings` when it is loaded.

pub use crate::model::{PortForward, VmSpec, MAX_VCPUS, MIN_MEMORY_MIB};
