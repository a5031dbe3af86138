//! Socket activation without systemd: `systemd-socket-activate` listens,
//! starts the real agent on the first connection with the socket as fd 3
//! (`LISTEN_FDS=1`, `LISTEN_PID`), exactly as `certctl-agent.socket` does.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::process::run_bounded;
use crate::support::{
    AgentProc, TestEnv, agent_bin, certctl_bin, find_program, pki, server_missing,
};

const WAIT: Duration = Duration::from_secs(20);

/// `systemd-socket-activate`, or None after a printed skip (or a panic, see
/// `server_missing`).
fn socket_activate() -> Option<PathBuf> {
    match find_program(
        "systemd-socket-activate",
        &[
            "/usr/bin/systemd-socket-activate",
            "/lib/systemd/systemd-socket-activate",
        ],
    ) {
        Some(p) => Some(p),
        None if server_missing("systemd-socket-activate (package systemd)") => None,
        None => unreachable!("server_missing panics unless skipping"),
    }
}

/// `systemd-socket-activate ARGS… -- certctl-agent --config <env>`.
fn activated_agent(activate: &Path, env: &TestEnv, args: &[&str]) -> Command {
    let config = env.write_config();
    let mut cmd = Command::new(activate);
    cmd.args(args)
        .arg(agent_bin())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .env_remove("CERTCTL_LOG");
    cmd
}

#[test]
fn an_activated_socket_is_served_and_left_to_its_owner() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let mut env = TestEnv::new();
    let dir = env.file_target("web", "");
    let socket = env.socket();
    let cmd = activated_agent(&activate, &env, &["-l", socket.to_str().unwrap()]);
    // The first connection (the wait) makes systemd-socket-activate exec the agent.
    let mut agent = AgentProc::spawn(cmd, &socket, &env.agent_log_path());
    agent.wait_for_log("socket activation: using the socket systemd passed", WAIT);

    let files = pki::issue_cert(&["app.test"]).write_files(&env.path().join("input"), "app");
    env.ctl(&["deploy", "web", "--cert", files.bundle.to_str().unwrap()])
        .assert_code(0);
    assert!(dir.join("cert.pem").exists());
    let status = env.ctl(&["--json", "status"]).assert_code(0).json();
    assert_eq!(
        status["agent"]["pid"].as_u64(),
        Some(u64::from(agent.pid())),
        "systemd-socket-activate execs the agent in place"
    );

    assert_eq!(agent.terminate().code(), Some(0), "{}", agent.log());
    assert!(
        socket.exists(),
        "the activated socket belongs to systemd and stays after the agent exits"
    );
}

#[test]
fn an_activated_socket_wins_over_agent_socket_with_a_warning() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let mut env = TestEnv::new();
    env.file_target("web", "");
    let other = env.path().join("run/activated.sock");
    let cmd = activated_agent(&activate, &env, &["-l", other.to_str().unwrap()]);
    let mut agent = AgentProc::spawn(cmd, &other, &env.agent_log_path());
    agent.wait_for_log("socket activation: systemd's socket is used", WAIT);
    assert!(
        !env.socket().exists(),
        "the agent binds nothing itself when activated"
    );
    let mut ctl = Command::new(certctl_bin());
    ctl.arg("--socket").arg(&other).args(["--json", "status"]);
    let out = run_bounded(&mut ctl, WAIT);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(other.to_str().unwrap()),
        "{}",
        out.stdout
    );
    assert_eq!(agent.terminate().code(), Some(0));
}

#[test]
fn socket_activation_refuses_what_it_cannot_serve() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let env = TestEnv::new();

    // A datagram socket: started by the first datagram, exits 1 naming the problem.
    let dgram = env.path().join("run/dgram.sock");
    let cmd = activated_agent(
        &activate,
        &env,
        &["--datagram", "-l", dgram.to_str().unwrap()],
    );
    let mut agent = AgentProc::start(cmd, &env.agent_log_path());
    crate::support::wait_until(WAIT, "systemd-socket-activate binds", || dgram.exists());
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"wake up", &dgram)
        .unwrap();
    let status = agent.wait_exit(WAIT).expect("the agent gives up");
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(
        agent.log().contains("is not a Unix stream socket"),
        "{}",
        agent.log()
    );

    // Two sockets: the agent takes exactly one.
    let (a, b) = (env.path().join("run/a.sock"), env.path().join("run/b.sock"));
    let cmd = activated_agent(
        &activate,
        &env,
        &["-l", a.to_str().unwrap(), "-l", b.to_str().unwrap()],
    );
    let mut agent = AgentProc::start(cmd, &env.agent_log_path());
    crate::support::wait_until(WAIT, "systemd-socket-activate binds", || a.exists());
    let _conn = std::os::unix::net::UnixStream::connect(&a).unwrap();
    let status = agent.wait_exit(WAIT).expect("the agent gives up");
    assert_eq!(status.code(), Some(1), "{}", agent.log());
    assert!(agent.log().contains("passed 2 sockets"), "{}", agent.log());
}
