//! Kind `traefik`, proven by its file contract. traefik is not in Debian's
//! archive, so no traefik runs here: these tests check the exact files
//! traefik's file provider reads (the dynamic configuration, and the
//! certificate and key it names, through the generations layout's links)
//! and the properties traefik relies on: the dynamic configuration is
//! valid YAML naming the stable paths, which resolve through `..data` to
//! the deployed set; it changes on every deploy and on `certctl rollback`
//! (traefik watches it, not the certificate files); it is replaced
//! atomically (a reader never sees it empty or partial, no temp file is
//! left); and a reader that opens cert and key through the stable names
//! during 200 deploys never sees a mismatched pair.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use crate::support::assert::{done, temp_files};
use crate::support::kinds::deploy;
use crate::support::pki::{self, Leaf};
use crate::support::readers::{FileReader, PairReader};
use crate::support::{TestEnv, toml_path};

const TARGET: &str = "web";

/// A traefik target in `<env>/targets/web/`, its dynamic configuration in
/// `<env>/traefik/dynamic/certctl-web.yml` (a file provider directory).
fn setup(env: &mut TestEnv) -> (PathBuf, PathBuf) {
    let dir = env.target_dir(TARGET);
    let dynamic = env.path().join("traefik/dynamic");
    std::fs::create_dir_all(&dynamic).unwrap();
    let config = dynamic.join("certctl-web.yml");
    env.target(
        TARGET,
        &format!(
            "kind = \"traefik\"\ncert_path = {}\nkey_path = {}\ndynamic_config = {}\n",
            toml_path(&dir.join("cert.pem")),
            toml_path(&dir.join("key.pem")),
            toml_path(&config),
        ),
    );
    (dir, config)
}

/// The dynamic configuration parsed: (certFile, keyFile, comment lines).
fn parse(text: &str) -> Result<(String, String, Vec<String>), String> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let certs = doc["tls"]["certificates"]
        .as_sequence()
        .ok_or("no tls.certificates list")?;
    if certs.len() != 1 {
        return Err(format!("{} certificates, want 1", certs.len()));
    }
    let field = |name: &str| {
        certs[0][name]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("no {name}"))
    };
    let comments = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    Ok((field("certFile")?, field("keyFile")?, comments))
}

/// Checks the dynamic configuration against the target after a deploy of
/// `leaf`; returns its text.
#[track_caller]
fn assert_names(config: &Path, dir: &Path, leaf: &Leaf) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let (cert, key, comments) = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(Path::new(&cert), dir.join("cert.pem"), "{text}");
    assert_eq!(Path::new(&key), dir.join("key.pem"), "{text}");
    // What traefik reads through them: the deployed set, in the generation
    // `..data` points at.
    assert_eq!(
        std::fs::read_to_string(&cert).unwrap(),
        leaf.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), leaf.key_pem);
    let generation = std::fs::read_link(dir.join("..data")).unwrap();
    let resolved = std::fs::canonicalize(&cert).unwrap();
    assert_eq!(
        resolved,
        std::fs::canonicalize(dir)
            .unwrap()
            .join(&generation)
            .join("cert.pem")
    );
    let id = generation
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_start_matches("gen-");
    assert_eq!(
        comments[1],
        format!("# generation {id}, leaf sha256 {}", leaf.sha256_hex),
        "{text}"
    );
    text
}

#[test]
fn traefik_dynamic_config_names_the_new_set_and_changes_on_every_deploy_and_rollback() {
    let mut env = TestEnv::new();
    let (dir, config) = setup(&mut env);
    let _agent = env.spawn_agent();

    let a = pki::issue_cert(&["web.traefik.test"]);
    let out = deploy(&env, TARGET, &a, "a");
    out.assert_code(0);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "deployed", "{out}");
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap()
            .contains("traefik dynamic configuration"),
        "{out}"
    );
    // The kind's layout: stable links through ..data.
    assert_eq!(
        std::fs::read_link(dir.join("cert.pem")).unwrap(),
        Path::new("..data/cert.pem")
    );
    let first = assert_names(&config, &dir, &a);
    let meta = std::fs::metadata(&config).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644, "it holds no key");
    assert_eq!(
        std::fs::metadata(dir.join("key.pem")).unwrap().mode() & 0o777,
        0o640
    );

    let b = pki::issue_cert(&["web.traefik.test"]);
    deploy(&env, TARGET, &b, "b").assert_code(0);
    let second = assert_names(&config, &dir, &b);
    assert_ne!(
        first, second,
        "a deploy must change the file traefik watches"
    );

    let out = env.ctl(&["--json", "rollback", TARGET]);
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["outcome"], "restored", "{out}");
    let rolled_back = assert_names(&config, &dir, &a);
    assert_ne!(rolled_back, second, "a rollback must change it too");
    // Back to A's generation: the file names it again.
    assert_eq!(rolled_back, first);

    // The same certificate again: nothing is switched, nothing rewritten.
    let before = std::fs::metadata(&config).unwrap().ino();
    let out = deploy(&env, TARGET, &a, "a-again");
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["outcome"], "unchanged", "{out}");
    assert_eq!(std::fs::metadata(&config).unwrap().ino(), before);

    for d in [&dir, config.parent().unwrap()] {
        assert!(temp_files(d).is_empty(), "{:?}", temp_files(d));
    }
    let names: Vec<_> = std::fs::read_dir(config.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["certctl-web.yml"], "only the file traefik loads");
}

#[test]
fn traefik_readers_never_see_a_torn_pair_or_a_partial_dynamic_config_during_200_deploys() {
    const DEPLOYS: usize = 200;
    let mut env = TestEnv::new();
    let (dir, config) = setup(&mut env);
    env.append_to_target(TARGET, "backup_retention = 2\n");
    let _agent = env.spawn_agent();
    let sets: Vec<Leaf> = (0..DEPLOYS)
        .map(|_| pki::issue_cert(&["web.traefik.test"]))
        .collect();
    // The first deploy creates the layout and the file; the readers start
    // on a complete target.
    deploy(&env, TARGET, &sets[0], "s0").assert_code(0);

    let pairs = PairReader::start(&dir, &sets);
    let expect_cert = dir.join("cert.pem").display().to_string();
    let yaml = FileReader::start(&config, move |text| {
        let (cert, _, comments) = parse(text)?;
        if cert != expect_cert || comments.len() != 2 {
            return Err(format!("unexpected content:\n{text}"));
        }
        Ok(())
    });
    for (i, leaf) in sets.iter().enumerate().skip(1) {
        deploy(&env, TARGET, leaf, &format!("s{i}")).assert_code(0);
    }
    let pairs = pairs.finish();
    let yaml = yaml.finish();

    assert!(pairs.violations.is_empty(), "{:#?}", pairs.violations);
    assert!(yaml.violations.is_empty(), "{:#?}", yaml.violations);
    assert!(pairs.checked > 0 && yaml.checked > 0, "{pairs:?} {yaml:?}");
    assert_names(&config, &dir, &sets[DEPLOYS - 1]);
    assert!(temp_files(&dir).is_empty() && temp_files(config.parent().unwrap()).is_empty());
}

#[test]
fn traefik_without_a_certificate_on_disk_removes_its_dynamic_config() {
    // A first deploy that fails verification is rolled back to nothing:
    // traefik must not be left pointing at files that do not exist.
    let mut env = TestEnv::new();
    let (dir, config) = setup(&mut env);
    let refused = crate::support::endpoints::refused_port();
    env.append_to_target(
        TARGET,
        &format!(
            "[target.verify]\nendpoint = \"127.0.0.1:{refused}\"\nattempts = 1\ntimeout = \"1s\"\n"
        ),
    );
    let _agent = env.spawn_agent();
    let a = pki::issue_cert(&["web.traefik.test"]);
    let out = deploy(&env, TARGET, &a, "a");
    out.assert_code(5);
    assert_eq!(done(&out.json_lines())["outcome"], "rolled_back", "{out}");
    assert!(!config.exists(), "{out}");
    assert!(std::fs::metadata(dir.join("cert.pem")).is_err());
    assert!(temp_files(config.parent().unwrap()).is_empty());
}
