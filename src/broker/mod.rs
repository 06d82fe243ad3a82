//! The Broker: schedules the pollers, keeps the market snapshot, evaluates policies behind
//! guard rails and hands relocations to the conduit.

pub mod benchmarks;
pub mod decisions;
pub mod guard;
pub mod pricing;
pub mod regions;
