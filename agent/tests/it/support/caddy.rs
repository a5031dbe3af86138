//! A real Caddy (Debian's package) serving TLS on a free loopback port,
//! configured either by a Caddyfile that loads the certificate files (file
//! mode) or by a JSON config that serves whatever certificate is loaded
//! through the admin API with the tag `certctl-<target>` (admin-API mode).
//!
//! [`Caddy::start_file`] and [`Caddy::start_api`] write the config under
//! `<dir>` with storage, `HOME` and the XDG directories there too (so
//! nothing outside the temp dir is touched), the admin endpoint on a Unix
//! socket `<dir>/admin.sock` or a free loopback TCP port, automatic HTTPS
//! off, and run `caddy run --config FILE` as a child of the test. Readiness:
//! the admin endpoint answers and the TLS port accepts. Dropping a [`Caddy`]
//! sends `SIGTERM`, then `SIGKILL` to its group after 5 s, and reaps it,
//! also on panic.
//!
//! **Missing Caddy.** [`caddy_available`] panics unless caddy is installed,
//! or prints "skipped" and returns false under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
//!
//! Gotchas: caddy skips a reload whose config text did not change, so file
//! mode needs `caddy reload --force`; the admin API checks the `Host`
//! header (the listen address over TCP, empty over a Unix socket); a
//! Caddyfile `tls cert key` makes a connection policy that selects only that
//! certificate.

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
    BIN.get_or_init(|| super::find_program("caddy", &["/usr/bin/caddy"]))
        .as_deref()
}

/// True when Caddy is installed; otherwise panics, or prints "skipped" and
/// returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn caddy_available() -> bool {
    bin().is_some() || !super::server_missing("caddy")
}

/// Where the admin endpoint listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    /// `<dir>/admin.sock`.
    Unix,
    /// A free loopback TCP port.
    Tcp,
}

/// The admin endpoint of a running instance.
#[derive(Clone, Debug)]
enum AdminAt {
    Unix(PathBuf),
    Tcp(u16),
}

/// What the instance serves from.
enum Mode<'a> {
    /// A Caddyfile site loading these files.
    Files {
        sni: &'a str,
        cert: &'a Path,
        key: &'a str,
    },
    /// JSON: certificates tagged `tag`, loaded through the admin API.
    Api { tag: &'a str },
}

/// A running Caddy; stopped and reaped on drop.
pub struct Caddy {
    child: ChildGuard,
    dir: PathBuf,
    port: u16,
    admin: AdminAt,
    config: PathBuf,
}

impl Caddy {
    /// File mode: a Caddyfile with the site `https://<sni>:PORT` serving
    /// `cert` (leaf + chain) and `key`.
    pub fn start_file(dir: &Path, admin: Admin, sni: &str, cert: &Path, key: &Path) -> Caddy {
        let key = key.display().to_string();
        start(
            dir,
            admin,
            &Mode::Files {
                sni,
                cert,
                key: &key,
            },
        )
    }

    /// Admin-API mode: a JSON config whose TLS connection policy selects the
    /// certificates tagged `tag`; none is loaded at start.
    pub fn start_api(dir: &Path, admin: Admin, tag: &str) -> Caddy {
        start(dir, admin, &Mode::Api { tag })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[target.verify] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The config file caddy was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The admin address in caddy's own syntax (`unix//path` or
    /// `127.0.0.1:PORT`): `caddy_address`, or `admin_url`.
    pub fn admin_address(&self) -> String {
        match &self.admin {
            AdminAt::Unix(p) => format!("unix/{}", p.display()),
            AdminAt::Tcp(port) => format!("127.0.0.1:{port}"),
        }
    }

    /// `GET <path>` on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        admin_get(&self.admin, path).expect("caddy admin endpoint")
    }

    /// Replaces the config file with text caddy cannot adapt: `caddy
    /// validate` fails from now on, while the running server keeps its
    /// config.
    pub fn break_config(&self) {
        let mut text = read_lossy(&self.config);
        text.push_str("\nhttp://127.0.0.1:1 {\n\tcertctl_no_such_directive\n}\n");
        std::fs::write(&self.config, text).expect("write caddy config");
    }

    /// Caddy's log.
    pub fn log(&self) -> String {
        tail(&read_lossy(&self.dir.join("caddy.log")), 100)
    }
}

fn start(dir: &Path, admin: Admin, mode: &Mode<'_>) -> Caddy {
    let bin = bin().expect("caddy is not installed (check caddy_available() first)");
    let dir = super::absolute(dir);
    for sub in ["", "data", "home", "config"] {
        std::fs::create_dir_all(dir.join(sub)).expect("create caddy dir");
    }
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        let admin = match admin {
            Admin::Unix => AdminAt::Unix(dir.join("admin.sock")),
            Admin::Tcp => AdminAt::Tcp(free_port()),
        };
        let (config, text) = match mode {
            Mode::Files { sni, cert, key } => (
                dir.join("Caddyfile"),
                render_caddyfile(&dir, &admin, port, sni, cert, key),
            ),
            Mode::Api { tag } => (dir.join("caddy.json"), render_json(&dir, &admin, port, tag)),
        };
        std::fs::write(&config, text).expect("write caddy config");
        match start_once(bin, &dir, &config, port, &admin) {
            Ok(child) => {
                return Caddy {
                    child,
                    dir,
                    port,
                    admin,
                    config,
                };
            }
            Err(Some(log)) => last = log,
            Err(None) => panic!(
                "caddy exited during startup; config:\n{}\nlog:\n{}",
                read_lossy(&config),
                tail(&read_lossy(&dir.join("caddy.log")), 100)
            ),
        }
    }
    panic!("caddy: no free port after {PORT_ATTEMPTS} attempts; last log:\n{last}");
}

/// `Err(Some(log))`: a port was taken; `Err(None)`: any other failure.
fn start_once(
    bin: &Path,
    dir: &Path,
    config: &Path,
    port: u16,
    admin: &AdminAt,
) -> Result<ChildGuard, Option<String>> {
    let _ = std::fs::remove_file(dir.join("admin.sock"));
    let log = dir.join("caddy.log");
    let out = std::fs::File::create(&log).expect("create caddy.log");
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("--config").arg(config);
    if config.extension().is_none() {
        cmd.args(["--adapter", "caddyfile"]);
    }
    cmd.env("HOME", dir.join("home"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
    let mut child = ChildGuard::spawn("caddy", &mut cmd, Signal::SIGTERM, Duration::from_secs(5))
        .dump_log_on_panic(&log);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if child.try_wait().is_some() {
            let text = read_lossy(&log);
            return Err(text.contains("address already in use").then_some(text));
        }
        if admin_get(admin, "/config/").is_ok_and(|(status, _)| status == 200)
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(child);
        }
        assert!(
            Instant::now() < deadline,
            "caddy did not listen on {addr} within {START_TIMEOUT:?}; log:\n{}",
            tail(&read_lossy(&log), 100)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.0 GET on the admin endpoint (caddy closes after it).
fn admin_get(admin: &AdminAt, path: &str) -> std::io::Result<(u16, String)> {
    let (mut conn, host): (Box<dyn ReadWrite>, String) = match admin {
        AdminAt::Unix(p) => (Box::new(UnixStream::connect(p)?), String::new()),
        AdminAt::Tcp(port) => (
            Box::new(TcpStream::connect((Ipv4Addr::LOCALHOST, *port))?),
            format!("127.0.0.1:{port}"),
        ),
    };
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn admin_caddyfile(admin: &AdminAt) -> String {
    match admin {
        AdminAt::Unix(p) => format!("unix/{}", p.display()),
        AdminAt::Tcp(port) => format!("127.0.0.1:{port}"),
    }
}

fn render_caddyfile(
    dir: &Path,
    admin: &AdminAt,
    port: u16,
    sni: &str,
    cert: &Path,
    key: &str,
) -> String {
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/caddy.rs)\n\
         {{\n\
         \tadmin {admin}\n\
         \tauto_https disable_redirects\n\
         \tstorage file_system {data}\n\
         \tskip_install_trust\n\
         }}\n\
         https://{sni}:{port} {{\n\
         \tbind 127.0.0.1\n\
         \ttls {cert} {key}\n\
         \trespond \"ok\"\n\
         }}\n",
        admin = admin_caddyfile(admin),
        data = dir.join("data").display(),
        cert = cert.display(),
    )
}

fn render_json(dir: &Path, admin: &AdminAt, port: u16, tag: &str) -> String {
    serde_json::json!({
        "admin": { "listen": admin_caddyfile(admin) },
        "storage": { "module": "file_system", "root": dir.join("data") },
        "apps": {
            "http": { "servers": { "tls": {
                "listen": [format!("127.0.0.1:{port}")],
                "automatic_https": { "disable": true },
                "routes": [{ "handle": [{ "handler": "static_response", "body": "ok" }] }],
                "tls_connection_policies": [{ "certificate_selection": { "any_tag": [tag] } }],
            }}},
            "pki": { "certificate_authorities": { "local": { "install_trust": false } } },
        },
    })
    .to_string()
}
