//! The Prometheus alerting rules the package ships
//! (`packaging/prometheus/certctl-alerts.yml`): `promtool` checks them and
//! runs their unit tests, and every `certctl_*` metric they use is one the
//! real agent exports, so a renamed metric cannot leave an alert silent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::endpoints::refused_port;
use crate::support::{TestEnv, find_program, pki, server_missing};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus")
}

fn promtool() -> Option<PathBuf> {
    let found = find_program("promtool", &["/usr/bin/promtool"]);
    if found.is_none() && server_missing("prometheus") {
        return None;
    }
    found
}

fn run(promtool: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(rules_dir())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", "certctl-alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "certctl-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The `certctl_*` names in the rules' expressions.
fn metrics_in_rules() -> BTreeSet<String> {
    let text = std::fs::read_to_string(rules_dir().join("certctl-alerts.yml")).expect("the rules");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(expr) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut rest = expr;
        while let Some(at) = rest.find("certctl_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

#[test]
fn every_metric_an_alert_uses_is_exported_by_the_agent() {
    let used = metrics_in_rules();
    assert!(used.len() >= 6, "{used:?}");

    let mut env = TestEnv::new();
    env.file_target("web", "");
    env.file_target(
        "probe",
        &format!(
            "[target.verify]\nendpoint = \"127.0.0.1:{}\"\nattempts = 1\ntimeout = \"2s\"\n",
            refused_port()
        ),
    );
    let _agent = env.spawn_agent();
    let leaf = env.inputs(&pki::issue_cert(&["web.test"]), "web");
    env.ctl(&["deploy", "web", "--cert", leaf.bundle.to_str().unwrap()])
        .assert_code(0);
    // Nothing answers at probe's endpoint: its first deploy is rolled back
    // after one probe, which is recorded as unreachable.
    env.ctl(&["deploy", "probe", "--cert", leaf.bundle.to_str().unwrap()])
        .assert_code(5);
    let text = env
        .ctl(&["status", "--prometheus"])
        .assert_code(0)
        .stdout
        .clone();
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the alerting rules use metrics the agent does not export: {missing:?}\n{text}"
    );
    assert!(
        text.contains("certctl_target_last_outcome{target=\"web\",outcome=\"deployed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("certctl_target_last_outcome{target=\"probe\",outcome=\"rolled_back\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("certctl_served_state{target=\"probe\",state=\"unreachable\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("certctl_served_state{target=\"web\""),
        "{text}"
    );
}
