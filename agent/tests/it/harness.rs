//! Tests of the test harness (`support/`) that need no agent: the PKI,
//! nginx lifecycle and reload, the TLS probe, process cleanup, config writing
//! and the `certctl` binary lookup.

use std::os::unix::net::UnixListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::support::nginx::{Nginx, nginx_available};
use crate::support::pki::{Ca, KeyAlg, sha256_hex};
use crate::support::process::{ChildGuard, group_members, pid_alive, pid_exists, run_bounded};
use crate::support::tls::{probe, served_chain, served_leaf_sha256, wait_until_served};
use crate::support::{AgentProc, TestEnv, toml_array};

/// Bound for "nginx picked up the new certificate after reload".
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).expect("parse certificate").1
}

/// PEM blocks in `text`, as DER.
fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
    x509_parser::pem::Pem::iter_from_buffer(text.as_bytes())
        .map(|p| {
            let p = p.expect("valid PEM");
            (p.label, p.contents)
        })
        .collect()
}

fn dns_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

// === pki ===

#[test]
fn pki_chain_links_leaf_to_intermediate_to_root() {
    let root = Ca::root("Harness Root");
    let int = root.intermediate("Harness Intermediate");
    let leaf = int.leaf(&["a.test", "www.a.test"]).issue();

    let root_c = parse(&root.der);
    let int_c = parse(&int.der);
    let leaf_c = parse(&leaf.der);
    assert!(root_c.is_ca() && int_c.is_ca() && !leaf_c.is_ca());
    assert_eq!(leaf_c.issuer(), int_c.subject());
    assert_eq!(int_c.issuer(), root_c.subject());
    leaf_c
        .verify_signature(Some(int_c.public_key()))
        .expect("leaf signed by intermediate");
    int_c
        .verify_signature(Some(root_c.public_key()))
        .expect("intermediate signed by root");
    root_c.verify_signature(None).expect("root self-signed");
    assert!(
        leaf_c.verify_signature(Some(root_c.public_key())).is_err(),
        "leaf must not verify against the root directly"
    );

    assert_eq!(dns_sans(&leaf_c), ["a.test", "www.a.test"]);
    assert_eq!(leaf.sha256_hex, sha256_hex(&leaf.der));
    assert_eq!(leaf.sha256_hex.len(), 64);
    assert_eq!(leaf.chain_der, vec![int.der.clone()]);
    assert_eq!(
        pem_blocks(&leaf.chain_pem),
        [("CERTIFICATE".to_owned(), int.der.clone())]
    );
    assert_eq!(pem_blocks(&leaf.root_pem)[0].1, root.der);

    // Two intermediates: chain is issuer first, root excluded.
    let int2 = int.intermediate("Harness Intermediate 2");
    let deep = int2.leaf(&["deep.test"]).issue();
    assert_eq!(deep.chain_der, [int2.der.clone(), int.der.clone()]);
    // Straight from the root: no chain.
    let direct = root.leaf(&["direct.test"]).issue();
    assert!(direct.chain_pem.is_empty() && direct.chain_der.is_empty());
}

#[test]
fn pki_key_algorithms_and_validity_windows() {
    let int = Ca::root("R").intermediate("I");
    for alg in [KeyAlg::EcdsaP256, KeyAlg::EcdsaP384, KeyAlg::Ed25519] {
        let leaf = int.leaf(&["alg.test"]).alg(alg).issue();
        let cert = parse(&leaf.der);
        // The key in key_pem is the one the certificate certifies.
        let key = rcgen::KeyPair::from_pem(&leaf.key_pem).expect("key parses");
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&key),
            cert.public_key().raw,
            "{alg:?}"
        );
        assert_eq!(pem_blocks(&leaf.key_pem)[0].0, "PRIVATE KEY", "{alg:?}");
    }

    let now = time::OffsetDateTime::now_utc();
    let expired = int.leaf(&["old.test"]).expired().issue();
    assert!(parse(&expired.der).validity().not_after.to_datetime() < now);
    let future = int.leaf(&["new.test"]).not_yet_valid().issue();
    assert!(parse(&future.der).validity().not_before.to_datetime() > now);
    let short = int.leaf(&["short.test"]).valid_days(2).issue();
    let v = parse(&short.der).validity().clone();
    assert!(v.is_valid());
    let left = v.not_after.to_datetime() - now;
    assert!(
        left > time::Duration::days(1) && left <= time::Duration::days(2),
        "{left}"
    );
}

#[test]
fn pki_bundle_and_files() {
    let leaf = Ca::root("R").intermediate("I").leaf(&["b.test"]).issue();
    let labels: Vec<String> = pem_blocks(&leaf.bundle_pem())
        .into_iter()
        .map(|(l, _)| l)
        .collect();
    assert_eq!(labels, ["PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]);
    assert_eq!(
        pem_blocks(&leaf.fullchain_pem())
            .into_iter()
            .map(|(_, d)| d)
            .collect::<Vec<_>>(),
        leaf.served_der()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let files = leaf.write_files(dir.path(), "live");
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(&files.bundle), 0o600);
    assert_eq!(mode(&files.cert), 0o644);
    assert_eq!(
        std::fs::read_to_string(&files.fullchain).expect("read"),
        leaf.fullchain_pem()
    );
    assert_eq!(
        std::fs::read_to_string(&files.bundle).expect("read"),
        leaf.bundle_pem()
    );
}

// === nginx + tls ===

#[test]
fn nginx_serves_leaf_then_reload_serves_swapped_files() {
    if !nginx_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let int = Ca::root("R").intermediate("I");
    let a = int.leaf(&["a.test"]).issue();
    let b = int.leaf(&["a.test"]).alg(KeyAlg::EcdsaP384).issue();
    let live = a.write_files(&dir.path().join("tls"), "live");
    let ngx = Nginx::start(
        &dir.path().join("nginx"),
        "a.test",
        &live.fullchain,
        &live.key,
    );

    assert_eq!(
        served_leaf_sha256(ngx.port(), "a.test"),
        Ok(a.sha256_hex.clone())
    );
    assert_eq!(served_chain(ngx.port(), "a.test"), a.served_der());

    let validate = ngx.validate_argv();
    assert_eq!(validate[1..3], ["-t", "-q"]);
    assert!(
        validate[0].starts_with('/'),
        "absolute nginx path: {validate:?}"
    );
    let out = run_bounded(
        Command::new(&validate[0]).args(&validate[1..]),
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "nginx -t: {out:?}");

    b.write_files(&dir.path().join("tls"), "live");
    let old_workers = ngx.worker_pids();
    assert_eq!(old_workers.len(), 1, "{old_workers:?}");
    ngx.reload();
    // reload() returns once the old workers are gone: B from the first probe on.
    assert!(old_workers.iter().all(|p| !pid_alive(*p)));
    for _ in 0..5 {
        assert_eq!(
            served_leaf_sha256(ngx.port(), "a.test"),
            Ok(b.sha256_hex.clone())
        );
    }
    wait_until_served(ngx.port(), "a.test", &b.sha256_hex, RELOAD_TIMEOUT).unwrap_or_else(|e| {
        panic!("{e}\n{}", ngx.error_log());
    });
    assert_eq!(served_chain(ngx.port(), "a.test"), b.served_der());
}

#[test]
fn nginx_validate_rejects_mismatched_key_and_keeps_serving_old_cert() {
    if !nginx_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let int = Ca::root("R").intermediate("I");
    let a = int.leaf(&["m.test"]).issue();
    let b = int.leaf(&["m.test"]).issue();
    let live = a.write_files(&dir.path().join("tls"), "live");
    let ngx = Nginx::start(
        &dir.path().join("nginx"),
        "m.test",
        &live.fullchain,
        &live.key,
    );

    // Cert B with key A: what a torn deploy would leave behind.
    std::fs::write(&live.fullchain, b.fullchain_pem()).expect("write");
    let validate = ngx.validate_argv();
    let out = run_bounded(
        Command::new(&validate[0]).args(&validate[1..]),
        Duration::from_secs(30),
    );
    assert_ne!(out.code, 0, "nginx -t must reject a key mismatch: {out:?}");
    assert!(out.stderr.contains("key values mismatch"), "{out:?}");

    // `nginx -s reload` re-parses the config first and refuses; A stays served.
    let reload = ngx.reload_argv();
    let out = run_bounded(
        Command::new(&reload[0]).args(&reload[1..]),
        Duration::from_secs(30),
    );
    assert_ne!(out.code, 0, "reload with a mismatched key: {out:?}");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        served_leaf_sha256(ngx.port(), "m.test"),
        Ok(a.sha256_hex.clone())
    );
}

#[test]
fn nginx_sni_selects_second_vhost() {
    if !nginx_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let int = Ca::root("R").intermediate("I");
    let one = int.leaf(&["one.test"]).issue();
    let two = Ca::root("R2")
        .leaf(&["two.test"])
        .alg(KeyAlg::Ed25519)
        .issue();
    let f1 = one.write_files(&dir.path().join("tls"), "one");
    let f2 = two.write_files(&dir.path().join("tls"), "two");
    let ngx = Nginx::builder(&dir.path().join("nginx"))
        .vhost("one.test", &f1.fullchain, &f1.key)
        .vhost("two.test", &f2.fullchain, &f2.key)
        .start();

    assert_eq!(
        served_leaf_sha256(ngx.port(), "one.test"),
        Ok(one.sha256_hex.clone())
    );
    assert_eq!(
        served_leaf_sha256(ngx.port(), "two.test"),
        Ok(two.sha256_hex.clone())
    );
    // Unknown name: the first vhost is the default server.
    assert_eq!(
        served_leaf_sha256(ngx.port(), "other.test"),
        Ok(one.sha256_hex.clone())
    );
    assert_eq!(served_chain(ngx.port(), "one.test").len(), 2);
    assert_eq!(served_chain(ngx.port(), "two.test"), vec![two.der.clone()]);
}

#[test]
fn nginx_processes_are_gone_after_drop_and_after_panic() {
    if !nginx_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = Ca::root("R").leaf(&["gone.test"]).issue();
    let live = leaf.write_files(&dir.path().join("tls"), "live");

    // Normal drop: master and worker (same process group) are gone.
    let ngx = Nginx::start(
        &dir.path().join("n1"),
        "gone.test",
        &live.fullchain,
        &live.key,
    );
    let pids = wait_for_group(ngx.pid(), 2);
    if nix::unistd::geteuid().is_root() {
        // As root the worker runs as www-data (see support/nginx.rs) and still
        // serves the 0600 root-owned key the master loaded.
        let www_data = nix::unistd::User::from_name("www-data")
            .expect("getpwnam")
            .expect("www-data exists on Debian")
            .uid;
        let worker = *pids.iter().find(|p| **p != ngx.pid()).expect("a worker");
        // A fresh worker drops privileges a moment after fork.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_uid(worker) != Some(www_data.as_raw()) {
            assert!(
                Instant::now() < deadline,
                "worker uid {:?}",
                proc_uid(worker)
            );
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            served_leaf_sha256(ngx.port(), "gone.test"),
            Ok(leaf.sha256_hex.clone())
        );
    }
    drop(ngx);
    for pid in &pids {
        assert!(!pid_exists(*pid), "nginx pid {pid} still exists after drop");
    }

    // Dropped while a test panics.
    let seen = Mutex::new(Vec::new());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let ngx = Nginx::start(
            &dir.path().join("n2"),
            "gone.test",
            &live.fullchain,
            &live.key,
        );
        seen.lock()
            .expect("lock")
            .extend(wait_for_group(ngx.pid(), 2));
        panic!("deliberate panic with nginx running");
    }));
    assert!(result.is_err());
    let seen = seen.into_inner().expect("lock");
    assert!(seen.len() >= 2, "{seen:?}");
    for pid in &seen {
        assert!(
            !pid_exists(*pid),
            "nginx pid {pid} still exists after panic"
        );
    }
}

/// Real UID of a process, from `/proc/<pid>/status`.
fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The members of process group `pgid` once there are at least `n` (bounded).
fn wait_for_group(pgid: u32, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let members = group_members(pgid);
        if members.len() >= n || Instant::now() >= deadline {
            assert!(members.len() >= n, "group {pgid}: {members:?}");
            return members;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tls_probe_reports_errors() {
    // A port nothing listens on.
    let port = crate::support::free_port();
    let err = probe(port, "x.test").expect_err("nothing listens");
    assert!(err.contains("connect"), "{err}");

    // A plain TCP server that closes without speaking TLS.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = thread::spawn(move || drop(listener.accept()));
    let err = served_leaf_sha256(port, "x.test").expect_err("not TLS");
    assert!(!err.is_empty());
    server.join().expect("server thread");
}

// === processes ===

#[test]
fn child_guard_kills_its_process_group_on_drop() {
    // sh ignores nothing, but its background child would survive sh's death.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "sleep 600 & sleep 600"]);
    let guard = ChildGuard::spawn("sleeper", &mut cmd, Signal::SIGTERM, Duration::from_secs(2));
    let pids = wait_for_group(guard.pid(), 3);
    let leader = guard.pid();
    drop(guard);
    assert!(!pid_exists(leader), "leader {leader} not reaped");
    for pid in pids {
        assert!(!pid_alive(pid), "group member {pid} still running");
    }

    // A child that ignores the polite signal is killed after the grace period.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]);
    let mut guard = ChildGuard::spawn(
        "stubborn",
        &mut cmd,
        Signal::SIGTERM,
        Duration::from_millis(300),
    );
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let status = guard.stop();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(crate::support::process::exit_code(status), 128 + 9);
}

#[test]
fn agent_proc_panics_with_log_when_process_exits_early() {
    let env = TestEnv::new();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo 'config error: boom' >&2; exit 64"]);
    let result = catch_unwind(AssertUnwindSafe(|| {
        AgentProc::spawn(cmd, &env.socket(), &env.agent_log_path())
    }));
    let msg = *result
        .err()
        .expect("spawn must panic")
        .downcast::<String>()
        .expect("string panic");
    assert!(
        msg.contains("exited during startup") && msg.contains("boom"),
        "{msg}"
    );
}

#[test]
fn agent_proc_waits_for_socket_and_stops_on_drop() {
    let env = TestEnv::new();
    let socket = env.socket();
    // Stand-in agent: a long sleep; the socket appears (from this test) a bit later.
    let binder = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        UnixListener::bind(socket).expect("bind socket")
    });
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let started = Instant::now();
    let agent = AgentProc::spawn(cmd, &env.socket(), &env.agent_log_path());
    assert!(started.elapsed() >= Duration::from_millis(250));
    let _listener = binder.join().expect("binder");
    let pid = agent.pid();
    assert!(pid_alive(pid));
    drop(agent);
    assert!(!pid_exists(pid), "agent pid {pid} still exists after drop");
}

// === config and binaries ===

#[test]
fn config_has_contract_layout() {
    let mut env = TestEnv::new();
    let dir = env.target_dir("web");
    env.agent_option("settle", r#""200ms""#)
        .deploy_groups(&["certctl"])
        .target(
            "web",
            &format!(
                "kind = \"file\"\ncert_path = {}\nkey_path = {}\nreload = {}\n",
                crate::support::toml_path(&dir.join("web.crt")),
                crate::support::toml_path(&dir.join("web.key")),
                toml_array(&["true"]),
            ),
        )
        .target("mail", "kind = \"file\"\ncert_path = \"/x/c\"\nkey_path = \"/x/k\"\n[target.verify]\nendpoint = \"127.0.0.1:1\"");
    let path = env.write_config();
    assert_eq!(path, env.path().join("agent.toml"));
    let cfg: toml::Table = std::fs::read_to_string(&path)
        .expect("read")
        .parse()
        .expect("toml");
    let agent = cfg["agent"].as_table().expect("[agent]");
    assert_eq!(agent["socket"].as_str(), env.socket().to_str());
    assert_eq!(agent["state_dir"].as_str(), env.state_dir().to_str());
    assert_eq!(agent["drop_dir"].as_str(), env.drop_dir().to_str());
    assert_eq!(agent["deploy_groups"].as_array().expect("array").len(), 1);
    assert!(agent["read_groups"].as_array().expect("array").is_empty());
    assert_eq!(agent["settle"].as_str(), Some("200ms"));
    let targets = cfg["target"].as_array().expect("[[target]]");
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["name"].as_str(), Some("web"));
    assert_eq!(
        targets[0]["reload"].as_array().expect("argv")[0].as_str(),
        Some("true")
    );
    assert_eq!(
        targets[1]["verify"]["endpoint"].as_str(),
        Some("127.0.0.1:1")
    );
    for d in [
        env.state_dir(),
        env.drop_dir(),
        env.socket().parent().expect("run").to_owned(),
    ] {
        assert!(d.is_dir(), "{}", d.display());
    }
}

#[test]
fn certctl_binary_is_found_and_runs() {
    let env = TestEnv::new();
    let out = env.ctl(&["--version"]);
    out.assert_code(0);
    // As an unprivileged user (only when running as root): the binary and the
    // socket directory must be reachable for the permission tests.
    if let Some(out) = env.ctl_as(65534, 65534, &["--version"]) {
        out.assert_code(0);
    }
}
