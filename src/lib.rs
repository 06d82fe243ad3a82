//! FluidCloud: relocates running cloud services between providers when the owner's policy
//! says it pays.
//!
//! The crate follows the paper's architecture:
//!
//! | paper's term | module | what it does |
//! | --- | --- | --- |
//! | Broker | [`broker`] | polls prices, IO benchmarks and region data, evaluates policies behind guard rails, logs decisions |
//! | (owner's rules) | [`policy`] | the Rhai sandbox and the script API policies are written against |
//! | CloudConduit | [`conduit`] | plans a relocation, journals it, drives it forward or back, keeps the source for its grace period |
//! | Migrator | [`migrators`] | one task of a relocation each (copy a volume, convert a disk, copy a bucket, rewrite config, start, check, cut over), with its undo |
//! | Viaduct | [`viaduct`] | the data path between providers: sparse, compressed, verified, resumable, rate-limited, authenticated |
//! | Cloud service provider | [`providers`] | the drivers (`local`, `qemu`, `s3`, `swift`) behind one trait, and `remote` for a provider on another host |
//! | Agent | [`agent`] | a host's providers and the ends of its viaducts, served to the daemon over mutual TLS |
//! | Service instance | [`model`] | services, components, offers, the market snapshot, verdicts |
//! | | [`config`] | the TOML file, parsed and validated with every problem at once |
//! | | [`api`], [`telemetry`] | the HTTP API and `/metrics`; logs and metrics |
//! | | [`daemon`] | the long-running process that ties them together |
//! | | [`sys`] | plumbing written once: atomic file writes, secret files, process groups, `qemu-img`, rate limits, retries, TLS and certificates |

pub mod agent;
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
