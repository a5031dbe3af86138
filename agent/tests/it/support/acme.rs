//! Pebble, the ACME test server from Debian's `pebble` package, on loopback
//! ports, for the ACME recipes of `examples/acme/`.
//!
//! [`Pebble::start`] writes a TLS certificate for `localhost` (from the test
//! PKI) and a configuration with free ports, and starts
//! `pebble -config FILE` (strict mode off) with `PEBBLE_VA_ALWAYS_VALID=1`
//! (every challenge is valid: nothing has to answer http-01 from pebble's
//! side), `PEBBLE_VA_NOSLEEP=1` and `PEBBLE_WFE_NONCEREJECT=0` (no random
//! `badNonce`, which some clients do not retry). The ACME clients trust
//! [`Pebble::ca_file`], the root of pebble's listener certificate. Pebble
//! is stopped by PID when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{ChildGuard, read_lossy};
use super::{free_port, pki};

/// A running pebble.
pub struct Pebble {
    _child: ChildGuard,
    port: u16,
    ca_file: PathBuf,
    log: PathBuf,
}

impl Pebble {
    /// Starts pebble with its files under `dir`; panics with its log when it
    /// does not listen within 20 s.
    pub fn start(dir: &Path, pebble: &Path) -> Pebble {
        std::fs::create_dir_all(dir).unwrap();
        let tls = pki::issue_cert(&["localhost"]);
        let cert = dir.join("listener.crt");
        let key = dir.join("listener.key");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&cert, tls.cert_pem.clone() + &tls.chain_pem).unwrap();
        std::fs::write(&key, &tls.key_pem).unwrap();
        std::fs::write(&ca_file, &tls.root_pem).unwrap();
        let port = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{}", free_port()),
                "certificate": cert,
                "privateKey": key,
                "httpPort": free_port(),
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.join("pebble.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = ChildGuard::spawn(
            "pebble",
            Command::new(pebble)
                .arg("-config")
                .arg(&config_path)
                .env("PEBBLE_VA_ALWAYS_VALID", "1")
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
            Signal::SIGTERM,
            Duration::from_secs(2),
        )
        .dump_log_on_panic(&log);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pebble does not listen on 127.0.0.1:{port}:\n{}",
                read_lossy(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble {
            _child: child,
            port,
            ca_file,
            log,
        }
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.port)
    }

    /// The CA bundle that validates pebble's listener.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Pebble's output so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}
