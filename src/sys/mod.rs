//! Plumbing every other module stands on, written once: files that are replaced whole or
//! not at all ([`fs`]), secrets read from files under one rule ([`secret`]) and URLs shown
//! without their credentials ([`redact`]). Nothing here knows about services, providers or
//! relocations.

pub mod certs;
pub mod fs;
pub mod redact;
pub mod secret;
pub mod tls;
