//! Processes of the local driver: launching an app in its own session, telling our process
//! from another that reuses its pid, waiting for it to end and signalling it.
//!
//! A process is named by its pid and its start time (field 22 of `/proc/PID/stat`, clock
//! ticks since boot): the pair stays unique even when the kernel hands the pid out again.
//! Exits are awaited through a pidfd, which works for processes this daemon did not start
//! (adopted after a restart) as well as for its own children, which it then reaps.

use std::ffi::{CStr, CString, OsString};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::process::{
    kill_process, kill_process_group, waitid, waitpid, Pid, PidfdFlags, Signal, WaitId,
    WaitIdOptions, WaitOptions,
};
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
pub(crate) struct Stat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
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
        let (Some(pid), Some(signal)) = (
            i32::try_from(self.pid).ok().and_then(Pid::from_raw),
            Signal::from_named_raw(signal),
        ) else {
            return Err(io::Error::from(rustix::io::Errno::INVAL));
        };
        let sent = if s.pgrp == self.pid as i32 {
            kill_process_group(pid, signal)
        } else {
            kill_process(pid, signal)
        };
        match sent {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
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
pub(crate) fn spawn(
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
    // The child writes its own pid file before it becomes the app: a daemon killed at any
    // moment after the fork leaves a pid file the next one adopts the app by, never an app
    // that runs unknown (and holds its port) after a rollback removed its directory.
    let pid_file = path_cstring(&app_dir.join("pid"))?;
    let pid_tmp = path_cstring(&app_dir.join(".pid.spawn"))?;
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // calls are allowed; setsid and the calls `write_own_pid_file` makes are system calls on
    // the stack and on paths built before the fork: nothing is allocated and no memory
    // shared with the parent is touched. std has no safe way to start a session
    // (`process_group` would leave the app in the daemon's session).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            write_own_pid_file(&pid_tmp, &pid_file)
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // The pid file may name the child that failed to exec.
            let _ = std::fs::remove_file(app_dir.join("pid"));
            return Err(e);
        }
    };
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

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Writes `PID START_TIME` of the calling process to `tmp`, then renames it to `path`. Runs
/// in a forked child before exec: system calls and the stack only, no allocation (errors
/// are plain errnos).
fn write_own_pid_file(tmp: &CStr, path: &CStr) -> io::Result<()> {
    use rustix::fs::{fsync, open, rename, Mode, OFlags};
    use rustix::io::{read, write, Errno};
    let stat = open(
        c"/proc/self/stat",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while len < buf.len() {
        match read(&stat, &mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    let text = &buf[..len];
    // As in `parse_stat`: field 22 (the start time) is the 20th after the last `)`.
    let close = text.iter().rposition(|&b| b == b')').ok_or(Errno::INVAL)?;
    let start = text[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .nth(19)
        .filter(|f| f.len() <= 20)
        .ok_or(Errno::INVAL)?;
    let mut line = [0u8; 64];
    let mut n = 0;
    let mut digits = [0u8; 20];
    let mut pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    for part in [&digits[d..], b" ", start, b"\n"] {
        line[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    let fd = open(
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    let mut written = 0;
    while written < n {
        written += write(&fd, &line[written..n])?;
    }
    fsync(&fd)?;
    drop(fd);
    rename(tmp, path)?;
    Ok(())
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
pub(crate) async fn wait_exit(id: ProcessId) -> String {
    match pidfd_open(id.pid) {
        Ok(fd) => {
            // The pidfd pins whatever process has the pid now; make sure it is ours.
            if !matches!(stat(id.pid), Some(s) if s.start_time == id.start_time) {
                return "ended (it was gone when the supervisor looked)".to_string();
            }
            // SAFETY: the AsyncFd takes ownership of the OwnedFd, which is a valid open
            // descriptor (pidfd_open just returned it), is never closed or replaced while
            // the AsyncFd holds it, and always answers `as_raw_fd` with that descriptor.
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
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from(rustix::io::Errno::INVAL))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Reaps the process behind `fd` if it is our child; None when it is not.
fn reap_pidfd(fd: &OwnedFd) -> Option<String> {
    let status = waitid(
        WaitId::PidFd(fd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )
    .ok()??;
    Some(if let Some(code) = status.exit_status() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.terminating_signal() {
        if status.dumped() {
            format!("killed by {} (core dumped)", signal_name(signal))
        } else {
            format!("killed by {}", signal_name(signal))
        }
    } else {
        "ended".to_string()
    })
}

/// Reaps the process if it is a zombie child of ours whose supervisor has not done so (one
/// was replaced right after a stop). Otherwise does nothing.
pub(crate) fn reap_if_zombie(id: ProcessId) {
    if matches!(stat(id.pid), Some(s) if s.start_time == id.start_time && s.state == 'Z') {
        let _ = reap_pid(id.pid);
    }
}

fn reap_pid(pid: u32) -> Option<String> {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw)?;
    let (_, status) = waitpid(Some(pid), WaitOptions::NOHANG).ok()??;
    Some(if let Some(code) = status.exit_status() {
        format!("exited with status {code}")
    } else if let Some(signal) = status.terminating_signal() {
        format!("killed by {}", signal_name(signal))
    } else {
        "ended".to_string()
    })
}

pub(crate) fn signal_name(signal: i32) -> String {
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

    /// A daemon killed between starting an app and writing its pid file left the app
    /// running unknown: the next daemon could not adopt it, the rollback removed its
    /// directory, and the orphan kept the port the source app needed to start again.
    #[test]
    fn an_app_has_its_pid_file_before_it_runs_so_a_killed_daemon_orphans_none() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AppSpec {
            name: "web".to_string(),
            command: "sh".to_string(),
            args: vec!["-c".to_string(), "cat pid > seen".to_string()],
            env: Default::default(),
            workdir: None,
            port: None,
        };
        let path = [(OsString::from("PATH"), std::env::var_os("PATH").unwrap())];
        let id = spawn(&spec, dir.path(), dir.path(), &path).unwrap();
        let seen = dir.path().join("seen");
        for _ in 0..200 {
            if !id.is_running() && seen.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // What the app saw when it started is the pid file naming it.
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), id.to_pid_file());
        let _ = waitpid(
            Some(Pid::from_raw(id.pid as i32).unwrap()),
            WaitOptions::NOHANG,
        );
    }

    #[test]
    fn a_command_that_cannot_start_leaves_no_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AppSpec {
            name: "web".to_string(),
            command: "/nonexistent/app".to_string(),
            args: vec![],
            env: Default::default(),
            workdir: None,
            port: None,
        };
        assert!(spawn(&spec, dir.path(), dir.path(), &[]).is_err());
        assert!(!dir.path().join("pid").exists());
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
