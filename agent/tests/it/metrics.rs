//! Metrics through the real agent: after deploys, a rejected deploy, a
//! verification failure that rolls back, an operator rollback and a SIGHUP
//! reload, every counter moved, and `certctl status --prometheus` and the
//! `metrics_listen` endpoint say the same; a garbage drop moves the
//! rejected-drops counter.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::endpoints::refused_port;
use crate::support::{TestEnv, free_port, pki};

const WAIT: Duration = Duration::from_secs(20);

/// Value of the sample `series` (name and labels exactly as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One HTTP/1.1 request to the endpoint: (status line, body).
fn http(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to metrics");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn counters_move_and_both_readers_agree() {
    let mut env = TestEnv::new();
    let port = free_port();
    env.agent_option("metrics_listen", &format!("\"127.0.0.1:{port}\""));
    env.file_target("web", "");
    env.file_target(
        "probe",
        &format!(
            "[target.verify]\nendpoint = \"127.0.0.1:{}\"\nattempts = 1\ntimeout = \"2s\"\n",
            refused_port()
        ),
    );
    let agent = env.spawn_agent();
    agent.wait_for_log("metrics endpoint: GET /metrics", WAIT);

    let before = env
        .ctl(&["status", "--prometheus"])
        .assert_code(0)
        .stdout
        .clone();
    assert_eq!(
        value(
            &before,
            "certctl_deploys_total{target=\"web\",outcome=\"deployed\"}"
        ),
        None
    );
    assert_eq!(
        value(&before, "certctl_drops_total{outcome=\"accepted\"}"),
        Some(0.0)
    );

    let first = pki::issue_cert(&["app.test"]);
    let a = env.inputs(&first, "a");
    let b = env.inputs(&pki::issue_cert(&["app.test"]), "b");
    let other = env.inputs(&pki::issue_cert(&["app.test"]), "other");
    let arg = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    env.ctl(&["deploy", "web", "--cert", &arg(&a.bundle)])
        .assert_code(0);
    env.ctl(&["deploy", "web", "--cert", &arg(&b.bundle)])
        .assert_code(0);
    env.ctl(&["rollback", "web"]).assert_code(0);
    // A certificate with somebody else's key: rejected.
    env.ctl(&[
        "deploy",
        "web",
        "--cert",
        &arg(&a.cert),
        "--key",
        &arg(&other.key),
    ])
    .assert_code(3);
    // Nothing serves "probe": one refused attempt, then the deploy rolls back.
    env.ctl(&["deploy", "probe", "--cert", &arg(&a.bundle)])
        .assert_code(5);
    agent.signal(Signal::SIGHUP);
    agent.wait_for_log("configuration reloaded", WAIT);
    // Garbage renamed into the drop directory: rejected at once.
    let garbage = env.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    std::fs::rename(&garbage, env.drop_dir().join("web.pem")).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let t = env.ctl(&["status", "--prometheus"]).stdout;
        if value(&t, "certctl_drops_total{outcome=\"rejected\"}") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rejected drop counted:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let text = env
        .ctl(&["status", "--prometheus"])
        .assert_code(0)
        .stdout
        .clone();
    let (status, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for (reader, t) in [
        ("certctl status --prometheus", &text),
        ("GET /metrics", &body),
    ] {
        for (series, want) in [
            (
                "certctl_deploys_total{target=\"web\",outcome=\"deployed\"}",
                2.0,
            ),
            (
                "certctl_deploys_total{target=\"web\",outcome=\"rejected\"}",
                1.0,
            ),
            (
                "certctl_deploys_total{target=\"probe\",outcome=\"rolled_back\"}",
                1.0,
            ),
            (
                "certctl_rollbacks_total{target=\"web\",trigger=\"operator\",result=\"ok\"}",
                1.0,
            ),
            (
                "certctl_rollbacks_total{target=\"probe\",trigger=\"deploy\",result=\"ok\"}",
                1.0,
            ),
            (
                "certctl_verify_attempts_total{target=\"probe\",result=\"refused\"}",
                1.0,
            ),
            ("certctl_drops_total{outcome=\"rejected\"}", 1.0),
            ("certctl_config_reloads_total{result=\"ok\"}", 1.0),
            ("certctl_config_reloads_total{result=\"rejected\"}", 0.0),
            ("certctl_targets_configured", 2.0),
            // The rollback put the first certificate back.
            (
                "certctl_cert_not_after_seconds{target=\"web\"}",
                first.not_after.unix_timestamp() as f64,
            ),
        ] {
            assert_eq!(value(t, series), Some(want), "{reader}: {series}\n{t}");
        }
        // Stage timings: three commits on "web" (two deploys, one rollback)
        // and one on "probe".
        assert_eq!(
            value(
                t,
                "certctl_stage_duration_seconds_count{stage=\"committed\"}"
            ),
            Some(4.0),
            "{reader}\n{t}"
        );
        for stage in [
            "validated",
            "planned",
            "locked",
            "staged",
            "verify",
            "rollback",
        ] {
            let n = value(
                t,
                &format!("certctl_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
            );
            assert!(
                n.is_some_and(|n| n >= 1.0),
                "{reader}: no {stage} timing\n{t}"
            );
        }
        assert!(
            value(t, "certctl_agent_uptime_seconds").is_some_and(|u| u >= 0.0),
            "{reader}\n{t}"
        );
    }

    // The endpoint answers nothing else.
    let (status, _) = http(port, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, body) = http(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    let (status, _) = http(
        port,
        &format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(10_000)),
    );
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
}

#[test]
fn a_taken_metrics_port_stops_the_agent_with_a_remedy() {
    let mut env = TestEnv::new();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    env.agent_option("metrics_listen", &format!("\"127.0.0.1:{port}\""));
    let mut agent = crate::support::AgentProc::start(env.agent_command(), &env.agent_log_path());
    let status = agent.wait_exit(WAIT).expect("the agent exits");
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "cannot listen on agent.metrics_listen 127.0.0.1:{port}"
        )) && log.contains("choose a free port"),
        "{log}"
    );
    assert!(!env.socket().exists(), "nothing is left behind: {log}");
}
