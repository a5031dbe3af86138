//! haproxy's two control sockets, spoken directly: the master CLI
//! (`-S <socket>` / `master-worker` with a master socket), whose `reload`
//! starts new workers on the files on disk, and the runtime API (a `stats
//! socket ... level admin`), whose `set ssl cert` + `commit ssl cert`
//! replace a loaded certificate in the running workers without any reload.
//!
//! Guarantees: each command is one connection; the request is written, the
//! write side shut down (the master CLI only answers after that), and the
//! answer read to EOF up to [`MAX_ANSWER`] bytes. A reload counts as done
//! only when the master reports it (`show proc`: its reload counter moved)
//! and reports no new failed reload; a runtime update counts only after
//! haproxy answered `Success!` to the commit, and an uncommitted transaction
//! is aborted. The caller bounds every call in time. The PEM (with its
//! private key) is only ever in a zeroizing buffer and on the socket.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zeroize::Zeroizing;

/// Answers longer than this are refused (a `show proc` with hundreds of old
/// workers is still far below it).
pub const MAX_ANSWER: usize = 256 * 1024;

/// How often the master is asked whether its reload is done.
const POLL: Duration = Duration::from_millis(25);

/// Why haproxy did not take the new certificate.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error(
        "cannot connect to haproxy's {what} at {socket}: {source}; check that haproxy runs \
         with this socket ({hint})"
    )]
    Connect {
        what: &'static str,
        socket: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy's {what} at {socket}: {source}")]
    Io {
        what: &'static str,
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy's {what} at {socket} answered more than {MAX_ANSWER} bytes")]
    TooLarge { what: &'static str, socket: String },
    #[error(
        "haproxy's master at {socket} did not list itself in `show proc` (answer: {answer:?}); \
         is {socket} the master CLI socket (`haproxy -S`), not a stats socket?"
    )]
    NotMaster { socket: String, answer: String },
    #[error(
        "haproxy's master could not load the new configuration or files (failed reloads: \
         {failed}); the previous workers keep serving; haproxy's log says why{answer}"
    )]
    ReloadFailed { failed: u64, answer: String },
    #[error(
        "haproxy refused `set ssl cert {name}`: {answer}; the name must be the certificate \
         exactly as haproxy loaded it from a `crt` line (see `show ssl cert` on the admin socket): \
         set pem_path to that path"
    )]
    Set { name: String, answer: String },
    #[error("haproxy refused `commit ssl cert {name}`: {answer}; the transaction was aborted")]
    Commit { name: String, answer: String },
}

/// The master CLI's `reload`, confirmed by `show proc`. Returns a line for
/// the stage message.
pub async fn master_reload(socket: &Path) -> Result<String, HaproxyError> {
    let before = show_proc(socket).await?;
    let answer = exchange(socket, "master CLI", b"reload\n").await?;
    // haproxy 2.7 and later answer the reload itself.
    if let Some(rest) = answer.trim_start().strip_prefix("Success=") {
        if rest.starts_with('1') {
            return Ok(format!(
                "haproxy master reloaded through {}",
                socket.display()
            ));
        }
        return Err(HaproxyError::ReloadFailed {
            failed: before.failed + 1,
            answer: format!(": {}", one_line(&answer)),
        });
    }
    // Older ones re-execute the master, which closes the socket: wait until
    // it answers again and counts the reload.
    loop {
        tokio::time::sleep(POLL).await;
        let Ok(now) = show_proc(socket).await else {
            continue;
        };
        if now.reloads > before.reloads {
            if now.failed > before.failed {
                return Err(HaproxyError::ReloadFailed {
                    failed: now.failed,
                    answer: String::new(),
                });
            }
            return Ok(format!(
                "haproxy master reloaded through {} (reload {})",
                socket.display(),
                now.reloads
            ));
        }
    }
}

/// The master's counters from `show proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    reloads: u64,
    failed: u64,
}

async fn show_proc(socket: &Path) -> Result<Proc, HaproxyError> {
    let answer = exchange(socket, "master CLI", b"show proc\n").await?;
    parse_master(&answer).ok_or_else(|| HaproxyError::NotMaster {
        socket: socket.display().to_string(),
        answer: one_line(&answer),
    })
}

/// `<pid> master <reloads> [failed: <n>] <uptime> <version>`.
fn parse_master(show_proc: &str) -> Option<Proc> {
    let line = show_proc
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master"))?;
    let mut words = line.split_whitespace().skip(2);
    let reloads = words.next()?.parse().ok()?;
    let failed = match (words.next(), words.next()) {
        (Some("[failed:"), Some(n)) => n.trim_end_matches(']').parse().ok()?,
        _ => 0,
    };
    Some(Proc { reloads, failed })
}

/// The runtime API's `set ssl cert <name>` with `pem` as payload, then
/// `commit ssl cert <name>`; a failed commit is aborted.
pub async fn runtime_update(socket: &Path, name: &str, pem: &[u8]) -> Result<String, HaproxyError> {
    let mut request = Zeroizing::new(Vec::with_capacity(pem.len() + name.len() + 32));
    request.extend_from_slice(format!("set ssl cert {name} <<\n").as_bytes());
    // The payload ends at the first empty line, so none may be inside it;
    // blank lines between PEM blocks mean nothing.
    for line in pem.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.iter().all(u8::is_ascii_whitespace) {
            request.extend_from_slice(line);
            request.push(b'\n');
        }
    }
    request.push(b'\n');
    let answer = exchange(socket, "runtime API", &request).await?;
    if !answer.contains("Transaction created") && !answer.contains("Transaction updated") {
        return Err(HaproxyError::Set {
            name: name.to_owned(),
            answer: one_line(&answer),
        });
    }
    let commit = format!("commit ssl cert {name}\n");
    let answer = exchange(socket, "runtime API", commit.as_bytes()).await?;
    if !answer.contains("Success!") {
        let abort = format!("abort ssl cert {name}\n");
        let _ = exchange(socket, "runtime API", abort.as_bytes()).await;
        return Err(HaproxyError::Commit {
            name: name.to_owned(),
            answer: one_line(&answer),
        });
    }
    Ok(format!(
        "haproxy runtime API: {name} replaced in the running workers through {} (no reload)",
        socket.display()
    ))
}

/// One command on its own connection: write, shut down the write side,
/// read the answer to EOF (bounded).
async fn exchange(
    socket: &Path,
    what: &'static str,
    request: &[u8],
) -> Result<String, HaproxyError> {
    let name = socket.display().to_string();
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| HaproxyError::Connect {
            what,
            socket: name.clone(),
            hint: if what == "master CLI" {
                "`haproxy -W -S <socket>`, or `master-worker` with `-S`"
            } else {
                "`stats socket <path> level admin` in the global section"
            },
            source,
        })?;
    let io = |source| HaproxyError::Io {
        what,
        socket: name.clone(),
        source,
    };
    stream.write_all(request).await.map_err(io)?;
    stream.shutdown().await.map_err(io)?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER as u64 + 1)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    if answer.len() > MAX_ANSWER {
        return Err(HaproxyError::TooLarge { what, socket: name });
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The longest stretch of an answer quoted in a message.
const QUOTE_LIMIT: usize = 500;

/// haproxy's multi-line answer as one line for a message: lines joined,
/// control and invisible characters escaped, cut at [`QUOTE_LIMIT`]
/// characters.
fn one_line(answer: &str) -> String {
    let text = answer
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        return "no answer".to_owned();
    }
    crate::model::fmt::clipped(&text, QUOTE_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_master_line_of_show_proc() {
        let v26 = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
                   22502           master          2 [failed: 1]   0d00h00m04s     2.6.12-1+deb12u4\n\
                   # workers\n\
                   22551           worker          1               0d00h00m03s     2.6.12-1+deb12u4\n";
        assert_eq!(
            parse_master(v26),
            Some(Proc {
                reloads: 2,
                failed: 1
            })
        );
        let old = "#<PID> <type> <relative PID> <reloads> <uptime>\n1 master 0 5 0d0h\n";
        assert_eq!(parse_master(old).map(|p| p.failed), Some(0));
        assert_eq!(parse_master("Unknown command: 'show proc'\n"), None);
    }

    /// A fake haproxy socket: answers each connection with the next canned
    /// answer and records what it was sent.
    type Fake = (
        tempfile::TempDir,
        std::path::PathBuf,
        tokio::task::JoinHandle<Vec<String>>,
    );

    async fn fake(answers: Vec<String>) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                seen.push(String::from_utf8(got).unwrap());
                s.write_all(answer.as_bytes()).await.unwrap();
                drop(s);
            }
            seen
        });
        (dir, path, task)
    }

    fn owned(answers: &[&str]) -> Vec<String> {
        answers.iter().map(|a| (*a).to_owned()).collect()
    }

    #[tokio::test]
    async fn runtime_update_sets_then_commits_without_blank_lines() {
        let (_dir, path, task) = fake(owned(&[
            "Transaction created for certificate /t/live.pem!\n\n",
            "Committing /t/live.pem.\nSuccess!\n\n",
        ]))
        .await;
        let pem = b"-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\n-----BEGIN PRIVATE KEY-----\r\nBBB\r\n-----END PRIVATE KEY-----\n";
        let done = runtime_update(&path, "/t/live.pem", pem).await.unwrap();
        assert!(done.contains("no reload"), "{done}");
        let seen = task.await.unwrap();
        assert_eq!(
            seen[0],
            "set ssl cert /t/live.pem <<\n-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n\
             -----BEGIN PRIVATE KEY-----\nBBB\n-----END PRIVATE KEY-----\n\n"
        );
        assert_eq!(seen[1], "commit ssl cert /t/live.pem\n");
    }

    #[tokio::test]
    async fn a_failed_commit_is_aborted_and_explained() {
        let (_dir, path, task) = fake(owned(&[
            "Transaction created for certificate /t/live.pem!\n\n",
            "inconsistencies between private key and certificate loaded '/t/live.pem'.\nCan't commit /t/live.pem!\n\n",
            "Transaction aborted for certificate '/t/live.pem'!\n\n",
        ]))
        .await;
        let err = runtime_update(&path, "/t/live.pem", b"x\n")
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "haproxy refused `commit ssl cert /t/live.pem`: inconsistencies between private key and \
             certificate loaded '/t/live.pem'. Can't commit /t/live.pem!; the transaction was aborted"
        );
        assert_eq!(task.await.unwrap()[2], "abort ssl cert /t/live.pem\n");
    }

    #[tokio::test]
    async fn an_unknown_certificate_name_says_how_to_fix_it() {
        let (_dir, path, _task) = fake(owned(&[
            "Can't replace a certificate which is not referenced by the configuration!\nCan't update /t/x.pem!\n\n",
        ]))
        .await;
        let err = runtime_update(&path, "/t/x.pem", b"x\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not referenced by the configuration"), "{err}");
        assert!(err.contains("show ssl cert"), "{err}");
    }

    #[tokio::test]
    async fn master_reload_waits_for_the_counter_and_reports_failures() {
        let proc = |reloads: u32, failed: u32| {
            format!(
                "#<PID> <type> <reloads>\n7 master {reloads} [failed: {failed}] 0d 2.6\n# workers\n"
            )
        };
        let (_dir, path, _task) =
            fake(vec![proc(0, 0), String::new(), proc(0, 0), proc(1, 0)]).await;
        let done = master_reload(&path).await.unwrap();
        assert!(done.contains("reload 1"), "{done}");

        let (_dir, path, _task) = fake(vec![proc(3, 0), String::new(), proc(4, 1)]).await;
        let err = master_reload(&path).await.unwrap_err().to_string();
        assert!(err.contains("previous workers keep serving"), "{err}");

        let (_dir, path, _task) = fake(vec![
            proc(1, 0),
            "Success=0\n--\n[ALERT] bad cfg\n".to_owned(),
        ])
        .await;
        let err = master_reload(&path).await.unwrap_err().to_string();
        assert!(err.contains("bad cfg"), "{err}");

        let (_dir, path, _task) = fake(owned(&["Unknown command\n"])).await;
        let err = master_reload(&path).await.unwrap_err().to_string();
        assert!(err.contains("not a stats socket"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_names_the_haproxy_setting() {
        let err = master_reload(Path::new("/nonexistent/master.sock"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot connect to haproxy's master CLI at /nonexistent/master.sock"),
            "{err}"
        );
        assert!(err.contains("-S"), "{err}");
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzzing what haproxy answers: `show proc` listings of any shape give
    //! the master's counters or nothing, and any answer to the runtime API
    //! ends in success only on haproxy's own words, with a one-line message
    //! otherwise.

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A `show proc` listing as haproxy 2.x prints it, with workers and old
    /// workers in any number.
    fn show_proc() -> impl Strategy<Value = (String, Proc)> {
        (
            0u64..100_000,
            proptest::option::of(0u64..1000),
            proptest::collection::vec((1u32..99_999, 0u64..50), 0..6),
            proptest::collection::vec((1u32..99_999, 0u64..50), 0..6),
            "[0-9]\\.[0-9]{1,2}\\.[0-9]{1,2}(-[0-9a-z+.]{1,12})?",
        )
            .prop_map(|(reloads, failed, workers, old, version)| {
                let mut s = "#<PID>          <type>          <reloads>       <uptime>        <version>\n".to_owned();
                let counter = match failed {
                    Some(f) => format!("{reloads} [failed: {f}]"),
                    None => reloads.to_string(),
                };
                s.push_str(&format!("1234            master          {counter}   0d00h00m04s     {version}\n"));
                s.push_str("# workers\n");
                for (pid, r) in &workers {
                    s.push_str(&format!("{pid}           worker          {r}               0d00h00m03s     {version}\n"));
                }
                if !old.is_empty() {
                    s.push_str("# old workers\n");
                    for (pid, r) in &old {
                        s.push_str(&format!("{pid}           worker          {r}               0d00h01m03s     {version}\n"));
                    }
                }
                s.push_str("# programs\n\n");
                (s, Proc { reloads, failed: failed.unwrap_or(0) })
            })
    }

    /// Answers haproxy could give, and ones it would not.
    fn answer() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("Transaction created for certificate /t/a.pem!\n".to_owned()),
            Just("Transaction updated for certificate /t/a.pem!\n".to_owned()),
            Just("Committing /t/a.pem\n".to_owned()),
            Just("Success!\n".to_owned()),
            Just(
                "Can't replace a certificate which is not referenced by the configuration!\n"
                    .to_owned()
            ),
            Just("\n".to_owned()),
            Just("\r\u{1b}[2J\u{2028}".to_owned()),
            "[ -~]{0,30}",
            any::<String>(),
        ];
        proptest::collection::vec(piece, 0..6).prop_map(|p| p.concat())
    }

    /// A fake runtime API socket answering each connection in turn.
    async fn fake(answers: Vec<String>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (dir, path)
    }

    fn plain(text: &str) -> bool {
        crate::model::fmt::is_one_line(text)
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(256))]

        #[test]
        fn show_proc_gives_the_masters_counters((listing, want) in show_proc()) {
            prop_assert_eq!(parse_master(&listing), Some(want));
        }

        #[test]
        fn any_show_proc_answer_parses_or_is_refused(text in any::<String>(), extra in answer()) {
            let _ = parse_master(&text);
            let _ = parse_master(&format!("{text}\n{extra}"));
        }

        #[test]
        fn any_answer_becomes_one_plain_line(text in answer()) {
            let line = one_line(&text);
            prop_assert!(!line.is_empty());
            prop_assert!(plain(&line), "{line:?}");
            // An escape is at most ten characters (`\u{NNNN}`).
            prop_assert!(line.chars().count() <= QUOTE_LIMIT * 10 + 1);
        }
    }

    /// haproxy's answer to a failed reload went into the message as it
    /// came, escape sequences and all.
    #[test]
    fn an_answer_cannot_forge_a_line() {
        let line = one_line("Success=0\n--\r\x1b[31mforged\u{2028}x\n");
        assert_eq!(line, "Success=0 --\\r\\x1b[31mforged\\u{2028}x");
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(64))]

        /// Success needs "Transaction created/updated" and then "Success!";
        /// any other pair of answers is an error with a one-line message.
        #[test]
        fn runtime_update_succeeds_only_on_haproxys_own_words(set in answer(), commit in answer()) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a test runtime");
            let ok_set = set.contains("Transaction created") || set.contains("Transaction updated");
            let ok_commit = commit.contains("Success!");
            let result = rt.block_on(async {
                let (_dir, path) = fake(vec![set.clone(), commit.clone(), String::new()]).await;
                runtime_update(&path, "/t/a.pem", b"-----BEGIN X-----\nAA\n-----END X-----\n").await
            });
            match result {
                Ok(_) => prop_assert!(ok_set && ok_commit),
                Err(e) => {
                    prop_assert!(!(ok_set && ok_commit), "{e}");
                    let text = e.to_string();
                    prop_assert!(plain(&text), "{text:?}");
                }
            }
        }
    }
}
