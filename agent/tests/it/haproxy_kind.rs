//! Kind `haproxy` against a real HAProxy, through both of its control
//! sockets: a master CLI `reload` (confirmed by `show proc`) and the runtime
//! API (`set ssl cert` + `commit`, no reload at all), each verified by the
//! agent's probe and by ours. A broken configuration fails `haproxy -c`
//! (the validate command the kind builds from `haproxy_config`) and changes
//! nothing; `certctl rollback` through the runtime API pushes the previous
//! PEM back. The default `systemctl reload haproxy` cannot run without
//! systemd as PID 1; its argv is checked by the config unit tests.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::assert::done;
use crate::support::haproxy::{Haproxy, haproxy_available};
use crate::support::kinds::{assert_validate_failed, assert_verified, deploy, verify_table};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls, toml_path};

const SNI: &str = "lb.haproxy.test";
const TARGET: &str = "lb";

/// What the kind writes: leaf, chain, key.
fn combined(leaf: &Leaf) -> String {
    format!("{}{}", leaf.fullchain_pem(), leaf.key_pem)
}

#[track_caller]
fn assert_served(hap: &Haproxy, leaf: &Leaf) {
    if let Err(e) =
        tls::wait_until_served(hap.port(), SNI, &leaf.sha256_hex, Duration::from_secs(10))
    {
        panic!("{e}\nhaproxy log:\n{}", hap.log());
    }
}

/// A running haproxy on `<env>/targets/lb/site.pem` holding `leaf`.
fn start(env: &TestEnv, leaf: &Leaf) -> (Haproxy, PathBuf) {
    let pem = env.target_dir(TARGET).join("site.pem");
    pki::write_mode(&pem, &combined(leaf), 0o600);
    let hap = Haproxy::start(&env.path().join("haproxy"), &pem);
    assert_served(&hap, leaf);
    (hap, pem)
}

fn target(env: &mut TestEnv, hap: &Haproxy, pem: &Path, socket_key: &str, socket: &Path) {
    env.target(
        TARGET,
        &format!(
            "kind = \"haproxy\"\npem_path = {}\nhaproxy_config = {}\n{socket_key} = {}\n{}",
            toml_path(pem),
            toml_path(&hap.cfg_path()),
            toml_path(socket),
            verify_table(&hap.endpoint(), SNI),
        ),
    );
}

#[test]
fn haproxy_master_cli_reload_is_verified_and_a_broken_config_changes_nothing() {
    if !haproxy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (hap, pem) = start(&env, &a);
    target(&mut env, &hap, &pem, "master_socket", &hap.master_socket());
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", hap.log(), agent.log());
    let (reloads, workers) = hap.reloads_and_workers();

    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    let lines = assert_verified(&out, &b, &log);
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap()
            .contains("haproxy master reloaded"),
        "{out}"
    );
    assert_served(&hap, &b);
    assert_eq!(tls::served_chain(hap.port(), SNI), b.served_der());
    let (reloads_after, workers_after) = hap.reloads_and_workers();
    assert_eq!(reloads_after, reloads + 1, "{}", hap.show_proc());
    assert_ne!(workers_after, workers, "{}", hap.show_proc());
    assert_eq!(std::fs::read_to_string(&pem).unwrap(), combined(&b));
    assert_eq!(std::fs::metadata(&pem).unwrap().mode() & 0o777, 0o600);

    hap.break_config();
    let c = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &c, "c");
    assert_validate_failed(&out, &log);
    assert!(out.stdout.contains("certctl-no-such-keyword"), "{out}");
    assert_eq!(std::fs::read_to_string(&pem).unwrap(), combined(&b));
    assert_eq!(hap.reloads_and_workers().0, reloads + 1);
    assert_served(&hap, &b);
}

#[test]
fn haproxy_runtime_api_replaces_the_certificate_without_a_reload() {
    if !haproxy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (hap, pem) = start(&env, &a);
    target(&mut env, &hap, &pem, "admin_socket", &hap.admin_socket());
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", hap.log(), agent.log());
    let before = hap.reloads_and_workers();
    let listed = env.ctl(&["--json", "targets"]).json();
    let hook = listed["targets"][0]["reload_hook"]
        .as_str()
        .unwrap_or_default();
    assert!(hook.starts_with("haproxy runtime API on "), "{listed}");

    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    let lines = assert_verified(&out, &b, &log);
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"].as_str().unwrap().contains("no reload"),
        "{out}"
    );
    assert_served(&hap, &b);
    assert_eq!(tls::served_chain(hap.port(), SNI), b.served_der());
    // Same workers, no reload: the certificate changed in memory, and the
    // file on disk holds the same PEM for the next start.
    assert_eq!(hap.reloads_and_workers(), before, "{}", hap.show_proc());
    assert_eq!(std::fs::read_to_string(&pem).unwrap(), combined(&b));

    let c = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, TARGET, &c, "c"), &c, &log);
    assert_served(&hap, &c);

    // Rollback: the previous file back on disk, then set/commit of it.
    let out = env.ctl(&["--json", "rollback", TARGET]);
    assert_eq!(out.code, 0, "{out}\n{}", log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "restored", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_served(&hap, &b);
    assert_eq!(std::fs::read_to_string(&pem).unwrap(), combined(&b));
    assert_eq!(hap.reloads_and_workers(), before, "{}", hap.show_proc());
}
