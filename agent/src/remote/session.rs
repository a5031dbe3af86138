//! One OpenSSH control connection (`ControlMaster`) to an [`Endpoint`], and
//! what runs over it: SFTP channels and remote commands.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::endpoint::{Endpoint, RemoteError, RemoteOutput};
use super::quote::command_line;
use super::sftp::{DEFAULT_REQUEST_TIMEOUT, Sftp};
use crate::model::fmt::clipped;
use crate::sync::lock;

/// How much of each output stream of a remote command is kept (the same
/// bound as local commands: `command::OUTPUT_LIMIT`).
pub const OUTPUT_LIMIT: usize = 8 * 1024;
/// The longest control socket path accepted. The kernel allows 107 bytes
/// in `sun_path`, and OpenSSH binds the master's socket under a temporary
/// name 17 bytes longer before renaming it into place.
pub const MAX_CONTROL_PATH: usize = 90;
/// How long `ssh -O check` / `ssh -O exit` may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of the master's stderr kept for error messages.
const LOG_LINES: usize = 400;

/// The program run: the system's OpenSSH client, found on `PATH`.
const SSH: &str = "ssh";

/// A live control connection to one endpoint. Every SFTP channel and
/// command goes through it, so the TCP connection, key exchange and login
/// happen once. Closed (`ssh -O exit`, then the master is stopped) by
/// [`Session::close`] or on drop.
pub struct Session {
    ep: Endpoint,
    control: PathBuf,
    master: Mutex<Child>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.ep.display())
            .field("control", &self.control)
            .finish()
    }
}

/// `path` as an ssh option value: OpenSSH expands `%` tokens in file
/// names (written `%%` for a literal one) and splits values at whitespace
/// and quotes, which are refused.
fn option_path(what: &str, path: &Path) -> Result<String, RemoteError> {
    let s = path.to_str().ok_or_else(|| {
        RemoteError::Protocol(format!(
            "{what} path is not UTF-8: {}",
            crate::model::fmt::shown(path)
        ))
    })?;
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'\\".contains(c))
    {
        return Err(RemoteError::Protocol(format!(
            "{what} path {} contains whitespace, quotes or control characters, which ssh cannot take: use another path",
            crate::model::fmt::shown(path)
        )));
    }
    let s = s.replace('%', "%%");
    if s.starts_with('~') {
        return Err(RemoteError::Protocol(format!(
            "{what} path {} must be absolute",
            crate::model::fmt::shown(path)
        )));
    }
    Ok(s)
}

/// The options every ssh of a session gets, master and clients alike: a
/// client whose master has gone would connect on its own, and then it
/// must be exactly as strict.
fn common_args(ep: &Endpoint, control: &Path) -> Result<Vec<OsString>, RemoteError> {
    let known = option_path("known_hosts", &ep.known_hosts)?;
    let identity = option_path("identity", &ep.identity_file)?;
    let control = option_path("control socket", control)?;
    let secs = ep.connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
    let opts = [
        "BatchMode=yes".to_owned(),
        "StrictHostKeyChecking=yes".to_owned(),
        format!("UserKnownHostsFile={known}"),
        "GlobalKnownHostsFile=none".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        "CheckHostIP=no".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
        format!("IdentityFile={identity}"),
        "IdentityAgent=none".to_owned(),
        "AddKeysToAgent=no".to_owned(),
        "PreferredAuthentications=publickey".to_owned(),
        "PubkeyAuthentication=yes".to_owned(),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
        "HostbasedAuthentication=no".to_owned(),
        "GSSAPIAuthentication=no".to_owned(),
        format!("ConnectTimeout={secs}"),
        "ConnectionAttempts=1".to_owned(),
        "ServerAliveInterval=10".to_owned(),
        "ServerAliveCountMax=3".to_owned(),
        format!("ControlPath={control}"),
        "ForwardAgent=no".to_owned(),
        "ForwardX11=no".to_owned(),
        "ClearAllForwardings=yes".to_owned(),
        "PermitLocalCommand=no".to_owned(),
        "RequestTTY=no".to_owned(),
    ];
    let mut args: Vec<OsString> = vec!["-F".into(), "none".into()];
    for o in opts {
        args.push("-o".into());
        args.push(o.into());
    }
    args.push("-p".into());
    args.push(ep.port.to_string().into());
    args.push("-l".into());
    args.push(ep.user.clone().into());
    Ok(args)
}

/// `ssh` with `args`, stdin closed: the one place the transport starts a
/// process (the OpenSSH client, nothing else; see the module doc).
#[allow(clippy::disallowed_methods)] // remote's own process: the ssh client
fn ssh(args: &[OsString]) -> Command {
    let mut cmd = Command::new(SSH);
    cmd.args(args).stdin(Stdio::null());
    cmd
}

fn spawn(cmd: &mut Command) -> Result<Child, RemoteError> {
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            RemoteError::NoSshClient
        } else {
            RemoteError::Io(e)
        }
    })
}

/// Waits for `child` until `deadline`; kills and reaps it then (`None`).
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A bounded `ssh -O <op>` against the control socket: whether it succeeded.
fn control_op(ep: &Endpoint, control: &Path, op: &str) -> bool {
    let Ok(mut args) = common_args(ep, control) else {
        return false;
    };
    args.extend([
        "-o".into(),
        "LogLevel=QUIET".into(),
        "-O".into(),
        op.into(),
        "--".into(),
    ]);
    args.push(ep.host.clone().into());
    let mut cmd = ssh(&args);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    matches!(
        wait_until(&mut child, Instant::now() + CONTROL_TIMEOUT),
        Ok(Some(s)) if s.success()
    )
}

/// Ends the masters left by agent processes that are gone (a crash, a
/// `SIGKILL`): each control socket of `dir` whose name carries the PID of
/// a process that no longer exists is told `ssh -O exit` (bounded), then
/// removed. Best effort: what cannot be done is logged.
pub fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').nth(1))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if !is_socket || !gone || pid == std::process::id() as i32 {
            continue;
        }
        let path = entry.path();
        let Ok(control) = option_path("control socket", &path) else {
            continue;
        };
        let args: Vec<OsString> = [
            "-F",
            "none",
            "-o",
            &format!("ControlPath={control}"),
            "-o",
            "LogLevel=QUIET",
            "-O",
            "exit",
            "--",
            "stale",
        ]
        .map(OsString::from)
        .to_vec();
        let mut cmd = ssh(&args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(mut child) = cmd.spawn() {
            let _ = wait_until(&mut child, Instant::now() + CONTROL_TIMEOUT);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(socket = %path.display(), "ended an ssh master left by a previous agent")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "could not remove a stale ssh control socket")
            }
        }
    }
}

/// The control directory, created 0700 when missing; it must be a
/// directory of this user, not open to others.
fn prepare_control_dir(dir: &Path) -> Result<(), RemoteError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(RemoteError::Io(e)),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(RemoteError::Protocol(format!(
            "ssh control directory {} is not a directory of this user: remove it or choose another",
            crate::model::fmt::shown(dir)
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A control socket name unique to this endpoint, process and session,
/// short enough for `sun_path`.
fn control_path(dir: &Path, ep: &Endpoint) -> Result<PathBuf, RemoteError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let digest = Sha256::digest(format!("{ep:?}").as_bytes());
    let name = format!("{}-{}-{n}", hex::encode(&digest[..6]), std::process::id());
    let path = dir.join(&name);
    if path.as_os_str().as_bytes().len() > MAX_CONTROL_PATH {
        return Err(RemoteError::Protocol(format!(
            "ssh control directory {} is too long for a control socket (at most {} bytes): use a shorter one",
            crate::model::fmt::shown(dir),
            MAX_CONTROL_PATH.saturating_sub(name.len() + 1)
        )));
    }
    Ok(path)
}

/// Collects the master's stderr lines (bounded) and tells when it ends.
fn collect_lines(
    stream: impl Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
    done: mpsc::Sender<()>,
) {
    let spawned = thread::Builder::new()
        .name("ssh-log".into())
        .spawn(move || {
            let mut r = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                // A line longer than this is cut (the rest arrives as the next
                // "line" and is cut too): memory stays bounded.
                match (&mut r).take(4096).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let mut l = lock(&log);
                        if l.len() < LOG_LINES {
                            let text = String::from_utf8_lossy(&line);
                            l.push(text.trim_end().to_owned());
                        }
                    }
                }
            }
            let _ = done.send(());
        });
    if spawned.is_err() {
        tracing::warn!("could not start the thread reading ssh's log");
    }
}

/// What the master's log says went wrong.
fn classify(ep: &Endpoint, log: &[String], status: Option<ExitStatus>) -> RemoteError {
    let fingerprint = log
        .iter()
        .filter(|l| l.contains("Server host key:") || l.contains("key sent by the remote host"))
        .flat_map(|l| l.split_whitespace())
        .chain(log.iter().flat_map(|l| l.split_whitespace()))
        .find(|w| w.starts_with("SHA256:") && w.len() > 7)
        .map(|w| clipped(w.trim_end_matches('.'), 80))
        .unwrap_or_else(|| "no fingerprint seen".to_owned());
    let has = |needle: &str| log.iter().any(|l| l.contains(needle));
    let line = |needle: &str| {
        log.iter()
            .find(|l| l.contains(needle))
            .map(|l| clipped(l.trim_start_matches("ssh: "), 200))
            .unwrap_or_default()
    };
    let host = ep.host.clone();
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || has("has changed and you have requested strict")
    {
        return RemoteError::HostKeyChanged {
            host,
            port: ep.port,
            fingerprint,
        };
    }
    if has("host key is known for") || has("Host key verification failed") {
        return RemoteError::HostKeyUnknown {
            host,
            port: ep.port,
            fingerprint,
        };
    }
    if has("Permission denied (") {
        return RemoteError::AuthFailed {
            endpoint: ep.display(),
            detail: line("Permission denied ("),
        };
    }
    for needle in [
        "UNPROTECTED PRIVATE KEY FILE",
        "Load key",
        "no such identity",
    ] {
        if has(needle) {
            return RemoteError::AuthFailed {
                endpoint: ep.display(),
                detail: line(needle),
            };
        }
    }
    if has("Connection timed out") || has("Operation timed out") {
        return RemoteError::ConnectTimeout {
            endpoint: ep.display(),
            timeout: ep.connect_timeout,
        };
    }
    for needle in [
        "Connection refused",
        "No route to host",
        "Network is unreachable",
        "Could not resolve hostname",
        "Name or service not known",
        "kex_exchange_identification",
        "Connection closed by",
        "Connection reset",
    ] {
        if has(needle) {
            return RemoteError::Unreachable(format!("{}: {}", ep.display(), line(needle)));
        }
    }
    let last = log
        .iter()
        .rev()
        .find(|l| !l.starts_with("debug"))
        .map(|l| clipped(l, 200))
        .unwrap_or_default();
    let status = status.map_or_else(|| "was stopped".to_owned(), |s| format!("exited with {s}"));
    RemoteError::Protocol(format!("ssh to {} {status}: {last}", ep.display()))
}

/// What is kept of an output stream: its head, its tail, and how many
/// bytes were dropped between them.
type Kept = (Vec<u8>, Vec<u8>, u64);

/// Keeps the first and last `OUTPUT_LIMIT / 2` bytes of `first` and then
/// the stream, reading it to its end (so the remote side never blocks on a
/// full pipe).
fn read_bounded(first: Vec<u8>, mut r: impl Read) -> Kept {
    let half = OUTPUT_LIMIT / 2;
    let (mut head, mut tail, mut dropped) = (Vec::new(), Vec::new(), 0u64);
    let mut buf = [0u8; 4096];
    let mut pending = first;
    loop {
        let n = if pending.is_empty() {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            }
        } else {
            let n = pending.len().min(buf.len());
            buf[..n].copy_from_slice(&pending[..n]);
            pending.drain(..n);
            n
        };
        let mut chunk = &buf[..n];
        if head.len() < half {
            let take = (half - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        tail.extend_from_slice(chunk);
        if tail.len() > half {
            let excess = tail.len() - half;
            tail.drain(..excess);
            dropped += excess as u64;
        }
    }
    (head, tail, dropped)
}

/// What a wrapped command writes first on stderr: its process group.
const PGID_MARK: &str = "certctl-remote-pgid=";

/// stderr of a command: with `pgid`, a first line `<mark><pid>` is taken
/// out and sent; anything else stays output.
fn read_stderr(r: impl Read, pgid: Option<mpsc::Sender<u32>>) -> Kept {
    let mut r = BufReader::new(r);
    let Some(pgid) = pgid else {
        return read_bounded(Vec::new(), r);
    };
    let mut first = Vec::new();
    let _ = (&mut r).take(64).read_until(b'\n', &mut first);
    let parsed = std::str::from_utf8(&first)
        .ok()
        .and_then(|l| l.strip_prefix(PGID_MARK))
        .and_then(|l| l.strip_suffix('\n'))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n > 1);
    match parsed {
        Some(n) => {
            let _ = pgid.send(n);
            read_bounded(Vec::new(), r)
        }
        None => read_bounded(first, r),
    }
}

fn join_bounded((head, tail, dropped): Kept) -> String {
    let mut s = String::from_utf8_lossy(&head).into_owned();
    if dropped > 0 {
        s.push_str(&format!("\n[… {dropped} bytes dropped …]\n"));
    }
    s.push_str(&String::from_utf8_lossy(&tail));
    s
}

impl Session {
    /// Connects to `ep`: starts an `ssh -M -N` master whose control socket
    /// lives in `control_dir` (created 0700), and waits, at most
    /// `ep.connect_timeout`, until it answers `ssh -O check`. The host key
    /// is checked against `ep.known_hosts` only; an unknown or changed key
    /// fails here, before any channel is opened, with the presented key's
    /// SHA256 fingerprint in the error.
    pub fn connect(ep: &Endpoint, control_dir: &Path) -> Result<Session, RemoteError> {
        ep.check()?;
        prepare_control_dir(control_dir)?;
        let control = control_path(control_dir, ep)?;
        match std::fs::symlink_metadata(&control) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(&control)?;
            }
            Ok(_) => {
                return Err(RemoteError::Protocol(format!(
                    "{} is in the way of the ssh control socket: remove it",
                    crate::model::fmt::shown(&control)
                )));
            }
            Err(_) => {}
        }
        let mut args = common_args(ep, &control)?;
        args.extend(
            [
                "-v",
                "-M",
                "-N",
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=no",
                "--",
            ]
            .map(OsString::from),
        );
        args.push(ep.host.clone().into());
        let mut cmd = ssh(&args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut master = spawn(&mut cmd)?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done) = mpsc::channel();
        if let Some(stderr) = master.stderr.take() {
            collect_lines(stderr, Arc::clone(&log), done_tx);
        }
        let deadline = started + ep.connect_timeout;
        loop {
            if let Some(status) = master.try_wait()? {
                // Let the log reader take the last lines.
                let _ = done.recv_timeout(Duration::from_secs(1));
                return Err(classify(ep, &lock(&log), Some(status)));
            }
            if control.exists() && control_op(ep, &control, "check") {
                tracing::debug!(
                    endpoint = %ep.display(),
                    took = ?started.elapsed(),
                    "ssh master connected"
                );
                return Ok(Session {
                    ep: ep.clone(),
                    control,
                    master: Mutex::new(master),
                });
            }
            if Instant::now() >= deadline {
                let _ = master.kill();
                let _ = master.wait();
                let _ = std::fs::remove_file(&control);
                let _ = done.recv_timeout(Duration::from_secs(1));
                let err = classify(ep, &lock(&log), None);
                // A host key problem found just before the deadline still
                // says so; anything else is the timeout.
                return Err(match err {
                    e @ (RemoteError::HostKeyUnknown { .. }
                    | RemoteError::HostKeyChanged { .. }
                    | RemoteError::AuthFailed { .. }) => e,
                    _ => RemoteError::ConnectTimeout {
                        endpoint: ep.display(),
                        timeout: ep.connect_timeout,
                    },
                });
            }
            let _ = done.recv_timeout(Duration::from_millis(50));
        }
    }

    /// The endpoint this session is connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// The master's PID (to tell sessions apart, and for tests).
    pub fn master_pid(&self) -> u32 {
        lock(&self.master).id()
    }

    /// Whether the master still runs and answers `ssh -O check`.
    pub fn is_alive(&self) -> bool {
        if !matches!(lock(&self.master).try_wait(), Ok(None)) {
            return false;
        }
        control_op(&self.ep, &self.control, "check")
    }

    fn client_args(&self) -> Result<Vec<OsString>, RemoteError> {
        let mut args = common_args(&self.ep, &self.control)?;
        args.extend(["-o", "ControlMaster=no", "-o", "LogLevel=ERROR"].map(OsString::from));
        Ok(args)
    }

    /// A new SFTP channel over the master (`ssh -s <host> sftp`), its
    /// handshake bounded by the endpoint's connect timeout; requests then
    /// wait at most [`DEFAULT_REQUEST_TIMEOUT`] unless
    /// [`Sftp::set_timeout`] says otherwise.
    pub fn sftp(&self) -> Result<Sftp, RemoteError> {
        let mut args = self.client_args()?;
        args.extend(["-s", "--"].map(OsString::from));
        args.push(self.ep.host.clone().into());
        args.push("sftp".into());
        let mut cmd = ssh(&args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut cmd)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RemoteError::Protocol("ssh gave no pipes".into()));
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let (tx, _rx) = mpsc::channel();
            collect_lines(stderr, Arc::clone(&log), tx);
        }
        let mut sftp = Sftp::start(stdout, stdin, Some(child), self.ep.connect_timeout).map_err(|e| {
            let said = lock(&log).join(" ");
            RemoteError::Protocol(format!(
                "sftp subsystem on {} did not start: {e}{}{}; the server needs an sftp subsystem (Subsystem sftp in sshd_config)",
                self.ep.display(),
                if said.is_empty() { "" } else { ": " },
                clipped(&said, 200)
            ))
        })?;
        sftp.set_timeout(DEFAULT_REQUEST_TIMEOUT);
        Ok(sftp)
    }

    /// Runs `argv` on the remote host through the account's login shell,
    /// each argument single-quoted (see `quote`), stdin closed, bounded by
    /// `timeout`. Each output stream keeps its first and last
    /// `OUTPUT_LIMIT / 2` bytes.
    ///
    /// The command line is `echo "<mark><pid>" >&2; exec <argv>`: sshd runs
    /// every command without a terminal in a session of its own (`setsid`),
    /// so that PID is also the command's process group, and the first line
    /// of stderr (removed from the output) tells it. At the deadline the
    /// local ssh is killed, which closes the channel, but sshd sends the
    /// command no signal (OpenSSH signals nothing without a terminal); so
    /// the agent then runs `kill -s KILL -- -<pgid>` over the same master,
    /// bounded too. [`RemoteError::CommandTimeout`] says whether that
    /// worked; when it did not (the host is gone, or no PID was seen), the
    /// command may still run there.
    pub fn run(&self, argv: &[String], timeout: Duration) -> Result<RemoteOutput, RemoteError> {
        let quoted = command_line(argv)?;
        let line = format!("echo \"{PGID_MARK}$$\" >&2; exec {quoted}");
        let (pgid_tx, pgid_rx) = mpsc::channel();
        let started = Instant::now();
        match self.exec(&line, started + timeout, Some(pgid_tx))? {
            Some(out) => Ok(out),
            None => {
                let remote_stopped = match pgid_rx.try_recv() {
                    Ok(pgid) => self.kill_remote_group(pgid),
                    Err(_) => false,
                };
                Err(RemoteError::CommandTimeout {
                    command: clipped(&quoted, 200),
                    timeout,
                    remote_stopped,
                })
            }
        }
    }

    /// Kills the remote process group `pgid` (bounded); whether it worked.
    fn kill_remote_group(&self, pgid: u32) -> bool {
        let line = format!("kill -s KILL -- -{pgid}");
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let done = self.exec(&line, deadline, None);
        let ok = matches!(&done, Ok(Some(out)) if out.success());
        if !ok {
            tracing::warn!(endpoint = %self.ep.display(), pgid, "could not stop a timed-out remote command");
        }
        ok
    }

    /// Runs the command line `line` until `deadline`: its output, or `None`
    /// when the deadline came first (the local ssh is then killed). With
    /// `pgid`, the first stderr line carries the remote process group.
    fn exec(
        &self,
        line: &str,
        deadline: Instant,
        pgid: Option<mpsc::Sender<u32>>,
    ) -> Result<Option<RemoteOutput>, RemoteError> {
        let mut args = self.client_args()?;
        args.extend(["-T", "--"].map(OsString::from));
        args.push(self.ep.host.clone().into());
        args.push(line.into());
        let mut cmd = ssh(&args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = spawn(&mut cmd)?;
        let out = child.stdout.take().and_then(|s| {
            thread::Builder::new()
                .name("ssh-stdout".into())
                .spawn(move || read_bounded(Vec::new(), s))
                .ok()
        });
        let err = child.stderr.take().and_then(|s| {
            thread::Builder::new()
                .name("ssh-stderr".into())
                .spawn(move || read_stderr(s, pgid))
                .ok()
        });
        let Some(status) = wait_until(&mut child, deadline)? else {
            return Ok(None);
        };
        let collect = |h: Option<thread::JoinHandle<Kept>>| {
            h.and_then(|h| h.join().ok())
                .map(join_bounded)
                .unwrap_or_default()
        };
        Ok(Some(RemoteOutput {
            code: status.code(),
            stdout: collect(out),
            stderr: collect(err),
            duration: started.elapsed(),
        }))
    }

    /// Ends the connection (`ssh -O exit`, then the master is stopped and
    /// reaped). Dropping a session does the same.
    pub fn close(self) {}

    fn shut(&mut self) {
        let master = self
            .master
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(master.try_wait(), Ok(None)) {
            control_op(&self.ep, &self.control, "exit");
            let _ = wait_until(master, Instant::now() + Duration::from_secs(2));
        }
        let _ = std::fs::remove_file(&self.control);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint {
            host: "example.org".into(),
            port: 2222,
            user: "deploy".into(),
            identity_file: "/etc/certctl/ssh/id_ed25519".into(),
            known_hosts: "/etc/certctl/ssh/known_hosts".into(),
            connect_timeout: Duration::from_millis(2500),
        }
    }

    #[test]
    fn strict_options() {
        let args: Vec<String> = common_args(&ep(), Path::new("/run/c/x"))
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "-F none",
            "-o StrictHostKeyChecking=yes",
            "-o UserKnownHostsFile=/etc/certctl/ssh/known_hosts",
            "-o GlobalKnownHostsFile=none",
            "-o BatchMode=yes",
            "-o IdentitiesOnly=yes",
            "-o ConnectTimeout=3",
            "-o ControlPath=/run/c/x",
            "-p 2222",
            "-l deploy",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
    }

    #[test]
    fn refuses_paths_and_names_ssh_would_misread() {
        let mut e = ep();
        e.known_hosts = "/a b/known_hosts".into();
        assert!(common_args(&e, Path::new("/c")).is_err());
        let mut e = ep();
        e.identity_file = "/keys/%h".into();
        let args = common_args(&e, Path::new("/c")).unwrap();
        assert!(args.iter().any(|a| a == "IdentityFile=/keys/%%h"));
        for host in ["", "-oProxyCommand=x", "a b", "a\nb", "u@h"] {
            let mut e = ep();
            e.host = host.into();
            assert!(e.check().is_err(), "{host:?}");
        }
        let mut e = ep();
        e.user = "-l".into();
        assert!(e.check().is_err());
        assert!(ep().check().is_ok());
    }

    #[test]
    fn control_paths_are_short_and_distinct() {
        let a = control_path(Path::new("/run/certctl/ssh"), &ep()).unwrap();
        let b = control_path(Path::new("/run/certctl/ssh"), &ep()).unwrap();
        assert_ne!(a, b);
        assert!(a.as_os_str().len() < MAX_CONTROL_PATH);
        let long = PathBuf::from(format!("/{}", "d".repeat(80)));
        assert!(control_path(&long, &ep()).is_err());
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn classifies_the_masters_log() {
        let e = ep();
        let unknown = lines(
            "debug1: Server host key: ssh-ed25519 SHA256:abcDEF123\n\
             No ED25519 host key is known for [example.org]:2222 and you have requested strict checking.\n\
             Host key verification failed.",
        );
        match classify(&e, &unknown, None) {
            RemoteError::HostKeyUnknown { fingerprint, .. } => {
                assert_eq!(fingerprint, "SHA256:abcDEF123");
            }
            other => panic!("{other:?}"),
        }
        let changed = lines(
            "debug1: Server host key: ssh-ed25519 SHA256:zzz\n\
             @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
             Host key verification failed.",
        );
        assert!(matches!(
            classify(&e, &changed, None),
            RemoteError::HostKeyChanged { fingerprint, .. } if fingerprint == "SHA256:zzz"
        ));
        let denied = lines("deploy@example.org: Permission denied (publickey).");
        let msg = classify(&e, &denied, None).to_string();
        assert!(msg.contains("authorized_keys"), "{msg}");
        let refused = lines("ssh: connect to host example.org port 2222: Connection refused");
        assert!(
            matches!(classify(&e, &refused, None), RemoteError::Unreachable(m) if m.contains("refused"))
        );
        let hostile = lines("\u{1b}[31mevil\u{7}");
        let msg = classify(&e, &hostile, None).to_string();
        assert!(!msg.contains('\u{1b}') && !msg.contains('\u{7}'), "{msg}");
    }

    #[test]
    fn a_missing_ssh_says_what_to_install() {
        let err = spawn(&mut Command::new("/nonexistent/bin/ssh")).unwrap_err();
        assert!(matches!(err, RemoteError::NoSshClient), "{err:?}");
        assert!(err.to_string().contains("install openssh-client"), "{err}");
    }

    #[test]
    fn output_keeps_head_and_tail() {
        let data: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let kept = join_bounded(read_bounded(Vec::new(), &data[..]));
        assert!(kept.len() < OUTPUT_LIMIT + 64, "{}", kept.len());
        assert!(kept.starts_with("abc"));
        assert!(kept.contains("bytes dropped"));
        let small = join_bounded(read_bounded(b"he".to_vec(), &b"llo"[..]));
        assert_eq!(small, "hello");
        let (tx, rx) = mpsc::channel();
        let err = join_bounded(read_stderr(
            &b"certctl-remote-pgid=4242\noops\n"[..],
            Some(tx),
        ));
        assert_eq!((err.as_str(), rx.try_recv().ok()), ("oops\n", Some(4242)));
        let (tx, rx) = mpsc::channel();
        let err = join_bounded(read_stderr(&b"mux: no master\n"[..], Some(tx)));
        assert_eq!(
            (err.as_str(), rx.try_recv().ok()),
            ("mux: no master\n", None)
        );
    }
}
