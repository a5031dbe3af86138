//! The drop directory's event loop and the jobs it starts: the imperative
//! shell around [`settle`](super::settle) and [`queue`](super::queue).
//!
//! One task owns the state. It applies watcher events, and whenever drops
//! are due it takes them (the rename that takes a drop happens in this
//! task, so the watcher's echo of it is always ordered after what came
//! before) and starts a [`job`](super::job) per drop. A job holds the
//! agent's drain guard, so shutdown waits for it, and a job that deploys
//! holds its drop name until it ends.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::job::{self, Ctx, Job, Kind, check, form_of, is_incomplete, targets_of};
use super::names::{self, Entry};
use super::queue::{self, Queue};
use super::record::{DropOutcome, Info};
use super::scan::{self, Expect, Form, Owners, ReadError};
use super::settle::{Change, Due, Note, Tracker};
use super::watch::{self, Observed, Watch};
use super::{INCOMPLETE_LIMIT, fmt_limit};
use crate::config::Config;
use crate::model::fmt::{escape, fmt_duration, shown};

/// The event loop's state.
pub(super) struct Runner {
    ctx: Arc<Ctx>,
    tracker: Tracker,
    queue: Queue,
    /// A job's end: the drop name slot it held, and its claimed name.
    done_tx: mpsc::UnboundedSender<(Option<String>, String)>,
    done_rx: mpsc::UnboundedReceiver<(Option<String>, String)>,
    /// Claimed names of the jobs running: a directory watched again (the
    /// old one moved back) does not take them a second time.
    running: std::collections::HashSet<String>,
    /// Look whether the drop directory is still the one watched.
    check_root: bool,
}

/// How often the loop checks that the drop directory's path still leads
/// to the directory it watches, and, while it does not, tries to watch
/// the one there.
const ROOT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The next watcher event; never, while nothing is watched.
async fn next_event(
    watching: &mut Option<(Watch, mpsc::Receiver<notify::Result<notify::Event>>)>,
) -> Option<notify::Result<notify::Event>> {
    match watching {
        Some((_, events)) => events.recv().await,
        None => std::future::pending().await,
    }
}

impl Runner {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            ctx,
            tracker: Tracker::new(INCOMPLETE_LIMIT),
            queue: Queue::default(),
            done_tx,
            done_rx,
            check_root: false,
            running: std::collections::HashSet::new(),
        }
    }

    /// Runs until `shutdown` turns true (or the watcher dies).
    pub async fn run(
        mut self,
        watch: Watch,
        events: mpsc::Receiver<notify::Result<notify::Event>>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // `None` while the drop directory is not watched (gone, replaced).
        let mut watching = Some((watch, events));
        let mut check = tokio::time::interval(ROOT_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        off_worker(|| {
            self.recover();
            self.scan(Instant::now());
        });
        loop {
            if *shutdown.borrow() {
                break;
            }
            if std::mem::take(&mut self.check_root) {
                off_worker(|| self.check_root(&mut watching));
            }
            if watching.is_some() {
                off_worker(|| self.dispatch(Instant::now()));
            }
            self.ctx.shared.drops.set_pending(self.tracker.pending());
            let queue = &self.queue;
            let deadline = self.tracker.next_deadline(|e| blocked(queue, e));
            let sleep = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(done) = self.done_rx.recv() => {
                    self.finished(done);
                    while let Ok(done) = self.done_rx.try_recv() {
                        self.finished(done);
                    }
                }
                ev = next_event(&mut watching) => match ev {
                    Some(ev) => off_worker(|| {
                        self.event(ev);
                        // Take in everything queued before deciding anything.
                        if let Some((_, events)) = watching.as_mut() {
                            while let Ok(ev) = events.try_recv() {
                                self.event(ev);
                            }
                        }
                    }),
                    None => {
                        error!(
                            drop_dir = %shown(self.ctx.dirs.root()),
                            "the drop directory watcher stopped: not watching the drop directory; \
                             trying to watch it again every {}",
                            fmt_duration(ROOT_CHECK)
                        );
                        watching = None;
                        self.tracker = Tracker::new(INCOMPLETE_LIMIT);
                        self.set_watching(false);
                    }
                },
                _ = check.tick() => self.check_root = true,
                () = sleep => {}
            }
        }
        drop(watching);
        debug!("drop directory watcher stopped");
    }

    fn set_watching(&self, on: bool) {
        self.ctx.shared.drops.set_watching(on);
        self.ctx.shared.engine.metrics().drop_dir_watching(on);
    }

    /// Whether the drop directory's path still leads to the directory
    /// watched; when not (removed, moved away, replaced by another), stops
    /// watching the old one, and watches the one now at the path as soon
    /// as there is one, taking what it holds as at start.
    fn check_root(
        &mut self,
        watching: &mut Option<(Watch, mpsc::Receiver<notify::Result<notify::Event>>)>,
    ) {
        let root = self.ctx.dirs.root().to_owned();
        if watching.is_some() {
            if self.ctx.dirs.root_is_current() {
                return;
            }
            error!(
                drop_dir = %shown(&root),
                "the drop directory was removed, moved away or replaced: not watching it; drops \
                 are not taken until a directory is at {} again (checked every {})",
                shown(&root),
                fmt_duration(ROOT_CHECK)
            );
            *watching = None;
            // What was seen is of the old directory.
            self.tracker = Tracker::new(INCOMPLETE_LIMIT);
            self.set_watching(false);
        }
        let dirs = match self.ctx.dirs.reopen() {
            Ok(d) => d,
            Err(e) => {
                debug!(drop_dir = %shown(&root), "drop directory not back yet: {e}");
                return;
            }
        };
        match watch::start(&root) {
            Ok(w) => {
                // Jobs in flight keep the old context: their drops are in
                // the old directory, wherever it went.
                self.ctx = Arc::new(Ctx::new(self.ctx.shared.clone(), dirs));
                self.tracker = Tracker::new(INCOMPLETE_LIMIT);
                *watching = Some(w);
                self.set_watching(true);
                info!(drop_dir = %shown(&root), "watching the drop directory again");
                self.recover();
                self.scan(Instant::now());
            }
            Err(e) => {
                warn!(drop_dir = %shown(&root), "cannot watch the drop directory yet: {e}");
            }
        }
    }

    fn finished(&mut self, (slot, claimed): (Option<String>, String)) {
        self.running.remove(&claimed);
        if let Some(name) = slot {
            self.queue.finish(&name);
        }
    }

    // === events ===

    fn event(&mut self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    error!(
                        "the drop directory watcher hit the inotify watch limit: drops in new \
                         subdirectories are missed; raise fs.inotify.max_user_watches \
                         (sysctl) and remove stray directories from the drop directory"
                    );
                } else {
                    warn!("drop directory watcher: {e}");
                }
                return;
            }
        };
        let now = Instant::now();
        let settle = self.ctx.shared.config().agent.settle;
        for observed in watch::changes(self.ctx.dirs.root(), &ev) {
            match observed {
                Observed::Entry(entry, change) => {
                    debug!(entry = %escape(entry.as_bytes()), change = ?change, "drop directory change");
                    if let Some(note) = self.tracker.observe(&entry, change, settle, now) {
                        self.note(note);
                    }
                }
                Observed::Rescan => {
                    warn!(
                        "the drop directory's event queue overflowed: listing it again; \
                         drops replaced meanwhile may be missing from the record"
                    );
                    self.tracker.lost_events();
                    self.scan(now);
                }
                Observed::RootGone => self.check_root = true,
            }
        }
    }

    fn note(&self, note: Note) {
        let (entry, outcome, reason, message) = match note {
            Note::Superseded(entry) => {
                let msg = format!(
                    "{} superseded: replaced by a newer drop before it was deployed; the newer one is taken",
                    self.ctx.shown(&entry)
                );
                (entry, DropOutcome::Superseded, "superseded", msg)
            }
            Note::Withdrawn(entry) => {
                let msg = format!(
                    "{} withdrawn: removed from the drop directory by someone else before the agent took it",
                    self.ctx.shown(&entry)
                );
                (entry, DropOutcome::Withdrawn, "withdrawn", msg)
            }
        };
        let config = self.ctx.shared.config();
        let (name, targets) = targets_of(&config, &entry);
        let form = form_of(&self.ctx, &entry, &entry);
        let info = Info::new(
            name.as_deref(),
            self.ctx.public(&entry),
            form,
            outcome,
            targets,
        )
        .reason(reason);
        self.ctx.emit(&info, &message);
    }

    /// Reports every entry on disk to the tracker (start-up, overflow).
    fn scan(&mut self, now: Instant) {
        let dir = self.ctx.dirs.drop_fd();
        let entries = match scan::list(dir) {
            Ok(e) => e,
            Err(e) => {
                error!(
                    drop_dir = %shown(self.ctx.dirs.root()),
                    "cannot list the drop directory: {e}"
                );
                return;
            }
        };
        let settle = self.ctx.shared.config().agent.settle;
        let wall = SystemTime::now();
        for entry in entries {
            if names::classify(entry.as_ref()).is_none() {
                continue;
            }
            if let Some(age) = scan::age(dir, &entry, wall)
                && let Some(note) =
                    self.tracker
                        .observe(&entry, Change::Present { age }, settle, now)
            {
                self.note(note);
            }
        }
    }

    /// Drops taken before the agent stopped: deployed again (the newest of
    /// a name), or superseded when a newer drop of the name arrived since.
    fn recover(&mut self) {
        let dir = self.ctx.dirs.drop_fd();
        let Ok(entries) = scan::list(dir) else {
            return;
        };
        let mut claimed: Vec<(u128, u64, String, String)> = entries
            .iter()
            .filter(|c| !self.running.contains(*c))
            .filter_map(|c| {
                let entry = names::unclaimed_entry(c)?;
                let stamp = c.strip_prefix(names::CLAIM_PREFIX)?.split_once('.')?.0;
                let (ms, seq) = stamp.split_once('-')?;
                Some((
                    ms.parse().ok()?,
                    seq.parse().ok()?,
                    c.clone(),
                    entry.to_owned(),
                ))
            })
            .collect();
        // Newest last.
        claimed.sort();
        let public_names: Vec<String> = entries
            .iter()
            .filter_map(|e| names::classify(e.as_ref())?.name().map(str::to_owned))
            .collect();
        let mut newest_taken: Vec<String> = Vec::new();
        for (_, _, c, entry) in claimed.into_iter().rev() {
            let name = names::classify(entry.as_ref()).and_then(|e| e.name().map(str::to_owned));
            let newer = match &name {
                Some(n) if public_names.contains(n) => Some(format!(
                    "a drop for \"{n}\" that arrived in {} while the agent was stopped",
                    shown(self.ctx.dirs.root())
                )),
                Some(n) if newest_taken.contains(n) => {
                    Some(format!("a drop for \"{n}\" taken later"))
                }
                _ => None,
            };
            info!(
                drop = %self.ctx.shown(&entry),
                "found a drop taken before the agent stopped ({})",
                escape(c.as_bytes())
            );
            let job = match newer {
                Some(by) => Job {
                    entry,
                    claimed: c,
                    kind: Kind::Supersede { by },
                },
                None => {
                    if let Some(n) = &name {
                        newest_taken.push(n.clone());
                        self.queue.start(n);
                    }
                    Job {
                        entry,
                        claimed: c,
                        kind: Kind::Deploy {
                            incomplete_expired: false,
                        },
                    }
                }
            };
            if !self.spawn(job) {
                return;
            }
        }
    }

    // === taking drops ===

    fn dispatch(&mut self, now: Instant) {
        let queue = &self.queue;
        let due = self.tracker.due(now, |e| blocked(queue, e));
        // Nothing new is taken once the agent is stopping: it stays for the
        // next start.
        if due.is_empty() || self.ctx.shared.deploy_guard().is_none() {
            return;
        }
        let config = self.ctx.shared.config();
        let mut ready = Vec::with_capacity(due.len());
        for d in due {
            match self.precheck(&config, &d) {
                Precheck::Ready => ready.push(d),
                Precheck::Waiting(detail) => {
                    if self.tracker.waiting(&d.entry, now) {
                        let (name, targets) = targets_of(&config, &d.entry);
                        let info = Info::new(
                            name.as_deref(),
                            self.ctx.public(&d.entry),
                            Form::Directory,
                            DropOutcome::Waiting,
                            targets,
                        )
                        .reason("incomplete");
                        let message = format!(
                            "{}/: waiting for the rest of the set ({detail}); it is rejected as \
                             incomplete if it stays unchanged for {}",
                            self.ctx.shown(&d.entry),
                            fmt_limit(INCOMPLETE_LIMIT)
                        );
                        self.ctx.emit(&info, &message);
                    }
                }
                Precheck::Gone => {
                    self.tracker.vanished(&d.entry);
                    self.note(Note::Withdrawn(d.entry));
                }
            }
        }
        let picks = queue::pick(ready, |e| {
            names::classify(e.as_ref()).and_then(|c| c.name().map(str::to_owned))
        });
        for pick in picks {
            let incomplete_expired = pick.take.incomplete_expired;
            // The winner first: if it is gone, the older ones stay in the
            // race for the next round.
            if !self.take(&pick.take, Kind::Deploy { incomplete_expired }) {
                continue;
            }
            let by = self.ctx.shown(&pick.take.entry);
            for older in pick.supersede {
                self.take(&older, Kind::Supersede { by: by.clone() });
            }
        }
    }

    /// For a directory drop about to be taken: is it a complete set yet?
    fn precheck(&self, config: &Config, due: &Due) -> Precheck {
        let Some(Entry::Directory { name }) = names::classify(due.entry.as_ref()) else {
            return Precheck::Ready;
        };
        // Unknown names and expired waits are rejected without a look.
        if due.incomplete_expired || config.targets_for_drop(&name).next().is_none() {
            return Precheck::Ready;
        }
        let owners = Owners::resolve(&config.agent.drop_owners);
        let read = scan::read(
            self.ctx.dirs.drop_fd(),
            &due.entry,
            &self.ctx.public(&due.entry),
            Expect::Directory,
            &owners,
            &scan::LIMITS,
        );
        match read {
            Err(ReadError::Gone) => Precheck::Gone,
            Err(ReadError::Problem(p)) if p.may_settle() => Precheck::Waiting(p.to_string()),
            Err(ReadError::Problem(_)) => Precheck::Ready,
            Ok(contents) => match check(&contents, config) {
                Err(e) if is_incomplete(&e) => Precheck::Waiting(e.to_string()),
                _ => Precheck::Ready,
            },
        }
    }

    /// Takes the drop at `due.entry` and starts its job; false when it
    /// could not be taken.
    fn take(&mut self, due: &Due, kind: Kind) -> bool {
        let entry = &due.entry;
        if matches!(names::classify(entry.as_ref()), Some(Entry::Invalid)) {
            // Not a drop name: rejected as it is, never claimed (a claimed
            // name is longer, and a name near the filesystem's limit would
            // not fit), never deployed.
            self.tracker.taken(entry);
            return self.spawn(Job {
                entry: entry.clone(),
                claimed: entry.clone(),
                kind: Kind::InvalidName,
            });
        }
        match self.ctx.dirs.claim(entry) {
            Ok(claimed) => {
                self.tracker.taken(entry);
                let job = Job {
                    entry: entry.clone(),
                    claimed,
                    kind,
                };
                if let Some(name) = job.slot() {
                    self.queue.start(&name);
                }
                self.spawn(job)
            }
            Err(e) if e.errno == Errno::ENOENT => {
                self.tracker.vanished(entry);
                self.note(Note::Withdrawn(entry.clone()));
                false
            }
            Err(e) if scan::is_transient(e.errno) => {
                if let Some(wait) = self.tracker.retry(entry, Instant::now()) {
                    warn!(
                        drop = %self.ctx.shown(entry),
                        "{} could not be taken: {e}; it stays in the drop directory and is \
                         tried again in {}",
                        self.ctx.shown(entry),
                        fmt_duration(wait)
                    );
                }
                false
            }
            Err(e) => {
                self.tracker.stuck(entry);
                let config = self.ctx.shared.config();
                let (name, targets) = targets_of(&config, entry);
                let public = self.ctx.public(entry);
                let form = form_of(&self.ctx, entry, entry);
                let info = Info::new(
                    name.as_deref(),
                    public.clone(),
                    form,
                    DropOutcome::Failed,
                    targets,
                )
                .reason("cannot_take");
                let message = format!(
                    "{} could not be taken: {e}; it stays in the drop directory and is tried \
                     again when it changes or the agent restarts",
                    shown(&public)
                );
                self.ctx.emit(&info, &message);
                false
            }
        }
    }

    /// Starts `job` in its own task; false when the agent is shutting down
    /// (the drop stays where it is for the next start).
    fn spawn(&mut self, job: Job) -> bool {
        let Some(guard) = self.ctx.shared.deploy_guard() else {
            if let Some(name) = job.slot() {
                self.queue.finish(&name);
            }
            return false;
        };
        let ctx = self.ctx.clone();
        let done = self.done_tx.clone();
        ctx.shared.drops.job_started();
        self.running.insert(job.claimed.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let slot = job.slot();
            job::run(&ctx, &job).await;
            ctx.shared.drops.job_ended();
            let _ = done.send((slot, job.claimed));
        });
        true
    }
}

/// Runs the loop's own filesystem work (a rename, a directory read, a
/// user lookup: short, but blocking) without holding up other tasks
/// scheduled on this worker thread.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

enum Precheck {
    Ready,
    Waiting(String),
    Gone,
}

/// Whether `entry` must wait because a deploy of its drop name runs.
fn blocked(queue: &Queue, entry: &str) -> bool {
    names::classify(entry.as_ref())
        .and_then(|e| e.name().map(|n| queue.busy(n)))
        .unwrap_or(false)
}
