//! "Deployed" means "served": the real agent probes the verify endpoint after
//! the reload, rolls back when the new leaf is not what is served, and says
//! exactly what is on disk and what is served. Also `certctl verify`,
//! `certctl rollback`, the drift watch, and shutdown cutting verification
//! waits short.
//!
//! Real nginx where a server is needed; the misbehaving endpoints (refused,
//! silent, serving another certificate) are small loopback servers of the
//! test (`support::endpoints`), because no real server misbehaves on cue.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::nginx::{SNI, Site, TARGET, assert_served, start_site};
use crate::support::assert::{arg, done, temp_files};
use crate::support::endpoints::{Endpoint, refused_port};
use crate::support::nginx::{Nginx, nginx_available};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, process, toml_str};

/// A `[target.verify]` table with quick retries.
fn verify_table(endpoint: &str, server_name: &str, attempts: u32) -> String {
    format!(
        "[target.verify]\n\
         endpoint = {}\n\
         server_name = {}\n\
         attempts = {attempts}\n\
         backoff = \"100ms\"\n\
         max_backoff = \"400ms\"\n\
         timeout = \"2s\"\n",
        toml_str(endpoint),
        toml_str(server_name)
    )
}

/// nginx serving `leaf` for target `web`, whose `[target.verify]` probes
/// it with `attempts` tries; `reload` as in [`TestEnv::nginx_target`].
fn verified_site(env: &mut TestEnv, leaf: &Leaf, reload: Option<&[String]>, attempts: u32) -> Site {
    let site = start_site(env, leaf);
    env.nginx_target(TARGET, &site.nginx, SNI, reload);
    env.append_to_target(TARGET, &verify_table(&site.nginx.endpoint(), SNI, attempts));
    site
}

fn deploy_json(env: &TestEnv, target: &str, leaf: &Leaf, stem: &str) -> crate::support::CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&["--json", "deploy", target, "--cert", arg(&f.bundle)])
}

/// The `attempt` objects of the verify events, in order.
fn attempts(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["stage"] == "verify")
        .filter_map(|l| l.get("attempt"))
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn deploy_is_verified_and_rollback_switches_back_and_forth() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = verified_site(&mut env, &a, None, 5);
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let out = deploy_json(&env, TARGET, &b, "b");
    out.assert_code(0);
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_eq!(result["served_sha256"], b.sha256_hex.as_str(), "{out}");
    assert_eq!(result["disk_sha256"], b.sha256_hex.as_str(), "{out}");
    let tries = attempts(&lines);
    assert!(tries.last().is_some_and(|t| t["ok"] == true), "{out}");
    assert_served(&site.nginx, &b);

    // certctl verify agrees, and status remembers it.
    let v = env.ctl(&["--json", "verify", TARGET]);
    v.assert_code(0);
    let check = &v.json()["check"];
    assert_eq!(check["state"], "verified", "{v}");
    assert_eq!(check["served_sha256"], b.sha256_hex.as_str(), "{v}");
    assert_eq!(check["disk_sha256"], b.sha256_hex.as_str(), "{v}");
    assert_eq!(
        check["served_chain_sha256"].as_array().unwrap().len(),
        1,
        "{v}"
    );
    let st = env.ctl(&["--json", "status", TARGET]);
    assert_eq!(st.json()["targets"][0]["verification"], "verified", "{st}");

    // Rollback puts A back and proves it is served.
    let r = env.ctl(&["--json", "rollback", TARGET]);
    r.assert_code(0);
    let rl = r.json_lines();
    let result = done(&rl);
    assert_eq!(result["outcome"], "restored", "{r}");
    assert_eq!(result["verification"], "verified", "{r}");
    assert_eq!(result["cert_sha256"], a.sha256_hex.as_str(), "{r}");
    assert_eq!(result["served_sha256"], a.sha256_hex.as_str(), "{r}");
    assert_eq!(read(&site.cert), a.fullchain_pem());
    assert_eq!(read(&site.key), a.key_pem);
    assert_served(&site.nginx, &a);

    // A second rollback switches back to B: nothing was lost.
    let r = env.ctl(&["--json", "rollback", TARGET]);
    r.assert_code(0);
    assert_eq!(
        done(&r.json_lines())["cert_sha256"],
        b.sha256_hex.as_str(),
        "{r}"
    );
    assert_eq!(read(&site.cert), b.fullchain_pem());
    assert_served(&site.nginx, &b);
    assert!(temp_files(&env.target_dir(TARGET)).is_empty());
}

#[test]
fn a_reload_that_does_nothing_is_caught_and_rolled_back() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    // "Succeeds" without telling nginx anything: nginx keeps serving A.
    let site = verified_site(&mut env, &a, Some(&["true".to_owned()]), 3);
    let _agent = env.spawn_agent();

    let b = pki::issue_cert(&[SNI]);
    let out = deploy_json(&env, TARGET, &b, "b");
    out.assert_code(5);
    let lines = out.json_lines();
    let tries = attempts(&lines);
    let new: Vec<_> = tries.iter().filter(|t| t["rollback"] == false).collect();
    assert_eq!(new.len(), 3, "every configured attempt is made: {out}");
    for t in &new {
        assert_eq!(t["ok"], false, "{out}");
        assert_eq!(t["reason"], "mismatch", "{out}");
        assert_eq!(t["served_sha256"], a.sha256_hex.as_str(), "{out}");
        assert_eq!(t["want_sha256"], b.sha256_hex.as_str(), "{out}");
    }
    assert!(new[0]["next_in_ms"].as_i64().unwrap() > 0, "{out}");
    assert_eq!(new[2]["next_in_ms"], 0, "{out}");
    let back: Vec<_> = tries.iter().filter(|t| t["rollback"] == true).collect();
    assert!(back.last().is_some_and(|t| t["ok"] == true), "{out}");

    let result = done(&lines);
    assert_eq!(result["outcome"], "rolled_back", "{out}");
    assert_eq!(result["disk_sha256"], a.sha256_hex.as_str(), "{out}");
    assert_eq!(result["served_sha256"], a.sha256_hex.as_str(), "{out}");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("verification failed after 3 attempt(s)"),
        "{error}"
    );
    assert!(error.contains("serves it again"), "{error}");
    assert_eq!(read(&site.cert), a.fullchain_pem());
    assert_eq!(read(&site.key), a.key_pem);
    assert_served(&site.nginx, &a);

    // The human output streams each attempt the way an operator reads it.
    let human = env.ctl(&[
        "deploy",
        TARGET,
        "--cert",
        arg(&env.inputs(&b, "b2").bundle),
    ]);
    human.assert_code(5);
    assert!(
        human
            .stdout
            .contains(": verify           attempt 1/3: served ")
            && human.stdout.contains(", want ")
            && human.stdout.contains("; next in "),
        "{human}"
    );
}

#[test]
fn the_wrong_vhost_is_a_mismatch() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let other = pki::issue_cert(&["other.test"]);
    let dir = env.target_dir(TARGET);
    let (cert, key) = (dir.join("web.crt"), dir.join("web.key"));
    pki::write_mode(&cert, &a.fullchain_pem(), 0o644);
    pki::write_mode(&key, &a.key_pem, 0o600);
    let odir = env.path().join("other");
    std::fs::create_dir_all(&odir).unwrap();
    let (ocert, okey) = (odir.join("other.crt"), odir.join("other.key"));
    pki::write_mode(&ocert, &other.fullchain_pem(), 0o644);
    pki::write_mode(&okey, &other.key_pem, 0o600);
    let nginx = Nginx::builder(&env.path().join("nginx"))
        .vhost(SNI, &cert, &key)
        .vhost("other.test", &ocert, &okey)
        .start();
    env.nginx_target(TARGET, &nginx, SNI, None);
    // The operator typed the other vhost's name.
    env.append_to_target(TARGET, &verify_table(&nginx.endpoint(), "other.test", 2));
    let _agent = env.spawn_agent();

    let v = env.ctl(&["--json", "verify", TARGET]);
    v.assert_code(5);
    let check = &v.json()["check"];
    assert_eq!(check["state"], "mismatch", "{v}");
    assert_eq!(check["served_sha256"], other.sha256_hex.as_str(), "{v}");
    assert_eq!(check["disk_sha256"], a.sha256_hex.as_str(), "{v}");
    let st = env.ctl(&["--json", "status", TARGET]);
    assert_eq!(st.json()["targets"][0]["verification"], "mismatch", "{st}");
    let human = env.ctl(&["verify", TARGET]);
    human.assert_code(5);
    assert!(human.stderr.contains(&other.sha256_hex[..6]), "{human}");

    // A certificate that does not cover the configured name is refused
    // before anything is touched.
    let b = pki::issue_cert(&[SNI]);
    let out = deploy_json(&env, TARGET, &b, "b");
    out.assert_code(3);
    let error = done(&out.json_lines())["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("does not cover server name \"other.test\""),
        "{error}"
    );

    // One that covers both names passes the input check, but the probe
    // under that name sees the other vhost: rolled back, and since the
    // previous certificate is not served under that name either, the
    // result says so (exit 6) with the files restored.
    let b = pki::issue_cert(&[SNI, "other.test"]);
    let out = deploy_json(&env, TARGET, &b, "b2");
    out.assert_code(6);
    let lines = out.json_lines();
    assert!(
        attempts(&lines)
            .iter()
            .any(|t| t["reason"] == "mismatch" && t["served_sha256"] == other.sha256_hex.as_str()),
        "{out}"
    );
    let result = done(&lines).clone();
    assert_eq!(result["outcome"], "rollback_failed", "{out}");
    assert_eq!(result["disk_sha256"], a.sha256_hex.as_str(), "{out}");
    assert_eq!(result["served_sha256"], other.sha256_hex.as_str(), "{out}");
    assert_eq!(read(&cert), a.fullchain_pem());
}

#[test]
fn broken_endpoints_each_say_what_is_wrong_and_roll_back() {
    let mut env = TestEnv::new();
    let silent = Endpoint::silent();
    let stranger = pki::Ca::root("someone else's root")
        .leaf(&["site.test"])
        .issue();
    let impostor = Endpoint::tls(&stranger);
    let refused = format!("127.0.0.1:{}", refused_port());
    let cases = [
        ("refused", refused.clone(), "connection refused"),
        ("silent", silent.endpoint(), "TLS"),
        ("impostor", impostor.endpoint(), "want"),
    ];
    for (name, endpoint, _) in &cases {
        env.file_target(
            name,
            &format!(
                "[target.verify]\nendpoint = {}\nserver_name = \"site.test\"\nattempts = 2\n\
                 backoff = \"50ms\"\nmax_backoff = \"50ms\"\ntimeout = \"500ms\"\n",
                toml_str(endpoint)
            ),
        );
    }
    let _agent = env.spawn_agent();

    let leaf = pki::issue_cert(&["site.test"]);
    for (name, endpoint, needle) in &cases {
        let out = deploy_json(&env, name, &leaf, name);
        // A first deploy has nothing to go back to: its files are removed.
        out.assert_code(5);
        let lines = out.json_lines();
        let tries = attempts(&lines);
        assert_eq!(tries.len(), 2, "{name}: {out}");
        let result = done(&lines);
        assert_eq!(result["outcome"], "rolled_back", "{name}: {out}");
        let error = result["error"].as_str().unwrap();
        assert!(error.contains(endpoint.as_str()), "{name}: {error}");
        assert!(error.contains(needle), "{name}: {error}");
        assert!(
            error.contains("there was no previous certificate"),
            "{name}: {error}"
        );
        let dir = env.target_dir(name);
        assert!(!dir.join("cert.pem").exists(), "{name}: {out}");
        assert!(!dir.join("key.pem").exists(), "{name}: {out}");
        assert!(temp_files(&dir).is_empty(), "{name}");
    }
    // Each failure has its own reason code.
    let reasons: Vec<String> = cases
        .iter()
        .map(|(name, _, _)| {
            let out = deploy_json(&env, name, &leaf, &format!("{name}-2"));
            attempts(&out.json_lines())[0]["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(reasons[0], "refused");
    assert_eq!(reasons[1], "timeout");
    assert_eq!(reasons[2], "mismatch");
}

#[test]
fn a_broken_endpoint_after_a_good_deploy_leaves_the_old_files_and_says_so() {
    let mut env = TestEnv::new();
    let first = pki::issue_cert(&["site.test"]);
    let server = Endpoint::tls(&first);
    let dir = env.file_target(
        "site",
        &format!(
            "[target.verify]\nendpoint = {}\nattempts = 2\nbackoff = \"50ms\"\n\
             max_backoff = \"50ms\"\ntimeout = \"1s\"\n",
            toml_str(server.endpoint())
        ),
    );
    let _agent = env.spawn_agent();
    // The endpoint serves `first`: deploying it is verified.
    let out = deploy_json(&env, "site", &first, "first");
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["verification"], "verified", "{out}");

    // A new certificate the endpoint never serves: rolled back to `first`,
    // and `first` is verified again.
    let second = pki::issue_cert(&["site.test"]);
    let out = deploy_json(&env, "site", &second, "second");
    out.assert_code(5);
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "rolled_back", "{out}");
    assert_eq!(result["disk_sha256"], first.sha256_hex.as_str(), "{out}");
    assert_eq!(read(&dir.join("cert.pem")), first.fullchain_pem());

    // The endpoint goes away: now even the rollback cannot be proven.
    drop(server);
    let out = deploy_json(&env, "site", &second, "third");
    out.assert_code(6);
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "rollback_failed", "{out}");
    assert_eq!(result["disk_sha256"], first.sha256_hex.as_str(), "{out}");
    assert_eq!(result["served_sha256"], "", "{out}");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("the previous files are back on disk"),
        "{error}"
    );
    assert_eq!(read(&dir.join("cert.pem")), first.fullchain_pem());
}

#[test]
fn verify_and_rollback_explain_what_is_missing() {
    let mut env = TestEnv::new();
    env.file_target("plain", "");
    let _agent = env.spawn_agent();
    let v = env.ctl(&["verify", "plain"]);
    v.assert_code(3);
    assert!(v.stderr.contains("has no verify endpoint"), "{v}");
    assert!(v.stderr.contains("[target.verify]"), "{v}");
    let r = env.ctl(&["rollback", "plain"]);
    r.assert_code(3);
    assert!(r.stderr.contains("nothing to roll back to"), "{r}");
    let u = env.ctl(&["rollback", "nope"]);
    u.assert_code(3);
    assert!(u.stderr.contains("unknown target"), "{u}");
    // Without an endpoint a deploy is never called verified.
    let leaf = pki::issue_cert(&["plain.test"]);
    let out = deploy_json(&env, "plain", &leaf, "p");
    out.assert_code(0);
    assert_eq!(
        done(&out.json_lines())["verification"],
        "unverified",
        "{out}"
    );
    let st = env.ctl(&["--json", "status", "plain"]);
    assert_eq!(
        st.json()["targets"][0]["verification"],
        "unverified",
        "{st}"
    );
}

#[test]
fn drift_watch_sees_a_certificate_replaced_behind_the_agents_back() {
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&["site.test"]);
    let server = Endpoint::tls(&a);
    let dir = env.file_target(
        "site",
        &format!(
            "[target.verify]\nendpoint = {}\ninterval = \"1s\"\nattempts = 1\ntimeout = \"1s\"\n",
            toml_str(server.endpoint())
        ),
    );
    let _agent = env.spawn_agent();
    let (_watch, events) = env.ctl_spawn(&["--json", "watch"], "watch.jsonl");
    let out = deploy_json(&env, "site", &a, "a");
    out.assert_code(0);

    // Someone writes other files without telling the agent or the server.
    let b = pki::issue_cert(&["site.test"]);
    pki::write_mode(&dir.join("cert.pem"), &b.fullchain_pem(), 0o644);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = env.ctl(&["--json", "status", "site"]);
        let t = &st.json()["targets"][0];
        if t["verification"] == "mismatch" {
            assert_eq!(t["served"]["served_sha256"], a.sha256_hex.as_str(), "{st}");
            assert_eq!(t["served"]["disk_sha256"], b.sha256_hex.as_str(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "no drift reported: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = process::read_lossy(&events);
    let drift = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["stage"] == "drift" && e["served"]["state"] == "mismatch")
        .unwrap_or_else(|| panic!("no drift event in:\n{text}"));
    assert_eq!(drift["target"], "site");
    assert!(
        drift["message"]
            .as_str()
            .unwrap()
            .contains("but the certificate on disk is"),
        "{drift}"
    );
}

#[test]
fn shutdown_cuts_verification_waits_short() {
    let mut env = TestEnv::new();
    env.file_target(
        "site",
        &format!(
            "[target.verify]\nendpoint = {}\nattempts = 3\nbackoff = \"10m\"\ntimeout = \"1s\"\n",
            toml_str(format!("127.0.0.1:{}", refused_port()))
        ),
    );
    let mut agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["site.test"]);
    let f = env.inputs(&leaf, "s");
    let (mut deploy, out) = env.ctl_spawn(
        &["--json", "deploy", "site", "--cert", arg(&f.bundle)],
        "deploy.jsonl",
    );
    agent.wait_for_log("verify attempt 1/3", Duration::from_secs(20));
    agent.signal(Signal::SIGTERM);
    let status = deploy
        .wait_timeout(Duration::from_secs(60))
        .expect("the deploy ends once its wait is cut");
    assert_eq!(
        process::exit_code(status),
        5,
        "{}",
        process::read_lossy(&out)
    );
    let lines: Vec<serde_json::Value> = process::read_lossy(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let tries = attempts(&lines);
    // Attempt 1, the cut wait, then one last attempt: not the third.
    assert_eq!(tries.len(), 2, "{lines:#?}");
    assert_eq!(done(&lines)["outcome"], "rolled_back");
    let exit = agent
        .wait_exit(Duration::from_secs(30))
        .expect("agent exits");
    assert!(exit.success(), "{}", agent.log());
}

#[test]
fn a_newer_deploy_cuts_the_running_verification_short() {
    let mut env = TestEnv::new();
    env.file_target(
        "site",
        &format!(
            "[target.verify]\nendpoint = {}\nattempts = 3\nbackoff = \"10m\"\ntimeout = \"1s\"\n",
            toml_str(format!("127.0.0.1:{}", refused_port()))
        ),
    );
    let agent = env.spawn_agent();
    let first = pki::issue_cert(&["site.test"]);
    let f = env.inputs(&first, "first");
    let (mut deploy, out) = env.ctl_spawn(
        &["--json", "deploy", "site", "--cert", arg(&f.bundle)],
        "first.jsonl",
    );
    agent.wait_for_log("verify attempt 1/3", Duration::from_secs(20));

    // The second deploy waits for the lock, which hurries the first along.
    let second = pki::issue_cert(&["site.test"]);
    let f2 = env.inputs(&second, "second");
    let out2 = env.ctl(&[
        "--json",
        "deploy",
        "site",
        "--no-verify",
        "--cert",
        arg(&f2.bundle),
    ]);
    out2.assert_code(0);
    let status = deploy
        .wait_timeout(Duration::from_secs(30))
        .expect("the first deploy ended");
    assert_eq!(process::exit_code(status), 5);
    let lines: Vec<serde_json::Value> = process::read_lossy(&out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(attempts(&lines).len(), 2, "{lines:#?}");
    // The second deploy went ahead after the first's rollback.
    let result = done(&out2.json_lines()).clone();
    assert_eq!(result["outcome"], "deployed", "{out2}");
    assert_eq!(result["verification"], "unverified", "{out2}");
    assert_eq!(result["disk_sha256"], second.sha256_hex.as_str(), "{out2}");
}

#[test]
fn an_identical_deploy_still_proves_it_is_served_and_reloads_when_it_is_not() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let site = verified_site(&mut env, &a, None, 5);
    let _agent = env.spawn_agent();

    // Already on disk and served: unchanged, and verified.
    let out = deploy_json(&env, TARGET, &a, "a");
    out.assert_code(0);
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "unchanged", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");

    // Someone put B on disk without reloading: the files match, the server
    // does not. The deploy reloads and proves B is served.
    let b = pki::issue_cert(&[SNI]);
    pki::write_mode(&site.cert, &b.fullchain_pem(), 0o644);
    pki::write_mode(&site.key, &b.key_pem, 0o600);
    let out = deploy_json(&env, TARGET, &b, "b");
    out.assert_code(0);
    let lines = out.json_lines();
    assert!(
        lines.iter().any(|l| l["stage"] == "reloaded"),
        "a reload was run: {out}"
    );
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_served(&site.nginx, &b);
}
