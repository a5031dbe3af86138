//! The JDK on this machine, for the `keystore` kind: `keytool -list` of a
//! keystore, and a Java TLS server serving from one.
//!
//! [`JavaTls::start`] runs `java Server.java` (the JDK's single-file source
//! launcher; the program is [`SERVER_JAVA`]) as a child of the test. It
//! listens on a free loopback port of its own choosing, prints it, and
//! loads the keystore for every connection with
//! `KeyStore.getInstance(<type>)` and the password file, so each handshake
//! serves what is on disk at that moment (a stand-in for the restart a real
//! Java service needs, without restarting the JVM). Dropping it stops the
//! JVM by PID (`SIGTERM`, then `SIGKILL` to its group) and reaps it, also
//! on panic.
//!
//! **Missing JDK.** [`java_available`] panics unless `java` and `keytool`
//! are installed, or prints "skipped" and returns false under
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{ChildGuard, read_lossy, run_bounded};

/// The JVM compiles the program first: seconds, not milliseconds.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS server: `java Server.java KEYSTORE TYPE PASSWORD_FILE`.
pub const SERVER_JAVA: &str = r#"
import java.io.InputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLSocket;

public class Server {
    public static void main(String[] args) throws Exception {
        Path keystore = Path.of(args[0]);
        String type = args[1];
        char[] password = Files.readString(Path.of(args[2])).strip().toCharArray();
        try (ServerSocket plain = new ServerSocket(0, 50, InetAddress.getLoopbackAddress())) {
            System.out.println("listening " + plain.getLocalPort());
            System.out.flush();
            while (true) {
                Socket raw = plain.accept();
                try {
                    KeyStore ks = KeyStore.getInstance(type);
                    try (InputStream in = Files.newInputStream(keystore)) {
                        ks.load(in, password);
                    }
                    KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
                    kmf.init(ks, password);
                    SSLContext ctx = SSLContext.getInstance("TLS");
                    ctx.init(kmf.getKeyManagers(), null, null);
                    SSLSocket tls = (SSLSocket) ctx.getSocketFactory().createSocket(raw, null, true);
                    tls.setUseClientMode(false);
                    tls.setSoTimeout(5000);
                    tls.startHandshake();
                    tls.getInputStream().read();
                    tls.close();
                } catch (Exception e) {
                    System.out.println("connection: " + e);
                    System.out.flush();
                    raw.close();
                }
            }
        }
    }
}
"#;

fn bin(name: &str) -> Option<PathBuf> {
    super::find_program(name, &[&format!("/usr/bin/{name}")])
}

/// True when `java` and `keytool` are installed; otherwise panics, or
/// prints "skipped" and returns false under
/// `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.
pub fn java_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| bin("java").is_some() && bin("keytool").is_some());
    found || !super::server_missing("default-jdk-headless")
}

/// `keytool -list -v` of `keystore` (type `PKCS12` or `JKS`), the password
/// read from `password_file`: its standard output; panics when keytool
/// fails.
pub fn keytool_list(keystore: &Path, store_type: &str, password_file: &Path) -> String {
    let keytool = bin("keytool").expect("keytool");
    let mut cmd = Command::new(keytool);
    cmd.args(["-list", "-v", "-keystore"])
        .arg(keystore)
        .args(["-storetype", store_type, "-storepass:file"])
        .arg(password_file);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(
        out.code, 0,
        "keytool -list failed:\n{}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// A SHA-256 fingerprint as keytool prints it: `AB:CD:…`.
pub fn keytool_fingerprint(sha256_hex: &str) -> String {
    sha256_hex
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// A running Java TLS server that serves the keystore at a path.
pub struct JavaTls {
    child: ChildGuard,
    port: u16,
    log: PathBuf,
}

impl JavaTls {
    /// Writes `Server.java` into `dir` and runs it on `keystore` of
    /// `store_type` (`PKCS12`, `JKS`), with the password in
    /// `password_file`; returns once it listens.
    pub fn start(dir: &Path, keystore: &Path, store_type: &str, password_file: &Path) -> JavaTls {
        std::fs::create_dir_all(dir).expect("create java dir");
        let source = dir.join("Server.java");
        std::fs::write(&source, SERVER_JAVA).expect("write Server.java");
        let log = dir.join("server.log");
        let file = std::fs::File::create(&log).expect("create java log");
        let mut cmd = Command::new(bin("java").expect("java"));
        cmd.arg(&source)
            .arg(keystore)
            .arg(store_type)
            .arg(password_file)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        let mut child =
            ChildGuard::spawn("java", &mut cmd, Signal::SIGTERM, Duration::from_secs(5))
                .dump_log_on_panic(&log);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = read_lossy(&log);
            if let Some(port) = text
                .lines()
                .find_map(|l| l.strip_prefix("listening "))
                .and_then(|p| p.trim().parse().ok())
            {
                return JavaTls { child, port, log };
            }
            if let Some(status) = child.try_wait() {
                panic!("java exited during startup ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "java did not listen within {START_TIMEOUT:?}:\n{text}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the server printed.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}
