//! The running agent's state, shared by every way in: the configuration in
//! force, the engine, the drop directory's ledger, and the tasks shutdown
//! waits for. The gRPC adapter, the drop directory, the drift watch and the
//! metrics endpoint all take their state from here, never from each other.
//!
//! Guarantees: a configuration reload replaces the whole `Config` at once
//! (readers see the old one or the new one); once [`App::close`] has run,
//! no new deploy is admitted ([`App::deploy_guard`] is `None`), and
//! [`App::drained`] resolves when every admitted one has finished.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::config::Config;
use crate::deploy::Engine;
use crate::deployed::Seen;
use crate::metrics::TargetCert;
use crate::model::drop::LastDrop;
use crate::model::stage::Outcome;
use crate::sync::lock;

/// State shared by every call.
pub struct App {
    config: RwLock<Arc<Config>>,
    pub engine: Engine,
    pub started: SystemTime,
    /// The path the socket was bound at (a config reload cannot move it).
    pub socket: PathBuf,
    /// Every admitted deploy holds a token; shutdown waits for them.
    tasks: TaskTracker,
    /// Serializes admitting a deploy with closing: no token is handed out
    /// after [`App::close`].
    admit: Mutex<()>,
    /// Flips to true when the agent shuts down; ends watch streams.
    shutdown: watch::Receiver<bool>,
    /// Notified after each configuration reload.
    pub reloaded: tokio::sync::Notify,
    /// What the drop directory reports to `certctl status`.
    pub drops: Ledger,
}

impl App {
    pub fn new(
        config: Arc<Config>,
        engine: Engine,
        socket: PathBuf,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            config: RwLock::new(config),
            engine,
            started: SystemTime::now(),
            socket,
            tasks: TaskTracker::new(),
            admit: Mutex::new(()),
            shutdown,
            reloaded: tokio::sync::Notify::new(),
            drops: Ledger::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a new configuration in force (SIGHUP).
    pub fn replace_config(&self, config: Arc<Config>) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        // Paths and keystore passwords may have changed: read again.
        self.engine.deployed().clear();
        self.reloaded.notify_waiters();
    }

    /// Stops admitting deploys; admitted ones keep their token.
    pub fn close(&self) {
        let _admit = lock(&self.admit);
        self.tasks.close();
    }

    /// Turns true when the agent shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// A token that shutdown waits for; `None` once the agent is stopping.
    pub fn deploy_guard(&self) -> Option<TaskTrackerToken> {
        let _admit = lock(&self.admit);
        (!self.tasks.is_closed()).then(|| self.tasks.token())
    }

    /// The Prometheus exposition: the engine's counters plus each target's
    /// certificate expiry as on disk now ([`crate::deployed`]: a `stat` per
    /// target, a read only of what changed; keystore targets are opened as
    /// keystores).
    pub async fn exposition(&self) -> String {
        let config = self.config();
        // A stat per target, a read of what changed: off the async threads'
        // queue.
        let certs = tokio::task::block_in_place(|| {
            config
                .targets
                .iter()
                .map(|t| {
                    let last = self.engine.last(&t.name);
                    TargetCert {
                        target: t.name.clone(),
                        not_after: match &*self.engine.deployed().leaf(t) {
                            Seen::Leaf { not_after, .. } => Some(*not_after),
                            _ => None,
                        },
                        needs_operator: last
                            .as_ref()
                            .is_some_and(|l| l.outcome == Outcome::RollbackFailed),
                        last_outcome: last.map(|l| l.outcome.as_str()),
                        served: self
                            .engine
                            .served(&t.name)
                            .and_then(|c| c.decisive().map(|d| d.state.as_str())),
                    }
                })
                .collect::<Vec<_>>()
        });
        self.engine.metrics().render(&certs)
    }

    /// Resolves when the agent is closed and every admitted deploy has
    /// dropped its token.
    pub async fn drained(&self) {
        self.tasks.wait().await;
    }
}

/// Drop state that `certctl status` shows.
#[derive(Debug, Default)]
pub struct Ledger {
    last: Mutex<HashMap<String, Arc<LastDrop>>>,
    pending: AtomicUsize,
    in_flight: AtomicUsize,
    /// The drop directory and `rejected/` the agent started with.
    dirs: OnceLock<(PathBuf, PathBuf)>,
    /// Whether the drop directory is watched now.
    watching: AtomicBool,
    /// Notified when `watching` changes (the systemd status line).
    pub watching_changed: tokio::sync::Notify,
}

impl Ledger {
    /// The latest drop event of `target` since the agent started; the
    /// same `Arc` until the next event.
    pub fn last(&self, target: &str) -> Option<Arc<LastDrop>> {
        lock(&self.last).get(target).cloned()
    }

    /// Drops seen and not taken yet.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Drops taken and not finished. Acquire: a job's final record is
    /// visible to whoever sees it counted out ([`Self::job_ended`]).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The watched drop directory and `rejected/` (`None` before start).
    pub fn dirs(&self) -> Option<&(PathBuf, PathBuf)> {
        self.dirs.get()
    }

    pub fn set_dirs(&self, drop_dir: PathBuf, rejected: PathBuf) {
        let _ = self.dirs.set((drop_dir, rejected));
    }

    /// Whether the drop directory is watched now (false before start, and
    /// while it is gone or replaced and not watched again yet).
    pub fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    pub fn set_watching(&self, watching: bool) {
        if self.watching.swap(watching, Ordering::Relaxed) != watching {
            self.watching_changed.notify_one();
        }
    }

    pub fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
    }

    pub fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn job_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    pub fn set_last(&self, target: &str, last: LastDrop) {
        lock(&self.last).insert(target.to_owned(), Arc::new(last));
    }
}
