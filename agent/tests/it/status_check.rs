//! `certctl status --check` through the real agent: the monitoring-plugin
//! exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN) and the summary line.

use crate::support::TestEnv;
use crate::support::assert::arg;
use crate::support::pki::{self, Ca};

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
