//! What a deploy reports while it runs and when it ends.
//!
//! These are the agent's own types, and the one spelling of stages,
//! outcomes and operations: the journal, log fields, metrics labels, the
//! API conversion and the docs all use [`Stage::as_str`],
//! [`Outcome::as_str`] and [`Op::as_str`]. The API layer converts them to
//! the protobuf messages in exactly one place (`api::convert`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, SystemTime};

use super::check::{Attempt, ServedCheck};
use super::drop::DropInfo;
use super::file::{Role, Source};

pub use super::stage::{Op, Outcome, Stage, Verification};

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

/// The end of a deploy.
#[derive(Debug, Clone)]
pub struct Report {
    /// The run this report ends.
    pub deploy_id: String,
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
    /// Leaf served at the last probe (of the first endpoint that failed,
    /// else of the first endpoint); empty when not probed.
    pub served_sha256: String,
    /// The last check of each endpoint, in configured order; empty when
    /// not probed.
    pub served: Vec<ServedCheck>,
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
    pub drop: Option<DropInfo>,
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

/// A new deploy id: UTC time to the millisecond plus 16 bits, so ids sort
/// by start time and two deploys in one millisecond differ. The 16 bits
/// are a counter from a random start, not a fresh random number each:
/// a burst of drops starts dozens of deploys in one millisecond, and 16
/// random bits made two of them share an id now and then (the journal
/// then refused the second run). The counter repeats only after 65,536
/// ids; the random start makes a clash with an earlier run's ids unlikely
/// should the clock have gone back.
pub fn new_deploy_id(now: SystemTime) -> String {
    static START: OnceLock<u16> = OnceLock::new();
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = *START.get_or_init(rand::random::<u16>);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}-{:04x}",
        super::fmt::file_stamp(now),
        start.wrapping_add(n)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_ids_sort_by_time() {
        let a = new_deploy_id(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_001));
        let b = new_deploy_id(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_002));
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20261118T110640.001Z-"), "{a}");
    }

    #[test]
    fn ids_made_in_one_millisecond_never_repeat() {
        // Most of the counter's cycle at the same instant, as a burst of
        // drops makes them; the rest is room for the ids other tests take
        // meanwhile from the same counter. (16 random bits each: two of
        // 60,000 ids alike is all but certain.)
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_001);
        let ids: std::collections::HashSet<String> =
            (0..60_000).map(|_| new_deploy_id(now)).collect();
        assert_eq!(ids.len(), 60_000);
    }
}
