//! Named crash points and a failing-filesystem seam, for the crash and fault
//! tests. Both exist only in builds with the `failpoints` feature (the test
//! builds: `agent/Cargo.toml` enables it through a dev-dependency on the
//! crate itself); in every other build [`hit`] and [`fs_op`] are empty
//! inline functions.
//!
//! Crash points: `CERTCTL_FAILPOINT=<name>` makes the process abort (no
//! unwinding, no cleanup, like a power cut for the process) the first time
//! it passes `<name>`; `<name>@<n>` the n-th time. Names: `after-temp-write`,
//! `after-temp-fsync`, `after-backup`, `between-renames`, `after-commit`,
//! `during-reload`, `during-verify-wait`, `during-rollback`,
//! `after-retire` (the backup sets beyond retention renamed to
//! `.<id>.partial`, their files not yet removed), `before-finish`; a rollback also passes `before-cleanup` (after its
//! outcome is journaled, before the restored set and old backups are
//! removed), and the sweep after start `during-sweep` (a group of targets
//! locked, its directories not yet swept). With `CERTCTL_FAILPOINT_DROP_UNSYNCED=1` the abort first
//! truncates every file written since its last `fsync` (what a power cut
//! does to unsynced data).
//!
//! Pause points: `CERTCTL_FAILPOINT_PAUSE=<name>:<ms>` makes every pass of
//! `<name>` sleep `<ms>` milliseconds (on the thread that passes it), so a
//! test can act while a run is held at that point.
//!
//! Filesystem seam: `CERTCTL_FAULT_FS=<n>:<errno>[:persist]` makes the n-th
//! filesystem operation of `atomic` (1-based, counted over the whole
//! process) fail with `EIO` or `ENOSPC`, once, or with `persist` from then
//! on.
//!
//! Drop-directory seam: `CERTCTL_FAULT_DROP=<op>:<errno>[:<times>|persist]`
//! makes the drop directory's operation `<op>` (`reason`: writing a reason
//! file, `move`: moving a drop into `rejected/`) fail with `EIO`, `ENOSPC`,
//! `EMFILE`, `ENFILE` or `EACCES` the first `<times>` times (default once),
//! or every time with `persist`.

/// Every crash point, for tests that loop over them.
pub const POINTS: &[&str] = &[
    "after-temp-write",
    "after-temp-fsync",
    "after-backup",
    "between-renames",
    "after-commit",
    "during-reload",
    "during-verify-wait",
    "during-rollback",
    "after-retire",
    "before-finish",
];

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Crash {
        name: String,
        nth: u64,
        seen: AtomicU64,
        drop_unsynced: bool,
    }

    struct Fault {
        nth: u64,
        errno: i32,
        persist: bool,
        count: AtomicU64,
    }

    fn crash() -> Option<&'static Crash> {
        static CRASH: OnceLock<Option<Crash>> = OnceLock::new();
        CRASH
            .get_or_init(|| {
                let spec = std::env::var("CERTCTL_FAILPOINT").ok()?;
                let (name, nth) = match spec.split_once('@') {
                    Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                    None => (spec, 1),
                };
                Some(Crash {
                    name,
                    nth,
                    seen: AtomicU64::new(0),
                    drop_unsynced: std::env::var_os("CERTCTL_FAILPOINT_DROP_UNSYNCED").is_some(),
                })
            })
            .as_ref()
    }

    fn fault() -> Option<&'static Fault> {
        static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
        FAULT
            .get_or_init(|| {
                let spec = std::env::var("CERTCTL_FAULT_FS").ok()?;
                let mut parts = spec.split(':');
                let nth = parts.next()?.parse().ok()?;
                let errno = match parts.next()? {
                    "EIO" => nix::libc::EIO,
                    "ENOSPC" => nix::libc::ENOSPC,
                    _ => return None,
                };
                let persist = parts.next() == Some("persist");
                Some(Fault {
                    nth,
                    errno,
                    persist,
                    count: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    struct DropFault {
        op: String,
        errno: i32,
        times: u64,
        count: AtomicU64,
    }

    fn drop_fault() -> Option<&'static DropFault> {
        static FAULT: OnceLock<Option<DropFault>> = OnceLock::new();
        FAULT
            .get_or_init(|| {
                let spec = std::env::var("CERTCTL_FAULT_DROP").ok()?;
                let mut parts = spec.split(':');
                let op = parts.next()?.to_owned();
                let errno = match parts.next()? {
                    "EIO" => nix::libc::EIO,
                    "ENOSPC" => nix::libc::ENOSPC,
                    "EMFILE" => nix::libc::EMFILE,
                    "ENFILE" => nix::libc::ENFILE,
                    "EACCES" => nix::libc::EACCES,
                    _ => return None,
                };
                let times = match parts.next() {
                    None => 1,
                    Some("persist") => u64::MAX,
                    Some(n) => n.parse().ok()?,
                };
                Some(DropFault {
                    op,
                    errno,
                    times,
                    count: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn drop_op(op: &str) -> std::io::Result<()> {
        let Some(f) = drop_fault() else { return Ok(()) };
        if f.op != op || f.count.fetch_add(1, Ordering::SeqCst) >= f.times {
            return Ok(());
        }
        tracing::warn!(op, "injected drop directory fault");
        Err(std::io::Error::from_raw_os_error(f.errno))
    }

    fn unsynced() -> &'static Mutex<HashSet<PathBuf>> {
        static UNSYNCED: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
        UNSYNCED.get_or_init(|| Mutex::new(HashSet::new()))
    }

    fn pause() -> Option<&'static (String, std::time::Duration)> {
        static PAUSE: OnceLock<Option<(String, std::time::Duration)>> = OnceLock::new();
        PAUSE
            .get_or_init(|| {
                let spec = std::env::var("CERTCTL_FAILPOINT_PAUSE").ok()?;
                let (name, ms) = spec.split_once(':')?;
                Some((
                    name.to_owned(),
                    std::time::Duration::from_millis(ms.parse().ok()?),
                ))
            })
            .as_ref()
    }

    pub fn hit(name: &str) {
        if let Some((n, d)) = pause()
            && n == name
        {
            tracing::warn!(failpoint = name, "failpoint: pausing for {d:?}");
            std::thread::sleep(*d);
        }
        let Some(c) = crash() else { return };
        if c.name != name || c.seen.fetch_add(1, Ordering::SeqCst) + 1 != c.nth {
            return;
        }
        if c.drop_unsynced {
            let files = unsynced()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            for f in files {
                // Truncate in place: the data never reached the disk.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&f);
            }
        }
        tracing::error!(failpoint = name, "failpoint: aborting");
        std::process::abort();
    }

    pub fn fs_op(op: &str, path: &Path) -> std::io::Result<()> {
        let Some(f) = fault() else { return Ok(()) };
        let n = f.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n == f.nth || (f.persist && n > f.nth) {
            tracing::warn!(op, path = %path.display(), n, "injected filesystem fault");
            return Err(std::io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }

    pub fn written(path: &Path) {
        unsynced()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned());
    }

    pub fn synced(path: &Path) {
        unsynced()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(path);
    }
}

/// A crash point: aborts the process here when the test asks for it.
#[inline(always)]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Called before every filesystem operation of `atomic`; fails it
/// when the test asks for it.
#[inline(always)]
pub fn fs_op(op: &str, path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    return imp::fs_op(op, path);
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (op, path);
        Ok(())
    }
}

/// Called before the drop directory's operation `op` (`reason`, `move`);
/// fails it when the test asks for it.
#[inline(always)]
pub fn drop_op(op: &str) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    return imp::drop_op(op);
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = op;
        Ok(())
    }
}

/// `path` holds data that is not yet fsynced.
#[inline(always)]
pub fn written(path: &std::path::Path) {
    #[cfg(feature = "failpoints")]
    imp::written(path);
    #[cfg(not(feature = "failpoints"))]
    let _ = path;
}

/// `path`'s data is on disk.
#[inline(always)]
pub fn synced(path: &std::path::Path) {
    #[cfg(feature = "failpoints")]
    imp::synced(path);
    #[cfg(not(feature = "failpoints"))]
    let _ = path;
}
