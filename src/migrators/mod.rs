//! Migrators: in the paper's words, the libraries and services that carry out one specific
//! task of a relocation. The conduit runs them one per step of its plan.
//!
//! - [`copier`]: copies a bucket's objects between any two providers and verifies them.
//! - [`rewrite`]: adapts a configuration file to the provider its service moves to.
//! - [`deploy`]: the specs and placeholders the migrators deploy with, and making a service
//!   present where it is placed.

pub mod config;
pub mod copier;
pub mod deploy;
pub mod rewrite;
