//! Child processes started in a process group of their own, so that the helpers they start
//! (a shell's children, fio's workers) can be stopped with them: [`spawn_in_group`] starts
//! one and hands back a [`GroupGuard`] that kills the whole group when it is dropped before
//! the leader was reaped, and [`wait_or_kill`] waits for the leader at most a timeout.

use std::io;
use std::os::fd::RawFd;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::process::{Child, Command};

/// Kills a child's process group (with SIGKILL) when dropped while armed, or at
/// [`GroupGuard::kill`]. Disarm it with [`GroupGuard::reaped`] once the leader was reaped:
/// from then on its id may name someone else's group.
#[derive(Debug)]
pub struct GroupGuard {
    pgid: Option<Pid>,
}

impl GroupGuard {
    /// Guards the group led by `child`, which must have been started with
    /// `process_group(0)` (as [`spawn_in_group`] does).
    pub fn of(child: &Child) -> Self {
        GroupGuard {
            pgid: child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .and_then(Pid::from_raw),
        }
    }

    /// Kills the group now, once; later calls and the drop do nothing.
    pub fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // The group may be gone already; there is nothing left to do then.
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }

    /// The leader was reaped: the group is no longer ours to kill.
    pub fn reaped(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` as the leader of a new process group; the child is also killed when its
/// handle is dropped.
pub fn spawn_in_group(cmd: &mut Command) -> io::Result<(Child, GroupGuard)> {
    let child = cmd.kill_on_drop(true).process_group(0).spawn()?;
    let guard = GroupGuard::of(&child);
    Ok((child, guard))
}

/// Waits for the group's leader at most `timeout`. On time it is reaped and its status
/// returned; past the timeout (or when waiting fails) the whole group is killed and the
/// leader reaped, and the answer is `Ok(None)` (or the error).
pub async fn wait_or_kill(
    child: &mut Child,
    guard: &mut GroupGuard,
    timeout: Duration,
) -> io::Result<Option<ExitStatus>> {
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            guard.reaped();
            Ok(Some(status))
        }
        Ok(Err(e)) => {
            guard.kill();
            let _ = child.wait().await;
            Err(e)
        }
        Err(_) => {
            guard.kill();
            let _ = child.wait().await;
            Ok(None)
        }
    }
}

/// Marks every descriptor this process inherited beyond stdin, stdout and stderr
/// close-on-exec, so the apps, hooks and emulators it starts do not hold them: a lock or a
/// socket of whoever started the daemon would otherwise stay open as long as an app runs,
/// which may be long after the daemon is gone. Called once at start, before any thread.
pub fn close_inherited_on_exec() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD and F_SETFD only read and set the descriptor's flags; a number
        // that is not open (the directory listing's own descriptor, closed since) fails
        // with EBADF and is skipped. No other thread runs yet to reuse a number meanwhile.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timeout_kills_the_helpers_too() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("helper-ran");
        // The shell starts a helper that would write the marker after the timeout.
        let script = format!("(sleep 1; touch {}) & wait", marker.display());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let (mut child, mut guard) = spawn_in_group(&mut cmd).unwrap();
        let status = wait_or_kill(&mut child, &mut guard, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(status.is_none(), "the command should have timed out");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the helper outlived the timeout");
    }

    #[tokio::test]
    async fn a_command_that_ends_in_time_reports_its_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let (mut child, mut guard) = spawn_in_group(&mut cmd).unwrap();
        let status = wait_or_kill(&mut child, &mut guard, Duration::from_secs(10))
            .await
            .unwrap()
            .expect("it ended in time");
        assert_eq!(status.code(), Some(3));
    }
}
