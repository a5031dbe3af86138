//! The generations layout through the real agent: the configured paths are
//! stable links through `..data`, a deploy switches `..data` to a complete
//! new generation, a failed validate switches back, `certctl rollback`
//! switches between generations, retention prunes old ones, and regular
//! files from an in-place past are converted (and kept as backups).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::support::TestEnv;
use crate::support::assert::{arg, done, temp_files};
use crate::support::pki::{self, Leaf};

fn gens(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(".certctl"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("gen-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn data(dir: &Path) -> PathBuf {
    std::fs::read_link(dir.join("..data")).expect("..data is a symlink")
}

fn deploy(env: &TestEnv, leaf: &Leaf, stem: &str) -> crate::support::CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&["--json", "deploy", "site", "--cert", arg(&f.bundle)])
}

fn assert_serves(dir: &Path, leaf: &Leaf) {
    assert_eq!(
        std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        leaf.fullchain_pem()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        leaf.key_pem
    );
}

#[test]
fn deploys_switch_whole_generations_and_rollback_switches_back() {
    let mut env = TestEnv::new();
    let flag = env.path().join("fail-validate");
    let dir = env.file_target(
        "site",
        &format!(
            "layout = \"generations\"\nbackup_retention = 2\n\
             validate = [\"sh\", \"-c\", \"test ! -e '{}'\"]\n",
            flag.display()
        ),
    );
    let _agent = env.spawn_agent();

    let a = pki::issue_cert(&["site.test"]);
    deploy(&env, &a, "a").assert_code(0);
    for name in ["cert.pem", "key.pem"] {
        assert_eq!(
            std::fs::read_link(dir.join(name)).unwrap(),
            Path::new("..data").join(name)
        );
    }
    let first = data(&dir);
    assert!(first.starts_with(".certctl"), "{first:?}");
    assert_serves(&dir, &a);
    let key_meta = std::fs::metadata(dir.join("key.pem")).unwrap();
    assert_eq!(key_meta.mode() & 0o777, 0o600);
    let root_mode = std::fs::metadata(dir.join(".certctl")).unwrap().mode() & 0o777;
    assert_eq!(root_mode, 0o711, "the server must reach the generations");

    let b = pki::issue_cert(&["site.test"]);
    let out = deploy(&env, &b, "b");
    out.assert_code(0);
    assert!(
        out.stdout.contains("..data switched to the new generation"),
        "{out}"
    );
    assert_ne!(data(&dir), first);
    assert_serves(&dir, &b);
    assert_eq!(gens(&dir).len(), 2);

    // A failing validate switches back and drops the new generation.
    std::fs::write(&flag, "").unwrap();
    let c = pki::issue_cert(&["site.test"]);
    deploy(&env, &c, "c").assert_code(4);
    assert_serves(&dir, &b);
    assert_eq!(gens(&dir).len(), 2);
    std::fs::remove_file(&flag).unwrap();

    // Rollback: back to A, then forward to B.
    let before = data(&dir);
    let r = env.ctl(&["--json", "rollback", "site"]);
    r.assert_code(0);
    assert_eq!(done(&r.json_lines())["outcome"], "restored", "{r}");
    assert_eq!(data(&dir), first);
    assert_serves(&dir, &a);
    env.ctl(&["rollback", "site"]).assert_code(0);
    assert_eq!(data(&dir), before);
    assert_serves(&dir, &b);

    // Retention: the current generation and 2 more.
    for i in 0..3 {
        let l = pki::issue_cert(&["site.test"]);
        deploy(&env, &l, &format!("r{i}")).assert_code(0);
    }
    assert_eq!(gens(&dir).len(), 3, "{:?}", gens(&dir));
    assert!(temp_files(&dir).is_empty());
}

#[test]
fn regular_files_are_converted_to_links_and_kept_as_backups() {
    let mut env = TestEnv::new();
    let dir = env.file_target("site", "layout = \"generations\"\n");
    let old = pki::issue_cert(&["site.test"]);
    pki::write_mode(&dir.join("cert.pem"), &old.fullchain_pem(), 0o644);
    pki::write_mode(&dir.join("key.pem"), &old.key_pem, 0o600);
    let _agent = env.spawn_agent();

    let new = pki::issue_cert(&["site.test"]);
    let out = deploy(&env, &new, "new");
    out.assert_code(0);
    assert!(out.stdout.contains("path(s) became links"), "{out}");
    assert!(
        std::fs::symlink_metadata(dir.join("cert.pem"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_serves(&dir, &new);
    // The replaced regular files are kept; the key's mode came along.
    let backups: Vec<_> = std::fs::read_dir(dir.join(".certctl/backup/site"))
        .unwrap()
        .collect();
    assert_eq!(backups.len(), 1);
    let key = std::fs::metadata(dir.join("key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    // Identical material: nothing is written, no new generation.
    let before = gens(&dir);
    let again = deploy(&env, &new, "again");
    again.assert_code(0);
    assert_eq!(done(&again.json_lines())["outcome"], "unchanged", "{again}");
    assert_eq!(gens(&dir), before);
}

#[test]
fn a_foreign_symlink_at_a_configured_path_is_refused() {
    let mut env = TestEnv::new();
    let dir = env.file_target("site", "layout = \"generations\"\n");
    let elsewhere = env.path().join("elsewhere.pem");
    std::fs::write(&elsewhere, "operator's file").unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("cert.pem")).unwrap();
    let _agent = env.spawn_agent();
    let leaf = pki::issue_cert(&["site.test"]);
    let out = deploy(&env, &leaf, "x");
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stdout.contains("refusing to replace symlink"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&elsewhere).unwrap(),
        "operator's file"
    );
}
