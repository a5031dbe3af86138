//! The in-place layout's stages 5 and 6: a temp file per changed file,
//! then backups of the current files, one rename each, the directories
//! fsynced; undone on failure so that nothing is left half-changed.

use std::path::PathBuf;

use super::commit::{Committed, dirs_of, undo};
use super::plan::Plan;
use crate::atomic::{self, Fs, FsError};
use crate::failpoint;

/// A changed file written to its temp name, ready to be renamed into place.
pub(super) struct Staged {
    tmp: PathBuf,
    live: PathBuf,
    /// Something was at `live` before: it is kept as a backup.
    existed: bool,
}

/// Writes a temp file for every changed file. On error, removes the temps
/// written so far: nothing is left behind.
pub(super) fn stage_files(fs: &Fs, plan: &Plan, id: &str) -> Result<Vec<Staged>, FsError> {
    let mut staged: Vec<Staged> = Vec::new();
    for f in plan.files.iter().filter(|f| f.changed) {
        match fs.write_temp(&f.path, id, &f.bytes, f.mode, f.uid, f.gid) {
            Ok(tmp) => staged.push(Staged {
                tmp,
                live: f.path.clone(),
                existed: f.existing.is_some(),
            }),
            Err(e) => {
                for s in &staged {
                    let _ = fs.remove(&s.tmp);
                }
                return Err(e);
            }
        }
    }
    Ok(staged)
}

pub(super) enum CommitError {
    /// The commit failed and every file is as it was.
    Restored(FsError),
    /// The commit failed and putting the previous files back failed too.
    NotRestored(FsError, FsError),
}

/// Keeps the current files as backups, renames the temps into place and
/// fsyncs the directories. On failure, undoes what was done.
pub(super) fn commit(
    fs: Fs,
    staged: Vec<Staged>,
    target: &str,
    id: &str,
) -> Result<Committed, CommitError> {
    let mut committed = Committed {
        fs,
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: None,
    };
    let fs = committed.fs.clone();
    let remove_temps = |from: usize| {
        for s in &staged[from..] {
            let _ = fs.remove(&s.tmp);
        }
    };
    // Before any rename: drop every temp and backup this commit made.
    let abandon = |backup_dirs: &[PathBuf], e: FsError| {
        remove_temps(0);
        for d in backup_dirs {
            let _ = fs.remove_tree(d);
        }
        CommitError::Restored(e)
    };
    // Backups first, all of them, before any rename.
    let mut backups = Vec::with_capacity(staged.len());
    for s in &staged {
        if !s.existed {
            backups.push(None);
            continue;
        }
        let bdir = atomic::backup_dir(atomic::parent(&s.live), target, id);
        if !committed.backup_dirs.contains(&bdir) {
            committed.backup_dirs.push(bdir.clone());
        }
        let backup = bdir.join(s.live.file_name().unwrap_or_default());
        let kept = fs
            .make_private_dir(&bdir)
            .and_then(|()| fs.keep_backup(&s.live, &backup));
        if let Err(e) = kept {
            return Err(abandon(&committed.backup_dirs, e));
        }
        backups.push(Some(backup));
    }
    for d in &committed.backup_dirs {
        if let Err(e) = fs.fsync_dir(d) {
            return Err(abandon(&committed.backup_dirs, e));
        }
    }
    failpoint::hit("after-backup");
    for (i, (s, backup)) in staged.iter().zip(backups).enumerate() {
        if let Err(e) = fs.rename(&s.tmp, &s.live) {
            remove_temps(i);
            return Err(match undo(&committed, id) {
                Ok(_) => CommitError::Restored(e),
                Err(r) => CommitError::NotRestored(e, r),
            });
        }
        committed.files.push((s.live.clone(), backup));
        if i + 1 < staged.len() {
            failpoint::hit("between-renames");
        }
    }
    for d in &dirs_of(staged.iter().map(|s| &s.live)) {
        if let Err(e) = fs.fsync_dir(d) {
            return Err(match undo(&committed, id) {
                Ok(_) => CommitError::Restored(e),
                Err(r) => CommitError::NotRestored(e, r),
            });
        }
    }
    Ok(committed)
}

impl From<tokio::task::JoinError> for CommitError {
    fn from(e: tokio::task::JoinError) -> Self {
        CommitError::Restored(e.into())
    }
}

pub(super) fn describe_commit(c: &Committed) -> String {
    let kept = c.files.iter().filter(|(_, b)| b.is_some()).count();
    let new = c.files.len() - kept;
    let mut s = format!("{} file(s) renamed into place", c.files.len());
    if kept > 0 {
        s.push_str(&format!(", {kept} previous file(s) kept as backup"));
    }
    if new > 0 {
        s.push_str(&format!(", {new} new"));
    }
    s
}
