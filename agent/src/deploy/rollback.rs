//! `certctl rollback`: put a target's newest backup set back, run the
//! validate and reload commands, and verify that the restored certificate
//! is served.
//!
//! Backups form a stack per target: every deploy that replaced files keeps
//! the files it replaced in `<dir>/.certctl/backup/<target>/<deploy-id>/`.
//! A rollback restores the newest set with the same atomic protocol as a
//! deploy (link to a temp name, rename, directory fsync) and keeps the files
//! it replaces as a new, newest backup set, so nothing is ever lost: a
//! second rollback switches back. Only after the restored set is in place
//! (and verified, when the target has a verify endpoint) is the set it came
//! from removed. Files that a deploy created where none existed have no
//! backup and are left as they are.

use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use super::apply::{Committed, Engine, Failure, Run, blocking, dirs_of, fmt_duration, short_hex};
use super::atomic::{self, FsError};
use super::event::{Event, Outcome, Report, Stage, Verification, new_deploy_id};
use super::verify::{self, Expect, OnDisk};
use crate::bundle;
use crate::command;
use crate::config::Target;

/// One rollback as asked for by a client.
pub struct RollbackRequest {
    pub target: Target,
    pub no_verify: bool,
    pub no_wait: bool,
    /// Who asked, for the log.
    pub origin: String,
}

impl Engine {
    /// Runs one rollback to its end, sending each event to `sink` (and to
    /// watchers). The returned report is the one of the final `Done` event.
    pub async fn rollback(
        &self,
        req: RollbackRequest,
        sink: mpsc::UnboundedSender<Event>,
    ) -> Report {
        let id = new_deploy_id(SystemTime::now());
        let span = tracing::info_span!("rollback", target = %req.target.name, deploy_id = %id);
        let mut run = Run::new(self, id, &req.target.name, sink);
        async move {
            info!(origin = %req.origin, "rollback requested");
            let (outcome, error) = match run.execute_rollback(&req).await {
                Ok(outcome) => (outcome, String::new()),
                Err(failure) => (failure.outcome, failure.message),
            };
            run.look_at_disk(&req.target).await;
            let report = run.finish(outcome, error, false);
            self.metrics()
                .rollback_finished(&req.target.name, report.outcome);
            report
        }
        .instrument(span)
        .await
    }
}

/// The newest backup set of a target.
struct BackupSet {
    /// The deploy id the set is named after.
    id: String,
    /// (live path, its backup in the set), for the target's files that have
    /// one.
    files: Vec<(PathBuf, PathBuf)>,
    /// Every directory holding part of the set.
    dirs: Vec<PathBuf>,
}

impl Run<'_> {
    async fn execute_rollback(&mut self, req: &RollbackRequest) -> Result<Outcome, Failure> {
        let target = &req.target;
        let _guard = self.lock(target, req.no_wait).await?;

        let set = {
            let t = target.clone();
            blocking(move || newest_set(&t)).await
        }
        .map_err(|e| Failure::new(Outcome::Internal, format!("cannot read the backups: {e}")))?
        .ok_or_else(|| {
            let dirs: Vec<String> =
                dirs_of(target.paths().map(PathBuf::from).collect::<Vec<_>>().iter())
                    .iter()
                    .map(|d| {
                        atomic::backup_dir(d, &target.name, "")
                            .display()
                            .to_string()
                    })
                    .collect();
            Failure::new(
                Outcome::Rejected,
                format!(
                    "nothing to roll back to: target {} has no backup in {}; backups are kept \
                     when a deploy replaces files (the newest {} per target)",
                    target.name,
                    dirs.join(", "),
                    target.backup_retention
                ),
            )
        })?;

        // What will be on disk afterwards: the set's files over the current ones.
        let restored = {
            let t = target.clone();
            let files = set.files.clone();
            blocking(move || restored_view(&t, &files)).await
        }
        .map_err(|e| Failure::new(Outcome::Internal, e.to_string()))?;
        if let Some(r) = &restored {
            self.leaf = Some((
                r.leaf.sha256_hex(),
                r.leaf.not_after,
                r.leaf.subject.clone(),
            ));
        }
        self.stage(
            Stage::Planned,
            format!(
                "restoring {} file(s) from backup {}{}",
                set.files.len(),
                set.id,
                restored.as_ref().map_or(String::new(), |r| format!(
                    ": leaf {} sha256 {}, valid until {}",
                    r.leaf.subject,
                    short_hex(&r.leaf.sha256_hex()),
                    bundle::rfc3339(r.leaf.not_after)
                ))
            ),
        );

        let committed = {
            let files = set.files.clone();
            let name = target.name.clone();
            let id = self.id.clone();
            blocking(move || swap_in(&files, &name, &id)).await
        }
        .map_err(|e| {
            Failure::new(
                Outcome::Internal,
                format!("rollback failed, nothing changed: {e}"),
            )
        })?;
        self.stage(
            Stage::Committed,
            format!(
                "{} file(s) restored from backup {}, the replaced ones kept as backup {}",
                committed.files.len(),
                set.id,
                self.id
            ),
        );

        if !target.validate.is_empty() {
            match self.run_command(target, "validate", &target.validate).await {
                Ok(took) => self.stage(
                    Stage::ValidateCommand,
                    format!(
                        "`{}` ok ({})",
                        command::display_argv(&target.validate),
                        fmt_duration(took)
                    ),
                ),
                Err(e) => {
                    self.stage(
                        Stage::Rollback,
                        "putting back the files from before the rollback (no reload)",
                    );
                    return Err(match self.undo(committed).await {
                        Ok(()) => Failure::new(
                            Outcome::ValidateFailed,
                            format!(
                                "the restored files fail validation: {e}; the files from before the \
                                 rollback are back in place and the server was not reloaded"
                            ),
                        ),
                        Err(r) => Failure::new(
                            Outcome::RollbackFailed,
                            format!(
                                "the restored files fail validation: {e}; putting back the files from \
                                 before the rollback failed: {r}"
                            ),
                        ),
                    });
                }
            }
        }

        if !target.reload.is_empty() {
            match self.run_command(target, "reload", &target.reload).await {
                Ok(took) => self.stage(
                    Stage::Reloaded,
                    format!(
                        "`{}` ok ({})",
                        command::display_argv(&target.reload),
                        fmt_duration(took)
                    ),
                ),
                Err(e) => {
                    self.stage(
                        Stage::Rollback,
                        "putting back the files from before the rollback and reloading",
                    );
                    if let Err(r) = self.undo(committed).await {
                        return Err(Failure::new(
                            Outcome::RollbackFailed,
                            format!(
                                "reloading the restored files failed: {e}; putting back the files from before the rollback failed too: {r}"
                            ),
                        ));
                    }
                    let again = self.run_command(target, "reload", &target.reload).await;
                    return Err(Failure::new(
                        Outcome::RollbackFailed,
                        match again {
                            Ok(_) => format!(
                                "reloading the restored files failed: {e}; the files from before the \
                                 rollback are back in place and were reloaded"
                            ),
                            Err(r) => format!(
                                "reloading the restored files failed: {e}; the files from before the \
                                 rollback are back on disk but reloading them failed too: {r}"
                            ),
                        },
                    ));
                }
            }
        }

        if let (Some(v), false) = (&target.verify, req.no_verify) {
            let Some(restored) = &restored else {
                return Err(Failure::new(
                    Outcome::RollbackFailed,
                    format!(
                        "the restored files are in place, but {} holds no readable certificate to verify",
                        target.cert_path.display()
                    ),
                ));
            };
            let expect = Expect::of(v, &restored.leaf, &restored.chain);
            match self.verify(v, &expect, false).await {
                Ok(_) => self.verification = Verification::Verified,
                Err(check) => {
                    return Err(Failure::new(
                        Outcome::RollbackFailed,
                        format!(
                            "the restored files (leaf {}) are in place and were reloaded, but {}; \
                             `certctl rollback {}` again switches back to the files from before",
                            short_hex(&expect.leaf_sha256),
                            check.error,
                            target.name
                        ),
                    ));
                }
            }
        }

        // The restored set is live now: its backup is no longer a backup.
        let dirs = set.dirs.clone();
        let (name, used) = (target.name.clone(), set.id.clone());
        let keep = target.backup_retention as usize;
        let cleaned = blocking(move || {
            for d in &dirs {
                atomic::remove_tree(&atomic::backup_dir(d, &name, &used))?;
            }
            super::apply::prune(&dirs.iter().cloned().collect(), &name, keep)
        })
        .await;
        if let Err(e) = cleaned {
            let w = format!("could not remove the restored backup set {}: {e}", set.id);
            warn!("{w}");
            self.warnings.push(w);
        }
        drop(committed);
        Ok(Outcome::Restored)
    }
}

/// The newest backup set of `target` across its directories.
fn newest_set(target: &Target) -> Result<Option<BackupSet>, FsError> {
    let lives: Vec<PathBuf> = target.paths().map(PathBuf::from).collect();
    let dirs: Vec<PathBuf> = dirs_of(lives.iter()).into_iter().collect();
    let mut newest: Option<String> = None;
    for d in &dirs {
        if let Some(id) = atomic::list_backups(d, &target.name)?.pop()
            && newest.as_ref().is_none_or(|n| &id > n)
        {
            newest = Some(id);
        }
    }
    let Some(id) = newest else {
        return Ok(None);
    };
    let files: Vec<(PathBuf, PathBuf)> = lives
        .iter()
        .filter_map(|live| {
            let backup = atomic::backup_dir(atomic::parent(live), &target.name, &id)
                .join(live.file_name().unwrap_or_default());
            std::fs::symlink_metadata(&backup)
                .ok()
                .filter(std::fs::Metadata::is_file)
                .map(|_| (live.clone(), backup))
        })
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    Ok(Some(BackupSet { id, files, dirs }))
}

/// The certificate set the target will hold after `files` are restored.
fn restored_view(target: &Target, files: &[(PathBuf, PathBuf)]) -> Result<Option<OnDisk>, FsError> {
    let source = |live: &PathBuf| -> PathBuf {
        files
            .iter()
            .find(|(l, _)| l == live)
            .map_or_else(|| live.clone(), |(_, b)| b.clone())
    };
    let mut view = target.clone();
    view.cert_path = source(&target.cert_path);
    view.chain_path = target.chain_path.as_ref().map(source);
    verify::on_disk(&view).map_err(|e| FsError {
        op: "cannot read the backup",
        path: view.cert_path.clone(),
        source: std::io::Error::other(e),
    })
}

/// Keeps the current files as backup set `id`, then puts each backup of
/// `files` in place. On failure, puts the current files back.
fn swap_in(files: &[(PathBuf, PathBuf)], target: &str, id: &str) -> Result<Committed, FsError> {
    let mut committed = Committed {
        files: Vec::new(),
        backup_dirs: Vec::new(),
    };
    let mut kept = Vec::with_capacity(files.len());
    for (live, _) in files {
        if std::fs::symlink_metadata(live).is_err() {
            kept.push(None);
            continue;
        }
        let bdir = atomic::backup_dir(atomic::parent(live), target, id);
        if !committed.backup_dirs.contains(&bdir) {
            committed.backup_dirs.push(bdir.clone());
        }
        let backup = bdir.join(live.file_name().unwrap_or_default());
        let r = atomic::make_private_dir(&bdir).and_then(|()| atomic::keep_backup(live, &backup));
        if let Err(e) = r {
            for d in &committed.backup_dirs {
                let _ = atomic::remove_tree(d);
            }
            return Err(e);
        }
        kept.push(Some(backup));
    }
    for d in &committed.backup_dirs {
        atomic::fsync_dir(d)?;
    }
    for ((live, from), kept) in files.iter().zip(kept) {
        if let Err(e) = atomic::restore(from, live, id) {
            if let Err(r) = super::apply::undo(&committed, id) {
                warn!("putting back the files from before the rollback failed: {r}");
            }
            return Err(e);
        }
        committed.files.push((live.clone(), kept));
    }
    for d in &dirs_of(files.iter().map(|(l, _)| l)) {
        if let Err(e) = atomic::fsync_dir(d) {
            if let Err(r) = super::apply::undo(&committed, id) {
                warn!("putting back the files from before the rollback failed: {r}");
            }
            return Err(e);
        }
    }
    Ok(committed)
}
