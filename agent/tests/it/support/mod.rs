//! Test support: a temp agent environment, the real binaries, a throw-away PKI,
//! the real servers of each kind and TLS probes.
//!
//! - [`TestEnv`]: a temp dir with `agent.toml` (per CONTRACT.md), `run/agent.sock`,
//!   `state/`, `drop/` and `targets/`; [`TestEnv::spawn_agent`] runs the real
//!   `certctl-agent`, [`TestEnv::ctl`] the real `certctl`.
//! - [`pki`]: `Ca::root()`, `.intermediate()`, `.leaf(&[names]).issue()`, [`pki::issue_cert`].
//! - [`nginx`]: `Nginx::start(prefix, server_name, cert, key)`, [`nginx::nginx_available`].
//! - One module per other real server, each with `*_available()` and a
//!   `start` that runs it in the foreground on free loopback ports:
//!   [`apache`], [`haproxy`] (master CLI and runtime API sockets), [`caddy`]
//!   (file or admin-API mode), [`postfix`], [`dovecot`] ([`mailtls`] probes
//!   them through STARTTLS).
//! - [`kinds`]: what every kind test does: `deploy`, `assert_verified`,
//!   `assert_validate_failed`, `verify_table`.
//! - [`java`]: the JDK for the `keystore` kind: `keytool -list`, and a Java
//!   TLS server serving from a keystore.
//! - [`readers`]: threads that read a target as a watching server does
//!   (cert and key through the stable names, a configuration file) while a
//!   test deploys, and count what they saw.
//! - [`tls`]: `served_leaf_sha256(port, sni)`, `served_chain`, `wait_until_served`.
//! - [`drop`]: hand files over through the drop directory, wait for the agent,
//!   read its drop events, reason files and memory peak.
//! - [`process`]: [`process::ChildGuard`], which every spawned process lives in:
//!   it is stopped by PID and reaped on drop, also when the test panics.
//! - [`strace`]: the agent under `strace -f`, and a parser for the trace.
//! - [`notify`]: [`notify::NotifySocket`], a stand-in for systemd's
//!   `NOTIFY_SOCKET` that records `READY=1`, `STATUS=`, `WATCHDOG=1`, ...
//! - [`acme`]: [`acme::Pebble`], the ACME test server on loopback ports, for
//!   the recipes of `examples/acme/`.
//! - [`sshd`]: [`sshd::Sshd`], a real OpenSSH server on a loopback port with
//!   its own host key, a client key and an unprivileged account, for the
//!   SSH transport.
//! - [`nspawn`]: a Debian root booted with `systemd-nspawn` (cached
//!   `debootstrap`), and a command channel into it (`nsenter`); several
//!   side by side on the host's network with [`nspawn::BootOptions`].
//! - `ansible_json.py`: the `ansible-playbook` stdout callback whose one
//!   JSON document the fleet test reads (plays, tasks, results, stats).
//!
//! Every wait is bounded; a failure panics with the log of the process involved.
//! Set `CERTCTL_TEST_KEEP_TMP=1` to keep the temp dirs for inspection.

pub mod acme;
pub mod apache;
pub mod assert;
pub mod caddy;
pub mod dovecot;
pub mod drop;
pub mod endpoints;
pub mod haproxy;
pub mod invariants;
pub mod java;
pub mod kinds;
pub mod mailtls;
pub mod nginx;
pub mod notify;
pub mod nspawn;
pub mod pki;
pub mod postfix;
pub mod process;
pub mod readers;
pub mod sshd;
pub mod strace;
pub mod tls;

use std::fmt;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

pub use process::ChildGuard;

/// How long the agent may take to accept connections on its socket.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to exit after SIGTERM before it is killed.
pub const AGENT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Upper bound for one `certctl` invocation.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Env var that turns a missing server package from a failure into a printed skip.
pub const ALLOW_MISSING_SERVERS: &str = "CERTCTL_TEST_ALLOW_MISSING_SERVERS";

/// A loopback port that was free a moment ago (bind :0, read it, release
/// it): for a server to start on, or as a port nothing listens on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `path` made absolute (test dirs are absolute already; relative fixtures are not).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).expect("absolute path")
}

/// A path as an unquoted value in a server's config file (`what` names the
/// file in the panic): temp dirs never need quoting, so anything else is a
/// test bug.
pub fn unquoted_value(path: &Path, what: &str) -> String {
    let s = path.to_string_lossy().into_owned();
    assert!(
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c)),
        "path not safe for {what}: {s}"
    );
    s
}

/// `<prefix><test pid>-<n>`: distinct across instances and test processes.
pub fn unique_token(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Handles a missing server binary: panics, or prints a skip line and returns true when `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn server_missing(program: &str) -> bool {
    let test = thread::current().name().unwrap_or("<unnamed>").to_owned();
    if std::env::var(ALLOW_MISSING_SERVERS).as_deref() == Ok("1") {
        // Straight to the process's stderr: libtest captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {program} is not installed ({ALLOW_MISSING_SERVERS}=1)"
        );
        true
    } else {
        panic!(
            "{test}: {program} is not installed. Install it (apt-get install --no-install-recommends \
             {program}) or set {ALLOW_MISSING_SERVERS}=1 to skip the tests that need it"
        );
    }
}

/// `program` found in `$PATH`, else the first existing `fallbacks` entry.
pub fn find_program(program: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// TOML string literal for `s` (quoted and escaped).
pub fn toml_str(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_owned()).to_string()
}

/// TOML array of strings, e.g. an argv.
pub fn toml_array<S: AsRef<str>>(items: &[S]) -> String {
    let items = items.iter().map(toml_str).collect::<Vec<_>>();
    format!("[{}]", items.join(", "))
}

/// TOML string literal for a path.
pub fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("utf-8 path"))
}

// === impl TestEnv ===

/// A temp directory laid out for one agent: config, socket dir, state, drop and targets.
pub struct TestEnv {
    dir: TempDir,
    agent_extra: Vec<(String, String)>,
    deploy_groups: Vec<String>,
    read_groups: Vec<String>,
    targets: Vec<(String, String)>,
    /// `certctl` linked or copied into `<root>/bin` for [`Self::ctl_as`].
    shared_ctl: OnceLock<PathBuf>,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// Creates the temp layout (nothing is started; no config is written yet).
    pub fn new() -> TestEnv {
        let mut dir = tempfile::Builder::new()
            .prefix("certctl-it-")
            .tempdir()
            .expect("create temp dir");
        if std::env::var_os("CERTCTL_TEST_KEEP_TMP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("support: keeping {}", dir.path().display());
        }
        // 0755 on the root and run/ so that `ctl_as` users can reach the socket;
        // state/ and drop/ stay private to the agent's user.
        for (sub, mode) in [
            ("", 0o755),
            ("run", 0o755),
            ("state", 0o700),
            ("drop", 0o700),
            ("targets", 0o755),
        ] {
            let p = dir.path().join(sub);
            std::fs::create_dir_all(&p).expect("create env dir");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .expect("chmod env dir");
        }
        TestEnv {
            dir,
            agent_extra: Vec::new(),
            deploy_groups: Vec::new(),
            read_groups: Vec::new(),
            targets: Vec::new(),
            shared_ctl: OnceLock::new(),
        }
    }

    /// The temp root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `<root>/agent.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("agent.toml")
    }

    /// `<root>/run/agent.sock`.
    pub fn socket(&self) -> PathBuf {
        self.path().join("run/agent.sock")
    }

    /// `<root>/state` (`[agent] state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// `<root>/drop` (`[agent] drop_dir`).
    pub fn drop_dir(&self) -> PathBuf {
        self.path().join("drop")
    }

    /// `<root>/targets/<name>`, created: where a test puts a target's live files.
    pub fn target_dir(&self, name: &str) -> PathBuf {
        let dir = self.path().join("targets").join(name);
        std::fs::create_dir_all(&dir).expect("create target dir");
        dir
    }

    /// `<root>/agent.log`: the agent's stdout and stderr.
    pub fn agent_log_path(&self) -> PathBuf {
        self.path().join("agent.log")
    }

    /// Sets an extra `[agent]` key; `value` is TOML (e.g. `agent_option("settle", r#""200ms""#)`).
    pub fn agent_option(&mut self, key: &str, value: &str) -> &mut Self {
        self.agent_extra.retain(|(k, _)| k != key);
        self.agent_extra.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `[agent] deploy_groups` (default empty).
    pub fn deploy_groups(&mut self, groups: &[&str]) -> &mut Self {
        self.deploy_groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }

    /// Sets `[agent] read_groups` (default empty).
    pub fn read_groups(&mut self, groups: &[&str]) -> &mut Self {
        self.read_groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }

    /// Adds a `[[target]]` with `name` and the TOML `body` (keys and `[target.verify]` sub-table).
    pub fn target(&mut self, name: &str, body: &str) -> &mut Self {
        self.targets.push((name.to_owned(), body.to_owned()));
        self
    }

    /// Replaces the TOML body of the target called `name` (a configuration
    /// change, applied by the next [`Self::write_config`]: a SIGHUP or a
    /// restart).
    pub fn replace_target(&mut self, name: &str, body: &str) -> &mut Self {
        let (_, old) = self
            .targets
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no target {name} to replace"));
        body.clone_into(old);
        self
    }

    /// Appends TOML (e.g. a `[target.verify]` table) to the body of the
    /// target called `name`.
    pub fn append_to_target(&mut self, name: &str, toml: &str) -> &mut Self {
        let (_, body) = self
            .targets
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no target {name} to append to"));
        body.push('\n');
        body.push_str(toml);
        self
    }

    /// Writes every input form of `leaf` under `<root>/input` as `<stem>.*`.
    pub fn inputs(&self, leaf: &pki::Leaf, stem: &str) -> pki::LeafFiles {
        leaf.write_files(&self.path().join("input"), stem)
    }

    /// Adds a `kind = "file"` target whose `cert.pem`/`key.pem` live in a fresh
    /// [`Self::target_dir`], plus `extra` TOML keys; returns that directory.
    pub fn file_target(&mut self, name: &str, extra: &str) -> PathBuf {
        let dir = self.target_dir(name);
        std::fs::create_dir_all(&dir).expect("create target dir");
        let body = format!(
            "kind = \"file\"\ncert_path = {}\nkey_path = {}\n{extra}",
            toml_path(&dir.join("cert.pem")),
            toml_path(&dir.join("key.pem"))
        );
        self.target(name, &body);
        dir
    }

    /// Adds a `kind = "nginx"` target on `nginx`'s vhost `server_name`: its
    /// files (no `chain_path`: the cert file gets leaf + chain), nginx's
    /// validate argv, and `reload` or nginx's own reload argv.
    pub fn nginx_target(
        &mut self,
        name: &str,
        nginx: &nginx::Nginx,
        server_name: &str,
        reload: Option<&[String]>,
    ) -> &mut Self {
        let vhost = nginx
            .vhosts()
            .iter()
            .find(|v| v.server_name == server_name)
            .unwrap_or_else(|| panic!("nginx has no vhost {server_name}"));
        let reload = reload.map_or_else(|| nginx.reload_argv(), <[String]>::to_vec);
        let body = format!(
            "kind = \"nginx\"\n\
             cert_path = {cert}\n\
             key_path = {key}\n\
             validate = {validate}\n\
             reload = {reload}\n\
             command_timeout = \"30s\"\n",
            cert = toml_path(&vhost.cert),
            key = toml_path(&vhost.key),
            validate = toml_array(&nginx.validate_argv()),
            reload = toml_array(&reload),
        );
        self.target(name, &body)
    }

    /// The config text [`Self::write_config`] writes.
    pub fn config_text(&self) -> String {
        let mut s = format!(
            "# written by agent/tests/it/support/mod.rs\n\
             [agent]\n\
             socket = {}\n\
             state_dir = {}\n\
             drop_dir = {}\n\
             deploy_groups = {}\n\
             read_groups = {}\n",
            toml_path(&self.socket()),
            toml_path(&self.state_dir()),
            toml_path(&self.drop_dir()),
            toml_array(&self.deploy_groups),
            toml_array(&self.read_groups),
        );
        for (k, v) in &self.agent_extra {
            s.push_str(&format!("{k} = {v}\n"));
        }
        for (name, body) in &self.targets {
            s.push_str(&format!(
                "\n[[target]]\nname = {}\n{}\n",
                toml_str(name),
                body.trim()
            ));
            s.push('\n');
        }
        s
    }

    /// Writes `agent.toml` (panics if the result is not TOML, which is a test bug) and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let text = self.config_text();
        if let Err(e) = text.parse::<toml::Table>() {
            panic!("test wrote invalid TOML: {e}\n{text}");
        }
        let path = self.config_path();
        std::fs::write(&path, &text).expect("write agent.toml");
        path
    }

    /// Writes the config, starts `certctl-agent --config agent.toml`
    /// (RUST_LOG=debug) and waits until its socket accepts and it has
    /// swept what earlier runs left over ([`AgentProc::wait_swept`]).
    pub fn spawn_agent(&self) -> AgentProc {
        let mut agent =
            AgentProc::spawn(self.agent_command(), &self.socket(), &self.agent_log_path());
        agent.wait_swept();
        agent
    }

    /// Writes the config and returns `certctl-agent --config agent.toml`
    /// (RUST_LOG=debug) unstarted, for tests that add to its environment.
    pub fn agent_command(&self) -> Command {
        let config = self.write_config();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .env_remove("CERTCTL_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS")
            .env_remove("JOURNAL_STREAM");
        cmd
    }

    /// [`Self::spawn_agent`] with extra environment (e.g. a crash point).
    pub fn spawn_agent_env(&self, env: &[(&str, &str)]) -> AgentProc {
        let config = self.write_config();
        let mut cmd = Command::new(agent_bin());
        cmd.arg("--config").arg(&config).env("RUST_LOG", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut agent = AgentProc::spawn(cmd, &self.socket(), &self.agent_log_path());
        agent.wait_swept();
        agent
    }

    /// Runs `certctl --socket <sock> ARGS` (bounded) and captures its output.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        run_ctl(self.ctl_command(certctl_bin(), args))
    }

    /// Like [`Self::ctl`] as `uid`:`gid` with no supplementary groups; None (and a printed skip) when not root.
    pub fn ctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Option<CtlOutput> {
        if !nix::unistd::geteuid().is_root() {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED part of {}: running certctl as uid {uid} needs root",
                thread::current().name().unwrap_or("<unnamed>")
            );
            return None;
        }
        // The target dir may sit below a directory other users cannot enter
        // (e.g. /root), so they run a link or copy inside the 0755 temp root.
        let bin = self.shared_ctl.get_or_init(|| {
            let dir = self.path().join("bin");
            std::fs::create_dir_all(&dir).expect("create bin dir");
            let dst = dir.join("certctl");
            if std::fs::hard_link(certctl_bin(), &dst).is_err() {
                std::fs::copy(certctl_bin(), &dst).expect("copy certctl");
            }
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
                .expect("chmod certctl");
            dst
        });
        let mut cmd = self.ctl_command(bin, args);
        // std drops supplementary groups (setgroups(0)) when uid is set from root.
        cmd.uid(uid).gid(gid);
        Some(run_ctl(cmd))
    }

    /// Starts `certctl --socket <sock> ARGS` without waiting (e.g. `watch`); stdout goes to the returned path.
    pub fn ctl_spawn(&self, args: &[&str], stdout_file: &str) -> (ChildGuard, PathBuf) {
        let out = self.path().join(stdout_file);
        let file = std::fs::File::create(&out).expect("create ctl output file");
        let mut cmd = self.ctl_command(certctl_bin(), args);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        let guard = ChildGuard::spawn("certctl", &mut cmd, Signal::SIGINT, Duration::from_secs(5))
            .dump_log_on_panic(&out);
        (guard, out)
    }

    fn ctl_command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env_remove("CERTCTL_SOCKET")
            .arg("--socket")
            .arg(self.socket())
            .args(args);
        cmd
    }
}

// === impl AgentProc ===

/// A running `certctl-agent`; SIGTERM, bounded wait, SIGKILL and reap on drop.
pub struct AgentProc {
    child: ChildGuard,
    log: PathBuf,
    /// Where this process's output starts in `log`.
    log_offset: u64,
}

impl AgentProc {
    /// Spawns `cmd` (output to `log`) and waits until `socket` accepts; panics with the log if it exits or times out.
    pub fn spawn(cmd: Command, socket: &Path, log: &Path) -> AgentProc {
        let mut agent = Self::start(cmd, log);
        agent.wait_accepting(socket);
        agent
    }

    /// Spawns `cmd` (output to `log`) without waiting for anything.
    pub fn start(mut cmd: Command, log: &Path) -> AgentProc {
        // Appended, so a restarted agent in the same env keeps its predecessor's
        // log in the file; `log()` returns only this process's part.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open agent log");
        let _ = writeln!(file, "===== support: spawning {cmd:?} =====");
        let log_offset = file.metadata().expect("stat agent log").len();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup agent log"))
            .stderr(file);
        let child = ChildGuard::spawn("certctl-agent", &mut cmd, Signal::SIGTERM, AGENT_STOP_GRACE)
            .dump_log_on_panic(log);
        AgentProc {
            child,
            log: log.to_owned(),
            log_offset,
        }
    }

    /// Waits until `socket` accepts; panics with the log if the agent exits or it times out.
    pub fn wait_accepting(&mut self, socket: &Path) {
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait() {
                panic!(
                    "agent exited during startup ({status}); log {}:\n{}",
                    self.log.display(),
                    process::read_lossy(&self.log)
                );
            }
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                // The guard prints the log while unwinding.
                panic!(
                    "agent did not accept on {} within {AGENT_START_TIMEOUT:?}",
                    socket.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent logs `start-up sweep done`: it sweeps the
    /// leftovers of earlier runs while it serves, and tests check what is
    /// on disk right after a start. Returns early if the agent exited (the
    /// test sees that itself).
    pub fn wait_swept(&mut self) {
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        while !self.log().contains("start-up sweep done") {
            if self.child.try_wait().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not finish its start-up sweep within {AGENT_START_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything this agent process has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(self.log_offset)
            .unwrap_or(usize::MAX)
            .min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// Sends `sig` (e.g. SIGHUP to re-read the config).
    pub fn signal(&self, sig: Signal) {
        self.child.signal(sig);
    }

    /// Polls (bounded) until the log contains `needle`; panics with the log otherwise.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "agent log has no {needle:?} after {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// SIGTERM, wait up to AGENT_STOP_GRACE, then SIGKILL; returns how it ended.
    pub fn terminate(&mut self) -> ExitStatus {
        self.child.stop()
    }
}

// === impl CtlOutput ===

/// Result of one `certctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    /// Exit code (128 + signal if killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CtlOutput {
    /// Stdout parsed as one JSON document (panics with the output otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// Stdout parsed as one JSON object per non-empty line (streams).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("line is not JSON ({e}): {l}\n{self}"))
            })
            .collect()
    }

    /// Panics with the full output unless the exit code is `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected certctl exit code\n{self}");
        self
    }
}

impl fmt::Display for CtlOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run_ctl(mut cmd: Command) -> CtlOutput {
    let out = process::run_bounded(&mut cmd, CTL_TIMEOUT);
    CtlOutput {
        code: out.code,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

// === binaries ===

/// The `certctl-agent` binary cargo built for this test run.
pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_certctl-agent"))
}

/// The `certctl` binary, built once per test process next to `certctl-agent`.
///
/// `certctl` lives in another package, so cargo does not build it for
/// `cargo test -p certctl-agent`. Under cargo (`$CARGO` set) this runs
/// `cargo build -p certctl-cli --bin certctl` once with the same target dir and
/// profile: a no-op when up to date, and it never tests a stale CLI. Outside
/// cargo the sibling binary is used as is.
pub fn certctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let agent = agent_bin();
        let profile_dir = agent.parent().expect("agent bin has a parent");
        let bin = profile_dir.join("certctl");
        if let Some(cargo) = std::env::var_os("CARGO") {
            build_certctl(Path::new(&cargo), profile_dir);
        }
        assert!(
            bin.is_file(),
            "{} not found; build it with `cargo build -p certctl-cli`",
            bin.display()
        );
        bin
    })
}

/// `cargo build -p certctl-cli --bin certctl` into the target dir and profile `profile_dir` belongs to.
fn build_certctl(cargo: &Path, profile_dir: &Path) {
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile dir name");
    // <target>/<profile> or, when cross-compiling, <target>/<triple>/<profile>;
    // cargo marks the target dir root with CACHEDIR.TAG.
    let above = profile_dir.parent().expect("profile dir has a parent");
    let (target_dir, triple) = if above.join("CACHEDIR.TAG").exists() {
        (above, None)
    } else {
        let target = above.parent().expect("target dir");
        (target, above.file_name().and_then(|n| n.to_str()))
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "certctl-cli", "--bin", "certctl"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(triple) = triple {
        cmd.args(["--target", triple]);
    }
    let out = process::run_bounded(&mut cmd, Duration::from_secs(900));
    assert_eq!(
        out.code, 0,
        "building certctl failed ({cmd:?}):\n{}{}",
        out.stdout, out.stderr
    );
}
