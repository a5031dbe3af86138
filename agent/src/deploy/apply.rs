//! Executing a deploy: the stages of `DEPLOY-PROTOCOL.md` in order, with
//! rollback when a later stage fails.
//!
//! Guarantees: nothing beside the target is touched before the input has
//! been checked and the target locked; every file goes through
//! [`atomic`](crate::atomic) (temp, fsync, rename, directory fsync); the
//! validate command runs against the committed new files and a failure puts
//! the previous files back without a reload; a failed reload or a failed
//! verification puts them back, reloads again and verifies that the previous
//! certificate is served again (see [`verify`](super::verify)). Every stage
//! is reported as an [`Event`] to the caller and to watchers, and the deploy
//! ends with exactly one `Done` event.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
use zeroize::Zeroizing;

use super::generations;
use super::plan::{self, Plan, Policy};
use super::verify::{self, Attempt, Expect, OnDisk, ServedCheck};
use crate::atomic::{self, FsError};
use crate::bundle::{self, Bundle, CheckOptions, Source};
use crate::command;
use crate::config::{Layout, Target, VerifyConfig};
use crate::failpoint;
use crate::journal::{self, FileRecord, Journal, Sync};
use crate::keystore::{KeystoreConfig, StoreType};
use crate::lock::{LockError, Locks, TargetGuard};
use crate::metrics::{Metrics, StageTimer};
use crate::model::event::{
    Event, FileSummary, Outcome, Report, Stage, Verification, new_deploy_id,
};
use crate::model::fmt::{fmt_duration, short_hex};
use crate::sync::lock;

/// One deploy as asked for by a client.
pub struct Request {
    pub target: Target,
    /// Named PEM inputs (`--cert`, `--key`, `--chain`, or drop files).
    pub sources: Vec<(String, Zeroizing<Vec<u8>>)>,
    pub dry_run: bool,
    pub no_verify: bool,
    pub no_wait: bool,
    /// Who asked, for the log: "cli uid=1000 pid=4242".
    pub origin: String,
    pub clock_skew_grace: Duration,
}

/// The last finished deploy of a target, for `certctl status`.
#[derive(Debug, Clone)]
pub struct LastDeploy {
    pub deploy_id: String,
    pub outcome: Outcome,
    pub finished: SystemTime,
    pub error: String,
    pub cert_sha256: String,
}

/// Runs deploys; shared by every API call of one agent.
#[derive(Debug)]
pub struct Engine {
    locks: Locks,
    events: broadcast::Sender<Event>,
    last: Mutex<HashMap<String, LastDeploy>>,
    /// The last probe of each target's verify endpoint.
    served: Mutex<HashMap<String, ServedCheck>>,
    /// Fires at shutdown: verification waits end early.
    shutdown: CancellationToken,
    /// Per target, the token of the deploy holding it. A deploy that has to
    /// wait for the lock fires it, so the holder's verification waits end
    /// early instead of holding the newer deploy up.
    hurry: Mutex<HashMap<String, CancellationToken>>,
    /// Every run is recorded here before it touches a file.
    pub(super) journal: Arc<Journal>,
    /// Counters and stage timings of every deploy and rollback.
    metrics: Arc<Metrics>,
}

impl Engine {
    /// `lock_dir` holds the per-target `flock` files; every run is
    /// recorded in `journal`.
    pub fn new(lock_dir: PathBuf, journal: Arc<Journal>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            locks: Locks::new(lock_dir),
            events,
            last: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            hurry: Mutex::new(HashMap::new()),
            journal,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The deploy journal (history, recovery).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The agent's metrics (also for callers outside deploys, such as the
    /// drop directory watcher: [`Metrics::drop_outcome`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The agent is stopping: pending verification waits end now (each
    /// deploy still makes one last attempt and rolls back when it fails).
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }

    /// Cancelled when the agent stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Sends an event to watchers (for events that are not part of a
    /// deploy, like drift).
    pub fn publish(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Remembers the latest probe of `target` for `certctl status`.
    pub fn record_served(&self, target: &str, check: ServedCheck) {
        lock(&self.served).insert(target.to_owned(), check);
    }

    /// The latest probe of `target`'s verify endpoint since start.
    pub fn served(&self, target: &str) -> Option<ServedCheck> {
        lock(&self.served).get(target).cloned()
    }

    /// Every event of every deploy from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// True while a deploy holds `target`.
    pub fn is_busy(&self, target: &str) -> bool {
        self.locks.is_busy(target)
    }

    /// The last finished (not dry-run) deploy of `target` since start.
    pub fn last(&self, target: &str) -> Option<LastDeploy> {
        if let Some(last) = lock(&self.last).get(target) {
            return Some(last.clone());
        }
        // Before this agent finished a run of the target: the journal's.
        let rec = self.journal.last(target).ok().flatten()?;
        Some(LastDeploy {
            deploy_id: rec.id,
            outcome: Outcome::parse(rec.outcome.as_deref().unwrap_or_default())?,
            finished: rec.finished.unwrap_or(rec.started),
            error: rec.error,
            cert_sha256: rec.cert_sha256,
        })
    }

    /// Takes `target`'s lock. A deploy that has to wait hurries the holder
    /// along (its verification waits end early). The returned token fires
    /// when the next deploy starts waiting or the agent stops.
    pub(super) async fn lock_target(
        &self,
        target: &str,
        no_wait: bool,
    ) -> Result<(TargetGuard, CancellationToken), LockError> {
        if !no_wait
            && self.locks.is_busy(target)
            && let Some(holder) = lock(&self.hurry).get(target)
        {
            holder.cancel();
        }
        let guard = self.locks.acquire(target, no_wait).await?;
        let token = self.shutdown.child_token();
        lock(&self.hurry).insert(target.to_owned(), token.clone());
        Ok((guard, token))
    }

    /// Runs one deploy to its end, sending each event to `sink` (and to
    /// watchers). Never panics on bad input; the returned report is the one
    /// carried by the final `Done` event.
    pub async fn deploy(&self, req: Request, sink: mpsc::UnboundedSender<Event>) -> Report {
        let id = new_deploy_id(SystemTime::now());
        let span = tracing::info_span!("deploy", target = %req.target.name, deploy_id = %id);
        let mut run = Run::new(self, id, &req.target.name, sink);
        run.origin.clone_from(&req.origin);
        async move {
            info!(origin = %req.origin, dry_run = req.dry_run, "deploy requested");
            let (outcome, error) = match run.execute(&req).await {
                Ok(outcome) => (outcome, String::new()),
                Err(failure) => (failure.outcome, failure.message),
            };
            if !req.dry_run {
                run.look_at_disk(&req.target).await;
            }
            let report = run.finish(outcome, error, req.dry_run);
            self.metrics
                .deploy_finished(&req.target.name, report.outcome);
            report
        }
        .instrument(span)
        .await
    }
}

/// A stage that ended the deploy early.
pub(super) struct Failure {
    pub(super) outcome: Outcome,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn new(outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            outcome,
            message: message.into(),
        }
    }
}

/// The state of one running deploy (or rollback).
pub(super) struct Run<'e> {
    pub(super) engine: &'e Engine,
    pub(super) id: String,
    target: String,
    sink: mpsc::UnboundedSender<Event>,
    started: Instant,
    pub(super) warnings: Vec<String>,
    /// The certificate this run puts in place: (sha256, not_after, subject).
    pub(super) leaf: Option<(String, i64, String)>,
    /// Fires when a newer deploy waits for this target or the agent stops.
    pub(super) cancel: CancellationToken,
    pub(super) verification: Verification,
    /// The last probe this run made.
    served: Option<ServedCheck>,
    /// Leaf on `cert_path` when the run ended.
    disk_sha256: String,
    /// Who asked, for the journal.
    pub(super) origin: String,
    /// `deploy` or `rollback`, for the journal.
    pub(super) op: &'static str,
    /// The run has a journal row (it took the lock and is past planning).
    pub(super) begun: bool,
    /// Recovery is finishing this run after a restart.
    pub(super) recovered: bool,
    /// Stage durations for the metrics.
    timer: StageTimer,
    /// Something outside the files acts on them once committed (a validate
    /// or reload command, a verification) before the outcome is written:
    /// the `committed` row must be durable first. Conservatively true
    /// unless a deploy finds otherwise.
    pub(super) committed_acted_on: bool,
}

/// Files renamed into place, with what to put back.
pub(super) struct Committed {
    /// (live path, backup of the previous file or None when there was none)
    pub(super) files: Vec<(PathBuf, Option<PathBuf>)>,
    pub(super) backup_dirs: Vec<PathBuf>,
    /// The `..data` switch of the generations layout.
    pub(super) switch: Option<generations::Switch>,
}

impl<'e> Run<'e> {
    pub(super) fn new(
        engine: &'e Engine,
        id: String,
        target: &str,
        sink: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            engine,
            id,
            target: target.to_owned(),
            sink,
            started: Instant::now(),
            warnings: Vec::new(),
            leaf: None,
            cancel: CancellationToken::new(),
            verification: Verification::Unverified,
            served: None,
            disk_sha256: String::new(),
            timer: StageTimer::new(),
            origin: String::new(),
            op: "deploy",
            begun: false,
            recovered: false,
            committed_acted_on: true,
        }
    }

    /// Records the run in the journal before any file is touched; a run
    /// that cannot be recorded does not start.
    pub(super) async fn begin_journal(
        &mut self,
        origin: &str,
        op: &'static str,
        files: &[FileRecord],
        prev_sha256: &str,
        inputs: &[(String, String)],
    ) -> Result<(), Failure> {
        let cert = self
            .leaf
            .as_ref()
            .map(|(sha, _, _)| sha.clone())
            .unwrap_or_default();
        let begin = journal::Begin {
            id: &self.id,
            target: &self.target,
            op,
            origin,
            files,
            cert_sha256: &cert,
            prev_sha256,
            inputs,
        };
        tokio::task::block_in_place(|| self.engine.journal.begin(&begin))
            .map_err(|e| Failure::new(Outcome::Internal, format!("{e}; nothing was changed")))?;
        self.op = op;
        self.begun = true;
        Ok(())
    }

    /// Appends a stage to the run's journal row.
    fn journal_stage(&self, stage: &str, message: &str) {
        if !self.begun {
            return;
        }
        let sync = self.sync_of(stage);
        if let Err(e) = tokio::task::block_in_place(|| {
            self.engine.journal.stage(&self.id, stage, message, sync)
        }) {
            tracing::error!("{e}");
        }
    }

    /// How soon the row of `stage` must be on disk. Recovery acts on the
    /// last stage it finds (`deploy::recover`): a row must be durable
    /// before anything happens that recovery would have to treat
    /// differently. `rollback` (the previous files are being put back) is
    /// always; `committed` is when something outside the files acts on
    /// them before the outcome is written (validate, reload, verify): the
    /// server may load the new files, and recovery must then complete the
    /// deploy rather than quietly restore. With nothing in between, the
    /// outcome's fsync carries it: lost to a power cut, recovery finds the
    /// run at `locked` and restores the previous set, which no one was told
    /// had been replaced. `staged`, `validate-command`, `reloaded` and
    /// `verify` are treated by recovery exactly as the row before them.
    /// The start and the outcome are always durable ([`Journal::begin`],
    /// [`Journal::finish`]).
    fn sync_of(&self, stage: &str) -> Sync {
        match stage {
            "staged" | "validate-command" | "reloaded" | "verify" => Sync::WithNext,
            "committed" if !self.committed_acted_on => Sync::WithNext,
            _ => Sync::Now,
        }
    }

    fn send(&self, event: Event) {
        // A client that hung up does not stop the deploy.
        let _ = self.sink.send(event.clone());
        let _ = self.engine.events.send(event);
    }

    fn emit(&self, stage: Stage, message: String, files: Vec<FileSummary>, report: Option<Report>) {
        self.send(Event {
            files,
            report,
            ..Event::new(&self.id, &self.target, stage, message)
        });
    }

    pub(super) fn stage(&self, stage: Stage, message: impl Into<String>) {
        let message = message.into();
        info!(stage = stage.as_str(), "{message}");
        self.journal_stage(stage.as_str(), &message);
        self.engine.metrics.stage_event(stage, &self.timer);
        self.emit(stage, message, Vec::new(), None);
    }

    fn attempt(&self, a: &Attempt) {
        self.engine
            .metrics
            .verify_attempt(&self.target, a.check.ok(), a.check.reason);
        let message = a.describe();
        if a.check.ok() {
            info!(stage = "verify", served = %a.check.served_sha256, "{message}");
        } else {
            warn!(stage = "verify", reason = a.check.reason, "{message}");
        }
        // Attempts of a rollback keep the run at stage "rollback": recovery
        // must put the previous files back, not complete the deploy.
        self.journal_stage(if a.rollback { "rollback" } else { "verify" }, &message);
        self.send(Event {
            attempt: Some(a.clone()),
            ..Event::new(&self.id, &self.target, Stage::VerifyAttempt, message)
        });
    }

    /// Probes `v` until `expect` is served (stage 9), reporting each
    /// attempt. The last check is recorded for `certctl status`.
    pub(super) async fn verify(
        &mut self,
        v: &VerifyConfig,
        expect: &Expect,
        rollback: bool,
    ) -> Result<ServedCheck, ServedCheck> {
        let cancel = self.cancel.clone();
        let started = Instant::now();
        let result = {
            let this = &*self;
            verify::until_served(v, expect, &cancel, rollback, |a| this.attempt(a)).await
        };
        self.engine
            .metrics
            .verification_finished(started.elapsed(), &self.timer);
        let check = match &result {
            Ok(c) | Err(c) => c.clone(),
        };
        self.engine.record_served(&self.target, check.clone());
        self.served = Some(check);
        result
    }

    /// Notes the leaf on disk at the end, for the report.
    pub(super) async fn look_at_disk(&mut self, target: &Target) {
        let t = target.clone();
        self.disk_sha256 = tokio::task::spawn_blocking(move || verify::on_disk(&t))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .map(|d| d.leaf.sha256_hex())
            .unwrap_or_default();
    }

    async fn execute(&mut self, req: &Request) -> Result<Outcome, Failure> {
        let target = &req.target;
        // 1. Parse and check the input.
        let bundle = self.check(req)?;
        self.leaf = Some((
            bundle.leaf.sha256_hex(),
            bundle.leaf.not_after,
            bundle.leaf.subject.clone(),
        ));

        // 2. Plan (advisory: re-done under the lock).
        let plan = self.plan(target, &bundle).await?;
        let changed = plan.files.iter().filter(|f| f.changed).count();
        let summary = if changed == 0 {
            "nothing to change: every file already matches".to_owned()
        } else {
            format!("{changed} of {} files to write", plan.files.len())
        };
        self.warnings.extend(plan.warnings.iter().cloned());
        for w in &plan.warnings {
            warn!("{w}");
        }
        self.emit(
            Stage::Planned,
            summary,
            plan.files.iter().map(FileSummary::from).collect(),
            None,
        );
        if req.dry_run {
            return Ok(Outcome::DryRun);
        }

        // 3. Lock.
        let _guard = self.lock(target, req.no_wait).await?;
        // What is on disk may have changed while we waited.
        let plan = Arc::new(self.plan(target, &bundle).await?);
        let verify = target.verify.as_ref().filter(|_| !req.no_verify);
        if plan.is_noop() {
            return match verify {
                None => Ok(Outcome::Unchanged),
                Some(v) => self.verify_unchanged(target, v, &bundle).await,
            };
        }
        // What a rollback must find served again.
        let previous = self.previous(target).await;

        // 4. Journal: what this deploy will touch, before it touches it.
        let files = {
            let (plan, t, id) = (plan.clone(), target.clone(), self.id.clone());
            blocking(move || journal_files(&plan, &t, &id))
                .await
                .map_err(|e| Failure::new(Outcome::Internal, e.to_string()))?
        };
        let inputs = input_fingerprints(&bundle);
        let prev_sha = previous
            .as_ref()
            .map(|p| p.leaf.sha256_hex())
            .unwrap_or_default();
        self.begin_journal(&req.origin, "deploy", &files, &prev_sha, &inputs)
            .await?;
        self.committed_acted_on =
            !target.validate.is_empty() || !target.reload.is_empty() || verify.is_some();

        if target.layout == Layout::Generations {
            let committed = self.stage_and_switch(target, &plan).await?;
            failpoint::hit("after-commit");
            let expect = verify.map(|v| Expect::of(v, &bundle.leaf, &bundle.chain));
            return self
                .after_commit(
                    target,
                    committed,
                    previous.as_ref(),
                    expect.as_ref(),
                    verify,
                )
                .await;
        }

        // 5. Stage.
        let temps = {
            let plan = plan.clone();
            let id = self.id.clone();
            blocking(move || stage_files(&plan, &id)).await
        }
        .map_err(|e| {
            Failure::new(
                Outcome::Internal,
                format!("staging failed, nothing changed: {e}"),
            )
        })?;
        self.stage(
            Stage::Staged,
            format!("{} temp file(s) written and synced", temps.len()),
        );

        // 6. Commit.
        let committed = {
            let id = self.id.clone();
            let name = target.name.clone();
            blocking(move || commit(temps, &name, &id)).await
        }
        .map_err(|e| match e {
            CommitError::Restored(e) => Failure::new(
                Outcome::Internal,
                format!("commit failed, previous files restored: {e}"),
            ),
            CommitError::NotRestored(e, r) => Failure::new(
                Outcome::RollbackFailed,
                format!("commit failed ({e}) and restoring the previous files failed too: {r}"),
            ),
        })?;
        self.stage(Stage::Committed, describe_commit(&committed));
        failpoint::hit("after-commit");
        let expect = verify.map(|v| Expect::of(v, &bundle.leaf, &bundle.chain));
        self.after_commit(
            target,
            committed,
            previous.as_ref(),
            expect.as_ref(),
            verify,
        )
        .await
    }

    /// Stages 5 and 6 of the generations layout: a complete new
    /// generation, then one switch of `..data`.
    async fn stage_and_switch(
        &mut self,
        target: &Target,
        plan: &Arc<Plan>,
    ) -> Result<Committed, Failure> {
        let dir = atomic::parent(&target.cert_path).to_owned();
        let generation = {
            let (plan, dir, id) = (plan.clone(), dir.clone(), self.id.clone());
            blocking(move || generations::stage(&plan, &dir, &id)).await
        }
        .map_err(|e| {
            Failure::new(
                Outcome::Internal,
                format!("staging failed, nothing changed: {e}"),
            )
        })?;
        self.stage(
            Stage::Staged,
            format!(
                "generation {} written and synced ({} files)",
                generation.display(),
                plan.files.len()
            ),
        );
        let committed = {
            let convert = generations::to_convert(plan);
            let (name, id) = (target.name.clone(), self.id.clone());
            blocking(move || generations::commit(&dir, &generation, &convert, &name, &id)).await
        }
        .map_err(|e| {
            Failure::new(
                Outcome::Internal,
                format!(
                    "switching to the new generation failed, the previous one is in force: {e}"
                ),
            )
        })?;
        self.stage(
            Stage::Committed,
            if committed.files.is_empty() {
                "..data switched to the new generation (one rename)".to_owned()
            } else {
                format!(
                    "..data switched to the new generation (one rename); {} path(s) became links through ..data",
                    committed.files.len()
                )
            },
        );
        Ok(committed)
    }

    /// Stages 7 to 10 for files that are committed: validate, reload,
    /// verify, prune; rollback when one fails. Also how recovery completes
    /// a deploy that was interrupted after its commit.
    pub(super) async fn after_commit(
        &mut self,
        target: &Target,
        committed: Committed,
        previous: Option<&OnDisk>,
        expect: Option<&Expect>,
        verify: Option<&VerifyConfig>,
    ) -> Result<Outcome, Failure> {
        // 7. Validate against the new files.
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
                    self.stage(Stage::Rollback, "restoring the previous files (no reload)");
                    return Err(match self.undo(committed).await {
                        Ok(()) => Failure::new(
                            Outcome::ValidateFailed,
                            format!(
                                "{e}; the previous files are back in place and the server was not reloaded"
                            ),
                        ),
                        Err(r) => Failure::new(
                            Outcome::RollbackFailed,
                            format!("{e}; restoring the previous files failed: {r}"),
                        ),
                    });
                }
            }
        }

        // 8. Reload.
        match self.reload(target).await {
            Ok(Some(done)) => self.stage(Stage::Reloaded, done),
            Ok(None) => {}
            Err(e) => {
                return Err(self.roll_back(target, committed, previous, e, verify).await);
            }
        }

        // 9. Verify.
        if let (Some(v), Some(expect)) = (verify, expect) {
            match self.verify(v, expect, false).await {
                Ok(_) => self.verification = Verification::Verified,
                Err(check) => {
                    let why = format!(
                        "verification failed after {} attempt(s): {}",
                        v.attempts, check.error
                    );
                    return Err(self
                        .roll_back(target, committed, previous, why, verify)
                        .await);
                }
            }
        }

        // 10. Finish: prune old backups and generations.
        let mut dirs = dirs_of(committed.files.iter().map(|(live, _)| live));
        let gens = committed
            .switch
            .as_ref()
            .map(|s| atomic::parent(&s.data).to_owned());
        dirs.extend(gens.clone());
        let name = target.name.clone();
        let keep = target.backup_retention as usize;
        let pruned = blocking(move || {
            prune(&dirs, &name, keep)?;
            match &gens {
                Some(dir) => generations::prune(dir, keep),
                None => Ok(()),
            }
        })
        .await;
        if let Err(e) = pruned {
            let w = format!("could not prune old backups: {e}");
            warn!("{w}");
            self.warnings.push(w);
        }
        drop(committed);
        Ok(Outcome::Deployed)
    }

    /// Stage 3: takes the target's lock and reports how long that took.
    pub(super) async fn lock(
        &mut self,
        target: &Target,
        no_wait: bool,
    ) -> Result<TargetGuard, Failure> {
        let waited = Instant::now();
        let (guard, cancel) = self
            .engine
            .lock_target(&target.name, no_wait)
            .await
            .map_err(|e| match e {
                LockError::Busy { .. } => Failure::new(Outcome::Busy, e.to_string()),
                other => Failure::new(Outcome::Internal, other.to_string()),
            })?;
        self.cancel = cancel;
        let waited = waited.elapsed();
        self.stage(
            Stage::Locked,
            if waited > Duration::from_millis(50) {
                format!(
                    "target lock acquired after waiting {}",
                    fmt_duration(waited)
                )
            } else {
                "target lock acquired".to_owned()
            },
        );
        Ok(guard)
    }

    /// The certificate set on disk before this deploy; `None` when there is
    /// none or it cannot be read (then a rollback cannot verify it).
    async fn previous(&mut self, target: &Target) -> Option<OnDisk> {
        let t = target.clone();
        match tokio::task::spawn_blocking(move || verify::on_disk(&t)).await {
            Ok(Ok(previous)) => previous,
            Ok(Err(e)) => {
                let w = format!(
                    "the certificate on disk cannot be read ({e}): a rollback could not verify it"
                );
                warn!("{w}");
                self.warnings.push(w);
                None
            }
            Err(_) => None,
        }
    }

    /// The files already hold this certificate: make sure it is served. If
    /// it is not (a reload was missed), reload and look again.
    async fn verify_unchanged(
        &mut self,
        target: &Target,
        v: &VerifyConfig,
        bundle: &Bundle,
    ) -> Result<Outcome, Failure> {
        let expect = Expect::of(v, &bundle.leaf, &bundle.chain);
        let first = verify::check_once(v, &expect).await;
        if first.ok() {
            self.stage(
                Stage::VerifyAttempt,
                format!(
                    "the files already hold this certificate and {} serves it",
                    v.endpoint
                ),
            );
            self.engine.record_served(&self.target, first.clone());
            self.served = Some(first);
            self.verification = Verification::Verified;
            return Ok(Outcome::Unchanged);
        }
        if !target.reloads() {
            self.stage(
                Stage::VerifyAttempt,
                format!(
                    "the files already hold this certificate, but {}",
                    first.error
                ),
            );
        } else {
            match self.reload(target).await {
                Ok(done) => self.stage(
                    Stage::Reloaded,
                    format!(
                        "the files already hold this certificate, but {}: reloaded: {}",
                        first.error,
                        done.unwrap_or_default()
                    ),
                ),
                Err(e) => {
                    return Err(Failure::new(
                        Outcome::Internal,
                        format!(
                            "the files already hold this certificate, but {}; reloading failed: {e}",
                            first.error
                        ),
                    ));
                }
            }
        }
        match self.verify(v, &expect, false).await {
            Ok(_) => {
                self.verification = Verification::Verified;
                Ok(Outcome::Deployed)
            }
            Err(check) => Err(Failure::new(
                Outcome::Internal,
                format!(
                    "the files already hold this certificate, but it is not served: {}; \
                     check that the server reads {}",
                    check.error,
                    target.cert_path.display()
                ),
            )),
        }
    }

    /// Rollback after the new files were committed: put the previous files
    /// back, reload, and verify that the previous certificate is served
    /// again. `why` says what failed; the result is `rolled_back` or
    /// `rollback_failed` with what is on disk and what is served.
    pub(super) async fn roll_back(
        &mut self,
        target: &Target,
        committed: Committed,
        previous: Option<&OnDisk>,
        why: String,
        verify: Option<&VerifyConfig>,
    ) -> Failure {
        self.stage(
            Stage::Rollback,
            if target.reloads() {
                "restoring the previous files and reloading"
            } else {
                "restoring the previous files"
            },
        );
        if let Err(r) = self.undo(committed).await {
            return Failure::new(
                Outcome::RollbackFailed,
                format!(
                    "{why}; restoring the previous files failed: {r}; the backups are kept in {}",
                    atomic::parent(&atomic::backup_dir(
                        atomic::parent(&target.cert_path),
                        &target.name,
                        &self.id
                    ))
                    .display()
                ),
            );
        }
        if let Err(r) = self.reload(target).await {
            return Failure::new(
                Outcome::RollbackFailed,
                format!(
                    "{why}; the previous files are back on disk but reloading them failed: {r}"
                ),
            );
        }
        let (Some(v), Some(previous)) = (verify, previous) else {
            let what = if previous.is_none() && verify.is_some() {
                "there was no previous certificate: the new files were removed"
            } else if !target.reloads() {
                "the previous files are in place (not verified: no verify endpoint)"
            } else {
                "the previous files are in place and were reloaded (not verified: no verify endpoint)"
            };
            return Failure::new(Outcome::RolledBack, format!("{why}; rolled back: {what}"));
        };
        let expect = Expect::of(v, &previous.leaf, &previous.chain);
        match self.verify(v, &expect, true).await {
            Ok(_) => Failure::new(
                Outcome::RolledBack,
                format!(
                    "{why}; rolled back: the previous certificate {} is on disk and {} serves it again",
                    short_hex(&expect.leaf_sha256),
                    v.endpoint
                ),
            ),
            Err(check) => Failure::new(
                Outcome::RollbackFailed,
                format!(
                    "{why}; the previous files are back on disk (leaf {}) but {}",
                    short_hex(&expect.leaf_sha256),
                    check.error
                ),
            ),
        }
    }

    fn check(&self, req: &Request) -> Result<Bundle, Failure> {
        let sources: Vec<Source<'_>> = req
            .sources
            .iter()
            .map(|(name, pem)| Source { name, pem })
            .collect();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let server_name = req
            .target
            .verify
            .as_ref()
            .and_then(|v| v.server_name.as_deref());
        let opts = CheckOptions {
            now_unix: now,
            clock_skew_grace: req.clock_skew_grace,
            server_name,
        };
        let bundle = bundle::parse_and_check(&sources, &opts)
            .map_err(|e| Failure::new(Outcome::Rejected, e.to_string()))?;
        let leaf = &bundle.leaf;
        self.stage(
            Stage::Validated,
            format!(
                "leaf {} sha256 {}, valid until {}, {} chain certificate(s), {} key",
                leaf.subject,
                short_hex(&leaf.sha256_hex()),
                bundle::rfc3339(leaf.not_after),
                bundle.chain.len(),
                bundle.key.algorithm()
            ),
        );
        Ok(bundle)
    }

    async fn plan(&self, target: &Target, bundle: &Bundle) -> Result<Plan, Failure> {
        let (outputs, keystore) = match &target.keystore {
            None => (
                plan::outputs(target, bundle)
                    .map_err(|e| Failure::new(Outcome::Rejected, e.to_string()))?,
                None,
            ),
            Some(ks) => {
                let (output, password) = self.keystore_output(target, ks, bundle).await?;
                (vec![output], Some((ks.clone(), password)))
            }
        };
        let paths: Vec<PathBuf> = outputs.iter().map(|o| o.path.clone()).collect();
        let linked = target.layout == Layout::Generations;
        let existing = blocking(move || {
            let mut existing = paths
                .iter()
                .map(|p| {
                    if linked {
                        generations::observe(p)
                    } else {
                        atomic::observe(p)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            // A keystore is what it holds: the same material encrypted
            // again has other bytes.
            if let (Some((ks, password)), Some(Some(e))) = (&keystore, existing.first_mut())
                && ks.store_type == StoreType::Pkcs12
                && let Ok(bytes) = std::fs::read(&paths[0])
                && let Ok(held) = crate::keystore::read_pkcs12(&bytes, &ks.alias, password)
                && let Some(digest) = held.digest
            {
                e.sha256 = digest;
            }
            Ok::<_, FsError>(existing)
        })
        .await
        .map_err(|e| Failure::new(Outcome::Internal, e.to_string()))?;
        Ok(plan::plan(&Policy::of(target), outputs, existing))
    }

    /// A keystore target's one output, encoded with the password read now
    /// (returned for reading the keystore on disk).
    async fn keystore_output(
        &self,
        target: &Target,
        ks: &KeystoreConfig,
        bundle: &Bundle,
    ) -> Result<(plan::Output, Zeroizing<String>), Failure> {
        let failed = |e: crate::keystore::KeystoreError| {
            Failure::new(Outcome::Internal, format!("{e}; nothing was changed"))
        };
        let source = ks.password.clone();
        let password = tokio::task::spawn_blocking(move || crate::keystore::read_password(&source))
            .await
            .map_err(|e| Failure::new(Outcome::Internal, e.to_string()))?
            .map_err(failed)?;
        // PBKDF2 over the password: CPU work, off the async threads' queue.
        let (p12, digest) = tokio::task::block_in_place(|| {
            crate::keystore::pkcs12(bundle, &ks.alias, &password)
                .map(|b| (b, crate::keystore::bundle_digest(bundle, &ks.alias)))
        })
        .map_err(failed)?;
        let output = match ks.store_type {
            StoreType::Pkcs12 => plan::keystore_output(target, p12, Some(digest)),
            // keytool's JKS encryption is salted too, and its key is not
            // read back here: every deploy writes a new JKS keystore.
            StoreType::Jks => {
                let jks = crate::keystore::to_jks(
                    &p12,
                    &ks.alias,
                    &password,
                    &ks.scratch_dir,
                    target.command_timeout,
                )
                .await
                .map_err(failed)?;
                plan::keystore_output(target, jks, None)
            }
        };
        Ok((output, password))
    }

    pub(super) async fn run_command(
        &self,
        target: &Target,
        purpose: &str,
        argv: &[String],
    ) -> Result<Duration, command::CommandError> {
        let mut env = vec![
            ("CERTCTL_TARGET".to_owned(), target.name.clone()),
            ("CERTCTL_DEPLOY_ID".to_owned(), self.id.clone()),
            ("CERTCTL_STAGE".to_owned(), purpose.to_owned()),
            (
                "CERTCTL_CERT_PATH".to_owned(),
                target.cert_path.display().to_string(),
            ),
            (
                "CERTCTL_KEY_PATH".to_owned(),
                target.key_path.display().to_string(),
            ),
        ];
        if let Some(chain) = &target.chain_path {
            env.push(("CERTCTL_CHAIN_PATH".to_owned(), chain.display().to_string()));
        }
        let spec = command::Spec {
            purpose,
            argv,
            timeout: target.command_timeout,
            env,
        };
        let started = Instant::now();
        let out = command::run(&spec).await;
        self.engine
            .metrics
            .command_finished(purpose, started.elapsed());
        Ok(out?.duration)
    }

    /// Stage 8's action: the target's reload hook, else its reload
    /// command. `Ok(None)`: the target has neither; `Ok(Some(line))`: what
    /// was done, for the stage message; `Err`: why it failed.
    pub(super) async fn reload(&self, target: &Target) -> Result<Option<String>, String> {
        if let Some(hook) = &target.reload_hook {
            let started = Instant::now();
            return match hook.run(target.command_timeout).await {
                Ok(done) => Ok(Some(format!(
                    "{done} ({})",
                    fmt_duration(started.elapsed())
                ))),
                Err(e) => Err(format!("reload failed: {e}")),
            };
        }
        if target.reload.is_empty() {
            return Ok(None);
        }
        match self.run_command(target, "reload", &target.reload).await {
            Ok(took) => Ok(Some(format!(
                "`{}` ok ({})",
                command::display_argv(&target.reload),
                fmt_duration(took)
            ))),
            Err(e) => Err(e.to_string()),
        }
    }

    pub(super) async fn undo(&self, committed: Committed) -> Result<(), FsError> {
        let id = self.id.clone();
        blocking(move || undo(&committed, &id)).await
    }

    pub(super) fn finish(&mut self, outcome: Outcome, error: String, dry_run: bool) -> Report {
        let (cert_sha256, not_after, subject) = self.leaf.clone().unwrap_or_default();
        let report = Report {
            outcome,
            error: error.clone(),
            cert_sha256: cert_sha256.clone(),
            not_after,
            subject,
            verification: self.verification,
            warnings: std::mem::take(&mut self.warnings),
            duration: self.started.elapsed(),
            disk_sha256: std::mem::take(&mut self.disk_sha256),
            served_sha256: self
                .served
                .as_ref()
                .map(|c| c.served_sha256.clone())
                .unwrap_or_default(),
        };
        let message = if error.is_empty() {
            format!("{} in {}", outcome.as_str(), fmt_duration(report.duration))
        } else {
            format!("{}: {error}", outcome.as_str())
        };
        self.engine.metrics.run_finished(&self.timer);
        let not_after = if not_after == 0 {
            String::new()
        } else {
            bundle::rfc3339(not_after)
        };
        match outcome {
            Outcome::Deployed | Outcome::Unchanged | Outcome::DryRun | Outcome::Restored => {
                info!(outcome = outcome.as_str(), cert_sha256 = %cert_sha256, not_after = %not_after, verification = self.verification.as_str(), "{message}");
            }
            _ => {
                warn!(outcome = outcome.as_str(), cert_sha256 = %cert_sha256, not_after = %not_after, "{message}")
            }
        }
        if !dry_run {
            self.journal_finish(outcome, &error, &report);
            lock(&self.engine.last).insert(
                self.target.clone(),
                LastDeploy {
                    deploy_id: self.id.clone(),
                    outcome,
                    finished: SystemTime::now(),
                    error,
                    cert_sha256,
                },
            );
        }
        self.emit(Stage::Done, message, Vec::new(), Some(report.clone()));
        report
    }

    /// Closes the run's journal row (or writes a closed one for a run that
    /// ended before it took the lock).
    fn journal_finish(&self, outcome: Outcome, error: &str, report: &Report) {
        failpoint::hit("before-finish");
        let finish = journal::Finish {
            outcome: outcome.as_str(),
            error,
            verification: report.verification.as_str(),
            disk_sha256: &report.disk_sha256,
            served_sha256: &report.served_sha256,
            recovered: self.recovered,
        };
        let written = tokio::task::block_in_place(|| {
            if self.begun {
                self.engine.journal.finish(&self.id, &finish)
            } else {
                self.engine.journal.closed(
                    &journal::Begin {
                        id: &self.id,
                        target: &self.target,
                        op: self.op,
                        origin: &self.origin,
                        files: &[],
                        cert_sha256: &report.cert_sha256,
                        prev_sha256: "",
                        inputs: &[],
                    },
                    &finish,
                )
            }
        });
        if let Err(e) = written {
            tracing::error!("{e}");
        }
    }
}

/// The journal's view of a plan: every path that will be replaced, where
/// its temp and its backup go, and whether something was there; with the
/// generations layout, the paths still to become links and the `..data`
/// switch.
fn journal_files(plan: &Plan, target: &Target, id: &str) -> Result<Vec<FileRecord>, FsError> {
    let record = |live: &PathBuf, existed: bool| FileRecord {
        live: live.clone(),
        existed,
        backup: atomic::backup_dir(atomic::parent(live), &target.name, id)
            .join(live.file_name().unwrap_or_default()),
        tmp: atomic::temp_path(live, id),
        generation: None,
        created_generation: false,
    };
    if target.layout != Layout::Generations {
        return Ok(plan
            .files
            .iter()
            .filter(|f| f.changed)
            .map(|f| record(&f.path, f.existing.is_some()))
            .collect());
    }
    let dir = atomic::parent(&target.cert_path);
    let data = generations::data_link(dir);
    let previous = atomic::read_link(&data)?;
    let mut out: Vec<FileRecord> = generations::to_convert(plan)
        .iter()
        .map(|(live, existed)| record(live, *existed))
        .collect();
    out.push(FileRecord {
        live: data.clone(),
        existed: previous.is_some(),
        backup: previous.unwrap_or_default(),
        tmp: atomic::temp_path(&data, id),
        generation: Some(generations::gen_dir(dir, id)),
        created_generation: true,
    });
    Ok(out)
}

/// Fingerprints of the input for the journal: the leaf, each chain
/// certificate, and the private key's public half. Never the key.
fn input_fingerprints(bundle: &Bundle) -> Vec<(String, String)> {
    let mut out = vec![("leaf".to_owned(), bundle.leaf.sha256_hex())];
    out.extend(
        bundle
            .chain
            .iter()
            .map(|c| ("chain".to_owned(), c.sha256_hex())),
    );
    out.push(("key-spki".to_owned(), bundle.leaf.spki_sha256_hex()));
    out
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

impl From<tokio::task::JoinError> for CommitError {
    fn from(e: tokio::task::JoinError) -> Self {
        CommitError::Restored(e.into())
    }
}

/// A changed file written to its temp name, ready to be renamed into place.
struct Staged {
    tmp: PathBuf,
    live: PathBuf,
    /// Something was at `live` before: it is kept as a backup.
    existed: bool,
}

/// The directories holding `paths`, each once.
pub(super) fn dirs_of<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> BTreeSet<PathBuf> {
    paths
        .into_iter()
        .map(|p| atomic::parent(p).to_owned())
        .collect()
}

/// Writes a temp file for every changed file. On error, removes the temps
/// written so far: nothing is left behind.
fn stage_files(plan: &Plan, id: &str) -> Result<Vec<Staged>, FsError> {
    let mut staged: Vec<Staged> = Vec::new();
    for f in plan.files.iter().filter(|f| f.changed) {
        match atomic::write_temp(&f.path, id, &f.bytes, f.mode, f.uid, f.gid) {
            Ok(tmp) => staged.push(Staged {
                tmp,
                live: f.path.clone(),
                existed: f.existing.is_some(),
            }),
            Err(e) => {
                for s in &staged {
                    let _ = atomic::remove(&s.tmp);
                }
                return Err(e);
            }
        }
    }
    Ok(staged)
}

enum CommitError {
    /// The commit failed and every file is as it was.
    Restored(FsError),
    /// The commit failed and putting the previous files back failed too.
    NotRestored(FsError, FsError),
}

/// Keeps the current files as backups, renames the temps into place and
/// fsyncs the directories. On failure, undoes what was done.
fn commit(staged: Vec<Staged>, target: &str, id: &str) -> Result<Committed, CommitError> {
    let mut committed = Committed {
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: None,
    };
    let remove_temps = |from: usize| {
        for s in &staged[from..] {
            let _ = atomic::remove(&s.tmp);
        }
    };
    // Before any rename: drop every temp and backup this commit made.
    let abandon = |backup_dirs: &[PathBuf], e: FsError| {
        remove_temps(0);
        for d in backup_dirs {
            let _ = atomic::remove_tree(d);
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
        let kept =
            atomic::make_private_dir(&bdir).and_then(|()| atomic::keep_backup(&s.live, &backup));
        if let Err(e) = kept {
            return Err(abandon(&committed.backup_dirs, e));
        }
        backups.push(Some(backup));
    }
    for d in &committed.backup_dirs {
        if let Err(e) = atomic::fsync_dir(d) {
            return Err(abandon(&committed.backup_dirs, e));
        }
    }
    failpoint::hit("after-backup");
    for (i, (s, backup)) in staged.iter().zip(backups).enumerate() {
        if let Err(e) = atomic::rename(&s.tmp, &s.live) {
            remove_temps(i);
            return Err(match undo(&committed, id) {
                Ok(()) => CommitError::Restored(e),
                Err(r) => CommitError::NotRestored(e, r),
            });
        }
        committed.files.push((s.live.clone(), backup));
        if i + 1 < staged.len() {
            failpoint::hit("between-renames");
        }
    }
    for d in &dirs_of(staged.iter().map(|s| &s.live)) {
        if let Err(e) = atomic::fsync_dir(d) {
            return Err(match undo(&committed, id) {
                Ok(()) => CommitError::Restored(e),
                Err(r) => CommitError::NotRestored(e, r),
            });
        }
    }
    Ok(committed)
}

/// Puts the previous files back (a file that did not exist is removed),
/// fsyncs, and drops this deploy's backups.
pub(super) fn undo(committed: &Committed, id: &str) -> Result<(), FsError> {
    let mut first_err = None;
    for (live, backup) in committed.files.iter().rev() {
        let r = match backup {
            Some(b) => atomic::restore(b, live, id),
            None => atomic::remove(live),
        };
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
        failpoint::hit("during-rollback");
    }
    for d in &dirs_of(committed.files.iter().map(|(l, _)| l)) {
        if let Err(e) = atomic::fsync_dir(d) {
            first_err.get_or_insert(e);
        }
    }
    if let Some(s) = &committed.switch
        && let Err(e) = generations::unswitch(s, id)
    {
        first_err.get_or_insert(e);
    }
    if let Some(e) = first_err {
        // Keep the backups: they are what an operator needs now.
        return Err(e);
    }
    for d in &committed.backup_dirs {
        let _ = atomic::remove_tree(d);
    }
    Ok(())
}

/// Keeps the newest `keep` backup generations of `target` in each directory.
pub(super) fn prune(dirs: &BTreeSet<PathBuf>, target: &str, keep: usize) -> Result<(), FsError> {
    for dir in dirs {
        let ids = atomic::list_backups(dir, target)?;
        let excess = ids.len().saturating_sub(keep);
        for id in &ids[..excess] {
            atomic::remove_tree(&atomic::backup_dir(dir, target, id))?;
        }
    }
    Ok(())
}

fn describe_commit(c: &Committed) -> String {
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
