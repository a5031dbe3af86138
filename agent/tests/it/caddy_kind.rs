//! Kind `caddy` against a real Caddy, in both modes: file mode (`caddy
//! validate`, then `caddy reload --force`, built from `caddy_config` and
//! `caddy_address`) and admin-API mode (`admin_url`: the certificate loaded
//! as a `load_pem` entry, over a Unix socket and over TCP, into a JSON
//! config that selects it by its tag). Each deploy is
//! verified by the agent's probe and by ours; a broken Caddyfile fails the
//! validate command and changes nothing; `certctl rollback` in admin-API
//! mode loads the previous certificate again.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::assert::done;
use crate::support::caddy::{Admin, Caddy, caddy_available};
use crate::support::kinds::{assert_validate_failed, assert_verified, deploy, verify_table};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls, toml_path, toml_str};

const SNI: &str = "site.caddy.test";

#[track_caller]
fn assert_served(caddy: &Caddy, leaf: &Leaf) {
    if let Err(e) =
        tls::wait_until_served(caddy.port(), SNI, &leaf.sha256_hex, Duration::from_secs(10))
    {
        panic!("{e}\ncaddy log:\n{}", caddy.log());
    }
}

/// `<env>/targets/<name>/site.{crt,key}` holding `leaf`.
fn live_files(env: &TestEnv, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let dir = env.target_dir(name);
    let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
    pki::write_mode(&cert, &leaf.fullchain_pem(), 0o644);
    pki::write_mode(&key, &leaf.key_pem, 0o600);
    (cert, key)
}

#[test]
fn caddy_file_mode_reloads_with_force_and_refuses_a_broken_caddyfile() {
    if !caddy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (cert, key) = live_files(&env, "files", &a);
    let caddy = Caddy::start_file(&env.path().join("caddy"), Admin::Tcp, SNI, &cert, &key);
    assert_served(&caddy, &a);
    // Caddy holds A; the first deploy creates the files with the kind's modes.
    std::fs::remove_file(&cert).unwrap();
    std::fs::remove_file(&key).unwrap();
    env.target(
        "files",
        &format!(
            "kind = \"caddy\"\ncert_path = {}\nkey_path = {}\ncaddy_config = {}\ncaddy_address = {}\n{}",
            toml_path(&cert),
            toml_path(&key),
            toml_path(caddy.config_path()),
            toml_str(caddy.admin_address()),
            verify_table(&caddy.endpoint(), SNI),
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", caddy.log(), agent.log());

    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, "files", &b, "b");
    let lines = assert_verified(&out, &b, &log);
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap()
            .contains("reload --force"),
        "{out}"
    );
    assert_served(&caddy, &b);
    assert_eq!(tls::served_chain(caddy.port(), SNI), b.served_der());
    let key_meta = std::fs::metadata(&key).unwrap();
    assert_eq!(key_meta.mode() & 0o777, 0o640, "{out}");
    if nix::unistd::geteuid().is_root()
        && let Ok(Some(g)) = nix::unistd::Group::from_name("caddy")
    {
        assert_eq!(
            (key_meta.uid(), key_meta.gid()),
            (0, g.gid.as_raw()),
            "{out}"
        );
    }

    caddy.break_config();
    let c = pki::issue_cert(&[SNI]);
    let out = deploy(&env, "files", &c, "c");
    assert_validate_failed(&out, &log);
    assert!(out.stdout.contains("certctl_no_such_directive"), "{out}");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), b.key_pem);
    assert_served(&caddy, &b);
}

#[test]
fn caddy_admin_api_over_a_unix_socket_loads_and_rolls_back_the_certificate() {
    if !caddy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let dir = env.target_dir("api");
    let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
    // The JSON config serves what is loaded with the tag certctl-api: nothing yet.
    let caddy = Caddy::start_api(&env.path().join("caddy"), Admin::Unix, "certctl-api");
    env.target(
        "api",
        &format!(
            "kind = \"caddy\"\ncert_path = {}\nkey_path = {}\nadmin_url = {}\n{}",
            toml_path(&cert),
            toml_path(&key),
            toml_str(caddy.admin_address()),
            verify_table(&caddy.endpoint(), SNI),
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", caddy.log(), agent.log());

    // The TLS app does not exist yet: it is created with the entry.
    let a = pki::issue_cert(&[SNI]);
    let out = deploy(&env, "api", &a, "a");
    let lines = assert_verified(&out, &a, &log);
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap()
            .contains("caddy admin API"),
        "{out}"
    );
    assert_served(&caddy, &a);
    assert_eq!(tls::served_chain(caddy.port(), SNI), a.served_der());
    let (status, body) = caddy.admin_get("/id/certctl-api");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"tags\":[\"certctl-api\"]"), "{body}");

    // The entry exists now: it is replaced.
    let b = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, "api", &b, "b"), &b, &log);
    assert_served(&caddy, &b);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    let (_, body) = caddy.admin_get("/config/apps/tls/certificates/load_pem");
    assert_eq!(body.matches("certctl-api").count(), 2, "one entry: {body}");

    let out = env.ctl(&["--json", "rollback", "api"]);
    assert_eq!(out.code, 0, "{out}\n{}", log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "restored", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_served(&caddy, &a);
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), a.fullchain_pem());
}

#[test]
fn caddy_admin_api_over_tcp_loads_the_certificate() {
    if !caddy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let dir = env.target_dir("tcp");
    let (cert, key) = (dir.join("site.crt"), dir.join("site.key"));
    let caddy = Caddy::start_api(&env.path().join("caddy"), Admin::Tcp, "certctl-tcp");
    env.target(
        "tcp",
        &format!(
            "kind = \"caddy\"\ncert_path = {}\nkey_path = {}\nadmin_url = {}\n{}",
            toml_path(&cert),
            toml_path(&key),
            toml_str(format!("http://{}", caddy.admin_address())),
            verify_table(&caddy.endpoint(), SNI),
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("{}\nagent:\n{}", caddy.log(), agent.log());

    let a = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, "tcp", &a, "a"), &a, &log);
    assert_served(&caddy, &a);
    let b = pki::issue_cert(&[SNI]);
    assert_verified(&deploy(&env, "tcp", &b, "b"), &b, &log);
    assert_served(&caddy, &b);
    let (status, _) = caddy.admin_get("/id/certctl-tcp");
    assert_eq!(status, 200);
}
