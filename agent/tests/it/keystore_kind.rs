//! Kind `keystore` against the JDK on this machine. A PKCS#12 keystore
//! written by the agent is read by `keytool -list` (the alias, the new
//! certificate's SHA-256) and served by a Java TLS server
//! (`KeyStore.getInstance("PKCS12")`), which the agent's own verification
//! and our probe see in a handshake; a redeploy of the same certificate is
//! recognised as unchanged although PKCS#12 encryption is salted; `certctl
//! status` reads the leaf out of the keystore; `certctl rollback` puts the
//! previous keystore back, verified. A JKS keystore (through keytool) is
//! read by keytool and a Java server as JKS, and the password only ever
//! reaches keytool through a file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::assert::{done, temp_files};
use crate::support::java::{JavaTls, java_available, keytool_fingerprint, keytool_list};
use crate::support::kinds::{deploy, verify_table};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls, toml_path};

const TARGET: &str = "app";
const ALIAS: &str = "tomcat";
const SNI: &str = "app.java.test";

/// `<env>/secrets/keystore.pass` (0600) holding the password.
fn password_file(env: &TestEnv) -> PathBuf {
    let dir = env.path().join("secrets");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keystore.pass");
    pki::write_mode(&file, "s3cret-changeit\n", 0o600);
    file
}

fn target(env: &mut TestEnv, keystore: &Path, pass: &Path, extra: &str) {
    env.target(
        TARGET,
        &format!(
            "kind = \"keystore\"\nkeystore_path = {}\nalias = \"{ALIAS}\"\npassword_file = {}\n{extra}",
            toml_path(keystore),
            toml_path(pass),
        ),
    );
}

#[track_caller]
fn assert_listed(keystore: &Path, store_type: &str, pass: &Path, leaf: &Leaf) {
    let list = keytool_list(keystore, store_type, pass);
    assert!(list.contains(&format!("Alias name: {ALIAS}\n")), "{list}");
    assert!(list.contains("Entry type: PrivateKeyEntry"), "{list}");
    assert!(list.contains("Certificate chain length: 2"), "{list}");
    assert!(
        list.contains(&format!(
            "SHA256: {}",
            keytool_fingerprint(&leaf.sha256_hex)
        )),
        "keytool does not show {}:\n{list}",
        leaf.sha256_hex
    );
}

#[track_caller]
fn assert_served(java: &JavaTls, leaf: &Leaf) {
    if let Err(e) =
        tls::wait_until_served(java.port(), SNI, &leaf.sha256_hex, Duration::from_secs(20))
    {
        panic!("{e}\njava log:\n{}", java.log());
    }
}

fn status_sha256(env: &TestEnv) -> serde_json::Value {
    let out = env.ctl(&["--json", "status", TARGET]);
    out.assert_code(0);
    out.json()["targets"][0].clone()
}

#[test]
fn pkcs12_keystore_is_listed_by_keytool_served_by_java_and_rolled_back() {
    if !java_available() {
        return;
    }
    let mut env = TestEnv::new();
    let pass = password_file(&env);
    let dir = env.target_dir(TARGET);
    let keystore = dir.join("app.p12");
    let java = JavaTls::start(&env.path().join("java"), &keystore, "PKCS12", &pass);
    target(
        &mut env,
        &keystore,
        &pass,
        &verify_table(&java.endpoint(), SNI),
    );
    let agent = env.spawn_agent();
    let log = || format!("java:\n{}\nagent:\n{}", java.log(), agent.log());

    // Verified by the agent's handshake with the Java server; the Java
    // server reloads the keystore per connection, so "reloaded" is not a
    // stage here: the kind has no reload by default.
    let a = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &a, "a");
    assert_eq!(out.code, 0, "{out}\n{}", log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_eq!(result["served_sha256"], a.sha256_hex.as_str(), "{out}");
    assert_listed(&keystore, "PKCS12", &pass, &a);
    assert_served(&java, &a);
    let meta = std::fs::metadata(&keystore).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o640, "a keystore holds the key");
    assert_eq!(status_sha256(&env)["cert_sha256"], a.sha256_hex.as_str());

    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    assert_eq!(out.code, 0, "{out}\n{}", log());
    assert_listed(&keystore, "PKCS12", &pass, &b);
    assert_served(&java, &b);
    let st = status_sha256(&env);
    assert_eq!(st["cert_sha256"], b.sha256_hex.as_str(), "{st}");
    assert_eq!(st["disk_state"], "ok", "{st}");

    // Same certificate, new encryption salts: still "unchanged".
    let bytes = std::fs::read(&keystore).unwrap();
    let out = deploy(&env, TARGET, &b, "b-again");
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["outcome"], "unchanged", "{out}");
    assert_eq!(std::fs::read(&keystore).unwrap(), bytes);

    let out = env.ctl(&["--json", "rollback", TARGET]);
    assert_eq!(out.code, 0, "{out}\n{}", log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "restored", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_listed(&keystore, "PKCS12", &pass, &a);
    assert_served(&java, &a);
    assert_eq!(status_sha256(&env)["cert_sha256"], a.sha256_hex.as_str());
    assert!(temp_files(&dir).is_empty());
}

#[test]
fn jks_keystore_is_written_by_keytool_with_the_password_in_a_file() {
    if !java_available() {
        return;
    }
    let mut env = TestEnv::new();
    let pass = password_file(&env);
    let dir = env.target_dir(TARGET);
    let keystore = dir.join("app.jks");
    let java = JavaTls::start(&env.path().join("java"), &keystore, "JKS", &pass);
    target(
        &mut env,
        &keystore,
        &pass,
        &format!(
            "keystore_type = \"jks\"\n{}",
            verify_table(&java.endpoint(), SNI)
        ),
    );
    let agent = env.spawn_agent();
    let log = || format!("java:\n{}\nagent:\n{}", java.log(), agent.log());

    let a = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &a, "a");
    assert_eq!(out.code, 0, "{out}\n{}", log());
    assert_eq!(done(&out.json_lines())["verification"], "verified", "{out}");
    assert_listed(&keystore, "JKS", &pass, &a);
    assert_served(&java, &a);
    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    assert_eq!(out.code, 0, "{out}\n{}", log());
    assert_listed(&keystore, "JKS", &pass, &b);
    assert_eq!(status_sha256(&env)["cert_sha256"], b.sha256_hex.as_str());
    // keytool's scratch files are gone; its password never was an argument.
    let scratch = env.state_dir().join("keystore");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
    assert_eq!(
        std::fs::metadata(&scratch).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(!agent.log().contains("s3cret-changeit"));
}

#[test]
fn a_password_that_no_longer_opens_the_keystore_shows_in_status_and_a_deploy_rewrites_it() {
    let mut env = TestEnv::new();
    let pass = password_file(&env);
    let keystore = env.target_dir(TARGET).join("app.p12");
    target(&mut env, &keystore, &pass, "");
    let _agent = env.spawn_agent();
    let a = pki::issue_cert(&[SNI]);
    deploy(&env, TARGET, &a, "a").assert_code(0);

    pki::write_mode(&pass, "rotated-password\n", 0o600);
    let st = status_sha256(&env);
    let state = st["disk_state"].as_str().unwrap();
    assert!(
        state.starts_with("keystore: ") && state.contains("MAC check failed"),
        "{st}"
    );
    assert!(!state.contains("rotated-password"), "{st}");
    // The same certificate is written again, under the new password.
    let out = deploy(&env, TARGET, &a, "a-again");
    out.assert_code(0);
    assert_eq!(done(&out.json_lines())["outcome"], "deployed", "{out}");
    assert_eq!(status_sha256(&env)["cert_sha256"], a.sha256_hex.as_str());
    if java_available() {
        assert_listed(&keystore, "PKCS12", &pass, &a);
    }

    // Without a password nothing is written.
    let before = std::fs::read(&keystore).unwrap();
    std::fs::remove_file(&pass).unwrap();
    let b = pki::issue_cert(&[SNI]);
    let out = deploy(&env, TARGET, &b, "b");
    out.assert_code(1);
    assert!(
        out.stdout
            .contains("cannot read the keystore password from password_file")
            && out.stdout.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(std::fs::read(&keystore).unwrap(), before);
}

/// The value of `certctl_cert_not_after_seconds` for `target` in the
/// exposition `certctl status --prometheus` prints.
fn not_after_metric(env: &TestEnv, target: &str) -> Option<i64> {
    let out = env.ctl(&["status", "--prometheus"]);
    out.assert_code(0);
    let series = format!("certctl_cert_not_after_seconds{{target=\"{target}\"}} ");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse::<f64>().ok())
        .map(|v| v as i64)
}

/// `<env>/bin/keytool`: runs the JDK's keytool and appends one line per run
/// to `<env>/keytool.runs`, so a test can count the runs.
fn counting_keytool(env: &TestEnv) -> (PathBuf, PathBuf) {
    let real = crate::support::find_program("keytool", &["/usr/bin/keytool"]).expect("keytool");
    let bin = env.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let runs = env.path().join("keytool.runs");
    let script = bin.join("keytool");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\nexec '{}' \"$@\"\n",
            runs.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, runs)
}

fn runs(file: &Path) -> usize {
    std::fs::read_to_string(file).map_or(0, |s| s.lines().count())
}

#[test]
fn keystore_expiry_is_exported_from_the_keystore_itself() {
    if !java_available() {
        return;
    }
    let mut env = TestEnv::new();
    let pass = password_file(&env);
    let dir = env.target_dir(TARGET);
    target(&mut env, &dir.join("app.p12"), &pass, "");
    env.target(
        "legacy",
        &format!(
            "kind = \"keystore\"\nkeystore_type = \"jks\"\nkeystore_path = {}\nalias = \"{ALIAS}\"\npassword_file = {}\n",
            toml_path(&dir.join("legacy.jks")),
            toml_path(&pass),
        ),
    );
    let (bin, runs_file) = counting_keytool(&env);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let agent = env.spawn_agent_env(&[("PATH", &path)]);

    // Nothing deployed yet: no sample (a missing file is not a date).
    assert_eq!(not_after_metric(&env, TARGET), None, "{}", agent.log());

    let leaf = pki::issue_cert(&[SNI]);
    for target in [TARGET, "legacy"] {
        let out = deploy(&env, target, &leaf, target);
        assert_eq!(out.code, 0, "{out}\n{}", agent.log());
        let want = done(&out.json_lines())["not_after_unix"].as_i64().unwrap();
        assert!(want > 0, "{out}");
        assert_eq!(
            not_after_metric(&env, target),
            Some(want),
            "the expiry of {target}'s keystore is exported\n{}",
            agent.log()
        );
    }
    // One JKS deploy encodes the keystore once: one keytool conversion.
    assert_eq!(runs(&runs_file), 1, "keytool runs of one JKS deploy");
}
