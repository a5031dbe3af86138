//! What the agent tells systemd, seen through a stand-in `NOTIFY_SOCKET`:
//! `READY=1` only once the control socket accepts, `STATUS=` lines that
//! follow deploys, `WATCHDOG=1` at half of `WATCHDOG_USEC`,
//! `RELOADING=1`/`READY=1` around `SIGHUP`, `STOPPING=1` on `SIGTERM`, and
//! no more pings once the main loop hangs (the test failpoint).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::endpoints::refused_port;
use crate::support::notify::NotifySocket;
use crate::support::{AgentProc, TestEnv, pki};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn ready_status_watchdog_reload_and_stopping_reach_systemd() {
    let mut env = TestEnv::new();
    // Verification against a port nobody listens on: two refused attempts,
    // then the deploy rolls back (exit 5).
    env.file_target(
        "web",
        &format!(
            "[target.verify]\nendpoint = \"127.0.0.1:{}\"\nattempts = 2\nbackoff = \"300ms\"\n\
             max_backoff = \"300ms\"\ntimeout = \"2s\"\n",
            refused_port()
        ),
    );
    let mut notify = NotifySocket::bind(env.path());
    let mut cmd = env.agent_command();
    cmd.env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "400000");
    let mut agent = AgentProc::start(cmd, &env.agent_log_path());

    let ready = notify.wait_for("READY=1", 0, WAIT, |l| l == "READY=1");
    // READY=1 is sent once the socket listens: it accepts right away.
    UnixStream::connect(env.socket()).unwrap_or_else(|e| {
        panic!(
            "READY=1 arrived but the control socket refuses: {e}\n{}",
            agent.log()
        )
    });
    assert!(
        notify.messages()[ready]
            .lines()
            .any(|l| l == "STATUS=idle, 1 target, no deploy since start"),
        "{:?}",
        notify.messages()
    );
    env.ctl(&["status"]).assert_code(0);

    // Pings every 200ms (half of WATCHDOG_USEC).
    let deadline = Instant::now() + WAIT;
    while notify.count("WATCHDOG=1") < 2 {
        assert!(Instant::now() < deadline, "{:?}", notify.messages());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A deploy shows up in STATUS= while it runs and when it ended.
    let files = pki::issue_cert(&["app.test"]).write_files(&env.path().join("input"), "app");
    env.ctl(&["deploy", "web", "--cert", files.bundle.to_str().unwrap()])
        .assert_code(5);
    let done = notify.wait_for("the idle line after the deploy", 0, WAIT, |l| {
        l.starts_with("STATUS=idle, 1 target, last deploy web rolled_back ")
    });
    let statuses = notify.statuses();
    for want in [
        "deploying web: input checked",
        "deploying web: committed",
        "deploying web: verify attempt 1/2",
        "deploying web: verify attempt 2/2",
        "deploying web: rolling back",
    ] {
        assert!(
            statuses.iter().any(|s| s == want),
            "no STATUS={want}; got {statuses:#?}"
        );
    }

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    agent.signal(Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", done, WAIT, |l| l == "RELOADING=1");
    assert!(
        notify.messages()[reloading]
            .lines()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{:?}",
        notify.messages()[reloading]
    );
    notify.wait_for("READY=1 after RELOADING=1", reloading + 1, WAIT, |l| {
        l == "READY=1"
    });
    agent.wait_for_log("configuration reloaded", WAIT);

    // SIGTERM: STOPPING=1, exit 0.
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(WAIT).expect("agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    notify.wait_for("STOPPING=1", reloading, WAIT, |l| l == "STOPPING=1");
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_agent_runs() {
    // The harness's agents run without NOTIFY_SOCKET: nothing to assert
    // beyond a normal life, which every other test covers; here the
    // watchdog variables alone must not change anything either.
    let mut env = TestEnv::new();
    env.file_target("web", "");
    let mut cmd = env.agent_command();
    cmd.env("WATCHDOG_USEC", "100000");
    let mut agent = AgentProc::spawn(cmd, &env.socket(), &env.agent_log_path());
    env.ctl(&["status"]).assert_code(0);
    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.log());
    assert!(!agent.log().contains("NOTIFY_SOCKET"), "{}", agent.log());
}

#[test]
fn a_hung_main_loop_stops_the_watchdog_pings() {
    if !cfg!(debug_assertions) {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED a_hung_main_loop_stops_the_watchdog_pings: release test builds have no \
             failpoint (the end-to-end test builds the agent with --features failpoints)"
        );
        return;
    }
    let mut env = TestEnv::new();
    env.file_target("web", "");
    let trigger = env.path().join("hang");
    let mut notify = NotifySocket::bind(env.path());
    let mut cmd = env.agent_command();
    cmd.env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "200000")
        .env("CERTCTL_TEST_HANG_WATCHDOG", &trigger);
    let mut agent = AgentProc::start(cmd, &env.agent_log_path());
    notify.wait_for("READY=1", 0, WAIT, |l| l == "READY=1");
    let deadline = Instant::now() + WAIT;
    while notify.count("WATCHDOG=1") < 2 {
        assert!(Instant::now() < deadline, "{:?}", notify.messages());
        std::thread::sleep(Duration::from_millis(20));
    }

    std::fs::write(&trigger, b"").unwrap();
    // The main loop removes the trigger right before it hangs, and pings
    // after that check: once the file is gone, no ping can follow.
    let deadline = Instant::now() + WAIT;
    while trigger.exists() {
        assert!(
            Instant::now() < deadline,
            "the failpoint never fired\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.wait_for_log("failpoint CERTCTL_TEST_HANG_WATCHDOG", WAIT);
    let pings = notify.count("WATCHDOG=1");
    // Ten ping periods of silence.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        notify.count("WATCHDOG=1"),
        pings,
        "pings went on after the main loop hung"
    );
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(WAIT).expect("killed agent is reaped");
}

#[test]
fn a_drop_directory_not_watched_leads_the_status_line() {
    let mut env = TestEnv::new();
    env.file_target("web", "");
    let mut notify = NotifySocket::bind(env.path());
    let mut cmd = env.agent_command();
    cmd.env("NOTIFY_SOCKET", notify.path());
    let mut agent = AgentProc::start(cmd, &env.agent_log_path());
    let ready = notify.wait_for("READY=1", 0, WAIT, |l| l == "READY=1");

    let drop_dir = env.drop_dir();
    std::fs::rename(&drop_dir, drop_dir.with_extension("old")).unwrap();
    let want = format!(
        "STATUS=NOT WATCHING the drop directory {}; idle, 1 target, no deploy since start",
        drop_dir.display()
    );
    let lost = notify.wait_for("NOT WATCHING", ready, WAIT, |l| l == want);
    std::fs::create_dir(&drop_dir).unwrap();
    notify.wait_for("watching again", lost + 1, WAIT, |l| {
        l == "STATUS=idle, 1 target, no deploy since start"
    });
    let status = agent.terminate();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}
