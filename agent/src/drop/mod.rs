//! The watched drop directory: producers that cannot speak gRPC (ACME
//! hooks, cron jobs, Ansible, scp) hand a certificate set over by writing
//! files, and the agent turns that into exactly one correct deploy per
//! target, whatever order and speed the files arrive in.
//!
//! Forms (`docs/drop-directory.md` is the producers' contract):
//! `<drop_dir>/<name>.pem`, a bundle of key, leaf and chain; or
//! `<drop_dir>/<name>/`, a directory of `.pem`/`.crt`/`.key` files. A drop
//! name maps to every target whose `drop` is that name
//! ([`Config::targets_for_drop`](crate::config::Config::targets_for_drop),
//! looked up in the configuration in force, so `SIGHUP` applies).
//!
//! Parts, pure ones first:
//! - [`names`]: which names are drops, which are writers' temp files;
//! - [`settle`]: when a drop is complete enough to take (renamed in: at
//!   once; written in place: after `settle` of quiet; an incomplete
//!   directory: after a change, or rejected after [`INCOMPLETE_LIMIT`]);
//! - [`queue`]: one deploy per drop name in flight, the newest drop wins;
//! - [`watch`]: inotify events → changes;
//! - [`scan`]: reading a drop as untrusted input (no symlinks, limits,
//!   owners);
//! - [`reject`]: every change to the drop directory and `rejected/`;
//! - [`record`]: events, log lines and `certctl status` entries;
//! - `runner`: the event loop; `job`: one taken drop from read to its
//!   final outcome.
//!
//! Guarantees:
//! - **a drop is never lost**: it is taken by renaming it aside within the
//!   drop directory, removed only after every deploy of it reached a
//!   terminal outcome, and otherwise moved to `<state_dir>/rejected/` with
//!   a `.reason` file. A drop taken when the agent stopped (even by
//!   `SIGKILL`) is found at the next start and deployed again (an identical
//!   deploy is a no-op, `unchanged`).
//! - **every drop gets exactly one final outcome** (removed, rejected,
//!   superseded, withdrawn or failed), each an event, a log line and the
//!   target's last drop in `certctl status`.
//! - **a key never deploys with the wrong certificate**: the leaf is chosen
//!   by key match, and a directory whose key has no certificate yet waits.
//! - **memory is bounded** under bursts: waiting drops are names, not
//!   contents; at most a few drops are read at once, and a deploy carries
//!   the normalized PEM (a few KiB), not what was dropped.
//! - a failed deploy (validate, reload, rollback) moves the drop to
//!   `rejected/` with each target's result: no endless retries.

mod job;
mod names;
mod queue;
mod record;
mod reject;
mod runner;
mod scan;
mod settle;
mod watch;

use std::sync::Arc;
use std::time::Duration;

pub use record::{DropOutcome, Info, LastDrop, Ledger, TargetResult};
pub use scan::{Form, LIMITS, Limits};

use crate::app::App;
use crate::config::Config;

/// How long a directory drop may stay incomplete without any change before
/// it is rejected as "incomplete".
pub const INCOMPLETE_LIMIT: Duration = Duration::from_secs(5 * 60);

/// Why the drop directory could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot use the drop directory: {0}; create it, or fix agent.drop_dir (it must be a \
         directory the agent may read, write and watch)"
    )]
    Dirs(#[from] reject::MoveError),
    #[error(
        "cannot watch the drop directory {path}: {source}; check that it exists and that \
         fs.inotify.max_user_instances/max_user_watches are not exhausted"
    )]
    Watch {
        path: std::path::PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// The drop directory, opened and watched, not yet processed.
pub struct Prepared {
    dirs: reject::Dirs,
    watch: watch::Watch,
    events: tokio::sync::mpsc::Receiver<notify::Result<notify::Event>>,
}

/// Opens the drop directory `agent.drop_dir` (created 0700 when missing)
/// and `<state_dir>/rejected/` (created 0700), and starts watching. Events
/// queue up (bounded) until [`Prepared::spawn`].
pub fn prepare(config: &Config) -> Result<Prepared, StartError> {
    let root = &config.agent.drop_dir;
    let dirs = reject::Dirs::open(root, &config.agent.state_dir.join("rejected"))?;
    for orphan in dirs.tidy_rejected() {
        tracing::info!(
            "removed {}: a reason file without its drop, left by a stop between writing the \
             reason and moving the drop (the drop stayed in the drop directory)",
            crate::model::fmt::shown(&dirs.rejected_path().join(orphan))
        );
    }
    prune(&dirs, config);
    let (watch, events) = watch::start(root).map_err(|source| StartError::Watch {
        path: root.clone(),
        source,
    })?;
    tracing::info!(
        drop_dir = %crate::model::fmt::shown(root),
        settle = ?config.agent.settle,
        "watching the drop directory"
    );
    Ok(Prepared {
        dirs,
        watch,
        events,
    })
}

impl Prepared {
    /// Spawns the task that takes drops until `shutdown` turns true. Drops
    /// taken before a restart, and drops already there, come first.
    pub fn spawn(self, shared: Arc<App>, shutdown: tokio::sync::watch::Receiver<bool>) {
        shared.drops.set_dirs(
            self.dirs.root().to_owned(),
            self.dirs.rejected_path().to_owned(),
        );
        shared.drops.set_watching(true);
        shared.engine.metrics().drop_dir_watching(true);
        let runner = runner::Runner::new(Arc::new(job::Ctx::new(shared, self.dirs)));
        tokio::spawn(runner.run(self.watch, self.events, shutdown));
    }
}

/// Applies `agent.rejected_keep` and `agent.rejected_max_age` to
/// `rejected/` (at start and after each rejection), logging what goes.
fn prune(dirs: &reject::Dirs, config: &Config) {
    let agent = &config.agent;
    match dirs.prune(
        agent.rejected_keep as usize,
        agent.rejected_max_age,
        std::time::SystemTime::now(),
    ) {
        Ok(removed) => {
            for name in removed {
                tracing::info!(
                    "pruned {} and its reason (agent.rejected_keep = {}, agent.rejected_max_age = {})",
                    crate::model::fmt::shown(&dirs.rejected_path().join(name)),
                    agent.rejected_keep,
                    humantime::format_duration(agent.rejected_max_age)
                );
            }
        }
        Err(e) => tracing::warn!("cannot prune rejected drops: {e}"),
    }
}

/// `5m`, `90s`: a limit as the docs write it.
pub fn fmt_limit(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_like_the_docs() {
        assert_eq!(fmt_limit(INCOMPLETE_LIMIT), "5m");
        assert_eq!(fmt_limit(Duration::from_secs(90)), "90s");
    }
}
