//! The Broker: schedules the pollers, keeps the market snapshot, evaluates policies behind
//! guard rails and hands relocations to the conduit.
//!
//! [`supervisor::Supervisor`] owns the state; [`supervisor::BrokerHandle`] is what the API and
//! the daemon hold. The feeds the pollers read live in [`pricing`], [`benchmarks`] and
//! [`regions`]; the rails in [`guard`] (with the memory of the market-shock rail in
//! [`shock`]); the log in [`decisions`]; what survives a restart in [`state`]; the time the
//! rails read in [`clock`]. Where a service runs is not the Broker's: it reads it from the
//! relocation journal.

pub mod benchmarks;
pub mod clock;
pub mod decisions;
pub mod guard;
pub mod pricing;
pub mod regions;
pub mod shock;
pub mod state;
pub mod supervisor;
