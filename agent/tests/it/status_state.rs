//! `certctl status` answers from what the agent holds in memory (the last
//! run of each target, what is deployed), checked against the files with a
//! `stat`: these tests hold it to what a full read of the disk and the
//! journal says, after files are replaced or rewritten behind the agent's
//! back, and after a deploy, a rollback, an automatic rollback and a
//! recovery.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::support::assert::arg;
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, toml_str};

/// What a full read of `cert.pem` says, in status's words: fingerprint,
/// `notAfter`, `disk_state`.
fn read_disk(cert: &Path) -> (String, i64, String) {
    let Ok(bytes) = std::fs::read(cert) else {
        return (String::new(), 0, "missing".to_owned());
    };
    let Some(der) = x509_parser::pem::Pem::iter_from_buffer(&bytes)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
    else {
        return (String::new(), 0, "unreadable".to_owned());
    };
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    (
        hex::encode(Sha256::digest(&der)),
        x509.validity().not_after.timestamp(),
        "ok".to_owned(),
    )
}

/// Status of `target` next to a full read of its `cert.pem` and the
/// journal's newest finished run; panics naming `when` if they differ.
fn assert_status_is_disk(env: &TestEnv, target: &str, when: &str) -> serde_json::Value {
    let cert = env.target_dir(target).join("cert.pem");
    let out = env.ctl(&["--json", "status", target]);
    out.assert_code(0);
    let t = out.json()["targets"][0].clone();
    let (sha, not_after, state) = read_disk(&cert);
    assert_eq!(t["cert_sha256"], sha.as_str(), "{when}: {t}");
    assert_eq!(t["not_after_unix"], not_after, "{when}: {t}");
    let said = t["disk_state"].as_str().unwrap_or_default();
    assert!(said.starts_with(&state), "{when}: disk says {state}: {t}");
    let history = env.ctl(&["--json", "history", target, "--limit", "10"]);
    history.assert_code(0);
    let newest = history.json()["history"]
        .as_array()
        .and_then(|runs| {
            runs.iter()
                .find(|r| !r["outcome"].is_null() && r["outcome"] != "dry_run")
                .cloned()
        })
        .map(|r| r["deploy_id"].clone());
    assert_eq!(
        newest.unwrap_or_default(),
        t["last"]["deploy_id"],
        "{when}: the last run: {t}\n{history}"
    );
    t
}

fn deploy(env: &TestEnv, target: &str, leaf: &Leaf, stem: &str) -> crate::support::CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&["--json", "deploy", target, "--cert", arg(&f.bundle)])
}

/// Two leaves whose `fullchain.pem` texts have the same length, so one can
/// be written over the other in place without the size changing.
fn same_size_pair() -> (Leaf, Leaf) {
    let a = pki::issue_cert(&["app.test"]);
    for _ in 0..64 {
        let b = pki::issue_cert(&["app.test"]);
        if b.fullchain_pem().len() == a.fullchain_pem().len() {
            return (a, b);
        }
    }
    panic!("no two leaves of the same length in 64 tries");
}

/// Writes `text` into the existing file at `path` (same inode).
fn write_in_place(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn status_notices_files_changed_behind_the_agents_back() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "");
    let _agent = env.spawn_agent();
    let cert = dir.join("cert.pem");
    assert_status_is_disk(&env, "app", "before any deploy");

    let (a, b) = same_size_pair();
    deploy(&env, "app", &a, "a").assert_code(0);
    let t = assert_status_is_disk(&env, "app", "after a deploy");
    assert_eq!(t["cert_sha256"], a.sha256_hex.as_str());
    // Asked again with nothing changed: the same answer.
    assert_status_is_disk(&env, "app", "asked again");

    // Replaced by a rename (a new inode), as another tool would.
    let other = pki::issue_cert(&["app.test"]);
    let tmp = dir.join("elsewhere.tmp");
    std::fs::write(&tmp, other.fullchain_pem()).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    let t = assert_status_is_disk(&env, "app", "replaced by a rename");
    assert_eq!(t["cert_sha256"], other.sha256_hex.as_str());

    // Rewritten in place with a text of the same size, right after status
    // read the previous one (the same inode; only the ctime tells).
    write_in_place(&cert, &a.fullchain_pem());
    let t = assert_status_is_disk(&env, "app", "rewritten in place");
    assert_eq!(t["cert_sha256"], a.sha256_hex.as_str());
    write_in_place(&cert, &b.fullchain_pem());
    let t = assert_status_is_disk(&env, "app", "rewritten in place, same size");
    assert_eq!(t["cert_sha256"], b.sha256_hex.as_str());
    // The same again after the change has aged past the racy window.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_status_is_disk(&env, "app", "rewritten in place, later");
    write_in_place(&cert, &a.fullchain_pem());
    let t = assert_status_is_disk(&env, "app", "rewritten in place, after aging");
    assert_eq!(t["cert_sha256"], a.sha256_hex.as_str());

    // Garbage, then nothing.
    write_in_place(&cert, "not a certificate\n");
    let t = assert_status_is_disk(&env, "app", "garbage");
    assert_eq!(t["cert_sha256"], "");
    std::fs::remove_file(&cert).unwrap();
    let t = assert_status_is_disk(&env, "app", "removed");
    assert_eq!(t["disk_state"], "missing");

    // The metrics read the same state.
    std::fs::write(&cert, other.fullchain_pem()).unwrap();
    assert_status_is_disk(&env, "app", "written again");
    let prom = env.ctl(&["status", "--prometheus"]);
    prom.assert_code(0);
    let (_, not_after, _) = read_disk(&cert);
    let exposed = prom
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("certctl_cert_not_after_seconds{target=\"app\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(exposed, Some(not_after as f64), "{prom}");
}

#[test]
fn status_after_deploys_rollbacks_and_recovery_is_what_the_disk_and_journal_say() {
    let mut env = TestEnv::new();
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // A reload that fails once when `<bin>/fail` exists.
    let reload = bin.join("reload.sh");
    std::fs::write(
        &reload,
        format!(
            "#!/bin/sh\n[ -e '{0}/fail' ] && {{ rm '{0}/fail'; echo refused >&2; exit 1; }}\nexit 0\n",
            bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&reload, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.file_target(
        "app",
        &format!("reload = [{}]\n", toml_str(reload.display().to_string())),
    );
    let mut agent = env.spawn_agent();

    let first = pki::issue_cert(&["app.test"]);
    deploy(&env, "app", &first, "first").assert_code(0);
    assert_status_is_disk(&env, "app", "first deploy");
    let second = pki::issue_cert(&["app.test"]);
    deploy(&env, "app", &second, "second").assert_code(0);
    assert_status_is_disk(&env, "app", "second deploy");
    deploy(&env, "app", &second, "again").assert_code(0);
    assert_status_is_disk(&env, "app", "unchanged");

    env.ctl(&["--json", "rollback", "app"]).assert_code(0);
    let t = assert_status_is_disk(&env, "app", "rollback");
    assert_eq!(t["cert_sha256"], first.sha256_hex.as_str());

    std::fs::write(bin.join("fail"), "").unwrap();
    let third = pki::issue_cert(&["app.test"]);
    let out = deploy(&env, "app", &third, "third");
    assert_ne!(out.code, 0, "{out}");
    let t = assert_status_is_disk(&env, "app", "automatic rollback");
    assert_eq!(t["cert_sha256"], first.sha256_hex.as_str());
    assert_eq!(t["last"]["outcome"], "rolled_back", "{t}");

    // A crash after the commit: the next start finishes the deploy.
    agent.terminate();
    let mut agent = env.spawn_agent_env(&[("CERTCTL_FAILPOINT", "after-commit")]);
    let fourth = pki::issue_cert(&["app.test"]);
    let out = deploy(&env, "app", &fourth, "fourth");
    assert_ne!(out.code, 0, "the deploy cannot finish: {out}");
    agent.wait_exit(std::time::Duration::from_secs(10));
    let mut agent = env.spawn_agent();
    let t = assert_status_is_disk(&env, "app", "recovery");
    assert!(
        t["cert_sha256"] == fourth.sha256_hex.as_str()
            || t["cert_sha256"] == first.sha256_hex.as_str(),
        "{t}"
    );
    // And after a restart with nothing to recover: the same.
    agent.terminate();
    let _agent = env.spawn_agent();
    let again = assert_status_is_disk(&env, "app", "restart");
    assert_eq!(again["cert_sha256"], t["cert_sha256"]);
    assert_eq!(again["last"], t["last"]);
}

/// Both targets' entries of one status call, by name.
fn entries(env: &TestEnv) -> (serde_json::Value, serde_json::Value) {
    let out = env.ctl(&["--json", "status"]);
    out.assert_code(0);
    let doc = out.json();
    let find = |name: &str| {
        doc["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no {name} in {doc}"))
    };
    (find("app"), find("site"))
}

/// Status keeps each target's entry encoded between calls and encodes it
/// again only when something it shows changed (`api::status`). Each
/// source of an entry is changed in turn, right after a call made the
/// entry, and the next call must show the change, while the other
/// target's entry stays as it was.
#[test]
fn each_part_of_a_status_entry_follows_its_source_from_one_call_to_the_next() {
    use crate::support::drop::{rename_in, wait_idle};
    use crate::support::endpoints::Endpoint;
    use nix::sys::signal::Signal;
    use std::time::Duration;

    let mut env = TestEnv::new();
    env.agent_option("settle", "\"100ms\"");
    // `app`'s validate command takes 3 s while the gate file exists.
    let gate = env.path().join("slow");
    let app = env.file_target(
        "app",
        &format!(
            "validate = [\"sh\", \"-c\", {}]\n",
            toml_str(format!("test ! -e '{}' || sleep 3", gate.display()))
        ),
    );
    let served = pki::issue_cert(&["site.test"]);
    let server = Endpoint::tls(&served);
    env.file_target(
        "site",
        &format!(
            "[target.verify]\nendpoint = {}\nattempts = 1\ntimeout = \"1s\"\n",
            toml_str(server.endpoint())
        ),
    );
    let agent = env.spawn_agent();

    // Made once with nothing deployed.
    let (a0, s0) = entries(&env);
    assert_eq!(a0["disk_state"], "missing", "{a0}");
    assert_eq!(s0["disk_state"], "missing", "{s0}");

    // The last run and the disk: a deploy that is verified.
    deploy(&env, "site", &served, "site").assert_code(0);
    let (a1, s1) = entries(&env);
    assert_eq!(a1, a0, "app changed with site's deploy");
    assert_eq!(s1["cert_sha256"], served.sha256_hex.as_str(), "{s1}");
    assert_eq!(s1["verification"], "verified", "{s1}");
    assert!(s1["last"]["deploy_id"].is_string(), "{s1}");
    assert_eq!(s1, entries(&env).1, "asked again with nothing changed");

    // The last probe alone: the endpoint goes away, `certctl verify` says
    // so, and nothing else changes.
    drop(server);
    let v = env.ctl(&["--json", "verify", "site"]);
    assert_ne!(v.code, 0, "{v}");
    let (a2, s2) = entries(&env);
    assert_eq!(a2, a0);
    assert_eq!(s2["verification"], "unreachable", "{s2}");
    assert_eq!(s2["last"], s1["last"], "{s2}");
    assert_eq!(s2["cert_sha256"], s1["cert_sha256"], "{s2}");

    // Busy while a run holds the target, and its last run when it ends.
    std::fs::write(&gate, "").unwrap();
    let leaf = pki::issue_cert(&["app.test"]);
    let out = std::thread::scope(|s| {
        let run = s.spawn(|| deploy(&env, "app", &leaf, "slow"));
        crate::support::wait_until(Duration::from_secs(20), "app busy in status", || {
            entries(&env).0["busy"] == true
        });
        let (a, s3) = entries(&env);
        assert!(
            a["last"].is_null(),
            "a last run before the first ended: {a}"
        );
        assert_eq!(s3, s2, "site changed with app's run");
        run.join().unwrap()
    });
    out.assert_code(0);
    std::fs::remove_file(&gate).unwrap();
    let lines = out.json_lines();
    assert_eq!(
        crate::support::assert::done(&lines)["outcome"],
        "deployed",
        "{out}"
    );
    let id = lines.last().unwrap()["deploy_id"].clone();
    assert!(id.is_string(), "{out}");
    let (a3, _) = entries(&env);
    assert_eq!(a3["busy"], false, "{a3}");
    assert_eq!(a3["last"]["deploy_id"], id, "{a3}");
    assert_eq!(a3["cert_sha256"], leaf.sha256_hex.as_str(), "{a3}");

    // The last drop event: a bundle dropped for app.
    let dropped = pki::issue_cert(&["app.test"]);
    rename_in(&env, "app.pem", dropped.bundle_pem());
    wait_idle(&env, &agent);
    let (a4, s4) = entries(&env);
    assert_eq!(s4, s2);
    assert_eq!(a4["last_drop"]["outcome"], "removed", "{a4}");
    assert_eq!(a4["cert_sha256"], dropped.sha256_hex.as_str(), "{a4}");

    // Expiry alone: a certificate that expires a few seconds from now,
    // written behind the agent's back; the file does not change again.
    let now = time::OffsetDateTime::now_utc();
    let brief = pki::Ca::root("brief")
        .leaf(&["app.test"])
        .validity(
            now - time::Duration::hours(1),
            now + time::Duration::seconds(3),
        )
        .issue();
    std::fs::write(app.join("cert.pem"), brief.fullchain_pem()).unwrap();
    let (a5, _) = entries(&env);
    assert_eq!(a5["cert_sha256"], brief.sha256_hex.as_str(), "{a5}");
    assert_eq!(a5["disk_state"], "ok", "{a5}");
    std::thread::sleep(Duration::from_millis(4500));
    let (a6, s6) = entries(&env);
    assert_eq!(a6["disk_state"], "expired", "{a6}");
    assert_eq!(a6["cert_sha256"], a5["cert_sha256"], "{a6}");
    assert_eq!(s6, s2);

    // A configuration reload: app's files are elsewhere now.
    let moved = env.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    env.replace_target(
        "app",
        &format!(
            "kind = \"file\"\ncert_path = {}\nkey_path = {}\n",
            toml_str(moved.join("cert.pem").display().to_string()),
            toml_str(moved.join("key.pem").display().to_string())
        ),
    );
    env.write_config();
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reloaded", Duration::from_secs(10));
    let (a7, s7) = entries(&env);
    assert_eq!(
        a7["cert_path"],
        moved.join("cert.pem").display().to_string(),
        "{a7}"
    );
    assert_eq!(a7["disk_state"], "missing", "{a7}");
    assert_eq!(a7["last"], a6["last"], "{a7}");
    assert_eq!(s7, s2);
}
