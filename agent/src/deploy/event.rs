//! What a deploy reports while it runs and when it ends.
//!
//! These are the agent's own types; the API layer converts them to the
//! protobuf messages in exactly one place (`api::convert`).

use std::time::{Duration, SystemTime};

use super::plan::{PlannedFile, Role, Source};
use super::verify::{Attempt, ServedCheck};

/// The stages of `DEPLOY-PROTOCOL.md`, in the order a deploy reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Validated,
    Planned,
    Locked,
    Staged,
    Committed,
    ValidateCommand,
    Reloaded,
    VerifyAttempt,
    Rollback,
    Done,
    /// Not part of a deploy: the drift watch noticed a change in what is
    /// served.
    Drift,
    /// Not a deploy stage: an event of the drop directory (the event's
    /// `drop` is set).
    Drop,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Validated => "validated",
            Stage::Planned => "planned",
            Stage::Locked => "locked",
            Stage::Staged => "staged",
            Stage::Committed => "committed",
            Stage::ValidateCommand => "validate-command",
            Stage::Reloaded => "reloaded",
            Stage::VerifyAttempt => "verify",
            Stage::Rollback => "rollback",
            Stage::Done => "done",
            Stage::Drift => "drift",
            Stage::Drop => "drop",
        }
    }
}

/// How a deploy ended. Each maps to one exit code of `certctl deploy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Deployed,
    Unchanged,
    Rejected,
    ValidateFailed,
    RolledBack,
    RollbackFailed,
    Busy,
    Internal,
    DryRun,
    /// `certctl rollback` put the previous set back (verified when the
    /// target has a verify endpoint).
    Restored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Deployed => "deployed",
            Outcome::Unchanged => "unchanged",
            Outcome::Rejected => "rejected",
            Outcome::ValidateFailed => "validate_failed",
            Outcome::RolledBack => "rolled_back",
            Outcome::RollbackFailed => "rollback_failed",
            Outcome::Busy => "busy",
            Outcome::Internal => "internal",
            Outcome::DryRun => "dry_run",
            Outcome::Restored => "restored",
        }
    }

    /// The outcome called `name` ([`Outcome::as_str`]).
    pub fn parse(name: &str) -> Option<Outcome> {
        [
            Outcome::Deployed,
            Outcome::Unchanged,
            Outcome::Rejected,
            Outcome::ValidateFailed,
            Outcome::RolledBack,
            Outcome::RollbackFailed,
            Outcome::Busy,
            Outcome::Internal,
            Outcome::DryRun,
            Outcome::Restored,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }
}

/// Whether the served certificate was checked after the reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    Verified,
    Unverified,
}

impl Verification {
    pub fn as_str(self) -> &'static str {
        match self {
            Verification::Verified => "verified",
            Verification::Unverified => "unverified",
        }
    }
}

/// One planned file, without its bytes: safe to log and send.
#[derive(Debug, Clone)]
pub struct FileSummary {
    pub path: std::path::PathBuf,
    pub role: Role,
    pub sha256: [u8; 32],
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub changed: bool,
    pub mode_source: Source,
    pub owner_source: Source,
}

impl From<&PlannedFile> for FileSummary {
    fn from(f: &PlannedFile) -> Self {
        Self {
            path: f.path.clone(),
            role: f.role,
            sha256: f.sha256,
            mode: f.mode,
            uid: f.uid,
            gid: f.gid,
            changed: f.changed,
            mode_source: f.mode_source,
            owner_source: f.owner_source,
        }
    }
}

/// The end of a deploy.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    /// Empty on success; never holds key material.
    pub error: String,
    pub cert_sha256: String,
    pub not_after: i64,
    pub subject: String,
    pub verification: Verification,
    pub warnings: Vec<String>,
    pub duration: Duration,
    /// Leaf on `cert_path` when the deploy ended; empty when none.
    pub disk_sha256: String,
    /// Leaf served at the last probe; empty when not probed.
    pub served_sha256: String,
}

/// One event of one deploy.
#[derive(Debug, Clone)]
pub struct Event {
    pub deploy_id: String,
    pub target: String,
    pub stage: Stage,
    pub message: String,
    pub at: SystemTime,
    /// Set on [`Stage::Planned`].
    pub files: Vec<FileSummary>,
    /// Set on [`Stage::Done`].
    pub report: Option<Report>,
    /// Set on [`Stage::VerifyAttempt`] events of the retry loop.
    pub attempt: Option<Attempt>,
    /// Set on [`Stage::Drift`].
    pub served: Option<ServedCheck>,
    /// Set on [`Stage::Drop`].
    pub drop: Option<crate::drop::Info>,
}

impl Event {
    /// An event with only the common fields set.
    pub fn new(deploy_id: &str, target: &str, stage: Stage, message: String) -> Self {
        Self {
            deploy_id: deploy_id.to_owned(),
            target: target.to_owned(),
            stage,
            message,
            at: SystemTime::now(),
            files: Vec::new(),
            report: None,
            attempt: None,
            served: None,
            drop: None,
        }
    }
}

/// A new deploy id: UTC time to the millisecond plus 16 random bits, so ids
/// sort by start time and two deploys in one millisecond differ.
pub fn new_deploy_id(now: SystemTime) -> String {
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let secs = (ms / 1000) as i64;
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    format!(
        "{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{:03}Z-{:04x}",
        ms % 1000,
        rand::random::<u16>()
    )
}

/// Splits Unix seconds into UTC calendar fields (Howard Hinnant's algorithm).
pub fn civil_from_unix(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_from_unix(1_795_000_000), (2026, 11, 18, 11, 6, 40));
    }

    #[test]
    fn deploy_ids_sort_by_time() {
        let a = new_deploy_id(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_001));
        let b = new_deploy_id(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_002));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20261118T110640.001Z-"), "{a}");
    }
}
