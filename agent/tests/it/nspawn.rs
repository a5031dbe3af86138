//! The Debian package under real systemd: a Debian root booted in
//! `systemd-nspawn` (see `support::nspawn`), the `.deb` installed into it
//! with `dpkg -i`, Debian's nginx, Apache and HAProxy serving TLS inside
//! with their stock configurations (plus one TLS site each; Apache's plain
//! HTTP port moved off nginx's port 80). One test walks what an operator
//! relies on, in order:
//!
//! 1. install: group, directories, enabled units, socket `root:certctl 0660`,
//!    `dpkg --verify` (the md5sums);
//! 2. socket activation: with the service stopped, `certctl status` starts it;
//! 3. the drop-in `certctl-agent print-dropin` prints for the configuration,
//!    installed as `targets.conf`, then `systemctl reload` re-reading the
//!    configuration (same PID, new targets);
//! 4. `certctl deploy` to nginx, Apache and HAProxy by a member of group
//!    `certctl` succeeds, verified, and each serves the new certificate:
//!    each kind's validate and reload commands (`nginx -t`, `nginx -s
//!    reload`, `apachectl configtest`, `apachectl graceful`, `haproxy -c`,
//!    `systemctl reload haproxy`) ran inside the hardened sandbox with only
//!    the printed drop-in; the first certificate of a stopped Apache goes in
//!    with `--no-reload`, and Apache starts on it; a non-member is refused;
//! 5. the journal holds TARGET, DEPLOY_ID, STAGE, OUTCOME, CERT_SHA256,
//!    NOT_AFTER;
//! 6. `kill -9` of the agent: systemd restarts it and it serves again;
//! 7. a hung main loop (failpoint): the watchdog fires and systemd restarts it;
//! 8. upgrade (reinstall), remove (state kept), purge (the agent's state
//!    gone, a target directory under `/var/lib/certctl` kept).
//!
//! The package is the one `packaging/build-deb.sh --features failpoints`
//! builds (or `CERTCTL_TEST_DEB`, set by `scripts/test.sh`), so the test
//! exercises the shipped units, maintainer scripts and sandbox. Timings of
//! the rootfs (cold or cached), the copy and the boot are printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::nspawn::{self, Machine};
use crate::support::process::run_bounded;
use crate::support::{ALLOW_MISSING_SERVERS, agent_bin, pki};

const WAIT: Duration = Duration::from_secs(60);

/// A line on the test process's stderr (not captured by libtest).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The `.deb` to install: `CERTCTL_TEST_DEB`, else built now with the
/// failpoints feature into `<target>/debian/e2e/`.
pub fn package() -> PathBuf {
    if let Some(p) = std::env::var_os("CERTCTL_TEST_DEB") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CERTCTL_TEST_DEB={} does not exist",
            p.display()
        );
        return p;
    }
    let profile_dir = agent_bin().parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out_dir = target_dir.join("debian/e2e");
    let mut cmd = Command::new(repo.join("packaging/build-deb.sh"));
    cmd.args(["--features", "failpoints", "--output"])
        .arg(&out_dir)
        .env("CARGO_TARGET_DIR", target_dir);
    let started = Instant::now();
    let out = run_bounded(&mut cmd, Duration::from_secs(1800));
    assert_eq!(
        out.code, 0,
        "packaging/build-deb.sh failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    say(&format!(
        "nspawn e2e: built the package in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    PathBuf::from(out.stdout.trim())
}

/// An nginx site serving `web.test` on the container's loopback:443.
const SITE: &str = "server {
    listen 127.0.0.1:443 ssl;
    server_name web.test;
    ssl_certificate /etc/nginx/tls/web.crt;
    ssl_certificate_key /etc/nginx/tls/web.key;
    return 200 \"ok\\n\";
}
";

/// Apache's ports: its stock `Listen 80` would take nginx's port.
const APACHE_PORTS: &str = "Listen 127.0.0.1:8080\nListen 127.0.0.1:8443\n";

/// An Apache site serving `site.test` on 127.0.0.1:8443 (mod_ssl is enabled
/// after the boot: the stock configuration has it off).
const APACHE_SITE: &str = "<IfModule ssl_module>
<VirtualHost 127.0.0.1:8443>
    ServerName site.test
    SSLEngine on
    SSLCertificateFile /etc/apache2/tls/site.crt
    SSLCertificateKeyFile /etc/apache2/tls/site.key
</VirtualHost>
</IfModule>
";

/// Appended to Debian's stock haproxy.cfg: a TLS frontend on 127.0.0.1:9443.
const HAPROXY_FRONTEND: &str = "
frontend certctl-test
\tbind 127.0.0.1:9443 ssl crt /etc/haproxy/certs/lb.pem
\thttp-request return status 200 content-type text/plain string ok
";

/// The agent configuration the test installs in step 3.
const CONFIG: &str = r#"[agent]
deploy_groups = ["certctl"]

[[target]]
name      = "web"
kind      = "nginx"
cert_path = "/etc/nginx/tls/web.crt"
key_path  = "/etc/nginx/tls/web.key"

[target.verify]
endpoint    = "127.0.0.1:443"
server_name = "web.test"
attempts    = 5
backoff     = "200ms"

[[target]]
name      = "site"
kind      = "apache"
cert_path = "/etc/apache2/tls/site.crt"
key_path  = "/etc/apache2/tls/site.key"

[target.verify]
endpoint    = "127.0.0.1:8443"
server_name = "site.test"
attempts    = 5
backoff     = "200ms"

[[target]]
name     = "lb"
kind     = "haproxy"
pem_path = "/etc/haproxy/certs/lb.pem"

[target.verify]
endpoint    = "127.0.0.1:9443"
server_name = "lb.test"
attempts    = 5
backoff     = "200ms"
"#;

/// The served leaf's SHA-256 (lowercase hex), read with openssl inside.
fn served_sha256(m: &Machine) -> String {
    served_sha256_at(m, 443, "web.test")
}

/// The leaf served on 127.0.0.1:`port` for `sni`, as [`served_sha256`].
fn served_sha256_at(m: &Machine, port: u16, sni: &str) -> String {
    let out = m.ok(&format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {sni} </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    ));
    out.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .replace(':', "")
        .to_lowercase()
}

/// Waits (bounded) until nginx serves `want` three probes in a row: right
/// after a reload an old worker can still answer with the previous
/// certificate. Panics with what was served last.
fn assert_serves(m: &Machine, want: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    let mut in_a_row = 0;
    loop {
        let served = served_sha256(m);
        if served == want {
            in_a_row += 1;
            if in_a_row == 3 {
                return;
            }
            continue;
        }
        in_a_row = 0;
        assert!(
            Instant::now() < deadline,
            "{what}: nginx serves {served}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `systemctl show -p PROP --value certctl-agent.service`.
fn prop(m: &Machine, name: &str) -> String {
    m.ok(&format!(
        "systemctl show -p {name} --value certctl-agent.service"
    ))
    .trim()
    .to_owned()
}

/// Waits until the agent runs again as a new process after a restart
/// counted by systemd; returns the new PID.
fn wait_restarted(m: &Machine, old_pid: &str, old_restarts: u32, why: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let pid = prop(m, "MainPID");
        let restarts: u32 = prop(m, "NRestarts").parse().unwrap_or(0);
        let state = prop(m, "ActiveState");
        if pid != "0" && pid != old_pid && restarts > old_restarts && state == "active" {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: no restart (MainPID {pid}, NRestarts {restarts}, {state})\n{}",
            m.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_package_runs_hardened_under_real_systemd() {
    if let Some(why) = nspawn::unavailable() {
        if std::env::var(ALLOW_MISSING_SERVERS).as_deref() == Ok("1") || why.contains("root") {
            say(&format!(
                "SKIPPED the_package_runs_hardened_under_real_systemd: {why}"
            ));
            return;
        }
        panic!("the end-to-end systemd test cannot run: {why}; or set {ALLOW_MISSING_SERVERS}=1");
    }
    let deb = package();
    let (template, built) = nspawn::rootfs();
    match built {
        Some(took) => say(&format!(
            "nspawn e2e: debootstrap of {} (cold) took {:.1}s, cached in {}",
            nspawn::SUITE,
            took.as_secs_f64(),
            nspawn::cache_dir().display()
        )),
        None => say(&format!(
            "nspawn e2e: rootfs cached in {}",
            nspawn::cache_dir().display()
        )),
    }
    let test_started = Instant::now();

    let first = pki::issue_cert(&["web.test"]);
    let second = pki::issue_cert(&["web.test"]);
    let site = [
        pki::issue_cert(&["site.test"]),
        pki::issue_cert(&["site.test"]),
    ];
    let lb = [pki::issue_cert(&["lb.test"]), pki::issue_cert(&["lb.test"])];
    let (m, copied, booted) = Machine::boot(&template, |root| {
        std::fs::copy(&deb, root.join("root/certctl.deb")).unwrap();
        std::fs::create_dir_all(root.join("etc/nginx/tls")).unwrap();
        std::fs::write(
            root.join("etc/nginx/tls/web.crt"),
            first.cert_pem.clone() + &first.chain_pem,
        )
        .unwrap();
        std::fs::write(root.join("etc/nginx/tls/web.key"), &first.key_pem).unwrap();
        std::fs::write(root.join("etc/nginx/sites-enabled/certctl-test"), SITE).unwrap();
        // Apache and HAProxy, stock but for one TLS site each.
        std::fs::write(root.join("etc/apache2/ports.conf"), APACHE_PORTS).unwrap();
        std::fs::create_dir_all(root.join("etc/apache2/tls")).unwrap();
        std::fs::write(
            root.join("etc/apache2/tls/site.crt"),
            site[0].cert_pem.clone() + &site[0].chain_pem,
        )
        .unwrap();
        std::fs::write(root.join("etc/apache2/tls/site.key"), &site[0].key_pem).unwrap();
        std::fs::write(
            root.join("etc/apache2/sites-enabled/certctl-test.conf"),
            APACHE_SITE,
        )
        .unwrap();
        std::fs::create_dir_all(root.join("etc/haproxy/certs")).unwrap();
        std::fs::write(
            root.join("etc/haproxy/certs/lb.pem"),
            format!("{}{}{}", lb[0].cert_pem, lb[0].chain_pem, lb[0].key_pem),
        )
        .unwrap();
        let mut cfg = std::fs::read_to_string(root.join("etc/haproxy/haproxy.cfg")).unwrap();
        cfg.push_str(HAPROXY_FRONTEND);
        std::fs::write(root.join("etc/haproxy/haproxy.cfg"), cfg).unwrap();
        // The new certificate, readable by the deploying user.
        std::fs::create_dir_all(root.join("srv/input")).unwrap();
        for (name, leaf) in [
            ("web", &second),
            ("site", &site[1]),
            ("lb", &lb[1]),
            ("site-first", &site[0]),
        ] {
            std::fs::write(
                root.join(format!("srv/input/{name}.pem")),
                format!("{}{}{}", leaf.key_pem, leaf.cert_pem, leaf.chain_pem),
            )
            .unwrap();
        }
    });
    say(&format!(
        "nspawn e2e: copied the rootfs in {:.1}s, booted to \"running\" in {:.1}s",
        copied.as_secs_f64(),
        booted.as_secs_f64()
    ));
    assert_serves(
        &m,
        &leaf_sha256(&first),
        "nginx serves the first certificate",
    );

    m.ok("a2enmod -q ssl && systemctl restart apache2");
    for (port, sni, leaf) in [(8443, "site.test", &site[0]), (9443, "lb.test", &lb[0])] {
        assert_eq!(
            served_sha256_at(&m, port, sni),
            leaf_sha256(leaf),
            "{sni} before any deploy"
        );
    }

    // 1. Install.
    m.ok("dpkg -i /root/certctl.deb");
    m.ok("dpkg --verify certctl");
    m.ok("getent group certctl");
    assert_eq!(
        m.ok("systemctl is-enabled certctl-agent.socket certctl-agent.service")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["enabled", "enabled"]
    );
    m.ok("systemctl is-active certctl-agent.socket");
    assert_eq!(
        m.ok("stat -c '%U:%G %a' /run/certctl/agent.sock").trim(),
        "root:certctl 660"
    );
    assert_eq!(
        m.ok("stat -c '%U:%G %a' /var/lib/certctl/drop /var/lib/certctl/state")
            .lines()
            .collect::<Vec<_>>(),
        ["root:certctl 770", "root:root 700"]
    );
    assert!(
        prop(&m, "WatchdogUSec").starts_with("30s"),
        "{}",
        prop(&m, "WatchdogUSec")
    );

    // 2. Socket activation: the first call starts the stopped service.
    m.ok("systemctl stop certctl-agent.service");
    assert_eq!(
        m.sh("systemctl is-active certctl-agent.service")
            .stdout
            .trim(),
        "inactive"
    );
    m.ok("systemctl is-active certctl-agent.socket");
    let status = m.ok("certctl status");
    assert!(status.contains("0 target(s)"), "{status}");
    assert_eq!(prop(&m, "ActiveState"), "active");
    assert!(
        prop(&m, "StatusText").starts_with("idle, 0 targets"),
        "{}",
        prop(&m, "StatusText")
    );

    // 3. The drop-in print-dropin prints for the new configuration, applied
    //    by a restart; then the configuration itself, applied by
    //    `systemctl reload`.
    std::fs::write(m.root().join("root/agent.toml"), CONFIG).unwrap();
    let dropin = m.ok("mkdir -p /etc/systemd/system/certctl-agent.service.d \
         && certctl-agent print-dropin --config /root/agent.toml \
            > /etc/systemd/system/certctl-agent.service.d/targets.conf \
         && cat /etc/systemd/system/certctl-agent.service.d/targets.conf");
    say(&format!("nspawn e2e: print-dropin:\n{dropin}"));
    for line in [
        "ReadWritePaths=/etc/nginx/tls",
        "ReadWritePaths=/etc/apache2/tls",
        "ReadWritePaths=/etc/haproxy/certs",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ] {
        assert!(dropin.lines().any(|l| l == line), "no {line} in:\n{dropin}");
    }
    let verify = m.sh("systemd-analyze verify certctl-agent.service");
    assert!(
        !verify.stderr.contains("targets.conf"),
        "systemd-analyze verify:\n{}",
        verify.stderr
    );
    m.ok("systemctl daemon-reload && systemctl restart certctl-agent.service");
    let pid = prop(&m, "MainPID");
    m.ok("cp /root/agent.toml /etc/certctl/agent.toml");
    m.ok("systemctl reload certctl-agent.service");
    m.until_ok(
        "systemctl reload re-reads the configuration",
        WAIT,
        "certctl targets | grep -q '^web '",
    );
    assert_eq!(prop(&m, "MainPID"), pid, "a reload is not a restart");
    m.until_ok(
        "the status line counts the new targets",
        WAIT,
        "systemctl show -p StatusText --value certctl-agent.service | grep -q '^idle, 3 target'",
    );

    // 4. A member of group certctl deploys; nginx serves the new certificate.
    m.ok("useradd --groups certctl alice && useradd bob");
    let out = m.sh("setpriv --reuid=alice --regid=alice --init-groups certctl deploy web --cert /srv/input/web.pem");
    assert_eq!(
        out.code,
        0,
        "deploy as alice:\n{}\n{}\n{}",
        out.stdout,
        out.stderr,
        m.diagnostics()
    );
    assert!(out.stdout.contains("verified"), "{}", out.stdout);
    assert_serves(
        &m,
        &leaf_sha256(&second),
        "nginx serves the deployed certificate",
    );
    for (target, port, sni, leaf) in [
        ("site", 8443, "site.test", &site[1]),
        ("lb", 9443, "lb.test", &lb[1]),
    ] {
        let out = m.sh(&format!(
            "setpriv --reuid=alice --regid=alice --init-groups certctl deploy {target} --cert /srv/input/{target}.pem"
        ));
        assert_eq!(
            out.code,
            0,
            "deploy {target} as alice:\n{}\n{}\n{}",
            out.stdout,
            out.stderr,
            m.diagnostics()
        );
        assert!(out.stdout.contains("verified"), "{}", out.stdout);
        assert_eq!(
            served_sha256_at(&m, port, sni),
            leaf_sha256(leaf),
            "{target} serves the deployed certificate"
        );
    }
    // The first certificate of a server that is not running (docs/kinds.md,
    // "Bootstrap"): --no-reload writes and validates under the sandbox,
    // the server is started, then verified.
    m.ok("systemctl stop apache2");
    let out = m.sh(
        "setpriv --reuid=alice --regid=alice --init-groups certctl deploy site \
         --cert /srv/input/site-first.pem --no-reload",
    );
    assert_eq!(
        out.code, 0,
        "deploy --no-reload to a stopped apache:\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(out.stdout.contains("unverified"), "{}", out.stdout);
    m.ok("systemctl start apache2");
    m.until_ok(
        "certctl verify after starting apache",
        WAIT,
        "certctl verify site",
    );
    assert_eq!(
        served_sha256_at(&m, 8443, "site.test"),
        leaf_sha256(&site[0]),
        "apache started on the bootstrapped certificate"
    );

    let out = m.sh("setpriv --reuid=bob --regid=bob --init-groups certctl status");
    assert_eq!(
        out.code, 7,
        "a non-member is refused:\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(out.stderr.contains("permission denied"), "{}", out.stderr);

    // 5. The journal has the deploy's fields.
    let journal = m.ok("journalctl -u certctl-agent.service -o json --no-pager");
    let entries: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let field = |e: &serde_json::Value, f: &str| e[f].as_str().unwrap_or_default().to_owned();
    let committed = entries
        .iter()
        .find(|e| field(e, "TARGET") == "web" && field(e, "STAGE") == "committed")
        .unwrap_or_else(|| panic!("no STAGE=committed entry for TARGET=web in:\n{journal}"));
    assert!(!field(committed, "DEPLOY_ID").is_empty(), "{committed}");
    let done = entries
        .iter()
        .find(|e| field(e, "TARGET") == "web" && field(e, "OUTCOME") == "deployed")
        .unwrap_or_else(|| panic!("no OUTCOME=deployed entry for TARGET=web in:\n{journal}"));
    assert_eq!(field(done, "CERT_SHA256"), leaf_sha256(&second), "{done}");
    assert_eq!(field(done, "DEPLOY_ID"), field(committed, "DEPLOY_ID"));
    assert!(field(done, "NOT_AFTER").ends_with('Z'), "{done}");
    assert_eq!(field(done, "SYSLOG_IDENTIFIER"), "certctl-agent");

    // 6. kill -9: systemd restarts the agent, which serves again.
    let (pid, restarts) = (
        prop(&m, "MainPID"),
        prop(&m, "NRestarts").parse().unwrap_or(0),
    );
    m.ok(&format!("kill -9 {pid}"));
    let pid = wait_restarted(&m, &pid, restarts, "after kill -9");
    m.until_ok("the restarted agent serves", WAIT, "certctl status");
    say(&format!("nspawn e2e: restarted after kill -9 as pid {pid}"));

    // 7. A hung main loop: the watchdog (2s here) fires and systemd restarts it.
    m.ok(
        "printf '[Service]\\nWatchdogSec=2s\\nTimeoutAbortSec=5s\\nEnvironment=CERTCTL_TEST_HANG_WATCHDOG=/run/certctl/hang\\n' \
         > /etc/systemd/system/certctl-agent.service.d/watchdog-test.conf && systemctl daemon-reload \
         && systemctl restart certctl-agent.service",
    );
    let (pid, restarts) = (
        prop(&m, "MainPID"),
        prop(&m, "NRestarts").parse().unwrap_or(0),
    );
    m.ok("touch /run/certctl/hang");
    wait_restarted(&m, &pid, restarts, "after the main loop hung");
    let log = m.ok("journalctl -u certctl-agent.service --no-pager -o cat");
    assert!(
        log.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{log}"
    );
    assert!(
        log.contains("failpoint CERTCTL_TEST_HANG_WATCHDOG"),
        "{log}"
    );
    m.until_ok(
        "the agent serves after the watchdog restart",
        WAIT,
        "certctl status",
    );
    m.ok("rm /etc/systemd/system/certctl-agent.service.d/watchdog-test.conf && systemctl daemon-reload");

    let analyze = m.sh("systemd-analyze security --no-pager certctl-agent.service | tail -n 1");
    say(&format!(
        "nspawn e2e: inside the container: {}",
        analyze.stdout.trim()
    ));

    // 8. Upgrade (same version again), remove, purge.
    m.ok("dpkg -i /root/certctl.deb");
    m.ok("systemctl is-active certctl-agent.socket certctl-agent.service");
    m.until_ok("the agent serves after an upgrade", WAIT, "certctl status");
    assert_serves(&m, &leaf_sha256(&second), "after an upgrade");
    m.ok("dpkg --remove certctl");
    assert_ne!(
        m.sh("systemctl is-active certctl-agent.service")
            .stdout
            .trim(),
        "active"
    );
    m.ok("test -d /var/lib/certctl/state && test -f /etc/certctl/agent.toml");
    // A target directory under /var/lib/certctl (as the caddy example of
    // docs/kinds.md has) is the operator's: purge keeps it.
    m.ok("mkdir -p /var/lib/certctl/caddy && cp /etc/nginx/tls/web.crt /var/lib/certctl/caddy/api.crt");
    m.ok("dpkg --purge certctl");
    m.ok(
        "test ! -e /var/lib/certctl/state && test ! -e /var/lib/certctl/drop \
         && test ! -e /etc/certctl/agent.toml && getent group certctl \
         && test -s /var/lib/certctl/caddy/api.crt",
    );
    assert_serves(
        &m,
        &leaf_sha256(&second),
        "targets are the operator's, untouched",
    );

    say(&format!(
        "nspawn e2e: steps inside the container took {:.1}s",
        test_started.elapsed().as_secs_f64()
    ));
    drop(m);
}

/// SHA-256 of a test leaf's DER, lowercase hex.
fn leaf_sha256(leaf: &pki::Leaf) -> String {
    pki::sha256_hex(&leaf.der)
}
