//! Plumbing every other module stands on, written once: files that are replaced whole or
//! not at all ([`fs`]), secrets read from files under one rule ([`secret`]), URLs shown
//! without their credentials ([`redact`]), byte counts as people read them ([`units`]),
//! child processes in groups of their own ([`process`]), the `qemu-img` runner
//! ([`qemu_img`]), a Network Block Device client that reads a running VM's disk with its
//! allocated and dirty extents from QEMU's NBD export ([`nbd`]), byte-rate limits
//! ([`rate`]), retries ([`retry`]), and mutual TLS with the certificates it needs
//! ([`tls`], [`certs`]). Nothing here knows about services, providers or relocations.

pub mod certs;
pub mod fs;
pub mod nbd;
pub mod process;
pub mod qemu_img;
pub mod rate;
pub mod redact;
pub mod retry;
pub mod secret;
pub mod tls;
pub mod units;
