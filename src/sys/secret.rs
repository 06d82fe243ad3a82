//! Secrets read from files (the API token, hook tokens, viaduct keys, object-store
//! credentials), under one rule: a file other users can access is refused. Group access is
//! the operator's choice (a file `root:fluidcloud 0640`, say); systemd's credentials are 0400.
//! [`ApiTokenPath`] finds, checks and (once) generates the daemon's API token, for the loader
//! and the daemon alike.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is open to other users (mode {mode:04o}); run `chmod o-rwx` on it", path.display())]
    OpenToOthers {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} {} is empty", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} {} is not UTF-8 text", path.display())]
    NotText { what: &'static str, path: PathBuf },
}

/// Reads the secret file at `path` (`what` names it in errors: "the API token file"), with
/// trailing whitespace removed. Refuses a file other users can access, and an empty one.
pub fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let read_err = |source| SecretError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_err)?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(SecretError::OpenToOthers {
            what,
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut bytes = std::fs::read(path).map_err(read_err)?;
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    bytes.truncate(end);
    if bytes.is_empty() {
        return Err(SecretError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// [`read`], for a secret that is text (leading whitespace removed too).
pub fn read_text(path: &Path, what: &'static str) -> Result<String, SecretError> {
    let text = String::from_utf8(read(path, what)?).map_err(|_| SecretError::NotText {
        what,
        path: path.to_path_buf(),
    })?;
    Ok(text.trim_start().to_string())
}

/// Where the daemon's API token lives, and whether the daemon may generate it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenPath {
    pub path: PathBuf,
    /// True for the state directory's `api-token`: generated once when missing.
    pub generated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("cannot write a new API token to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ApiTokenPath {
    /// Where the API token comes from: the configured file, else systemd's credential
    /// `api-token`, else a token generated once into the state directory.
    pub fn locate(configured: Option<&Path>, state_dir: &Path) -> ApiTokenPath {
        if let Some(p) = configured {
            return ApiTokenPath {
                path: p.to_path_buf(),
                generated: false,
            };
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = Path::new(&dir).join("api-token");
            if p.exists() {
                return ApiTokenPath {
                    path: p,
                    generated: false,
                };
            }
        }
        ApiTokenPath {
            path: state_dir.join("api-token"),
            generated: true,
        }
    }

    /// Checks, without generating anything, that the daemon will be able to read its API
    /// token: the file exists, is not world-readable and is not empty, or it is to be
    /// generated.
    pub fn check(&self) -> Result<(), TokenError> {
        if self.generated && !self.path.exists() {
            return Ok(());
        }
        self.read().map(|_| ())
    }

    /// Reads the API token, generating one when the state directory is its home and it is
    /// missing.
    pub fn load(&self) -> Result<String, TokenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = &self.path;
        if self.generated && !path.exists() {
            let write_err = |source| TokenError::Write {
                path: path.clone(),
                source,
            };
            let mut bytes = [0u8; 32];
            urandom(&mut bytes).map_err(write_err)?;
            let token = blake3::hash(&bytes).to_hex().to_string();
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(token.as_bytes())?;
                f.write_all(b"\n")
            };
            write().map_err(write_err)?;
            tracing::info!("Generated an API token in {}.", path.display());
        }
        self.read()
    }

    fn read(&self) -> Result<String, TokenError> {
        Ok(read_text(&self.path, "the API token file")?)
    }
}

fn urandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(format!("secret-{mode:o}"));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn one_rule_for_every_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        for ok in [0o600, 0o400, 0o640, 0o440] {
            let p = file(dir.path(), "s3cret\n", ok);
            assert_eq!(read_text(&p, "the key file").unwrap(), "s3cret", "{ok:o}");
        }
        for open in [0o644, 0o604, 0o602, 0o601] {
            let p = file(dir.path(), "s3cret", open);
            let e = read(&p, "the key file").unwrap_err().to_string();
            assert!(
                e.contains("open to other users") && e.contains("the key file"),
                "{e}"
            );
        }
        let p = file(dir.path(), " \n", 0o600);
        assert!(matches!(read(&p, "x"), Err(SecretError::Empty { .. })));
        assert!(matches!(
            read(&dir.path().join("missing"), "x"),
            Err(SecretError::Read { .. })
        ));
    }

    #[test]
    fn an_api_token_in_the_state_directory_is_generated_once_and_checked_before() {
        let dir = tempfile::tempdir().unwrap();
        let at = ApiTokenPath {
            path: dir.path().join("state/api-token"),
            generated: true,
        };
        at.check().unwrap();
        assert!(!at.path.exists(), "checking generates nothing");
        let token = at.load().unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(at.load().unwrap(), token);
        let mode = std::fs::metadata(&at.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let configured = ApiTokenPath {
            path: dir.path().join("missing"),
            generated: false,
        };
        assert!(configured.check().is_err());
    }
}
