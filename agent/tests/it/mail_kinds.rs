//! Kinds `postfix` and `dovecot` against the real servers (the support
//! servers of `mail.rs`): without `chain_path` the certificate file gets the
//! leaf followed by the chain, and a `[target.verify]` table with only an
//! endpoint is verified with the protocol the kind infers (SMTP STARTTLS
//! for postfix; IMAP STARTTLS on a dovecot port that is not 993, 995 or
//! 110). A plain TLS probe on those ports cannot succeed, so "verified" is
//! the proof. A broken server configuration fails `postfix check` /
//! `doveconf -n` (exit 4) and the previous leaf stays served.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::dovecot::{Dovecot, dovecot_available};
use crate::support::kinds::{assert_validate_failed, assert_verified, deploy, verify_table};
use crate::support::mailtls::{MailProtocol, probe, wait_until_served};
use crate::support::pki::{self, Leaf};
use crate::support::postfix::{Postfix, postfix_available};
use crate::support::{TestEnv, toml_array, toml_path};

const SNI: &str = "mx.mail.test";

#[track_caller]
fn assert_served(port: u16, proto: MailProtocol, leaf: &Leaf, log: &dyn Fn() -> String) {
    if let Err(e) = wait_until_served(port, SNI, proto, &leaf.sha256_hex, Duration::from_secs(10)) {
        panic!("{e}\nserver log:\n{}", log());
    }
}

/// `<env>/targets/<name>/mail.{crt,key}` holding `leaf` (fullchain 0644, key 0600).
fn live_files(env: &TestEnv, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let dir = env.target_dir(name);
    let (cert, key) = (dir.join("mail.crt"), dir.join("mail.key"));
    pki::write_mode(&cert, &leaf.fullchain_pem(), 0o644);
    pki::write_mode(&key, &leaf.key_pem, 0o600);
    (cert, key)
}

/// A target of `kind` on these files with the server's commands and an
/// endpoint-only verify table.
fn mail_target(
    kind: &str,
    cert: &Path,
    key: &Path,
    validate: &[String],
    reload: &[String],
    endpoint: &str,
) -> String {
    format!(
        "kind = \"{kind}\"\ncert_path = {}\nkey_path = {}\nvalidate = {}\nreload = {}\n{}",
        toml_path(cert),
        toml_path(key),
        toml_array(validate),
        toml_array(reload),
        verify_table(endpoint, SNI),
    )
}

/// Writes `text` to a Postfix config file dated a minute back (Postfix
/// programs wait for a younger `main.cf` to "cool down").
fn write_postfix_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .unwrap();
}

#[test]
fn postfix_kind_appends_the_chain_and_verifies_over_smtp_starttls() {
    if !postfix_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (cert, key) = live_files(&env, "mx", &a);
    let pf = Postfix::start(&env.path().join("postfix"), &cert, &key);
    env.target(
        "mx",
        &mail_target(
            "postfix",
            &cert,
            &key,
            &pf.validate_argv(),
            &pf.reload_argv(),
            &pf.endpoint(),
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", pf.log(), agent.log());

    let b = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, "mx", &b, "b"), &b, &log);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_served(pf.port(), MailProtocol::Smtp, &b, &log);
    assert_eq!(
        probe(pf.port(), SNI, MailProtocol::Smtp).unwrap(),
        b.served_der()
    );

    let main_cf = pf.config_dir().join("main.cf");
    let good = std::fs::read_to_string(&main_cf).unwrap();
    write_postfix_config(&main_cf, &format!("{good}certctl no such line\n"));
    let c = pki::issue_cert(&[SNI]);
    let out = deploy(&env, "mx", &c, "c");
    assert_validate_failed(&out, &log);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), b.key_pem);
    // New smtpd processes read main.cf: serve again with the good one.
    write_postfix_config(&main_cf, &good);
    assert_served(pf.port(), MailProtocol::Smtp, &b, &log);
}

#[test]
fn dovecot_kind_verifies_over_imap_starttls_and_refuses_a_broken_config() {
    if !dovecot_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (cert, key) = live_files(&env, "imap", &a);
    let dc = Dovecot::start(&env.path().join("dovecot"), &cert, &key);
    let endpoint = dc.endpoint(MailProtocol::Imap);
    env.target(
        "imap",
        &mail_target(
            "dovecot",
            &cert,
            &key,
            &dc.validate_argv(),
            &dc.reload_argv(),
            &endpoint,
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", dc.log(), agent.log());

    let b = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, "imap", &b, "b"), &b, &log);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_served(dc.imap_port(), MailProtocol::Imap, &b, &log);
    assert_served(dc.imaps_port(), MailProtocol::Tls, &b, &log);
    assert_eq!(
        probe(dc.imap_port(), SNI, MailProtocol::Imap).unwrap(),
        b.served_der()
    );

    let mut text = std::fs::read_to_string(dc.conf_path()).unwrap();
    text.push_str("certctl_no_such_setting = yes\n");
    std::fs::write(dc.conf_path(), text).unwrap();
    let c = pki::issue_cert(&[SNI]);
    let out = deploy(&env, "imap", &c, "c");
    assert_validate_failed(&out, &log);
    assert!(out.stdout.contains("certctl_no_such_setting"), "{out}");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_served(dc.imap_port(), MailProtocol::Imap, &b, &log);
}
