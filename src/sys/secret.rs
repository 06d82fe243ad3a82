//! Secrets read from files (the API token, hook tokens, viaduct keys, object-store
//! credentials), under one rule: a file other users can access is refused. Group access is
//! the operator's choice (a file `root:fluidcloud 0640`, say); systemd's credentials are 0400.

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
}
