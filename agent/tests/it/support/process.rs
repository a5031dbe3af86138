//! Child processes that cannot outlive their owner.
//!
//! [`ChildGuard`] starts a program in its own process group and, when dropped
//! (also while a test panics), stops it by PID: the polite signal first, then
//! after a bounded wait `SIGKILL` to its whole group, and reaps it. The group
//! kill happens while the leader is still an unreaped zombie, so the group ID
//! cannot have been recycled. [`run_bounded`] runs a short-lived command with
//! a deadline.
//!
//! Not covered: a test binary killed with `SIGKILL` itself cannot clean up
//! (`PR_SET_PDEATHSIG` would need `pre_exec`, i.e. `unsafe`, which the
//! workspace forbids).

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// A running child that is stopped by PID and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    pid: Pid,
    /// Set once reaped; after that the PID is never signalled again.
    status: Option<ExitStatus>,
    name: String,
    stop_signal: Signal,
    grace: Duration,
    /// Log to print to stderr when dropped during a panic.
    log: Option<PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group; `stop_signal` then `grace` is how it is asked to stop.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        stop_signal: Signal,
        grace: Duration,
    ) -> ChildGuard {
        let child = cmd
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        ChildGuard {
            child,
            pid,
            status: None,
            name: name.to_owned(),
            stop_signal,
            grace,
            log: None,
        }
    }

    /// Prints the tail of `path` to stderr if the child is still running when dropped during a panic.
    pub fn dump_log_on_panic(mut self, path: &Path) -> Self {
        self.log = Some(path.to_owned());
        self
    }

    /// The child's PID (also its process group ID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guard's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `sig` to the child; panics if it has already been reaped.
    pub fn signal(&self, sig: Signal) {
        assert!(self.status.is_none(), "{} was already reaped", self.name);
        kill(self.pid, sig).unwrap_or_else(|e| panic!("kill -{sig} {}: {e}", self.name));
    }

    /// The exit status if the child has exited (reaping it and its group), else None.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.wait_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` for the child to exit on its own; reaps it (and kills its group) if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() || self.wait_exited_no_reap(timeout) {
            Some(self.reap())
        } else {
            None
        }
    }

    /// Stops the child (stop signal, bounded wait, then SIGKILL to its group) and reaps it.
    pub fn stop(&mut self) -> ExitStatus {
        if self.status.is_none() && !self.exited_no_reap() {
            // Cannot be ESRCH while unreaped; other errors show up as the timeout below.
            let _ = kill(self.pid, self.stop_signal);
            if !self.wait_exited_no_reap(self.grace) {
                eprintln!(
                    "support: {} (pid {}) ignored {} for {:?}; sending SIGKILL to its group",
                    self.name, self.pid, self.stop_signal, self.grace
                );
            }
        }
        self.reap()
    }

    /// Kills what is left of the process group, then reaps the leader (idempotent).
    fn reap(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        // The leader is unreaped (running or a zombie), so its PID, and with it
        // the group ID, cannot have been recycled: this kills only our processes.
        let _ = killpg(self.pid, Signal::SIGKILL);
        // SIGKILL is asynchronous: give stragglers a moment to actually die so
        // that nothing of the group runs once this returns (orphans then stay
        // zombies until PID 1 reaps them, which is harmless).
        let pgid = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(2);
        while group_members(pgid).into_iter().any(pid_alive) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let status = self.child.wait().expect("wait for child");
        self.status = Some(status);
        status
    }

    fn exited_no_reap(&self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        !matches!(waitid(Id::Pid(self.pid), flags), Ok(WaitStatus::StillAlive))
    }

    fn wait_exited_no_reap(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited_no_reap() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let was_running = self.status.is_none();
        let status = self.stop();
        // A child that had already exited was reaped by a caller that reported it.
        if thread::panicking() && was_running {
            eprintln!(
                "support: stopped {} (pid {}): {status}",
                self.name, self.pid
            );
            if let Some(log) = &self.log {
                eprintln!("----- {} ({}) -----", self.name, log.display());
                eprintln!("{}", tail(&read_lossy(log), 200));
                eprintln!("----- end {} -----", self.name);
            }
        }
    }
}

/// Exit code as a shell reports it: the code, or 128 + signal number.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .expect("exited or signalled")
}

/// Output of [`run_bounded`].
#[derive(Debug)]
pub struct BoundedOutput {
    /// Exit code (128 + signal when killed by a signal).
    pub code: i32,
    /// Captured stdout, lossily decoded.
    pub stdout: String,
    /// Captured stderr, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` with stdin closed and output captured; panics (after killing it) if it outlives `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> BoundedOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut guard = ChildGuard::spawn(&desc, cmd, Signal::SIGTERM, Duration::from_secs(2));
    let stdout = drain(guard.child.stdout.take().expect("piped stdout"));
    let stderr = drain(guard.child.stderr.take().expect("piped stderr"));
    let Some(status) = guard.wait_timeout(timeout) else {
        panic!("{desc} did not finish within {timeout:?}");
    };
    BoundedOutput {
        code: exit_code(status),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The file's content, lossily decoded; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a process with this PID exists (including zombies).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a process with this PID exists and is not a zombie (an orphan
/// killed by a group kill stays a zombie until PID 1 reaps it).
pub fn pid_alive(pid: u32) -> bool {
    let stat = read_lossy(Path::new(&format!("/proc/{pid}/stat")));
    match stat.rsplit_once(')') {
        Some((_, rest)) => rest.split_whitespace().next() != Some("Z"),
        None => false,
    }
}

/// PIDs whose process group is `pgid` (from `/proc/*/stat`).
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = read_lossy(&entry.path().join("stat"));
        // Fields after the parenthesised command: state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(2).and_then(|g| g.parse().ok()) == Some(pgid) {
            pids.push(pid);
        }
    }
    pids
}
