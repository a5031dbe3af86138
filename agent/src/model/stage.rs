//! The one spelling of a run's stages, outcomes and operations. The
//! journal, log fields, metrics labels, the API conversion, the CLI and the
//! docs all use these names ([`Stage::as_str`], [`Outcome::as_str`],
//! [`Op::as_str`]); nothing else spells them.

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

/// What a run does, as the journal and history record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new certificate set put in place (`certctl deploy`, a drop).
    Deploy,
    /// The previous set put back (`certctl rollback`).
    Rollback,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
            Op::Rollback => "rollback",
        }
    }

    /// The operation called `name` ([`Op::as_str`]).
    pub fn parse(name: &str) -> Option<Op> {
        [Op::Deploy, Op::Rollback]
            .into_iter()
            .find(|o| o.as_str() == name)
    }
}

impl Stage {
    /// Every stage, in the order a deploy reports them (then the two that
    /// are not deploy stages).
    pub const ALL: [Stage; 12] = [
        Stage::Validated,
        Stage::Planned,
        Stage::Locked,
        Stage::Staged,
        Stage::Committed,
        Stage::ValidateCommand,
        Stage::Reloaded,
        Stage::VerifyAttempt,
        Stage::Rollback,
        Stage::Done,
        Stage::Drift,
        Stage::Drop,
    ];

    /// The stage called `name` ([`Stage::as_str`]).
    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }
}
