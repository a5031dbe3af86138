//! Watching the drop directory with inotify (through `notify`): events in,
//! per-entry [`Change`]s out. No polling: the agent sleeps until the kernel
//! reports a change or a settle timer ends.
//!
//! The watch is recursive (directory drops are watched inside) and never
//! follows symlinks. Events reach the agent through a bounded channel; when
//! the agent falls behind, the watcher thread waits, the kernel queue fills
//! and overflows, and the overflow is reported as [`Observed::Rescan`]: the
//! directory is listed again, so nothing on disk is missed.
//!
//! [`changes`] is the pure mapping from one event to changes, so it is
//! tested without a filesystem.

use std::path::{Component, Path};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{Config, Event, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::names;
use super::settle::Change;

/// Events queued between the watcher thread and the agent.
pub const CHANNEL_CAPACITY: usize = 4096;

/// What one event means for the drop directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A change of one top-level entry.
    Entry(String, Change),
    /// Events were lost: list the directory again.
    Rescan,
    /// The drop directory itself was removed or moved away.
    RootGone,
}

/// A running watch; dropping it stops the watcher thread.
pub struct Watch {
    _watcher: RecommendedWatcher,
}

/// Starts watching `root`; events (or watcher errors) arrive on the
/// returned receiver.
pub fn start(root: &Path) -> Result<(Watch, mpsc::Receiver<notify::Result<Event>>), notify::Error> {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let handler = move |ev: notify::Result<Event>| {
        // The watcher's own thread, never a runtime thread: blocking is fine,
        // and it is how back-pressure reaches the kernel queue. A closed
        // channel means the agent is stopping.
        let _ = tx.blocking_send(ev);
    };
    let mut watcher =
        RecommendedWatcher::new(handler, Config::default().with_follow_symlinks(false))?;
    watcher.watch(root, RecursiveMode::Recursive)?;
    Ok((Watch { _watcher: watcher }, rx))
}

/// What `event` means for the entries of the drop directory `root`.
pub fn changes(root: &Path, event: &Event) -> Vec<Observed> {
    if event.need_rescan() {
        return vec![Observed::Rescan];
    }
    let change_of = |depth_one: bool| -> Option<Change> {
        match event.kind {
            // Our own reads open files; reads change nothing.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Written),
            EventKind::Access(_) => None,
            // `Both` repeats a From and a To already reported.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => None,
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) if depth_one => {
                Some(Change::RenamedIn)
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) if depth_one => {
                Some(Change::Gone)
            }
            EventKind::Remove(_) if depth_one => Some(Change::Gone),
            // Created, written, chmod/chown, or anything inside a directory drop.
            _ => Some(Change::Written),
        }
    };
    let mut out = Vec::new();
    for path in &event.paths {
        match entry_of(root, path) {
            Some((entry, depth_one)) => {
                if names::classify(entry.as_ref()).is_none() {
                    continue;
                }
                if let Some(change) = change_of(depth_one) {
                    out.push(Observed::Entry(entry, change));
                }
            }
            None if path == root
                && matches!(
                    event.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                ) =>
            {
                out.push(Observed::RootGone);
            }
            None => {}
        }
    }
    out
}

/// The top-level entry `path` is in, and whether `path` is that entry.
fn entry_of(root: &Path, path: &Path) -> Option<(String, bool)> {
    let rel = path.strip_prefix(root).ok()?;
    let mut parts = rel.components();
    let first = match parts.next()? {
        Component::Normal(n) => n.to_string_lossy().into_owned(),
        _ => return None,
    };
    Some((first, parts.next().is_none()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};

    use super::*;

    fn ev(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    fn one(kind: EventKind, path: &str) -> Vec<Observed> {
        changes(Path::new("/d"), &ev(kind, &[path]))
    }

    fn entry(e: &str, c: Change) -> Vec<Observed> {
        vec![Observed::Entry(e.to_owned(), c)]
    }

    #[test]
    fn renames_into_the_drop_directory_are_complete() {
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(one(to, "/d/web.pem"), entry("web.pem", Change::RenamedIn));
        // A directory renamed in is complete too.
        assert_eq!(one(to, "/d/web"), entry("web", Change::RenamedIn));
        // A file renamed into a directory drop only changes that drop.
        assert_eq!(one(to, "/d/web/cert.pem"), entry("web", Change::Written));
    }

    #[test]
    fn writes_in_place_settle() {
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert_eq!(one(kind, "/d/web.pem"), entry("web.pem", Change::Written));
            assert_eq!(one(kind, "/d/web/key.pem"), entry("web", Change::Written));
        }
    }

    #[test]
    fn leaving_the_directory_is_gone_and_reads_are_nothing() {
        let from = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        assert_eq!(one(from, "/d/web.pem"), entry("web.pem", Change::Gone));
        assert_eq!(
            one(EventKind::Remove(RemoveKind::Folder), "/d/web"),
            entry("web", Change::Gone)
        );
        assert_eq!(
            one(EventKind::Remove(RemoveKind::File), "/d/web/key.pem"),
            entry("web", Change::Written)
        );
        assert!(
            one(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/d/web.pem"
            )
            .is_empty()
        );
        let both = ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/d/.web.pem.tmp", "/d/web.pem"],
        );
        assert!(changes(Path::new("/d"), &both).is_empty());
    }

    #[test]
    fn ignored_names_and_the_agents_own_files_are_not_changes() {
        let to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(one(to, "/d/.web.pem.tmp").is_empty());
        assert!(one(to, "/d/.certctl-claimed.1-2.web.pem").is_empty());
        assert!(
            one(
                EventKind::Remove(RemoveKind::File),
                "/d/.certctl-claimed.1-2.web/key.pem"
            )
            .is_empty()
        );
        // A temp file inside a directory drop is the producer at work.
        assert_eq!(
            one(EventKind::Create(CreateKind::File), "/d/web/.key.pem.tmp"),
            entry("web", Change::Written)
        );
        // Unrelated paths are nothing.
        assert!(one(EventKind::Create(CreateKind::File), "/elsewhere/web.pem").is_empty());
    }

    #[test]
    fn overflow_rescans_and_losing_the_root_is_reported() {
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(changes(Path::new("/d"), &overflow), [Observed::Rescan]);
        assert_eq!(
            one(EventKind::Remove(RemoveKind::Folder), "/d"),
            [Observed::RootGone]
        );
        assert!(one(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/d").is_empty());
    }
}
