//! The engine: the state every run shares (per-target locks, the event
//! broadcast, the last result and the last probe per target, the journal,
//! the metrics, cancellation of verification waits, what is deployed).
//! Runs themselves are `run` (a deploy, in stage order), `rollback` and
//! `recover`.
//!
//! What status shows is held here: the last result of every target (seeded
//! from the journal in one query at start, then kept as runs finish) and
//! what is deployed ([`Deployed`], read again only when a file changed), so
//! a status call neither queries the journal nor parses a certificate in
//! the steady state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::bundle::Bundle;
use crate::config::Target;
use crate::deployed::Deployed;
use crate::journal::{Journal, JournalError, Record};
use crate::lock::{LockError, Locks, TargetGuard};
use crate::metrics::Metrics;
use crate::model::event::{Event, Outcome};
use crate::sync::lock;
use crate::verify::served::Checks;

/// What a deploy puts in place.
#[derive(Debug, Clone)]
pub enum Input {
    /// Named PEM inputs (`--cert`, `--key`, `--chain`), parsed and checked
    /// at stage 1.
    Pem(Vec<(String, Zeroizing<Vec<u8>>)>),
    /// A set parsed and checked once for several targets (a drop's); stage
    /// 1 checks it again for the target (validity now, `server_name`)
    /// without going back to PEM.
    Checked(Arc<Bundle>),
}

/// One deploy as asked for by a client.
pub struct Request {
    pub target: Target,
    pub input: Input,
    pub dry_run: bool,
    pub no_verify: bool,
    /// Stop after the validate command: no reload, no verification (a
    /// server that is not running yet).
    pub no_reload: bool,
    pub no_wait: bool,
    /// Who asked, for the log: "cli uid=1000 pid=4242".
    pub origin: String,
    pub clock_skew_grace: Duration,
}

/// The last finished deploy of a target, for `certctl status`.
#[derive(Debug, Clone)]
pub struct LastDeploy {
    pub deploy_id: String,
    pub outcome: Outcome,
    pub finished: SystemTime,
    pub error: String,
    pub cert_sha256: String,
}

impl LastDeploy {
    /// The journal's record of a finished run (`None` for an outcome this
    /// build does not know).
    fn of(rec: &Record) -> Option<LastDeploy> {
        Some(LastDeploy {
            deploy_id: rec.id.clone(),
            outcome: Outcome::parse(rec.outcome.as_deref().unwrap_or_default())?,
            finished: rec.finished.unwrap_or(rec.started),
            error: rec.error.clone(),
            cert_sha256: rec.cert_sha256.clone(),
        })
    }
}

/// Runs deploys; shared by every API call of one agent.
#[derive(Debug)]
pub struct Engine {
    pub(super) locks: Locks,
    pub(super) events: broadcast::Sender<Event>,
    /// Per target, its last finished run (`None`: the journal has none).
    /// A target missing here is looked up in the journal once.
    pub(super) last: Mutex<HashMap<String, Option<Arc<LastDeploy>>>>,
    /// What each target has on disk, as status shows it.
    pub(super) deployed: Arc<Deployed>,
    /// The last probe of each target's verify endpoint. Shared, so that
    /// status can tell by identity whether it changed.
    pub(super) served: Mutex<HashMap<String, Arc<Checks>>>,
    /// Fires at shutdown: verification waits end early.
    pub(super) shutdown: CancellationToken,
    /// Per target, the token of the deploy holding it. A deploy that has to
    /// wait for the lock fires it, so the holder's verification waits end
    /// early instead of holding the newer deploy up.
    pub(super) hurry: Mutex<HashMap<String, CancellationToken>>,
    /// Every run is recorded here before it touches a file.
    pub(super) journal: Arc<Journal>,
    /// Counters and stage timings of every deploy and rollback.
    pub(super) metrics: Arc<Metrics>,
}

impl Engine {
    /// `lock_dir` holds the per-target `flock` files; every run is
    /// recorded in `journal`.
    pub fn new(lock_dir: PathBuf, journal: Arc<Journal>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            locks: Locks::new(lock_dir),
            events,
            last: Mutex::new(HashMap::new()),
            deployed: Arc::new(Deployed::new()),
            served: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            hurry: Mutex::new(HashMap::new()),
            journal,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The deploy journal (history, recovery).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The agent's metrics (also for callers outside deploys, such as the
    /// drop directory watcher: [`Metrics::drop_outcome`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The agent is stopping: pending verification waits end now (each
    /// deploy still makes one last attempt and rolls back when it fails).
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Cancelled when the agent stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Sends an event to watchers (for events that are not part of a
    /// deploy, like drift).
    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Remembers the latest probe of `target` for `certctl status`.
    pub fn record_served(&self, target: &str, check: Checks) {
        lock(&self.served).insert(target.to_owned(), Arc::new(check));
    }

    /// The latest probe of `target`'s verify endpoint since start; the
    /// same `Arc` until the next probe.
    pub fn served(&self, target: &str) -> Option<Arc<Checks>> {
        lock(&self.served).get(target).cloned()
    }

    /// Every event of every deploy from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// True while a deploy holds `target`.
    pub fn is_busy(&self, target: &str) -> bool {
        self.locks.is_busy(target)
    }

    /// The last finished (not dry-run) run of `target`: kept in memory,
    /// from the journal the first time a target is asked about (at start
    /// for every configured target: [`Engine::seed`]). The same `Arc`
    /// until the target's next run finishes.
    pub fn last(&self, target: &str) -> Option<Arc<LastDeploy>> {
        if let Some(last) = lock(&self.last).get(target) {
            return last.clone();
        }
        let last = match self.journal.last(target) {
            Ok(rec) => rec.and_then(|r| LastDeploy::of(&r)).map(Arc::new),
            // Not remembered: asked again next time.
            Err(e) => {
                tracing::warn!(target, "cannot read the last run from the journal: {e}");
                return None;
            }
        };
        lock(&self.last)
            .entry(target.to_owned())
            .or_insert(last)
            .clone()
    }

    /// Reads the last run of every target in one journal query, before
    /// status is asked for (start-up, blocking). Targets already known
    /// (a run finished since) keep what they have.
    pub fn seed(&self, targets: &[Target]) -> Result<(), JournalError> {
        let mut found = self.journal.last_of_all()?;
        let mut last = lock(&self.last);
        for t in targets {
            let rec = found.remove(&t.name);
            last.entry(t.name.clone())
                .or_insert_with(|| rec.as_ref().and_then(LastDeploy::of).map(Arc::new));
        }
        Ok(())
    }

    /// What each target has on disk, kept in memory (status, metrics).
    pub fn deployed(&self) -> &Arc<Deployed> {
        &self.deployed
    }

    /// Takes `target`'s lock. A deploy that has to wait hurries the holder
    /// along (its verification waits end early). The returned token fires
    /// when the next deploy starts waiting or the agent stops.
    pub(super) async fn lock_target(
        &self,
        target: &str,
        no_wait: bool,
    ) -> Result<(TargetGuard, CancellationToken), LockError> {
        if !no_wait
            && self.locks.is_busy(target)
            && let Some(holder) = lock(&self.hurry).get(target)
        {
            holder.cancel();
        }
        let guard = self.locks.acquire(target, no_wait).await?;
        let token = self.shutdown.child_token();
        lock(&self.hurry).insert(target.to_owned(), token.clone());
        Ok((guard, token))
    }
}
