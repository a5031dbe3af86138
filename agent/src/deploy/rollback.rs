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

use super::commit::{Committed, blocking, dirs_of};
use super::engine::Engine;
use super::error::DeployError;
use super::generations;
use super::progress::{Run, leaf_sha256};
use crate::atomic::{self, Fs, FsError};
use crate::bundle;

use crate::config::{Layout, Target};
use crate::disk::OnDisk;
use crate::journal::FileRecord;
use crate::lock::TargetGuard;
use crate::model::event::{Event, Outcome, Report, Stage, Verification, new_deploy_id};
use crate::model::fmt::short_hex;
use crate::model::stage::Op;
use crate::verify::served::Expect;

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
        run.origin.clone_from(&req.origin);
        run.op = Op::Rollback;
        run.fs = Fs::of(&req.target);
        async move {
            info!(origin = %req.origin, "rollback requested");
            // The lock is held until the cleanup is done: a deploy that
            // followed could otherwise have its new backup set pruned.
            let mut guard = None;
            let (outcome, error, cleanup) = match run.execute_rollback(&req, &mut guard).await {
                Ok(cleanup) => (Outcome::Restored, String::new(), Some(cleanup)),
                Err(e) => (e.outcome(), e.to_string(), None),
            };
            run.look_at_disk(&req.target).await;
            let report = run.close(outcome, error, false);
            // Only once the outcome is in the journal: until then recovery
            // may still have to undo the rollback, and the restored set's
            // backup is what it would need after that. The caller is told
            // after it, so what it then finds on disk is the end state.
            if let Some(cleanup) = cleanup {
                let target = &req.target;
                let (name, keep) = (target.name.clone(), target.backup_retention as usize);
                let what = cleanup.describe();
                let fs = run.fs.clone();
                let cleaned = blocking(move || {
                    crate::failpoint::hit("before-cleanup");
                    cleanup.run(&fs, &name, keep)
                });
                if let Err(e) = cleaned.await {
                    warn!("could not clean up {what}: {e}");
                }
            }
            drop(guard);
            run.done(&report);
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
    /// The in-place layout: the newest backup set goes back in place, the
    /// files it replaces are kept as this run's backup.
    async fn prepare_in_place(
        &mut self,
        req: &RollbackRequest,
    ) -> Result<(Committed, Option<OnDisk>, Cleanup), DeployError> {
        let target = &req.target;

        let set = {
            let (fs, t) = (self.fs.clone(), target.clone());
            blocking(move || newest_set(&fs, &t)).await
        }
        .map_err(|e| DeployError::Internal(format!("cannot read the backups: {e}")))?
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
            DeployError::Refused(format!(
                "nothing to roll back to: target {} has no backup in {}; backups are kept \
                     when a deploy replaces files (the newest {} per target)",
                target.name,
                dirs.join(", "),
                target.backup_retention
            ))
        })?;

        // What will be on disk afterwards: the set's files over the current ones.
        let restored = {
            let (fs, t) = (self.fs.clone(), target.clone());
            let files = set.files.clone();
            blocking(move || restored_view(&fs, &t, &files)).await
        }
        .map_err(|e| DeployError::Internal(e.to_string()))?;
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

        // The journal records the swap: recovery puts back the files from
        // before the rollback (kept as this run's backup) when it is cut short.
        let existed = {
            let (fs, lives) = (self.fs.clone(), set.files.clone());
            blocking(move || {
                lives
                    .iter()
                    .map(|(live, _)| fs.exists(live))
                    .collect::<Result<Vec<bool>, FsError>>()
            })
            .await
        }
        .map_err(|e| DeployError::Internal(format!("rollback failed, nothing changed: {e}")))?;
        let records: Vec<FileRecord> = set
            .files
            .iter()
            .zip(existed)
            .map(|((live, _), existed)| FileRecord {
                live: live.clone(),
                existed,
                backup: atomic::backup_dir(atomic::parent(live), &target.name, &self.id)
                    .join(live.file_name().unwrap_or_default()),
                tmp: atomic::temp_path(live, &format!("{}-restore", self.id)),
                generation: None,
                created_generation: false,
            })
            .collect();
        let prev = self.leaf_on_disk(target).await;
        self.begin_journal(&req.origin, Op::Rollback, &records, &prev, &[])
            .await?;

        let committed = {
            let files = set.files.clone();
            let name = target.name.clone();
            let (fs, id) = (self.fs.clone(), self.id.clone());
            blocking(move || swap_in(fs, &files, &name, &id)).await
        }
        .map_err(|e| DeployError::Internal(format!("rollback failed, nothing changed: {e}")))?;
        let (committed, tightened) = committed;
        self.warnings.extend(tightened);
        self.stage(
            Stage::Committed,
            format!(
                "{} file(s) restored from backup {}, the replaced ones kept as backup {}",
                committed.files.len(),
                set.id,
                self.id
            ),
        );
        Ok((
            committed,
            restored,
            Cleanup::BackupSet {
                dirs: set.dirs.clone(),
                id: set.id.clone(),
            },
        ))
    }

    /// The generations layout: `..data` switches to the newest generation
    /// other than the current one.
    async fn prepare_generations(
        &mut self,
        req: &RollbackRequest,
    ) -> Result<(Committed, Option<OnDisk>, Cleanup), DeployError> {
        let target = &req.target;
        let dir = atomic::parent(&target.cert_path).to_owned();
        let (to, current) = {
            let dir = dir.clone();
            blocking(move || {
                Ok::<_, FsError>((
                    generations::previous(&dir)?,
                    atomic::read_link(&generations::data_link(&dir))?,
                ))
            })
            .await
        }
        .map_err(|e| DeployError::Internal(format!("cannot read the generations: {e}")))?;
        let Some(to) = to else {
            return Err(DeployError::Refused(format!(
                "nothing to roll back to: target {} has no generation besides the current one in {}",
                target.name,
                dir.join(".certctl").display()
            )));
        };
        let records = vec![FileRecord {
            live: generations::data_link(&dir),
            existed: current.is_some(),
            backup: current.clone().unwrap_or_default(),
            tmp: atomic::temp_path(&generations::data_link(&dir), &self.id),
            generation: Some(generations::gen_dir(&dir, &to)),
            created_generation: false,
        }];
        // What the switch puts in force, recorded before it happens, so that
        // recovery recognises either set as this run's.
        let pairs: Vec<(std::path::PathBuf, std::path::PathBuf)> = target
            .paths()
            .map(|p| {
                (
                    p.to_owned(),
                    generations::gen_dir(&dir, &to).join(p.file_name().unwrap_or_default()),
                )
            })
            .collect();
        let t = target.clone();
        if let Ok(Some(r)) = blocking(move || restored_view(&atomic::LOCAL, &t, &pairs)).await {
            self.leaf = Some((
                r.leaf.sha256_hex(),
                r.leaf.not_after,
                r.leaf.subject.clone(),
            ));
        }
        let prev = self.leaf_on_disk(target).await;
        self.begin_journal(&req.origin, Op::Rollback, &records, &prev, &[])
            .await?;
        let committed = {
            let (dir, to, id) = (dir.clone(), to.clone(), self.id.clone());
            blocking(move || generations::switch_to(&dir, &to, &id)).await
        }
        .map_err(|e| DeployError::Internal(format!("rollback failed, nothing changed: {e}")))?;
        let t = target.clone();
        let restored = blocking(move || {
            crate::disk::read(&t).map_err(|e| FsError {
                op: "cannot read",
                path: t.cert_path.clone(),
                source: std::io::Error::other(e),
            })
        })
        .await
        .map_err(|e| DeployError::Internal(e.to_string()))?;
        if let Some(r) = &restored {
            self.leaf = Some((
                r.leaf.sha256_hex(),
                r.leaf.not_after,
                r.leaf.subject.clone(),
            ));
        }
        self.stage(
            Stage::Committed,
            format!("..data switched to generation {to} (one rename)"),
        );
        Ok((committed, restored, Cleanup::Generations { dir }))
    }

    /// The leaf on disk now (hex SHA-256), empty when none or unreadable.
    async fn leaf_on_disk(&self, target: &Target) -> String {
        leaf_sha256(&self.fs, target).await.unwrap_or_default()
    }

    /// The rollback up to its cleanup; the target's lock is left in
    /// `guard` for the caller to hold through it.
    async fn execute_rollback(
        &mut self,
        req: &RollbackRequest,
        guard: &mut Option<TargetGuard>,
    ) -> Result<Cleanup, DeployError> {
        let target = &req.target;
        *guard = Some(self.lock(target, req.no_wait).await?);
        let (committed, restored, cleanup) = if target.layout == Layout::Generations {
            self.prepare_generations(req).await?
        } else {
            self.prepare_in_place(req).await?
        };

        if !target.validate.is_empty() {
            match self.validate(target).await {
                Ok(()) => {}
                Err(e) => {
                    self.stage(
                        Stage::Rollback,
                        "putting back the files from before the rollback (no reload)",
                    );
                    return Err(match self.undo(committed).await {
                        Ok(()) => DeployError::ValidateFailed(format!(
                            "the restored files fail validation: {e}; the files from before the \
                                 rollback are back in place and the server was not reloaded"
                        )),
                        Err(r) => DeployError::RollbackFailed(format!(
                            "the restored files fail validation: {e}; putting back the files from \
                                 before the rollback failed: {r}"
                        )),
                    });
                }
            }
        }

        match self.reload(target).await {
            Ok(Some(done)) => self.stage(Stage::Reloaded, done),
            Ok(None) => {}
            Err(e) => {
                self.stage(
                    Stage::Rollback,
                    "putting back the files from before the rollback and reloading",
                );
                if let Err(r) = self.undo(committed).await {
                    return Err(DeployError::RollbackFailed(format!(
                        "reloading the restored files failed: {e}; putting back the files from before the rollback failed too: {r}"
                    )));
                }
                let again = self.reload(target).await;
                return Err(DeployError::RollbackFailed(match again {
                    Ok(_) => format!(
                        "reloading the restored files failed: {e}; the files from before the \
                             rollback are back in place and were reloaded"
                    ),
                    Err(r) => format!(
                        "reloading the restored files failed: {e}; the files from before the \
                             rollback are back on disk but reloading them failed too: {r}"
                    ),
                }));
            }
        }

        if let (Some(v), false) = (&target.verify, req.no_verify) {
            let Some(restored) = &restored else {
                return Err(DeployError::RollbackFailed(format!(
                    "the restored files are in place, but {} holds no readable certificate to verify",
                    target.cert_path.display()
                )));
            };
            let expect = Expect::of(v, &restored.leaf, &restored.chain);
            match self.verify(v, &expect, false).await {
                Ok(_) => self.verification = Verification::Verified,
                Err(check) => {
                    return Err(DeployError::RollbackFailed(format!(
                        "the restored files (leaf {}) are in place and were reloaded, but {}; \
                             `certctl rollback {}` again switches back to the files from before",
                        short_hex(&expect.leaf_sha256),
                        check.error(),
                        target.name
                    )));
                }
            }
        }

        // The restored set is live now: its backup is no longer a backup;
        // removed by the caller once the outcome is recorded.
        drop(committed);
        Ok(cleanup)
    }
}

/// What a successful rollback tidies up.
enum Cleanup {
    /// The in-place backup set that is live again, in these directories.
    BackupSet { dirs: Vec<PathBuf>, id: String },
    /// Generations beyond retention in this directory.
    Generations { dir: PathBuf },
}

impl Cleanup {
    fn describe(&self) -> String {
        match self {
            Cleanup::BackupSet { id, .. } => format!("the restored backup set {id}"),
            Cleanup::Generations { dir } => format!("old generations in {}", dir.display()),
        }
    }

    fn run(self, fs: &Fs, target: &str, keep: usize) -> Result<(), FsError> {
        match self {
            Cleanup::BackupSet { dirs, id } => {
                for d in &dirs {
                    fs.remove_tree(&atomic::backup_dir(d, target, &id))?;
                }
                super::commit::prune(fs, &dirs.iter().cloned().collect(), target, keep)
            }
            Cleanup::Generations { dir } => generations::prune(&dir, keep),
        }
    }
}

/// The newest backup set of `target` across its directories.
fn newest_set(fs: &Fs, target: &Target) -> Result<Option<BackupSet>, FsError> {
    let lives: Vec<PathBuf> = target.paths().map(PathBuf::from).collect();
    let dirs: Vec<PathBuf> = dirs_of(lives.iter()).into_iter().collect();
    let mut newest: Option<String> = None;
    for d in &dirs {
        if let Some(id) = fs.list_backups(d, &target.name)?.pop()
            && newest.as_ref().is_none_or(|n| &id > n)
        {
            newest = Some(id);
        }
    }
    let Some(id) = newest else {
        return Ok(None);
    };
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    for live in &lives {
        let backup = atomic::backup_dir(atomic::parent(live), &target.name, &id)
            .join(live.file_name().unwrap_or_default());
        if fs.is_file(&backup)? {
            files.push((live.clone(), backup));
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    Ok(Some(BackupSet { id, files, dirs }))
}

/// The certificate set the target will hold after `files` are restored.
pub(super) fn restored_view(
    fs: &Fs,
    target: &Target,
    files: &[(PathBuf, PathBuf)],
) -> Result<Option<OnDisk>, FsError> {
    let source = |live: &PathBuf| -> PathBuf {
        files
            .iter()
            .find(|(l, _)| l == live)
            .map_or_else(|| live.clone(), |(_, b)| b.clone())
    };
    let mut view = target.clone();
    view.cert_path = source(&target.cert_path);
    view.chain_path = target.chain_path.as_ref().map(source);
    crate::disk::read_on(fs, &view).map_err(|e| FsError {
        op: "cannot read the backup",
        path: view.cert_path.clone(),
        source: std::io::Error::other(e),
    })
}

/// Keeps the current files as backup set `id`, then puts each backup of
/// `files` in place. On failure, puts the current files back.
fn swap_in(
    fs: Fs,
    files: &[(PathBuf, PathBuf)],
    target: &str,
    id: &str,
) -> Result<(Committed, Vec<String>), FsError> {
    let mut warnings = Vec::new();
    let mut committed = Committed {
        fs: fs.clone(),
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: None,
    };
    let mut kept = Vec::with_capacity(files.len());
    for (live, _) in files {
        if !fs.exists(live)? {
            kept.push(None);
            continue;
        }
        let bdir = atomic::backup_dir(atomic::parent(live), target, id);
        if !committed.backup_dirs.contains(&bdir) {
            committed.backup_dirs.push(bdir.clone());
        }
        let backup = bdir.join(live.file_name().unwrap_or_default());
        let r = fs
            .make_private_dir(&bdir)
            .and_then(|()| fs.keep_backup(live, &backup));
        if let Err(e) = r {
            for d in &committed.backup_dirs {
                let _ = fs.remove_tree(d);
            }
            return Err(e);
        }
        kept.push(Some(backup));
    }
    for d in &committed.backup_dirs {
        fs.fsync_dir(d)?;
    }
    for ((live, from), kept) in files.iter().zip(kept) {
        let restored = fs.restore(from, live, id);
        if let Ok(Some(w)) = &restored {
            warn!("{w}");
            warnings.push(w.clone());
        }
        if let Err(e) = restored {
            if let Err(r) = super::commit::undo(&committed, id) {
                warn!("putting back the files from before the rollback failed: {r}");
            }
            return Err(e);
        }
        committed.files.push((live.clone(), kept));
    }
    for d in &dirs_of(files.iter().map(|(l, _)| l)) {
        if let Err(e) = fs.fsync_dir(d) {
            if let Err(r) = super::commit::undo(&committed, id) {
                warn!("putting back the files from before the rollback failed: {r}");
            }
            return Err(e);
        }
    }
    Ok((committed, warnings))
}
