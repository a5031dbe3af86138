//! A real nginx (Debian's package) serving TLS on a free loopback port.
//!
//! [`Nginx::start`] writes `<prefix>/conf/nginx.conf` with every path
//! (pid, logs, lock and `*_temp_path`) under the prefix, and runs
//! `nginx -p PREFIX -c conf/nginx.conf` as a child of the test with
//! `daemon off; master_process on;` so that reloads behave as in production
//! (the master re-reads the config and the certificates on `SIGHUP`, new workers
//! take over). Dropping the [`Nginx`] sends `SIGQUIT` to the master, then
//! `SIGKILL` to its process group after 5 s, and reaps it, also on panic.
//!
//! **Running as root (CI).** nginx's master reads `ssl_certificate` and
//! `ssl_certificate_key` itself, at start and on every reload, with the
//! privileges it was started with; workers get the loaded keys in memory and
//! never open the files (tried: a `0600 root` key inside a `0700` root-owned
//! temp dir is served by `nobody` workers). So the worker user does not decide
//! which key modes work, and the test config does what Debian's production
//! config does: `user www-data www-data;` when the euid is 0 (nginx's default
//! would be `nobody`). Root workers were rejected as needless and unlike
//! production. Workers touch nothing under the prefix: the logs are opened by
//! the master, the temp paths are never used by `return 200`. As a non-root
//! developer the `user` line is left out (nginx would ignore it with a
//! warning) and everything runs as you.
//!
//! **Missing nginx.** [`nginx_available`] panics unless nginx is installed, or
//! the environment sets `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`, in which case
//! it prints a "skipped" line and returns false. CI installs nginx and does not
//! set the variable, so a missing server is a red build, never a silent skip.
//!
//! Gotchas: nginx resolves relative certificate paths against `<prefix>/conf/`
//! (absolute paths are written here); `nginx -s reload` re-tests the config and
//! keeps serving the old certificate when that fails; right after a reload an
//! old worker can still answer a new connection with the old certificate
//! ([`Nginx::reload`] waits for the old workers to exit; probes of agent-driven
//! reloads use [`super::tls::wait_until_served`], which wants 3 matches in a
//! row); a bind conflict makes
//! nginx retry for ~2.5 s before exiting, after which [`Nginx::start`] tries a
//! new port (readiness waits for the pid file, which nginx writes only after
//! binding, so another process on the port is never mistaken for ours).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{ChildGuard, group_members, pid_alive, read_lossy, run_bounded, tail};

/// How long nginx may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to find a port nobody else grabs between our probe and nginx's bind.
const PORT_ATTEMPTS: usize = 5;

/// The absolute path of the nginx binary: `$PATH`, then `/usr/sbin/nginx`.
pub fn nginx_bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| super::find_program("nginx", &["/usr/sbin/nginx"]))
        .as_deref()
}

/// True when nginx is installed; otherwise panics, or prints "skipped" and returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn nginx_available() -> bool {
    nginx_bin().is_some() || !super::server_missing("nginx")
}

/// One `server {}` block: a name and the absolute paths nginx reads.
#[derive(Clone, Debug)]
pub struct Vhost {
    /// `server_name` (and the SNI that selects it).
    pub server_name: String,
    /// `ssl_certificate`: leaf followed by intermediates.
    pub cert: PathBuf,
    /// `ssl_certificate_key`.
    pub key: PathBuf,
}

/// Builder for an nginx with several vhosts; the first is the default server.
pub struct NginxBuilder {
    prefix: PathBuf,
    vhosts: Vec<Vhost>,
    workers: u32,
    listen: Listen,
    /// Run master and workers as this account (`setpriv`), for a server
    /// an unprivileged SSH account reloads.
    run_as: Option<String>,
}

/// Where nginx listens: `127.0.0.1`, `[::1]`, or both (on the same port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    V4,
    V6,
    Both,
}

impl Listen {
    fn hosts(self) -> &'static [&'static str] {
        match self {
            Listen::V4 => &["127.0.0.1"],
            Listen::V6 => &["[::1]"],
            Listen::Both => &["127.0.0.1", "[::1]"],
        }
    }
}

impl NginxBuilder {
    /// `worker_processes` (default 1).
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Runs nginx as `user` (its own groups only, through `setpriv`)
    /// instead of the test's user; the prefix must be that user's.
    pub fn run_as(mut self, user: &str) -> Self {
        self.run_as = Some(user.to_owned());
        self
    }

    /// The addresses to listen on (default `127.0.0.1` only).
    pub fn listen(mut self, listen: Listen) -> Self {
        self.listen = listen;
        self
    }

    /// Adds a `server {}` on the shared port (the first one added is `default_server`).
    pub fn vhost(mut self, server_name: &str, cert: &Path, key: &Path) -> Self {
        self.vhosts.push(Vhost {
            server_name: server_name.to_owned(),
            cert: absolute(cert),
            key: absolute(key),
        });
        self
    }

    /// Writes the config, starts nginx and waits until it listens.
    pub fn start(self) -> Nginx {
        assert!(!self.vhosts.is_empty(), "nginx needs at least one vhost");
        let bin = nginx_bin()
            .expect("nginx is not installed (check nginx_available() first)")
            .to_owned();
        let prefix = absolute(&self.prefix);
        for dir in ["conf", "logs", "temp"] {
            std::fs::create_dir_all(prefix.join(dir)).expect("create nginx prefix");
        }
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match start_once(&bin, &prefix, port, &self, self.listen) {
                Ok(child) => {
                    return Nginx {
                        child,
                        bin,
                        prefix,
                        port,
                        vhosts: self.vhosts,
                        listen: self.listen,
                    };
                }
                Err(StartError::PortTaken(log)) => last_error = log,
                Err(StartError::Failed(msg)) => panic!("{msg}"),
            }
        }
        panic!("nginx: no free port after {PORT_ATTEMPTS} attempts; last error log:\n{last_error}");
    }
}

// === impl Nginx ===

/// A running nginx child process; stopped and reaped on drop.
pub struct Nginx {
    child: ChildGuard,
    bin: PathBuf,
    prefix: PathBuf,
    port: u16,
    vhosts: Vec<Vhost>,
    listen: Listen,
}

impl Nginx {
    /// Starts nginx under `prefix` with one vhost serving `cert` (fullchain) and `key`.
    pub fn start(prefix: &Path, server_name: &str, cert: &Path, key: &Path) -> Nginx {
        Self::builder(prefix).vhost(server_name, cert, key).start()
    }

    /// A builder for several vhosts (SNI tests).
    pub fn builder(prefix: &Path) -> NginxBuilder {
        NginxBuilder {
            prefix: prefix.to_owned(),
            vhosts: Vec::new(),
            workers: 1,
            listen: Listen::V4,
            run_as: None,
        }
    }

    /// The loopback port all vhosts listen on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[target.verify] endpoint`.
    pub fn endpoint(&self) -> String {
        if self.listen == Listen::V6 {
            return self.endpoint_v6();
        }
        format!("127.0.0.1:{}", self.port)
    }

    /// `[::1]:PORT` (with [`Listen::V6`] or [`Listen::Both`]).
    pub fn endpoint_v6(&self) -> String {
        format!("[::1]:{}", self.port)
    }

    /// The `-p` prefix directory.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// `<prefix>/conf/nginx.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.prefix.join("conf/nginx.conf")
    }

    /// The vhosts, in config order.
    pub fn vhosts(&self) -> &[Vhost] {
        &self.vhosts
    }

    /// PID of the nginx master (our child).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `[nginx, -t, -q, -p, PREFIX, -c, CONF]`: a target's `validate` argv.
    pub fn validate_argv(&self) -> Vec<String> {
        let mut argv = vec![self.bin_str(), "-t".into(), "-q".into()];
        argv.extend(self.prefix_args());
        argv
    }

    /// `[nginx, -p, PREFIX, -c, CONF, -s, reload]`: a target's `reload` argv.
    pub fn reload_argv(&self) -> Vec<String> {
        let mut argv = vec![self.bin_str()];
        argv.extend(self.prefix_args());
        argv.extend(["-s".into(), "reload".into()]);
        argv
    }

    /// PIDs of the current worker processes.
    pub fn worker_pids(&self) -> Vec<u32> {
        let master = self.pid();
        group_members(master)
            .into_iter()
            .filter(|p| *p != master && pid_alive(*p))
            .collect()
    }

    /// Runs [`Self::reload_argv`], asserts exit 0 and waits (bounded) until the old workers are gone.
    ///
    /// `nginx -s reload` only signals the master; until the old workers have
    /// shut down, a new connection can still be answered with the old
    /// certificate. After this returns, only workers with the new config serve.
    pub fn reload(&self) {
        let old_workers = self.worker_pids();
        let argv = self.reload_argv();
        let out = run_bounded(
            Command::new(&argv[0]).args(&argv[1..]),
            Duration::from_secs(30),
        );
        assert_eq!(
            out.code,
            0,
            "nginx reload failed: {}{}\nerror log:\n{}",
            out.stdout,
            out.stderr,
            self.error_log()
        );
        let deadline = Instant::now() + START_TIMEOUT;
        while old_workers.iter().any(|p| pid_alive(*p)) || self.worker_pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "nginx old workers {old_workers:?} still running {START_TIMEOUT:?} after reload \
                 (did the master reject the new config?); logs:\n{}",
                self.error_log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The content of nginx's error log (and its captured stderr).
    pub fn error_log(&self) -> String {
        logs(&self.prefix)
    }

    fn bin_str(&self) -> String {
        self.bin.to_string_lossy().into_owned()
    }

    fn prefix_args(&self) -> [String; 4] {
        [
            "-p".into(),
            self.prefix.to_string_lossy().into_owned(),
            "-c".into(),
            self.conf_path().to_string_lossy().into_owned(),
        ]
    }
}

enum StartError {
    /// Another process bound the port first; carries the error log.
    PortTaken(String),
    /// Anything else: a ready-to-panic message.
    Failed(String),
}

fn start_once(
    bin: &Path,
    prefix: &Path,
    port: u16,
    builder: &NginxBuilder,
    listen: Listen,
) -> Result<ChildGuard, StartError> {
    let vhosts = &builder.vhosts;
    let pid_file = prefix.join("logs/nginx.pid");
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(prefix.join("logs/error.log"));
    std::fs::write(
        prefix.join("conf/nginx.conf"),
        render_conf(
            prefix,
            port,
            vhosts,
            builder.workers,
            listen,
            builder.run_as.is_none(),
        ),
    )
    .expect("write nginx.conf");
    let stderr = std::fs::File::create(prefix.join("logs/stderr.log")).expect("create stderr.log");
    let mut cmd = match &builder.run_as {
        None => Command::new(bin),
        Some(user) => {
            // Its pid file, logs and temp paths are under the prefix.
            let chowned = Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(prefix)
                .status();
            assert!(
                chowned.is_ok_and(|s| s.success()),
                "chown -R {user} {}",
                prefix.display()
            );
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={user}"))
                .arg(format!("--regid={user}"))
                .arg("--init-groups")
                .arg("--")
                .arg(bin);
            c
        }
    };
    cmd.arg("-p")
        .arg(prefix)
        .arg("-c")
        .arg("conf/nginx.conf")
        .stdin(Stdio::null())
        .stdout(stderr.try_clone().expect("dup stderr.log"))
        .stderr(stderr);
    let mut child = ChildGuard::spawn("nginx", &mut cmd, Signal::SIGQUIT, Duration::from_secs(5))
        .dump_log_on_panic(&prefix.join("logs/error.log"));
    let addr = if listen == Listen::V6 {
        SocketAddr::from((Ipv6Addr::LOCALHOST, port))
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait() {
            let log = logs(prefix);
            if log.contains("Address already in use") {
                return Err(StartError::PortTaken(log));
            }
            return Err(StartError::Failed(format!(
                "nginx exited during startup ({status}); config {}:\n{}\nlogs:\n{log}",
                prefix.join("conf/nginx.conf").display(),
                read_lossy(&prefix.join("conf/nginx.conf")),
            )));
        }
        // nginx writes the pid file only after binding its listeners, so the
        // port answering afterwards is nginx and not a squatter.
        if pid_file.exists()
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            return Err(StartError::Failed(format!(
                "nginx did not listen on {addr} within {START_TIMEOUT:?}; logs:\n{}",
                logs(prefix)
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn render_conf(
    prefix: &Path,
    port: u16,
    vhosts: &[Vhost],
    workers: u32,
    listen: Listen,
    as_test_user: bool,
) -> String {
    let p = |rel: &str| quote(&prefix.join(rel));
    let www_data = matches!(nix::unistd::User::from_name("www-data"), Ok(Some(_)))
        && matches!(nix::unistd::Group::from_name("www-data"), Ok(Some(_)));
    let user = if as_test_user && nix::unistd::geteuid().is_root() && www_data {
        "# as Debian's nginx.conf; the master (root) reads the keys, see support/nginx.rs\n\
         user www-data www-data;\n"
    } else {
        ""
    };
    let mut servers = String::new();
    for (i, v) in vhosts.iter().enumerate() {
        let default = if i == 0 { " default_server" } else { "" };
        let listens: String = listen
            .hosts()
            .iter()
            .map(|h| format!("        listen {h}:{port} ssl{default};\n"))
            .collect();
        servers.push_str(&format!(
            "    server {{\n\
             {listens}\
             \x20       server_name {name};\n\
             \x20       ssl_certificate {cert};\n\
             \x20       ssl_certificate_key {key};\n\
             \x20       return 200 \"ok {name}\\n\";\n\
             \x20   }}\n",
            name = v.server_name,
            cert = quote(&v.cert),
            key = quote(&v.key),
        ));
    }
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/nginx.rs)\n\
         daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         {user}\
         pid {pid};\n\
         lock_file {lock};\n\
         error_log {error_log} notice;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20   access_log {access_log};\n\
         \x20   client_body_temp_path {t_body};\n\
         \x20   proxy_temp_path {t_proxy};\n\
         \x20   fastcgi_temp_path {t_fastcgi};\n\
         \x20   uwsgi_temp_path {t_uwsgi};\n\
         \x20   scgi_temp_path {t_scgi};\n\
         \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
         {servers}\
         }}\n",
        pid = p("logs/nginx.pid"),
        lock = p("logs/nginx.lock"),
        error_log = p("logs/error.log"),
        access_log = p("logs/access.log"),
        t_body = p("temp/client_body"),
        t_proxy = p("temp/proxy"),
        t_fastcgi = p("temp/fastcgi"),
        t_uwsgi = p("temp/uwsgi"),
        t_scgi = p("temp/scgi"),
    )
}

/// nginx's error log followed by its captured stdout/stderr.
fn logs(prefix: &Path) -> String {
    format!(
        "[error.log]\n{}\n[stderr]\n{}",
        tail(&read_lossy(&prefix.join("logs/error.log")), 100),
        tail(&read_lossy(&prefix.join("logs/stderr.log")), 100),
    )
}

/// A path as an nginx double-quoted string.
fn quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    assert!(
        !s.contains(['"', '\\', '$']),
        "path not safe for nginx.conf: {s}"
    );
    format!("\"{s}\"")
}

use super::absolute;
pub use super::free_port;
