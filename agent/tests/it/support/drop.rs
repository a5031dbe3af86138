//! Drop-directory helpers: hand files to the agent the way producers do,
//! wait until it has dealt with them, and read what it recorded.
//!
//! - [`rename_in`]: write `<drop>/.<name>.tmp`, then rename it to `<drop>/<name>`
//!   (the recipe `docs/drop-directory.md` gives producers).
//! - [`write_slowly`]: write a file in place in chunks with pauses.
//! - [`wait_idle`]: poll `certctl status` until nothing is waiting or in
//!   progress and the drop directory holds no drop; returns the status JSON.
//! - [`Watcher`]: a `certctl --json watch` subscribed before the test acts,
//!   with counts of drop outcomes and finished deploys.
//! - [`rejected`]: what is in `<state>/rejected/` (drops and reason texts).
//! - [`vm_hwm_kib`]: a process's peak resident memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::{AgentProc, ChildGuard, TestEnv};

/// How long the agent may take to deal with the drops of one test step.
pub const DROP_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `contents` to a dotfile in the drop directory, then renames it to `name`.
pub fn rename_in(env: &TestEnv, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let tmp = env.drop_dir().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).expect("write drop temp file");
    let dst = env.drop_dir().join(name);
    std::fs::rename(&tmp, &dst).expect("rename drop into place");
    dst
}

/// Writes `contents` to `path` in place: `chunks` writes with `pause` between
/// them, on one open file (like a slow copy), then closes it.
pub fn write_slowly(path: &Path, contents: &[u8], chunks: usize, pause: Duration) {
    let mut f = std::fs::File::create(path).expect("create drop file");
    let size = contents.len().div_ceil(chunks);
    for (i, chunk) in contents.chunks(size).enumerate() {
        if i > 0 {
            thread::sleep(pause);
        }
        f.write_all(chunk).expect("write chunk");
        f.flush().expect("flush chunk");
    }
}

/// Names in the drop directory that are drops or taken drops (writers'
/// temp files and other ignored names are not).
pub fn drop_entries(env: &TestEnv) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.drop_dir())
        .expect("read drop dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".certctl-claimed.") || !ignored(n))
        .collect();
    names.sort();
    names
}

fn ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with(".swp")
        || (name.starts_with('#') && name.ends_with('#'))
}

/// Polls until the drop directory holds no drop and then the agent reports
/// none pending or in flight; returns that `certctl --json status`.
///
/// The listing comes first: a drop stays in the directory (as itself or
/// taken, `.certctl-claimed.*`) until its job removed or moved it, and a
/// job records its final outcome before it stops counting as in flight;
/// the agent reads those counters before the per-target entries. So a
/// status taken after an empty listing that says nothing is in progress
/// has every drop's final record. (The other way round, a status taken
/// before the agent noticed a rename could pass for idle once the drop
/// was dealt with by the time of the listing.)
pub fn wait_idle(env: &TestEnv, agent: &AgentProc) -> serde_json::Value {
    wait_idle_for(env, agent, DROP_TIMEOUT)
}

/// [`wait_idle`] with another deadline.
pub fn wait_idle_for(env: &TestEnv, agent: &AgentProc, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let listed = drop_entries(env);
        let out = env.ctl(&["--json", "status"]);
        out.assert_code(0);
        let status = out.json();
        let a = &status["agent"];
        if listed.is_empty() && a["drops_pending"] == 0 && a["drops_in_flight"] == 0 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "drops not done after {timeout:?}: {a}, drop dir {:?}\n{}",
            drop_entries(env),
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `certctl --json watch`, subscribed before the test goes on.
pub struct Watcher {
    _guard: ChildGuard,
    out: PathBuf,
}

impl Watcher {
    /// Starts the watch and waits until the agent has opened its stream.
    pub fn start(env: &TestEnv, agent: &AgentProc) -> Watcher {
        let before = agent.log().matches("watch stream opened").count();
        let (guard, out) = env.ctl_spawn(&["--json", "watch"], "watch.out");
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.log().matches("watch stream opened").count() == before {
            assert!(
                Instant::now() < deadline,
                "watch did not subscribe:\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        Watcher { _guard: guard, out }
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            // The last line may be half written.
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Drop events (of `target`, when given) whose outcome is `outcome`.
    pub fn drops(&self, target: Option<&str>, outcome: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["stage"] == "drop" && e["drop"]["outcome"] == outcome)
            .filter(|e| target.is_none_or(|t| e["target"] == t))
            .collect()
    }

    /// Final drop outcomes (everything but accepted and waiting) of `target`.
    pub fn finals(&self, target: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["stage"] == "drop" && e["target"] == target)
            .filter(|e| !matches!(e["drop"]["outcome"].as_str(), Some("accepted" | "waiting")))
            .collect()
    }

    /// Finished deploys of `target` (their `done` events).
    pub fn deploys(&self, target: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["stage"] == "done" && e["target"] == target)
            .collect()
    }

    /// Polls until `target` has `n` final drop outcomes; returns them.
    pub fn wait_finals(&self, target: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + DROP_TIMEOUT;
        loop {
            let finals = self.finals(target);
            if finals.len() >= n {
                return finals;
            }
            assert!(
                Instant::now() < deadline,
                "{target}: {} final drop outcome(s), expected {n}:\n{:#?}",
                finals.len(),
                self.events()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until a drop event of `target` with `outcome` arrived.
    pub fn wait_drop(&self, target: &str, outcome: &str) -> serde_json::Value {
        let deadline = Instant::now() + DROP_TIMEOUT;
        loop {
            if let Some(e) = self.drops(Some(target), outcome).into_iter().next() {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{target}: no {outcome} drop event:\n{:#?}",
                self.events()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `(path, reason text)` of every drop in `<state>/rejected/`, sorted.
pub fn rejected(env: &TestEnv) -> Vec<(PathBuf, String)> {
    let dir = env.state_dir().join("rejected");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, String)> = entries
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_none_or(|e| e != "reason"))
        .map(|p| {
            let reason = PathBuf::from(format!("{}.reason", p.display()));
            let text = std::fs::read_to_string(&reason)
                .unwrap_or_else(|e| panic!("{} has no reason file: {e}", p.display()));
            (p, text)
        })
        .collect();
    out.sort();
    out
}

/// The `VmHWM` (peak resident set) of process `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Lines of the agent's log that record a final drop outcome, per outcome.
pub fn logged_finals(agent: &AgentProc) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for line in agent.log().lines() {
        if let Some(rest) = line.split(" drop_outcome=").nth(1) {
            let outcome = rest.split_whitespace().next().unwrap_or_default();
            if !matches!(outcome, "accepted" | "waiting") {
                *counts.entry(outcome.to_owned()).or_insert(0) += 1;
            }
        }
    }
    counts
}
