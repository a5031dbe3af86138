//! The shipped units pass `systemd-analyze`: `verify` prints nothing (it
//! exits 0 on many mistakes, so any output fails), and the service's
//! sandbox keeps its exposure at or below 2.1 (`security --offline`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::process::run_bounded;
use crate::support::{agent_bin, find_program, server_missing};

/// Highest `systemd-analyze security` exposure the service may have: 1.9
/// with `ProtectProc=invisible`; `ProtectProc=default` (0.2) is needed for
/// reading a caller's groups from `/proc/<pid>/status` (docs/security.md).
const MAX_EXPOSURE: f64 = 2.1;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn systemd_analyze() -> Option<PathBuf> {
    match find_program("systemd-analyze", &["/usr/bin/systemd-analyze"]) {
        Some(p) => Some(p),
        None if server_missing("systemd-analyze (package systemd)") => None,
        None => unreachable!("server_missing panics unless skipping"),
    }
}

/// Copies of the shipped units in a temp dir, `ExecStart=` pointing at the
/// freshly built agent (verify checks that the program exists).
fn units_under_test() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(repo_root().join("systemd/certctl-agent.service"))
        .unwrap()
        .replace("/usr/bin/certctl-agent", agent_bin().to_str().unwrap());
    let s = dir.path().join("certctl-agent.service");
    let k = dir.path().join("certctl-agent.socket");
    std::fs::write(&s, service).unwrap();
    std::fs::copy(repo_root().join("systemd/certctl-agent.socket"), &k).unwrap();
    (dir, s, k)
}

#[test]
fn units_pass_systemd_analyze_verify_silently() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let (_dir, service, socket) = units_under_test();
    let mut cmd = Command::new(analyze);
    // --man=no: the man pages are in the package, not on this host.
    cmd.args(["verify", "--man=no"]).arg(&service).arg(&socket);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (0, "", ""),
        "systemd-analyze verify must exit 0 and print nothing"
    );
}

#[test]
fn service_exposure_is_at_most_2_1() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let (_dir, service, _) = units_under_test();
    let mut cmd = Command::new(analyze);
    // --threshold is on the 0-100 scale: exposure 2.0 is 20.
    cmd.args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32))
        .arg(&service);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let text = format!("{}{}", out.stdout, out.stderr);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for certctl-agent.service:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    // Shown with the test's output (cargo test -- --nocapture) and on failure.
    eprintln!("systemd-analyze security: certctl-agent.service exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE && out.code == 0,
        "exposure {exposure} > {MAX_EXPOSURE} (exit {}):\n{text}",
        out.code
    );
}
