//! FluidCloud: relocates running cloud services between providers when the owner's policy
//! says it pays.
//!
//! The crate follows the paper's architecture: the [`broker`] watches the market and
//! decides, [`policy`] runs the owner's Rhai rules behind the broker's guard rails, the
//! [`conduit`] relocates, running one [`migrators`] task per step of its plan.

pub mod api;
pub mod broker;
pub mod conduit;
pub mod config;
pub mod daemon;
pub mod migrators;
pub mod model;
pub mod policy;
pub mod providers;
pub mod sys;
pub mod telemetry;
pub mod viaduct;
