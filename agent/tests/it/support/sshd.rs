//! A real OpenSSH server (Debian's `openssh-server`) on a free 127.0.0.1
//! port, for the SSH transport (`certctl_agent::remote`).
//!
//! [`Sshd::start`] makes a temp dir with a fresh ed25519 host key and a
//! client key (`ssh-keygen`), an `authorized_keys` holding the client key,
//! a `known_hosts` pinning the host key for `[127.0.0.1]:PORT`, and an
//! `sshd_config`; then runs `sshd -D -e -f <dir>/sshd_config` in the
//! foreground inside a [`ChildGuard`] (SIGTERM, then SIGKILL to its group,
//! on drop and on panic), logging to `<dir>/sshd.log`. The SFTP subsystem
//! is the external `/usr/lib/openssh/sftp-server`, what real hosts run
//! (Debian's default), rather than `internal-sftp`.
//!
//! **The account.** Tests log in as an unprivileged account that has a
//! POSIX login shell (commands must run): as root, `certctl-ssh-test`,
//! which `scripts/test.sh` creates (`useradd --system --create-home
//! --shell /bin/sh`, password field `*`: sshd refuses a locked `!`
//! account when PAM is off); when it is missing the test fails naming the
//! fix. As any other user, sshd can only log that user in, so that user is
//! the account.
//!
//! **StrictModes no.** sshd would check every directory up to `/` above
//! `authorized_keys`, and the temp dir lives under the world-writable
//! `/tmp`; the test config turns the check off instead of placing the key
//! in the account's home. The temp dir is 0755 and `authorized_keys` 0644
//! (public keys) because sshd reads it as the account.
//!
//! **Missing sshd.** Fails with the package to install, or skips under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1` ([`sshd_available`]).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use certctl_agent::remote::Endpoint;
use nix::sys::signal::Signal;
use nix::unistd::{Uid, User};
use tempfile::TempDir;

use super::process::{ChildGuard, read_lossy, run_bounded, tail};

/// The account the tests log in as when they run as root.
pub const ACCOUNT: &str = "certctl-ssh-test";
const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const START_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

/// True when sshd and ssh are installed; otherwise panics, or prints
/// "skipped" and returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn sshd_available() -> bool {
    if !Path::new(SSHD).exists() || !Path::new(SFTP_SERVER).exists() {
        return !super::server_missing("openssh-server");
    }
    if super::find_program("ssh", &["/usr/bin/ssh"]).is_none() {
        return !super::server_missing("openssh-client");
    }
    true
}

/// The account to log in as: `certctl-ssh-test` as root, else oneself.
fn account() -> User {
    if Uid::effective().is_root() {
        match User::from_name(ACCOUNT).expect("look up the ssh test account") {
            Some(u) => u,
            None => panic!(
                "the ssh transport tests log in as the unprivileged account {ACCOUNT}, which is missing: \
                 run scripts/test.sh as root once, or create it: useradd --system --create-home \
                 --home-dir /var/lib/{ACCOUNT} --shell /bin/sh {ACCOUNT} && usermod -p '*' {ACCOUNT}"
            ),
        }
    } else {
        User::from_uid(Uid::effective())
            .expect("look up own account")
            .expect("own account exists")
    }
}

fn keygen(path: &Path, comment: &str) {
    let out = run_bounded(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        Duration::from_secs(20),
    );
    assert_eq!(out.code, 0, "ssh-keygen: {}", out.stderr);
}

/// `SHA256:...` of a public key file.
pub fn fingerprint(pub_key: &Path) -> String {
    let out = run_bounded(
        Command::new("ssh-keygen").arg("-lf").arg(pub_key),
        Duration::from_secs(20),
    );
    assert_eq!(out.code, 0, "ssh-keygen -l: {}", out.stderr);
    out.stdout
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .expect("fingerprint in ssh-keygen -l")
        .to_owned()
}

fn pub_line(pub_key: &Path) -> String {
    let text = std::fs::read_to_string(pub_key).expect("read public key");
    let mut parts = text.split_whitespace();
    format!(
        "{} {}",
        parts.next().expect("key type"),
        parts.next().expect("key")
    )
}

/// A running sshd and its keys; stopped and reaped on drop.
pub struct Sshd {
    child: ChildGuard,
    dir: TempDir,
    port: u16,
    user: User,
}

impl Sshd {
    /// Starts sshd on a free loopback port (see the module doc).
    pub fn start() -> Sshd {
        let user = account();
        let mut dir = tempfile::Builder::new()
            .prefix("certctl-ssh-")
            .tempdir()
            .expect("create temp dir");
        if std::env::var_os("CERTCTL_TEST_KEEP_TMP").is_some() {
            dir.disable_cleanup(true);
        }
        let d = dir.path().to_owned();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        keygen(&d.join("host_ed25519"), "certctl-test-host");
        keygen(&d.join("client_ed25519"), "certctl-test-client");
        keygen(&d.join("other_ed25519"), "certctl-test-other");
        std::fs::write(
            d.join("authorized_keys"),
            format!("{}\n", pub_line(&d.join("client_ed25519.pub"))),
        )
        .expect("write authorized_keys");
        std::fs::set_permissions(
            d.join("authorized_keys"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod authorized_keys");
        let home = d.join("home");
        std::fs::create_dir(&home).expect("create account dir");
        nix::unistd::chown(&home, Some(user.uid), Some(user.gid)).expect("chown account dir");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir(d.join("ctl")).expect("create control dir");
        if Uid::effective().is_root() {
            // sshd's privilege separation directory (made by the package's
            // service, which the tests do not start).
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        }
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = super::free_port();
            std::fs::write(d.join("sshd_config"), render_config(&d, port, &user.name))
                .expect("write sshd_config");
            match start_once(&d, port) {
                Ok(child) => {
                    let s = Sshd {
                        child,
                        dir,
                        port,
                        user,
                    };
                    std::fs::write(s.known_hosts(), s.known_hosts_line("host_ed25519.pub"))
                        .expect("write known_hosts");
                    std::fs::write(
                        s.wrong_known_hosts(),
                        s.known_hosts_line("other_ed25519.pub"),
                    )
                    .expect("write wrong known_hosts");
                    std::fs::write(s.path().join("empty_known_hosts"), "")
                        .expect("write empty known_hosts");
                    return s;
                }
                Err(log) => last = log,
            }
        }
        panic!("sshd: did not start after {PORT_ATTEMPTS} attempts; last log:\n{last}");
    }

    fn known_hosts_line(&self, key: &str) -> String {
        format!(
            "[127.0.0.1]:{} {}\n",
            self.port,
            pub_line(&self.path().join(key))
        )
    }

    /// The temp dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The account's name.
    pub fn user(&self) -> &str {
        &self.user.name
    }

    pub fn uid(&self) -> u32 {
        self.user.uid.as_raw()
    }

    pub fn gid(&self) -> u32 {
        self.user.gid.as_raw()
    }

    /// sshd's PID (the listener; sessions are its children).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A known_hosts pinning the real host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.path().join("known_hosts")
    }

    /// A known_hosts with another key for the same `[127.0.0.1]:PORT`.
    pub fn wrong_known_hosts(&self) -> PathBuf {
        self.path().join("wrong_known_hosts")
    }

    /// A known_hosts that knows no host.
    pub fn empty_known_hosts(&self) -> PathBuf {
        self.path().join("empty_known_hosts")
    }

    /// `SHA256:...` of the real host key.
    pub fn host_fingerprint(&self) -> String {
        fingerprint(&self.path().join("host_ed25519.pub"))
    }

    /// A dir owned by the account, where remote files may be written.
    pub fn account_dir(&self) -> PathBuf {
        self.path().join("home")
    }

    /// A short control dir for the sessions of a test.
    pub fn control_dir(&self) -> PathBuf {
        self.path().join("ctl")
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.path().join("sshd.log"))
    }

    /// The endpoint for the account, with the client key and the right
    /// known_hosts.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port: self.port,
            user: self.user.name.clone(),
            identity_file: self.path().join("client_ed25519"),
            known_hosts: self.known_hosts(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// PIDs of processes descending from sshd whose command is `program`
    /// (e.g. the `sftp-server` of a session).
    pub fn descendants_named(&self, program: &str) -> Vec<u32> {
        let mut parents = vec![self.pid()];
        let mut found = Vec::new();
        let mut all: Vec<(u32, u32, String)> = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = read_lossy(&entry.path().join("stat"));
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                continue;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0);
            let cmd = read_lossy(&entry.path().join("cmdline"));
            all.push((pid, ppid, cmd.split('\0').next().unwrap_or("").to_owned()));
        }
        while let Some(p) = parents.pop() {
            for (pid, ppid, cmd) in &all {
                if *ppid == p {
                    parents.push(*pid);
                    if cmd == program {
                        found.push(*pid);
                    }
                }
            }
        }
        found
    }
}

fn render_config(dir: &Path, port: u16, user: &str) -> String {
    let d = super::unquoted_value(dir, "sshd_config");
    format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {d}/host_ed25519\n\
         PidFile none\n\
         UsePAM no\n\
         StrictModes no\n\
         AuthorizedKeysFile {d}/authorized_keys\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin no\n\
         AllowUsers {user}\n\
         MaxStartups 50\n\
         MaxSessions 50\n\
         LogLevel VERBOSE\n\
         Subsystem sftp {SFTP_SERVER}\n"
    )
}

/// Runs sshd once on `port`: the guard once it answers with its banner,
/// else its log (port taken, bad config).
fn start_once(dir: &Path, port: u16) -> Result<ChildGuard, String> {
    let log_path = dir.join("sshd.log");
    let log = std::fs::File::create(&log_path).expect("create sshd.log");
    let mut cmd = Command::new(SSHD);
    cmd.args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log);
    let mut child = ChildGuard::spawn("sshd", &mut cmd, Signal::SIGTERM, Duration::from_secs(5))
        .dump_log_on_panic(&log_path);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if child.try_wait().is_some() {
            return Err(tail(&read_lossy(&log_path), 50));
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut banner = [0u8; 8];
            if s.read_exact(&mut banner).is_ok() && banner.starts_with(b"SSH-2.0") {
                return Ok(child);
            }
        }
        assert!(
            Instant::now() < deadline,
            "sshd did not answer within {START_TIMEOUT:?}; log:\n{}",
            tail(&read_lossy(&log_path), 50)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
