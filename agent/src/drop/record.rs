//! What the agent tells about drops: one [`Info`] per event, published on
//! the watch stream, logged, and kept per target for `certctl status`.
//!
//! Every drop gets exactly one terminal outcome ([`DropOutcome::is_final`]);
//! each is recorded once per target its name maps to (once with an empty
//! target when none does), so a watcher following one target sees all of
//! that target's drops.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use tracing::{error, info, warn};

use super::scan::Form;
use crate::deploy::{Engine, Event, Outcome, Stage};

/// What happened to a drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropOutcome {
    /// Taken and checked; deploys start.
    Accepted,
    /// A directory drop that is not a complete set yet.
    Waiting,
    /// Every deploy succeeded; the drop was removed.
    Removed,
    /// Moved to `rejected/` with a reason file.
    Rejected,
    /// Replaced by a newer drop of its name before it was deployed.
    Superseded,
    /// Left the drop directory before it was taken.
    Withdrawn,
    /// Could not be taken, removed or moved; left where it is.
    Failed,
}

impl DropOutcome {
    /// The JSON and log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DropOutcome::Accepted => "accepted",
            DropOutcome::Waiting => "waiting",
            DropOutcome::Removed => "removed",
            DropOutcome::Rejected => "rejected",
            DropOutcome::Superseded => "superseded",
            DropOutcome::Withdrawn => "withdrawn",
            DropOutcome::Failed => "failed",
        }
    }

    /// Whether this ends the drop (the others report progress).
    pub fn is_final(self) -> bool {
        !matches!(self, DropOutcome::Accepted | DropOutcome::Waiting)
    }
}

/// The deploy one target got from a drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetResult {
    pub target: String,
    pub deploy_id: String,
    pub outcome: Outcome,
    /// Empty on success.
    pub error: String,
}

/// One drop event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The drop name; empty when the entry has none.
    pub name: String,
    /// The drop's public path in the drop directory.
    pub path: PathBuf,
    pub form: Form,
    pub outcome: DropOutcome,
    /// Stable short code; empty for `Accepted` and `Removed`.
    pub reason: String,
    /// Targets the name maps to.
    pub targets: Vec<String>,
    /// After deploys: one per target, in configuration order.
    pub results: Vec<TargetResult>,
    /// Where the drop was moved, when it was.
    pub rejected_path: Option<PathBuf>,
    /// The leaf's SHA-256, once checked.
    pub cert_sha256: String,
}

impl Info {
    /// An event about the drop at `path` named `name`.
    pub fn new(
        name: Option<&str>,
        path: PathBuf,
        form: Form,
        outcome: DropOutcome,
        targets: Vec<String>,
    ) -> Self {
        Info {
            name: name.unwrap_or_default().to_owned(),
            path,
            form,
            outcome,
            reason: String::new(),
            targets,
            results: Vec::new(),
            rejected_path: None,
            cert_sha256: String::new(),
        }
    }

    pub fn reason(mut self, code: &str) -> Self {
        self.reason = code.to_owned();
        self
    }
}

/// The latest drop event of a target.
#[derive(Debug, Clone)]
pub struct LastDrop {
    pub info: Info,
    pub message: String,
    pub at: SystemTime,
}

/// Drop state that `certctl status` shows.
#[derive(Debug, Default)]
pub struct Ledger {
    last: Mutex<HashMap<String, LastDrop>>,
    pending: AtomicUsize,
    in_flight: AtomicUsize,
    /// The drop directory and `rejected/` the agent started with.
    dirs: OnceLock<(PathBuf, PathBuf)>,
}

impl Ledger {
    /// The latest drop event of `target` since the agent started.
    pub fn last(&self, target: &str) -> Option<LastDrop> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(target)
            .cloned()
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

    pub(super) fn set_dirs(&self, drop_dir: PathBuf, rejected: PathBuf) {
        let _ = self.dirs.set((drop_dir, rejected));
    }

    pub(super) fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
    }

    pub(super) fn job_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn job_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    fn set_last(&self, target: &str, last: LastDrop) {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(target.to_owned(), last);
    }
}

/// Records one drop event: a log line, a watch event and the status entry
/// of each target (or one log line and event without a target).
pub fn record(engine: &Engine, ledger: &Ledger, info: &Info, message: &str) {
    let at = SystemTime::now();
    // Once per drop event (not per target); waiting is not an outcome.
    if info.outcome != DropOutcome::Waiting {
        engine.metrics().drop_outcome(info.outcome.as_str());
    }
    let targets: Vec<&str> = if info.targets.is_empty() {
        vec![""]
    } else {
        info.targets.iter().map(String::as_str).collect()
    };
    for target in targets {
        log(target, info, message);
        let deploy_id = info
            .results
            .iter()
            .find(|r| r.target == target)
            .map(|r| r.deploy_id.clone())
            .unwrap_or_default();
        if !target.is_empty() {
            ledger.set_last(
                target,
                LastDrop {
                    info: info.clone(),
                    message: message.to_owned(),
                    at,
                },
            );
        }
        engine.publish(Event {
            deploy_id,
            target: target.to_owned(),
            stage: Stage::Drop,
            message: message.to_owned(),
            at,
            files: Vec::new(),
            report: None,
            attempt: None,
            served: None,
            drop: Some(info.clone()),
        });
    }
}

fn log(target: &str, info: &Info, message: &str) {
    let path = info.path.display();
    let outcome = info.outcome.as_str();
    let reason = info.reason.as_str();
    match info.outcome {
        DropOutcome::Accepted
        | DropOutcome::Waiting
        | DropOutcome::Removed
        | DropOutcome::Superseded => {
            info!(target = %target, drop = %path, drop_outcome = %outcome, reason = %reason, "{message}");
        }
        DropOutcome::Rejected | DropOutcome::Withdrawn => {
            warn!(target = %target, drop = %path, drop_outcome = %outcome, reason = %reason, "{message}");
        }
        DropOutcome::Failed => {
            error!(target = %target, drop = %path, drop_outcome = %outcome, reason = %reason, "{message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_gets_the_event_its_last_drop_and_its_deploy_id() {
        let dir = tempfile::tempdir().unwrap();
        let journal = crate::journal::Journal::open(dir.path()).unwrap();
        let engine = Engine::new(dir.path().join("locks"), std::sync::Arc::new(journal));
        let mut rx = engine.subscribe();
        let ledger = Ledger::default();
        let mut info = Info::new(
            Some("mail"),
            PathBuf::from("/d/mail.pem"),
            Form::File,
            DropOutcome::Removed,
            vec!["postfix".to_owned(), "dovecot".to_owned()],
        );
        info.results = ["postfix", "dovecot"]
            .iter()
            .map(|t| TargetResult {
                target: (*t).to_owned(),
                deploy_id: format!("id-{t}"),
                outcome: Outcome::Deployed,
                error: String::new(),
            })
            .collect();
        record(&engine, &ledger, &info, "deployed and removed");
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!(
            (a.target.as_str(), a.deploy_id.as_str()),
            ("postfix", "id-postfix")
        );
        assert_eq!(
            (b.target.as_str(), b.deploy_id.as_str()),
            ("dovecot", "id-dovecot")
        );
        assert_eq!(a.stage, Stage::Drop);
        assert_eq!(a.drop.as_ref().unwrap().outcome, DropOutcome::Removed);
        assert_eq!(
            ledger.last("dovecot").unwrap().message,
            "deployed and removed"
        );

        let unknown = Info::new(
            Some("nope"),
            PathBuf::from("/d/nope.pem"),
            Form::File,
            DropOutcome::Rejected,
            Vec::new(),
        )
        .reason("unknown_target");
        record(&engine, &ledger, &unknown, "no target takes it");
        let c = rx.try_recv().unwrap();
        assert_eq!(c.target, "");
        assert!(c.deploy_id.is_empty());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn progress_is_not_final() {
        assert!(!DropOutcome::Accepted.is_final());
        assert!(!DropOutcome::Waiting.is_final());
        for o in [
            DropOutcome::Removed,
            DropOutcome::Rejected,
            DropOutcome::Superseded,
            DropOutcome::Withdrawn,
            DropOutcome::Failed,
        ] {
            assert!(o.is_final(), "{}", o.as_str());
        }
    }
}
