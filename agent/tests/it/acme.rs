//! The ACME recipes of `docs/acme.md`, run as written: the scripts under
//! `examples/acme/` (which the page embeds verbatim, checked here too) with
//! the real certbot, lego, dehydrated and uacme from Debian, against
//! pebble (`support::acme`) on loopback, handing the certificate to the
//! real agent through its drop directory, and a real nginx serving it.
//! Each test issues a first certificate, then renews it, and checks that
//! nginx serves each one.
//!
//! The scripts' production defaults (Let's Encrypt, `/etc/letsencrypt`,
//! port 80, `/var/lib/certctl/drop`, ...) are replaced through the
//! environment variables they document. Each client is told to trust
//! pebble's CA the way it supports: `REQUESTS_CA_BUNDLE` (certbot),
//! `LEGO_CA_CERTIFICATES` (lego), `CURL_CA_BUNDLE` (dehydrated's curl);
//! uacme's libcurl only reads the system bundle, so uacme runs in a private
//! mount namespace with pebble's CA mounted over it (root only; without
//! root that test says it skipped). A missing client, pebble or nginx fails
//! unless `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::nginx::{SNI, TARGET, start_site};
use crate::support::acme::Pebble;
use crate::support::nginx::nginx_available;
use crate::support::process::run_bounded;
use crate::support::{AgentProc, TestEnv, find_program, free_port, pki, server_missing, tls};

const DOMAIN: &str = "web.test";
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn script(name: &str) -> PathBuf {
    repo().join("examples/acme").join(name)
}

/// The agent with an nginx target `web` serving a test certificate, pebble,
/// and the client's program; `None` when a program is missing and that is
/// allowed.
struct Rig {
    env: TestEnv,
    site: crate::nginx::Site,
    _agent: AgentProc,
    pebble: Pebble,
}

fn rig(client: &str) -> Option<Rig> {
    for program in [client, "pebble"] {
        if find_program(program, &[&format!("/usr/bin/{program}")]).is_none() {
            assert!(server_missing(program));
            return None;
        }
    }
    if !nginx_available() {
        assert!(server_missing("nginx"));
        return None;
    }
    let pebble_bin = find_program("pebble", &["/usr/bin/pebble"]).unwrap();
    let mut env = TestEnv::new();
    let site = start_site(&env, &pki::issue_cert(&[SNI]));
    env.nginx_target(TARGET, &site.nginx, SNI, None);
    env.write_config();
    let agent = env.spawn_agent();
    let pebble = Pebble::start(&env.path().join("pebble"), &pebble_bin);
    Some(Rig {
        env,
        site,
        _agent: agent,
        pebble,
    })
}

impl Rig {
    /// A command with the variables every recipe reads set for this rig.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DOMAIN", DOMAIN)
            .env("ACME_SERVER", self.pebble.directory())
            .env("ACME_EMAIL", "hostmaster@web.test")
            .env("HTTP_ADDRESS", "127.0.0.1")
            .env("HTTP_PORT", free_port().to_string())
            .env("CERTCTL_DROP_DIR", self.env.drop_dir())
            .env("CERTCTL_DROP_NAME", TARGET);
        cmd
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.env.path().join(name)
    }

    /// Runs `cmd`, which must exit 0.
    fn run(&self, what: &str, cmd: &mut Command) {
        let out = run_bounded(cmd, RUN_TIMEOUT);
        assert_eq!(
            out.code,
            0,
            "{what} failed:\n{}\n{}\npebble:\n{}",
            out.stdout,
            out.stderr,
            self.pebble.log()
        );
    }

    /// nginx serves the leaf in `cert_file` (the first certificate in it),
    /// put there by the agent from the drop; returns its SHA-256.
    fn assert_serves(&self, cert_file: &Path) -> String {
        let der = CertificateDer::from_pem_file(cert_file)
            .unwrap_or_else(|e| panic!("{}: {e}", cert_file.display()));
        let sha = pki::sha256_hex(&der);
        if let Err(e) = tls::wait_until_served(self.site.nginx.port(), SNI, &sha, SERVE_TIMEOUT) {
            panic!(
                "nginx does not serve the certificate the ACME client got: {e}\n\
                 drop dir: {:?}\nagent log:\n{}",
                std::fs::read_dir(self.env.drop_dir()).map(|d| d
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect::<Vec<_>>()),
                std::fs::read_to_string(self.env.agent_log_path()).unwrap_or_default()
            );
        }
        // The drop was taken and removed.
        crate::support::wait_until(SERVE_TIMEOUT, "the drop is removed", || {
            !self.env.drop_dir().join(format!("{TARGET}.pem")).exists()
        });
        sha
    }
}

#[test]
fn certbot_first_certificate_and_renewal_reach_nginx() {
    let Some(r) = rig("certbot") else { return };
    let (config, work, logs) = (r.dir("le/etc"), r.dir("le/work"), r.dir("le/logs"));
    let certbot_env = |cmd: &mut Command| {
        cmd.env("REQUESTS_CA_BUNDLE", r.pebble.ca_file())
            .env("CERTBOT_CONFIG_DIR", &config)
            .env("CERTBOT_WORK_DIR", &work)
            .env("CERTBOT_LOGS_DIR", &logs);
    };
    let mut first = r.command("sh");
    first.arg(script("certbot.sh"));
    certbot_env(&mut first);
    r.run("certbot.sh", &mut first);
    let live = config.join("live").join(DOMAIN).join("cert.pem");
    let first_sha = r.assert_serves(&live);
    assert!(
        config.join("renewal-hooks/deploy/certctl").is_file(),
        "the hook is installed for renewals"
    );

    // What certbot's timer runs, made immediate: the hook runs from
    // renewal-hooks/deploy/ (and the remembered --deploy-hook, once).
    let mut renew = r.command("certbot");
    renew.args(["renew", "--force-renewal", "--no-random-sleep-on-renew"]);
    renew
        .arg("--config-dir")
        .arg(&config)
        .arg("--work-dir")
        .arg(&work)
        .arg("--logs-dir")
        .arg(&logs);
    certbot_env(&mut renew);
    r.run("certbot renew", &mut renew);
    let renewed_sha = r.assert_serves(&live);
    assert_ne!(first_sha, renewed_sha, "renewal issued a new certificate");
}

#[test]
fn lego_first_certificate_and_renewal_reach_nginx() {
    let Some(r) = rig("lego") else { return };
    let lego = |days: &str| {
        let mut cmd = r.command("sh");
        cmd.arg(script("lego.sh"))
            .env("LEGO_CA_CERTIFICATES", r.pebble.ca_file())
            .env("LEGO_PATH", r.dir("lego"))
            .env("RENEW_DAYS", days)
            .env("NO_RANDOM_SLEEP", "1");
        cmd
    };
    r.run("lego.sh (first)", &mut lego("30"));
    let cert = r.dir("lego/certificates").join(format!("{DOMAIN}.crt"));
    let first_sha = r.assert_serves(&cert);
    // Pebble's certificates are valid for 5 years: "renew when 10 years are
    // left" renews now.
    r.run("lego.sh (renewal)", &mut lego("3650"));
    let renewed_sha = r.assert_serves(&cert);
    assert_ne!(first_sha, renewed_sha, "renewal issued a new certificate");
}

#[test]
fn dehydrated_first_certificate_and_renewal_reach_nginx() {
    let Some(r) = rig("dehydrated") else { return };
    let dehydrated = |days: &str| {
        let mut cmd = r.command("sh");
        cmd.arg(script("dehydrated.sh"))
            .env("CURL_CA_BUNDLE", r.pebble.ca_file())
            .env("DEHYDRATED_DIR", r.dir("dehydrated"))
            .env("WELLKNOWN", r.dir("webroot/.well-known/acme-challenge"))
            .env("RENEW_DAYS", days);
        cmd
    };
    r.run("dehydrated.sh (first)", &mut dehydrated("30"));
    let cert = r.dir("dehydrated/certs").join(DOMAIN).join("cert.pem");
    let first_sha = r.assert_serves(&cert);
    r.run("dehydrated.sh (renewal)", &mut dehydrated("3650"));
    let renewed_sha = r.assert_serves(&cert);
    assert_ne!(first_sha, renewed_sha, "renewal issued a new certificate");
}

#[test]
fn uacme_first_certificate_and_renewal_reach_nginx() {
    if !nix::unistd::geteuid().is_root() {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED uacme_first_certificate_and_renewal_reach_nginx: trusting pebble's CA needs a mount namespace (root)\n",
        );
        return;
    }
    let Some(r) = rig("uacme") else { return };
    let system_bundle = "/etc/ssl/certs/ca-certificates.crt";
    let uacme = |days: &str| {
        let mut cmd = r.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && shift 2 && exec sh "$@""#)
            .arg("sh")
            .arg(r.pebble.ca_file())
            .arg(system_bundle)
            .arg(script("uacme.sh"))
            .env("UACME_DIR", r.dir("uacme"))
            .env(
                "UACME_CHALLENGE_PATH",
                r.dir("webroot/.well-known/acme-challenge"),
            )
            .env("RENEW_DAYS", days);
        cmd
    };
    r.run("uacme.sh (first)", &mut uacme("30"));
    let cert = r.dir("uacme").join(DOMAIN).join("cert.pem");
    let first_sha = r.assert_serves(&cert);
    // Not due: uacme exits 1, the script 0, and nothing is dropped.
    r.run("uacme.sh (not due)", &mut uacme("30"));
    assert!(!r.env.drop_dir().join(format!("{TARGET}.pem")).exists());
    r.run("uacme.sh (renewal)", &mut uacme("3650"));
    let renewed_sha = r.assert_serves(&cert);
    assert_ne!(first_sha, renewed_sha, "renewal issued a new certificate");
}

#[test]
fn the_acme_page_embeds_every_recipe_verbatim() {
    let page = std::fs::read_to_string(repo().join("docs/acme.md")).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(repo().join("examples/acme"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let text = std::fs::read_to_string(script(&name)).unwrap();
        assert!(
            page.contains(&format!("`examples/acme/{name}`")),
            "docs/acme.md does not name examples/acme/{name}"
        );
        assert!(
            page.contains(&format!("```sh\n{text}```\n")),
            "docs/acme.md does not embed examples/acme/{name} verbatim"
        );
    }
    let drop = std::fs::read_to_string(repo().join("docs/drop-directory.md")).unwrap();
    assert!(
        drop.contains("(acme.md)"),
        "docs/drop-directory.md links acme.md"
    );
}
