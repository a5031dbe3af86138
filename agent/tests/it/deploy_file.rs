//! The real agent and CLI on a `file` target: deploy, no-op, dry run, every
//! kind of rejected input, validate and reload failures, owner/mode
//! precedence. Nothing here needs a server.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use crate::support::assert::{arg, done, snapshot};
use crate::support::pki::{self, Ca};
use crate::support::{TestEnv, toml_array};

/// A `file` target named `name` with `extra` keys: its cert and key paths.
fn file_target(env: &mut TestEnv, name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = env.file_target(name, extra);
    (dir.join("cert.pem"), dir.join("key.pem"))
}

#[test]
fn deploy_writes_fullchain_and_key_then_identical_input_is_a_noop() {
    let mut env = TestEnv::new();
    let (cert, key) = file_target(&mut env, "app", "");
    let _agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["app.test"]);
    let f = env.inputs(&leaf, "app");

    let out = env.ctl(&[
        "--json",
        "deploy",
        "app",
        "--cert",
        arg(&f.cert),
        "--key",
        arg(&f.key),
        "--chain",
        arg(&f.chain),
    ]);
    out.assert_code(0);
    let lines = out.json_lines();
    let stages: Vec<&str> = lines.iter().map(|l| l["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        [
            "validated",
            "planned",
            "locked",
            "staged",
            "committed",
            "done"
        ],
        "{out}"
    );
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed");
    assert_eq!(result["cert_sha256"], leaf.sha256_hex.clone());
    assert_eq!(result["verification"], "unverified");

    // No chain_path: the cert file holds leaf + chain; the key its own file.
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        leaf.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), leaf.key_pem);
    assert_eq!(std::fs::metadata(&cert).unwrap().mode() & 0o777, 0o644);
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);

    // The same material again, this time as one bundle: nothing to do.
    let before = snapshot(&env.target_dir("app"));
    let out = env.ctl(&["--json", "deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(0);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "unchanged", "{out}");
    assert!(!lines.iter().any(|l| l["stage"] == "staged"), "{out}");
    assert_eq!(snapshot(&env.target_dir("app")), before);

    // Status shows what is on disk and the last result.
    let status = env.ctl(&["--json", "status", "app"]);
    status.assert_code(0);
    let t = &status.json()["targets"][0];
    assert_eq!(t["cert_sha256"], leaf.sha256_hex.clone());
    assert_eq!(t["disk_state"], "ok");
    assert_eq!(t["verification"], "unverified");
    assert_eq!(t["last"]["outcome"], "unchanged");
}

#[test]
fn a_new_certificate_replaces_the_old_and_keeps_a_backup() {
    let mut env = TestEnv::new();
    let (cert, _key) = file_target(&mut env, "app", "backup_retention = 2\n");
    let _agent = env.spawn_agent();
    let ca = Ca::root("root").intermediate("int");
    let mut shas = Vec::new();
    for i in 0..4 {
        let leaf = ca.leaf(&["app.test"]).issue();
        let f = env.inputs(&leaf, &format!("v{i}"));
        env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)])
            .assert_code(0);
        assert_eq!(
            std::fs::read_to_string(&cert).unwrap(),
            leaf.fullchain_pem()
        );
        shas.push(leaf.sha256_hex.clone());
    }
    // Three deploys replaced something; retention keeps the newest two
    // (a set beyond it is renamed to `.<id>.partial` before the deploy
    // answers, and removed from there right after).
    let backups = env.target_dir("app").join(".certctl/backup/app");
    let kept: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .collect();
    assert_eq!(kept.len(), 2, "{backups:?}");
    assert_eq!(std::fs::metadata(&backups).unwrap().mode() & 0o777, 0o700);
    // No temp files are ever left beside the target.
    for e in std::fs::read_dir(env.target_dir("app")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with(".certctl-tmp-"), "{name}");
    }
}

#[test]
fn dry_run_reports_the_plan_and_changes_nothing() {
    let mut env = TestEnv::new();
    file_target(&mut env, "app", "");
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "app");
    let before = snapshot(&env.target_dir("app"));
    let out = env.ctl(&[
        "--json",
        "deploy",
        "app",
        "--cert",
        arg(&f.bundle),
        "--dry-run",
    ]);
    out.assert_code(0);
    let lines = out.json_lines();
    let planned = lines
        .iter()
        .find(|l| l["stage"] == "planned")
        .expect("planned event");
    let files = planned["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|f| f["changed"] == true));
    assert_eq!(files[1]["role"], "key");
    assert_eq!(files[1]["mode"], "0600");
    assert_eq!(done(&lines)["outcome"], "dry_run");
    assert_eq!(snapshot(&env.target_dir("app")), before);
    // Human output lists the files too.
    let human = env.ctl(&["deploy", "app", "--cert", arg(&f.bundle), "--dry-run"]);
    human.assert_code(0);
    assert!(human.stdout.contains("write key"), "{human}");
    assert!(
        human.stdout.contains("dry run: nothing was changed"),
        "{human}"
    );
}

#[test]
fn bad_input_is_rejected_with_exit_3_and_the_target_untouched() {
    let mut env = TestEnv::new();
    file_target(&mut env, "app", "");
    let _agent = env.spawn_agent();
    let good = pki::issue_cert(&["app.test"]);
    let gf = env.inputs(&good, "good");
    env.ctl(&["deploy", "app", "--cert", arg(&gf.bundle)])
        .assert_code(0);
    let before = snapshot(&env.target_dir("app"));

    let other = pki::issue_cert(&["app.test"]);
    let of = env.inputs(&other, "other");
    let expired = Ca::root("r")
        .intermediate("i")
        .leaf(&["app.test"])
        .expired()
        .issue();
    let ef = env.inputs(&expired, "expired");
    let garbage = env.path().join("input/garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let unrelated = pki::issue_cert(&["x.test"]);
    let with_unrelated = env.path().join("input/unrelated.pem");
    std::fs::write(
        &with_unrelated,
        format!("{}{}", good.bundle_pem(), unrelated.cert_pem),
    )
    .unwrap();

    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "new cert with the old key",
            vec![
                "deploy",
                "app",
                "--cert",
                arg(&gf.cert),
                "--key",
                arg(&of.key),
            ],
            "does not match",
        ),
        (
            "expired leaf",
            vec!["deploy", "app", "--cert", arg(&ef.bundle)],
            "expired",
        ),
        (
            "garbage PEM",
            vec![
                "deploy",
                "app",
                "--cert",
                arg(&garbage),
                "--key",
                arg(&gf.key),
            ],
            "--cert",
        ),
        (
            "no key",
            vec!["deploy", "app", "--cert", arg(&gf.cert)],
            "no private key",
        ),
        (
            "unrelated extra certificate",
            vec!["deploy", "app", "--cert", arg(&with_unrelated)],
            "not part of the chain",
        ),
        (
            "unknown target",
            vec!["deploy", "nope", "--cert", arg(&gf.bundle)],
            "unknown target \"nope\" (configured: app)",
        ),
    ];
    for (name, args, needle) in cases {
        let out = env.ctl(&args);
        assert_eq!(out.code, 3, "{name}\n{out}");
        assert!(
            out.stderr.contains(needle),
            "{name}: want {needle:?}\n{out}"
        );
        // Never any key material in what the user sees.
        for line in good
            .key_pem
            .lines()
            .chain(other.key_pem.lines())
            .filter(|l| !l.starts_with("-----"))
        {
            assert!(
                !out.stdout.contains(line) && !out.stderr.contains(line),
                "{name} leaked key material\n{out}"
            );
        }
        assert_eq!(
            snapshot(&env.target_dir("app")),
            before,
            "{name} changed the target"
        );
    }
}

#[test]
fn usage_errors_exit_2_and_an_absent_agent_exits_7() {
    let mut env = TestEnv::new();
    file_target(&mut env, "app", "");
    // No agent running.
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "app");
    let out = env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(7);
    assert!(out.stderr.contains("cannot reach the agent"), "{out}");
    assert!(out.stderr.contains("is certctl-agent running?"), "{out}");

    let out = env.ctl(&["deploy", "app", "--cert", "/nonexistent/cert.pem"]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("cannot read --cert /nonexistent/cert.pem"),
        "{out}"
    );
    env.ctl(&["deploy", "app"]).assert_code(2);
    env.ctl(&["frobnicate"]).assert_code(2);
}

#[test]
fn validate_failure_restores_the_previous_files_byte_for_byte() {
    let mut env = TestEnv::new();
    let marker = env.path().join("reloaded");
    let extra = format!(
        "validate = [\"sh\", \"-c\", \"echo 'bad cert in '$CERTCTL_CERT_PATH >&2; exit 1\"]\nreload = {}\n",
        toml_array(&["touch", marker.to_str().unwrap()])
    );
    let (cert, _) = file_target(&mut env, "app", &extra);
    // An existing set, deployed by hand before certctl.
    let old = pki::issue_cert(&["app.test"]);
    pki::write_mode(&cert, &old.fullchain_pem(), 0o644);
    pki::write_mode(&env.target_dir("app").join("key.pem"), &old.key_pem, 0o600);
    let before = snapshot(&env.target_dir("app"));
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "new");
    let out = env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(4);
    assert!(out.stderr.contains("validate command"), "{out}");
    assert!(out.stderr.contains("bad cert in"), "{out}");
    assert!(out.stderr.contains("not reloaded"), "{out}");
    assert_eq!(snapshot(&env.target_dir("app")), before);
    assert!(!marker.exists(), "reload ran after a failed validate");
}

#[test]
fn reload_failure_rolls_back_and_reloads_the_old_files() {
    let mut env = TestEnv::new();
    let state = env.path().join("reload-count");
    // Fails the first time, succeeds after: a transient reload failure.
    let script = format!(
        "n=$(cat {p} 2>/dev/null || echo 0); echo $((n+1)) > {p}; [ \"$n\" -ge 1 ] || {{ echo 'reload refused' >&2; exit 1; }}",
        p = state.display()
    );
    let (cert, key) = file_target(
        &mut env,
        "app",
        &format!("reload = {}\n", toml_array(&["sh", "-c", &script])),
    );
    let old = pki::issue_cert(&["app.test"]);
    pki::write_mode(&cert, &old.fullchain_pem(), 0o644);
    pki::write_mode(&key, &old.key_pem, 0o600);
    let before = snapshot(&env.target_dir("app"));
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "new");
    let out = env.ctl(&["--json", "deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(5);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "rolled_back");
    assert!(
        done(&lines)["error"]
            .as_str()
            .unwrap()
            .contains("reload refused"),
        "{out}"
    );
    assert!(lines.iter().any(|l| l["stage"] == "rollback"), "{out}");
    assert_eq!(snapshot(&env.target_dir("app")), before);
    // Reloaded once for the new files, once more for the old ones.
    assert_eq!(std::fs::read_to_string(&state).unwrap().trim(), "2");
}

#[test]
fn a_reload_that_always_fails_is_rollback_failed_exit_6() {
    let mut env = TestEnv::new();
    let (cert, key) = file_target(
        &mut env,
        "app",
        "reload = [\"sh\", \"-c\", \"echo down >&2; exit 7\"]\n",
    );
    let old = pki::issue_cert(&["app.test"]);
    pki::write_mode(&cert, &old.fullchain_pem(), 0o644);
    pki::write_mode(&key, &old.key_pem, 0o600);
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "new");
    let out = env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(6);
    assert!(
        out.stderr
            .contains("previous files are back on disk but reloading them failed"),
        "{out}"
    );
    // The old files are on disk: the operator only has to fix the server.
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), old.fullchain_pem());
}

#[test]
fn owner_and_mode_follow_existing_files_and_loose_keys_are_tightened() {
    let mut env = TestEnv::new();
    let (cert, key) = file_target(&mut env, "app", "");
    let old = pki::issue_cert(&["app.test"]);
    pki::write_mode(&cert, &old.fullchain_pem(), 0o604);
    pki::write_mode(&key, &old.key_pem, 0o644);
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "new");
    let out = env.ctl(&["--json", "deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(0);
    let lines = out.json_lines();
    let warnings = done(&lines)["warnings"].as_array().unwrap().clone();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("tightened to 0600")),
        "{out}"
    );
    assert_eq!(
        std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
        0o604
    );
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Explicit modes win over the existing ones.
    let mut env2 = TestEnv::new();
    let (cert2, _) = file_target(&mut env2, "app", "cert_mode = \"0640\"\n");
    pki::write_mode(&cert2, "old", 0o604);
    let _agent2 = env2.spawn_agent();
    let f2 = env2.inputs(&pki::issue_cert(&["app.test"]), "new");
    env2.ctl(&["deploy", "app", "--cert", arg(&f2.bundle)])
        .assert_code(0);
    assert_eq!(
        std::fs::metadata(&cert2).unwrap().permissions().mode() & 0o777,
        0o640
    );
}

#[test]
fn a_symlinked_target_file_is_refused() {
    let mut env = TestEnv::new();
    let (cert, _) = file_target(&mut env, "app", "");
    let real = env.path().join("elsewhere.pem");
    std::fs::write(&real, "operator's file").unwrap();
    std::os::unix::fs::symlink(&real, &cert).unwrap();
    let _agent = env.spawn_agent();
    let f = env.inputs(&pki::issue_cert(&["app.test"]), "new");
    let out = env.ctl(&["deploy", "app", "--cert", arg(&f.bundle)]);
    out.assert_code(1);
    assert!(out.stderr.contains("symlink"), "{out}");
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "operator's file");
    assert!(
        std::fs::symlink_metadata(&cert)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn oversized_and_empty_input_files_are_refused_before_anything_runs() {
    let mut env = TestEnv::new();
    let (cert, _) = file_target(&mut env, "app", "");
    let _agent = env.spawn_agent();
    let big = env.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 * 1024 * 1024]).unwrap();
    let out = env.ctl(&["deploy", "app", "--cert", arg(&big)]);
    out.assert_code(2);
    assert!(
        out.stderr
            .contains("is 2097152 bytes: that is not a certificate or key file"),
        "{out}"
    );

    let empty = env.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let out = env.ctl(&["deploy", "app", "--cert", arg(&empty)]);
    out.assert_code(3);
    assert!(
        out.stderr
            .contains("cert_pem is empty: pass the certificate"),
        "{out}"
    );
    assert!(!cert.exists());
}
