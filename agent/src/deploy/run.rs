//! A deploy, in the order of its stages (docs/deploy.md): 1 check the
//! input, 2 plan, 3 lock, 4 journal, 5 stage, 6 commit, 7 validate,
//! 8 reload, 9 verify, 10 finish; rollback when 7, 8 or 9 fails.
//!
//! Guarantees: nothing beside the target is touched before the input has
//! been checked and the target locked; every file goes through
//! [`atomic`](crate::atomic) (temp, fsync, rename, directory fsync); the
//! validate command runs against the committed new files and a failure puts
//! the previous files back without a reload; a failed reload or a failed
//! verification puts them back, reloads again and verifies that the previous
//! certificate is served again. Every stage is reported as an [`Event`] to
//! the caller and to watchers, and the deploy ends with exactly one `Done`
//! event. The layout (in place or generations) is branched on once, at
//! stages 5 and 6.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};
use zeroize::Zeroizing;

use super::commit::{Committed, blocking, dirs_of};
use super::commit::{retire_excess, undo};
use super::engine::{Engine, Input, Request};
use super::error::{DeployError, ReloadFailed};
use super::generations;
use super::in_place;
use super::plan::{self, Plan, Policy};
use super::progress::Run;
use super::progress::{input_fingerprints, journal_files};
use crate::atomic::{self, FsError};
use crate::bundle::{self, Bundle, CheckOptions, Source};
use crate::command;
use crate::config::{Layout, Target, VerifyConfig};
use crate::disk::OnDisk;
use crate::failpoint;
use crate::keystore::{KeystoreConfig, StoreType};
use crate::lock::TargetGuard;
use crate::model::event::{
    Event, FileSummary, Outcome, Report, Stage, Verification, new_deploy_id,
};
use crate::model::fmt::{fmt_duration, rfc3339, short_hex};
use crate::model::stage::Op;
use crate::verify::served::{self as verify, Checks, Expect};

/// The bytes a deploy writes, computed once: the plan is resolved from
/// them under the lock (and also before it when the lock is held).
struct Outputs {
    files: Vec<plan::Output>,
    /// A keystore target's settings and password, for reading the
    /// keystore on disk.
    keystore: Option<(KeystoreConfig, Zeroizing<String>)>,
}

impl Engine {
    /// Runs one deploy to its end, sending each event to `sink` (and to
    /// watchers). Never panics on bad input; the returned report is the one
    /// carried by the final `Done` event.
    pub async fn deploy(&self, req: Request, sink: mpsc::UnboundedSender<Event>) -> Report {
        let id = new_deploy_id(SystemTime::now());
        let span = tracing::info_span!("deploy", target = %req.target.name, deploy_id = %id);
        let mut run = Run::new(self, id, &req.target.name, sink);
        run.origin.clone_from(&req.origin);
        run.fs = atomic::Fs::of(&req.target);
        async move {
            info!(origin = %req.origin, dry_run = req.dry_run, "deploy requested");
            // The lock is held until the outcome is in the journal: the
            // next run on the target starts after this one has ended there,
            // and the disk looked at below is this run's end state.
            let mut guard = None;
            let (outcome, error) = match run.execute(&req, &mut guard).await {
                Ok(outcome) => (outcome, String::new()),
                Err(e) => (e.outcome(), e.to_string()),
            };
            if !req.dry_run {
                run.look_at_disk(&req.target).await;
            }
            let report = run.close(outcome, error, req.dry_run);
            drop(guard);
            run.done(&report);
            self.metrics
                .deploy_finished(&req.target.name, report.outcome);
            report
        }
        .instrument(span)
        .await
    }
}

impl Run<'_> {
    /// The deploy up to its outcome; the target's lock, once taken, is
    /// left in `guard` for the caller to hold through the journal's outcome.
    async fn execute(
        &mut self,
        req: &Request,
        guard: &mut Option<TargetGuard>,
    ) -> Result<Outcome, DeployError> {
        let target = &req.target;
        self.no_reload = req.no_reload;

        // 1. Check the input.
        let bundle = self.check(req)?;
        self.leaf = Some((
            bundle.leaf.sha256_hex(),
            bundle.leaf.not_after,
            bundle.leaf.subject.clone(),
        ));

        // 2. Plan: the outputs are encoded once (a keystore too).
        let outputs = self.outputs(target, &bundle).await?;
        if req.dry_run {
            let plan = self.plan(target, &outputs).await?;
            self.planned(&plan);
            return Ok(Outcome::DryRun);
        }

        // 3. Lock, and plan once. A free lock is taken first and what is on
        // disk observed once, under it. A held one is waited for after the
        // plan is shown, and the same outputs are resolved again under it
        // (what is on disk may have changed meanwhile; pure, no encoding).
        let plan = match self.try_lock(target).await? {
            Some(held) => {
                *guard = Some(held);
                self.sweep_remote(target).await;
                let plan = self.plan(target, &outputs).await?;
                self.planned(&plan);
                self.locked(Duration::ZERO);
                plan
            }
            None => {
                let plan = self.plan(target, &outputs).await?;
                self.planned(&plan);
                *guard = Some(self.lock(target, req.no_wait).await?);
                self.sweep_remote(target).await;
                self.plan(target, &outputs).await?
            }
        };
        let plan = Arc::new(plan);
        drop(outputs);
        let verify = target
            .verify
            .as_ref()
            .filter(|_| !req.no_verify && !req.no_reload);
        if plan.is_noop() {
            return match verify {
                None => Ok(Outcome::Unchanged),
                Some(v) => self.verify_unchanged(target, v, &bundle).await,
            };
        }
        // What a rollback must find served again: the whole set, read only
        // when a rollback would verify it (and on a remote host, where what
        // the agent holds may be 30 s old).
        let previous = if verify.is_some() || target.is_remote() {
            self.previous(target).await
        } else {
            None
        };

        // 4. Journal: what this deploy will touch, before it touches it,
        // and the leaf it replaces (recovery tells it from a later change):
        // without a full read above, what the agent holds of it, which says
        // what a read would (one `stat`, `deployed`).
        let (files, held) = {
            let (plan, t, id) = (plan.clone(), target.clone(), self.id.clone());
            let deployed =
                (verify.is_none() && !target.is_remote()).then(|| self.engine.deployed().clone());
            blocking(move || {
                let files = journal_files(&plan, &t, &id)?;
                Ok::<_, FsError>((files, deployed.map(|d| d.leaf(&t))))
            })
            .await?
        };
        let inputs = input_fingerprints(&bundle);
        let prev_sha = match (&previous, held.as_deref()) {
            (Some(p), _) => p.leaf.sha256_hex(),
            (None, Some(crate::deployed::Seen::Leaf { sha256, .. })) => sha256.clone(),
            (None, _) => String::new(),
        };
        self.begin_journal(&req.origin, Op::Deploy, &files, &prev_sha, &inputs)
            .await?;
        self.committed_acted_on = !target.validate.is_empty()
            || (!req.no_reload && (target.reloads() || verify.is_some()));

        // 5 and 6. Stage and commit, in the target's layout.
        let committed = self.stage_and_commit(target, &plan).await?;
        failpoint::hit("after-commit");

        // 7 to 10.
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

    /// Stage 1: PEM parsed and checked, or a bundle checked earlier (a
    /// drop's) checked again for this target (its validity now and
    /// `verify.server_name`) without going back to PEM.
    fn check(&self, req: &Request) -> Result<Arc<Bundle>, DeployError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        // Every configured server name must be covered: the first here,
        // the others below.
        let names = req
            .target
            .verify
            .as_ref()
            .map(VerifyConfig::server_names)
            .unwrap_or_default();
        let opts = CheckOptions {
            now_unix: now,
            clock_skew_grace: req.clock_skew_grace,
            server_name: names.first().copied(),
        };
        let bundle = match &req.input {
            Input::Pem(files) => {
                let sources: Vec<Source<'_>> = files
                    .iter()
                    .map(|(name, pem)| Source { name, pem })
                    .collect();
                Arc::new(bundle::parse_and_check(&sources, &opts)?)
            }
            Input::Checked(bundle) => {
                bundle::check_against(bundle, &opts)?;
                bundle.clone()
            }
        };
        for name in names.iter().skip(1) {
            let opts = CheckOptions {
                server_name: Some(name),
                ..opts.clone()
            };
            bundle::check_against(&bundle, &opts)?;
        }
        let leaf = &bundle.leaf;
        self.stage(
            Stage::Validated,
            format!(
                "leaf {} sha256 {}, valid until {}, {} chain certificate(s), {} key",
                leaf.subject,
                short_hex(&leaf.sha256_hex()),
                rfc3339(leaf.not_after),
                bundle.chain.len(),
                bundle.key.algorithm()
            ),
        );
        Ok(bundle)
    }

    /// Stage 2, once per deploy: the bytes of every output (a keystore
    /// encoded, through keytool for JKS).
    async fn outputs(&self, target: &Target, bundle: &Bundle) -> Result<Outputs, DeployError> {
        match &target.keystore {
            None => Ok(Outputs {
                files: plan::outputs(target, bundle)
                    .map_err(|e| DeployError::Refused(e.to_string()))?,
                keystore: None,
            }),
            Some(ks) => {
                let (output, password) = self.keystore_output(target, ks, bundle).await?;
                Ok(Outputs {
                    files: vec![output],
                    keystore: Some((ks.clone(), password)),
                })
            }
        }
    }

    /// A keystore target's one output, encoded with the password read now
    /// (returned for reading the keystore on disk).
    async fn keystore_output(
        &self,
        target: &Target,
        ks: &KeystoreConfig,
        bundle: &Bundle,
    ) -> Result<(plan::Output, Zeroizing<String>), DeployError> {
        let source = ks.password.clone();
        let password = tokio::task::spawn_blocking(move || crate::keystore::read_password(&source))
            .await
            .map_err(|e| DeployError::Internal(e.to_string()))??;
        // PBKDF2 over the password: CPU work, off the async threads' queue.
        let (p12, digest) = tokio::task::block_in_place(|| {
            crate::keystore::pkcs12(bundle, &ks.alias, &password)
                .map(|b| (b, crate::keystore::bundle_digest(bundle, &ks.alias)))
        })?;
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
                .await?;
                plan::keystore_output(target, jks, None)
            }
        };
        Ok((output, password))
    }

    /// Stage 2's resolution: `outputs` against what is on disk now (pure
    /// but for observing the files).
    async fn plan(&self, target: &Target, outputs: &Outputs) -> Result<Plan, DeployError> {
        let files = outputs.files.clone();
        let paths: Vec<PathBuf> = files.iter().map(|o| o.path.clone()).collect();
        let linked = target.layout == Layout::Generations;
        let keystore = outputs.keystore.clone();
        let fs = self.fs.clone();
        let existing = blocking(move || {
            let mut existing = paths
                .iter()
                .map(|p| {
                    if linked {
                        generations::observe(p)
                    } else {
                        fs.observe(p)
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
        .await?;
        Ok(plan::plan(&Policy::of(target), files, existing))
    }

    /// Stage 2's event: what the plan will write.
    fn planned(&mut self, plan: &Plan) {
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
    }

    /// Stage 3 when the lock is free: the target's lock, or `None` when
    /// it is held (here or by another process). Reports nothing.
    async fn try_lock(&mut self, target: &Target) -> Result<Option<TargetGuard>, DeployError> {
        match self.engine.lock_target(&target.name, true).await {
            Ok((guard, cancel)) => {
                self.cancel = cancel;
                Ok(Some(guard))
            }
            Err(crate::lock::LockError::Busy { .. }) => Ok(None),
            Err(e) => Err(DeployError::from_lock(e)),
        }
    }

    /// A remote target's leftovers: not swept at start (an unreachable
    /// host must not hold it up), so what a killed run left there goes
    /// now, under the lock.
    async fn sweep_remote(&self, target: &Target) {
        if target.is_remote() {
            super::recover::sweep_dirs_of(&self.fs, target, super::recover::sweep_dirs(target))
                .await;
        }
    }

    /// Stage 3: takes the target's lock and reports how long that took.
    pub(super) async fn lock(
        &mut self,
        target: &Target,
        no_wait: bool,
    ) -> Result<TargetGuard, DeployError> {
        let waited = Instant::now();
        let (guard, cancel) = self
            .engine
            .lock_target(&target.name, no_wait)
            .await
            .map_err(DeployError::from_lock)?;
        self.cancel = cancel;
        self.locked(waited.elapsed());
        Ok(guard)
    }

    /// Stage 3's event: the lock is held, after waiting `waited`.
    fn locked(&self, waited: Duration) {
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
    }

    /// The certificate set on disk before this deploy; `None` when there is
    /// none or it cannot be read (then a rollback cannot verify it).
    async fn previous(&mut self, target: &Target) -> Option<OnDisk> {
        let (fs, t) = (self.fs.clone(), target.clone());
        match tokio::task::spawn_blocking(move || crate::disk::read_on(&fs, &t)).await {
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

    /// Stages 5 and 6, the one place the layout is branched on: in place,
    /// a temp per changed file then one rename each; with generations, a
    /// complete new generation then one switch of `..data`.
    async fn stage_and_commit(
        &mut self,
        target: &Target,
        plan: &Arc<Plan>,
    ) -> Result<Committed, DeployError> {
        if target.layout == Layout::Generations {
            return self.stage_and_switch(target, plan).await;
        }
        // 5. Stage.
        let temps = {
            let (fs, plan, id) = (self.fs.clone(), plan.clone(), self.id.clone());
            blocking(move || in_place::stage_files(&fs, &plan, &id)).await
        }
        .map_err(|source| DeployError::Fs {
            context: "staging failed, nothing changed",
            source,
        })?;
        self.stage(
            Stage::Staged,
            format!("{} temp file(s) written and synced", temps.len()),
        );
        // 6. Commit.
        let committed = {
            let (fs, id, name) = (self.fs.clone(), self.id.clone(), target.name.clone());
            blocking(move || in_place::commit(fs, temps, &name, &id)).await
        }
        .map_err(|e| match e {
            in_place::CommitError::Restored(source) => DeployError::Fs {
                context: "commit failed, previous files restored",
                source,
            },
            in_place::CommitError::NotRestored(e, r) => DeployError::RollbackFailed(format!(
                "commit failed ({e}) and restoring the previous files failed too: {r}"
            )),
        })?;
        self.stage(Stage::Committed, in_place::describe_commit(&committed));
        Ok(committed)
    }

    /// Stages 5 and 6 of the generations layout: a complete new
    /// generation, then one switch of `..data`.
    async fn stage_and_switch(
        &mut self,
        target: &Target,
        plan: &Arc<Plan>,
    ) -> Result<Committed, DeployError> {
        let dir = atomic::parent(&target.cert_path).to_owned();
        let generation = {
            let (plan, dir, id) = (plan.clone(), dir.clone(), self.id.clone());
            blocking(move || generations::stage(&plan, &dir, &id)).await
        }
        .map_err(|e| DeployError::Internal(format!("staging failed, nothing changed: {e}")))?;
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
            DeployError::Internal(format!(
                "switching to the new generation failed, the previous one is in force: {e}"
            ))
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
    ) -> Result<Outcome, DeployError> {
        // 7. Validate against the new files.
        if !target.validate.is_empty() {
            match self.validate(target).await {
                Ok(()) => {}
                Err(e) => {
                    let first = committed.created_everything();
                    self.stage(
                        Stage::Rollback,
                        if first {
                            "there was no previous certificate: removing the new files (no reload)"
                        } else {
                            "restoring the previous files (no reload)"
                        },
                    );
                    return Err(match self.undo(committed).await {
                        Ok(()) if first => DeployError::ValidateFailed(format!(
                            "{e}; there was no previous certificate: the new files were removed \
                             and the server was not reloaded"
                        )),
                        Ok(()) => DeployError::ValidateFailed(format!(
                            "{e}; the previous files are back in place and the server was not reloaded"
                        )),
                        Err(r) => DeployError::RollbackFailed(format!(
                            "{e}; restoring the previous files failed: {r}"
                        )),
                    });
                }
            }
        }

        if self.no_reload {
            // Installed for a server that is not running: it loads these
            // files when it starts. Nothing to reload, nothing to verify.
            let w = "not reloaded and not verified (--no-reload): the server loads the new \
                     files when it starts or is next reloaded"
                .to_owned();
            warn!("{w}");
            self.warnings.push(w);
        } else {
            // 8. Reload.
            match self.reload(target).await {
                Ok(Some(done)) => self.stage(Stage::Reloaded, done),
                Ok(None) => {}
                Err(e) => {
                    return Err(self
                        .roll_back(target, committed, previous, e.to_string(), verify)
                        .await);
                }
            }

            // 9. Verify.
            if let (Some(v), Some(expect)) = (verify, expect) {
                match self.verify(v, expect, false).await {
                    Ok(_) => self.verification = Verification::Verified,
                    Err(check) => {
                        let why = format!(
                            "verification failed after {} attempt(s): {}",
                            v.attempts,
                            check.error()
                        );
                        return Err(self
                            .roll_back(target, committed, previous, why, verify)
                            .await);
                    }
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
        let fs = committed.fs.clone();
        let pruned = blocking(move || {
            let doomed = retire_excess(&fs, &dirs, &name, keep)?;
            if let Some(dir) = &gens {
                generations::prune(dir, keep)?;
            }
            crate::failpoint::hit("after-retire");
            Ok::<_, FsError>(doomed)
        })
        .await;
        match pruned {
            // Retention holds now (the excess sets are gone from their
            // names); freeing their blocks (slow on a `discard` mount)
            // goes on after the caller is told, without the lock.
            Ok(doomed) if !doomed.is_empty() => {
                tokio::task::spawn_blocking(move || {
                    for d in doomed {
                        if let Err(e) = atomic::remove_retired(&d) {
                            warn!("could not remove an old backup set: {e}");
                        }
                    }
                });
            }
            Ok(_) => {}
            Err(e) => {
                let w = format!("could not prune old backups: {e}");
                warn!("{w}");
                self.warnings.push(w);
            }
        }
        drop(committed);
        Ok(Outcome::Deployed)
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
        let out = match &self.fs {
            atomic::Fs::Local => command::run(&spec).await,
            // The connection may have to be made again: off the async
            // threads, like every other step on that host.
            atomic::Fs::Remote(r) => match blocking({
                let r = r.clone();
                move || r.session()
            })
            .await
            {
                Ok(session) => command::run_remote(session, &spec).await,
                Err(source) => Err(command::CommandError::Spawn {
                    purpose: purpose.to_owned(),
                    program: command::display_argv(argv),
                    hint: " (over SSH)",
                    source,
                }),
            },
        };
        self.engine
            .metrics
            .command_finished(purpose, started.elapsed());
        Ok(out?.duration)
    }

    /// Stage 7's action: the target's validate command against the files
    /// in place, reported as its stage; `Ok` too when there is none.
    pub(super) async fn validate(&self, target: &Target) -> Result<(), command::CommandError> {
        if target.validate.is_empty() {
            return Ok(());
        }
        let took = self
            .run_command(target, "validate", &target.validate)
            .await?;
        self.stage(
            Stage::ValidateCommand,
            format!(
                "`{}` ok ({})",
                command::display_argv(&target.validate),
                fmt_duration(took)
            ),
        );
        Ok(())
    }

    /// Stage 8's action: the target's reload hook, else its reload
    /// command. `Ok(None)`: the target has neither; `Ok(Some(line))`: what
    /// was done, for the stage message; `Err`: why it failed.
    pub(super) async fn reload(&self, target: &Target) -> Result<Option<String>, ReloadFailed> {
        if let Some(hook) = &target.reload_hook {
            let started = Instant::now();
            let dir = atomic::parent(&target.cert_path).to_owned();
            let generation = blocking(move || generations::current(&dir))
                .await
                .ok()
                .flatten();
            return match hook
                .run(target.command_timeout, generation.as_deref())
                .await
            {
                Ok(done) => Ok(Some(format!(
                    "{done} ({})",
                    fmt_duration(started.elapsed())
                ))),
                Err(e) => Err(ReloadFailed::Hook(e)),
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
            Err(e) => Err(ReloadFailed::Command(e)),
        }
    }

    /// Probes `v` until `expect` is served (stage 9), reporting each
    /// attempt. The last check is recorded for `certctl status`.
    pub(super) async fn verify(
        &mut self,
        v: &VerifyConfig,
        expect: &Expect,
        rollback: bool,
    ) -> Result<Checks, Checks> {
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

    /// The files already hold this certificate: make sure it is served. If
    /// it is not (a reload was missed), reload and look again.
    async fn verify_unchanged(
        &mut self,
        target: &Target,
        v: &VerifyConfig,
        bundle: &Bundle,
    ) -> Result<Outcome, DeployError> {
        let expect = Expect::of(v, &bundle.leaf, &bundle.chain);
        let first = verify::check_now(v, &expect).await;
        if first.ok() {
            self.stage(
                Stage::VerifyAttempt,
                format!(
                    "the files already hold this certificate and {} {} it ({} matching handshakes in a row)",
                    v.addresses(),
                    if v.endpoints.len() == 1 { "serves" } else { "serve" },
                    v.consecutive
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
                    first.error()
                ),
            );
        } else {
            match self.reload(target).await {
                Ok(done) => self.stage(
                    Stage::Reloaded,
                    format!(
                        "the files already hold this certificate, but {}: reloaded: {}",
                        first.error(),
                        done.unwrap_or_default()
                    ),
                ),
                Err(e) => {
                    return Err(DeployError::Internal(format!(
                        "the files already hold this certificate, but {}; reloading failed: {e}",
                        first.error()
                    )));
                }
            }
        }
        match self.verify(v, &expect, false).await {
            Ok(_) => {
                self.verification = Verification::Verified;
                Ok(Outcome::Deployed)
            }
            Err(check) => Err(DeployError::Internal(format!(
                "the files already hold this certificate, but it is not served: {}; \
                     check that the server reads {}",
                check.error(),
                target.cert_path.display()
            ))),
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
    ) -> DeployError {
        let first = committed.created_everything();
        self.stage(
            Stage::Rollback,
            match (first, target.reloads()) {
                (true, _) => "there was no previous certificate: removing the new files",
                (false, true) => "restoring the previous files and reloading",
                (false, false) => "restoring the previous files",
            },
        );
        if let Err(r) = self.undo(committed).await {
            return DeployError::RollbackFailed(format!(
                "{why}; restoring the previous files failed: {r}; the backups are kept in {}",
                atomic::parent(&atomic::backup_dir(
                    atomic::parent(&target.cert_path),
                    &target.name,
                    &self.id
                ))
                .display()
            ));
        }
        if first {
            return self.rolled_back_first(target, why).await;
        }
        if let Err(r) = self.reload(target).await {
            return DeployError::RollbackFailed(format!(
                "{why}; the previous files are back on disk but reloading them failed: {r}"
            ));
        }
        let (Some(v), Some(previous)) = (verify, previous) else {
            let what = if previous.is_none() && verify.is_some() {
                "there was no previous certificate: the new files were removed"
            } else if !target.reloads() {
                "the previous files are in place (not verified: no verify endpoint)"
            } else {
                "the previous files are in place and were reloaded (not verified: no verify endpoint)"
            };
            return DeployError::RolledBack(format!("{why}; rolled back: {what}"));
        };
        let expect = Expect::of(v, &previous.leaf, &previous.chain);
        match self.verify(v, &expect, true).await {
            Ok(_) => DeployError::RolledBack(format!(
                "{why}; rolled back: the previous certificate {} is on disk and {} {} it again",
                short_hex(&expect.leaf_sha256),
                v.addresses(),
                if v.endpoints.len() == 1 {
                    "serves"
                } else {
                    "serve"
                }
            )),
            Err(check) => DeployError::RollbackFailed(format!(
                "{why}; the previous files are back on disk (leaf {}) but {}",
                short_hex(&expect.leaf_sha256),
                check.error()
            )),
        }
    }

    /// The end of a rollback of a first deploy: the new files are gone and
    /// the target is exactly as before, empty. The server is reloaded so it
    /// lets go of anything it loaded of them; when that reload fails the
    /// server is most likely not running (it could not start without a
    /// certificate): still `rolled_back`, since nothing of the deploy is
    /// left and nothing that was there before is lost, with the way to
    /// install a first certificate.
    async fn rolled_back_first(&mut self, target: &Target, why: String) -> DeployError {
        let base = "there was no previous certificate: the new files were removed";
        if !target.reloads() {
            return DeployError::RolledBack(format!("{why}; rolled back: {base}"));
        }
        match self.reload(target).await {
            Ok(_) => DeployError::RolledBack(format!(
                "{why}; rolled back: {base} and the server was reloaded without them"
            )),
            Err(r) => DeployError::RolledBack(format!(
                "{why}; rolled back: {base}; reloading the server without them failed too ({r}): \
                 it is probably not running. To install the first certificate of a server that \
                 is not running, deploy with --no-reload, then start the server"
            )),
        }
    }

    /// Puts the previous files back; what had to be tightened on the way
    /// (a private key restored without its "other" bits) joins the run's
    /// warnings.
    pub(super) async fn undo(&mut self, committed: Committed) -> Result<(), FsError> {
        let id = self.id.clone();
        let warnings = blocking(move || undo(&committed, &id)).await?;
        self.warnings.extend(warnings);
        Ok(())
    }
}
