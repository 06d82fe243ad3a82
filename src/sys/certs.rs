//! The files an operator needs for [`super::tls`]: a private certificate authority, and a
//! certificate with its key for the daemon and for every agent, made with `rcgen`.
//!
//! `fluidcloud certs ca --dir DIR` writes `DIR/ca.pem` and `DIR/ca-key.pem`; `fluidcloud
//! certs issue --dir DIR --agent NAME --host ADDR...` (or `--daemon NAME`) writes
//! `DIR/NAME.pem` and `DIR/NAME-key.pem`. Nothing is ever overwritten. Keys are written
//! readable by their owner only; the authority's key should then be kept off the hosts.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use super::secret::{self, SecretError};
use super::tls::Role;

/// The authority's certificate in a certificates directory.
pub const CA_CERT: &str = "ca.pem";
/// The authority's private key in a certificates directory.
pub const CA_KEY: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{} already exists; nothing was written (remove it first to make a new one)", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(
        "`{name}` is not a valid party name: use 1 to 63 ASCII letters, digits, `-` or `_`, \
         starting with a letter or digit"
    )]
    Name { name: String },
    #[error("an agent's certificate needs at least one --host: the address the daemon and the other agents reach it at")]
    NoHost,
    #[error("`{host}` is not a host name or IP address a certificate can name: {reason}")]
    Host { host: String, reason: String },
    #[error("--days must be from 1 to 36500, got {0}")]
    Days(u32),
    #[error("{} is not a usable certificate authority: {reason}", path.display())]
    Authority { path: PathBuf, reason: String },
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CertError::Name {
            name: name.to_string(),
        })
    }
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if !(1..=36_500).contains(&days) {
        return Err(CertError::Days(days));
    }
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(())
}

/// Refuses to go on when any of `paths` exists.
fn none_exist(paths: &[&Path]) -> Result<(), CertError> {
    for p in paths {
        if p.exists() {
            return Err(CertError::Exists {
                path: p.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    super::fs::write_atomic(path, text.as_bytes()).map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Makes a new certificate authority in `dir`, valid for `days`.
pub fn create_authority(dir: &Path, days: u32) -> Result<Written, CertError> {
    let out = Written {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    none_exist(&[&out.cert, &out.key])?;
    let mut params = CertificateParams::default();
    validity(&mut params, days)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "FluidCloud private CA");
    dn.push(DnType::OrganizationName, "FluidCloud");
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    create_dir(dir)?;
    write(&out.key, &key.serialize_pem())?;
    write(&out.cert, &cert.pem())?;
    Ok(out)
}

/// Issues a certificate for the party `name` of `role` from the authority in `dir`, naming
/// `hosts` (IP addresses or DNS names) as where it is reached, valid for `days`.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    hosts: &[String],
    days: u32,
) -> Result<Written, CertError> {
    check_name(name)?;
    if role == Role::Agent && hosts.is_empty() {
        return Err(CertError::NoHost);
    }
    let out = Written {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    none_exist(&[&out.cert, &out.key])?;

    let ca_cert_path = dir.join(CA_CERT);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(|source| CertError::Read {
        path: ca_cert_path.clone(),
        source,
    })?;
    let ca_key_path = dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&secret::read_text(
        &ca_key_path,
        "certificate authority key",
    )?)
    .map_err(|e| CertError::Authority {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertError::Authority {
        path: ca_cert_path.clone(),
        reason: e.to_string(),
    })?;

    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for host in hosts {
        // The name must be one a client can dial and check (rustls's rules).
        super::tls::server_name(host).map_err(|_| CertError::Host {
            host: host.clone(),
            reason: "it is neither a DNS name nor an IP address".into(),
        })?;
        let san = CertificateParams::new(vec![host.clone()]).map_err(|e| CertError::Host {
            host: host.clone(),
            reason: e.to_string(),
        })?;
        params.subject_alt_names.extend(san.subject_alt_names);
    }
    validity(&mut params, days)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::OrganizationName, "FluidCloud");
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every party is a client (of an agent) and a server: agents serve their API and
    // viaduct; the daemon serves a viaduct receiver when a volume moves to one of its own
    // providers, under its name.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    if role == Role::Daemon {
        let san = CertificateParams::new(vec![name.to_string()]).map_err(|e| CertError::Host {
            host: name.to_string(),
            reason: e.to_string(),
        })?;
        params.subject_alt_names.extend(san.subject_alt_names);
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write(&out.key, &key.serialize_pem())?;
    write(&out.cert, &cert.pem())?;
    Ok(out)
}
