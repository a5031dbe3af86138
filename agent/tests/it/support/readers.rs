//! Readers that do what a watching server does, in a tight loop on threads
//! of the test, while the test deploys: the evidence for the single-switch
//! property of the generations layout and for atomically written
//! configuration files.
//!
//! - [`PairReader`] opens `cert.pem` and `key.pem` through the stable
//!   names, as traefik and envoy do, and reads `..data` before and after.
//!   When `..data` did not move in between, the pair read must be one
//!   deployed set, whole: a torn pair there would mean a generation that
//!   changed while `..data` pointed at it. (When `..data` moved in between,
//!   a real server re-reads: envoy compares hashes, traefik reloads again.)
//! - [`FileReader`] reads one file over and over and hands every read to a
//!   check; an empty or partial file is a violation.
//!
//! Both stop when dropped or [`finish`](PairReader::finish)ed and report
//! counts, never durations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use super::pki::Leaf;

/// What a reader saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Reads checked (for a pair: with `..data` unchanged around them).
    pub checked: usize,
    /// Everything wrong, one line each (the first 20).
    pub violations: Vec<String>,
    /// Reads skipped: the file did not exist yet, or `..data` moved.
    pub skipped: usize,
}

impl Seen {
    fn violation(&mut self, v: String) {
        if self.violations.len() < 20 {
            self.violations.push(v);
        }
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Seen>>,
}

impl Running {
    fn start(work: impl FnMut(&mut Seen) + Send + 'static) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut work = work;
        let thread = thread::spawn(move || {
            let mut seen = Seen::default();
            while !flag.load(Ordering::SeqCst) {
                work(&mut seen);
            }
            seen
        });
        Running {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(&mut self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("reader thread"))
            .unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Reads `<dir>/cert.pem` and `<dir>/key.pem` through the stable names.
pub struct PairReader(Running);

impl PairReader {
    /// Starts reading; `sets` are every set the test will deploy (each
    /// read pair must be one of them: cert = leaf + chain, key = its key).
    pub fn start(dir: &Path, sets: &[Leaf]) -> PairReader {
        let (dir, sets) = (dir.to_owned(), sets.to_vec());
        PairReader(Running::start(move |seen| read_pair(&dir, &sets, seen)))
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> Seen {
        self.0.finish()
    }
}

fn read_pair(dir: &Path, sets: &[Leaf], seen: &mut Seen) {
    let data = dir.join("..data");
    let before = std::fs::read_link(&data);
    let cert = std::fs::read_to_string(dir.join("cert.pem"));
    let key = std::fs::read_to_string(dir.join("key.pem"));
    let after = std::fs::read_link(&data);
    let (Ok(before), Ok(after), Ok(cert), Ok(key)) = (before, after, cert, key) else {
        seen.skipped += 1;
        return;
    };
    if before != after {
        seen.skipped += 1;
        return;
    }
    seen.checked += 1;
    let c = sets.iter().position(|s| s.fullchain_pem() == cert);
    let k = sets.iter().position(|s| s.key_pem == key);
    match (c, k) {
        (Some(c), Some(k)) if c == k => {}
        _ => seen.violation(format!(
            "..data -> {}: cert.pem is {}, key.pem is {}",
            before.display(),
            describe(c, &cert),
            describe(k, &key)
        )),
    }
}

fn describe(index: Option<usize>, text: &str) -> String {
    match index {
        Some(i) => format!("set {i}"),
        None if text.is_empty() => "empty".to_owned(),
        None => format!("unknown bytes ({} bytes)", text.len()),
    }
}

/// Reads one file over and over; `check` returns why a read is wrong.
pub struct FileReader(Running);

impl FileReader {
    /// Starts reading `path`; a missing file is skipped, every other read
    /// goes to `check` (`Err`: a violation).
    pub fn start(
        path: &Path,
        check: impl Fn(&str) -> Result<(), String> + Send + 'static,
    ) -> FileReader {
        let path: PathBuf = path.to_owned();
        FileReader(Running::start(move |seen| {
            match std::fs::read_to_string(&path) {
                Err(_) => seen.skipped += 1,
                Ok(text) => {
                    seen.checked += 1;
                    if text.is_empty() {
                        seen.violation(format!("{} was empty", path.display()));
                    } else if let Err(why) = check(&text) {
                        seen.violation(format!("{}: {why}", path.display()));
                    }
                }
            }
        }))
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> Seen {
        self.0.finish()
    }
}
