//! The real agent and CLI deploying to a real nginx: the new certificate is
//! served, bad input and a broken `nginx -t` change nothing, a failed reload is
//! rolled back and reloaded, identical material is not reloaded, and the
//! per-call group check refuses a reader.
//!
//! Each test has its own [`TestEnv`] and its own nginx on a loopback port. The
//! targets here carry no `[target.verify]` table (see `verify.rs` for that);
//! the tests probe nginx themselves.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::assert::{arg, done, snapshot, stages, temp_files};
use crate::support::nginx::{Nginx, nginx_available};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls};

/// The vhost's server name and the SNI the probes send.
pub const SNI: &str = "web.test";
/// The target's name.
pub const TARGET: &str = "web";
/// How long nginx may take to serve a deployed certificate.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running nginx serving `leaf` from the live files of target `web`.
pub struct Site {
    pub nginx: Nginx,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `leaf` as the live files (fullchain 0644, key 0600, as an operator
/// would) under `<root>/targets/web` and starts nginx on them.
pub fn start_site(env: &TestEnv, leaf: &Leaf) -> Site {
    let dir = env.target_dir(TARGET);
    let cert = dir.join("web.crt");
    let key = dir.join("web.key");
    pki::write_mode(&cert, &leaf.fullchain_pem(), 0o644);
    pki::write_mode(&key, &leaf.key_pem, 0o600);
    let nginx = Nginx::start(&env.path().join("nginx"), SNI, &cert, &key);
    assert_served(&nginx, leaf);
    Site { nginx, cert, key }
}

/// A reload argv that appends a line to the returned file, then runs nginx's
/// real reload: the file counts the reloads.
fn counting_reload(env: &TestEnv, site: &Site) -> (PathBuf, Vec<String>) {
    let reloads = env.path().join("reloads");
    let script = format!("echo reload >> {}; exec \"$@\"", sh_quote(&reloads));
    (reloads, sh_wrapper(site, &script))
}

/// `sh -c SCRIPT sh NGINX-RELOAD-ARGV...`: `SCRIPT` runs the real reload with `exec "$@"`.
fn sh_wrapper(site: &Site, script: &str) -> Vec<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "sh".to_owned(),
    ];
    argv.extend(site.nginx.reload_argv());
    argv
}

/// A shell single-quoted word (the temp paths have no quote, but be safe).
fn sh_quote(p: &Path) -> String {
    format!(
        "'{}'",
        p.to_str().expect("utf-8 path").replace('\'', r"'\''")
    )
}

/// nginx serves `leaf` (three probes in a row, bounded), or the test fails
/// with nginx's logs.
#[track_caller]
pub fn assert_served(nginx: &Nginx, leaf: &Leaf) {
    if let Err(e) = tls::wait_until_served(nginx.port(), SNI, &leaf.sha256_hex, SERVE_TIMEOUT) {
        panic!("{e}\nnginx logs:\n{}", nginx.error_log());
    }
}

fn group_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[test]
fn deploy_to_nginx_serves_the_new_certificate() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    env.nginx_target(TARGET, &site.nginx, SNI, None);
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&[
        "--json",
        "deploy",
        TARGET,
        "--cert",
        arg(&f.fullchain),
        "--key",
        arg(&f.key),
    ]);
    out.assert_code(0);
    let lines = out.json_lines();
    let st = stages(&lines);
    assert!(st.contains(&"validate-command"), "{out}");
    assert!(st.contains(&"reloaded"), "{out}");
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["cert_sha256"], b.sha256_hex.as_str(), "{out}");
    assert_eq!(result["verification"], "unverified", "{out}");

    assert_eq!(
        std::fs::read_to_string(&site.cert).unwrap(),
        b.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(&site.key).unwrap(), b.key_pem);
    assert_served(&site.nginx, &b);
    assert!(temp_files(&env.target_dir(TARGET)).is_empty());

    // Owner and mode: the files being replaced decide (docs/configuration.md,
    // "Owners and modes"), so the operator's 0600 root key stays 0600 root.
    let planned = lines
        .iter()
        .find(|l| l["stage"] == "planned")
        .expect("planned event");
    let key_plan = planned["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["role"] == "key")
        .expect("key in the plan");
    assert_eq!(key_plan["mode"], "0600", "{out}");
    assert_eq!(key_plan["mode_source"], "existing", "{out}");
    let key_meta = std::fs::metadata(&site.key).unwrap();
    assert_eq!(key_meta.mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&site.cert).unwrap().mode() & 0o777, 0o644);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((key_meta.uid(), key_meta.gid()), (0, 0));
    }
}

#[test]
fn a_first_deploy_creates_the_files_with_the_nginx_defaults() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    // nginx holds A in memory; the files are gone, so the deploy creates them.
    std::fs::remove_file(&site.cert).unwrap();
    std::fs::remove_file(&site.key).unwrap();
    env.nginx_target(TARGET, &site.nginx, SNI, None);
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&["--json", "deploy", TARGET, "--cert", arg(&f.bundle)]);
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["outcome"], "deployed", "{out}");
    assert_served(&site.nginx, &b);

    let key_meta = std::fs::metadata(&site.key).unwrap();
    let cert_meta = std::fs::metadata(&site.cert).unwrap();
    assert_eq!(key_meta.mode() & 0o777, 0o640, "{out}");
    assert_eq!(cert_meta.mode() & 0o777, 0o644, "{out}");
    // The kind's owner and group apply only when the agent runs as root.
    if nix::unistd::geteuid().is_root() {
        let group = group_gid("www-data").or_else(|| group_gid("nginx"));
        if let Some(gid) = group {
            assert_eq!((key_meta.uid(), key_meta.gid()), (0, gid), "{out}");
            assert_eq!((cert_meta.uid(), cert_meta.gid()), (0, gid), "{out}");
        }
    }
}

#[test]
fn mismatched_key_is_rejected_and_nothing_changes() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    let (reloads, wrapper) = counting_reload(&env, &site);
    env.nginx_target(TARGET, &site.nginx, SNI, Some(&wrapper));
    let _agent = env.spawn_agent();
    let before = snapshot(&env.target_dir(TARGET));

    let b = pki::issue_cert(&[SNI]);
    let c = pki::issue_cert(&[SNI]);
    let fb = env.inputs(&b, "b");
    let fc = env.inputs(&c, "c");
    let out = env.ctl(&[
        "--json",
        "deploy",
        TARGET,
        "--cert",
        arg(&fb.fullchain),
        "--key",
        arg(&fc.key),
    ]);
    out.assert_code(3);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "rejected", "{out}");
    assert!(
        !stages(&lines)
            .iter()
            .any(|s| ["locked", "staged", "committed", "reloaded"].contains(s)),
        "{out}"
    );
    assert_eq!(snapshot(&env.target_dir(TARGET)), before);
    assert!(!reloads.exists(), "nginx was reloaded for rejected input");
    assert_served(&site.nginx, &a);
}

#[test]
fn nginx_t_failure_restores_the_old_files() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    let (reloads, wrapper) = counting_reload(&env, &site);
    env.nginx_target(TARGET, &site.nginx, SNI, Some(&wrapper));
    let _agent = env.spawn_agent();

    // Break the config on disk; the running nginx keeps the one it loaded.
    let conf = site.nginx.conf_path();
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("this_is_not_a_directive;\n");
    std::fs::write(&conf, text).unwrap();
    let before = snapshot(&env.target_dir(TARGET));

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&["deploy", TARGET, "--cert", arg(&f.bundle)]);
    out.assert_code(4);
    let validate = site.nginx.validate_argv();
    assert!(out.stderr.contains("validate command"), "{out}");
    assert!(out.stderr.contains(&validate[0]), "{out}");
    assert!(out.stderr.contains("-t"), "{out}");
    assert!(
        out.stderr
            .contains("unknown directive \"this_is_not_a_directive\""),
        "{out}"
    );
    assert!(out.stderr.contains("not reloaded"), "{out}");

    assert_eq!(
        std::fs::read_to_string(&site.cert).unwrap(),
        a.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(&site.key).unwrap(), a.key_pem);
    assert_eq!(snapshot(&env.target_dir(TARGET)), before);
    assert_eq!(temp_files(&env.target_dir(TARGET)), Vec::<String>::new());
    assert!(
        !reloads.exists(),
        "nginx was reloaded after a failed nginx -t"
    );
    assert_served(&site.nginx, &a);
}

#[test]
fn failed_reload_rolls_back_to_the_old_certificate() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    let counter = env.path().join("reload-count");
    // Fails on the first call, runs the real `nginx -s reload` after that.
    let script = format!(
        "c={c}; n=$(cat \"$c\" 2>/dev/null || echo 0); echo $((n+1)) > \"$c\"; \
         if [ \"$n\" -eq 0 ]; then echo 'reload refused by the test' >&2; exit 1; fi; \
         exec \"$@\"",
        c = sh_quote(&counter)
    );
    let wrapper = sh_wrapper(&site, &script);
    env.nginx_target(TARGET, &site.nginx, SNI, Some(&wrapper));
    let _agent = env.spawn_agent();
    let before = snapshot(&env.target_dir(TARGET));

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&["--json", "deploy", TARGET, "--cert", arg(&f.bundle)]);
    out.assert_code(5);
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "rolled_back", "{out}");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("reload refused by the test"),
        "{out}"
    );
    let st = stages(&lines);
    assert!(st.contains(&"validate-command"), "{out}");
    assert!(st.contains(&"rollback"), "{out}");

    assert_eq!(
        std::fs::read_to_string(&site.cert).unwrap(),
        a.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(&site.key).unwrap(), a.key_pem);
    assert_eq!(snapshot(&env.target_dir(TARGET)), before);
    assert!(temp_files(&env.target_dir(TARGET)).is_empty());
    // The failed reload, then the real one on the restored files.
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "2");
    assert_served(&site.nginx, &a);
}

#[test]
fn identical_material_twice_is_a_noop_without_reload() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    let (reloads, wrapper) = counting_reload(&env, &site);
    env.nginx_target(TARGET, &site.nginx, SNI, Some(&wrapper));
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let first = env.ctl(&["--json", "deploy", TARGET, "--cert", arg(&f.bundle)]);
    first.assert_code(0);
    assert_eq!(done(&first.json_lines())["outcome"], "deployed", "{first}");
    assert_served(&site.nginx, &b);
    let between = snapshot(&env.target_dir(TARGET));

    // The same material, given as separate files this time.
    let second = env.ctl(&[
        "--json",
        "deploy",
        TARGET,
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
        "--chain",
        arg(&f.chain),
    ]);
    second.assert_code(0);
    let lines = second.json_lines();
    assert_eq!(done(&lines)["outcome"], "unchanged", "{second}");
    let st = stages(&lines);
    for stage in ["staged", "committed", "validate-command", "reloaded"] {
        assert!(!st.contains(&stage), "{stage} in a no-op deploy\n{second}");
    }

    let count = std::fs::read_to_string(&reloads).unwrap();
    assert_eq!(count.lines().count(), 1, "reloads: {count:?}");
    assert_eq!(snapshot(&env.target_dir(TARGET)), between);
    assert_served(&site.nginx, &b);
}

#[test]
fn deploy_as_a_user_outside_the_allowed_groups_exits_7() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = start_site(&env, &a);
    env.nginx_target(TARGET, &site.nginx, SNI, None);
    // Two groups: the socket is 0666, so only the per-call check can refuse.
    env.deploy_groups(&["root"]).read_groups(&["nogroup"]);
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    // Readable by uid 65534, so the refusal is the agent's, not a read error.
    let input = env.path().join("input");
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o755)).unwrap();
    for p in [&f.cert, &f.key, &f.chain, &f.fullchain, &f.bundle] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let before = snapshot(&env.target_dir(TARGET));

    let Some(out) = env.ctl_as(65534, 65534, &["deploy", TARGET, "--cert", arg(&f.bundle)]) else {
        return;
    };
    out.assert_code(7);
    assert!(out.stderr.contains("permission denied"), "{out}");
    assert!(out.stderr.contains("join group root"), "{out}");
    assert_eq!(snapshot(&env.target_dir(TARGET)), before);
    assert_served(&site.nginx, &a);

    // Reading is allowed to nogroup.
    let status = env
        .ctl_as(65534, 65534, &["status"])
        .expect("ran as root above");
    status.assert_code(0);
    let status = env
        .ctl_as(65534, 65534, &["--json", "status", TARGET])
        .expect("ran as root above");
    status.assert_code(0);
    let t = &status.json()["targets"][0];
    assert_eq!(t["cert_sha256"], a.sha256_hex.as_str(), "{status}");
    assert!(t["last"].is_null(), "{status}");
}
