//! What the agent tells about drops: the outcome of each, the deploy each
//! target got, and the latest drop event per target. Data only; the drop
//! directory (`crate::drop`) produces it, events and status carry it.

use std::path::PathBuf;
use std::time::SystemTime;

use super::stage::Outcome;

/// The name the drop directory's code uses.
pub type Info = DropInfo;

/// The form of a drop on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    File,
    Directory,
    /// A symlink, FIFO, socket or device, or nothing readable.
    Other,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::File => "file",
            Form::Directory => "directory",
            Form::Other => "other",
        }
    }
}

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
pub struct DropInfo {
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

impl DropInfo {
    /// An event about the drop at `path` named `name`.
    pub fn new(
        name: Option<&str>,
        path: PathBuf,
        form: Form,
        outcome: DropOutcome,
        targets: Vec<String>,
    ) -> Self {
        DropInfo {
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
    pub info: DropInfo,
    pub message: String,
    pub at: SystemTime,
}
