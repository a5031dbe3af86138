//! Figure 6: what verification costs. A real nginx (Debian's package,
//! started as the integration tests start it: `-p <prefix>`, `daemon off`,
//! `master_process on`, `user www-data` when root) serves a certificate on
//! a loopback port. One probe is measured as the Verify RPC (the agent
//! reads the certificate on disk, connects, handshakes, compares) next to a
//! bare TLS handshake from this process; the retry schedule as the wall
//! time from the first to the last attempt of a verification that cannot
//! succeed (nginx is never reloaded, so it keeps serving the old
//! certificate), next to the schedule's nominal waits.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use certctl_proto::agent::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use super::agent::{Agent, write_file};
use super::pki::Set;
use super::stats::{Row, Samples, med_p99, min_max, secs};

/// The server name nginx serves and the agent verifies.
pub const SERVER_NAME: &str = "verify.bench.test";

/// The nginx binary: `$PATH`, then `/usr/sbin/nginx`.
pub fn nginx_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("nginx"))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
}

/// A running nginx; SIGQUIT, then SIGKILL, when dropped.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    /// Serves `cert` (leaf + chain) and `key` for [`SERVER_NAME`] on a free
    /// loopback port.
    pub fn start(bin: &Path, prefix: &Path, cert: &Path, key: &Path) -> Result<Nginx> {
        for d in ["conf", "logs", "temp"] {
            std::fs::create_dir_all(prefix.join(d))?;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let root = nix::unistd::geteuid().is_root();
        let www_data = matches!(nix::unistd::User::from_name("www-data"), Ok(Some(_)));
        let user = if root && www_data {
            "user www-data www-data;\n"
        } else {
            ""
        };
        let p = |rel: &str| format!("{:?}", prefix.join(rel));
        let conf = format!(
            "# written by `cargo xtask bench`\ndaemon off;\nmaster_process on;\nworker_processes 1;\n{user}\
             pid {pid};\nlock_file {lock};\nerror_log {err} notice;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
             \x20 fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
             \x20 ssl_protocols TLSv1.2 TLSv1.3;\n  server {{\n    listen 127.0.0.1:{port} ssl default_server;\n\
             \x20   server_name {SERVER_NAME};\n    ssl_certificate {cert:?};\n    ssl_certificate_key {key:?};\n\
             \x20   return 200 \"ok\\n\";\n  }}\n}}\n",
            pid = p("logs/nginx.pid"),
            lock = p("logs/nginx.lock"),
            err = p("logs/error.log"),
            t = prefix.join("temp").display(),
        );
        write_file(&prefix.join("conf/nginx.conf"), conf.as_bytes())?;
        let log = std::fs::File::create(prefix.join("logs/stderr.log"))?;
        #[allow(clippy::disallowed_methods)] // the harness starts the server it verifies against
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg("conf/nginx.conf")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().context("start nginx")?;
        let mut nginx = Nginx { child, port };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = nginx.child.try_wait()? {
                let log =
                    std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
                bail!("nginx exited at start ({status}):\n{log}");
            }
            // nginx writes its pid file after binding: the port is nginx's.
            if prefix.join("logs/nginx.pid").exists()
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its own process group (the master and its worker) only.
        let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A blocking TLS client that trusts only the bench root.
fn client_config(root_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(root_pem.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Connect and complete one TLS handshake with SNI [`SERVER_NAME`].
fn handshake(config: &Arc<rustls::ClientConfig>, port: u16) -> Result<()> {
    let name = ServerName::try_from(SERVER_NAME)?;
    let mut conn = rustls::ClientConnection::new(config.clone(), name)?;
    let mut sock = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) if conn.is_handshaking() => bail!("nginx closed the connection"),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if conn.peer_certificates().is_none_or(<[_]>::is_empty) {
        bail!("no certificate served");
    }
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(())
}

/// Figure 6, first row: the Verify RPC vs a bare handshake, interleaved.
pub async fn probe(
    agent: &Agent,
    target: &str,
    nginx: &Nginx,
    root_pem: &str,
    warmup: usize,
    n: usize,
) -> Result<Row> {
    let config = client_config(root_pem)?;
    let mut client = agent.client().await?;
    let (mut rpc, mut bare) = (Samples::default(), Samples::default());
    for i in 0..warmup + n {
        let t = Instant::now();
        let r = client
            .verify(pb::VerifyRequest {
                target: target.to_owned(),
            })
            .await?
            .into_inner();
        let took = t.elapsed();
        let check = r.check.unwrap_or_default();
        if check.state != "verified" {
            bail!("verify: {} ({})", check.state, check.error);
        }
        let t = Instant::now();
        tokio::task::block_in_place(|| handshake(&config, nginx.port))?;
        let hs = t.elapsed();
        if i >= warmup {
            rpc.push(took);
            bare.push(hs);
        }
    }
    let ratio = rpc.median() / bare.median();
    Ok(Row::new(
        "6",
        "verify: one probe of nginx (Verify RPC: read disk, TCP, TLS 1.3 handshake, compare) vs a bare handshake",
    )
    .n(n)
    .measured(med_p99(&rpc))
    .baseline(format!("handshake {}", med_p99(&bare)))
    .ratio(ratio))
}

/// The waits of the retry schedule without jitter (attempts, first wait,
/// cap), as `verify::backoff` computes them.
pub fn nominal(attempts: u32, backoff: Duration, cap: Duration) -> Duration {
    (1..attempts)
        .map(|n| backoff.saturating_mul(1 << (n - 1).min(30)).min(cap))
        .sum()
}

/// Figure 6, second row: deploys whose verification cannot succeed; the
/// wall time from their first to their last attempt vs the nominal waits.
pub async fn schedule(
    agent: &Agent,
    target: &str,
    new: &Set,
    attempts: u32,
    backoff: Duration,
    runs: usize,
) -> Result<Row> {
    let mut client = agent.client().await?;
    let (mut span, mut total) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut stream = client
            .deploy(pb::DeployRequest {
                target: target.to_owned(),
                cert_pem: new.cert.as_bytes().to_vec(),
                key_pem: new.key.as_bytes().to_vec(),
                chain_pem: new.chain.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut first, mut last, mut seen) = (None, None, 0);
        let result = loop {
            let Some(ev) = stream.message().await? else {
                bail!("the deploy stream ended before DONE");
            };
            let at = Instant::now();
            if let Some(a) = &ev.attempt
                && !a.rollback
            {
                first = first.or(Some(at));
                last = Some(at);
                seen += 1;
            }
            if let Some(r) = ev.result {
                break r;
            }
        };
        total.push(t0.elapsed());
        if result.outcome != pb::Outcome::RolledBack as i32 || seen != attempts {
            bail!(
                "expected {attempts} failed attempts and rolled_back, got {seen} and outcome {} ({})",
                result.outcome,
                result.error
            );
        }
        if let (Some(f), Some(l)) = (first, last) {
            span.push(l - f);
        }
    }
    let nominal = nominal(attempts, backoff, Duration::from_secs(16).max(backoff));
    Ok(Row::new(
        "6",
        format!(
            "verify retry schedule: {attempts} attempts from {} doubling, first → last attempt (deploy to rolled_back)",
            secs(backoff.as_secs_f64())
        ),
    )
    .n(runs)
    .measured(format!(
        "{} ({}); whole deploy {}",
        secs(span.median()),
        min_max(&span),
        secs(total.median())
    ))
    .baseline(format!("nominal waits {} (±20 % jitter)", secs(nominal.as_secs_f64())))
    .ratio(span.median() / nominal.as_secs_f64()))
}

/// Writes a set where nginx reads it (before nginx and the agent start).
pub fn place(set: &Set, cert: &Path, key: &Path) -> Result<()> {
    write_file(cert, set.fullchain().as_bytes())?;
    write_file(key, set.key.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
