//! The one place where the agent's types become protobuf messages and
//! errors become `tonic::Status`.

use std::time::SystemTime;

use certctl_proto::agent::v1 as pb;
use tonic::Status;

use super::auth::AuthError;
use crate::config::Target;
use crate::drop::{self, DropOutcome};
use crate::journal::Record;
use crate::model::check::{Attempt, ServedCheck};
use crate::model::event::{Event, FileSummary, Outcome, Report, Stage};

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn stage(s: Stage) -> pb::Stage {
    match s {
        Stage::Validated => pb::Stage::Validated,
        Stage::Planned => pb::Stage::Planned,
        Stage::Locked => pb::Stage::Locked,
        Stage::Staged => pb::Stage::Staged,
        Stage::Committed => pb::Stage::Committed,
        Stage::ValidateCommand => pb::Stage::ValidateCommand,
        Stage::Reloaded => pb::Stage::Reloaded,
        Stage::VerifyAttempt => pb::Stage::VerifyAttempt,
        Stage::Rollback => pb::Stage::Rollback,
        Stage::Done => pb::Stage::Done,
        Stage::Drift => pb::Stage::Drift,
        Stage::Drop => pb::Stage::Drop,
    }
}

pub fn outcome(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Deployed => pb::Outcome::Deployed,
        Outcome::Unchanged => pb::Outcome::Unchanged,
        Outcome::Rejected => pb::Outcome::Rejected,
        Outcome::ValidateFailed => pb::Outcome::ValidateFailed,
        Outcome::RolledBack => pb::Outcome::RolledBack,
        Outcome::RollbackFailed => pb::Outcome::RollbackFailed,
        Outcome::Busy => pb::Outcome::Busy,
        Outcome::Internal => pb::Outcome::Internal,
        Outcome::DryRun => pb::Outcome::DryRun,
        Outcome::Restored => pb::Outcome::Restored,
    }
}

fn file(f: &FileSummary) -> pb::PlannedFile {
    pb::PlannedFile {
        path: f.path.display().to_string(),
        role: f.role.as_str().to_owned(),
        sha256: hex::encode(f.sha256),
        mode: f.mode,
        uid: f.uid,
        gid: f.gid,
        changed: f.changed,
        mode_source: f.mode_source.as_str().to_owned(),
        owner_source: f.owner_source.as_str().to_owned(),
    }
}

pub fn report(r: &Report) -> pb::DeployResult {
    pb::DeployResult {
        outcome: outcome(r.outcome) as i32,
        error: r.error.clone(),
        cert_sha256: r.cert_sha256.clone(),
        not_after_unix: r.not_after,
        subject: r.subject.clone(),
        verification: r.verification.as_str().to_owned(),
        warnings: r.warnings.clone(),
        duration_ms: r.duration.as_millis() as i64,
        disk_sha256: r.disk_sha256.clone(),
        served_sha256: r.served_sha256.clone(),
        served_endpoints: r.served.iter().map(served).collect(),
    }
}

pub fn history(r: &Record) -> pb::HistoryEntry {
    pb::HistoryEntry {
        deploy_id: r.id.clone(),
        target: r.target.clone(),
        op: r.op.clone(),
        origin: r.origin.clone(),
        started_unix_ms: unix_ms(r.started),
        finished_unix_ms: r.finished.map_or(0, unix_ms),
        outcome: r
            .outcome
            .as_deref()
            .and_then(Outcome::parse)
            .map_or(pb::Outcome::Unspecified, outcome) as i32,
        last_stage: r.stage.clone(),
        error: r.error.clone(),
        cert_sha256: r.cert_sha256.clone(),
        prev_sha256: r.prev_sha256.clone(),
        verification: r.verification.clone(),
        disk_sha256: r.disk_sha256.clone(),
        served_sha256: r.served_sha256.clone(),
        recovered: r.recovered,
        stages: r
            .stages
            .iter()
            .map(|(at, stage, message)| pb::StageRecord {
                unix_ms: unix_ms(*at),
                stage: stage.clone(),
                message: message.clone(),
            })
            .collect(),
    }
}

pub fn served(c: &ServedCheck) -> pb::ServedCheck {
    pb::ServedCheck {
        endpoint: c.endpoint.clone(),
        server_name: c.server_name.clone(),
        protocol: c.protocol.as_str().to_owned(),
        disk_sha256: c.want_sha256.clone(),
        served_sha256: c.served_sha256.clone(),
        served_chain_sha256: c.served_chain_sha256.clone(),
        served_subject: c.served_subject.clone(),
        served_not_after_unix: c.served_not_after,
        state: c.state.as_str().to_owned(),
        error: c.error.clone(),
        checked_unix_ms: unix_ms(c.checked),
        tls_version: c.tls_version.clone(),
        ca_validated: c.ca_validated,
    }
}

fn attempt(a: &Attempt) -> pb::VerifyAttempt {
    pb::VerifyAttempt {
        attempt: a.attempt,
        attempts: a.attempts,
        ok: a.check.ok(),
        served_sha256: a.check.served_sha256.clone(),
        want_sha256: a.check.want_sha256.clone(),
        error: a.check.error.clone(),
        reason: a.check.reason.to_owned(),
        next_in_ms: a.next_in.map_or(0, |d| d.as_millis() as i64),
        rollback: a.rollback,
        endpoint: a.check.endpoint.clone(),
        matches: a.matches,
        consecutive: a.consecutive,
    }
}

pub fn event(e: &Event) -> pb::DeployEvent {
    pb::DeployEvent {
        deploy_id: e.deploy_id.clone(),
        target: e.target.clone(),
        stage: stage(e.stage) as i32,
        message: e.message.clone(),
        unix_ms: unix_ms(e.at),
        files: e.files.iter().map(file).collect(),
        result: e.report.as_ref().map(report),
        attempt: e.attempt.as_ref().map(attempt),
        served: e.served.as_ref().map(served),
        drop: e.drop.as_ref().map(drop_info),
    }
}

pub fn drop_outcome(o: DropOutcome) -> pb::DropOutcome {
    match o {
        DropOutcome::Accepted => pb::DropOutcome::Accepted,
        DropOutcome::Waiting => pb::DropOutcome::Waiting,
        DropOutcome::Removed => pb::DropOutcome::Removed,
        DropOutcome::Rejected => pb::DropOutcome::Rejected,
        DropOutcome::Superseded => pb::DropOutcome::Superseded,
        DropOutcome::Withdrawn => pb::DropOutcome::Withdrawn,
        DropOutcome::Failed => pb::DropOutcome::Failed,
    }
}

pub fn drop_info(d: &drop::Info) -> pb::DropInfo {
    pb::DropInfo {
        name: d.name.clone(),
        path: crate::model::fmt::shown(&d.path),
        form: d.form.as_str().to_owned(),
        outcome: drop_outcome(d.outcome) as i32,
        reason: d.reason.clone(),
        targets: d.targets.clone(),
        results: d
            .results
            .iter()
            .map(|r| pb::DropTargetResult {
                target: r.target.clone(),
                deploy_id: r.deploy_id.clone(),
                outcome: outcome(r.outcome) as i32,
                error: r.error.clone(),
            })
            .collect(),
        rejected_path: d
            .rejected_path
            .as_ref()
            .map(|p| crate::model::fmt::shown(p))
            .unwrap_or_default(),
        cert_sha256: d.cert_sha256.clone(),
    }
}

pub fn last_drop(l: &drop::LastDrop) -> pb::LastDrop {
    pb::LastDrop {
        drop: Some(drop_info(&l.info)),
        message: l.message.clone(),
        unix_ms: unix_ms(l.at),
    }
}

/// `user@host:port` of a remote target; empty for this host.
pub fn remote_host(t: &Target) -> String {
    t.ssh
        .as_ref()
        .map(crate::atomic::remote::shown)
        .unwrap_or_default()
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::NoCredentials { .. } => Status::unauthenticated(e.to_string()),
            AuthError::Denied { .. } => Status::permission_denied(e.to_string()),
        }
    }
}
