//! Plumbing every other module stands on, written once: files that are replaced whole or
//! not at all ([`fs`]), secrets read from files under one rule ([`secret`]), URLs shown
//! without their credentials ([`redact`]) and byte counts as people read them ([`units`]).
//! Nothing here knows about services, providers or relocations.

pub mod fs;
pub mod process;
pub mod qemu_img;
pub mod rate;
pub mod redact;
pub mod retry;
pub mod secret;
pub mod units;
