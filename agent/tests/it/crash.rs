//! Crash safety, proven on the real binary: a crash point at every stage,
//! a loop of SIGKILLs at random instants, and a filesystem that fails the
//! n-th operation (once or from then on, EIO and ENOSPC). After each fault
//! the agent is restarted, recovers, and the invariants of
//! DEPLOY-PROTOCOL.md are checked (`support::invariants`).
//!
//! The crash points and the filesystem seam are compiled into test builds
//! only (the `failpoints` feature, see `agent/src/failpoint.rs`).

use std::path::PathBuf;
use std::time::Duration;

use certctl_agent::failpoint::POINTS;
use nix::sys::signal::Signal;
use rand::Rng;

use crate::support::assert::arg;
use crate::support::endpoints::Endpoint;
use crate::support::invariants::{self, FileTarget};
use crate::support::pki::{self, Leaf};
use crate::support::{AgentProc, TestEnv, process, toml_str};

const RETENTION: usize = 2;

/// A file target `name` with `extra` TOML; returns its directory.
fn target(env: &mut TestEnv, name: &str, extra: &str) -> PathBuf {
    env.file_target(
        name,
        &format!("validate = [\"true\"]\nbackup_retention = {RETENTION}\n{extra}"),
    )
}

fn deploy(env: &TestEnv, name: &str, leaf: &Leaf, stem: &str) -> crate::support::CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&["--json", "deploy", name, "--cert", arg(&f.bundle)])
}

/// Every violation of the invariants for the given targets.
fn violations(env: &TestEnv, targets: &[FileTarget<'_>], sets: &[&Leaf]) -> Vec<String> {
    let mut v = invariants::journal(env);
    for t in targets {
        v.extend(invariants::files(t, sets));
        v.extend(invariants::status(env, t, sets));
    }
    v
}

/// Waits for an agent that is expected to die on its own (a crash point).
fn wait_crash(agent: &mut AgentProc) -> String {
    let status = agent
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the agent did not crash:\n{}", agent.log()));
    assert!(!status.success(), "{}", agent.log());
    agent.log()
}

#[test]
fn every_crash_point_recovers_to_a_whole_target() {
    // (crash point, extra env, which set must be on disk after recovery),
    // in each layout
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let mut cases: Vec<Case> = POINTS
        .iter()
        .map(|p| {
            let expect = match *p {
                // Before the commit completed: the previous set.
                "after-temp-write" | "after-temp-fsync" | "after-backup" | "between-renames" => {
                    "old"
                }
                // Committed: recovery completes the deploy.
                "after-commit" | "during-reload" | "after-retire" | "before-finish" => "new",
                // Verification cannot succeed (the endpoint serves the old
                // leaf), and a rollback was running: the previous set.
                "during-verify-wait" | "during-rollback" => "old",
                other => panic!("crash point {other} has no expectation in this test"),
            };
            (*p, Vec::new(), expect)
        })
        .collect();
    cases.push((
        "after-temp-write",
        vec![("CERTCTL_FAILPOINT_DROP_UNSYNCED", "1")],
        "old",
    ));

    let cases: Vec<(Case, &str)> = cases
        .into_iter()
        .flat_map(|c| [(c.clone(), "in-place"), (c, "generations")])
        .collect();
    for ((point, extra_env, expect), layout) in cases {
        let point_name = format!("{point} ({layout})");
        let point_name = point_name.as_str();
        let mut env = TestEnv::new();
        let old = pki::issue_cert(&["site.test"]);
        let new = pki::issue_cert(&["site.test"]);
        let server = Endpoint::tls(&old);
        let mut extra = String::new();
        if point == "during-rollback" {
            // The first reload fails (a rollback starts), later ones work.
            let flag = env.path().join("reload-failed-once");
            extra.push_str(&format!(
                "reload = [\"sh\", \"-c\", {}]\n",
                toml_str(format!(
                    "test -e '{0}' || {{ touch '{0}'; exit 1; }}",
                    flag.display()
                ))
            ));
        } else {
            extra.push_str("reload = [\"true\"]\n");
        }
        if point == "during-verify-wait" {
            extra.push_str(&format!(
                "[target.verify]\nendpoint = {}\nattempts = 2\nbackoff = \"200ms\"\ntimeout = \"2s\"\n",
                toml_str(server.endpoint())
            ));
        }
        let dir = target(
            &mut env,
            "site",
            &format!("layout = {}\n{extra}", toml_str(layout)),
        );

        let mut agent = env.spawn_agent();
        if point == "after-retire" {
            // Two sets before the old one: the new deploy then keeps
            // backups of three, one beyond retention (2), to retire.
            for i in 0..2 {
                let earlier = pki::issue_cert(&["site.test"]);
                deploy(&env, "site", &earlier, &format!("earlier{i}")).assert_code(0);
            }
        }
        deploy(&env, "site", &old, "old").assert_code(if point == "during-rollback" {
            // The first reload of all fails: nothing was there before.
            5
        } else {
            0
        });
        if point == "during-rollback" {
            // Now the flag exists: deploy the old set for real.
            deploy(&env, "site", &old, "old2").assert_code(0);
            std::fs::remove_file(env.path().join("reload-failed-once")).unwrap();
        }
        agent.terminate();

        let mut env_vars = vec![("CERTCTL_FAILPOINT", point)];
        env_vars.extend(extra_env.iter().copied());
        let mut agent = env.spawn_agent_env(&env_vars);
        let out = deploy(&env, "site", &new, "new");
        assert_ne!(out.code, 0, "{point_name}: the deploy cannot finish: {out}");
        let log = wait_crash(&mut agent);
        assert!(
            log.contains("failpoint: aborting") && log.contains(point),
            "{point_name}: the agent died elsewhere:\n{log}"
        );

        let backups = dir.join(".certctl/backup/site");
        if point == "after-retire" && layout == "in-place" {
            // Killed with the retired set renamed away and still whole.
            let partial = std::fs::read_dir(&backups)
                .unwrap()
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
            assert!(
                partial,
                "{point_name}: no retired set in {}",
                backups.display()
            );
        }

        let _agent = env.spawn_agent();
        let t = FileTarget {
            name: "site",
            dir: &dir,
            retention: RETENTION,
        };
        let v = violations(&env, &[t], &[&old, &new]);
        assert!(v.is_empty(), "{point_name}: {v:#?}");
        let want = if expect == "old" { &old } else { &new };
        assert_eq!(
            std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
            want.fullchain_pem(),
            "{point_name}: expected the {expect} set"
        );
        let history = env.ctl(&["--json", "history", "site"]);
        let newest = &history.json()["history"][0];
        assert_eq!(newest["recovered"], true, "{point_name}: {history}");
        let outcome = newest["outcome"].as_str().unwrap();
        match expect {
            "new" => assert_eq!(outcome, "deployed", "{point_name}: {history}"),
            _ => assert!(
                outcome == "rolled_back" || outcome == "rollback_failed",
                "{point_name}: {history}"
            ),
        }
    }
}

/// How many SIGKILLs the random loop delivers (CI default).
fn kill_count() -> usize {
    std::env::var("CERTCTL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn random_sigkills_during_deploys_never_tear_a_target() {
    let mut env = TestEnv::new();
    // Two in-place targets and one with the generations layout.
    let names = ["alpha", "beta", "gamma"];
    let dirs: Vec<PathBuf> = names
        .iter()
        .map(|n| {
            let layout = if *n == "gamma" {
                "layout = \"generations\"\n"
            } else {
                ""
            };
            target(&mut env, n, &format!("reload = [\"true\"]\n{layout}"))
        })
        .collect();
    let sets = [
        pki::issue_cert(&["site.test"]),
        pki::issue_cert(&["site.test"]),
    ];
    let set_refs: Vec<&Leaf> = sets.iter().collect();
    let inputs: Vec<_> = sets
        .iter()
        .enumerate()
        .map(|(i, s)| env.inputs(s, &format!("set{i}")))
        .collect();

    // A first, complete deploy of each target.
    let mut agent = env.spawn_agent();
    for n in names {
        env.ctl(&["deploy", n, "--cert", arg(&inputs[0].bundle)])
            .assert_code(0);
    }
    agent.terminate();

    let mut rng = rand::rng();
    let kills = kill_count();
    let mut all = Vec::new();
    for i in 0..kills {
        let agent = env.spawn_agent();
        let targets: Vec<FileTarget<'_>> = names
            .iter()
            .zip(&dirs)
            .map(|(n, d)| FileTarget {
                name: n,
                dir: d,
                retention: RETENTION,
            })
            .collect();
        for v in violations(&env, &targets, &set_refs) {
            all.push(format!("after kill {i}: {v}"));
        }
        // Three deploys in flight, one per target, then a kill at a random
        // instant (most land inside a deploy: they take a few ms).
        let mut clients = Vec::new();
        for (k, n) in names.iter().enumerate() {
            let set = rng.random_range(0..sets.len());
            clients.push(env.ctl_spawn(
                &["deploy", n, "--cert", arg(&inputs[set].bundle)],
                &format!("ctl-{i}-{k}.out"),
            ));
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..15_000)));
        agent.signal(Signal::SIGKILL);
        drop(agent);
        for (mut c, _) in clients {
            c.wait_timeout(Duration::from_secs(10));
        }
    }
    let _agent = env.spawn_agent();
    let targets: Vec<FileTarget<'_>> = names
        .iter()
        .zip(&dirs)
        .map(|(n, d)| FileTarget {
            name: n,
            dir: d,
            retention: RETENTION,
        })
        .collect();
    all.extend(violations(&env, &targets, &set_refs));
    let history = env.ctl(&["--json", "history", "--limit", "10000"]).json();
    let entries = history["history"].as_array().unwrap();
    let recovered = entries.iter().filter(|e| e["recovered"] == true).count();
    eprintln!(
        "crash loop: {kills} SIGKILLs, {} runs journaled, {recovered} finished by recovery, {} violations",
        entries.len(),
        all.len()
    );
    assert!(all.is_empty(), "{all:#?}");
    assert!(
        recovered > 0,
        "no kill landed inside a deploy: the loop proves nothing"
    );
}

#[test]
fn failing_the_nth_filesystem_operation_never_tears_a_target() {
    let mut env = TestEnv::new();
    let dir = target(&mut env, "site", "reload = [\"true\"]\n");
    let a = pki::issue_cert(&["site.test"]);
    let b = pki::issue_cert(&["site.test"]);
    let fa = env.inputs(&a, "a");
    let fb = env.inputs(&b, "b");
    let mut agent = env.spawn_agent();
    env.ctl(&["deploy", "site", "--cert", arg(&fa.bundle)])
        .assert_code(0);
    agent.terminate();

    let mut summary = Vec::new();
    let mut all = Vec::new();
    let mut current = &fa;
    for errno in ["EIO", "ENOSPC"] {
        for persist in [false, true] {
            let mut n = 1;
            loop {
                assert!(n < 200, "{errno} persist={persist}: never succeeded");
                let next = if std::ptr::eq(current, &fa) { &fb } else { &fa };
                let spec = format!("{n}:{errno}{}", if persist { ":persist" } else { "" });
                let mut agent = env.spawn_agent_env(&[("CERTCTL_FAULT_FS", &spec)]);
                let out = env.ctl(&["--json", "deploy", "site", "--cert", arg(&next.bundle)]);
                let log = agent.log();
                agent.terminate();
                let injected = log.contains("injected filesystem fault");
                let outcome = out
                    .json_lines()
                    .last()
                    .map(|l| l["result"]["outcome"].as_str().unwrap_or("").to_owned())
                    .unwrap_or_default();
                if injected
                    && outcome == "deployed"
                    && log
                        .lines()
                        .any(|l| l.contains("injected filesystem fault") && l.contains("fsync"))
                    && !log.contains("could not prune")
                {
                    all.push(format!(
                        "{spec}: a failed fsync ended in a deployed record:\n{out}"
                    ));
                }
                // Restart without faults: recovery, then the invariants.
                let _clean = env.spawn_agent();
                let t = FileTarget {
                    name: "site",
                    dir: &dir,
                    retention: RETENTION,
                };
                for v in violations(&env, &[t], &[&a, &b]) {
                    all.push(format!("{spec}: {v}"));
                }
                let on_disk = std::fs::read_to_string(dir.join("cert.pem")).unwrap_or_default();
                if on_disk == b.fullchain_pem() {
                    current = &fb;
                } else if on_disk == a.fullchain_pem() {
                    current = &fa;
                }
                drop(_clean);
                if !injected {
                    summary.push(format!(
                        "{errno}{}: {} faulted runs",
                        if persist { " persistent" } else { " once" },
                        n - 1
                    ));
                    break;
                }
                n += 1;
            }
        }
    }
    eprintln!("filesystem faults: {}", summary.join("; "));
    assert!(all.is_empty(), "{all:#?}");
}

#[test]
fn history_survives_restarts_and_status_shows_the_last_outcome() {
    let mut env = TestEnv::new();
    target(&mut env, "site", "reload = [\"true\"]\n");
    let a = pki::issue_cert(&["site.test"]);
    let mut agent = env.spawn_agent();
    deploy(&env, "site", &a, "a").assert_code(0);
    let bad = env.path().join("garbage.pem");
    std::fs::write(&bad, "not pem").unwrap();
    env.ctl(&["deploy", "site", "--cert", arg(&bad)])
        .assert_code(3);
    agent.terminate();

    let _agent = env.spawn_agent();
    let h = env.ctl(&["--json", "history", "site", "--limit", "5"]);
    h.assert_code(0);
    let entries = h.json()["history"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2, "{h}");
    assert_eq!(entries[0]["outcome"], "rejected", "{h}");
    assert_eq!(entries[1]["outcome"], "deployed", "{h}");
    assert_eq!(entries[1]["cert_sha256"], a.sha256_hex.as_str(), "{h}");
    let stages: Vec<&str> = entries[1]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "locked",
            "staged",
            "committed",
            "validate-command",
            "reloaded",
            "done"
        ],
        "{h}"
    );
    let st = env.ctl(&["--json", "status", "site"]);
    assert_eq!(
        st.json()["targets"][0]["last"]["outcome"],
        "rejected",
        "{st}"
    );
    // Bad input: an unknown target, a limit out of range.
    let unknown = env.ctl(&["history", "nope"]);
    unknown.assert_code(3);
    assert!(
        unknown.stderr.contains("unknown target \"nope\""),
        "{unknown}"
    );
    for limit in ["0", "10001", "many"] {
        let bad = env.ctl(&["history", "--limit", limit]);
        bad.assert_code(2);
        assert!(bad.stderr.contains("--limit"), "{bad}");
    }
    let human = env.ctl(&["history"]);
    human.assert_code(0);
    assert!(
        human.stdout.contains("deployed") && human.stdout.contains("rejected"),
        "{human}"
    );
    // The journal never holds key material.
    let journal = std::fs::read(env.state_dir().join("journal.sqlite")).unwrap();
    let key_body: String = a
        .key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !String::from_utf8_lossy(&journal).contains(&key_body[..40]),
        "key material in the journal"
    );
    let _ = process::read_lossy(&env.agent_log_path());
}
