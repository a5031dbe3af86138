//! The verification rule under real handovers: `verified` only after
//! `consecutive` matching handshakes in a row on fresh connections spread
//! over `settle`, at every endpoint of a target.
//!
//! - nginx with four workers and `nginx -s reload`: old workers hand out
//!   the previous certificate for a while after the first new handshake;
//!   after each verified deploy or rollback, immediate fresh handshakes
//!   never see the previous certificate.
//! - HAProxy round-robin in front of three nginx backends reloaded one at a
//!   time (a rolling reload): not verified before the last backend serves
//!   the new certificate.
//! - IPv4 and IPv6 listeners under two SNI names: verified only when all
//!   pass; one listener that keeps the old certificate rolls the deploy
//!   back, and the error names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::nginx::SNI;
use crate::support::assert::{arg, done};
use crate::support::haproxy::{Haproxy, haproxy_available};
use crate::support::nginx::{Listen, Nginx, nginx_available};
use crate::support::pki::{self, Leaf};
use crate::support::{TestEnv, tls, toml_str};

/// A second name of the same certificate.
const SNI2: &str = "www.web.test";

fn write_live(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("web.crt"), dir.join("web.key"));
    pki::write_mode(&cert, &leaf.fullchain_pem(), 0o644);
    pki::write_mode(&key, &leaf.key_pem, 0o600);
    (cert, key)
}

/// `sh -c` word for an argv.
fn sh_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Three fresh handshakes right away: what each served.
fn follow_ups(addr: SocketAddr, sni: &str) -> Vec<String> {
    (0..3)
        .map(|_| tls::served_leaf_sha256_at(addr, sni).unwrap_or_else(|e| e))
        .collect()
}

fn addr(endpoint: &str) -> SocketAddr {
    endpoint.parse().expect("a socket address")
}

#[test]
fn four_nginx_workers_never_serve_the_previous_certificate_once_verified() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    let (cert, key) = write_live(&env.target_dir("web"), &a);
    let nginx = Nginx::builder(&env.path().join("nginx"))
        .workers(4)
        .vhost(SNI, &cert, &key)
        .start();
    env.nginx_target("web", &nginx, SNI, None);
    // The rule's defaults (consecutive = 3, settle = "1s").
    env.append_to_target(
        "web",
        &format!(
            "[target.verify]\nendpoint = {}\nserver_name = {}\nattempts = 6\ntimeout = \"5s\"\n",
            toml_str(nginx.endpoint()),
            toml_str(SNI)
        ),
    );
    let agent = env.spawn_agent();
    let b = pki::issue_cert(&[SNI]);
    let fb = env.inputs(&b, "b");
    let at = addr(&nginx.endpoint());
    let mut stale = Vec::new();
    let mut seen = 0;
    const CYCLES: usize = 50;
    for cycle in 0..CYCLES {
        let out = env.ctl(&["--json", "deploy", "web", "--cert", arg(&fb.bundle)]);
        let result = done(&out.json_lines()).clone();
        assert_eq!(out.code, 0, "cycle {cycle}: {out}\n{}", agent.log());
        assert_eq!(result["verification"], "verified", "cycle {cycle}: {out}");
        for got in follow_ups(at, SNI) {
            seen += 1;
            if got != b.sha256_hex {
                stale.push(format!("cycle {cycle} after deploy: {got}"));
            }
        }
        let r = env.ctl(&["--json", "rollback", "web"]);
        let result = done(&r.json_lines()).clone();
        assert_eq!(r.code, 0, "cycle {cycle}: {r}\n{}", agent.log());
        assert_eq!(result["outcome"], "restored", "cycle {cycle}: {r}");
        assert_eq!(result["verification"], "verified", "cycle {cycle}: {r}");
        for got in follow_ups(at, SNI) {
            seen += 1;
            if got != a.sha256_hex {
                stale.push(format!("cycle {cycle} after rollback: {got}"));
            }
        }
    }
    assert_eq!(seen, CYCLES * 6);
    assert!(
        stale.is_empty(),
        "{} of {seen} follow-up handshakes did not see the verified certificate:\n{}",
        stale.len(),
        stale.join("\n")
    );
}

#[test]
fn a_rolling_reload_behind_a_load_balancer_is_verified_only_after_the_last_backend() {
    if !nginx_available() || !haproxy_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI]);
    // The backends share the target's files (as from shared storage or
    // configuration management) and are reloaded one at a time.
    let (cert, key) = write_live(&env.target_dir("web"), &a);
    let backends: Vec<Nginx> = (0..3)
        .map(|i| {
            Nginx::builder(&env.path().join(format!("nginx{i}")))
                .vhost(SNI, &cert, &key)
                .start()
        })
        .collect();
    let ports: Vec<u16> = backends.iter().map(Nginx::port).collect();
    let lb = Haproxy::start_balancer(&env.path().join("haproxy"), &ports);
    // The reload command starts the roll and returns, as an orchestrator
    // would: backend 0 now, 1 a second later, 2 a second after that. The
    // marker holds the time (ms) just before the last backend's reload.
    let marker = env.path().join("last-backend-reload-ms");
    let script = format!(
        "( {r0}; sleep 1; {r1}; sleep 1; date +%s%3N > '{m}'; {r2} ) </dev/null >/dev/null 2>&1 &",
        r0 = sh_words(&backends[0].reload_argv()),
        r1 = sh_words(&backends[1].reload_argv()),
        r2 = sh_words(&backends[2].reload_argv()),
        m = marker.display(),
    );
    let reload = vec!["sh".to_owned(), "-c".to_owned(), script];
    env.nginx_target("web", &backends[0], SNI, Some(&reload));
    env.append_to_target(
        "web",
        &format!(
            "[target.verify]\nendpoint = {}\nserver_name = {}\nattempts = 8\n\
             backoff = \"300ms\"\nmax_backoff = \"1s\"\ntimeout = \"5s\"\n",
            toml_str(lb.endpoint()),
            toml_str(SNI)
        ),
    );
    let agent = env.spawn_agent();
    let b = pki::issue_cert(&[SNI]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&["--json", "deploy", "web", "--cert", arg(&f.bundle)]);
    let lines = out.json_lines();
    let context = || format!("{out}\nagent log:\n{}\nhaproxy:\n{}", agent.log(), lb.log());
    assert_eq!(out.code, 0, "{}", context());
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{}", context());
    assert_eq!(result["verification"], "verified", "{}", context());
    let last_reload_ms: i64 = std::fs::read_to_string(&marker)
        .unwrap_or_else(|e| {
            panic!(
                "the roll did not reach the last backend: {e}\n{}",
                context()
            )
        })
        .trim()
        .parse()
        .unwrap();
    let attempts: Vec<(&serde_json::Value, i64)> = lines
        .iter()
        .filter_map(|l| Some((l.get("attempt")?, l["unix_ms"].as_i64()?)))
        .collect();
    // The rule saw the roll: old certificates among the handshakes ...
    assert!(
        attempts.iter().any(|(a, _)| a["reason"] == "mismatch"),
        "{}",
        context()
    );
    // ... and the series that verified ended after the last backend's
    // reload began: not verified before all three serve the new one.
    let (last, at) = attempts.last().expect("attempts");
    assert_eq!(last["ok"], true, "{}", context());
    assert_eq!(last["matches"], last["consecutive"], "{}", context());
    assert!(
        *at > last_reload_ms,
        "verified at {at} ms, before the last backend's reload at {last_reload_ms} ms\n{}",
        context()
    );
    // Every backend serves it, and so does the balancer, to fresh clients.
    for n in &backends {
        for got in follow_ups(addr(&n.endpoint()), SNI) {
            assert_eq!(got, b.sha256_hex, "backend {}\n{}", n.endpoint(), context());
        }
    }
    for got in follow_ups(addr(&lb.endpoint()), SNI) {
        assert_eq!(got, b.sha256_hex, "{}", context());
    }
}

/// `[target.verify]` with an `endpoints` list of tables (address, SNI).
fn endpoints_table(endpoints: &[(String, &str)], attempts: u32) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|(address, sni)| {
            format!(
                "{{ address = {}, server_name = {} }}",
                toml_str(address),
                toml_str(sni)
            )
        })
        .collect();
    format!(
        "[target.verify]\nendpoints = [{}]\nattempts = {attempts}\nbackoff = \"200ms\"\n\
         max_backoff = \"400ms\"\ntimeout = \"5s\"\nsettle = \"400ms\"\n",
        list.join(", ")
    )
}

#[test]
fn ipv4_and_ipv6_listeners_under_two_names_must_all_serve_it() {
    if !nginx_available() {
        return;
    }
    let mut env = TestEnv::new();
    let a = pki::issue_cert(&[SNI, SNI2]);

    // "web": one nginx listening on 127.0.0.1 and [::1], two names.
    let (cert, key) = write_live(&env.target_dir("web"), &a);
    let both = Nginx::builder(&env.path().join("nginx-both"))
        .listen(Listen::Both)
        .workers(2)
        .vhost(SNI, &cert, &key)
        .vhost(SNI2, &cert, &key)
        .start();
    env.nginx_target("web", &both, SNI, None);
    let web_endpoints = vec![
        (both.endpoint(), SNI),
        (both.endpoint(), SNI2),
        (both.endpoint_v6(), SNI),
        (both.endpoint_v6(), SNI2),
    ];
    env.append_to_target("web", &endpoints_table(&web_endpoints, 4));

    // "split": its IPv4 listener reads the target's files; the IPv6 one is
    // another nginx whose files are not the target's and keep the old leaf.
    let (scert, skey) = write_live(&env.target_dir("split"), &a);
    let v4 = Nginx::builder(&env.path().join("nginx-v4"))
        .vhost(SNI, &scert, &skey)
        .vhost(SNI2, &scert, &skey)
        .start();
    let stale_dir = env.path().join("stale");
    std::fs::create_dir_all(&stale_dir).unwrap();
    let (ocert, okey) = write_live(&stale_dir, &a);
    let v6 = Nginx::builder(&env.path().join("nginx-v6"))
        .listen(Listen::V6)
        .vhost(SNI, &ocert, &okey)
        .vhost(SNI2, &ocert, &okey)
        .start();
    env.nginx_target("split", &v4, SNI, None);
    env.append_to_target(
        "split",
        &endpoints_table(&[(v4.endpoint(), SNI), (v6.endpoint_v6(), SNI2)], 2),
    );
    let agent = env.spawn_agent();

    // Every listener and name serves it: verified, each endpoint shown.
    let b = pki::issue_cert(&[SNI, SNI2]);
    let f = env.inputs(&b, "b");
    let out = env.ctl(&["--json", "deploy", "web", "--cert", arg(&f.bundle)]);
    assert_eq!(out.code, 0, "{out}\n{}", agent.log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["verification"], "verified", "{out}");
    let checks = result["served_endpoints"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{out}");
    for ((endpoint, sni), c) in web_endpoints.iter().zip(checks) {
        assert_eq!(c["endpoint"], endpoint.as_str(), "{out}");
        assert_eq!(c["server_name"], *sni, "{out}");
        assert_eq!(c["state"], "verified", "{out}");
        assert_eq!(c["served_sha256"], b.sha256_hex.as_str(), "{out}");
        for got in follow_ups(addr(endpoint), sni) {
            assert_eq!(got, b.sha256_hex, "{endpoint} {sni}");
        }
    }
    let st = env.ctl(&["--json", "status", "web"]);
    let t = &st.json()["targets"][0];
    assert_eq!(t["verification"], "verified", "{st}");
    assert_eq!(t["served_endpoints"].as_array().unwrap().len(), 4, "{st}");
    let v = env.ctl(&["--json", "verify", "web"]);
    assert_eq!(v.code, 0, "{v}");
    assert_eq!(v.json()["checks"].as_array().unwrap().len(), 4, "{v}");
    let targets = env.ctl(&["--json", "targets"]);
    let listed = &targets.json()["targets"][0]["verify_endpoints"];
    assert_eq!(listed.as_array().unwrap().len(), 4, "{targets}");

    // The IPv6 listener of "split" keeps the old leaf: rolled back, and the
    // error names that endpoint.
    let out = env.ctl(&["--json", "deploy", "split", "--cert", arg(&f.bundle)]);
    assert_eq!(out.code, 5, "{out}\n{}", agent.log());
    let result = done(&out.json_lines()).clone();
    assert_eq!(result["outcome"], "rolled_back", "{out}");
    assert_eq!(result["disk_sha256"], a.sha256_hex.as_str(), "{out}");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "verification failed after 2 attempt(s): {} served",
            v6.endpoint_v6()
        )),
        "{error}"
    );
    assert!(
        !error.contains(&format!("{} served", v4.endpoint())),
        "{error}"
    );
    // The rollback proved the previous leaf at both again.
    assert!(error.contains("serve it again"), "{error}");
    let checks = result["served_endpoints"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{out}");
    assert!(checks.iter().all(|c| c["state"] == "verified"), "{out}");
    assert_eq!(std::fs::read_to_string(&scert).unwrap(), a.fullchain_pem());

    // certctl verify says which endpoint fails, and exits 5.
    let other = pki::issue_cert(&[SNI, SNI2]);
    pki::write_mode(&ocert, &other.fullchain_pem(), 0o644);
    pki::write_mode(&okey, &other.key_pem, 0o600);
    v6.reload();
    let v = env.ctl(&["--json", "verify", "split"]);
    assert_eq!(v.code, 5, "{v}");
    let j = v.json();
    assert_eq!(j["check"]["endpoint"], v6.endpoint_v6().as_str(), "{v}");
    assert_eq!(j["check"]["state"], "mismatch", "{v}");
    assert_eq!(j["checks"][0]["state"], "verified", "{v}");
    let st = env.ctl(&["--json", "status", "split"]);
    assert_eq!(st.json()["targets"][0]["verification"], "mismatch", "{st}");
    let human = env.ctl(&["status", "split"]);
    assert!(
        human.stdout.contains("mismatch at the last probe")
            && human.stdout.contains(&v6.endpoint_v6()),
        "{human}"
    );
}
