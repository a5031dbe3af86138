//! Recovery and rollback never destroy what is live: a recorded outcome
//! is final (a restart never re-runs a finished run), recovery leaves files
//! alone that a later change replaced, a first deploy rolled back leaves
//! the target as empty as it was, `--no-reload` installs a first
//! certificate for a server that is not running, and no restore ever
//! brings back a key readable by other users, nor uses a loose directory
//! of the agent's as it is.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::assert::{arg, done};
use crate::support::pki::{self, Leaf};
use crate::support::{AgentProc, TestEnv, toml_str};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn deploy(
    env: &TestEnv,
    target: &str,
    leaf: &Leaf,
    stem: &str,
    extra: &[&str],
) -> crate::support::CtlOutput {
    let f = env.inputs(leaf, stem);
    let mut args = vec!["--json", "deploy", target, "--cert", arg(&f.bundle)];
    args.extend_from_slice(extra);
    env.ctl(&args)
}

fn history_outcomes(env: &TestEnv, target: &str) -> Vec<String> {
    let out = env.ctl(&["--json", "history", target]);
    out.assert_code(0);
    let v = out.json();
    let runs = v["history"].as_array().cloned().unwrap_or_default();
    runs.iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A script that exits with the code in `<dir>/<name>.rc` (0 when missing)
/// and counts its runs in `<dir>/<name>.runs`.
fn script(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.sh"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho run >> '{0}/{name}.runs'\nrc=$(cat '{0}/{name}.rc' 2>/dev/null || echo 0)\n\
             [ \"$rc\" = 0 ] || echo \"{name} refused\" >&2\nexit \"$rc\"\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn set_rc(dir: &Path, name: &str, rc: i32) {
    std::fs::write(dir.join(format!("{name}.rc")), rc.to_string()).unwrap();
}

fn runs(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.runs"))).map_or(0, |s| s.lines().count())
}

#[test]
fn a_rollback_failed_run_is_final_and_a_restart_keeps_the_later_certificate() {
    let mut env = TestEnv::new();
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let reload = script(&bin, "reload");
    let dir = env.file_target(
        "app",
        &format!("reload = [{}]\n", toml_str(reload.display().to_string())),
    );
    let mut agent = env.spawn_agent();

    // A first certificate, then a deploy whose reload fails on the new
    // files and on the previous ones: rollback_failed, exit 6.
    let first = pki::issue_cert(&["app.test"]);
    deploy(&env, "app", &first, "first", &[]).assert_code(0);
    set_rc(&bin, "reload", 1);
    let failed = pki::issue_cert(&["app.test"]);
    let out = deploy(&env, "app", &failed, "failed", &[]);
    out.assert_code(6);
    assert_eq!(
        done(&out.json_lines())["outcome"],
        "rollback_failed",
        "{out}"
    );

    // Fixed; a later certificate deployed.
    set_rc(&bin, "reload", 0);
    let later = pki::issue_cert(&["app.test"]);
    deploy(&env, "app", &later, "later", &[]).assert_code(0);
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    assert!(
        cert.starts_with(later.cert_pem.trim_end()),
        "the later certificate is deployed"
    );

    // A clean restart: nothing is recovered, the later set stays.
    agent.terminate();
    let agent = env.spawn_agent();
    assert_eq!(
        std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        cert,
        "{}",
        agent.log()
    );
    assert!(dir.join("key.pem").exists(), "{}", agent.log());
    assert!(!agent.log().contains("recovering a"), "{}", agent.log());
    let outcomes = history_outcomes(&env, "app");
    assert_eq!(
        outcomes.first().map(String::as_str),
        Some("deployed"),
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o == "rollback_failed"),
        "{outcomes:?}"
    );
}

#[test]
fn a_target_whose_last_run_failed_its_rollback_is_flagged_for_an_operator() {
    let mut env = TestEnv::new();
    env.file_target("app", "reload = [\"sh\", \"-c\", \"exit 3\"]\n");
    let dir = env.target_dir("app");
    let old = pki::issue_cert(&["app.test"]);
    pki::write_mode(&dir.join("cert.pem"), &old.fullchain_pem(), 0o644);
    pki::write_mode(&dir.join("key.pem"), &old.key_pem, 0o600);
    let _agent = env.spawn_agent();
    deploy(&env, "app", &pki::issue_cert(&["app.test"]), "new", &[]).assert_code(6);
    let metrics = env.ctl(&["status", "--prometheus"]);
    metrics.assert_code(0);
    assert!(
        metrics
            .stdout
            .contains("certctl_target_needs_operator{target=\"app\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_first_deploy_whose_reload_fails_leaves_the_target_empty_and_says_so() {
    let mut env = TestEnv::new();
    let dir = env.file_target(
        "app",
        "reload = [\"sh\", \"-c\", \"echo 'not running' >&2; exit 1\"]\n",
    );
    let _agent = env.spawn_agent();
    let out = deploy(&env, "app", &pki::issue_cert(&["app.test"]), "a", &[]);
    out.assert_code(5);
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "rolled_back", "{out}");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("there was no previous certificate: the new files were removed"),
        "{error}"
    );
    assert!(!error.contains("previous files are back"), "{error}");
    assert!(
        error.contains("--no-reload"),
        "the way to bootstrap is named: {error}"
    );
    assert!(!dir.join("cert.pem").exists());
    assert!(!dir.join("key.pem").exists());
}

#[test]
fn no_reload_installs_a_first_certificate_for_a_server_that_is_not_running() {
    let mut env = TestEnv::new();
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let reload = script(&bin, "reload");
    let validate = script(&bin, "validate");
    set_rc(&bin, "reload", 1);
    let dir = env.file_target(
        "app",
        &format!(
            "validate = [{}]\nreload = [{}]\n[target.verify]\nendpoint = \"127.0.0.1:1\"\nattempts = 1\n",
            toml_str(validate.display().to_string()),
            toml_str(reload.display().to_string())
        ),
    );
    let _agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["app.test"]);
    let out = deploy(&env, "app", &leaf, "a", &["--no-reload"]);
    out.assert_code(0);
    let lines = out.json_lines();
    let result = done(&lines).clone();
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["verification"], "unverified", "{out}");
    assert!(
        result["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("--no-reload")),
        "{out}"
    );
    assert!(!lines.iter().any(|l| l["stage"] == "reloaded"), "{out}");
    assert_eq!(runs(&bin, "validate"), 1, "the validate command ran");
    assert_eq!(runs(&bin, "reload"), 0, "the reload command did not run");
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    assert!(cert.starts_with(leaf.cert_pem.trim_end()));
    assert_eq!(mode(&dir.join("key.pem")) & 0o007, 0);
}

#[test]
fn no_restore_brings_back_a_key_readable_by_other_users() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "");
    let old = pki::issue_cert(&["app.test"]);
    let key = dir.join("key.pem");
    pki::write_mode(&dir.join("cert.pem"), &old.fullchain_pem(), 0o644);
    pki::write_mode(&key, &old.key_pem, 0o644);
    let _agent = env.spawn_agent();

    // The deploy tightens the loose key.
    deploy(&env, "app", &pki::issue_cert(&["app.test"]), "new", &[]).assert_code(0);
    assert_eq!(mode(&key), 0o600);

    // `certctl rollback` brings the old key back, without its other bits.
    let out = env.ctl(&["--json", "rollback", "app"]);
    out.assert_code(0);
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "restored", "{out}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), old.key_pem);
    assert_eq!(mode(&key) & 0o007, 0, "a restored key has no other bits");
    assert!(
        result["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("holds a private key")),
        "the tightening is reported: {out}"
    );

    // An automatic rollback (validate fails) of a key that is loose again.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(_agent);
    env.append_to_target("app", "validate = [\"false\"]\n");
    let _agent = env.spawn_agent();
    let out = deploy(&env, "app", &pki::issue_cert(&["app.test"]), "bad", &[]);
    out.assert_code(4);
    assert_eq!(std::fs::read_to_string(&key).unwrap(), old.key_pem);
    assert_eq!(mode(&key) & 0o007, 0, "{out}");
}

#[test]
fn loose_directories_of_the_agent_are_tightened_with_a_warning() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "");
    let rejected = env.state_dir().join("rejected");
    let backups = dir.join(".certctl/backup/app");
    for d in [&rejected, &backups] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        dir.join(".certctl/backup"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let agent = env.spawn_agent();
    agent.wait_for_log("tightened to 0700", Duration::from_secs(20));
    assert_eq!(mode(&rejected), 0o700, "{}", agent.log());

    let old = pki::issue_cert(&["app.test"]);
    deploy(&env, "app", &old, "old", &[]).assert_code(0);
    deploy(&env, "app", &pki::issue_cert(&["app.test"]), "new", &[]).assert_code(0);
    assert_eq!(mode(&backups), 0o700, "{}", agent.log());
    assert_eq!(mode(&dir.join(".certctl/backup")), 0o700, "{}", agent.log());
    assert_eq!(mode(&dir.join(".certctl")) & 0o066, 0, "{}", agent.log());
}

#[test]
fn recovery_leaves_alone_files_that_were_replaced_after_the_crash() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "reload = [\"true\"]\n");
    let old = pki::issue_cert(&["app.test"]);
    {
        let _agent = env.spawn_agent();
        deploy(&env, "app", &old, "old", &[]).assert_code(0);
    }
    // Crash right after the new set is committed: the run stays open.
    let mut agent = env.spawn_agent_env(&[("CERTCTL_FAILPOINT", "after-commit")]);
    let _ = deploy(&env, "app", &pki::issue_cert(&["app.test"]), "new", &[]);
    let status = agent
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the agent did not crash:\n{}", agent.log()));
    assert!(!status.success());

    // Meanwhile an operator puts other files in place.
    let theirs = pki::issue_cert(&["app.test"]);
    pki::write_mode(&dir.join("cert.pem"), &theirs.fullchain_pem(), 0o644);
    pki::write_mode(&dir.join("key.pem"), &theirs.key_pem, 0o600);

    let agent = env.spawn_agent();
    assert_eq!(
        std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        theirs.fullchain_pem(),
        "{}",
        agent.log()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        theirs.key_pem
    );
    let out = env.ctl(&["--json", "history", "app"]);
    let newest = out.json()["history"][0].clone();
    assert_eq!(newest["outcome"], "internal", "{out}");
    assert!(
        newest["error"]
            .as_str()
            .unwrap()
            .contains("recovery left them alone"),
        "{out}"
    );
}

/// The backup sets of target `name` in `dir`, by the leaf each holds (a
/// `.<id>.partial` one is being removed: not a set).
fn backup_leaves(dir: &Path, name: &str) -> Vec<String> {
    let root = dir.join(".certctl/backup").join(name);
    let mut sets: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    sets.iter()
        .map(|s| std::fs::read_to_string(s.join("cert.pem")).unwrap_or_default())
        .collect()
}

#[test]
fn a_rollback_is_done_only_after_its_cleanup_and_holds_the_lock_through_it() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "backup_retention = 1\n");
    // Every rollback waits 1.5 s after its outcome is journaled, before it
    // removes the set it restored and prunes to retention.
    let agent = env.spawn_agent_env(&[("CERTCTL_FAILPOINT_PAUSE", "before-cleanup:1500")]);
    let sets: Vec<Leaf> = (0..3).map(|_| pki::issue_cert(&["app.test"])).collect();
    for (i, leaf) in sets.iter().enumerate() {
        deploy(&env, "app", leaf, &format!("v{i}"), &[]).assert_code(0);
    }
    assert_eq!(backup_leaves(&dir, "app"), [sets[1].fullchain_pem()]);

    std::thread::scope(|s| {
        let rollback = s.spawn(|| env.ctl(&["--json", "rollback", "app"]));
        agent.wait_for_log("failpoint: pausing", Duration::from_secs(20));
        // Held at its cleanup, the rollback still holds the target: a deploy
        // that will not wait is refused, and nothing it would write (a
        // backup set the cleanup could prune) exists.
        let out = deploy(&env, "app", &sets[0], "late", &["--no-wait"]);
        out.assert_code(8);
        assert_eq!(done(&out.json_lines())["outcome"], "busy", "{out}");
        assert!(
            !rollback.is_finished(),
            "the rollback ended before its cleanup"
        );

        let out = rollback.join().unwrap();
        out.assert_code(0);
        assert_eq!(done(&out.json_lines())["outcome"], "restored", "{out}");
        // Told done, the caller finds the end state: the restored set's
        // backup gone, the replaced set kept, retention (1) applied.
        assert_eq!(
            std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
            sets[1].fullchain_pem()
        );
        assert_eq!(backup_leaves(&dir, "app"), [sets[2].fullchain_pem()]);
    });
}

#[test]
fn a_deploy_during_the_start_up_sweep_waits_for_its_directory_and_keeps_its_files() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "");
    // What a killed run left beside the target, for the sweep after start.
    let stray = dir.join(".certctl-tmp-20200101T000000.000Z-dead-cert.pem");
    std::fs::write(&stray, "left by a killed run").unwrap();
    // The sweep holds the target's directory for 1.5 s before it touches it.
    let mut cmd = env.agent_command();
    cmd.env("CERTCTL_FAILPOINT_PAUSE", "during-sweep:1500");
    let agent = AgentProc::spawn(cmd, &env.socket(), &env.agent_log_path());
    agent.wait_for_log("failpoint: pausing", Duration::from_secs(20));

    // The agent serves while it sweeps.
    env.ctl(&["status", "app"]).assert_code(0);
    assert!(
        !agent.log().contains("start-up sweep done"),
        "{}",
        agent.log()
    );
    // A deploy to a target whose directory is being swept waits for it,
    // then writes its own temp files, which no sweep takes.
    let leaf = pki::issue_cert(&["app.test"]);
    let out = deploy(&env, "app", &leaf, "new", &[]);
    out.assert_code(0);
    let lines = out.json_lines();
    let locked = lines
        .iter()
        .find(|l| l["stage"] == "locked")
        .unwrap_or_else(|| panic!("no locked event: {out}"));
    assert!(
        locked["message"]
            .as_str()
            .unwrap_or_default()
            .contains("after waiting"),
        "the deploy did not wait for the sweep: {out}"
    );
    assert_eq!(done(&lines)["outcome"], "deployed", "{out}");
    assert!(!stray.exists(), "the stray temp file was not swept");
    assert_eq!(
        std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        leaf.fullchain_pem()
    );
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with(".certctl-tmp-"), "{name} left");
    }
}
