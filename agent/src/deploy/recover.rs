//! Recovery at start-up: every run the journal left without an outcome
//! (the agent was killed, crashed or lost power in the middle of it) is
//! finished before the agent accepts work. Recovery never changes a
//! target whose files are no longer what the run left there
//! ([`Run::still_ours`]). A recorded outcome is final, with one exception
//! that changes nothing live: a run that ended `rollback_failed` (its
//! disk failed while putting the previous files back, say) is retried
//! once at the next start when it is still the target's newest run and
//! the certificate on disk is the one it left; anything that happened
//! since makes it final ([`Engine::untouched_since`]).
//!
//! What is done depends on the last stage the journal recorded:
//!
//! | last stage | what is on disk | recovery |
//! |---|---|---|
//! | `locked`, `staged`, `planned` | the previous set, possibly with some files already replaced | temp files removed, every file with a backup restored, new files removed: `rolled_back` (no command runs: the server never loaded a mix) |
//! | `committed`, `validate-command`, `reloaded`, `verify` (a deploy) | the complete new set | the deploy is completed: validate, reload, verify; a failure rolls back as usual |
//! | `rollback`, or any stage of `certctl rollback` | anything between | the files from before the run are put back, reloaded and verified: `rolled_back` or `rollback_failed` |
//!
//! Recovery is idempotent: every step is either a restore from a backup
//! that stays until the run is closed, or a removal, and a backup that is
//! already gone means its file was restored (backups are removed only after
//! every restore succeeded). A crash during recovery leaves the run open,
//! and the next start recovers it the same way. A run whose target is no
//! longer configured gets its files put back and no command run.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use tokio::sync::mpsc;
use tracing::{Instrument, warn};

use super::commit::{Committed, blocking};
use super::engine::Engine;
use super::error::DeployError;
use super::generations::Switch;
use super::progress::{Run, leaf_sha256};
use super::rollback::restored_view;
use crate::atomic::{self, Fs, FsError};
use crate::config::{Config, Target};
use crate::journal::{JournalError, Record};
use crate::model::event::{Outcome, Report, Stage};
use crate::model::fmt::short_hex;
use crate::model::stage::Op;
use crate::verify::served::Expect;

/// Stages after which the complete new set is on disk.
const COMMITTED: &[Stage] = &[
    Stage::Committed,
    Stage::ValidateCommand,
    Stage::Reloaded,
    Stage::VerifyAttempt,
];

impl Engine {
    /// Finishes every run the journal left open; returns one report per
    /// run, oldest first.
    pub async fn recover(&self, config: &Config) -> Result<Vec<Report>, JournalError> {
        let open = tokio::task::block_in_place(|| self.journal.unfinished())?;
        let mut reports = Vec::with_capacity(open.len());
        for rec in open {
            reports.extend(self.recover_one(rec, config).await);
        }
        Ok(reports)
    }

    /// Removes temp files a run could not remove itself (its disk was
    /// failing), half-filled sets and backups beyond retention, in every
    /// local target's directories; returns how many targets it swept.
    ///
    /// Runs while the agent serves (the daemon starts it right after
    /// `READY=1`), so it takes the lock of every target of a group of
    /// targets that share a directory before touching that directory: a
    /// deploy to one of them cannot have a temp file there meanwhile, and
    /// a deploy that asks for the lock waits until its group is swept.
    /// Groups share no directory, so [`SWEEP_CONCURRENCY`] of them are
    /// swept at a time. Stops between groups when the agent stops.
    pub async fn sweep_leftovers(&self, config: &Config) -> usize {
        use futures_util::stream::{self, StreamExt};
        let groups = sweep_groups(config);
        let swept = std::sync::atomic::AtomicUsize::new(0);
        let stop = self.shutdown_token();
        stream::iter(groups)
            .for_each_concurrent(SWEEP_CONCURRENCY, |group| {
                let (swept, stop) = (&swept, &stop);
                async move {
                    if stop.is_cancelled() {
                        return;
                    }
                    let n = group.len();
                    if self.sweep_group(group).await {
                        swept.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        swept.into_inner()
    }

    /// Sweeps a group of targets sharing directories, every one of them
    /// locked first (in the group's order; a deploy holds one lock only,
    /// and no two sweeps take the same group, so this cannot deadlock).
    async fn sweep_group(&self, group: Vec<(&Target, Vec<PathBuf>)>) -> bool {
        let mut guards = Vec::with_capacity(group.len());
        for (t, _) in &group {
            match self.lock_target(&t.name, false).await {
                Ok((guard, _)) => guards.push(guard),
                Err(e) => {
                    warn!(target = %t.name, "cannot sweep the target's directory: {e}");
                    return false;
                }
            }
        }
        tokio::task::block_in_place(|| crate::failpoint::hit("during-sweep"));
        for (t, dirs) in group {
            sweep_dirs_of(&atomic::LOCAL, t, dirs).await;
        }
        drop(guards);
        true
    }

    /// Whether a run that ended `rollback_failed` may be retried: it is
    /// still the newest run of its target and the certificate on disk is
    /// the one it left (`disk_sha256`, empty for none). Anything else (a
    /// later deploy, an operator's hand) makes its outcome final.
    async fn untouched_since(&self, rec: &Record, config: &Config) -> bool {
        let Some(target) = config.target(&rec.target).cloned() else {
            return false;
        };
        let newest = tokio::task::block_in_place(|| self.journal.last(&rec.target))
            .ok()
            .flatten()
            .is_some_and(|last| last.id == rec.id);
        if !newest {
            return false;
        }
        leaf_sha256(&Fs::of(&target), &target)
            .await
            .is_some_and(|sha| sha == rec.disk_sha256)
    }

    async fn recover_one(&self, rec: Record, config: &Config) -> Option<Report> {
        if rec.outcome.is_some() {
            // A finished run (rollback_failed): retried once, and only if
            // nothing happened to its target since; settled either way.
            if !self.untouched_since(&rec, config).await {
                if let Err(e) = tokio::task::block_in_place(|| self.journal.settle(&rec.id)) {
                    warn!("{e}");
                }
                tracing::info!(
                    target = %rec.target,
                    deploy_id = %rec.id,
                    "run {} ended rollback_failed and the target has changed since: its outcome is final",
                    rec.id
                );
                return None;
            }
        }
        Some(self.recover_run(rec, config).await)
    }

    async fn recover_run(&self, rec: Record, config: &Config) -> Report {
        let (tx, _rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("recover", target = %rec.target, deploy_id = %rec.id);
        let mut run = Run::new(self, rec.id.clone(), &rec.target, tx);
        run.begun = true;
        run.recovered = true;
        run.op = Op::parse(&rec.op).unwrap_or(Op::Deploy);
        run.origin.clone_from(&rec.origin);
        run.leaf = Some((rec.cert_sha256.clone(), 0, String::new()));
        run.no_reload = rec.no_reload;
        let target = config.target(&rec.target).cloned();
        run.fs = target.as_ref().map_or(atomic::LOCAL, Fs::of);
        async move {
            warn!(
                op = %rec.op,
                last_stage = %rec.stage,
                "recovering a {} interrupted at stage {}",
                rec.op,
                rec.stage
            );
            let (outcome, error) = match run.execute_recovery(&rec, target.as_ref()).await {
                Ok(outcome) => (outcome, String::new()),
                Err(e) => (e.outcome(), e.to_string()),
            };
            if let Some(t) = &target {
                run.look_at_disk(t).await;
            }
            run.finish(outcome, error, false)
        }
        .instrument(span)
        .await
    }
}

impl Run<'_> {
    /// Recovery changes a target only when its files are still what the
    /// interrupted run left there: no later run of the target was
    /// recorded, and the certificate on disk is the run's new one or the
    /// one it replaced. Anything else (a later deploy, an operator who
    /// replaced the files) is live and is left alone; the run is closed
    /// `internal` saying so.
    async fn still_ours(
        &self,
        rec: &Record,
        target: &Target,
        interrupted: &str,
    ) -> Result<(), DeployError> {
        let later = tokio::task::block_in_place(|| self.engine.journal.last(&rec.target))
            .ok()
            .flatten()
            .filter(|last| last.id != rec.id && last.started > rec.started);
        if let Some(later) = later {
            return Err(DeployError::Internal(format!(
                "{interrupted}; a later run ({}, {}) has changed the target since, so recovery \
                 left its files alone",
                later.id,
                later.outcome.as_deref().unwrap_or("open")
            )));
        }
        if let Some(sha) = leaf_sha256(&self.fs, target)
            .await
            .filter(|s| !s.is_empty())
            && sha != rec.cert_sha256
            && sha != rec.prev_sha256
        {
            return Err(DeployError::Internal(format!(
                "{interrupted}; {} now holds {}, neither this run's certificate nor the one it \
                     replaced: the files were replaced since, so recovery left them alone; check \
                     them and deploy again",
                target.cert_path.display(),
                short_hex(&sha)
            )));
        }
        Ok(())
    }

    async fn execute_recovery(
        &mut self,
        rec: &Record,
        target: Option<&Target>,
    ) -> Result<Outcome, DeployError> {
        let _guard = match target {
            Some(t) => Some(self.lock(t, false).await?),
            None => None,
        };
        let interrupted = match rec.outcome.as_deref() {
            Some(outcome) => format!(
                "ended {outcome} at stage {} ({}); retried once at start-up, nothing having \
                 changed since",
                rec.stage, rec.error
            ),
            None => format!(
                "interrupted at stage {} by an agent stop (crash, kill or power loss)",
                rec.stage
            ),
        };
        let here = self.fs.host();
        if here != rec.host {
            let place = |h: &str| {
                if h.is_empty() {
                    "this host".to_owned()
                } else {
                    h.to_owned()
                }
            };
            return Err(DeployError::Internal(format!(
                "{interrupted}; its files are on {} and the target is now {}: recovery left                  them alone; check them there and deploy again",
                place(&rec.host),
                if target.is_some() {
                    place(&here)
                } else {
                    "no longer configured".to_owned()
                }
            )));
        }
        if let (Some(t), None) = (target, &rec.outcome) {
            self.still_ours(rec, t, &interrupted).await?;
        }

        // Temp files are never published: whatever is left goes.
        let files = rec.files.clone();
        let (fs, id) = (self.fs.clone(), rec.id.clone());
        let swept = blocking(move || sweep(fs, &files, &id))
            .await
            .map_err(|e| {
                DeployError::RollbackFailed(format!(
                    "{interrupted}; recovery could not inspect the files: {e}"
                ))
            })?;
        let (committed, backed_up) = swept;
        // Where the previous certificate set is now: the backups, or with
        // the generations layout the generation `..data` pointed at.
        let mut pairs = backed_up;
        if let (Some(data), Some(t)) = (
            rec.files
                .iter()
                .find(|f| f.generation.is_some() && f.existed),
            target,
        ) {
            let dir = atomic::parent(&data.live);
            pairs = t
                .paths()
                .map(|p| {
                    (
                        p.to_owned(),
                        dir.join(&data.backup)
                            .join(p.file_name().unwrap_or_default()),
                    )
                })
                .collect();
        }

        let Some(target) = target else {
            self.stage(
                Stage::Rollback,
                "the target is no longer configured: putting the previous files back, no commands",
            );
            return match self.undo(committed).await {
                Ok(()) => Err(DeployError::RolledBack(format!(
                    "{interrupted}; the target is no longer configured: the previous files are back, no command was run"
                ))),
                Err(e) => Err(DeployError::RollbackFailed(format!(
                    "{interrupted}; putting the previous files back failed: {e}"
                ))),
            };
        };

        let committed_stage = Stage::parse(&rec.stage).is_some_and(|s| COMMITTED.contains(&s));
        let previous = {
            let (fs, t) = (self.fs.clone(), target.clone());
            blocking(move || restored_view(&fs, &t, &pairs))
                .await
                .ok()
                .flatten()
        };
        let verify = target.verify.as_ref();

        if Op::parse(&rec.op) == Some(Op::Deploy) && committed_stage {
            // The whole new set is in place: finish what was started.
            let (fs, t) = (self.fs.clone(), target.clone());
            let now = blocking(move || {
                crate::disk::read_on(&fs, &t).map_err(|e| FsError {
                    op: "cannot read",
                    path: PathBuf::new(),
                    source: std::io::Error::other(e),
                })
            })
            .await
            .ok()
            .flatten();
            if let Some(now) = &now {
                self.leaf = Some((
                    now.leaf.sha256_hex(),
                    now.leaf.not_after,
                    now.leaf.subject.clone(),
                ));
            }
            let expect = match (verify, &now) {
                (Some(v), Some(now)) => Some(Expect::of(v, &now.leaf, &now.chain)),
                _ => None,
            };
            self.stage(
                Stage::Committed,
                format!("{interrupted}; the new files are all in place: finishing the deploy"),
            );
            let outcome = self
                .after_commit(
                    target,
                    committed,
                    previous.as_ref(),
                    expect.as_ref(),
                    verify,
                )
                .await?;
            self.warnings
                .push(format!("{interrupted}; completed after the restart"));
            return Ok(outcome);
        }

        if committed_stage
            || rec.outcome.is_some()
            || Stage::parse(&rec.stage) == Some(Stage::Rollback)
            || Op::parse(&rec.op) == Some(Op::Rollback)
        {
            // A finished rollback_failed run is retried the way it failed:
            // the previous files back, reloaded, verified.
            // The server may have loaded the new files: put the previous
            // ones back, reload, and prove they are served.
            return Err(self
                .roll_back(target, committed, previous.as_ref(), interrupted, verify)
                .await);
        }

        // Interrupted before the commit completed: the server was never
        // told about any new file; putting the previous ones back is all.
        self.stage(
            Stage::Rollback,
            "putting the previous files back (no reload)",
        );
        match self.undo(committed).await {
            Ok(()) => Err(DeployError::RolledBack(format!(
                "{interrupted}, before the commit completed; the previous files are in place"
            ))),
            Err(e) => Err(DeployError::RollbackFailed(format!(
                "{interrupted}; putting the previous files back failed: {e}"
            ))),
        }
    }
}

/// Removes the run's temp files and returns what there is to put back: a
/// file with a backup is restored from it; a file that did not exist before
/// the run is removed; a file whose backup is already gone was restored.
/// Removes from `dirs` (a locked target's directories, through `fs`) the
/// temp files and half-filled backup sets earlier runs left, and backups
/// beyond retention; says what it removed.
///
/// A remote target is swept by its own deploy, holding its lock only:
/// there only the temp files of its own files (named after them) go, so
/// a deploy to another target in the same remote directory keeps its own.
pub(super) async fn sweep_dirs_of(fs: &Fs, t: &Target, dirs: Vec<PathBuf>) {
    let (fs, name, keep) = (fs.clone(), t.name.clone(), t.backup_retention as usize);
    let own: Vec<String> = t
        .paths()
        .filter_map(|p| p.file_name())
        .map(|n| format!("-{}", n.to_string_lossy()))
        .collect();
    let swept = blocking(move || {
        let mut removed = Vec::new();
        for d in &dirs {
            removed.extend(match &fs {
                Fs::Local => fs.remove_temps(d)?,
                Fs::Remote(r) => r.remove_temps_where(d, |n| own.iter().any(|o| n.ends_with(o)))?,
            });
            // Sets a killed run did not finish filling.
            removed.extend(fs.remove_partials(&d.join(atomic::AGENT_DIR))?);
            removed
                .extend(fs.remove_partials(&d.join(atomic::AGENT_DIR).join("backup").join(&name))?);
        }
        super::commit::prune(&fs, &dirs.iter().cloned().collect(), &name, keep)?;
        Ok::<_, FsError>(removed)
    })
    .await;
    match swept {
        Ok(removed) if !removed.is_empty() => {
            warn!(target = %t.name, files = ?removed, "removed temp files left by an earlier run");
        }
        Ok(_) => {}
        Err(e) => warn!(target = %t.name, "cannot sweep the target's directory: {e}"),
    }
}

/// Targets swept at once at start.
const SWEEP_CONCURRENCY: usize = 8;

/// The directories a target's sweep looks at: those of its files and of a
/// file its reload hook writes (its temp may be left there too).
pub(super) fn sweep_dirs(t: &Target) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = t.paths().map(PathBuf::from).collect();
    files.extend(
        t.reload_hook
            .as_ref()
            .and_then(|h| h.writes())
            .map(|(_, p)| p.clone()),
    );
    super::commit::dirs_of(files.iter()).into_iter().collect()
}

/// The targets with their sweep directories, in groups that share no
/// directory with each other.
/// Remote targets are swept when they are next deployed to, not here: an
/// unreachable host must not hold up the start.
fn sweep_groups(config: &Config) -> Vec<Vec<(&Target, Vec<PathBuf>)>> {
    disjoint(
        config
            .targets
            .iter()
            .filter(|t| !t.is_remote())
            .map(|t| (t, sweep_dirs(t)))
            .collect(),
    )
}

/// `items` in groups such that no two groups share a directory: items
/// sharing one, even through a third, are in one group. Groups and the
/// items in each keep the order of `items`.
fn disjoint<T>(items: Vec<(T, Vec<PathBuf>)>) -> Vec<Vec<(T, Vec<PathBuf>)>> {
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    // Union-find over item indexes, joined through shared directories.
    let mut parent: Vec<usize> = (0..items.len()).collect();
    let mut owner: HashMap<PathBuf, usize> = HashMap::new();
    for (i, (_, dirs)) in items.iter().enumerate() {
        for d in dirs {
            match owner.get(d) {
                Some(&j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    owner.insert(d.clone(), i);
                }
            }
        }
    }
    let roots: Vec<usize> = (0..items.len()).map(|i| root(&mut parent, i)).collect();
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<Vec<(T, Vec<PathBuf>)>> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let g = *index.entry(roots[i]).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(item);
    }
    groups
}

/// Also returns the (live, backup) pairs of the files whose backup is
/// still there.
#[allow(clippy::type_complexity)]
fn sweep(
    fs: Fs,
    files: &[crate::journal::FileRecord],
    id: &str,
) -> Result<(Committed, Vec<(PathBuf, PathBuf)>), FsError> {
    let mut dirs = BTreeSet::new();
    for f in files {
        fs.remove(&f.tmp)?;
        fs.remove(&atomic::temp_path(&f.live, &format!("{id}-restore")))?;
        dirs.insert(atomic::parent(&f.live).to_owned());
    }
    for d in &dirs {
        fs.fsync_dir(d)?;
    }
    let mut pairs = Vec::new();
    let mut committed = Committed {
        fs: fs.clone(),
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: None,
    };
    for f in files {
        if let Some(generation) = &f.generation {
            committed.switch = Some(Switch {
                data: f.live.clone(),
                previous: f.existed.then(|| f.backup.clone()),
                generation: generation.clone(),
                created: f.created_generation,
            });
            continue;
        }
        if f.existed {
            if fs.exists(&f.backup)? {
                pairs.push((f.live.clone(), f.backup.clone()));
                committed
                    .files
                    .push((f.live.clone(), Some(f.backup.clone())));
                let dir = atomic::parent(&f.backup).to_owned();
                if !committed.backup_dirs.contains(&dir) {
                    committed.backup_dirs.push(dir);
                }
            }
        } else {
            committed.files.push((f.live.clone(), None));
        }
    }
    Ok((committed, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(groups: &[Vec<(&str, Vec<PathBuf>)>]) -> Vec<Vec<String>> {
        groups
            .iter()
            .map(|g| g.iter().map(|(n, _)| (*n).to_owned()).collect())
            .collect()
    }

    #[test]
    fn targets_sharing_a_directory_even_through_a_third_are_swept_together() {
        let d = |p: &str| PathBuf::from(p);
        let items = vec![
            ("a", vec![d("/x")]),
            ("b", vec![d("/y")]),
            ("c", vec![d("/z"), d("/w")]),
            ("e", vec![d("/v")]),
            ("f", vec![d("/w"), d("/x")]),
            ("g", vec![]),
        ];
        assert_eq!(
            names(&disjoint(items)),
            [vec!["a", "c", "f"], vec!["b"], vec!["e"], vec!["g"]]
        );
        assert!(disjoint::<&str>(Vec::new()).is_empty());
    }
}
