//! Running a target's validate and reload commands.
//!
//! Guarantees: a command is an argv array run without a shell, with a clean
//! environment (a fixed `PATH` plus `CERTCTL_*` variables naming the target and
//! its files), stdin closed, in its own process group. When the timeout
//! expires the whole group is killed with `SIGKILL`, so a reload that forks a
//! helper and hangs cannot outlive its deploy. Output is captured up to a
//! bound; the tail of stderr (and stdout when stderr is empty) goes into the
//! error so the operator sees why a command failed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::host::search_path;

/// How much of each output stream is kept for error messages.
pub const OUTPUT_LIMIT: usize = 8 * 1024;

/// A command to run: its argv, its time limit and the extra environment.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// What the command is for, in messages: "validate" or "reload".
    pub purpose: &'a str,
    pub argv: &'a [String],
    pub timeout: Duration,
    pub env: Vec<(String, String)>,
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

/// Why a command did not succeed. The message names the command and carries
/// the tail of what it printed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The argv was empty: a configuration bug caught before anything runs.
    #[error("{purpose} command is empty")]
    Empty { purpose: String },
    /// The program could not be started (not found, not executable).
    #[error("{purpose} command `{program}` could not be started: {source}{hint}")]
    Spawn {
        purpose: String,
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited non-zero, or was killed by a signal.
    #[error("{purpose} command `{cmdline}` {status}{}", tail(.output))]
    Failed {
        purpose: String,
        cmdline: String,
        status: String,
        output: String,
    },
    /// It did not finish in time; its whole process group was killed.
    #[error("{purpose} command `{cmdline}` timed out after {timeout:?}; its process group was killed{}", tail(.output))]
    Timeout {
        purpose: String,
        cmdline: String,
        timeout: Duration,
        output: String,
    },
}

fn tail(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", output.trim())
    }
}

/// Shell-like rendering of an argv for messages (never executed).
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `spec` to completion or timeout. `Ok` only for exit status 0.
pub async fn run(spec: &Spec<'_>) -> Result<Output, CommandError> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(CommandError::Empty {
            purpose: spec.purpose.to_owned(),
        });
    };
    let cmdline = display_argv(spec.argv);
    let path = search_path();
    #[allow(clippy::disallowed_methods)] // the one module that starts processes
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", path)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        purpose: spec.purpose.to_owned(),
        program: program.clone(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            " (not found: install it or give an absolute path in the target's config)"
        } else {
            ""
        },
        source,
    })?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    if spec.purpose == "reload" {
        crate::failpoint::hit("during-reload");
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_task = tokio::spawn(read_bounded(stdout));
    let err_task = tokio::spawn(read_bounded(stderr));

    let waited = tokio::time::timeout(spec.timeout, child.wait()).await;
    let status = match waited {
        Ok(status) => Some(status),
        Err(_elapsed) => {
            if let Some(pgid) = pgid {
                // The group may already be gone; nothing to do then.
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            None
        }
    };
    // Pipes close when the whole group is gone; bound the wait in case a
    // grandchild escaped the group and holds them open.
    let collect = async {
        let out = out_task.await.unwrap_or_default();
        let err = err_task.await.unwrap_or_default();
        (out, err)
    };
    let (out, err) = tokio::time::timeout(Duration::from_secs(2), collect)
        .await
        .unwrap_or_default();
    let output = Output {
        stdout: out,
        stderr: err,
        duration: started.elapsed(),
    };
    let shown = if output.stderr.trim().is_empty() {
        output.stdout.clone()
    } else {
        output.stderr.clone()
    };
    match status {
        None => Err(CommandError::Timeout {
            purpose: spec.purpose.to_owned(),
            cmdline,
            timeout: spec.timeout,
            output: shown,
        }),
        Some(Ok(st)) if st.success() => Ok(output),
        Some(Ok(st)) => Err(CommandError::Failed {
            purpose: spec.purpose.to_owned(),
            cmdline,
            status: describe_status(st),
            output: shown,
        }),
        Some(Err(e)) => Err(CommandError::Failed {
            purpose: spec.purpose.to_owned(),
            cmdline,
            status: format!("could not be waited for ({e})"),
            output: shown,
        }),
    }
}

/// Slack past a remote command's own limit before its local `ssh` is
/// killed: `timeout -k` on the remote side has this long to end it.
const REMOTE_KILL_AFTER: Duration = Duration::from_secs(5);

/// The argv a remote target's command runs as on its host: under
/// `timeout` (coreutils: it kills the command at the limit there, and
/// `-k` sends `SIGKILL` if that is ignored), through `env` with the same
/// fixed `PATH` and `CERTCTL_*` variables a local command gets (the login
/// shell's `PATH` lacks `/usr/sbin`).
pub fn remote_argv(spec: &Spec<'_>) -> Vec<String> {
    let mut argv = vec![
        "timeout".to_owned(),
        "-k".to_owned(),
        format!("{}", REMOTE_KILL_AFTER.as_secs()),
        format!("{:.3}", spec.timeout.as_secs_f64()),
        "env".to_owned(),
        format!("PATH={}", crate::config::host::DEFAULT_PATH),
    ];
    argv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// Runs `spec` on a remote target's host through its SSH connection
/// ([`crate::remote::Session::run`]): the argv of [`remote_argv`], each
/// word quoted for the remote shell. `Ok` only for exit status 0; the
/// remote `timeout`'s 124 (and 137 after its `-k`) is a timeout.
pub async fn run_remote(
    session: std::sync::Arc<crate::remote::Session>,
    spec: &Spec<'_>,
) -> Result<Output, CommandError> {
    if spec.argv.is_empty() {
        return Err(CommandError::Empty {
            purpose: spec.purpose.to_owned(),
        });
    }
    let cmdline = display_argv(spec.argv);
    let argv = remote_argv(spec);
    let limit = spec.timeout + REMOTE_KILL_AFTER * 2;
    if spec.purpose == "reload" {
        crate::failpoint::hit("during-reload");
    }
    let started = Instant::now();
    let ran = tokio::task::spawn_blocking(move || session.run(&argv, limit))
        .await
        .map_err(|e| CommandError::Spawn {
            purpose: spec.purpose.to_owned(),
            program: "ssh".to_owned(),
            hint: "",
            source: std::io::Error::other(e.to_string()),
        })?;
    let out = match ran {
        Ok(out) => out,
        Err(e) => {
            return Err(CommandError::Spawn {
                purpose: spec.purpose.to_owned(),
                program: cmdline,
                hint: " (over SSH)",
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    let output = Output {
        stdout: out.stdout,
        stderr: out.stderr,
        duration: started.elapsed(),
    };
    let shown = if output.stderr.trim().is_empty() {
        output.stdout.clone()
    } else {
        output.stderr.clone()
    };
    match out.code {
        Some(0) => Ok(output),
        Some(124 | 137) => Err(CommandError::Timeout {
            purpose: spec.purpose.to_owned(),
            cmdline,
            timeout: spec.timeout,
            output: shown,
        }),
        Some(127) if shown.contains("timeout") || shown.contains("env:") => {
            Err(CommandError::Spawn {
                purpose: spec.purpose.to_owned(),
                program: spec.argv[0].clone(),
                hint: " (not found on the remote host: install it there, or give its absolute path)",
                source: std::io::Error::other(shown.trim().to_owned()),
            })
        }
        Some(code) => Err(CommandError::Failed {
            purpose: spec.purpose.to_owned(),
            cmdline,
            status: format!("exited with status {code} on the remote host"),
            output: shown,
        }),
        None => Err(CommandError::Failed {
            purpose: spec.purpose.to_owned(),
            cmdline,
            status: "ended without an exit status on the remote host (killed by a signal)"
                .to_owned(),
            output: shown,
        }),
    }
}

fn describe_status(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
            format!("was killed by {name}")
        }
        (None, None) => "ended abnormally".to_owned(),
    }
}

/// Reads a stream to its end, keeping the first `OUTPUT_LIMIT / 2` and the
/// last `OUTPUT_LIMIT / 2` bytes (the start says what ran, the end why it
/// failed), so a chatty command cannot grow the agent's memory.
async fn read_bounded<R: AsyncRead + Unpin>(stream: Option<R>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let half = OUTPUT_LIMIT / 2;
    let mut head = Vec::with_capacity(1024);
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut dropped = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut chunk = &buf[..n];
                if head.len() < half {
                    let take = chunk.len().min(half - head.len());
                    head.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                }
                tail.extend(chunk);
                while tail.len() > half {
                    tail.pop_front();
                    dropped += 1;
                }
            }
        }
    }
    let mut text = String::from_utf8_lossy(&head).into_owned();
    if dropped > 0 {
        text.push_str(&format!("\n[… {dropped} bytes omitted …]\n"));
    }
    text.push_str(&String::from_utf8_lossy(tail.make_contiguous()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    fn spec<'a>(argv: &'a [String], timeout: Duration) -> Spec<'a> {
        Spec {
            purpose: "reload",
            argv,
            timeout,
            env: vec![("CERTCTL_TARGET".into(), "web".into())],
        }
    }

    #[tokio::test]
    async fn success_captures_output_and_env_is_clean() {
        let a = argv(&["sh", "-c", "echo target=$CERTCTL_TARGET home=${HOME:-none}"]);
        let out = run(&spec(&a, Duration::from_secs(5))).await.unwrap();
        assert_eq!(out.stdout.trim(), "target=web home=none");
    }

    #[tokio::test]
    async fn failure_carries_status_and_stderr() {
        let a = argv(&["sh", "-c", "echo bad cert >&2; exit 3"]);
        let err = run(&spec(&a, Duration::from_secs(5))).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("exited with status 3"), "{msg}");
        assert!(msg.contains("bad cert"), "{msg}");
    }

    #[tokio::test]
    async fn missing_program_says_not_found() {
        let a = argv(&["/nonexistent/certctl-test-reload"]);
        let msg = run(&spec(&a, Duration::from_secs(5)))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.contains("could not be started"), "{msg}");
        assert!(msg.contains("not found"), "{msg}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!(
            "sleep 300 & echo $! > {}; echo started >&2; wait",
            pidfile.display()
        );
        let a = argv(&["sh", "-c", &script]);
        let err = run(&spec(&a, Duration::from_millis(500)))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CommandError::Timeout { .. }), "{msg}");
        assert!(msg.contains("started"), "{msg}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was in the group: it must be gone (or a zombie
        // awaiting its reaper), never still sleeping.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let alive = state.as_deref().is_some_and(|s| !s.contains(") Z "));
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "grandchild {pid} survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let a = argv(&[
            "sh",
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' x >&2; exit 1",
        ]);
        let msg = run(&spec(&a, Duration::from_secs(10)))
            .await
            .unwrap_err()
            .to_string();
        assert!(msg.len() < OUTPUT_LIMIT + 512, "{}", msg.len());
        assert!(msg.contains("bytes omitted"));
    }

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(display_argv(&argv(&["nginx", "-t"])), "nginx -t");
        assert_eq!(display_argv(&argv(&["sh", "-c", "a b"])), "sh -c 'a b'");
    }
}
