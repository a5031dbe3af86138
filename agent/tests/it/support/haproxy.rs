//! A real HAProxy (Debian's package) terminating TLS on a free loopback
//! port, in master-worker mode with both control sockets.
//!
//! [`Haproxy::start`] writes `<dir>/haproxy.cfg`: a `stats socket
//! <dir>/admin.sock level admin` (the runtime API), the pid file under
//! `<dir>`, and one frontend `bind 127.0.0.1:PORT ssl crt <pem>` answering
//! `200 ok`. It runs `haproxy -W -S <dir>/master.sock -f haproxy.cfg` as a
//! child of the test: the master stays in the foreground and in the process
//! group [`ChildGuard`] gives it, and so do its workers; a master CLI
//! `reload` re-executes the master in place (same PID). Dropping a
//! [`Haproxy`] sends `SIGTERM` to the master (which stops the workers), then
//! `SIGKILL` to the group after 5 s, and reaps it, also on panic.
//!
//! As root the workers run as `haproxy` (like Debian's config); the master
//! stays root and reads the PEM at start and on every reload.
//!
//! **Missing HAProxy.** [`haproxy_available`] panics unless haproxy is
//! installed, or prints "skipped" and returns false under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
//!
//! Gotchas: the master CLI answers only after the client shuts down its
//! write side, and `reload` (2.6) answers nothing: `show proc` tells when
//! the new worker runs ([`Haproxy::show_proc`]).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::nginx::free_port;
use super::process::{ChildGuard, read_lossy, tail};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

fn bin() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| super::find_program("haproxy", &["/usr/sbin/haproxy"]))
        .as_deref()
}

/// True when HAProxy is installed; otherwise panics, or prints "skipped"
/// and returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn haproxy_available() -> bool {
    bin().is_some() || !super::server_missing("haproxy")
}

/// A running HAProxy master and its workers; stopped and reaped on drop.
pub struct Haproxy {
    child: ChildGuard,
    dir: PathBuf,
    port: u16,
}

impl Haproxy {
    /// Starts HAProxy under `dir` serving the combined PEM `pem` (leaf,
    /// chain, key).
    pub fn start(dir: &Path, pem: &Path) -> Haproxy {
        Self::start_with(dir, |dir, port| render_cfg(dir, port, pem))
    }

    /// Starts HAProxy under `dir` as a TCP load balancer (`mode tcp`,
    /// `balance roundrobin`, TLS passed through) in front of the loopback
    /// ports `backends`: each new connection goes to the next backend.
    pub fn start_balancer(dir: &Path, backends: &[u16]) -> Haproxy {
        Self::start_with(dir, |dir, port| render_balancer_cfg(dir, port, backends))
    }

    fn start_with(dir: &Path, render: impl Fn(&Path, u16) -> String) -> Haproxy {
        let bin = bin().expect("haproxy is not installed (check haproxy_available() first)");
        let dir = super::absolute(dir);
        std::fs::create_dir_all(&dir).expect("create haproxy dir");
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            std::fs::write(dir.join("haproxy.cfg"), render(&dir, port)).expect("write haproxy.cfg");
            match start_once(bin, &dir, port) {
                Ok(child) => return Haproxy { child, dir, port },
                Err(Some(log)) => last = log,
                Err(None) => panic!(
                    "haproxy exited during startup; config:\n{}\nlog:\n{}",
                    read_lossy(&dir.join("haproxy.cfg")),
                    tail(&read_lossy(&dir.join("haproxy.log")), 100)
                ),
            }
        }
        panic!("haproxy: no free port after {PORT_ATTEMPTS} attempts; last log:\n{last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[target.verify] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `<dir>/haproxy.cfg`.
    pub fn cfg_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    /// The master CLI socket (`-S`).
    pub fn master_socket(&self) -> PathBuf {
        self.dir.join("master.sock")
    }

    /// The runtime API socket (`stats socket ... level admin`).
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    /// The master's `show proc`.
    pub fn show_proc(&self) -> String {
        cli(&self.master_socket(), "show proc\n").expect("master CLI show proc")
    }

    /// `(reloads, current worker PIDs)` from `show proc`.
    pub fn reloads_and_workers(&self) -> (u64, Vec<u32>) {
        let text = self.show_proc();
        let mut reloads = 0;
        let mut workers = Vec::new();
        let mut section = "";
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("# ") {
                section = if name.starts_with("workers") {
                    "workers"
                } else {
                    "other"
                };
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [_, "master", n, ..] => reloads = n.parse().expect("reload count"),
                [pid, "worker", ..] if section == "workers" => {
                    workers.push(pid.parse().expect("worker pid"));
                }
                _ => {}
            }
        }
        (reloads, workers)
    }

    /// Appends a keyword haproxy does not know: `haproxy -c` fails from now
    /// on, while the running workers keep their configuration.
    pub fn break_config(&self) {
        let mut text = read_lossy(&self.cfg_path());
        text.push_str("    certctl-no-such-keyword on\n");
        std::fs::write(self.cfg_path(), text).expect("write haproxy.cfg");
    }

    /// The master's and workers' output.
    pub fn log(&self) -> String {
        tail(&read_lossy(&self.dir.join("haproxy.log")), 100)
    }
}

/// One command on a haproxy socket; the answer after the write side is shut.
pub fn cli(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(command.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `Err(Some(log))`: the port was taken; `Err(None)`: any other failure.
fn start_once(bin: &Path, dir: &Path, port: u16) -> Result<ChildGuard, Option<String>> {
    for f in ["master.sock", "admin.sock", "haproxy.pid"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let log = dir.join("haproxy.log");
    let out = std::fs::File::create(&log).expect("create haproxy.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-W")
        .arg("-S")
        .arg(dir.join("master.sock"))
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
    let mut child = ChildGuard::spawn("haproxy", &mut cmd, Signal::SIGTERM, Duration::from_secs(5))
        .dump_log_on_panic(&log);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if child.try_wait().is_some() {
            let text = read_lossy(&log);
            return Err(text.contains("Address already in use").then_some(text));
        }
        // The admin socket and the port belong to the worker: both up means
        // it runs, and the master CLI answers.
        if cli(&dir.join("admin.sock"), "show info\n").is_ok()
            && cli(&dir.join("master.sock"), "show proc\n").is_ok()
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(child);
        }
        assert!(
            Instant::now() < deadline,
            "haproxy did not listen on {addr} within {START_TIMEOUT:?}; log:\n{}",
            tail(&read_lossy(&log), 100)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn render_cfg(dir: &Path, port: u16, pem: &Path) -> String {
    let d = dir.display();
    let haproxy_user = matches!(nix::unistd::User::from_name("haproxy"), Ok(Some(_)))
        && matches!(nix::unistd::Group::from_name("haproxy"), Ok(Some(_)));
    let user = if nix::unistd::geteuid().is_root() && haproxy_user {
        "    # as Debian's haproxy.cfg: the master (root) reads the PEM\n    user haproxy\n    group haproxy\n"
    } else {
        ""
    };
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/haproxy.rs)\n\
         global\n\
         \x20   stats socket {d}/admin.sock mode 600 level admin\n\
         \x20   pidfile {d}/haproxy.pid\n\
         {user}\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 5s\n\
         \x20   timeout server 5s\n\
         frontend tls\n\
         \x20   bind 127.0.0.1:{port} ssl crt {pem}\n\
         \x20   http-request return status 200 content-type text/plain string ok\n",
        pem = pem.display(),
    )
}

fn render_balancer_cfg(dir: &Path, port: u16, backends: &[u16]) -> String {
    let d = dir.display();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    server b{i} 127.0.0.1:{p}\n"))
        .collect();
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/haproxy.rs)\n\
         global\n\
         \x20   stats socket {d}/admin.sock mode 600 level admin\n\
         \x20   pidfile {d}/haproxy.pid\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 5s\n\
         \x20   timeout server 5s\n\
         frontend lb\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   default_backend nginx\n\
         backend nginx\n\
         \x20   balance roundrobin\n\
         {servers}"
    )
}
