//! What `certctl` prints about a real agent's work: owners by name, the
//! structured origin of `history`, and `watch TARGET` filtering.

use std::time::Duration;

use crate::support::assert::arg;
use crate::support::pki;
use crate::support::{TestEnv, wait_until};

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
