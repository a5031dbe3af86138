//! A real Apache httpd (Debian's apache2 package) serving TLS on a free
//! loopback port.
//!
//! [`Apache::start`] writes `<dir>/httpd.conf` with `ServerRoot`, the pid
//! file, the mutexes, the runtime dir, the error log and the SSL session
//! cache under `<dir>`, loading only the modules TLS needs (mpm_event,
//! authz_core, socache_shmcb, ssl), so instances share nothing and tests run
//! in parallel. It runs `apache2 -f CONF -DFOREGROUND` as a child of the test
//! (the parent stays in the process group [`ChildGuard`] gives it) and waits
//! for the pid file and the port. Dropping an [`Apache`] sends `SIGTERM` to
//! the parent (which stops its children), then `SIGKILL` to the group after
//! 5 s, and reaps it, also on panic.
//!
//! The parent reads the certificate and key as root at start and on every
//! graceful restart; as root the children run as `www-data` (Debian's
//! `User`/`Group`) and never open the files. [`Apache::validate_argv`] and
//! [`Apache::reload_argv`] go through `apachectl`, the program the apache
//! kind runs by default, with `-f CONF` (Debian's `apachectl` passes unknown
//! arguments to `apache2`).
//!
//! **Missing Apache.** [`apache_available`] panics unless apache2 is
//! installed, or prints "skipped" and returns false under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
//!
//! Gotchas: `-k graceful` returns at once and the parent switches
//! asynchronously (probes wait for three matches in a row); Debian's
//! `apachectl` creates `/var/run/apache2` and `/var/lock/apache2` (harmless).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
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

/// Absolute paths of `apache2` and `apachectl`.
struct Bins {
    httpd: PathBuf,
    ctl: PathBuf,
}

fn bins() -> Option<&'static Bins> {
    static BINS: OnceLock<Option<Bins>> = OnceLock::new();
    BINS.get_or_init(|| {
        Some(Bins {
            httpd: super::find_program("apache2", &["/usr/sbin/apache2"])?,
            ctl: super::find_program("apachectl", &["/usr/sbin/apachectl"])?,
        })
    })
    .as_ref()
}

/// The module directory of Debian's package.
const MODULES: &str = "/usr/lib/apache2/modules";

/// True when Apache is installed; otherwise panics, or prints "skipped" and
/// returns false under `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn apache_available() -> bool {
    (bins().is_some() && Path::new(MODULES).join("mod_ssl.so").is_file())
        || !super::server_missing("apache2")
}

/// A running Apache; stopped and reaped on drop.
pub struct Apache {
    child: ChildGuard,
    dir: PathBuf,
    port: u16,
}

impl Apache {
    /// Starts Apache under `dir` with one TLS vhost `server_name` serving
    /// `cert` (leaf + chain) and `key`.
    pub fn start(dir: &Path, server_name: &str, cert: &Path, key: &Path) -> Apache {
        let bins = bins().expect("apache is not installed (check apache_available() first)");
        let dir = super::absolute(dir);
        std::fs::create_dir_all(&dir).expect("create apache dir");
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            std::fs::write(
                dir.join("httpd.conf"),
                render_conf(&dir, port, server_name, cert, key),
            )
            .expect("write httpd.conf");
            match start_once(&bins.httpd, &dir, port) {
                Ok(child) => return Apache { child, dir, port },
                Err(Some(log)) => last = log,
                Err(None) => panic!(
                    "apache exited during startup; config:\n{}\nlog:\n{}",
                    read_lossy(&dir.join("httpd.conf")),
                    logs(&dir)
                ),
            }
        }
        panic!("apache: no free port after {PORT_ATTEMPTS} attempts; last log:\n{last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as a `[target.verify] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `<dir>/httpd.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join("httpd.conf")
    }

    /// PID of the parent process.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `[apachectl, -f, CONF, -t]`: a target's `validate` argv.
    pub fn validate_argv(&self) -> Vec<String> {
        self.ctl(&["-t"])
    }

    /// `[apachectl, -f, CONF, -k, graceful]`: a target's `reload` argv.
    pub fn reload_argv(&self) -> Vec<String> {
        self.ctl(&["-k", "graceful"])
    }

    /// Appends a directive Apache does not know: `-t` fails from now on,
    /// while the running server keeps its configuration.
    pub fn break_config(&self) {
        let mut text = read_lossy(&self.conf_path());
        text.push_str("CertctlNoSuchDirective on\n");
        std::fs::write(self.conf_path(), text).expect("write httpd.conf");
    }

    /// The error log and the captured output.
    pub fn log(&self) -> String {
        logs(&self.dir)
    }

    fn ctl(&self, args: &[&str]) -> Vec<String> {
        let bins = bins().expect("apache installed");
        let mut argv = vec![
            bins.ctl.to_string_lossy().into_owned(),
            "-f".to_owned(),
            self.conf_path().to_string_lossy().into_owned(),
        ];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    }
}

/// `Err(Some(log))`: the port was taken; `Err(None)`: any other failure.
fn start_once(bin: &Path, dir: &Path, port: u16) -> Result<ChildGuard, Option<String>> {
    let pid_file = dir.join("httpd.pid");
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(dir.join("error.log"));
    let out = std::fs::File::create(dir.join("stderr.log")).expect("create stderr.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-f")
        .arg(dir.join("httpd.conf"))
        .arg("-DFOREGROUND")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out);
    let mut child = ChildGuard::spawn("apache2", &mut cmd, Signal::SIGTERM, Duration::from_secs(5))
        .dump_log_on_panic(&dir.join("error.log"));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if child.try_wait().is_some() {
            let log = logs(dir);
            return Err(log.contains("Address already in use").then_some(log));
        }
        // The pid file is written after the listeners are bound.
        if pid_file.exists()
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        {
            return Ok(child);
        }
        assert!(
            Instant::now() < deadline,
            "apache did not listen on {addr} within {START_TIMEOUT:?}; log:\n{}",
            logs(dir)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn render_conf(dir: &Path, port: u16, server_name: &str, cert: &Path, key: &Path) -> String {
    let d = dir.display();
    let user = if nix::unistd::geteuid().is_root() {
        "# As Debian's apache2.conf: the parent (root) reads the key.\nUser www-data\nGroup www-data\n"
    } else {
        ""
    };
    format!(
        "# written by the certctl-agent integration tests (agent/tests/it/support/apache.rs)\n\
         ServerRoot \"{d}\"\n\
         DefaultRuntimeDir \"{d}\"\n\
         PidFile \"{d}/httpd.pid\"\n\
         Mutex file:{d} default\n\
         ErrorLog \"{d}/error.log\"\n\
         LogLevel notice\n\
         ServerName certctl-test\n\
         LoadModule mpm_event_module {MODULES}/mod_mpm_event.so\n\
         LoadModule authz_core_module {MODULES}/mod_authz_core.so\n\
         LoadModule socache_shmcb_module {MODULES}/mod_socache_shmcb.so\n\
         LoadModule ssl_module {MODULES}/mod_ssl.so\n\
         {user}\
         StartServers 1\n\
         ServerLimit 2\n\
         ThreadsPerChild 4\n\
         MaxRequestWorkers 8\n\
         Listen 127.0.0.1:{port}\n\
         SSLSessionCache \"shmcb:{d}/ssl_scache(51200)\"\n\
         <VirtualHost 127.0.0.1:{port}>\n\
         \x20 ServerName {server_name}\n\
         \x20 SSLEngine on\n\
         \x20 SSLCertificateFile \"{cert}\"\n\
         \x20 SSLCertificateKeyFile \"{key}\"\n\
         </VirtualHost>\n",
        cert = cert.display(),
        key = key.display(),
    )
}

fn logs(dir: &Path) -> String {
    format!(
        "[error.log]\n{}\n[stderr]\n{}",
        tail(&read_lossy(&dir.join("error.log")), 100),
        tail(&read_lossy(&dir.join("stderr.log")), 100)
    )
}
