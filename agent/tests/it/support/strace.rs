//! The real agent under `strace`, and a parser for what strace writes.
//!
//! [`spawn_traced_agent`] runs `certctl-agent` under `strace -f -ttt -yy`
//! (every thread and child, fds printed with their paths);
//! [`TracedAgent::finish`] stops the agent and returns the trace.
//!
//! [`parse`] turns the trace into [`Call`]s: the `-f` pid prefix (`1234 ` or
//! `[pid 1234] `), `-t`/`-tt`/`-ttt` timestamps, calls split over an
//! `<unfinished ...>` line and a `<... name resumed>` line (joined; `start`
//! and `end` keep both line numbers), quoted strings with strace's escapes
//! (`\"`, `\\`, `\n`, octal `\303`, hex `\x1b`), and fd annotations:
//! `3</dir/file>`, `3</dir/gone>(deleted)`, `0</dev/null<char 1:3>>`,
//! `9<UNIX-STREAM:[1->2,"/run/sock"]>`. In paths strace escapes `<` and `>`
//! (`\74`, `\76`) but not `(`, `,` or `[`, which the scanner allows for.
//! Signal (`--- SIG... ---`) and exit (`+++ ... +++`) lines are skipped, and
//! so is a call that never completed (its thread died inside it).
//!
//! [`Call::file_op`] reduces a call to what it did to the file system, with
//! every fd and `*at` dirfd followed to its path: creating opens, writes,
//! `fsync`/`fdatasync`, renames, links, removals, `mkdir`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{AgentProc, TestEnv, agent_bin, find_program, process};

// === running the agent under strace ===

/// The `strace` binary, if installed.
pub fn strace_bin() -> Option<PathBuf> {
    find_program("strace", &["/usr/bin/strace"])
}

/// `certctl-agent` running under `strace`.
pub struct TracedAgent {
    /// The strace process (the agent is its child).
    strace: AgentProc,
    agent_pid: Pid,
    trace: PathBuf,
}

/// Writes the config and starts `strace -f -ttt -yy -s 65536 -e trace=<syscalls>
/// -o <trace> certctl-agent --config agent.toml`, waiting until the agent's
/// socket accepts. `-s 65536` keeps whole log lines (and file contents) in
/// the trace.
pub fn spawn_traced_agent(
    env: &TestEnv,
    strace: &Path,
    trace: &Path,
    syscalls: &str,
) -> TracedAgent {
    let config = env.write_config();
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "-ttt", "-yy", "-s", "65536", "-e"])
        .arg(format!("trace={syscalls}"))
        .arg("-o")
        .arg(trace)
        .arg(agent_bin())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info");
    let strace = AgentProc::spawn(cmd, &env.socket(), &env.agent_log_path());
    let agent_pid = child_of(strace.pid()).unwrap_or_else(|| {
        panic!(
            "strace (pid {}) has no child process; its log:\n{}",
            strace.pid(),
            strace.log()
        )
    });
    TracedAgent {
        strace,
        agent_pid,
        trace: trace.to_owned(),
    }
}

impl TracedAgent {
    /// Everything the agent (and strace) logged so far.
    pub fn log(&self) -> String {
        self.strace.log()
    }

    /// Stops the agent with SIGTERM (strace, which blocks fatal signals
    /// while it runs a program, exits when its tracee does) and returns the
    /// complete trace.
    pub fn finish(mut self) -> String {
        let _ = kill(self.agent_pid, Signal::SIGTERM);
        if self.strace.wait_exit(Duration::from_secs(20)).is_none() {
            panic!(
                "agent under strace did not exit after SIGTERM; log:\n{}",
                self.strace.log()
            );
        }
        std::fs::read_to_string(&self.trace)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.trace.display()))
    }
}

/// The (single) child process of `parent`.
fn child_of(parent: u32) -> Option<Pid> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = process::read_lossy(&e.path().join("stat"));
        // Fields after the parenthesised command: state ppid ...
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then(|| Pid::from_raw(pid))
    })
}

// === parsed calls ===

/// One completed system call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The thread (`-f` prefix), if the line had one.
    pub pid: Option<u32>,
    /// Seconds (`-ttt`: since the epoch; `-t`/`-tt`: since midnight).
    pub time: Option<f64>,
    pub name: String,
    pub args: Vec<Arg>,
    pub ret: Ret,
    /// Line (0-based) where the call started: it was entered at or after
    /// the moment strace printed that line.
    pub start: usize,
    /// Line where it completed (`start` unless it was split).
    pub end: usize,
}

/// One argument as strace printed it.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// A file descriptor (or `AT_FDCWD`) with its `-y` annotation.
    Fd {
        raw: String,
        /// The path, for fds on files and directories (not sockets, pipes…).
        path: Option<PathBuf>,
        /// The file had been unlinked (`(deleted)`).
        deleted: bool,
    },
    /// A quoted string, unescaped.
    Str { bytes: Vec<u8>, truncated: bool },
    /// Anything else (flags, numbers, structures), verbatim.
    Other(String),
}

/// A call's result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ret {
    /// The value; `None` for `?`.
    pub value: Option<i64>,
    /// For calls returning an fd: its annotated path.
    pub path: Option<PathBuf>,
    /// `ENOENT` and friends on failure.
    pub errno: Option<String>,
}

/// What a call did to the file system. Paths are absolute when the call
/// used a dirfd or fd (strace prints those resolved), and as written for
/// the path arguments of non-`*at` calls.
#[derive(Debug, Clone, PartialEq)]
pub enum FileOp {
    /// `open`/`openat`/`openat2`/`creat` (the flags as printed).
    Open {
        path: PathBuf,
        create: bool,
        exclusive: bool,
        truncate: bool,
        write: bool,
    },
    /// Data or size changed through an fd on `path`: `write`, `pwrite64`,
    /// `writev`, `pwritev*`, `ftruncate`, `fallocate`, and the destination
    /// of `copy_file_range`, `sendfile`, `splice`.
    Write { path: PathBuf },
    /// `fsync` or `fdatasync` (`data_only`) on an fd on `path`.
    Sync { path: PathBuf, data_only: bool },
    /// `rename`/`renameat`/`renameat2`; `exchange` for `RENAME_EXCHANGE`.
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    /// `link`/`linkat`: `to` becomes another name of `from`.
    Link { from: PathBuf, to: PathBuf },
    /// `unlink`/`unlinkat`/`rmdir`.
    Unlink { path: PathBuf, dir: bool },
    /// `mkdir`/`mkdirat`.
    Mkdir { path: PathBuf },
}

impl Call {
    /// The call succeeded (a non-negative result).
    pub fn ok(&self) -> bool {
        self.ret.value.is_some_and(|v| v >= 0)
    }

    /// Argument `i`, if there is one.
    pub fn arg(&self, i: usize) -> Option<&Arg> {
        self.args.get(i)
    }

    /// The path of fd argument `i` (not for deleted files).
    pub fn fd_path(&self, i: usize) -> Option<&Path> {
        match self.arg(i)? {
            Arg::Fd {
                path: Some(p),
                deleted: false,
                ..
            } => Some(p),
            _ => None,
        }
    }

    /// The bytes of string argument `i`.
    pub fn str_arg(&self, i: usize) -> Option<&[u8]> {
        match self.arg(i)? {
            Arg::Str { bytes, .. } => Some(bytes),
            _ => None,
        }
    }

    /// The verbatim text of argument `i` (for flags).
    pub fn raw_arg(&self, i: usize) -> Option<&str> {
        match self.arg(i)? {
            Arg::Other(s) | Arg::Fd { raw: s, .. } => Some(s),
            Arg::Str { .. } => None,
        }
    }

    /// Path argument `i`, resolved against fd argument `dirfd` when relative.
    fn path_at(&self, dirfd: Option<usize>, i: usize) -> Option<PathBuf> {
        let p = Path::new(OsStr::from_bytes(self.str_arg(i)?));
        if p.is_absolute() {
            return Some(p.to_owned());
        }
        match dirfd {
            Some(d) => Some(self.fd_path(d)?.join(p)),
            None => Some(p.to_owned()),
        }
    }

    fn flags(&self, i: usize) -> &str {
        self.raw_arg(i).unwrap_or("")
    }

    /// What this call did to the file system; `None` for a failed call and
    /// for calls that change nothing (reads, stats, closes, sockets…).
    pub fn file_op(&self) -> Option<FileOp> {
        if !self.ok() {
            return None;
        }
        let has = |flags: &str, f: &str| flags.split('|').any(|x| x.trim() == f);
        let open = |path: PathBuf, flags: &str| {
            let write = has(flags, "O_WRONLY") || has(flags, "O_RDWR");
            Some(FileOp::Open {
                path,
                create: has(flags, "O_CREAT") || has(flags, "O_TMPFILE"),
                exclusive: has(flags, "O_EXCL"),
                truncate: has(flags, "O_TRUNC"),
                write,
            })
        };
        let write_to = |i: usize| {
            self.fd_path(i)
                .map(|p| FileOp::Write { path: p.to_owned() })
        };
        match self.name.as_str() {
            "open" => open(self.path_at(None, 0)?, self.flags(1)),
            "openat" => open(self.path_at(Some(0), 1)?, self.flags(2)),
            // openat2(dirfd, path, {flags=..., ...}, size)
            "openat2" => {
                let how = self.flags(2);
                let flags = how
                    .split("flags=")
                    .nth(1)
                    .and_then(|s| s.split([',', '}']).next())
                    .unwrap_or("");
                open(self.path_at(Some(0), 1)?, flags)
            }
            "creat" => open(self.path_at(None, 0)?, "O_WRONLY|O_CREAT|O_TRUNC"),
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate"
            | "fallocate" | "sendfile" | "sendfile64" => write_to(0),
            "copy_file_range" | "splice" => write_to(2),
            "fsync" | "fdatasync" => self.fd_path(0).map(|p| FileOp::Sync {
                path: p.to_owned(),
                data_only: self.name == "fdatasync",
            }),
            "rename" => Some(FileOp::Rename {
                from: self.path_at(None, 0)?,
                to: self.path_at(None, 1)?,
                exchange: false,
            }),
            "renameat" | "renameat2" => Some(FileOp::Rename {
                from: self.path_at(Some(0), 1)?,
                to: self.path_at(Some(2), 3)?,
                exchange: has(self.flags(4), "RENAME_EXCHANGE"),
            }),
            "link" => Some(FileOp::Link {
                from: self.path_at(None, 0)?,
                to: self.path_at(None, 1)?,
            }),
            "linkat" => Some(FileOp::Link {
                from: self.path_at(Some(0), 1)?,
                to: self.path_at(Some(2), 3)?,
            }),
            "unlink" => Some(FileOp::Unlink {
                path: self.path_at(None, 0)?,
                dir: false,
            }),
            "rmdir" => Some(FileOp::Unlink {
                path: self.path_at(None, 0)?,
                dir: true,
            }),
            "unlinkat" => Some(FileOp::Unlink {
                path: self.path_at(Some(0), 1)?,
                dir: has(self.flags(2), "AT_REMOVEDIR"),
            }),
            "mkdir" => Some(FileOp::Mkdir {
                path: self.path_at(None, 0)?,
            }),
            "mkdirat" => Some(FileOp::Mkdir {
                path: self.path_at(Some(0), 1)?,
            }),
            _ => None,
        }
    }
}

// === parsing ===

/// A line the parser could not make sense of.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// 0-based line number.
    pub line: usize,
    pub text: String,
    pub why: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "strace line {}: {}: {}",
            self.line + 1,
            self.why,
            self.text
        )
    }
}

const UNFINISHED: &str = " <unfinished ...>";
const DETACHED: &str = " <detached ...>";

/// A call whose first half has been seen.
struct Pending {
    time: Option<f64>,
    /// `name(args so far`.
    head: String,
    start: usize,
}

/// Parses a whole trace. Calls come in the order they completed.
pub fn parse(text: &str) -> Result<Vec<Call>, ParseError> {
    let mut calls = Vec::new();
    let mut pending: HashMap<Option<u32>, Pending> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |why| ParseError {
            line: n,
            text: line.to_owned(),
            why,
        };
        let (pid, time, rest) = prefix(line);
        let rest = rest.trim_end();
        if rest.is_empty() || rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        // `<... name resumed>rest`: join with the pending head.
        let (joined, start, time) = if let Some(r) = rest.strip_prefix("<... ") {
            let (name, tail) = r
                .split_once(" resumed>")
                .ok_or_else(|| err("malformed resumed line"))?;
            let p = pending
                .remove(&pid)
                .ok_or_else(|| err("resumed call that never started"))?;
            if !p.head.starts_with(&format!("{name}(")) {
                return Err(err("resumed call does not match the unfinished one"));
            }
            (format!("{}{tail}", p.head), p.start, p.time)
        } else {
            (rest.to_owned(), n, time)
        };
        if let Some(head) = joined.strip_suffix(UNFINISHED) {
            if pending
                .insert(
                    pid,
                    Pending {
                        time,
                        head: head.to_owned(),
                        start,
                    },
                )
                .is_some()
            {
                return Err(err("two unfinished calls in one thread"));
            }
            continue;
        }
        if joined.ends_with(DETACHED) {
            continue;
        }
        let mut call = parse_call(&joined).ok_or_else(|| err("not a system call"))?;
        call.pid = pid;
        call.time = time;
        call.start = start;
        call.end = n;
        calls.push(call);
    }
    Ok(calls)
}

/// Splits off the `-f` pid and the timestamp.
fn prefix(line: &str) -> (Option<u32>, Option<f64>, &str) {
    let mut rest = line;
    let mut pid = None;
    if let Some(r) = rest.strip_prefix("[pid") {
        if let Some((p, r)) = r.split_once(']') {
            pid = p.trim().parse().ok();
            rest = r.trim_start();
        }
    } else if let Some((tok, r)) = rest.split_once(' ')
        && !tok.is_empty()
        && tok.bytes().all(|b| b.is_ascii_digit())
    {
        pid = tok.parse().ok();
        rest = r.trim_start();
    }
    let mut time = None;
    if let Some((tok, r)) = rest.split_once(' ')
        && tok.starts_with(|c: char| c.is_ascii_digit())
        && tok.contains(['.', ':'])
        && tok
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b':')
    {
        time = parse_time(tok);
        rest = r.trim_start();
    }
    (pid, time, rest)
}

/// `1795361294.889720` or `15:28:14.889720` (or without the fraction).
fn parse_time(tok: &str) -> Option<f64> {
    if tok.contains(':') {
        let mut secs = 0.0;
        for part in tok.split(':') {
            secs = secs * 60.0 + part.parse::<f64>().ok()?;
        }
        Some(secs)
    } else {
        tok.parse().ok()
    }
}

/// `name(args) = ret ...`.
fn parse_call(s: &str) -> Option<Call> {
    let open = s.find('(')?;
    let name = &s[..open];
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'?')
    {
        return None;
    }
    let body = &s[open + 1..];
    let (close, splits) = scan(body)?;
    let mut args = Vec::new();
    let mut from = 0;
    for at in splits.into_iter().chain(std::iter::once(close)) {
        let a = body[from..at].trim();
        if !a.is_empty() {
            args.push(parse_arg(a));
        }
        from = at + 1;
    }
    let ret = body[close + 1..]
        .trim_start()
        .strip_prefix('=')?
        .trim_start();
    Some(Call {
        pid: None,
        time: None,
        name: name.to_owned(),
        args,
        ret: parse_ret(ret)?,
        start: 0,
        end: 0,
    })
}

/// Finds the `)` closing an argument list (`s` starts after the `(`) and
/// the top-level commas before it.
fn scan(s: &str) -> Option<(usize, Vec<usize>)> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut commas = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => i = skip_string(b, i)?,
            b'<' => i = skip_annotation(b, i)?,
            b'(' | b'[' | b'{' => depth += 1,
            b')' if depth == 0 => return Some((i, commas)),
            b')' | b']' | b'}' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => commas.push(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Index of the closing quote of the string opening at `i`.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j),
            _ => j += 1,
        }
    }
    None
}

/// Index of the `>` closing the annotation opening at `i`. A path (starts
/// with `/`) may hold any byte but escaped `<`/`>`, plus a nested
/// `<char 1:3>`; others (`UNIX-STREAM:[1->2,"/sock"]`) have brackets and
/// strings, in which a `>` does not close.
fn skip_annotation(b: &[u8], i: usize) -> Option<usize> {
    let path = b.get(i + 1) == Some(&b'/');
    let (mut angle, mut bracket) = (0usize, 0usize);
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 1,
            b'"' if !path => j = skip_string(b, j)?,
            b'[' if !path => bracket += 1,
            b']' if !path => bracket = bracket.saturating_sub(1),
            b'<' => angle += 1,
            b'>' if bracket == 0 => {
                if angle == 0 {
                    return Some(j);
                }
                angle -= 1;
            }
            _ => {}
        }
        j += 1;
    }
    None
}

fn parse_arg(a: &str) -> Arg {
    if a.starts_with('"')
        && let Some(end) = skip_string(a.as_bytes(), 0)
    {
        return Arg::Str {
            bytes: unescape(&a[1..end]),
            truncated: a[end + 1..].starts_with("..."),
        };
    }
    if let Some(lt) = a.find('<') {
        let head = &a[..lt];
        let is_fd = head == "AT_FDCWD"
            || (!head.is_empty()
                && head
                    .trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit()));
        if is_fd && let Some(gt) = skip_annotation(a.as_bytes(), lt) {
            let tail = &a[gt + 1..];
            if tail.is_empty() || tail == "(deleted)" {
                return Arg::Fd {
                    raw: head.to_owned(),
                    path: annotation_path(&a[lt + 1..gt]),
                    deleted: !tail.is_empty(),
                };
            }
        }
    }
    Arg::Other(a.to_owned())
}

/// The path in an annotation's text, if it names a file or directory:
/// `/dev/null<char 1:3>` → `/dev/null`.
fn annotation_path(text: &str) -> Option<PathBuf> {
    if !text.starts_with('/') {
        return None;
    }
    let b = text.as_bytes();
    let mut end = b.len();
    let mut j = 0;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 1,
            b'<' => {
                end = j;
                break;
            }
            _ => {}
        }
        j += 1;
    }
    Some(PathBuf::from(OsStr::from_bytes(&unescape(&text[..end]))))
}

/// `13</path>`, `-1 ENOENT (No such file...)`, `0x1 (flags FD_CLOEXEC)`, `?`.
fn parse_ret(s: &str) -> Option<Ret> {
    let mut ret = Ret::default();
    if s.starts_with('?') {
        return Some(ret);
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_hexdigit() || c == '-' || c == 'x'))
        .unwrap_or(s.len());
    let num = &s[..num_end];
    ret.value = Some(if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()? as i64
    } else {
        num.parse().ok()?
    });
    let mut rest = &s[num_end..];
    if rest.starts_with('<') {
        let gt = skip_annotation(rest.as_bytes(), 0)?;
        ret.path = annotation_path(&rest[1..gt]);
        rest = &rest[gt + 1..];
    }
    if ret.value.is_some_and(|v| v < 0) {
        ret.errno = rest
            .split_whitespace()
            .next()
            .filter(|e| e.starts_with('E'))
            .map(str::to_owned);
    }
    Some(ret)
}

/// Undoes strace's string escaping.
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' || i + 1 == b.len() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let c = b[i + 1];
        i += 2;
        match c {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'v' => out.push(0x0b),
            b'f' => out.push(0x0c),
            b'x' => {
                let hex: String = b[i..]
                    .iter()
                    .take(2)
                    .take_while(|d| d.is_ascii_hexdigit())
                    .map(|&d| d as char)
                    .collect();
                i += hex.len();
                out.push(u8::from_str_radix(&hex, 16).unwrap_or(0));
            }
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut k = 0;
                while k < 2 && i < b.len() && (b'0'..=b'7').contains(&b[i]) {
                    v = v * 8 + u32::from(b[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Call {
        let calls = parse(line).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls.into_iter().next().unwrap()
    }

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn pid_prefix_timestamps_and_fd_paths() {
        let c = one(
            "6762  1795361294.891235 fsync(13</tmp/st/targets/app/.certctl-tmp-x-cert.pem>) = 0",
        );
        assert_eq!(c.pid, Some(6762));
        assert_eq!(c.time, Some(1795361294.891235));
        assert_eq!(c.name, "fsync");
        assert!(c.ok());
        assert_eq!(
            c.file_op(),
            Some(FileOp::Sync {
                path: p("/tmp/st/targets/app/.certctl-tmp-x-cert.pem"),
                data_only: false
            })
        );
        // -tt, [pid N] form, strace's column padding before `=`.
        let c = one("[pid  42] 15:28:14.500000 fdatasync(3</d>)             = 0");
        assert_eq!(c.pid, Some(42));
        assert_eq!(c.time, Some(15.0 * 3600.0 + 28.0 * 60.0 + 14.5));
        assert!(matches!(
            c.file_op(),
            Some(FileOp::Sync {
                data_only: true,
                ..
            })
        ));
        // No pid, no time.
        let c = one("close(3</etc/ld.so.cache>) = 0");
        assert_eq!((c.pid, c.time), (None, None));
        assert_eq!(c.fd_path(0), Some(Path::new("/etc/ld.so.cache")));
    }

    #[test]
    fn unfinished_and_resumed_calls_are_joined_per_thread() {
        let trace = "\
6762  1.000001 openat(AT_FDCWD</tmp/st>, \"/tmp/st/targets/app\", O_RDONLY|O_CLOEXEC <unfinished ...>
6744  1.000002 write(4<anon_inode:[eventfd]>, \"\\1\\0\\0\\0\\0\\0\\0\\0\", 8 <unfinished ...>
6762  1.000003 <... openat resumed>) = 13</tmp/st/targets/app>
6744  1.000004 <... write resumed>) = 8
6762  1.000005 fsync(13</tmp/st/targets/app> <unfinished ...>
6744  1.000006 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=1, si_status=0} ---
6744  1.000007 read(16<pipe:[291419]>,  <unfinished ...>
6762  1.000008 <... fsync resumed>) = 0
6744  1.000009 <... read resumed>\"\", 4096) = 0
6763  1.000010 +++ exited with 0 +++
6745  1.000011 futex(0x1, FUTEX_WAIT, 0, NULL <unfinished ...>
";
        let calls = parse(trace).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.start, c.end))
            .collect();
        // In completion order; the futex never completed.
        assert_eq!(
            names,
            [
                ("openat", 0, 2),
                ("write", 1, 3),
                ("fsync", 4, 7),
                ("read", 6, 8)
            ]
        );
        assert_eq!(calls[0].time, Some(1.000001), "time is when it started");
        assert_eq!(calls[0].ret.path, Some(p("/tmp/st/targets/app")));
        assert_eq!(
            calls[0].file_op(),
            Some(FileOp::Open {
                path: p("/tmp/st/targets/app"),
                create: false,
                exclusive: false,
                truncate: false,
                write: false
            })
        );
        assert_eq!(calls[1].str_arg(1), Some(&[1u8, 0, 0, 0, 0, 0, 0, 0][..]));
        assert_eq!(calls[2].fd_path(0), Some(Path::new("/tmp/st/targets/app")));
        assert_eq!(calls[3].str_arg(1), Some(&b""[..]));
        assert_eq!(calls[3].fd_path(0), None, "a pipe has no path");
    }

    #[test]
    fn a_resumed_call_without_its_start_is_an_error() {
        let e = parse("1 <... fsync resumed>) = 0\n").unwrap_err();
        assert_eq!(e.line, 0);
        let e = parse("1 fsync(3</a> <unfinished ...>\n1 <... close resumed>) = 0\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(parse("1 this is not strace\n").is_err());
    }

    #[test]
    fn quoted_paths_and_annotations_are_unescaped() {
        // What strace prints for names with < > " \ newline, UTF-8, ( , [.
        let c = one(
            r#"7 openat(AT_FDCWD</tmp/we ird>, "a>b", O_WRONLY|O_CREAT|O_CLOEXEC, 0600) = 3</tmp/we ird/a\76b>"#,
        );
        assert_eq!(c.ret.path, Some(p("/tmp/we ird/a>b")));
        assert_eq!(
            c.file_op(),
            Some(FileOp::Open {
                path: p("/tmp/we ird/a>b"),
                create: true,
                exclusive: false,
                truncate: false,
                write: true
            })
        );
        for (line, want) in [
            (r#"7 fsync(3</tmp/c\74d>) = 0"#, &b"/tmp/c<d"[..]),
            (r#"7 fsync(3</tmp/g\"h>) = 0"#, b"/tmp/g\"h"),
            (r#"7 fsync(3</tmp/i\\j>) = 0"#, b"/tmp/i\\j"),
            (r#"7 fsync(3</tmp/k\nl>) = 0"#, b"/tmp/k\nl"),
            (r#"7 fsync(3</tmp/\303\2512>) = 0"#, "/tmp/é2".as_bytes()),
            (r#"7 fsync(3</tmp/m(n,o[p>) = 0"#, b"/tmp/m(n,o[p"),
            (r#"7 fsync(3</tmp/\x1b>) = 0"#, b"/tmp/\x1b"),
        ] {
            let c = one(line);
            assert_eq!(
                c.fd_path(0).map(|p| p.as_os_str().as_bytes()),
                Some(want),
                "{line}"
            );
        }
        let c = one(r#"7 rename("/d/\"x\"", "/d/y\\z") = 0"#);
        assert_eq!(
            c.file_op(),
            Some(FileOp::Rename {
                from: p("/d/\"x\""),
                to: p("/d/y\\z"),
                exchange: false
            })
        );
        // A deleted file's fd keeps the name but is not a path any more.
        let c = one("7 fsync(3</tmp/gone>(deleted)) = 0");
        assert!(matches!(c.arg(0), Some(Arg::Fd { deleted: true, .. })));
        assert_eq!(c.fd_path(0), None);
        assert_eq!(c.file_op(), None);
        // Devices and -yy sockets (with `->` inside).
        let c = one("7 close(13</dev/null<char 1:3>>) = 0");
        assert_eq!(c.fd_path(0), Some(Path::new("/dev/null")));
        let c = one(
            r#"7 writev(11<UNIX-STREAM:[291391->290660,"/tmp/st/run/agent.sock"]>, [{iov_base="\0\0\22", iov_len=3}], 1) = 3"#,
        );
        assert_eq!(c.args.len(), 3);
        assert_eq!(c.fd_path(0), None);
        assert_eq!(c.file_op(), None, "a socket write is not a file write");
    }

    #[test]
    fn results_errors_and_truncated_strings() {
        let c = one(
            r#"7 openat(AT_FDCWD</x>, "/x/cert.pem", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)"#,
        );
        assert!(!c.ok());
        assert_eq!(c.ret.value, Some(-1));
        assert_eq!(c.ret.errno.as_deref(), Some("ENOENT"));
        assert_eq!(c.file_op(), None, "a failed call did nothing");
        let c = one("7 fcntl(13</x>, F_GETFD) = 0x1 (flags FD_CLOEXEC)");
        assert_eq!(c.ret.value, Some(1));
        let c = one("7 exit_group(0)                           = ?");
        assert_eq!(c.ret.value, None);
        let c = one(r#"7 write(2</r/agent.log>, "2026 INFO stage=\"committed\"\n"..., 300) = 300"#);
        assert_eq!(
            c.arg(1),
            Some(&Arg::Str {
                bytes: b"2026 INFO stage=\"committed\"\n".to_vec(),
                truncated: true
            })
        );
        assert_eq!(
            c.file_op(),
            Some(FileOp::Write {
                path: p("/r/agent.log")
            })
        );
        // Nested structures with commas and `=>` stay one argument.
        let c = one(
            "7 clone3({flags=CLONE_VM|CLONE_FS, child_tid=0x1} => {parent_tid=[6743]}, 88) = 6743",
        );
        assert_eq!(c.args.len(), 2);
        assert_eq!(c.ret.value, Some(6743));
    }

    #[test]
    fn at_calls_resolve_against_their_dirfd() {
        let op = |line: &str| one(line).file_op().unwrap();
        assert_eq!(
            op(r#"7 unlinkat(5</d/.certctl/backup/app/1>, "cert.pem", 0) = 0"#),
            FileOp::Unlink {
                path: p("/d/.certctl/backup/app/1/cert.pem"),
                dir: false
            }
        );
        assert_eq!(
            op(r#"7 unlinkat(4</d/.certctl/backup/app>, "1", AT_REMOVEDIR) = 0"#),
            FileOp::Unlink {
                path: p("/d/.certctl/backup/app/1"),
                dir: true
            }
        );
        assert_eq!(
            op(
                r#"7 linkat(AT_FDCWD</cwd>, "/d/cert.pem", AT_FDCWD</cwd>, "/d/.certctl/b/cert.pem", 0) = 0"#
            ),
            FileOp::Link {
                from: p("/d/cert.pem"),
                to: p("/d/.certctl/b/cert.pem")
            }
        );
        assert_eq!(
            op(r#"7 renameat2(3</d>, "a", 3</d>, "b", RENAME_EXCHANGE) = 0"#),
            FileOp::Rename {
                from: p("/d/a"),
                to: p("/d/b"),
                exchange: true
            }
        );
        assert_eq!(
            op(r#"7 renameat(AT_FDCWD</cwd>, "rel", AT_FDCWD</cwd>, "/abs", 0) = 0"#),
            FileOp::Rename {
                from: p("/cwd/rel"),
                to: p("/abs"),
                exchange: false
            }
        );
        assert_eq!(
            op(r#"7 mkdir("/d/.certctl", 0700) = 0"#),
            FileOp::Mkdir {
                path: p("/d/.certctl")
            }
        );
        assert_eq!(
            op(r#"7 mkdirat(AT_FDCWD</cwd>, "x", 0700) = 0"#),
            FileOp::Mkdir { path: p("/cwd/x") }
        );
        assert_eq!(
            op("7 copy_file_range(3</d/a>, NULL, 4</d/b>, NULL, 1073741824, 0) = 600"),
            FileOp::Write { path: p("/d/b") }
        );
        assert_eq!(
            op(
                r#"7 openat2(AT_FDCWD</cwd>, "/d/t", {flags=O_WRONLY|O_CREAT|O_EXCL, mode=0600}, 24) = 3</d/t>"#
            ),
            FileOp::Open {
                path: p("/d/t"),
                create: true,
                exclusive: true,
                truncate: false,
                write: true
            }
        );
    }
}
