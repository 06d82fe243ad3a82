//! The integration tests, one binary: each module was once its own test target. Run one
//! module with `cargo test --test it MODULE::` (e.g. `cargo test --test it daemon::`).
//! `common` holds what they share: servers, a running daemon, a VM guest and the
//! configuration builder.

mod common;

mod across_hosts;
mod block_devices;
mod crash_agents;
mod crash_suite;
mod daemon;
mod faults;
mod flapping;
mod fuzz_corpus;
mod hosts;
mod layering;
mod local_provider;
mod object_relocation;
mod object_stores;
mod pricing_feeds;
mod prometheus;
mod quickstart;
mod relocation;
mod security;
mod soak;
mod viaduct;
mod viaduct_cli;
mod vm;
mod vm_across_hosts;
mod vm_live;
mod vm_live_across_hosts;
mod vm_precopy;
mod vm_precopy_across_hosts;
mod vm_relocation;
