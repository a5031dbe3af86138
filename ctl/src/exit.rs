//! Exit codes of `certctl`, as the contract defines them.

use certctl_proto::agent::v1::Outcome;

/// Done: deployed (and verified), or already identical.
pub const OK: u8 = 0;
/// Internal or unexpected error; the target is unchanged or restored.
pub const INTERNAL: u8 = 1;
/// Usage error: bad arguments, unreadable input file.
pub const USAGE: u8 = 2;
/// Input rejected: bad PEM, key mismatch, expired, unknown target.
pub const REJECTED: u8 = 3;
/// The validate command failed; the old files are in place.
pub const VALIDATE_FAILED: u8 = 4;
/// Reload or verify failed; rolled back to the old certificate.
pub const ROLLED_BACK: u8 = 5;
/// Rollback failed: operator action needed.
pub const ROLLBACK_FAILED: u8 = 6;
/// Agent unreachable or permission denied.
pub const UNREACHABLE: u8 = 7;
/// Target busy and --no-wait given.
pub const BUSY: u8 = 8;

/// The exit code for a deploy's outcome.
pub fn for_outcome(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Deployed | Outcome::Unchanged | Outcome::DryRun | Outcome::Restored => OK,
        Outcome::Rejected => REJECTED,
        Outcome::ValidateFailed => VALIDATE_FAILED,
        Outcome::RolledBack => ROLLED_BACK,
        Outcome::RollbackFailed => ROLLBACK_FAILED,
        Outcome::Busy => BUSY,
        Outcome::Internal | Outcome::Unspecified => INTERNAL,
    }
}

/// The exit code for an error status returned by the agent.
pub fn for_status(code: tonic::Code) -> u8 {
    match code {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::Unavailable => {
            UNREACHABLE
        }
        tonic::Code::NotFound | tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            REJECTED
        }
        _ => INTERNAL,
    }
}
