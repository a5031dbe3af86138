//! `certctl status --check` through the real agent: the monitoring-plugin
//! exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN) and the summary line;
//! the last `SIGHUP` reload's result in status, the check and the metrics.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::assert::arg;
use crate::support::pki::{self, Ca};
use crate::support::{TestEnv, wait_until};

#[test]
fn status_check_exit_codes_follow_the_plugin_convention() {
    let mut env = TestEnv::new();
    env.file_target("app", "");
    env.file_target("api", "");
    let mut agent = env.spawn_agent();

    // Nothing deployed yet: both certificates are missing.
    let out = env.ctl(&["status", "--check"]);
    out.assert_code(2);
    assert!(
        out.stdout
            .starts_with("CERTCTL CRITICAL - 2 critical of 2 targets: app: no certificate at "),
        "{out}"
    );
    assert_eq!(out.stdout.lines().count(), 1, "{out}");

    let leaf = pki::issue_cert(&["app.test"]);
    let f = env.inputs(&leaf, "app");
    env.ctl(&[
        "deploy",
        "app",
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
    ])
    .assert_code(0);
    let out = env.ctl(&["status", "--check", "app"]);
    out.assert_code(0);
    assert!(
        out.stdout
            .starts_with("CERTCTL OK - 1 target ok, the next to expire is app in ")
            && out.stdout.contains("d | app_days_left=")
            && out.stdout.trim_end().ends_with(";21:;0:"),
        "{out}"
    );

    // A certificate that expires in ten days warns, unless --warn-days is lower.
    let ca = Ca::root("Check Root");
    let soon = ca.leaf(&["api.test"]).valid_days(10).issue();
    let f = env.inputs(&soon, "api");
    env.ctl(&[
        "deploy",
        "api",
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
    ])
    .assert_code(0);
    let out = env.ctl(&["status", "--check", "api", "app"]);
    out.assert_code(1);
    assert!(
        out.stdout
            .starts_with("CERTCTL WARNING - 1 warning of 2 targets: api: expires in "),
        "{out}"
    );
    env.ctl(&["status", "--check", "--warn-days", "5"])
        .assert_code(0);
    let out = env.ctl(&["--json", "status", "--check"]);
    out.assert_code(1);
    let v = out.json();
    assert_eq!(v["status"], "WARNING", "{out}");
    assert_eq!(v["exit_code"], 1, "{out}");
    assert_eq!(v["findings"][0]["target"], "api", "{out}");

    // A name the agent does not know, and an agent that is gone: UNKNOWN.
    let out = env.ctl(&["status", "--check", "app", "nosuch"]);
    out.assert_code(3);
    assert!(
        out.stdout
            .starts_with("CERTCTL UNKNOWN - unknown target \"nosuch\" (configured: "),
        "{out}"
    );
    agent.terminate();
    let out = env.ctl(&["status", "--check"]);
    out.assert_code(3);
    assert!(
        out.stdout
            .starts_with("CERTCTL UNKNOWN - cannot reach the agent at "),
        "{out}"
    );
}

#[test]
fn the_last_config_reload_is_in_status_json_check_and_metrics() {
    let env = TestEnv::new();
    let agent = env.spawn_agent();
    let status = || env.ctl(&["--json", "status"]).assert_code(0).json();
    assert!(status()["agent"]["config_reload"].is_null());

    // A bad file: rejected, with the reason, and the check warns.
    let good = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        format!("{good}\n[[target]]\nname = \"bad\"\nkind = \"ngnix\"\n"),
    )
    .unwrap();
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reload rejected", Duration::from_secs(10));
    let reload = status()["agent"]["config_reload"].clone();
    assert_eq!(reload["accepted"], false, "{reload}");
    assert!(
        reload["unix_ms"].as_i64().is_some_and(|t| t > 0),
        "{reload}"
    );
    let error = reload["error"].as_str().unwrap_or_default();
    assert!(error.contains("did you mean \"nginx\""), "{reload}");
    let out = env.ctl(&["status"]);
    out.assert_code(0);
    assert!(
        out.stdout
            .contains("config: last reload (SIGHUP) REJECTED "),
        "{out}"
    );
    let out = env.ctl(&["status", "--check"]);
    out.assert_code(1);
    assert!(
        out.stdout
            .contains("agent: the last configuration reload was rejected "),
        "{out}"
    );
    let metrics = env.ctl(&["status", "--prometheus"]);
    assert!(
        metrics
            .stdout
            .contains("\ncertctl_config_reload_successful 0\n"),
        "{metrics}"
    );

    // Fixed: accepted, and all is well again.
    std::fs::write(env.config_path(), &good).unwrap();
    agent.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload is accepted", || {
        status()["agent"]["config_reload"]["accepted"] == true
    });
    assert!(status()["agent"]["config_reload"]["error"].is_null());
    env.ctl(&["status", "--check"]).assert_code(0);
    let metrics = env.ctl(&["status", "--prometheus"]);
    assert!(
        metrics
            .stdout
            .contains("\ncertctl_config_reload_successful 1\n"),
        "{metrics}"
    );
}
