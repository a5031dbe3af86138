//! A real Dovecot (Debian's packages) serving IMAP and POP3 on free loopback ports.
//!
//! [`Dovecot::start`] writes `<dir>/dovecot.conf` with `base_dir` (sockets,
//! `master.pid`), `state_dir` and the log under `<dir>`, and a unique
//! `instance_name`, so two instances share nothing and tests run in parallel.
//! It listens on 127.0.0.1 only, on three distinct ports: `imaps` (implicit
//! TLS), `imap` (plaintext with `STARTTLS`) and, when dovecot-pop3d is
//! installed, `pop3` (plaintext with `STLS`); `pop3s` is off. It runs
//! `dovecot -F -c FILE` as a child of the test (Dovecot stays in the process
//! group [`ChildGuard`] gives it) and waits until the plaintext ports greet
//! with this instance's own `login_greeting`. Dovecot binds every listener
//! before serving any and exits if one bind fails, so the greeting proves that
//! all the ports are ours. Dropping the [`Dovecot`] sends `SIGTERM` to the
//! master, then `SIGKILL` to its process group after 5 s, and reaps it, also
//! on panic.
//!
//! **Certificates.** `ssl_cert = <FILE` and `ssl_key = <FILE` are read by
//! Dovecot's config process (root) when the master starts and on every reload,
//! and handed to the login processes, which never open the files. So swapping
//! the files changes nothing until `doveadm reload` (SIGHUP to the master),
//! after which new connections get the new certificate; the login processes
//! are started per connection. The chain may follow the leaf in `ssl_cert`.
//!
//! **Users.** As root the login processes run as `dovenull` chrooted into
//! `<base_dir>/login` and the internal services as `dovecot`, as in Debian's
//! config. As a non-root developer, every service runs as you and without
//! chroot (which needs root).
//!
//! **Missing Dovecot.** [`dovecot_available`] panics unless dovecot-imapd is
//! installed, or prints a "skipped" line and returns false under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`, like the nginx tests.
//!
//! Gotchas: Dovecot takes about a second to exit after `SIGTERM`; a second
//! instance on the same `base_dir` refuses to start ("Dovecot is already
//! running"), hence a fresh `base_dir` per attempt; without
//! `/usr/share/dovecot/protocols.d` (Debian's main config includes it, this
//! one does not) `protocols` must be set explicitly.

use super::absolute;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::mailtls::{MailProtocol, greeting};
use super::process::{ChildGuard, read_lossy, run_bounded, tail};

/// How long Dovecot may take to greet on its ports.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Dovecot may take to exit after `SIGTERM` before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Attempts to find ports nobody else grabs between our probe and Dovecot's bind.
const PORT_ATTEMPTS: usize = 5;
/// Bound for `doveconf -n` and `doveadm reload`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian (then RHEL) installs Dovecot's service binaries.
const LIBEXEC_DIRS: &[&str] = &["/usr/lib/dovecot", "/usr/libexec/dovecot"];

/// Absolute paths of `dovecot`, `doveconf` and `doveadm`, when all are installed.
struct Bins {
    dovecot: PathBuf,
    doveconf: PathBuf,
    doveadm: PathBuf,
}

fn bins() -> Option<&'static Bins> {
    static BINS: OnceLock<Option<Bins>> = OnceLock::new();
    BINS.get_or_init(|| {
        Some(Bins {
            dovecot: super::find_program("dovecot", &["/usr/sbin/dovecot"])?,
            doveconf: super::find_program("doveconf", &["/usr/bin/doveconf"])?,
            doveadm: super::find_program("doveadm", &["/usr/bin/doveadm"])?,
        })
    })
    .as_ref()
}

/// Whether Dovecot's `<service>` binary (e.g. `imap-login`) is installed.
fn service_installed(service: &str) -> bool {
    LIBEXEC_DIRS
        .iter()
        .any(|d| Path::new(d).join(service).is_file())
}

/// True when Dovecot with IMAP is installed; otherwise panics, or prints
/// "skipped" and returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn dovecot_available() -> bool {
    (bins().is_some() && service_installed("imap-login") && service_installed("imap"))
        || !super::server_missing("dovecot-imapd")
}

/// True when Dovecot's POP3 server is installed too (see [`dovecot_available`]
/// for what happens otherwise); [`Dovecot::pop3_port`] is then `Some`.
pub fn dovecot_pop3_available() -> bool {
    (service_installed("pop3-login") && service_installed("pop3"))
        || !super::server_missing("dovecot-pop3d")
}

/// The loopback ports of one instance.
#[derive(Clone, Copy, Debug)]
struct Ports {
    imap: u16,
    imaps: u16,
    pop3: Option<u16>,
}

// === impl Dovecot ===

/// A running Dovecot child process; stopped and reaped on drop.
pub struct Dovecot {
    child: ChildGuard,
    dir: PathBuf,
    conf: PathBuf,
    ports: Ports,
    token: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Dovecot {
    /// Starts Dovecot under `dir` serving `cert` (leaf, optionally followed by
    /// the chain) and `key` on imaps, imap (STARTTLS) and, when installed, pop3
    /// (STLS), and waits until it greets.
    pub fn start(dir: &Path, cert: &Path, key: &Path) -> Dovecot {
        let bins = bins().expect("dovecot is not installed (check dovecot_available() first)");
        let dir = absolute(dir);
        let (cert, key) = (absolute(cert), absolute(key));
        for sub in ["", "state", "home"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).expect("create dovecot dir");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                .expect("chmod dovecot dir");
        }
        let pop3 = service_installed("pop3-login") && service_installed("pop3");
        let mut last_error = String::new();
        for attempt in 0..PORT_ATTEMPTS {
            let ports = free_ports(if pop3 { 3 } else { 2 });
            let ports = Ports {
                imap: ports[0],
                imaps: ports[1],
                pop3: ports.get(2).copied(),
            };
            let token = unique_token();
            let conf = dir.join("dovecot.conf");
            let run = dir.join(format!("run{attempt}"));
            std::fs::write(&conf, render_conf(&dir, &run, &token, ports, &cert, &key))
                .expect("write dovecot.conf");
            match start_once(&bins.dovecot, &dir, &conf, ports, &token) {
                Ok(child) => {
                    return Dovecot {
                        child,
                        dir,
                        conf,
                        ports,
                        token,
                        cert,
                        key,
                    };
                }
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("dovecot: no free ports after {PORT_ATTEMPTS} attempts; last log:\n{last_error}");
    }

    /// The imaps port (TLS from the first byte).
    pub fn imaps_port(&self) -> u16 {
        self.ports.imaps
    }

    /// The imap port (plaintext, `STARTTLS`).
    pub fn imap_port(&self) -> u16 {
        self.ports.imap
    }

    /// The pop3 port (plaintext, `STLS`), when dovecot-pop3d is installed.
    pub fn pop3_port(&self) -> Option<u16> {
        self.ports.pop3
    }

    /// The port a client speaking `proto` connects to (imaps for TLS, imap, pop3).
    pub fn port_for(&self, proto: MailProtocol) -> u16 {
        match proto {
            MailProtocol::Tls => self.ports.imaps,
            MailProtocol::Imap => self.ports.imap,
            MailProtocol::Pop3 => self.ports.pop3.expect("dovecot-pop3d is not installed"),
            MailProtocol::Smtp => panic!("dovecot does not speak SMTP"),
        }
    }

    /// `127.0.0.1:PORT` of [`Self::port_for`], as a `[target.verify] endpoint`.
    pub fn endpoint(&self, proto: MailProtocol) -> String {
        format!("127.0.0.1:{}", self.port_for(proto))
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/dovecot.conf`.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// `ssl_cert`.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// `ssl_key`.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// PID of the Dovecot master (our child, its process group leader).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The text in this instance's greetings (unique per instance).
    pub fn greeting_token(&self) -> &str {
        &self.token
    }

    /// `[doveconf, -c, CONF, -n]`: a target's `validate` argv (parses the
    /// config and reads the `<FILE` includes, i.e. the certificate and key).
    pub fn validate_argv(&self) -> Vec<String> {
        vec![
            bin_str(&bins().expect("dovecot installed").doveconf),
            "-c".into(),
            self.conf.to_string_lossy().into_owned(),
            "-n".into(),
        ]
    }

    /// `[doveadm, -c, CONF, reload]`: a target's `reload` argv.
    pub fn reload_argv(&self) -> Vec<String> {
        vec![
            bin_str(&bins().expect("dovecot installed").doveadm),
            "-c".into(),
            self.conf.to_string_lossy().into_owned(),
            "reload".into(),
        ]
    }

    /// Runs [`Self::reload_argv`] and asserts exit 0. The master reloads
    /// asynchronously: wait for the new leaf with
    /// [`super::mailtls::wait_until_served`].
    pub fn reload(&self) {
        let argv = self.reload_argv();
        let out = run_bounded(Command::new(&argv[0]).args(&argv[1..]), COMMAND_TIMEOUT);
        assert_eq!(
            out.code,
            0,
            "doveadm reload failed: {}{}\nlog:\n{}",
            out.stdout,
            out.stderr,
            self.log()
        );
    }

    /// Dovecot's log (`log_path = /dev/stderr`).
    pub fn log(&self) -> String {
        tail(&read_lossy(&log_path(&self.dir)), 200)
    }
}

enum StartError {
    /// Another process bound a port first; carries the log.
    PortTaken(String),
    /// Anything else: a ready-to-panic message.
    Failed(String),
}

fn start_once(
    bin: &Path,
    dir: &Path,
    conf: &Path,
    ports: Ports,
    token: &str,
) -> Result<ChildGuard, StartError> {
    let log = log_path(dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open dovecot.log");
    let log_offset = file.metadata().expect("stat dovecot.log").len();
    let mut cmd = Command::new(bin);
    cmd.arg("-F")
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup dovecot.log"))
        .stderr(file);
    let mut child =
        ChildGuard::spawn("dovecot", &mut cmd, Signal::SIGTERM, STOP_GRACE).dump_log_on_panic(&log);
    let this_attempt = || {
        let all = std::fs::read(&log).unwrap_or_default();
        let start = usize::try_from(log_offset).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    };
    let mut plaintext = vec![(ports.imap, MailProtocol::Imap)];
    plaintext.extend(ports.pop3.map(|p| (p, MailProtocol::Pop3)));
    let imaps = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.imaps));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait() {
            let text = this_attempt();
            if text.contains("Address already in use") {
                return Err(StartError::PortTaken(tail(&text, 50)));
            }
            return Err(StartError::Failed(format!(
                "dovecot exited during startup ({status}); config {}:\n{}\nlog:\n{}",
                conf.display(),
                read_lossy(conf),
                tail(&text, 100)
            )));
        }
        let greetings: Vec<_> = plaintext
            .iter()
            .map(|(port, proto)| greeting(*port, *proto))
            .collect();
        if greetings.iter().all(|g| g.is_ok()) {
            if greetings
                .iter()
                .all(|g| g.as_deref().is_ok_and(|t| t.contains(token)))
                && TcpStream::connect_timeout(&imaps, Duration::from_millis(200)).is_ok()
            {
                return Ok(child);
            }
            // Another server answered on one of our ports: ours cannot have bound it.
            drop(child);
            return Err(StartError::PortTaken(format!(
                "ports {ports:?} answered {greetings:?}, want greetings with {token:?}"
            )));
        }
        if Instant::now() >= deadline {
            return Err(StartError::Failed(format!(
                "dovecot did not greet on {ports:?} within {START_TIMEOUT:?} ({greetings:?}); \
                 log:\n{}",
                tail(&this_attempt(), 100)
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn render_conf(
    dir: &Path,
    run: &Path,
    token: &str,
    ports: Ports,
    cert: &Path,
    key: &Path,
) -> String {
    let root = nix::unistd::geteuid().is_root();
    // Non-root: every service as the current user, no chroot.
    let (users, userdb, no_chroot) = if root {
        (String::new(), "uid=nobody gid=nogroup".to_owned(), "")
    } else {
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .expect("getpwuid")
            .expect("the current user has a passwd entry");
        let group = nix::unistd::Group::from_gid(user.gid)
            .expect("getgrgid")
            .map_or_else(|| user.gid.to_string(), |g| g.name);
        (
            format!(
                "default_login_user = {u}\n\
                 default_internal_user = {u}\n\
                 default_internal_group = {group}\n",
                u = user.name
            ),
            format!("uid={} gid={}", user.uid, user.gid),
            "  chroot =\n",
        )
    };
    let (protocols, pop3) = match ports.pop3 {
        Some(port) => (
            "imap pop3",
            format!(
                "service pop3-login {{\n\
                 {no_chroot}\
                 \x20 inet_listener pop3 {{\n\
                 \x20   port = {port}\n\
                 \x20 }}\n\
                 \x20 inet_listener pop3s {{\n\
                 \x20   port = 0\n\
                 \x20 }}\n\
                 }}\n"
            ),
        ),
        None => ("imap", String::new()),
    };
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/dovecot.rs)\n\
         instance_name = certctl-test-{token}\n\
         base_dir = {base_dir}\n\
         state_dir = {state_dir}\n\
         log_path = /dev/stderr\n\
         {users}\
         protocols = {protocols}\n\
         listen = 127.0.0.1\n\
         ssl = required\n\
         ssl_cert = <{cert}\n\
         ssl_key = <{key}\n\
         login_greeting = certctl-test {token} ready\n\
         auth_mechanisms = plain\n\
         passdb {{\n\
         \x20 driver = static\n\
         \x20 args = password=certctl-test\n\
         }}\n\
         userdb {{\n\
         \x20 driver = static\n\
         \x20 args = {userdb} home={home}\n\
         }}\n\
         service anvil {{\n\
         {no_chroot}\
         }}\n\
         service imap-login {{\n\
         {no_chroot}\
         \x20 inet_listener imap {{\n\
         \x20   port = {imap}\n\
         \x20 }}\n\
         \x20 inet_listener imaps {{\n\
         \x20   port = {imaps}\n\
         \x20   ssl = yes\n\
         \x20 }}\n\
         }}\n\
         {pop3}",
        base_dir = value(run),
        state_dir = value(&dir.join("state")),
        home = value(&dir.join("home")),
        cert = value(cert),
        key = value(key),
        imap = ports.imap,
        imaps = ports.imaps,
    )
}

/// `n` distinct loopback ports that were free a moment ago (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn unique_token() -> String {
    super::unique_token("dc")
}

/// `<dir>/dovecot.log`: the master's stdout and stderr (where `log_path` points).
fn log_path(dir: &Path) -> PathBuf {
    dir.join("dovecot.log")
}

/// A path as a dovecot.conf value (unquoted, so no spaces or specials).
fn value(path: &Path) -> String {
    super::unquoted_value(path, "dovecot.conf")
}

fn bin_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
