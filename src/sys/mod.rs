//! Plumbing every other module stands on, written once: files that are replaced whole or
//! not at all ([`fs`]) and secrets read from files under one rule ([`secret`]). Nothing here
//! knows about services, providers or relocations.

pub mod fs;
pub mod secret;
