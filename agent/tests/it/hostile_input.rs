//! Input files that lie about their size or type: `/dev/zero` (size 0,
//! endless), a FIFO (size 0, blocks), a 2 MB file, given as `--cert`,
//! `--key`, `--chain` to `certctl deploy` and (a 5 MB file, above the
//! configuration's 4 MiB limit) as `--config` to `certctl-agent
//! check-config`. Each gets a clear error and its exit code
//! (2 for the CLI, 64 for a configuration), without reading more than the
//! limit: the commands run under a 512 MiB address-space limit, which an
//! unbounded read of `/dev/zero` would exhaust in well under a second.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::assert::arg;
use crate::support::{TestEnv, agent_bin, certctl_bin, pki};

/// `program args` under `ulimit -v` (KiB): (exit code, stderr).
fn bounded(program: &Path, args: &[&str]) -> (i32, String) {
    let mut script = String::from("ulimit -v 524288; exec \"$0\"");
    for i in 1..=args.len() {
        script.push_str(&format!(" \"${i}\""));
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(program)
        .args(args)
        .env("CERTCTL_SOCKET", "/nonexistent/certctl.sock")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/dev/zero`, a FIFO nobody writes to, and a file of `big` bytes.
fn liars(env: &TestEnv, big_len: usize) -> Vec<(&'static str, PathBuf)> {
    let fifo = env.path().join("input.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = env.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; big_len]).unwrap();
    vec![
        ("device", PathBuf::from("/dev/zero")),
        ("fifo", fifo),
        ("big", big),
    ]
}

#[test]
fn lying_input_files_are_refused_by_the_cli_with_bounded_memory() {
    let env = TestEnv::new();
    let good = env.inputs(&pki::issue_cert(&["app.test"]), "good");
    for (what, path) in liars(&env, 2 * 1024 * 1024) {
        for flag in ["--cert", "--key", "--chain"] {
            let mut args = vec!["deploy", "app"];
            match flag {
                "--cert" => args.extend(["--cert", arg(&path)]),
                other => args.extend(["--cert", arg(&good.cert), other, arg(&path)]),
            }
            let (code, stderr) = bounded(certctl_bin(), &args);
            assert_eq!(code, 2, "{what} as {flag}: {stderr}");
            let named = stderr.contains(&format!("{flag} {}", path.display()));
            assert!(
                named,
                "{what} as {flag}: the error names the file: {stderr}"
            );
            let why = match what {
                "big" => "that is not a certificate or key file",
                _ => "not a regular file",
            };
            assert!(stderr.contains(why), "{what} as {flag}: {stderr}");
        }
    }
}

#[test]
fn lying_config_files_are_refused_by_check_config_with_bounded_memory() {
    let env = TestEnv::new();
    // Above the 4 MiB configuration limit.
    for (what, path) in liars(&env, 5 * 1024 * 1024) {
        let (code, stderr) = bounded(agent_bin(), &["check-config", "--config", arg(&path)]);
        assert_eq!(code, 64, "{what}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{what}: {stderr}"
        );
        let why = match what {
            "big" => "this is not a certctl configuration",
            _ => "not a regular file",
        };
        assert!(stderr.contains(why), "{what}: {stderr}");
    }
}
