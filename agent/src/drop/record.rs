//! What the agent tells about drops: one [`Info`] per event, published on
//! the watch stream, logged, and kept per target for `certctl status`.
//!
//! Every drop gets exactly one terminal outcome ([`DropOutcome::is_final`]);
//! each is recorded once per target its name maps to (once with an empty
//! target when none does), so a watcher following one target sees all of
//! that target's drops.

use std::time::SystemTime;

use tracing::{error, info, warn};

pub use crate::app::Ledger;
use crate::deploy::Engine;
pub use crate::model::drop::{DropOutcome, Info, LastDrop, TargetResult};
use crate::model::event::{Event, Stage};

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
    let path = crate::model::fmt::shown(&info.path);
    let target = crate::model::fmt::escape(target.as_bytes());
    let message = crate::model::fmt::one_line(message);
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
    use crate::model::drop::Form;
    use crate::model::stage::Outcome;
    use std::path::PathBuf;

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
