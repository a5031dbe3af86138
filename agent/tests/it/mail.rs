//! The real agent and CLI deploying to a real Postfix (SMTP with STARTTLS) and
//! a real Dovecot (imaps, IMAP STARTTLS, POP3 STLS): each deploy exits 0,
//! reports `"verification": "verified"` and the server then serves the new
//! leaf, as seen by the tests' own probe ([`crate::support::mailtls`]).
//!
//! The targets are of kind `file` (no `chain_path`, so the certificate file
//! gets the leaf followed by the chain, which both servers read) with the
//! server's own validate and reload commands and a `[target.verify]` table for
//! the protocol under test. Each test deploys twice, so the second deploy
//! replaces a certificate that the agent itself put in place.
//!
//! The first tests check the rig without the agent: a reload of each server
//! makes it serve the swapped files, instances run side by side, and nothing
//! is left running after a drop or a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::assert::{arg, done, stages, temp_files};
use crate::support::dovecot::{Dovecot, dovecot_available, dovecot_pop3_available};
use crate::support::mailtls::{
    MailProtocol, greeting, probe, served_leaf_sha256, wait_until_served,
};
use crate::support::pki::{self, Ca, Leaf};
use crate::support::postfix::{Postfix, postfix_available};
use crate::support::process::{group_members, pid_alive, run_bounded};
use crate::support::{TestEnv, toml_array, toml_path, toml_str};

/// The leaves' DNS name and the SNI the probes and the agent send.
const SNI: &str = "mail.test";
/// The target's name.
const TARGET: &str = "mail";
/// How long a server may take to serve a certificate after a reload.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The live files a server reads: fullchain 0644 and key 0600, as an operator would write them.
struct Live {
    cert: PathBuf,
    key: PathBuf,
}

impl Live {
    /// Writes `leaf` as `<dir>/live.crt` (leaf + chain) and `<dir>/live.key`.
    fn write(dir: &std::path::Path, leaf: &Leaf) -> Live {
        std::fs::create_dir_all(dir).unwrap();
        let live = Live {
            cert: dir.join("live.crt"),
            key: dir.join("live.key"),
        };
        live.replace(leaf);
        live
    }

    /// Overwrites the files with `leaf`.
    fn replace(&self, leaf: &Leaf) {
        pki::write_mode(&self.cert, &leaf.fullchain_pem(), 0o644);
        pki::write_mode(&self.key, &leaf.key_pem, 0o600);
    }
}

/// A leaf for [`SNI`] under an intermediate, so the served chain has two certificates.
fn issue() -> Leaf {
    pki::issue_cert(&[SNI])
}

/// `port` serves `leaf` after the `proto` dialogue (three probes in a row, bounded), or the test fails with `log`.
#[track_caller]
fn assert_served(port: u16, proto: MailProtocol, leaf: &Leaf, log: impl Fn() -> String) {
    if let Err(e) = wait_until_served(port, SNI, proto, &leaf.sha256_hex, SERVE_TIMEOUT) {
        panic!("{e}\nserver log:\n{}", log());
    }
}

fn run_ok(argv: &[String]) {
    let out = run_bounded(
        Command::new(&argv[0]).args(&argv[1..]),
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "{argv:?}: {out:?}");
}

// === the rig: servers and probe ===

#[test]
fn postfix_reload_serves_the_swapped_certificate() {
    if !postfix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (issue(), issue());
    let live = Live::write(&dir.path().join("tls"), &a);
    let pf = Postfix::start(&dir.path().join("postfix"), &live.cert, &live.key);
    let log = || pf.log();

    assert_eq!(
        served_leaf_sha256(pf.port(), SNI, MailProtocol::Smtp),
        Ok(a.sha256_hex.clone()),
        "{}",
        log()
    );
    let chain = probe(pf.port(), SNI, MailProtocol::Smtp).unwrap();
    assert_eq!(chain, a.served_der(), "postfix serves leaf + intermediate");
    run_ok(&pf.validate_argv());

    // No "still A before the reload" check: an idle smtpd keeps A, but the
    // master may just as well start a fresh smtpd (which reads B) for a probe.
    live.replace(&b);
    pf.reload();
    assert_served(pf.port(), MailProtocol::Smtp, &b, log);
    assert_eq!(
        probe(pf.port(), SNI, MailProtocol::Smtp).unwrap(),
        b.served_der()
    );
    // The banner is this instance's.
    let banner = greeting(pf.port(), MailProtocol::Smtp).unwrap();
    assert!(banner.contains(pf.myhostname()), "{banner}");
}

#[test]
fn dovecot_reload_serves_the_swapped_certificate() {
    if !dovecot_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (issue(), issue());
    let live = Live::write(&dir.path().join("tls"), &a);
    let dc = Dovecot::start(&dir.path().join("dovecot"), &live.cert, &live.key);
    let log = || dc.log();
    let mut protos = vec![MailProtocol::Tls, MailProtocol::Imap];
    if dc.pop3_port().is_some() {
        protos.push(MailProtocol::Pop3);
    }

    for proto in &protos {
        let port = dc.port_for(*proto);
        let chain =
            probe(port, SNI, *proto).unwrap_or_else(|e| panic!("{proto:?}: {e}\n{}", log()));
        assert_eq!(chain, a.served_der(), "{proto:?}");
    }
    run_ok(&dc.validate_argv());

    // Dovecot's config process holds the certificate it read: new files change
    // nothing until the reload.
    live.replace(&b);
    for proto in &protos {
        assert_eq!(
            served_leaf_sha256(dc.port_for(*proto), SNI, *proto),
            Ok(a.sha256_hex.clone()),
            "{proto:?} before the reload"
        );
    }
    dc.reload();
    for proto in &protos {
        assert_served(dc.port_for(*proto), *proto, &b, log);
    }
}

#[test]
fn mail_server_instances_run_side_by_side() {
    if !postfix_available() || !dovecot_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let leaves: Vec<Leaf> = (0..2).map(|_| issue()).collect();
    let lives: Vec<Live> = leaves
        .iter()
        .enumerate()
        .map(|(i, l)| Live::write(&dir.path().join(format!("tls{i}")), l))
        .collect();
    // Started concurrently, as parallel tests do.
    let (postfixes, dovecots) = thread::scope(|s| {
        let pf: Vec<_> = lives
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let d = dir.path().join(format!("postfix{i}"));
                s.spawn(move || Postfix::start(&d, &l.cert, &l.key))
            })
            .collect();
        let dc: Vec<_> = lives
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let d = dir.path().join(format!("dovecot{i}"));
                s.spawn(move || Dovecot::start(&d, &l.cert, &l.key))
            })
            .collect();
        (
            pf.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            dc.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });

    let mut ports = vec![];
    for (i, (pf, dc)) in postfixes.iter().zip(&dovecots).enumerate() {
        assert_eq!(
            served_leaf_sha256(pf.port(), SNI, MailProtocol::Smtp),
            Ok(leaves[i].sha256_hex.clone())
        );
        assert_eq!(
            served_leaf_sha256(dc.imaps_port(), SNI, MailProtocol::Tls),
            Ok(leaves[i].sha256_hex.clone())
        );
        ports.extend([pf.port(), dc.imaps_port(), dc.imap_port()]);
        ports.extend(dc.pop3_port());
    }
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "ports collide: {ports:?}");
    assert_ne!(postfixes[0].master_pid(), postfixes[1].master_pid());
    assert_ne!(postfixes[0].myhostname(), postfixes[1].myhostname());
    assert_ne!(dovecots[0].greeting_token(), dovecots[1].greeting_token());

    // Reloading one instance leaves the other alone.
    lives[0].replace(&leaves[1]);
    postfixes[0].reload();
    dovecots[0].reload();
    assert_served(postfixes[0].port(), MailProtocol::Smtp, &leaves[1], || {
        postfixes[0].log()
    });
    assert_served(
        dovecots[0].imaps_port(),
        MailProtocol::Tls,
        &leaves[1],
        || dovecots[0].log(),
    );
    assert_eq!(
        served_leaf_sha256(dovecots[1].imaps_port(), SNI, MailProtocol::Tls),
        Ok(leaves[1].sha256_hex.clone())
    );
}

#[test]
fn mail_server_processes_are_gone_after_drop_and_after_panic() {
    if !postfix_available() || !dovecot_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let leaf = Ca::root("R").leaf(&[SNI]).issue();
    let live = Live::write(&dir.path().join("tls"), &leaf);

    // Postfix's master leads its own process group: its smtpd, qmgr, ... are there.
    let start_postfix = |name: &str| {
        let pf = Postfix::start(&dir.path().join(name), &live.cert, &live.key);
        let pids = wait_for_group(pf.master_pid(), 3);
        (pf, pids)
    };
    let start_dovecot = |name: &str| {
        let dc = Dovecot::start(&dir.path().join(name), &live.cert, &live.key);
        let pids = wait_for_group(dc.pid(), 3);
        (dc, pids)
    };

    let (pf, pf_pids) = start_postfix("pf1");
    let (dc, dc_pids) = start_dovecot("dc1");
    drop(pf);
    drop(dc);
    for pid in pf_pids.iter().chain(&dc_pids) {
        assert!(!pid_alive(*pid), "pid {pid} still running after drop");
    }

    let seen = Mutex::new(Vec::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let (_pf, pids) = start_postfix("pf2");
        seen.lock().unwrap().extend(pids);
        let (_dc, pids) = start_dovecot("dc2");
        seen.lock().unwrap().extend(pids);
        panic!("deliberate panic with postfix and dovecot running");
    }));
    assert!(result.is_err());
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() >= 6, "{seen:?}");
    for pid in &seen {
        assert!(!pid_alive(*pid), "pid {pid} still running after panic");
    }
}

/// The live members of process group `pgid` once there are at least `n` (bounded).
fn wait_for_group(pgid: u32, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let members: Vec<u32> = group_members(pgid)
            .into_iter()
            .filter(|p| pid_alive(*p))
            .collect();
        if members.len() >= n || Instant::now() >= deadline {
            assert!(members.len() >= n, "group {pgid}: {members:?}");
            return members;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// === deploys through the agent ===

/// One server endpoint under test and how to reach and drive it.
struct MailTarget<'a> {
    port: u16,
    proto: MailProtocol,
    validate: Vec<String>,
    reload: Vec<String>,
    log: &'a dyn Fn() -> String,
}

/// Adds the `kind = "file"` target for `live` with `t`'s commands and a
/// `[target.verify]` for its port and protocol, starts the agent, deploys two
/// new certificates in turn and checks each: exit 0, `deployed`, the files,
/// the served leaf, and last `"verification": "verified"`.
fn deploy_twice_and_verify(env: &mut TestEnv, live: &Live, t: &MailTarget<'_>) {
    let body = format!(
        "kind = \"file\"\n\
         cert_path = {cert}\n\
         key_path = {key}\n\
         validate = {validate}\n\
         reload = {reload}\n\
         command_timeout = \"30s\"\n\
         [target.verify]\n\
         endpoint = {endpoint}\n\
         protocol = {protocol}\n\
         server_name = {sni}\n\
         attempts = 6\n\
         backoff = \"200ms\"\n\
         max_backoff = \"2s\"\n\
         timeout = \"5s\"\n",
        cert = toml_path(&live.cert),
        key = toml_path(&live.key),
        validate = toml_array(&t.validate),
        reload = toml_array(&t.reload),
        endpoint = toml_str(format!("127.0.0.1:{}", t.port)),
        protocol = toml_str(t.proto.verify_protocol()),
        sni = toml_str(SNI),
    );
    env.target(TARGET, &body);
    let agent = env.spawn_agent();

    for stem in ["first", "second"] {
        let leaf = issue();
        let f = env.inputs(&leaf, stem);
        let out = env.ctl(&[
            "--json",
            "deploy",
            TARGET,
            "--cert",
            arg(&f.fullchain),
            "--key",
            arg(&f.key),
        ]);
        let context = || format!("{stem} deploy\n{out}\nagent log:\n{}", agent.log());
        assert_eq!(out.code, 0, "{}", context());
        let lines = out.json_lines();
        let st = stages(&lines);
        for stage in ["validate-command", "committed", "reloaded"] {
            assert!(st.contains(&stage), "no {stage}: {}", context());
        }
        let result = done(&lines);
        assert_eq!(result["outcome"], "deployed", "{}", context());
        assert_eq!(
            result["cert_sha256"],
            leaf.sha256_hex.as_str(),
            "{}",
            context()
        );
        assert_eq!(
            std::fs::read_to_string(&live.cert).unwrap(),
            leaf.fullchain_pem()
        );
        assert_eq!(std::fs::read_to_string(&live.key).unwrap(), leaf.key_pem);
        assert!(temp_files(live.cert.parent().unwrap()).is_empty());
        assert_served(t.port, t.proto, &leaf, t.log);
        assert_eq!(
            probe(t.port, SNI, t.proto).unwrap(),
            leaf.served_der(),
            "served chain after the {stem} deploy"
        );
        // The agent's own probe of the endpoint saw the new leaf.
        assert_eq!(result["verification"], "verified", "{}", context());
    }
}

#[test]
fn deploy_to_postfix_smtp_starttls_is_verified() {
    if !postfix_available() {
        return;
    }
    let mut env = TestEnv::new();
    let live = Live::write(&env.target_dir(TARGET), &issue());
    let pf = Postfix::start(&env.path().join("postfix"), &live.cert, &live.key);
    let log = || pf.log();
    deploy_twice_and_verify(
        &mut env,
        &live,
        &MailTarget {
            port: pf.port(),
            proto: MailProtocol::Smtp,
            validate: pf.validate_argv(),
            reload: pf.reload_argv(),
            log: &log,
        },
    );
}

/// [`deploy_twice_and_verify`] against a fresh Dovecot on its `proto` port.
fn deploy_to_dovecot(proto: MailProtocol) {
    let mut env = TestEnv::new();
    let live = Live::write(&env.target_dir(TARGET), &issue());
    let dc = Dovecot::start(&env.path().join("dovecot"), &live.cert, &live.key);
    let log = || dc.log();
    deploy_twice_and_verify(
        &mut env,
        &live,
        &MailTarget {
            port: dc.port_for(proto),
            proto,
            validate: dc.validate_argv(),
            reload: dc.reload_argv(),
            log: &log,
        },
    );
}

#[test]
fn deploy_to_dovecot_imaps_is_verified() {
    if !dovecot_available() {
        return;
    }
    deploy_to_dovecot(MailProtocol::Tls);
}

#[test]
fn deploy_to_dovecot_imap_starttls_is_verified() {
    if !dovecot_available() {
        return;
    }
    deploy_to_dovecot(MailProtocol::Imap);
}

#[test]
fn deploy_to_dovecot_pop3_stls_is_verified() {
    if !dovecot_available() || !dovecot_pop3_available() {
        return;
    }
    deploy_to_dovecot(MailProtocol::Pop3);
}

// === several endpoints of one mail server ===

/// Adds a `kind = "file"` target for `live` whose `[target.verify]` lists
/// `endpoints` (port, protocol), each with its own protocol, deploys a new
/// certificate and checks that it is verified only with every endpoint's
/// check passing, each on its own protocol, and served on every port.
fn deploy_verified_on_every_port(
    env: &mut TestEnv,
    live: &Live,
    validate: &[String],
    reload: &[String],
    endpoints: &[(u16, MailProtocol)],
    log: &dyn Fn() -> String,
) {
    let list: Vec<String> = endpoints
        .iter()
        .map(|(port, proto)| {
            format!(
                "{{ address = {}, protocol = {} }}",
                toml_str(format!("127.0.0.1:{port}")),
                toml_str(proto.verify_protocol())
            )
        })
        .collect();
    let body = format!(
        "kind = \"file\"\n\
         cert_path = {cert}\n\
         key_path = {key}\n\
         validate = {validate}\n\
         reload = {reload}\n\
         command_timeout = \"30s\"\n\
         [target.verify]\n\
         endpoints = [{list}]\n\
         server_name = {sni}\n\
         attempts = 6\n\
         backoff = \"200ms\"\n\
         max_backoff = \"2s\"\n\
         timeout = \"5s\"\n",
        cert = toml_path(&live.cert),
        key = toml_path(&live.key),
        validate = toml_array(validate),
        reload = toml_array(reload),
        list = list.join(", "),
        sni = toml_str(SNI),
    );
    env.target(TARGET, &body);
    let agent = env.spawn_agent();
    let leaf = issue();
    let f = env.inputs(&leaf, "new");
    let out = env.ctl(&[
        "--json",
        "deploy",
        TARGET,
        "--cert",
        arg(&f.fullchain),
        "--key",
        arg(&f.key),
    ]);
    let context = || format!("{out}\nagent log:\n{}\nserver log:\n{}", agent.log(), log());
    assert_eq!(out.code, 0, "{}", context());
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{}", context());
    assert_eq!(result["verification"], "verified", "{}", context());
    let checks = result["served_endpoints"].as_array().unwrap();
    assert_eq!(checks.len(), endpoints.len(), "{}", context());
    for ((port, proto), c) in endpoints.iter().zip(checks) {
        assert_eq!(c["endpoint"], format!("127.0.0.1:{port}"), "{}", context());
        assert_eq!(c["protocol"], proto.verify_protocol(), "{}", context());
        assert_eq!(c["state"], "verified", "{}", context());
        assert_eq!(
            c["served_sha256"],
            leaf.sha256_hex.as_str(),
            "{}",
            context()
        );
        // The agent's series at this endpoint was complete.
        let series: Vec<_> = lines
            .iter()
            .filter_map(|l| l.get("attempt"))
            .filter(|a| a["endpoint"] == format!("127.0.0.1:{port}") && a["ok"] == true)
            .collect();
        assert!(
            series
                .last()
                .is_some_and(|a| a["matches"] == a["consecutive"]),
            "{}",
            context()
        );
        assert_served(*port, *proto, &leaf, log);
    }
    // certctl verify applies the same rule to both ports.
    let v = env.ctl(&["--json", "verify", TARGET]);
    assert_eq!(v.code, 0, "{v}\n{}", context());
    assert_eq!(
        v.json()["checks"].as_array().unwrap().len(),
        endpoints.len()
    );
}

#[test]
fn postfix_is_verified_on_its_starttls_and_its_implicit_tls_port() {
    if !postfix_available() {
        return;
    }
    let mut env = TestEnv::new();
    let live = Live::write(&env.target_dir(TARGET), &issue());
    let pf = Postfix::start(&env.path().join("postfix"), &live.cert, &live.key);
    let log = || pf.log();
    deploy_verified_on_every_port(
        &mut env,
        &live,
        &pf.validate_argv(),
        &pf.reload_argv(),
        &[
            (pf.port(), MailProtocol::Smtp),
            (pf.smtps_port(), MailProtocol::Tls),
        ],
        &log,
    );
}

#[test]
fn dovecot_is_verified_on_its_imaps_and_its_imap_starttls_port() {
    if !dovecot_available() {
        return;
    }
    let mut env = TestEnv::new();
    let live = Live::write(&env.target_dir(TARGET), &issue());
    let dc = Dovecot::start(&env.path().join("dovecot"), &live.cert, &live.key);
    let log = || dc.log();
    deploy_verified_on_every_port(
        &mut env,
        &live,
        &dc.validate_argv(),
        &dc.reload_argv(),
        &[
            (dc.imaps_port(), MailProtocol::Tls),
            (dc.imap_port(), MailProtocol::Imap),
        ],
        &log,
    );
}
