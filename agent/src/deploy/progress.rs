//! What a run tells while it goes: its state ([`Run`]), each stage as an
//! event to the caller and to watchers, a log line, a journal row (durable
//! when recovery would act on it) and the metrics; and its one `Done` event
//! with the report. The stages themselves are in `run` (deploy),
//! `rollback` and `recover`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::engine::{Engine, LastDeploy};
use super::error::DeployError;
use super::generations;
use super::plan::Plan;
use crate::atomic::{self, Fs, FsError};
use crate::bundle::{self, Bundle};
use crate::config::{Layout, Target};
use crate::failpoint;
use crate::journal::{self, FileRecord, Sync};
use crate::metrics::StageTimer;
use crate::model::event::{Event, FileSummary, Outcome, Report, Stage, Verification};
use crate::model::fmt::fmt_duration;
use crate::model::stage::Op;
use crate::sync::lock;
use crate::verify::served::{Attempt, Checks};

/// The state of one running deploy (or rollback).
pub(super) struct Run<'e> {
    pub(super) engine: &'e Engine,
    pub(super) id: String,
    pub(super) target: String,
    pub(super) sink: mpsc::UnboundedSender<Event>,
    pub(super) started: Instant,
    pub(super) warnings: Vec<String>,
    /// The certificate this run puts in place: (sha256, not_after, subject).
    pub(super) leaf: Option<(String, i64, String)>,
    /// Fires when a newer deploy waits for this target or the agent stops.
    pub(super) cancel: CancellationToken,
    pub(super) verification: Verification,
    /// What the last verification of this run found at each endpoint.
    pub(super) served: Option<Checks>,
    /// Leaf on `cert_path` when the run ended.
    pub(super) disk_sha256: String,
    /// Who asked, for the journal.
    pub(super) origin: String,
    /// `deploy` or `rollback`, for the journal.
    pub(super) op: Op,
    /// The run has a journal row (it took the lock and is past planning).
    pub(super) begun: bool,
    /// Recovery is finishing this run after a restart.
    pub(super) recovered: bool,
    /// Stage durations for the metrics.
    pub(super) timer: StageTimer,
    /// Something outside the files acts on them once committed (a validate
    /// or reload command, a verification) before the outcome is written:
    /// the `committed` row must be durable first. Conservatively true
    /// unless a deploy finds otherwise.
    pub(super) committed_acted_on: bool,
    /// Stop after the validate command (`--no-reload`).
    pub(super) no_reload: bool,
    /// Where the target's files are: one SFTP channel for the whole run
    /// of a remote target.
    pub(super) fs: Fs,
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
            op: Op::Deploy,
            begun: false,
            recovered: false,
            committed_acted_on: true,
            no_reload: false,
            fs: atomic::LOCAL,
        }
    }

    /// Records the run in the journal before any file is touched; a run
    /// that cannot be recorded does not start.
    pub(super) async fn begin_journal(
        &mut self,
        origin: &str,
        op: Op,
        files: &[FileRecord],
        prev_sha256: &str,
        inputs: &[(String, String)],
    ) -> Result<(), DeployError> {
        let cert = self
            .leaf
            .as_ref()
            .map(|(sha, _, _)| sha.clone())
            .unwrap_or_default();
        let begin = journal::Begin {
            id: &self.id,
            target: &self.target,
            op: op.as_str(),
            origin,
            files,
            cert_sha256: &cert,
            prev_sha256,
            inputs,
            no_reload: self.no_reload,
            host: &self.fs.host(),
        };
        tokio::task::block_in_place(|| self.engine.journal.begin(&begin))?;
        self.op = op;
        self.begun = true;
        Ok(())
    }

    /// Appends a stage to the run's journal row.
    pub(super) fn journal_stage(&self, stage: Stage, message: &str) {
        if !self.begun {
            return;
        }
        let sync = self.sync_of(stage);
        if let Err(e) = tokio::task::block_in_place(|| {
            self.engine
                .journal
                .stage(&self.id, stage.as_str(), message, sync)
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
    pub(super) fn sync_of(&self, stage: Stage) -> Sync {
        match stage {
            Stage::Staged | Stage::ValidateCommand | Stage::Reloaded | Stage::VerifyAttempt => {
                Sync::WithNext
            }
            Stage::Committed if !self.committed_acted_on => Sync::WithNext,
            _ => Sync::Now,
        }
    }

    pub(super) fn send(&self, event: Event) {
        // A client that hung up does not stop the deploy.
        let _ = self.sink.send(event.clone());
        let _ = self.engine.events.send(event);
    }

    pub(super) fn emit(
        &self,
        stage: Stage,
        message: String,
        files: Vec<FileSummary>,
        report: Option<Report>,
    ) {
        self.send(Event {
            files,
            report,
            ..Event::new(&self.id, &self.target, stage, message)
        });
    }

    pub(super) fn stage(&self, stage: Stage, message: impl Into<String>) {
        let message = message.into();
        info!(stage = stage.as_str(), "{message}");
        self.journal_stage(stage, &message);
        self.engine.metrics.stage_event(stage, &self.timer);
        self.emit(stage, message, Vec::new(), None);
    }

    pub(super) fn attempt(&self, a: &Attempt) {
        self.engine
            .metrics
            .verify_attempt(&self.target, a.check.ok(), a.check.reason);
        let message = a.describe();
        if a.check.ok() {
            info!(stage = Stage::VerifyAttempt.as_str(), served = %a.check.served_sha256, "{message}");
        } else {
            warn!(
                stage = Stage::VerifyAttempt.as_str(),
                reason = a.check.reason,
                "{message}"
            );
        }
        // Attempts of a rollback keep the run at stage "rollback": recovery
        // must put the previous files back, not complete the deploy.
        self.journal_stage(
            if a.rollback {
                Stage::Rollback
            } else {
                Stage::VerifyAttempt
            },
            &message,
        );
        self.send(Event {
            attempt: Some(a.clone()),
            ..Event::new(&self.id, &self.target, Stage::VerifyAttempt, message)
        });
    }

    /// Notes the leaf on disk at the end, for the report.
    /// What the target holds at the end of the run, for the report; read
    /// through the engine's [`crate::deployed::Deployed`], which status
    /// then finds up to date.
    pub(super) async fn look_at_disk(&mut self, target: &Target) {
        let (deployed, t) = (self.engine.deployed.clone(), target.clone());
        self.disk_sha256 = match tokio::task::spawn_blocking(move || deployed.refresh(&t)).await {
            Ok(seen) => match &*seen {
                crate::deployed::Seen::Leaf { sha256, .. } => sha256.clone(),
                _ => String::new(),
            },
            Err(_) => String::new(),
        };
    }

    /// Stage 10: closes the run and tells the caller ([`Self::close`],
    /// then the `Done` event).
    pub(super) fn finish(&mut self, outcome: Outcome, error: String, dry_run: bool) -> Report {
        let report = self.close(outcome, error, dry_run);
        self.done(&report);
        report
    }

    /// The run's report, logged, its outcome in the journal (durable) and
    /// in memory; the caller is not told yet ([`Self::done`]).
    pub(super) fn close(&mut self, outcome: Outcome, error: String, dry_run: bool) -> Report {
        let (cert_sha256, not_after, subject) = self.leaf.clone().unwrap_or_default();
        let report = Report {
            deploy_id: self.id.clone(),
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
                .and_then(Checks::decisive)
                .map(|c| c.served_sha256.clone())
                .unwrap_or_default(),
            served: self.served.take().map(|c| c.0).unwrap_or_default(),
        };
        let message = summary(&report);
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
            let finished = SystemTime::now();
            self.journal_finish(outcome, &error, &report, finished);
            lock(&self.engine.last).insert(
                self.target.clone(),
                Some(Arc::new(LastDeploy {
                    deploy_id: self.id.clone(),
                    outcome,
                    finished,
                    error,
                    cert_sha256,
                })),
            );
        }
        report
    }

    /// The `Done` event: the one the caller waits for, with `report`.
    pub(super) fn done(&self, report: &Report) {
        self.emit(
            Stage::Done,
            summary(report),
            Vec::new(),
            Some(report.clone()),
        );
    }

    /// Closes the run's journal row (or writes a closed one for a run that
    /// ended before it took the lock).
    pub(super) fn journal_finish(
        &self,
        outcome: Outcome,
        error: &str,
        report: &Report,
        finished: SystemTime,
    ) {
        failpoint::hit("before-finish");
        let finish = journal::Finish {
            outcome: outcome.as_str(),
            error,
            verification: report.verification.as_str(),
            disk_sha256: &report.disk_sha256,
            served_sha256: &report.served_sha256,
            recovered: self.recovered,
            finished,
        };
        let written = tokio::task::block_in_place(|| {
            if self.begun {
                self.engine.journal.finish(&self.id, &finish)
            } else {
                self.engine.journal.closed(
                    &journal::Begin {
                        id: &self.id,
                        target: &self.target,
                        op: self.op.as_str(),
                        origin: &self.origin,
                        files: &[],
                        cert_sha256: &report.cert_sha256,
                        prev_sha256: "",
                        inputs: &[],
                        no_reload: self.no_reload,
                        host: &self.fs.host(),
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

/// A finished run in one line, for its log line and its `Done` event:
/// `deployed in 4ms`, or the outcome with its error.
fn summary(report: &Report) -> String {
    if report.error.is_empty() {
        format!(
            "{} in {}",
            report.outcome.as_str(),
            fmt_duration(report.duration)
        )
    } else {
        format!("{}: {}", report.outcome.as_str(), report.error)
    }
}

/// The journal's view of a plan: every path that will be replaced, where
/// its temp and its backup go, and whether something was there; with the
/// generations layout, the paths still to become links and the `..data`
/// switch.
pub(super) fn journal_files(
    plan: &Plan,
    target: &Target,
    id: &str,
) -> Result<Vec<FileRecord>, FsError> {
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
pub(super) fn input_fingerprints(bundle: &Bundle) -> Vec<(String, String)> {
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

/// The hex SHA-256 of the leaf on `target`'s disk now, read off the async
/// threads: `Some("")` when there is no certificate file, `None` when what
/// is there cannot be read.
pub(super) async fn leaf_sha256(fs: &Fs, target: &Target) -> Option<String> {
    let (fs, t) = (fs.clone(), target.clone());
    tokio::task::spawn_blocking(move || crate::disk::leaf_on(&fs, &t))
        .await
        .ok()?
        .ok()
        .map(|leaf| leaf.map(|l| l.sha256_hex()).unwrap_or_default())
}
