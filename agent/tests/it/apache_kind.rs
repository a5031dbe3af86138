//! Kind `apache` against a real Apache httpd: a first deploy creates the
//! files with the kind's modes and owners and is verified after a graceful
//! restart; a broken configuration fails the validate command (exit 4), the
//! previous files come back and Apache keeps serving the previous leaf.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::support::apache::{Apache, apache_available};
use crate::support::kinds::{assert_validate_failed, assert_verified, deploy, verify_table};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls, toml_array, toml_path};

const SNI: &str = "www.apache.test";
const TARGET: &str = "site";

#[track_caller]
fn assert_served(apache: &Apache, leaf: &Leaf) {
    if let Err(e) = tls::wait_until_served(
        apache.port(),
        SNI,
        &leaf.sha256_hex,
        Duration::from_secs(10),
    ) {
        panic!("{e}\napache log:\n{}", apache.log());
    }
}

#[test]
fn apache_deploys_with_its_defaults_and_refuses_a_broken_config() {
    if !apache_available() {
        return;
    }
    let mut env = TestEnv::new();
    let dir = env.target_dir(TARGET);
    let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
    let a = pki::issue_cert(&[SNI]);
    pki::write_mode(&cert, &a.fullchain_pem(), 0o644);
    pki::write_mode(&key, &a.key_pem, 0o600);
    let apache = Apache::start(&env.path().join("apache"), SNI, &cert, &key);
    assert_served(&apache, &a);
    // Apache holds A; the first deploy creates the files anew.
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();

    // No chain_path and no protocol: the kind's fullchain and TLS probe.
    env.target(
        TARGET,
        &format!(
            "kind = \"apache\"\ncert_path = {}\nkey_path = {}\nvalidate = {}\nreload = {}\n{}",
            toml_path(&cert),
            toml_path(&key),
            toml_array(&apache.validate_argv()),
            toml_array(&apache.reload_argv()),
            verify_table(&apache.endpoint(), SNI),
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", apache.log(), agent.log());

    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    assert_verified(&out, &b, &log);
    assert_served(&apache, &b);
    assert_eq!(tls::served_chain(apache.port(), SNI), b.served_der());
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    let key_meta = std::fs::metadata(&key).unwrap();
    assert_eq!(key_meta.mode() & 0o777, 0o600, "{out}");
    assert_eq!(std::fs::metadata(&cert).unwrap().mode() & 0o777, 0o644);
    if nix::unistd::geteuid().is_root()
        && let Ok(Some(g)) = nix::unistd::Group::from_name("www-data")
    {
        assert_eq!(
            (key_meta.uid(), key_meta.gid()),
            (0, g.gid.as_raw()),
            "{out}"
        );
    }

    apache.break_config();
    let c = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &c, "c");
    assert_validate_failed(&out, &log);
    assert!(out.stdout.contains("CertctlNoSuchDirective"), "{out}");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), b.key_pem);
    assert_served(&apache, &b);
}
