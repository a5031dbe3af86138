//! What `certctl` prints about a real agent's work: owners by name, the
//! structured origin of `history`, and `watch TARGET` filtering.

use std::time::Duration;

use crate::support::assert::arg;
use crate::support::pki;
use crate::support::{TestEnv, find_program, server_missing, wait_until};

#[test]
fn owners_by_name_history_origin_and_watch_filtered_by_target() {
    let mut env = TestEnv::new();
    env.file_target("app", "owner = \"root\"\ngroup = \"root\"\n");
    env.file_target("api", "");
    let _agent = env.spawn_agent();
    let (_watch, watch_out) = env.ctl_spawn(&["watch", "app"], "watch.out");
    // The watch stream is open once the agent logged the call; a short
    // pause is enough for the subscription to be in place.
    std::thread::sleep(Duration::from_secs(1));

    let leaf = pki::issue_cert(&["app.test"]);
    let f = env.inputs(&leaf, "app");
    let out = env.ctl(&[
        "deploy",
        "app",
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
    ]);
    out.assert_code(0);
    assert!(
        out.stdout.contains("owner root:root (explicit)"),
        "owners are shown by name\n{out}"
    );
    let other = pki::issue_cert(&["api.test"]);
    let f = env.inputs(&other, "api");
    env.ctl(&[
        "deploy",
        "api",
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
    ])
    .assert_code(0);

    // history: the origin taken apart in --json, readable in the table.
    let out = env.ctl(&["--json", "history", "app"]);
    out.assert_code(0);
    let by = &out.json()["history"][0]["by"];
    assert_eq!(by["via"], "cli", "{out}");
    assert_eq!(by["uid"], 0, "{out}");
    assert_eq!(by["user"], "root", "{out}");
    assert!(by["pid"].as_i64().is_some_and(|p| p > 0), "{out}");
    let out = env.ctl(&["history", "app"]);
    out.assert_code(0);
    assert!(out.stdout.contains("root (uid 0, pid "), "{out}");

    // watch app saw app's deploy and nothing of api's.
    wait_until(Duration::from_secs(10), "watch prints app's done", || {
        std::fs::read_to_string(&watch_out).is_ok_and(|s| s.contains(" app: done "))
    });
    let seen = std::fs::read_to_string(&watch_out).unwrap();
    assert!(!seen.contains(" api: "), "{seen}");
    assert!(!seen.contains("validated validated"), "{seen}");

    let out = env.ctl(&["watch", "nosuch"]);
    out.assert_code(3);
    assert!(out.stderr.contains("unknown target \"nosuch\""), "{out}");
}

#[test]
fn agent_help_shows_the_exit_status() {
    for args in [&["--help"][..], &["check-config", "--help"]] {
        let out = crate::support::process::run_bounded(
            std::process::Command::new(crate::support::agent_bin()).args(args),
            Duration::from_secs(30),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stdout.contains("\nExit status:\n  0 "),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("\n  64  configuration error"),
            "{}",
            out.stdout
        );
    }
}

/// What bash offers after `words` (the last one being completed), with
/// `certctl`'s completion script and `env`'s socket.
fn bash_complete(env: &TestEnv, words: &[&str], extra_env: &[(&str, &str)]) -> Vec<String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/completions/certctl.bash"
    );
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source {script}\nCOMP_WORDS=({})\nCOMP_CWORD={}\n\
         _certctl_with_targets certctl '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len() - 1,
        words[words.len() - 1],
        words[words.len() - 2],
    );
    let bin_dir = crate::support::certctl_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(program)
        .env("PATH", path)
        .env("CERTCTL_SOCKET", env.socket());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = crate::support::process::run_bounded(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_target_names_from_the_agent_then_from_the_config() {
    let mut env = TestEnv::new();
    env.file_target("web", "");
    env.file_target("api", "");
    env.file_target("mail", "");
    let mut agent = env.spawn_agent();

    let out = env.ctl(&["targets", "--names"]);
    out.assert_code(0);
    assert_eq!(out.stdout, "api\nmail\nweb\n", "{out}");
    let out = env.ctl(&["--json", "targets", "--names"]);
    assert_eq!(
        out.json(),
        serde_json::json!({ "names": ["api", "mail", "web"] }),
        "{out}"
    );

    assert_eq!(
        bash_complete(&env, &["certctl", "deploy", ""], &[]),
        ["api", "mail", "web"]
    );
    assert_eq!(
        bash_complete(&env, &["certctl", "status", "web", "m"], &[]),
        ["mail"]
    );
    assert_eq!(
        bash_complete(&env, &["certctl", "--json", "rollback", "w"], &[]),
        ["web"]
    );
    // Not after a command that has its target, nor for an option's value.
    assert!(
        !bash_complete(&env, &["certctl", "verify", "web", ""], &[]).contains(&"api".to_owned())
    );
    assert!(
        !bash_complete(&env, &["certctl", "deploy", "web", "--cert", ""], &[])
            .contains(&"api".to_owned())
    );
    // The --socket on the command line is the one asked.
    let elsewhere = env.path().join("elsewhere.sock");
    assert!(
        bash_complete(
            &env,
            &[
                "certctl",
                "--socket",
                elsewhere.to_str().unwrap(),
                "deploy",
                ""
            ],
            &[("CERTCTL_CONFIG", "/nonexistent/agent.toml")]
        )
        .is_empty()
    );

    // No agent: the names in the configuration file it would read.
    agent.terminate();
    let config = env.config_path();
    let config = config.to_str().unwrap();
    assert_eq!(
        bash_complete(
            &env,
            &["certctl", "watch", ""],
            &[("CERTCTL_CONFIG", config)]
        ),
        ["api", "mail", "web"]
    );
    let out = env.ctl(&["targets", "--names"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stderr.contains("did not answer"), "{out}");
}

#[test]
fn fish_and_zsh_complete_target_names() {
    let completions = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/completions");
    let bin_dir = crate::support::certctl_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env = TestEnv::new();
    env.file_target("web", "");
    env.file_target("api", "");
    let _agent = env.spawn_agent();

    if find_program("fish", &[]).is_some() || !server_missing("fish") {
        let mut cmd = std::process::Command::new("fish");
        cmd.arg("--no-config")
            .arg("-c")
            .arg(format!(
                "source {completions}/certctl.fish; complete -C 'certctl rollback '; \
                 echo SPLIT; complete -C 'certctl deploy web --cert '"
            ))
            .env("PATH", &path)
            .env("CERTCTL_SOCKET", env.socket())
            .current_dir(env.path());
        let out = crate::support::process::run_bounded(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let (names, files) = out.stdout.split_once("SPLIT\n").unwrap();
        let names: Vec<&str> = names
            .lines()
            .map(|l| l.split('\t').next().unwrap())
            .collect();
        assert_eq!(names, ["api", "web"], "{}", out.stdout);
        assert!(!files.contains("api"), "--cert completes files: {files}");
    }
    if find_program("zsh", &[]).is_some() || !server_missing("zsh") {
        let mut cmd = std::process::Command::new("zsh");
        cmd.arg("-n").arg(format!("{completions}/_certctl"));
        let out = crate::support::process::run_bounded(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let script = std::fs::read_to_string(format!("{completions}/_certctl")).unwrap();
        assert!(
            script.contains(
                "':target -- Target name, as configured in the agent:_certctl_target_names'"
            ),
            "the zsh script completes target names"
        );
        assert!(script.contains("targets --names"));
    }
}
