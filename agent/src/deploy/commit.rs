//! Committed files and how they are undone and pruned: shared by both
//! layouts, by rollback and by recovery. Blocking filesystem work, run
//! off the async threads through [`blocking`].

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::atomic::{self, Fs, FsError};
use crate::failpoint;

/// Files renamed into place, with what to put back.
pub(super) struct Committed {
    /// Where the files are (this host, or a remote target's).
    pub(super) fs: Fs,
    /// (live path, backup of the previous file or None when there was none)
    pub(super) files: Vec<(PathBuf, Option<PathBuf>)>,
    pub(super) backup_dirs: Vec<PathBuf>,
    /// The `..data` switch of the generations layout.
    pub(super) switch: Option<Switch>,
}

impl Committed {
    /// Nothing was there before the run: every committed path is new (a
    /// first deploy). Undoing it leaves the target empty, as it was.
    pub(super) fn created_everything(&self) -> bool {
        let created_files = self.files.iter().all(|(_, backup)| backup.is_none());
        match &self.switch {
            Some(s) => s.previous.is_none() && created_files,
            // Nothing left to put back (recovery found every file already
            // restored) is not a first deploy.
            None => !self.files.is_empty() && created_files,
        }
    }
}

// === filesystem phases (blocking) ===

/// Runs filesystem work off the async threads.
pub(super) async fn blocking<
    T: Send + 'static,
    E: From<tokio::task::JoinError> + Send + 'static,
>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(E::from(e)))
}

impl From<tokio::task::JoinError> for FsError {
    fn from(e: tokio::task::JoinError) -> Self {
        FsError {
            op: "filesystem task failed",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

/// The directories holding `paths`, each once.
pub(super) fn dirs_of<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> BTreeSet<PathBuf> {
    paths
        .into_iter()
        .map(|p| atomic::parent(p).to_owned())
        .collect()
}

/// Puts the previous files back (a file that did not exist is removed),
/// fsyncs, and drops this deploy's backups.
pub(super) fn undo(committed: &Committed, id: &str) -> Result<Vec<String>, FsError> {
    let mut first_err = None;
    let mut warnings = Vec::new();
    let fs = &committed.fs;
    for (live, backup) in committed.files.iter().rev() {
        let r = match backup {
            Some(b) => fs.restore(b, live, id),
            None => fs.remove(live).map(|()| None),
        };
        match r {
            Ok(Some(w)) => warnings.push(w),
            Ok(None) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        failpoint::hit("during-rollback");
    }
    for d in &dirs_of(committed.files.iter().map(|(l, _)| l)) {
        if let Err(e) = fs.fsync_dir(d) {
            first_err.get_or_insert(e);
        }
    }
    if let Some(s) = &committed.switch
        && let Err(e) = unswitch(s, id)
    {
        first_err.get_or_insert(e);
    }
    if let Some(e) = first_err {
        // Keep the backups: they are what an operator needs now.
        return Err(e);
    }
    for d in &committed.backup_dirs {
        let _ = fs.remove_tree(d);
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(warnings)
}

/// Keeps the newest `keep` backup generations of `target` in each directory.
pub(super) fn prune(
    fs: &Fs,
    dirs: &BTreeSet<PathBuf>,
    target: &str,
    keep: usize,
) -> Result<(), FsError> {
    for doomed in retire_excess(fs, dirs, target, keep)? {
        atomic::remove_retired(&doomed)?;
    }
    Ok(())
}

/// [`prune`] up to the removal itself: every backup set beyond `keep` is
/// gone from the listings (renamed to its partial name, one `rename`
/// each), and the returned trees are left for [`atomic::remove_retired`],
/// which needs no lock.
pub(super) fn retire_excess(
    fs: &Fs,
    dirs: &BTreeSet<PathBuf>,
    target: &str,
    keep: usize,
) -> Result<Vec<PathBuf>, FsError> {
    let mut doomed = Vec::new();
    for dir in dirs {
        fs.remove_empty_backups(dir, target)?;
        fs.remove_live_backups(dir, target)?;
        let ids = fs.list_backups(dir, target)?;
        let excess = ids.len().saturating_sub(keep);
        for id in &ids[..excess] {
            doomed.extend(fs.retire_tree(&atomic::backup_dir(dir, target, id))?);
        }
    }
    Ok(doomed)
}

/// A `..data` switch made by a run, with what undoing it means.
#[derive(Debug, Clone)]
pub struct Switch {
    /// `<dir>/..data`.
    pub data: PathBuf,
    /// Where `..data` pointed before (as written in the link); `None` when
    /// it did not exist.
    pub previous: Option<PathBuf>,
    /// The generation `..data` points at after the switch.
    pub generation: PathBuf,
    /// The run wrote that generation (undo removes it); false when it
    /// switched to an existing one (`certctl rollback`).
    pub created: bool,
}

/// Puts `..data` back where it pointed before the switch (or removes it),
/// and removes the generation the run created.
pub fn unswitch(s: &Switch, id: &str) -> Result<(), FsError> {
    let dir = atomic::parent(&s.data);
    match &s.previous {
        Some(p) => atomic::switch_link(&s.data, p, &format!("{id}-restore"))?,
        None => atomic::remove(&s.data)?,
    }
    failpoint::hit("during-rollback");
    atomic::fsync_dir(dir)?;
    if s.created {
        atomic::remove_tree(&s.generation)?;
    }
    Ok(())
}
