//! Processes of the local driver: launching an app in its own session, telling our process
//! from another that reuses its pid, waiting for it to end and signalling it.
//!
//! A process is named by its pid and its start time (field 22 of `/proc/PID/stat`, clock
//! ticks since boot): the pair stays unique even when the kernel hands the pid out again.
//! Exits are awaited through a pidfd, which works for processes this daemon did not start
//! (adopted after a restart) as well as for its own children, which it then reaps.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::providers::AppSpec;

/// Logs larger than this are moved aside (to `*.log.1`) when the app is started again.
const MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;
/// How often exits are looked for where a pidfd cannot be had.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// The fields of `/proc/PID/stat` the driver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub(super) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

impl ProcessId {
    /// The process now running under `pid`, if any.
    pub(crate) fn of(pid: u32) -> Option<ProcessId> {
        stat(pid).map(|s| ProcessId {
            pid,
            start_time: s.start_time,
        })
    }

    /// True while this very process runs (not a zombie, not a later process with its pid).
    pub(crate) fn is_running(&self) -> bool {
        matches!(stat(self.pid), Some(s) if s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }

    /// Sends `signal` to the process and, when it leads its own process group (as apps
    /// started here do), to the whole group so that its helpers get it too. Returns false
    /// when the process is not running any more.
    pub(crate) fn signal(&self, signal: i32) -> io::Result<bool> {
        let Some(s) = stat(self.pid) else {
            return Ok(false);
        };
        if s.start_time != self.start_time || matches!(s.state, 'Z' | 'X') {
            return Ok(false);
        }
        let target = if s.pgrp == self.pid as i32 {
            -(self.pid as i32)
        } else {
            self.pid as i32
        };
        // SAFETY: kill has no memory effects; the target was checked to be our process.
        if unsafe { libc::kill(target, signal) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(e)
        }
    }

    /// The pid file's content.
    pub(crate) fn to_pid_file(self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    pub(crate) fn parse_pid_file(text: &str) -> Result<ProcessId, String> {
        let mut parts = text.split_whitespace();
        let (Some(pid), Some(start), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "expected `PID START_TIME`, found `{}`",
                text.trim()
            ));
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| format!("`{pid}` is not a process id"))?;
        let start_time: u64 = start
            .parse()
            .map_err(|_| format!("`{start}` is not a process start time"))?;
        if pid == 0 {
            return Err("process id 0 is not a process".to_string());
        }
        Ok(ProcessId { pid, start_time })
    }
}

/// Starts the app in its own session (so it outlives the daemon and can be signalled as a
/// group) with output appended to `stdout.log`/`stderr.log` in `app_dir`. Returns once the
/// program has been executed.
pub(super) fn spawn(
    spec: &AppSpec,
    app_dir: &Path,
    workdir: &Path,
    base_env: &[(OsString, OsString)],
) -> io::Result<ProcessId> {
    let stdout = open_log(&app_dir.join("stdout.log"))?;
    let stderr = open_log(&app_dir.join("stderr.log"))?;
    let mut cmd = Command::new(&spec.command);
    cmd.args(&spec.args)
        .env_clear()
        .envs(base_env.iter().map(|(k, v)| (k, v)))
        .envs(&spec.env)
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: setsid is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // The child is reaped through its pidfd (see `wait_exit`) like an adopted process, so
    // the handle is not kept.
    drop(child);
    ProcessId::of(pid).ok_or_else(|| {
        io::Error::other(format!(
            "process {pid} vanished before its start time could be read"
        ))
    })
}

fn open_log(path: &Path) -> io::Result<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, old)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Waits until the process ends and says how it ended, as far as this daemon can know: the
/// exit status of its own children, less of processes it adopted.
pub(super) async fn wait_exit(id: ProcessId) -> String {
    match pidfd_open(id.pid) {
        Ok(fd) => {
            // The pidfd pins whatever process has the pid now; make sure it is ours.
            if !matches!(stat(id.pid), Some(s) if s.start_time == id.start_time) {
                return "ended (it was gone when the supervisor looked)".to_string();
            }
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open for as long
            // as it is registered.
            match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
                Ok(afd) => {
                    if afd.readable().await.is_ok() {
                        return reap_pidfd(afd.get_ref()).unwrap_or_else(not_our_child);
                    }
                }
                Err(e) => {
                    tracing::debug!("Cannot watch pidfd of process {}: {e}; polling.", id.pid);
                }
            }
            poll_exit(id).await
        }
        Err(e) => {
            tracing::debug!("pidfd_open({}) failed: {e}; polling for its exit.", id.pid);
            poll_exit(id).await
        }
    }
}

async fn poll_exit(id: ProcessId) -> String {
    loop {
        match stat(id.pid) {
            Some(s) if s.start_time == id.start_time && s.state == 'Z' => {
                // A zombie keeps its pid until reaped, so waiting on the pid is exact here.
                return reap_pid(id.pid).unwrap_or_else(not_our_child);
            }
            Some(s) if s.start_time == id.start_time && s.state != 'X' => {}
            _ => return not_our_child(),
        }
        tokio::time::sleep(POLL).await;
    }
}

fn not_our_child() -> String {
    "ended; its exit status went to another parent (it was started by an earlier daemon)"
        .to_string()
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; on success it returns a new descriptor we then own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reaps the process behind `fd` if it is our child; None when it is not.
fn reap_pidfd(fd: &OwnedFd) -> Option<String> {
    // SAFETY: siginfo_t is plain data; waitid fills it in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: reading fields waitid set (si_pid is 0 when nothing was reaped).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above.
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_EXITED => format!("exited with status {status}"),
        libc::CLD_KILLED => format!("killed by {}", signal_name(status)),
        libc::CLD_DUMPED => format!("killed by {} (core dumped)", signal_name(status)),
        _ => "ended".to_string(),
    })
}

/// Reaps the process if it is a zombie child of ours whose supervisor has not done so (one
/// was replaced right after a stop). Otherwise does nothing.
pub(super) fn reap_if_zombie(id: ProcessId) {
    if matches!(stat(id.pid), Some(s) if s.start_time == id.start_time && s.state == 'Z') {
        let _ = reap_pid(id.pid);
    }
}

fn reap_pid(pid: u32) -> Option<String> {
    let mut status = 0;
    // SAFETY: waitpid writes only into `status`.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if r != pid as libc::pid_t {
        return None;
    }
    Some(if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by {}", signal_name(libc::WTERMSIG(status)))
    } else {
        "ended".to_string()
    })
}

pub(super) fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    format!("signal {signal} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a `)` must not shift the fields.
        let line = "4242 (evil) name (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(line).expect("parses");
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn own_process_has_a_start_time_and_is_running() {
        let me = ProcessId::of(std::process::id()).expect("own stat");
        assert!(me.is_running());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.is_running(),
            "a different start time is another process"
        );
    }

    #[test]
    fn pid_files_round_trip_and_garbage_is_refused() {
        let id = ProcessId {
            pid: 77,
            start_time: 123,
        };
        assert_eq!(ProcessId::parse_pid_file(&id.to_pid_file()), Ok(id));
        for bad in ["", "77", "77 x", "x 1", "0 5", "1 2 3"] {
            assert!(ProcessId::parse_pid_file(bad).is_err(), "{bad:?} accepted");
        }
    }
}
