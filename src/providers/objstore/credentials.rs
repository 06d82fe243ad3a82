//! Secrets of an object store, read from a file when the driver opens.
//!
//! The file is `credentials_file`, else `$CREDENTIALS_DIRECTORY/provider-<name>` (what
//! systemd's `LoadCredential=provider-<name>:PATH` provides). It must not be readable by
//! other users. Two shapes are read, both as `key = value` lines:
//!
//! - TOML, top-level keys or a `[profile]` table;
//! - INI as in `~/.aws/credentials` (unquoted values, `[profile]` sections, `#`/`;` comments).
//!
//! The profile is `credentials_profile`; without one, top-level keys are used, else the
//! `default` section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::CredentialsSource;
use crate::sys::secret::SecretError;

/// Why an object store's credentials could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialsError {
    #[error("no credentials: set `credentials_file`, or run under systemd with LoadCredential=provider-{provider}:PATH")]
    NoSource { provider: String },
    #[error(transparent)]
    Read(#[from] SecretError),
    /// The file is neither TOML nor INI as expected, or lacks the profile asked for.
    #[error("credentials file {}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("the credentials file {} has no `{}`", path.display(), keys.join("` or `"))]
    Missing {
        path: PathBuf,
        keys: &'static [&'static str],
    },
}

/// Key and secret of an S3 account.
#[derive(Clone)]
pub(crate) struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// User and password (or tempauth key) of a Swift account.
#[derive(Clone)]
pub(crate) struct SwiftCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SwiftCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwiftCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Finds and reads the file for `provider` and returns its keys.
fn load(
    provider: &str,
    source: &CredentialsSource,
) -> Result<(PathBuf, Entries), CredentialsError> {
    let path = match &source.file {
        Some(f) => f.clone(),
        None => match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => Path::new(&dir).join(format!("provider-{provider}")),
            None => {
                return Err(CredentialsError::NoSource {
                    provider: provider.to_string(),
                })
            }
        },
    };
    let text = crate::sys::secret::read_text(&path, "the credentials file")?;
    let entries = match parse(&text, source.profile.as_deref()) {
        Ok(entries) => entries,
        Err(reason) => return Err(CredentialsError::Malformed { path, reason }),
    };
    Ok((path, entries))
}

type Entries = BTreeMap<String, String>;

/// The keys of the chosen profile, as TOML if the text is TOML, else as INI.
fn parse(text: &str, profile: Option<&str>) -> Result<Entries, String> {
    let sections = match text.parse::<toml::Table>() {
        Ok(table) => from_toml(table)?,
        Err(_) => from_ini(text)?,
    };
    let pick = match profile {
        Some(p) => sections.get(p).ok_or_else(|| {
            format!(
                "has no profile `{p}`; it has: {}",
                names(&sections).unwrap_or_else(|| "none".to_string())
            )
        })?,
        None => match sections.get("").filter(|e| !e.is_empty()) {
            Some(top) => top,
            None => sections.get("default").ok_or_else(|| {
                format!(
                    "has neither top-level keys nor a `default` profile; set `credentials_profile` to one of: {}",
                    names(&sections).unwrap_or_else(|| "none".to_string())
                )
            })?,
        },
    };
    Ok(pick.clone())
}

fn names(sections: &BTreeMap<String, Entries>) -> Option<String> {
    let v: Vec<&str> = sections
        .keys()
        .filter(|k| !k.is_empty())
        .map(String::as_str)
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}

fn from_toml(table: toml::Table) -> Result<BTreeMap<String, Entries>, String> {
    let mut out: BTreeMap<String, Entries> = BTreeMap::new();
    for (k, v) in table {
        match v {
            toml::Value::String(s) => {
                out.entry(String::new()).or_default().insert(k, s);
            }
            toml::Value::Table(t) => {
                let mut entries = Entries::new();
                for (k2, v2) in t {
                    match v2 {
                        toml::Value::String(s) => {
                            entries.insert(k2, s);
                        }
                        other => {
                            return Err(format!(
                                "`{k}.{k2}` must be a string, not {}",
                                other.type_str()
                            ))
                        }
                    }
                }
                out.insert(k, entries);
            }
            other => return Err(format!("`{k}` must be a string, not {}", other.type_str())),
        }
    }
    Ok(out)
}

fn from_ini(text: &str) -> Result<BTreeMap<String, Entries>, String> {
    let mut out: BTreeMap<String, Entries> = BTreeMap::new();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            // ~/.aws/config spells profiles `[profile NAME]`.
            let name = name.trim();
            section = name
                .strip_prefix("profile ")
                .unwrap_or(name)
                .trim()
                .to_string();
            out.entry(section.clone()).or_default();
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "line {} is neither `[profile]` nor `key = value`",
                i + 1
            ));
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        out.entry(section.clone())
            .or_default()
            .insert(k.trim().to_string(), v.to_string());
    }
    Ok(out)
}

/// The first of `keys` present and non-empty.
fn take(entries: &Entries, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| entries.get(*k))
        .filter(|v| !v.is_empty())
        .cloned()
}

fn need(
    path: &Path,
    entries: &Entries,
    keys: &'static [&'static str],
) -> Result<String, CredentialsError> {
    take(entries, keys).ok_or_else(|| CredentialsError::Missing {
        path: path.to_path_buf(),
        keys,
    })
}

pub(crate) fn s3(
    provider: &str,
    source: &CredentialsSource,
) -> Result<S3Credentials, CredentialsError> {
    let (path, e) = load(provider, source)?;
    Ok(S3Credentials {
        access_key_id: need(&path, &e, &["access_key_id", "aws_access_key_id"])?,
        secret_access_key: need(&path, &e, &["secret_access_key", "aws_secret_access_key"])?,
        session_token: take(&e, &["session_token", "aws_session_token"]),
    })
}

pub(crate) fn swift(
    provider: &str,
    source: &CredentialsSource,
) -> Result<SwiftCredentials, CredentialsError> {
    let (path, e) = load(provider, source)?;
    Ok(SwiftCredentials {
        username: need(&path, &e, &["username", "user"])?,
        password: need(&path, &e, &["password", "key"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn source(file: PathBuf, profile: Option<&str>) -> CredentialsSource {
        CredentialsSource {
            file: Some(file),
            profile: profile.map(str::to_string),
        }
    }

    #[test]
    fn toml_and_aws_style_ini_are_both_read() {
        let tmp = tempfile::tempdir().unwrap();
        let toml = file(
            tmp.path(),
            "a.toml",
            "access_key_id = \"AK\"\nsecret_access_key = \"S=K\"\n",
            0o600,
        );
        let c = s3("p", &source(toml, None)).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("AK", "S=K")
        );
        assert!(c.session_token.is_none());

        let ini = file(
            tmp.path(),
            "credentials",
            "# comment\n[default]\naws_access_key_id = AK1\naws_secret_access_key = SK1\n\n[profile lab]\naws_access_key_id=AK2\naws_secret_access_key=SK2=x\naws_session_token = T\n",
            0o640,
        );
        let c = s3("p", &source(ini.clone(), None)).unwrap();
        assert_eq!(c.access_key_id, "AK1");
        let c = s3("p", &source(ini.clone(), Some("lab"))).unwrap();
        assert_eq!(c.secret_access_key, "SK2=x");
        assert_eq!(c.session_token.as_deref(), Some("T"));
        let err = s3("p", &source(ini, Some("prod"))).unwrap_err().to_string();
        assert!(
            err.contains("no profile `prod`; it has: default, lab"),
            "{err}"
        );

        let sw = file(
            tmp.path(),
            "sw",
            "[swift]\nuser = \"test:tester\"\nkey = \"testing\"\n",
            0o400,
        );
        let c = swift("p", &source(sw, Some("swift"))).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("test:tester", "testing")
        );
    }

    #[test]
    fn missing_keys_open_files_and_no_source_are_explained() {
        let tmp = tempfile::tempdir().unwrap();
        let f = file(tmp.path(), "a", "access_key_id = \"AK\"\n", 0o600);
        let err = s3("p", &source(f.clone(), None)).unwrap_err().to_string();
        assert!(
            err.ends_with("has no `secret_access_key` or `aws_secret_access_key`"),
            "{err}"
        );
        let open = file(
            tmp.path(),
            "b",
            "username = \"u\"\npassword = \"p\"\n",
            0o644,
        );
        let err = swift("p", &source(open, None)).unwrap_err().to_string();
        assert!(err.contains("open to other users (mode 0644)"), "{err}");
        let err = s3("p", &source(tmp.path().join("none"), None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the credentials file"), "{err}");
        let err = parse("just words\n", None).unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
