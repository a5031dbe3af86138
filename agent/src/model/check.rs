//! What a probe found, compared with what was expected: the vocabulary of
//! verification shared by the engine, `certctl verify`, the drift watch,
//! status and metrics. Pure data and the one-line descriptions of it.

use std::time::{Duration, SystemTime};

use super::fmt::{fmt_duration, rfc3339, short_or_nothing as short};
use crate::kind::VerifyProtocol;

/// A certificate that is served with less than this left is reported as
/// `expiring` by the drift watch.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// How a probe compared with what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckState {
    /// The expected leaf (and chain, when required) is served.
    Verified,
    /// Another leaf is served.
    Mismatch,
    /// The leaf matches but the intermediates differ from the deployed chain
    /// (only with `require_chain_match`).
    ChainMismatch,
    /// The probe failed: no connection, no STARTTLS, no handshake, ...
    Unreachable,
    /// The expected leaf is served but expires within [`EXPIRY_WARNING`]
    /// (drift watch only).
    Expiring,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Verified => "verified",
            CheckState::Mismatch => "mismatch",
            CheckState::ChainMismatch => "chain-mismatch",
            CheckState::Unreachable => "unreachable",
            CheckState::Expiring => "expiring",
        }
    }

    /// The word `certctl status` shows in its verification column.
    pub fn verification(self) -> &'static str {
        match self {
            CheckState::Verified | CheckState::Expiring => "verified",
            CheckState::Mismatch | CheckState::ChainMismatch => "mismatch",
            CheckState::Unreachable => "unreachable",
        }
    }
}

/// One probe, compared with what was expected.
#[derive(Debug, Clone)]
pub struct ServedCheck {
    pub endpoint: String,
    pub server_name: String,
    pub protocol: VerifyProtocol,
    /// The leaf expected (the one on disk), hex SHA-256.
    pub want_sha256: String,
    /// The leaf served; empty when the probe failed.
    pub served_sha256: String,
    pub served_chain_sha256: Vec<String>,
    pub served_subject: String,
    pub served_not_after: i64,
    pub state: CheckState,
    /// Short reason code for a failed check; empty when verified.
    pub reason: &'static str,
    /// One line: what differs or why the probe failed; empty when verified.
    pub error: String,
    pub checked: SystemTime,
    pub tls_version: String,
    pub ca_validated: bool,
}

impl ServedCheck {
    pub fn ok(&self) -> bool {
        matches!(self.state, CheckState::Verified | CheckState::Expiring)
    }
}

/// What verification found at every endpoint of a target, in configured
/// order: for each, the handshake that ended its verification (the last of
/// its consecutive matches, or the one that failed).
#[derive(Debug, Clone, Default)]
pub struct Checks(pub Vec<ServedCheck>);

impl Checks {
    /// Every endpoint passed (and there is at least one).
    pub fn ok(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(ServedCheck::ok)
    }

    /// The check that speaks for the target where one check is shown: the
    /// first endpoint that failed, else the first endpoint. With one
    /// endpoint, that endpoint's check.
    pub fn decisive(&self) -> Option<&ServedCheck> {
        self.0.iter().find(|c| !c.ok()).or_else(|| self.0.first())
    }

    /// The errors of the endpoints that failed, one after the other.
    pub fn error(&self) -> String {
        self.0
            .iter()
            .filter(|c| !c.ok())
            .map(|c| c.error.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The check of every endpoint was made against this leaf.
    pub fn all_want(&self, sha256: &str) -> bool {
        !self.0.is_empty() && self.0.iter().all(|c| c.want_sha256 == sha256)
    }
}

/// One attempt of a retry loop, as reported to the client.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    pub attempts: u32,
    pub check: ServedCheck,
    /// Consecutive matching handshakes of this endpoint so far, this one
    /// included; 0 when this one did not match (the count restarts).
    pub matches: u32,
    /// How many consecutive matches the endpoint needs (`consecutive`).
    pub consecutive: u32,
    /// The wait before the next handshake of the loop (the next match of a
    /// series, another endpoint, or the next attempt after the backoff);
    /// `None` when nothing follows.
    pub next_in: Option<Duration>,
    /// Verifying the previous certificate during a rollback.
    pub rollback: bool,
}

impl Attempt {
    /// `verify attempt 2/6: 2/3 consecutive matches, 127.0.0.1:8443 serves
    /// 9f…e1 (TLSv1.3); next in 0.5s`, or for a handshake that did not
    /// match `verify attempt 2/3: served 9f…e1 by 127.0.0.1:443, want
    /// 4a…07; next in 2.1s`.
    pub fn describe(&self) -> String {
        let what = if self.rollback {
            "rollback verify attempt"
        } else {
            "verify attempt"
        };
        let mut s = format!("{what} {}/{}: ", self.attempt, self.attempts);
        let c = &self.check;
        match c.state {
            CheckState::Verified | CheckState::Expiring => {
                if self.consecutive > 1 {
                    s.push_str(&format!(
                        "{}/{} consecutive matches, ",
                        self.matches, self.consecutive
                    ));
                }
                s.push_str(&format!(
                    "{} serves {} ({})",
                    c.endpoint,
                    short(&c.served_sha256),
                    c.tls_version
                ));
            }
            CheckState::Mismatch => s.push_str(&format!(
                "served {} by {}, want {}",
                short(&c.served_sha256),
                c.endpoint,
                short(&c.want_sha256)
            )),
            CheckState::ChainMismatch | CheckState::Unreachable => s.push_str(&c.error),
        }
        if let Some(next) = self.next_in {
            s.push_str(&format!("; next in {}", fmt_duration(next)));
        }
        s
    }
}

/// The drift watch's view of a check: `Expiring` when the expected leaf is
/// served but expires soon.
pub fn with_expiry(mut check: ServedCheck, now: SystemTime) -> ServedCheck {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if check.state == CheckState::Verified
        && check.served_not_after - now < EXPIRY_WARNING.as_secs() as i64
    {
        check.state = CheckState::Expiring;
        check.reason = "expiring";
        check.error = format!(
            "{} serves the deployed certificate, but it expires {}: deploy a renewed one",
            check.endpoint,
            if check.served_not_after <= now {
                format!("{} (already expired)", rfc3339(check.served_not_after))
            } else {
                format!("at {}", rfc3339(check.served_not_after))
            }
        );
    }
    check
}
