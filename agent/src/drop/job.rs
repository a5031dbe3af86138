//! One taken drop, from read to its final outcome: the jobs the event
//! loop ([`runner`](super::runner)) starts.
//!
//! A deploy job reads the taken drop (as untrusted input, a few at a time),
//! checks it, deploys the normalized set to every target of its name in
//! parallel through [`Engine::deploy`](crate::deploy::Engine::deploy), waits
//! for every deploy to reach a terminal outcome, and only then removes the
//! drop, or moves it to `rejected/` with a reason file naming each target's
//! result. A supersede job moves an older drop aside. Every path ends in
//! exactly one final record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use nix::errno::Errno;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::error;

use super::names::{self, Entry};
use super::record::{self, DropOutcome, Info, TargetResult};
use super::reject::{Dirs, MoveError, Reason};
use super::scan::{self, Expect, Form, Owners, Problem, ReadError};
use super::settle::backoff;
use super::{INCOMPLETE_LIMIT, fmt_limit};
use crate::app::App;
use crate::bundle::{self, BundleError, CheckOptions, Source};
use crate::config::{Config, Target};
use crate::deploy::{Input, Outcome, Request};
use crate::model::fmt::{short_hex, shown};

/// How many drops are read and checked at once: bounds the memory that
/// raw drop contents can take (each at most 1 MiB) however many arrive.
const CONCURRENT_READS: usize = 4;

/// State shared by the loop and its jobs.
pub(super) struct Ctx {
    pub shared: Arc<App>,
    pub dirs: Dirs,
    reads: Semaphore,
}

impl Ctx {
    pub fn new(shared: Arc<App>, dirs: Dirs) -> Self {
        Self {
            shared,
            dirs,
            reads: Semaphore::new(CONCURRENT_READS),
        }
    }

    pub fn public(&self, entry: &str) -> PathBuf {
        self.dirs.root().join(self.dirs.on_disk(entry))
    }

    /// The public path of `entry`, as shown (escaped).
    pub fn shown(&self, entry: &str) -> String {
        shown(&self.public(entry))
    }

    /// Waits the back-off of the `attempt`-th retry; false (at once) when
    /// the agent is stopping.
    pub async fn back_off(&self, attempt: u32) -> bool {
        let mut stop = self.shared.shutdown_signal();
        if *stop.borrow() {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(attempt)) => !*stop.borrow(),
            _ = stop.changed() => false,
        }
    }

    pub fn emit(&self, info: &Info, message: &str) {
        record::record(&self.shared.engine, &self.shared.drops, info, message);
    }
}

/// What a job does with the drop it took.
#[derive(Debug, Clone)]
pub(super) enum Kind {
    /// Check and deploy it; holds its drop name until done.
    Deploy { incomplete_expired: bool },
    /// Move it aside: a newer drop of its name (`by` says which) won.
    Supersede { by: String },
    /// Move it aside: its entry is not a drop name. Never claimed (a long
    /// name would not fit the claimed name): `claimed` is the entry.
    InvalidName,
}

/// One taken drop.
#[derive(Debug, Clone)]
pub(super) struct Job {
    /// The public entry it was taken from.
    pub entry: String,
    /// Its name in the drop directory now.
    pub claimed: String,
    pub kind: Kind,
}

impl Job {
    /// The drop name whose slot this job holds.
    pub fn slot(&self) -> Option<String> {
        match self.kind {
            Kind::Deploy { .. } => {
                names::classify(self.entry.as_ref()).and_then(|e| e.name().map(str::to_owned))
            }
            Kind::Supersede { .. } | Kind::InvalidName => None,
        }
    }
}

/// The form of the drop now at `name` in the drop directory or, when it
/// is gone, the form its public `entry` name promises.
pub(super) fn form_of(ctx: &Ctx, name: &str, entry: &str) -> Form {
    scan::form(ctx.dirs.drop_fd(), ctx.dirs.on_disk(name).as_os_str()).unwrap_or_else(|| {
        match names::classify(entry.as_ref()) {
            Some(Entry::Bundle { .. }) => Form::File,
            Some(Entry::Directory { .. }) => Form::Directory,
            _ => Form::Other,
        }
    })
}

/// The drop name of `entry` and the targets that take it.
pub(super) fn targets_of(config: &Config, entry: &str) -> (Option<String>, Vec<String>) {
    let name = names::classify(entry.as_ref()).and_then(|e| e.name().map(str::to_owned));
    let targets = name
        .as_deref()
        .map(|n| config.targets_for_drop(n).map(|t| t.name.clone()).collect())
        .unwrap_or_default();
    (name, targets)
}

/// The target-independent input checks of a deploy (a target's
/// `verify.server_name` is checked by its own deploy).
pub(super) fn check(
    contents: &scan::Contents,
    config: &Config,
) -> Result<bundle::Bundle, BundleError> {
    let sources: Vec<Source<'_>> = contents
        .files
        .iter()
        .map(|(name, pem)| Source { name, pem })
        .collect();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    bundle::parse_and_check(
        &sources,
        &CheckOptions {
            now_unix: now,
            clock_skew_grace: config.agent.clock_skew_grace,
            server_name: None,
        },
    )
}

/// A set that may still become complete: a key or certificate missing, or
/// a key whose certificate has not arrived.
pub(super) fn is_incomplete(e: &BundleError) -> bool {
    matches!(
        e,
        BundleError::NoKey { .. }
            | BundleError::NoCertificate { .. }
            | BundleError::KeyMismatch { .. }
    )
}

/// Runs `job` to its final record.
pub(super) async fn run(ctx: &Arc<Ctx>, job: &Job) {
    match &job.kind {
        Kind::Deploy { incomplete_expired } => deploy_job(ctx, job, *incomplete_expired).await,
        Kind::Supersede { by } => supersede_job(ctx, job, by).await,
        Kind::InvalidName => invalid_job(ctx, job).await,
    }
}

/// What reading and checking a taken drop gave.
enum Checked {
    Ok {
        /// Parsed and checked once; each target's deploy checks it for
        /// itself without going back to PEM.
        bundle: Arc<bundle::Bundle>,
        sha256: String,
        subject: String,
    },
    Gone,
    Rejected {
        code: String,
        problem: String,
    },
    /// Reading failed for a transient reason (e.g. no descriptors left):
    /// not the drop's fault, read it again later.
    Transient(String),
}

async fn read_and_check(
    ctx: &Arc<Ctx>,
    job: &Job,
    expect: Expect,
    incomplete_expired: bool,
) -> Checked {
    // Never closed: acquiring only fails if it were.
    let _permit = ctx.reads.acquire().await.ok();
    let ctx2 = ctx.clone();
    let claimed = job.claimed.clone();
    let public = ctx.public(&job.entry);
    tokio::task::spawn_blocking(move || {
        let config = ctx2.shared.config();
        let owners = Owners::resolve(&config.agent.drop_owners);
        let contents = match scan::read(
            ctx2.dirs.drop_fd(),
            &claimed,
            &public,
            expect,
            &owners,
            &scan::LIMITS,
        ) {
            Ok(c) => c,
            Err(ReadError::Gone) => return Checked::Gone,
            Err(ReadError::Problem(p)) if p.is_transient() => {
                return Checked::Transient(p.to_string());
            }
            Err(ReadError::Problem(p)) => {
                let (code, problem) = problem_verdict(&p, incomplete_expired);
                return Checked::Rejected { code, problem };
            }
        };
        match check(&contents, &config) {
            Ok(b) => Checked::Ok {
                sha256: b.leaf.sha256_hex(),
                subject: b.leaf.subject.clone(),
                bundle: Arc::new(b),
            },
            Err(e) => {
                let (code, problem) = bundle_verdict(&e, incomplete_expired);
                Checked::Rejected { code, problem }
            }
        }
    })
    .await
    .unwrap_or_else(|e| Checked::Rejected {
        code: "unreadable".to_owned(),
        problem: format!("reading the drop failed: {e}"),
    })
}

/// Reason code and problem line of a drop that could not be read. A
/// directory that was still being filled when its wait expired is
/// "incomplete", whatever the last read saw.
fn problem_verdict(p: &Problem, incomplete_expired: bool) -> (String, String) {
    if incomplete_expired && p.may_settle() {
        ("incomplete".to_owned(), stayed_incomplete(p))
    } else {
        (p.code().to_owned(), p.to_string())
    }
}

/// Reason code and problem line of a drop whose input failed a check.
fn bundle_verdict(e: &BundleError, incomplete_expired: bool) -> (String, String) {
    if incomplete_expired && is_incomplete(e) {
        ("incomplete".to_owned(), stayed_incomplete(e))
    } else {
        (e.reason().to_owned(), e.to_string())
    }
}

fn stayed_incomplete(why: &dyn std::fmt::Display) -> String {
    format!(
        "the directory stayed incomplete and unchanged for {}: {why}",
        fmt_limit(INCOMPLETE_LIMIT)
    )
}

async fn deploy_job(ctx: &Arc<Ctx>, job: &Job, incomplete_expired: bool) {
    let config = ctx.shared.config();
    let public = ctx.public(&job.entry);
    let form = form_of(ctx, &job.claimed, &job.entry);
    let entry = names::classify(job.entry.as_ref());
    let name = entry.as_ref().and_then(|e| e.name().map(str::to_owned));
    let targets: Vec<Target> = name
        .as_deref()
        .map(|n| config.targets_for_drop(n).cloned().collect())
        .unwrap_or_default();
    let mut info = Info::new(
        name.as_deref(),
        public.clone(),
        form,
        DropOutcome::Accepted,
        targets.iter().map(|t| t.name.clone()).collect(),
    );

    let expect = match entry {
        Some(Entry::Bundle { .. }) => Expect::File,
        Some(Entry::Directory { .. }) => Expect::Directory,
        Some(Entry::Invalid) | None => {
            let p = Problem::InvalidName {
                shown: shown(&public),
            };
            reject(ctx, job, info, p.code(), &p.to_string(), "").await;
            return;
        }
    };
    if targets.is_empty() {
        let name = name.unwrap_or_default();
        let mut drops: Vec<&str> = config.targets.iter().map(|t| t.drop.as_str()).collect();
        drops.sort_unstable();
        drops.dedup();
        let known = if drops.is_empty() {
            "no target is configured".to_owned()
        } else {
            format!("drop names taken: {}", drops.join(", "))
        };
        let problem = format!(
            "no target takes drop \"{name}\" ({known}): add drop = \"{name}\" (or name = \"{name}\") \
             to a [[target]] in {}, reload the agent (systemctl reload certctl-agent) and drop it again",
            config.path.display()
        );
        reject(ctx, job, info, "unknown_target", &problem, "").await;
        return;
    }

    let mut attempt = 0;
    let checked = loop {
        match read_and_check(ctx, job, expect, incomplete_expired).await {
            Checked::Transient(why) => {
                tracing::warn!(
                    target = %info.targets.join(","),
                    drop = %shown(&public),
                    "{} could not be read ({why}); it stays in the drop directory as {} and is \
                     read again in {}",
                    shown(&public),
                    ctx.shown(&job.claimed),
                    crate::model::fmt::fmt_duration(backoff(attempt))
                );
                if !ctx.back_off(attempt).await {
                    stopped(ctx, job, info, &why);
                    return;
                }
                attempt += 1;
            }
            c => break c,
        }
    };
    let (bundle, sha256, subject) = match checked {
        Checked::Ok {
            bundle,
            sha256,
            subject,
        } => (bundle, sha256, subject),
        Checked::Gone => {
            info.outcome = DropOutcome::Withdrawn;
            info.reason = "withdrawn".to_owned();
            let message = format!(
                "{} withdrawn: the taken drop ({}) was removed by someone else before it was read",
                shown(&public),
                crate::model::fmt::escape(job.claimed.as_bytes())
            );
            ctx.emit(&info, &message);
            return;
        }
        Checked::Rejected { code, problem } => {
            reject(ctx, job, info, &code, &problem, "").await;
            return;
        }
        Checked::Transient(_) => unreachable!("retried above"),
    };
    info.cert_sha256 = sha256.clone();
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    ctx.emit(
        &info,
        &format!(
            "{} accepted: leaf {subject} sha256 {}; deploying to {}",
            shown(&public),
            short_hex(&sha256),
            names.join(", ")
        ),
    );

    // Deploys to every target of the name, in parallel, each to its end.
    let mut set = JoinSet::new();
    for (i, target) in targets.iter().enumerate() {
        let shared = ctx.shared.clone();
        let req = Request {
            target: target.clone(),
            input: Input::Checked(bundle.clone()),
            dry_run: false,
            no_verify: false,
            no_reload: false,
            no_wait: false,
            origin: format!("drop {}", shown(&public)),
            clock_skew_grace: config.agent.clock_skew_grace,
        };
        set.spawn(async move {
            // Nobody reads this run's events here: watchers get them from
            // the engine's broadcast, and the report names the run.
            let (tx, _) = mpsc::unbounded_channel();
            let name = req.target.name.clone();
            let report = shared.engine.deploy(req, tx).await;
            let deploy_id = report.deploy_id.clone();
            (
                i,
                TargetResult {
                    target: name,
                    deploy_id,
                    outcome: report.outcome,
                    error: report.error,
                },
            )
        });
    }
    drop(bundle);
    let mut results: Vec<(usize, TargetResult)> = Vec::with_capacity(targets.len());
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            Err(e) => error!(drop = %shown(&public), "a deploy task failed: {e}"),
        }
    }
    // A deploy task that died still gets a result.
    for (i, t) in targets.iter().enumerate() {
        if !results.iter().any(|(j, _)| *j == i) {
            results.push((
                i,
                TargetResult {
                    target: t.name.clone(),
                    deploy_id: String::new(),
                    outcome: Outcome::Internal,
                    error: "the deploy task ended unexpectedly: see the agent's log".to_owned(),
                },
            ));
        }
    }
    results.sort_by_key(|(i, _)| *i);
    info.results = results.into_iter().map(|(_, r)| r).collect();

    let ok = info
        .results
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Deployed | Outcome::Unchanged));
    let summary = info
        .results
        .iter()
        .map(|r| format!("{} {}", r.target, r.outcome.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    if ok {
        let dirs_ctx = ctx.clone();
        let claimed = job.claimed.clone();
        let removed = tokio::task::spawn_blocking(move || dirs_ctx.dirs.remove_taken(&claimed))
            .await
            .unwrap_or_else(|e| {
                Err(MoveError {
                    op: "remove",
                    path: PathBuf::from(e.to_string()),
                    errno: Errno::EIO,
                })
            });
        match removed {
            Ok(()) => {
                info.outcome = DropOutcome::Removed;
                let message = format!("{} removed after deploying: {summary}", shown(&public));
                ctx.emit(&info, &message);
            }
            Err(e) => {
                info.outcome = DropOutcome::Failed;
                info.reason = "cannot_remove".to_owned();
                let message = format!(
                    "{}: {summary}, but removing the drop failed: {e}; it stays as {}, and the \
                     next start deploys it again (unchanged)",
                    shown(&public),
                    ctx.shown(&job.claimed)
                );
                ctx.emit(&info, &message);
            }
        }
    } else {
        let failed: Vec<&str> = info
            .results
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::Deployed | Outcome::Unchanged))
            .map(|r| r.target.as_str())
            .collect();
        let problem = format!(
            "the deploy to {} did not succeed ({summary})",
            failed.join(", ")
        );
        reject(
            ctx,
            job,
            info,
            "deploy_failed",
            &problem,
            "see each target's result, the agent's log and `certctl status`; fix the cause (e.g. \
             the validate or reload command), then drop the certificate again",
        )
        .await;
    }
}

async fn supersede_job(ctx: &Arc<Ctx>, job: &Job, by: &str) {
    let config = ctx.shared.config();
    let (name, targets) = targets_of(&config, &job.entry);
    let public = ctx.public(&job.entry);
    let form = form_of(ctx, &job.claimed, &job.entry);
    let info = Info::new(
        name.as_deref(),
        public,
        form,
        DropOutcome::Superseded,
        targets,
    );
    let problem = format!("a newer drop for the same name ({by}) was taken instead");
    reject(
        ctx,
        job,
        info,
        "superseded",
        &problem,
        "nothing, if the newer drop is the one you meant; otherwise move this one back",
    )
    .await;
}

async fn invalid_job(ctx: &Arc<Ctx>, job: &Job) {
    let public = ctx.public(&job.entry);
    let form = form_of(ctx, &job.claimed, &job.entry);
    let info = Info::new(
        None,
        public.clone(),
        form,
        DropOutcome::Rejected,
        Vec::new(),
    );
    let p = Problem::InvalidName {
        shown: shown(&public),
    };
    reject(ctx, job, info, p.code(), &p.to_string(), "").await;
}

/// Moves the taken drop to `rejected/` with a reason file and records it
/// (as `info.outcome` when that is `Superseded`, else as `Rejected`).
async fn reject(
    ctx: &Arc<Ctx>,
    job: &Job,
    mut info: Info,
    code: &str,
    problem: &str,
    remedy: &str,
) {
    if info.outcome != DropOutcome::Superseded {
        info.outcome = DropOutcome::Rejected;
    }
    info.reason = code.to_owned();
    let remedy = if remedy.is_empty() {
        remedy_for(code)
    } else {
        remedy.to_owned()
    };
    let (claimed, entry) = (job.claimed.clone(), job.entry.clone());
    let reason_info = info.clone();
    let problem_text = problem.to_owned();
    let now = SystemTime::now();
    let render = move |dst: &std::path::Path| {
        let results: Vec<(String, String, String, String)> = reason_info
            .results
            .iter()
            .map(|r| {
                (
                    r.target.clone(),
                    r.outcome.as_str().to_owned(),
                    r.deploy_id.clone(),
                    r.error.clone(),
                )
            })
            .collect();
        Reason {
            public_path: &reason_info.path,
            form: reason_info.form.as_str(),
            moved_to: dst,
            when: now,
            targets: &reason_info.targets,
            code: &reason_info.reason,
            problem: &problem_text,
            results: &results,
            remedy: &remedy,
        }
        .render()
    };
    let render = Arc::new(render);
    let public = shown(&info.path);
    let mut attempt = 0;
    loop {
        let (ctx2, claimed, entry, render) =
            (ctx.clone(), claimed.clone(), entry.clone(), render.clone());
        let moved = tokio::task::spawn_blocking(move || {
            ctx2.dirs
                .move_aside(&claimed, &entry, now, |dst| render(dst))
        })
        .await
        .unwrap_or_else(|e| {
            Err(MoveError {
                op: "move to rejected/",
                path: PathBuf::from(e.to_string()),
                errno: Errno::EIO,
            })
        });
        match moved {
            Ok(moved) => {
                let what = if info.outcome == DropOutcome::Superseded {
                    "superseded".to_owned()
                } else {
                    format!("rejected ({code})")
                };
                let message = format!(
                    "{public} {what}: {}; moved to {} (reason in {})",
                    crate::model::fmt::one_line(problem),
                    shown(&moved.path),
                    shown(&moved.reason_path)
                );
                info.rejected_path = Some(moved.path);
                ctx.emit(&info, &message);
                let ctx2 = ctx.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    super::prune(&ctx2.dirs, &ctx2.shared.config());
                })
                .await;
                return;
            }
            Err(e) if scan::is_transient(e.errno) => {
                tracing::warn!(
                    target = %info.targets.join(","),
                    drop = %public,
                    "{public} was not deployed ({code}), and moving it to {} failed: {e}; it \
                     stays in the drop directory as {} and the move is tried again in {}",
                    shown(ctx.dirs.rejected_path()),
                    ctx.shown(&job.claimed),
                    crate::model::fmt::fmt_duration(backoff(attempt))
                );
                if !ctx.back_off(attempt).await {
                    failed_move(ctx, job, info, code, problem, &e.to_string());
                    return;
                }
                attempt += 1;
            }
            Err(e) => {
                failed_move(ctx, job, info, code, problem, &e.to_string());
                return;
            }
        }
    }
}

/// The agent stopped while a transient failure was being waited out: the
/// drop stays taken in the drop directory for the next start.
fn stopped(ctx: &Ctx, job: &Job, mut info: Info, why: &str) {
    info.outcome = DropOutcome::Failed;
    info.reason = "unreadable".to_owned();
    let message = format!(
        "{} was not read ({why}) before the agent stopped; it stays in the drop directory as {} \
         and is handled again at the next start",
        shown(&info.path),
        ctx.shown(&job.claimed)
    );
    ctx.emit(&info, &message);
}

fn failed_move(ctx: &Ctx, job: &Job, mut info: Info, code: &str, problem: &str, error: &str) {
    info.outcome = DropOutcome::Failed;
    info.reason = "cannot_move".to_owned();
    let message = format!(
        "{} was not deployed ({code}: {}) and moving it to {} failed: {error}; it stays in the \
         drop directory as {} (no reason file was left in {}) and is handled again at the next \
         start",
        shown(&info.path),
        crate::model::fmt::one_line(problem),
        shown(ctx.dirs.rejected_path()),
        ctx.shown(&job.claimed),
        shown(ctx.dirs.rejected_path()),
    );
    ctx.emit(&info, &message);
}

/// The generic remedy of a reason code (the problem line carries the
/// specific one).
fn remedy_for(code: &str) -> String {
    match code {
        "incomplete" => format!(
            "put the private key, its certificate and the chain into the directory within {} of \
             each other, or fill a directory elsewhere on the same filesystem and rename it in",
            fmt_limit(INCOMPLETE_LIMIT)
        ),
        "unknown_target" | "invalid_name" | "not_a_drop" | "symlink" | "not_regular"
        | "too_large" | "too_many_files" | "subdirectory" | "unexpected_file" | "owner"
        | "hard_link" | "unreadable" => {
            "follow the problem line above, then drop it again".to_owned()
        }
        _ => "drop a corrected certificate set: the problem line says what is wrong".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompleteness_is_only_about_missing_parts() {
        assert!(is_incomplete(&BundleError::NoKey {
            inputs: "x".to_owned()
        }));
        assert!(is_incomplete(&BundleError::KeyMismatch {
            count: 1,
            certs: "x".to_owned()
        }));
        assert!(!is_incomplete(&BundleError::MultipleKeys {
            count: 2,
            inputs: "x".to_owned()
        }));
    }

    #[test]
    fn an_expired_wait_is_incomplete_and_other_problems_keep_their_code() {
        let missing = BundleError::NoCertificate {
            inputs: "web/key.pem".to_owned(),
        };
        let (code, problem) = bundle_verdict(&missing, true);
        assert_eq!(code, "incomplete");
        assert!(
            problem.starts_with(
                "the directory stayed incomplete and unchanged for 5m: no certificate"
            ),
            "{problem}"
        );
        assert_eq!(bundle_verdict(&missing, false).0, "no_certificate");
        let expired = BundleError::Expired {
            role: bundle::CertRole::Leaf,
            subject: "CN=a".to_owned(),
            at: "2020-01-01T00:00:00Z".to_owned(),
        };
        assert_eq!(bundle_verdict(&expired, true).0, "expired");

        let empty = Problem::Empty {
            shown: "/d/web".to_owned(),
        };
        assert_eq!(problem_verdict(&empty, true).0, "incomplete");
        let changed = Problem::Changed {
            shown: "/d/web".to_owned(),
        };
        assert_eq!(problem_verdict(&changed, true).0, "incomplete");
        assert_eq!(problem_verdict(&changed, false).0, "unreadable");
        let link = Problem::Symlink {
            shown: "/d/web/key.pem".to_owned(),
        };
        assert_eq!(problem_verdict(&link, true).0, "symlink");
    }

    #[test]
    fn remedies_exist_for_every_code() {
        for code in ["incomplete", "owner", "key_mismatch", "expired"] {
            assert!(!remedy_for(code).is_empty());
        }
        assert!(remedy_for("incomplete").contains(&fmt_limit(INCOMPLETE_LIMIT)));
    }
}
