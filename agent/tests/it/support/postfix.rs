//! A real Postfix (Debian's package) offering STARTTLS on a free loopback port.
//!
//! [`Postfix::start`] lays out a private instance under the given directory:
//! `etc/main.cf` and `etc/master.cf` (the config directory passed with `-c`),
//! `spool/` (queue directory, with the master's pid file and the private and
//! public service sockets) and `data/` (data directory, with `master.lock`;
//! owned by the `postfix` user). Two instances share no file, socket, lock or
//! port, so tests run in parallel. It then runs `postfix -c DIR start-fg` as a
//! child of the test and waits until the port answers with this instance's
//! own banner (`<myhostname> ESMTP certctl-test`; the host name is unique per
//! instance), so another process on the port is never mistaken for ours.
//!
//! **Processes.** `postfix start-fg` execs `postfix-script`, which runs the
//! master with `-s`; the master makes itself a session and process group
//! leader (so `postfix stop` can signal all of Postfix), which takes it out of
//! the process group [`ChildGuard`] created. Dropping a [`Postfix`] therefore
//! sends `SIGTERM` to the master (Postfix's own emergency stop: the master
//! passes it to its group and exits), waits up to 5 s for the group to empty,
//! then sends `SIGKILL` to the master's group; the `postfix-script` child then
//! exits and is reaped by its guard. This happens also when the test panics.
//! Signals go out only while the master's group has live members, and Linux
//! does not reuse a number that is still some group's ID, so a recycled PID
//! is never hit.
//!
//! **Root only.** The `postfix` command refuses to run for anyone but root, so
//! [`postfix_available`] treats "not root" like "not installed": a failure, or
//! a printed skip under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
//!
//! **Certificates.** `smtpd_tls_cert_file` holds the leaf followed by the chain
//! (Postfix ≥ 3.4 reads a whole chain from it) and `smtpd_tls_key_file` the key.
//! `smtpd` reads both as root at process start, before it drops privileges, so
//! a `0600 root` key works. A running `smtpd` keeps what it read, but the
//! master starts a fresh one (which reads the files) whenever no idle one is
//! free, so before a reload new files may or may not be served. `postfix
//! reload` retires the old generation; right after the command returns an old
//! idle `smtpd` may still take a connection, so probes use
//! [`super::mailtls::wait_until_served`].
//!
//! Gotchas: Postfix programs wait until `main.cf` is about two seconds old
//! before trusting it (so the config files are written with an older mtime);
//! without `maillog_file = /dev/stdout` (and the `postlog` service in
//! `master.cf`) a failing `start-fg` exits 1 and prints nothing; the data
//! directory must be owned by `postfix` and every directory above it must be
//! traversable by that user ([`Postfix::start`] checks and says which is not);
//! `postfix check` also creates the missing queue subdirectories.

use super::absolute;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::mailtls::{MailProtocol, greeting};
use super::nginx::free_port;
use super::process::{ChildGuard, group_members, pid_alive, read_lossy, run_bounded, tail};

/// How long Postfix may take to answer on its port.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the master's process group may take to exit after `SIGTERM`.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Attempts to find a port nobody else grabs between our probe and the master's bind.
const PORT_ATTEMPTS: usize = 5;
/// Bound for `postfix check` and `postfix reload`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The absolute path of the postfix command: `$PATH`, then `/usr/sbin/postfix`.
pub fn postfix_bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| super::find_program("postfix", &["/usr/sbin/postfix"]))
        .as_deref()
}

/// True when Postfix is installed and we are root; otherwise panics, or prints
/// "skipped" and returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn postfix_available() -> bool {
    if postfix_bin().is_none()
        || nix::unistd::User::from_name("postfix")
            .ok()
            .flatten()
            .is_none()
    {
        return !super::server_missing("postfix");
    }
    if !nix::unistd::geteuid().is_root() {
        let test = thread::current().name().unwrap_or("<unnamed>").to_owned();
        let allow = super::ALLOW_MISSING_SERVERS;
        if std::env::var(allow).as_deref() == Ok("1") {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: postfix runs only as root ({allow}=1)"
            );
            return false;
        }
        panic!(
            "{test}: the postfix command runs only as root. Run the tests as root \
             (as CI does), or set {allow}=1 to skip the tests that need it"
        );
    }
    true
}

// === impl Postfix ===

/// A running private Postfix instance; its processes are stopped on drop.
pub struct Postfix {
    /// `postfix -c DIR start-fg`, i.e. `postfix-script`, waiting for the master.
    wrapper: ChildGuard,
    /// The master's PID, which is also its process group ID.
    master: u32,
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// A second `smtpd` with implicit TLS (`smtpd_tls_wrappermode`, as on 465).
    smtps_port: u16,
    myhostname: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Postfix {
    /// Starts an instance under `dir` whose `smtpd` offers STARTTLS with
    /// `cert` (leaf + chain) and `key`, and waits until it answers.
    pub fn start(dir: &Path, cert: &Path, key: &Path) -> Postfix {
        let bin = postfix_bin()
            .expect("postfix is not installed (check postfix_available() first)")
            .to_owned();
        let dir = absolute(dir);
        let (cert, key) = (absolute(cert), absolute(key));
        prepare_dirs(&dir);
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let smtps_port = free_port();
            let myhostname = unique_hostname();
            match start_once(&bin, &dir, (port, smtps_port), &myhostname, &cert, &key) {
                Ok((wrapper, master)) => {
                    return Postfix {
                        wrapper,
                        master,
                        bin,
                        dir,
                        port,
                        smtps_port,
                        myhostname,
                        cert,
                        key,
                    };
                }
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("postfix: no free port after {PORT_ATTEMPTS} attempts; last log:\n{last_error}");
    }

    /// The loopback port `smtpd` listens on (plain SMTP with STARTTLS).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[target.verify] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The loopback port of the implicit-TLS `smtpd` (465-style: the
    /// handshake comes first, no STARTTLS).
    pub fn smtps_port(&self) -> u16 {
        self.smtps_port
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/etc`: the config directory (`postfix -c`).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("etc")
    }

    /// `smtpd_tls_cert_file`: leaf followed by the chain.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// `smtpd_tls_key_file`.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// This instance's `myhostname` (unique; it appears in the banner).
    pub fn myhostname(&self) -> &str {
        &self.myhostname
    }

    /// PID of the master (its own process group leader).
    pub fn master_pid(&self) -> u32 {
        self.master
    }

    /// `[postfix, -c, DIR, check]`: a target's `validate` argv.
    pub fn validate_argv(&self) -> Vec<String> {
        self.postfix_argv("check")
    }

    /// `[postfix, -c, DIR, reload]`: a target's `reload` argv.
    pub fn reload_argv(&self) -> Vec<String> {
        self.postfix_argv("reload")
    }

    /// Runs [`Self::reload_argv`] and asserts exit 0. The master re-reads its
    /// config asynchronously: wait for the new leaf with
    /// [`super::mailtls::wait_until_served`].
    pub fn reload(&self) {
        let argv = self.reload_argv();
        let out = run_bounded(Command::new(&argv[0]).args(&argv[1..]), COMMAND_TIMEOUT);
        assert_eq!(
            out.code,
            0,
            "postfix reload failed: {}{}\nlog:\n{}",
            out.stdout,
            out.stderr,
            self.log()
        );
    }

    /// The instance's log (`maillog_file = /dev/stdout`, plus `postfix-script`'s output).
    pub fn log(&self) -> String {
        tail(&read_lossy(&log_path(&self.dir)), 200)
    }

    fn postfix_argv(&self, command: &str) -> Vec<String> {
        vec![
            self.bin.to_string_lossy().into_owned(),
            "-c".into(),
            self.config_dir().to_string_lossy().into_owned(),
            command.into(),
        ]
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        // Also when the master already died: its children may not have.
        stop_master(self.master);
        // Then the wrapper's guard (a field) reaps `postfix-script`.
    }
}

enum StartError {
    /// Another process bound the port first; carries the log.
    PortTaken(String),
    /// Anything else: a ready-to-panic message.
    Failed(String),
}

fn start_once(
    bin: &Path,
    dir: &Path,
    (port, smtps_port): (u16, u16),
    myhostname: &str,
    cert: &Path,
    key: &Path,
) -> Result<(ChildGuard, u32), StartError> {
    let etc = dir.join("etc");
    let pid_file = dir.join("spool/pid/master.pid");
    let _ = std::fs::remove_file(&pid_file);
    write_config(
        &etc.join("main.cf"),
        &render_main_cf(dir, myhostname, cert, key),
    );
    write_config(&etc.join("master.cf"), &render_master_cf(port, smtps_port));
    let log = log_path(dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open postfix.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&etc)
        .arg("start-fg")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup postfix.log"))
        .stderr(file);
    let mut wrapper =
        ChildGuard::spawn("postfix", &mut cmd, Signal::SIGTERM, STOP_GRACE).dump_log_on_panic(&log);
    let deadline = Instant::now() + START_TIMEOUT;
    let mut master = None;
    let failed = |what: String| {
        StartError::Failed(format!(
            "{what}; main.cf:\n{}\nmaster.cf:\n{}\nlog {}:\n{}",
            read_lossy(&etc.join("main.cf")),
            read_lossy(&etc.join("master.cf")),
            log.display(),
            tail(&read_lossy(&log), 100)
        ))
    };
    loop {
        if master.is_none() {
            master = read_lossy(&pid_file).trim().parse::<u32>().ok();
        }
        if let Some(status) = wrapper.try_wait() {
            if let Some(m) = master {
                stop_master(m);
            }
            let text = read_lossy(&log);
            if text.contains("Address already in use") {
                return Err(StartError::PortTaken(tail(&text, 50)));
            }
            return Err(failed(format!("postfix exited during startup ({status})")));
        }
        if let Some(m) = master {
            // The banner names this instance, so the answer is ours.
            if let Ok(text) = greeting(port, MailProtocol::Smtp) {
                if text.contains(myhostname) {
                    return Ok((wrapper, m));
                }
                // Another server on the port; ours cannot bind it.
                stop_master(m);
                return Err(StartError::PortTaken(format!(
                    "127.0.0.1:{port} answered with someone else's banner {text:?}"
                )));
            }
        }
        if Instant::now() >= deadline {
            if let Some(m) = master {
                stop_master(m);
            }
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let listening = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            return Err(failed(format!(
                "postfix did not answer on {addr} within {START_TIMEOUT:?} \
                 (master pid {master:?}, port accepts: {listening})"
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a config file dated a minute back: Postfix programs re-read a
/// `main.cf` younger than about two seconds every 300 ms until it has "cooled
/// down" (it might still be being written), which made every start take 2 s.
fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

/// `SIGTERM` to the master, bounded wait for its group to empty, then `SIGKILL` to the group.
fn stop_master(master: u32) {
    let alive = || group_members(master).into_iter().any(pid_alive);
    if !alive() {
        return;
    }
    let pid = Pid::from_raw(i32::try_from(master).expect("pid fits i32"));
    if pid_alive(master) {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while alive() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if alive() {
        eprintln!(
            "support: postfix master {master} group still running {STOP_GRACE:?} after SIGTERM; \
             sending SIGKILL"
        );
        let _ = killpg(pid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Creates `etc/`, `spool/` and a postfix-owned `data/`, and checks that the
/// `postfix` user can reach them.
fn prepare_dirs(dir: &Path) {
    for (sub, mode) in [
        ("", 0o755),
        ("etc", 0o755),
        ("spool", 0o755),
        ("data", 0o700),
    ] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).expect("create postfix dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .expect("chmod postfix dir");
    }
    let user = nix::unistd::User::from_name("postfix")
        .expect("getpwnam postfix")
        .expect("the postfix user exists (check postfix_available() first)");
    nix::unistd::chown(&dir.join("data"), Some(user.uid), Some(user.gid))
        .expect("chown data dir to postfix");
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .unwrap_or_else(|e| panic!("stat {}: {e}", ancestor.display()));
        let traversable = meta.mode() & 0o001 != 0
            || (meta.uid() == user.uid.as_raw() && meta.mode() & 0o100 != 0);
        assert!(
            traversable,
            "postfix: {} is not traversable by the postfix user (mode {:o}), so it cannot \
             reach {}; put the test's temp dir elsewhere (TMPDIR)",
            ancestor.display(),
            meta.mode() & 0o7777,
            dir.join("data").display()
        );
    }
}

fn render_main_cf(dir: &Path, myhostname: &str, cert: &Path, key: &Path) -> String {
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/postfix.rs)\n\
         compatibility_level = 3.6\n\
         queue_directory = {queue}\n\
         data_directory = {data}\n\
         mail_owner = postfix\n\
         myhostname = {myhostname}\n\
         mydomain = certctl.test\n\
         myorigin = $myhostname\n\
         mydestination =\n\
         local_recipient_maps =\n\
         alias_maps =\n\
         alias_database =\n\
         relayhost =\n\
         inet_interfaces = loopback-only\n\
         inet_protocols = ipv4\n\
         maillog_file = /dev/stdout\n\
         smtpd_banner = $myhostname ESMTP certctl-test\n\
         smtpd_tls_security_level = may\n\
         smtpd_tls_cert_file = {cert}\n\
         smtpd_tls_key_file = {key}\n\
         smtpd_tls_loglevel = 1\n",
        queue = value(&dir.join("spool")),
        data = value(&dir.join("data")),
        cert = value(cert),
        key = value(key),
    )
}

/// Debian's services minus the delivery agents, none chrooted, `smtpd` on the loopback port.
fn render_master_cf(port: u16, smtps_port: u16) -> String {
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/postfix.rs)\n\
         # service type  private unpriv  chroot  wakeup  maxproc command\n\
         127.0.0.1:{port} inet n - n - - smtpd\n\
         127.0.0.1:{smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes\n\
         pickup    unix  n       -       n       60      1       pickup\n\
         cleanup   unix  n       -       n       -       0       cleanup\n\
         qmgr      unix  n       -       n       300     1       qmgr\n\
         tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n\
         rewrite   unix  -       -       n       -       -       trivial-rewrite\n\
         bounce    unix  -       -       n       -       0       bounce\n\
         defer     unix  -       -       n       -       0       bounce\n\
         trace     unix  -       -       n       -       0       bounce\n\
         verify    unix  -       -       n       -       1       verify\n\
         flush     unix  n       -       n       1000?   0       flush\n\
         proxymap  unix  -       -       n       -       -       proxymap\n\
         proxywrite unix -       -       n       -       1       proxymap\n\
         error     unix  -       -       n       -       -       error\n\
         retry     unix  -       -       n       -       -       error\n\
         discard   unix  -       -       n       -       -       discard\n\
         anvil     unix  -       -       n       -       1       anvil\n\
         scache    unix  -       -       n       -       1       scache\n\
         postlog   unix-dgram n  -       n       -       1       postlogd\n"
    )
}

/// `pf<test pid>-<n>.certctl.test`: distinct across instances and test processes.
fn unique_hostname() -> String {
    format!("{}.certctl.test", super::unique_token("pf"))
}

/// `<dir>/postfix.log`: the master's stdout and stderr.
fn log_path(dir: &Path) -> PathBuf {
    dir.join("postfix.log")
}

/// A path as a main.cf value (which has no quoting).
fn value(path: &Path) -> String {
    super::unquoted_value(path, "main.cf")
}
