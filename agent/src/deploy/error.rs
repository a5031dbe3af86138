//! Why a run ended early. The variant decides the outcome
//! ([`DeployError::outcome`]); the message is the report's `error`, one
//! line that says what happened to the files and, where there is
//! something to do, what to do. Never holds key material.

use crate::atomic::FsError;
use crate::bundle::BundleError;
use crate::command::CommandError;
use crate::journal::JournalError;
use crate::keystore::KeystoreError;
use crate::lock::LockError;
use crate::model::stage::Outcome;
use crate::reload::ReloadError;

/// Why stage 8 did not make the server load the files.
#[derive(Debug, thiserror::Error)]
pub enum ReloadFailed {
    /// A reload hook (the server's control socket or admin API) failed.
    #[error("reload failed: {0}")]
    Hook(#[from] ReloadError),
    /// The reload command failed or timed out.
    #[error(transparent)]
    Command(#[from] CommandError),
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The input is not a deployable certificate set (`rejected`).
    #[error(transparent)]
    Input(#[from] BundleError),
    /// The request cannot apply to this target: a plan it cannot make, or
    /// nothing to roll back to (`rejected`).
    #[error("{0}")]
    Refused(String),
    /// Another deploy holds the target and the caller would not wait
    /// (`busy`).
    #[error(transparent)]
    Busy(LockError),
    /// The lock could not be taken for another reason (`internal`).
    #[error(transparent)]
    Lock(LockError),
    /// The run could not be recorded; nothing was touched (`internal`).
    #[error("{0}; nothing was changed")]
    Journal(#[from] JournalError),
    /// The keystore could not be encoded or its password read; nothing was
    /// touched (`internal`).
    #[error("{0}; nothing was changed")]
    Keystore(#[from] KeystoreError),
    /// A filesystem step failed; `context` says what it left behind
    /// (`internal`).
    #[error("{context}: {source}")]
    Fs {
        context: &'static str,
        source: FsError,
    },
    /// Reading the filesystem failed before anything changed (`internal`).
    #[error(transparent)]
    Disk(#[from] FsError),
    /// Any other failure that left the target as it was, or as the message
    /// says (`internal`).
    #[error("{0}")]
    Internal(String),
    /// The validate command refused the new files; the previous files are
    /// back and the server was not reloaded (`validate_failed`).
    #[error("{0}")]
    ValidateFailed(String),
    /// A later stage failed and the previous set is back, verified when
    /// the target can be verified (`rolled_back`).
    #[error("{0}")]
    RolledBack(String),
    /// Putting the previous set back, or proving it served again, failed:
    /// an operator has to look (`rollback_failed`).
    #[error("{0}")]
    RollbackFailed(String),
}

impl DeployError {
    /// The outcome a run that ended with this error reports.
    pub fn outcome(&self) -> Outcome {
        match self {
            DeployError::Input(_) | DeployError::Refused(_) => Outcome::Rejected,
            DeployError::Busy(_) => Outcome::Busy,
            DeployError::Lock(_)
            | DeployError::Journal(_)
            | DeployError::Keystore(_)
            | DeployError::Fs { .. }
            | DeployError::Disk(_)
            | DeployError::Internal(_) => Outcome::Internal,
            DeployError::ValidateFailed(_) => Outcome::ValidateFailed,
            DeployError::RolledBack(_) => Outcome::RolledBack,
            DeployError::RollbackFailed(_) => Outcome::RollbackFailed,
        }
    }

    /// `Busy` for a busy lock, else `Lock`.
    pub fn from_lock(e: LockError) -> Self {
        match e {
            LockError::Busy { .. } => DeployError::Busy(e),
            other => DeployError::Lock(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_decides_the_outcome() {
        assert_eq!(
            DeployError::Refused("x".into()).outcome(),
            Outcome::Rejected
        );
        assert_eq!(
            DeployError::ValidateFailed("x".into()).outcome(),
            Outcome::ValidateFailed
        );
        assert_eq!(
            DeployError::RollbackFailed("x".into()).outcome(),
            Outcome::RollbackFailed
        );
        let e = DeployError::Fs {
            context: "staging failed, nothing changed",
            source: FsError {
                op: "write",
                path: "/x".into(),
                source: std::io::Error::other("disk full"),
            },
        };
        assert_eq!(e.outcome(), Outcome::Internal);
        assert!(
            e.to_string()
                .starts_with("staging failed, nothing changed: "),
            "{e}"
        );
    }
}
