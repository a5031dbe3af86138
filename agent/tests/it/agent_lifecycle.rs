//! The agent process itself: `check-config`, the shipped example configs,
//! `SIGHUP` reloads, `SIGTERM` shutdown, concurrency between deploys, access
//! control from peer credentials, `certctl watch`/`targets`, and the
//! allocator configuration it is built with.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::process::run_bounded;
use crate::support::{TestEnv, agent_bin, pki, toml_array};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn check_config(path: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("check-config").arg("--config").arg(path);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    (out.code, out.stdout, out.stderr)
}

fn bundle(env: &TestEnv, stem: &str) -> String {
    let f = pki::issue_cert(&["app.test"]).write_files(&env.path().join("input"), stem);
    std::fs::set_permissions(&f.bundle, std::fs::Permissions::from_mode(0o644)).unwrap();
    f.bundle.to_str().unwrap().to_owned()
}

#[test]
fn shipped_configs_pass_check_config() {
    for rel in ["examples/agent.toml", "packaging/agent.toml"] {
        let (code, stdout, stderr) = check_config(&repo_root().join(rel));
        assert_eq!(code, 0, "{rel}: {stdout}{stderr}");
        assert!(stdout.contains(": ok"), "{rel}: {stdout}");
    }
}

/// The memory an idle agent gives back after a burst rests on jemalloc's
/// configuration, which the build takes from `.cargo/config.toml`
/// (docs/performance.md): a binary built without it would run with
/// per-thread caches and keep what a burst freed, silently.
#[test]
fn the_agent_is_built_with_the_allocator_configuration() {
    let cargo_config: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo_root().join(".cargo/config.toml")).unwrap())
            .unwrap();
    let conf = cargo_config["env"]["JEMALLOC_SYS_WITH_MALLOC_CONF"]
        .as_str()
        .expect("[env] JEMALLOC_SYS_WITH_MALLOC_CONF in .cargo/config.toml");
    assert!(conf.contains("tcache:false"), "{conf}");
    let binary = std::fs::read(agent_bin()).unwrap();
    assert!(
        binary.windows(conf.len()).any(|w| w == conf.as_bytes()),
        "{} was built without the allocator configuration {conf:?}",
        agent_bin().display()
    );
}

#[test]
fn a_bad_config_exits_64_naming_file_and_key() {
    let env = TestEnv::new();
    let path = env.path().join("bad.toml");
    std::fs::write(&path, "[agent]\nsettle = \"soon\"\n").unwrap();
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("agent.settle"), "{stderr}");

    // The daemon refuses to start on it the same way.
    let mut cmd = Command::new(agent_bin());
    cmd.arg("--config").arg(&path);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.code, 64, "{}", out.stderr);

    let (code, _, stderr) = check_config(&env.path().join("missing.toml"));
    assert_eq!(code, 64);
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn sighup_reloads_the_config_and_keeps_the_old_one_when_the_new_is_bad() {
    let mut env = TestEnv::new();
    env.file_target("one", "");
    let agent = env.spawn_agent();
    env.file_target("two", "");
    env.write_config();
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reloaded", Duration::from_secs(10));
    let names = |out: &crate::support::CtlOutput| -> Vec<String> {
        out.json()["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(env.ctl(&["--json", "targets"]).assert_code(0)),
        ["one", "two"]
    );

    std::fs::write(env.config_path(), "[agent]\nbogus = 1\n").unwrap();
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reload rejected", Duration::from_secs(10));
    assert_eq!(
        names(env.ctl(&["--json", "targets"]).assert_code(0)),
        ["one", "two"]
    );
}

#[test]
fn sigterm_waits_for_a_running_deploy_then_exits_0_and_removes_the_socket() {
    let mut env = TestEnv::new();
    let dir = env.file_target("slow", "reload = [\"sleep\", \"1\"]\n");
    let mut agent = env.spawn_agent();
    let b = bundle(&env, "slow");
    let (deploy, out) = env.ctl_spawn(&["--json", "deploy", "slow", "--cert", &b], "deploy.out");
    // Wait until the deploy is in its reload.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("committed")
    {
        assert!(Instant::now() < deadline, "deploy did not reach commit");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.signal(Signal::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .expect("agent exits");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    drop(deploy);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains("\"outcome\":\"deployed\""),
        "deploy was not finished:\n{text}"
    );
    assert!(dir.join("cert.pem").exists());
    assert!(!env.socket().exists(), "socket left behind");
}

/// Intervals [start, end] of reload commands, from a log the command writes.
fn intervals(log: &Path) -> Vec<(String, f64, f64)> {
    let text = std::fs::read_to_string(log).unwrap();
    let mut starts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (what, target, at) = (
            parts[0],
            parts[1].to_owned(),
            parts[2].parse::<f64>().unwrap(),
        );
        if what == "start" {
            starts.insert(target.clone() + parts[3], at);
        } else {
            let s = starts[&(target.clone() + parts[3])];
            out.push((target, s, at));
        }
    }
    out
}

fn slow_reload(log: &Path) -> String {
    let script = format!(
        "echo start $CERTCTL_TARGET $(date +%s.%N) $CERTCTL_DEPLOY_ID >> {l}; sleep 0.5; echo end $CERTCTL_TARGET $(date +%s.%N) $CERTCTL_DEPLOY_ID >> {l}",
        l = log.display()
    );
    format!("reload = {}\n", toml_array(&["sh", "-c", &script]))
}

#[test]
fn deploys_to_one_target_serialize_and_to_two_targets_overlap() {
    let mut env = TestEnv::new();
    let log = env.path().join("reloads.log");
    env.file_target("a", &slow_reload(&log));
    env.file_target("b", &slow_reload(&log));
    let _agent = env.spawn_agent();
    let inputs: Vec<String> = (0..4).map(|i| bundle(&env, &format!("in{i}"))).collect();

    // Two deploys to "a" at once, plus one each to "b".
    let jobs = [("a", 0), ("a", 1), ("b", 2), ("b", 3)];
    let children: Vec<_> = jobs
        .iter()
        .map(|(t, i)| {
            env.ctl_spawn(
                &["--json", "deploy", t, "--cert", &inputs[*i]],
                &format!("out{i}"),
            )
        })
        .collect();
    for (guard, out) in children {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("\"stage\":\"done\"")
        {
            assert!(
                Instant::now() < deadline,
                "deploy did not finish: {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("\"outcome\":\"deployed\""), "{text}");
        drop(guard);
    }
    let iv = intervals(&log);
    assert_eq!(iv.len(), 4, "{iv:?}");
    let of = |t: &str| iv.iter().filter(|(x, _, _)| x == t).collect::<Vec<_>>();
    let overlap = |x: &(String, f64, f64), y: &(String, f64, f64)| x.1 < y.2 && y.1 < x.2;
    let (a, b) = (of("a"), of("b"));
    assert!(
        !overlap(a[0], a[1]),
        "deploys to one target interleaved: {a:?}"
    );
    assert!(
        !overlap(b[0], b[1]),
        "deploys to one target interleaved: {b:?}"
    );
    assert!(
        a.iter().any(|x| b.iter().any(|y| overlap(x, y))),
        "deploys to two targets never ran at the same time: {iv:?}"
    );
}

#[test]
fn no_wait_on_a_busy_target_exits_8() {
    let mut env = TestEnv::new();
    env.file_target("a", "reload = [\"sleep\", \"2\"]\n");
    let _agent = env.spawn_agent();
    let first = bundle(&env, "first");
    let second = bundle(&env, "second");
    let (guard, out) = env.ctl_spawn(&["--json", "deploy", "a", "--cert", &first], "first.out");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("locked")
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let busy = env.ctl(&["deploy", "a", "--cert", &second, "--no-wait"]);
    busy.assert_code(8);
    assert!(busy.stderr.contains("busy"), "{busy}");
    drop(guard);
}

#[test]
fn access_is_decided_per_call_from_peer_credentials() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "");
    // Two groups: the socket is 0666 and the per-call check decides.
    env.deploy_groups(&["root"]).read_groups(&["nogroup"]);
    let _agent = env.spawn_agent();
    assert_eq!(
        std::fs::metadata(env.socket()).unwrap().mode() & 0o777,
        0o666
    );
    let b = bundle(&env, "app");
    let Some(denied) = env.ctl_as(65534, 65534, &["deploy", "app", "--cert", &b]) else {
        return;
    };
    denied.assert_code(7);
    assert!(denied.stderr.contains("permission denied"), "{denied}");
    assert!(denied.stderr.contains("join group root"), "{denied}");
    assert!(
        denied.stderr.contains(env.socket().to_str().unwrap()),
        "{denied}"
    );
    assert!(!dir.join("cert.pem").exists());
    // nogroup may read.
    env.ctl_as(65534, 65534, &["status"])
        .unwrap()
        .assert_code(0);
    // Someone in neither group may not even read.
    let out = env.ctl_as(65533, 65533, &["status"]).unwrap();
    out.assert_code(7);
    assert!(out.stderr.contains("may not read agent state"), "{out}");
    // Root may deploy.
    env.ctl(&["deploy", "app", "--cert", &b]).assert_code(0);
}

#[test]
fn with_no_groups_the_socket_is_private() {
    let mut env = TestEnv::new();
    env.file_target("app", "");
    let _agent = env.spawn_agent();
    assert_eq!(
        std::fs::metadata(env.socket()).unwrap().mode() & 0o777,
        0o600
    );
    let Some(out) = env.ctl_as(65534, 65534, &["status"]) else {
        return;
    };
    out.assert_code(7);
    assert!(out.stderr.contains("permission denied"), "{out}");
}

#[test]
fn watch_streams_every_stage_of_a_deploy() {
    let mut env = TestEnv::new();
    env.file_target("app", "");
    let _agent = env.spawn_agent();
    let (guard, out) = env.ctl_spawn(&["--json", "watch"], "watch.out");
    // Give the watcher time to subscribe before the deploy starts.
    std::thread::sleep(Duration::from_millis(300));
    let b = bundle(&env, "app");
    env.ctl(&["deploy", "app", "--cert", &b]).assert_code(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("\"stage\":\"done\"") {
            for stage in ["validated", "planned", "locked", "staged", "committed"] {
                assert!(
                    text.contains(&format!("\"stage\":\"{stage}\"")),
                    "{stage} missing:\n{text}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "watch saw no done event:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guard);
}
