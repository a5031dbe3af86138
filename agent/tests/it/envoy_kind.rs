//! Kind `envoy`, proven by its file contract. envoy is not in Debian's
//! archive (and nothing may be downloaded from outside it), so no envoy
//! runs here: these tests check the exact files envoy's file-based SDS
//! reads and the event it reloads on. The SDS resource file is valid YAML
//! (or JSON) holding one TLS certificate secret whose `certificate_chain`
//! and `private_key` resolve through `..data` to the deployed set and
//! whose `watched_directory` is the certificate directory; it is written
//! atomically, once, and left alone by later deploys (same bytes, same
//! inode); every deploy and rollback moves `..data` in the watched
//! directory, which is what makes envoy re-read the pair (seen here with
//! inotify, as envoy's watcher sees it); and a reader of the pair through
//! the stable names never sees a mismatched pair.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use serde_yaml_ng::Value;

use crate::support::assert::{done, temp_files};
use crate::support::kinds::deploy;
use crate::support::pki::{self, Leaf};
use crate::support::readers::{FileReader, PairReader};
use crate::support::{TestEnv, toml_path};

const TARGET: &str = "edge";

/// An envoy target in `<env>/targets/edge/`, its SDS file in
/// `<env>/envoy/<sds_name>`, with `extra` TOML.
fn setup(env: &mut TestEnv, sds_name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = env.target_dir(TARGET);
    let sds_dir = env.path().join("envoy");
    std::fs::create_dir_all(&sds_dir).unwrap();
    let sds = sds_dir.join(sds_name);
    env.target(
        TARGET,
        &format!(
            "kind = \"envoy\"\ncert_path = {}\nkey_path = {}\nsds_path = {}\n{extra}",
            toml_path(&dir.join("cert.pem")),
            toml_path(&dir.join("key.pem")),
            toml_path(&sds),
        ),
    );
    (dir, sds)
}

/// The one secret of an SDS file, parsed as envoy would (YAML is a
/// superset of JSON).
fn secret(text: &str) -> Result<Value, String> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let resources = doc["resources"].as_sequence().ok_or("no resources list")?;
    if resources.len() != 1 {
        return Err(format!("{} resources, want 1", resources.len()));
    }
    Ok(resources[0].clone())
}

/// Checks the SDS file against the target holding `leaf`.
#[track_caller]
fn assert_secret(sds: &Path, dir: &Path, name: &str, leaf: &Leaf) {
    let text = std::fs::read_to_string(sds).unwrap();
    let s = secret(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(
        s["@type"].as_str(),
        Some("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"),
        "{text}"
    );
    assert_eq!(s["name"].as_str(), Some(name), "{text}");
    let tls = &s["tls_certificate"];
    let chain = tls["certificate_chain"]["filename"].as_str().unwrap();
    let key = tls["private_key"]["filename"].as_str().unwrap();
    assert_eq!(Path::new(chain), dir.join("cert.pem"));
    assert_eq!(Path::new(key), dir.join("key.pem"));
    assert_eq!(
        tls["watched_directory"]["path"].as_str().map(Path::new),
        Some(dir),
        "{text}"
    );
    // What envoy reads through them: the deployed set, via ..data.
    assert_eq!(
        std::fs::read_to_string(chain).unwrap(),
        leaf.fullchain_pem()
    );
    assert_eq!(std::fs::read_to_string(key).unwrap(), leaf.key_pem);
    let generation = std::fs::read_link(dir.join("..data")).unwrap();
    assert_eq!(
        std::fs::canonicalize(key).unwrap(),
        std::fs::canonicalize(dir)
            .unwrap()
            .join(generation)
            .join("key.pem")
    );
}

/// Waits (bounded) for inotify to report `..data` moved into `dir`.
#[track_caller]
fn assert_data_moved_in(events: &mpsc::Receiver<notify::Result<notify::Event>>, dir: &Path) {
    let data = dir.join("..data");
    loop {
        let event = events
            .recv_timeout(Duration::from_secs(10))
            .expect("no move of ..data reported in the watched directory")
            .expect("watch error");
        if matches!(
            event.kind,
            EventKind::Modify(notify::event::ModifyKind::Name(_))
        ) && event.paths.contains(&data)
        {
            return;
        }
    }
}

#[test]
fn envoy_sds_file_names_the_set_once_and_every_switch_moves_data_in_the_watched_directory() {
    let mut env = TestEnv::new();
    let (dir, sds) = setup(&mut env, "sds.yaml", "secret_name = \"server_cert\"\n");
    let _agent = env.spawn_agent();
    let (tx, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx).unwrap();
    watcher.watch(&dir, RecursiveMode::NonRecursive).unwrap();

    let a = pki::issue_cert(&["edge.envoy.test"]);
    let out = deploy(&env, TARGET, &a, "a");
    out.assert_code(0);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "deployed", "{out}");
    let reloaded = lines.iter().find(|l| l["stage"] == "reloaded").unwrap();
    assert!(
        reloaded["message"]
            .as_str()
            .unwrap()
            .contains("written (secret server_cert)"),
        "{out}"
    );
    assert_data_moved_in(&events, &dir);
    assert_secret(&sds, &dir, "server_cert", &a);
    let meta = std::fs::metadata(&sds).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o644);
    let (bytes, ino) = (std::fs::read(&sds).unwrap(), meta.ino());

    // A new certificate: the SDS file stays (same bytes, same inode); the
    // switch of ..data in the watched directory is envoy's signal.
    let b = pki::issue_cert(&["edge.envoy.test"]);
    let out = deploy(&env, TARGET, &b, "b");
    out.assert_code(0);
    assert!(
        out.stdout.contains("unchanged; envoy re-reads the files"),
        "{out}"
    );
    assert_data_moved_in(&events, &dir);
    assert_secret(&sds, &dir, "server_cert", &b);
    assert_eq!(std::fs::read(&sds).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&sds).unwrap().ino(), ino);

    // Rollback is the same kind of switch.
    env.ctl(&["--json", "rollback", TARGET]).assert_code(0);
    assert_data_moved_in(&events, &dir);
    assert_secret(&sds, &dir, "server_cert", &a);
    assert_eq!(std::fs::metadata(&sds).unwrap().ino(), ino);

    assert!(temp_files(&dir).is_empty() && temp_files(sds.parent().unwrap()).is_empty());
}

#[test]
fn envoy_sds_file_may_be_json_and_the_secret_defaults_to_the_target_name() {
    let mut env = TestEnv::new();
    let (dir, sds) = setup(&mut env, "sds.json", "");
    let _agent = env.spawn_agent();
    let a = pki::issue_cert(&["edge.envoy.test"]);
    deploy(&env, TARGET, &a, "a").assert_code(0);
    let text = std::fs::read_to_string(&sds).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("envoy reads .json as JSON");
    assert_eq!(json["resources"][0]["name"], TARGET);
    assert_secret(&sds, &dir, TARGET, &a);
}

#[test]
fn envoy_pair_readers_never_see_a_torn_pair_during_200_deploys() {
    const DEPLOYS: usize = 200;
    let mut env = TestEnv::new();
    let (dir, sds) = setup(&mut env, "sds.yaml", "backup_retention = 2\n");
    let _agent = env.spawn_agent();
    let sets: Vec<Leaf> = (0..DEPLOYS)
        .map(|_| pki::issue_cert(&["edge.envoy.test"]))
        .collect();
    deploy(&env, TARGET, &sets[0], "s0").assert_code(0);
    let pairs = PairReader::start(&dir, &sets);
    let sds_reader = FileReader::start(&sds, |text| secret(text).map(|_| ()));
    for (i, leaf) in sets.iter().enumerate().skip(1) {
        deploy(&env, TARGET, leaf, &format!("s{i}")).assert_code(0);
    }
    let pairs = pairs.finish();
    let sds_seen = sds_reader.finish();
    assert!(pairs.violations.is_empty(), "{:#?}", pairs.violations);
    assert!(sds_seen.violations.is_empty(), "{:#?}", sds_seen.violations);
    assert!(pairs.checked > 0 && sds_seen.checked > 0, "{pairs:?}");
    assert_secret(&sds, &dir, TARGET, &sets[DEPLOYS - 1]);
}
