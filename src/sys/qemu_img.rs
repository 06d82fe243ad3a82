//! Running QEMU's disk tools, `qemu-img` and `qemu-io`, with typed errors: the local disk
//! pool creates and inspects images with them, the volume migrator converts, compares and
//! patches images with them. Each run has no standard input and is killed when its future
//! is dropped.

use std::ffi::OsStr;
use std::io;
use std::process::{ExitStatus, Stdio};

pub const QEMU_IMG: &str = "qemu-img";
pub const QEMU_IO: &str = "qemu-io";

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("cannot run {program} ({source}); it comes with the Debian package qemu-utils")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{program} {}` {status}: {}", args.join(" "), said(stderr, stdout))]
    Failed {
        program: &'static str,
        args: Vec<String>,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

impl QemuImgError {
    /// The program and its subcommand (`qemu-img convert`), or the program alone.
    pub fn command(&self) -> String {
        match self {
            QemuImgError::Spawn { program, .. } => program.to_string(),
            QemuImgError::Failed { program, args, .. } => match args.first() {
                Some(sub) if !sub.starts_with('-') => format!("{program} {sub}"),
                _ => program.to_string(),
            },
        }
    }
}

/// What a failed run printed: standard error, then standard output (where `qemu-img
/// compare` says what differs).
fn said(stderr: &str, stdout: &str) -> String {
    format!("{} {}", stderr.trim(), stdout.trim())
        .trim()
        .to_string()
}

/// Runs `qemu-img` with `args` and returns its standard output.
pub async fn qemu_img<I, S>(args: I) -> Result<Vec<u8>, QemuImgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(QEMU_IMG, args).await
}

/// Runs `qemu-io` with `args` and returns its standard output.
pub async fn qemu_io<I, S>(args: I) -> Result<Vec<u8>, QemuImgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(QEMU_IO, args).await
}

async fn run<I, S>(program: &'static str, args: I) -> Result<Vec<u8>, QemuImgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let output = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| QemuImgError::Spawn { program, source })?;
    if !output.status.success() {
        return Err(QemuImgError::Failed {
            program,
            args: args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failure_names_the_subcommand_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.qcow2");
        let err = match qemu_img([OsStr::new("info"), missing.as_os_str()]).await {
            // Without qemu-img installed there is nothing more to check.
            Err(e @ QemuImgError::Spawn { .. }) => {
                assert!(e.to_string().contains("qemu-utils"), "{e}");
                return;
            }
            Err(e) => e,
            Ok(_) => panic!("qemu-img info of a missing file succeeded"),
        };
        assert_eq!(err.command(), "qemu-img info");
        let text = err.to_string();
        assert!(text.contains("missing.qcow2"), "{text}");
    }
}
