//! Group commit: one fsync of the journal's WAL makes durable every commit
//! made while the fsync before it was in flight.
//!
//! Every journal transaction commits with `synchronous = NORMAL`: its
//! frames are in the WAL (written, in the page cache) when the commit
//! returns, so a killed agent keeps them. A write that must also survive a
//! power cut then waits in [`GroupCommit::durable`] for an fsync of the WAL
//! that began after its commit. The first waiter fsyncs; whoever commits
//! while that fsync is in flight waits for it, and the first of them to wake
//! fsyncs once for all. One run alone pays what `synchronous = FULL` costs
//! (one fsync per durable commit); a burst of runs on many targets pays one
//! fsync per group instead of one per row.
//!
//! This is `synchronous = FULL` moved out of SQLite: with `NORMAL`, SQLite
//! itself still syncs the WAL before each checkpoint, the database after
//! it, and the WAL's header when the file is reused; FULL adds only the
//! fsync of the WAL after each commit, which this module makes (on the
//! WAL's path, `<journal>-wal`: fsync flushes the file, whatever fd wrote
//! it).
//!
//! A failed fsync is never retried and trusted: the kernel may have dropped
//! the pages it could not write, and a later fsync can succeed without them.
//! After one fails every durable write fails with that error, until the
//! agent restarts and SQLite reads the journal again from disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::sync::lock;

/// What makes the WAL durable: `fsync(2)` of `path` in the agent, a
/// stand-in in the tests.
type SyncFn = Box<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

/// Commit numbers and the fsync that covers them.
pub(super) struct GroupCommit {
    wal: PathBuf,
    sync: SyncFn,
    state: Mutex<State>,
    /// Signalled when an fsync ends.
    ended: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Commits made so far (the last commit's number).
    committed: u64,
    /// Every commit up to this number is on disk.
    durable: u64,
    /// An fsync is in flight.
    syncing: bool,
    /// Writes waiting for an fsync to end.
    waiting: usize,
    /// fsyncs made.
    syncs: u64,
    /// The fsync that failed, once one has.
    failed: Option<String>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("wal", &self.wal)
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

/// An fsync in flight; dropped before it `ended` (the fsync panicked), it
/// ends it and wakes the waiters, one of which fsyncs again.
struct Syncing<'a> {
    gc: &'a GroupCommit,
    ended: bool,
}

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.gc.lock().syncing = false;
            self.gc.ended.notify_all();
        }
    }
}

/// fsync of the file at `path`.
fn fsync_path(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

impl GroupCommit {
    /// For the WAL at `wal`, made durable by `fsync(2)`.
    pub(super) fn new(wal: PathBuf) -> GroupCommit {
        GroupCommit::with_sync(wal, Box::new(fsync_path))
    }

    fn with_sync(wal: PathBuf, sync: SyncFn) -> GroupCommit {
        GroupCommit {
            wal,
            sync,
            state: Mutex::new(State::default()),
            ended: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Numbers a commit that has just returned; called under the journal's
    /// connection lock, so numbers follow the WAL's order.
    pub(super) fn committed(&self) -> u64 {
        let mut st = self.lock();
        st.committed += 1;
        st.committed
    }

    /// Returns once commit `seq` is on disk: at once when an fsync that
    /// began after it has ended, else after the next one (made by this
    /// thread when none is in flight).
    pub(super) fn durable(&self, seq: u64) -> Result<(), String> {
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.durable >= seq {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st.waiting += 1;
            st = self.ended.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiting -= 1;
        }
        // Every commit numbered so far has returned: its frames are written.
        let covers = st.committed;
        st.syncing = true;
        drop(st);
        // Ended however the fsync ends (a panic too), so that no waiter is
        // left waiting for one that will never finish.
        let mut syncing = Syncing {
            gc: self,
            ended: false,
        };
        let result = (self.sync)(&self.wal);
        let mut st = self.lock();
        st.syncing = false;
        syncing.ended = true;
        st.syncs += 1;
        match result {
            Ok(()) => st.durable = st.durable.max(covers),
            Err(e) => {
                st.failed = Some(format!(
                    "the fsync of its WAL {} failed ({e}): no run is recorded as durable \
                     after that; check the disk (kernel log), then restart the agent",
                    self.wal.display()
                ));
            }
        }
        self.ended.notify_all();
        match &st.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// fsyncs made so far.
    #[cfg(test)]
    pub(super) fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// A stand-in fsync that reports each call on `calls` and, for the
    /// first, waits for a word on `release`.
    fn blocking_sync(calls: mpsc::Sender<()>, release: mpsc::Receiver<()>) -> SyncFn {
        let release = Mutex::new(Some(release));
        Box::new(move |_| {
            let _ = calls.send(());
            if let Some(r) = release.lock().unwrap().take() {
                let _ = r.recv();
            }
            Ok(())
        })
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn commits_made_during_an_fsync_share_the_next_one() {
        let (calls_tx, calls) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let gc = Arc::new(GroupCommit::with_sync(
            PathBuf::from("/j-wal"),
            blocking_sync(calls_tx, release_rx),
        ));
        let first = {
            let gc = gc.clone();
            let seq = gc.committed();
            std::thread::spawn(move || gc.durable(seq))
        };
        calls.recv().unwrap();
        // Eight commits while the first fsync is in flight.
        let rest: Vec<_> = (0..8)
            .map(|_| {
                let gc = gc.clone();
                let seq = gc.committed();
                std::thread::spawn(move || gc.durable(seq))
            })
            .collect();
        wait_for("eight waiters", || gc.lock().waiting == 8);
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        for t in rest {
            t.join().unwrap().unwrap();
        }
        assert_eq!(gc.syncs(), 2, "one fsync for the first, one for the eight");
        assert_eq!(calls.try_iter().count(), 1);
        let st = gc.lock();
        assert_eq!((st.committed, st.durable), (9, 9));
    }

    #[test]
    fn a_commit_an_fsync_already_covered_makes_none() {
        let gc = GroupCommit::with_sync(PathBuf::from("/j-wal"), Box::new(|_| Ok(())));
        let a = gc.committed();
        let b = gc.committed();
        gc.durable(b).unwrap();
        gc.durable(a).unwrap();
        assert_eq!(gc.syncs(), 1);
        let c = gc.committed();
        gc.durable(c).unwrap();
        assert_eq!(gc.syncs(), 2, "a later commit needs its own");
    }

    #[test]
    fn a_failed_fsync_fails_every_durable_write_after_it() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gc = GroupCommit::with_sync(PathBuf::from("/state/journal.sqlite-wal"), {
            let fail = fail.clone();
            Box::new(move |_| {
                if fail.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    Err(io::Error::from_raw_os_error(5))
                } else {
                    Ok(())
                }
            })
        });
        let a = gc.committed();
        let e = gc.durable(a).unwrap_err();
        assert!(
            e.contains("fsync of its WAL /state/journal.sqlite-wal failed")
                && e.contains("restart the agent"),
            "{e}"
        );
        // The next fsync would succeed; it is not trusted.
        let b = gc.committed();
        assert_eq!(gc.durable(b).unwrap_err(), e);
        assert_eq!(gc.syncs(), 1, "not retried");
    }

    #[test]
    fn a_waiter_is_not_stranded_by_an_fsync_that_panicked() {
        let (calls_tx, calls) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(Some(release_rx));
        let gc = Arc::new(GroupCommit::with_sync(
            PathBuf::from("/j-wal"),
            Box::new(move |_| {
                let _ = calls_tx.send(());
                let first = release_rx.lock().unwrap().take();
                if let Some(r) = first {
                    let _ = r.recv();
                    panic!("the first fsync panics");
                }
                Ok(())
            }),
        ));
        let first = {
            let gc = gc.clone();
            let seq = gc.committed();
            std::thread::spawn(move || gc.durable(seq))
        };
        calls.recv().unwrap();
        let second = {
            let gc = gc.clone();
            let seq = gc.committed();
            std::thread::spawn(move || gc.durable(seq))
        };
        wait_for("a waiter", || gc.lock().waiting == 1);
        release.send(()).unwrap();
        assert!(first.join().is_err(), "the first fsync panicked");
        second.join().unwrap().unwrap();
        assert_eq!(gc.lock().durable, 2, "the waiter fsynced for both");
    }

    #[test]
    fn the_real_fsync_needs_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("j-wal");
        std::fs::write(&wal, b"frames").unwrap();
        let gc = GroupCommit::new(wal);
        let a = gc.committed();
        gc.durable(a).unwrap();
        let gone = GroupCommit::new(dir.path().join("missing-wal"));
        let a = gone.committed();
        let e = gone.durable(a).unwrap_err();
        assert!(
            e.contains("missing-wal") && e.contains("No such file"),
            "{e}"
        );
    }
}
