//! The only code that writes, renames or removes files beside a target.
//!
//! Every publication follows one order, which crash recovery and the
//! `strace` test rely on: create a temp file `O_CREAT|O_EXCL` with mode 0600
//! in the destination directory, `fchown`/`fchmod` it to the final owner and
//! mode before any byte is written, write, `fsync` it, `rename` it over the
//! destination, `fsync` the directory. Previous files are kept as backups by
//! hard link (same inode, so owner and mode come back exactly on restore),
//! falling back to an fsynced copy where linking is not allowed, in
//! directories whose creation is fsynced too.
//!
//! Names the agent creates beside a target: temp files `.certctl-tmp-*`, and
//! the directory `.certctl/` holding `backup/<target>/<deploy-id>/`. Backups
//! live in a subdirectory rather than as loose files so that servers which
//! load every file of a directory (haproxy's `crt <dir>`) never load one.
#![allow(clippy::disallowed_methods)] // this module is the sanctioned writer

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::Target;
use crate::failpoint;

mod base;
pub mod remote;

pub use base::{
    AGENT_DIR, Existing, FsError, Result, TEMP_PREFIX, backup_dir, is_private_key, parent,
    partial_of, temp_path,
};
pub use remote::RemoteFs;

/// Where a target's files are: this host, or another one reached over SSH
/// ([`remote`]). The in-place layout's steps are methods here, each the
/// same protocol on either side; the free functions of this module are
/// this host's, and what the generations layout and the agent's own
/// directories use.
#[derive(Clone, Debug)]
pub enum Fs {
    Local,
    Remote(std::sync::Arc<RemoteFs>),
}

/// This host's files.
pub const LOCAL: Fs = Fs::Local;

impl Fs {
    /// Where `target`'s files are. A remote target's connection is made
    /// (or reused) at its first step, not here.
    pub fn of(target: &Target) -> Fs {
        match &target.ssh {
            None => Fs::Local,
            Some(ssh) => Fs::Remote(RemoteFs::new(ssh.clone())),
        }
    }

    /// The remote host as the journal records it (`user@host:port`);
    /// empty for this host.
    pub fn host(&self) -> String {
        match self {
            Fs::Local => String::new(),
            Fs::Remote(r) => r.host(),
        }
    }

    /// Whether something is at `path` (a symlink is not followed).
    pub fn exists(&self, path: &Path) -> Result<bool> {
        match self {
            Fs::Local => match fs::symlink_metadata(path) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(FsError::new("cannot inspect", path)(e)),
            },
            Fs::Remote(r) => r.exists(path),
        }
    }

    /// Whether a regular file is at `path` (a symlink is not followed).
    pub fn is_file(&self, path: &Path) -> Result<bool> {
        match self {
            Fs::Local => match fs::symlink_metadata(path) {
                Ok(m) => Ok(m.is_file()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(FsError::new("cannot inspect", path)(e)),
            },
            Fs::Remote(r) => r.is_file(path),
        }
    }

    /// See [`observe`].
    pub fn observe(&self, path: &Path) -> Result<Option<Existing>> {
        match self {
            Fs::Local => observe(path),
            Fs::Remote(r) => r.observe(path),
        }
    }

    /// See [`write_temp`].
    pub fn write_temp(
        &self,
        final_path: &Path,
        deploy_id: &str,
        bytes: &[u8],
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<PathBuf> {
        match self {
            Fs::Local => write_temp(final_path, deploy_id, bytes, mode, uid, gid),
            Fs::Remote(r) => r.write_temp(final_path, deploy_id, bytes, mode, uid, gid),
        }
    }

    /// See [`rename`].
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        match self {
            Fs::Local => rename(from, to),
            Fs::Remote(r) => r.rename(from, to),
        }
    }

    /// See [`fsync_dir`].
    pub fn fsync_dir(&self, dir: &Path) -> Result<()> {
        match self {
            Fs::Local => fsync_dir(dir),
            Fs::Remote(r) => r.fsync_dir(dir),
        }
    }

    /// See [`remove`].
    pub fn remove(&self, path: &Path) -> Result<()> {
        match self {
            Fs::Local => remove(path),
            Fs::Remote(r) => r.remove(path),
        }
    }

    /// See [`make_private_dir`].
    pub fn make_private_dir(&self, dir: &Path) -> Result<()> {
        match self {
            Fs::Local => make_private_dir(dir),
            Fs::Remote(r) => r.make_private_dir(dir),
        }
    }

    /// See [`keep_backup`].
    pub fn keep_backup(&self, live: &Path, backup: &Path) -> Result<()> {
        match self {
            Fs::Local => keep_backup(live, backup),
            Fs::Remote(r) => r.keep_backup(live, backup),
        }
    }

    /// See [`restore`].
    pub fn restore(&self, backup: &Path, live: &Path, deploy_id: &str) -> Result<Option<String>> {
        match self {
            Fs::Local => restore(backup, live, deploy_id),
            Fs::Remote(r) => r.restore(backup, live, deploy_id),
        }
    }

    /// See [`remove_temps`].
    pub fn remove_temps(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        match self {
            Fs::Local => remove_temps(dir),
            Fs::Remote(r) => r.remove_temps(dir),
        }
    }

    /// See [`remove_tree`].
    pub fn remove_tree(&self, dir: &Path) -> Result<()> {
        match self {
            Fs::Local => remove_tree(dir),
            Fs::Remote(r) => r.remove_tree(dir),
        }
    }

    /// See [`retire_tree`]; a remote tree is removed at once (`None`).
    pub fn retire_tree(&self, dir: &Path) -> Result<Option<PathBuf>> {
        match self {
            Fs::Local => retire_tree(dir),
            Fs::Remote(r) => r.remove_tree(dir).map(|()| None),
        }
    }

    /// See [`remove_partials`].
    pub fn remove_partials(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        match self {
            Fs::Local => remove_partials(dir),
            Fs::Remote(r) => r.remove_partials(dir),
        }
    }

    /// See [`list_backups`].
    pub fn list_backups(&self, dir: &Path, target: &str) -> Result<Vec<String>> {
        match self {
            Fs::Local => list_backups(dir, target),
            Fs::Remote(r) => r.list_backups(dir, target),
        }
    }

    /// See [`remove_live_backups`].
    pub fn remove_live_backups(&self, dir: &Path, target: &str) -> Result<()> {
        match self {
            Fs::Local => remove_live_backups(dir, target),
            Fs::Remote(r) => r.remove_live_backups(dir, target),
        }
    }

    /// See [`remove_empty_backups`].
    pub fn remove_empty_backups(&self, dir: &Path, target: &str) -> Result<()> {
        match self {
            Fs::Local => remove_empty_backups(dir, target),
            Fs::Remote(r) => r.remove_empty_backups(dir, target),
        }
    }

    /// The bytes of the file at `path`; `None` when there is none.
    pub fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match self {
            Fs::Local => match fs::read(path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Fs::Remote(r) => r.read_file(path),
        }
    }
}

/// What is at `path` now: `None` when nothing is there. A symlink or
/// anything but a regular file is an error: replacing it would silently
/// turn a link (say, into an ACME client's archive) into a plain file.
pub fn observe(path: &Path) -> Result<Option<Existing>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::new("cannot inspect", path)(e)),
    };
    if meta.file_type().is_symlink() {
        return Err(FsError {
            op: "refusing to replace symlink",
            path: path.to_owned(),
            source: io::Error::other(
                "certctl replaces files atomically and would replace the link itself: \
                 point the target at the real file, or remove the link",
            ),
        });
    }
    if !meta.is_file() {
        return Err(FsError {
            op: "refusing to replace",
            path: path.to_owned(),
            source: io::Error::other("not a regular file"),
        });
    }
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(FsError::new("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(FsError::new("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(Existing {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        sha256: hasher.finalize().into(),
    }))
}

/// Writes `bytes` to a new temp file beside `final_path`: created 0600 and
/// exclusive, owner and mode set before the first byte, then fsynced.
/// Returns the temp path. On error the temp file is removed.
pub fn write_temp(
    final_path: &Path,
    deploy_id: &str,
    bytes: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<PathBuf> {
    let tmp = temp_path(final_path, deploy_id);
    write_temp_at(&tmp, bytes, mode, uid, gid)?;
    Ok(tmp)
}

/// Replaces the configuration file `path` (a file the agent writes for a
/// server, not a certificate file) with `bytes`, by the same protocol as
/// every target file: temp, owner and mode before the first byte, fsync,
/// rename, directory fsync. The replaced file's owner, group and mode are
/// kept; a new file gets `new_mode` and the agent's user. The temp file is
/// `.certctl-tmp-<tag>-<name>.part`: a server that loads every `.yml` or
/// `.json` of a directory (traefik's file provider) never loads it.
pub fn publish(path: &Path, bytes: &[u8], new_mode: u32, tag: &str) -> Result<()> {
    let (mode, uid, gid) = match fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => (m.mode() & 0o7777, Some(m.uid()), Some(m.gid())),
        Ok(m) if m.file_type().is_symlink() => {
            return Err(FsError {
                op: "refusing to replace symlink",
                path: path.to_owned(),
                source: io::Error::other(
                    "certctl replaces this file atomically and would replace the link itself: \
                     name the real file in the configuration",
                ),
            });
        }
        Ok(_) => {
            return Err(FsError {
                op: "refusing to replace",
                path: path.to_owned(),
                source: io::Error::other("not a regular file"),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (new_mode, None, None),
        Err(e) => return Err(FsError::new("cannot inspect", path)(e)),
    };
    let mut tmp = temp_path(path, tag).into_os_string();
    tmp.push(".part");
    let tmp = PathBuf::from(tmp);
    remove(&tmp)?;
    write_temp_at(&tmp, bytes, mode, uid, gid)?;
    if let Err(e) = rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(parent(path))
}

/// [`write_temp`] at the temp path `tmp`.
fn write_temp_at(
    tmp: &Path,
    bytes: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<()> {
    let tmp = tmp.to_owned();
    seam("cannot create temp file", &tmp)?;
    // Exclusive create: if the name exists, it is not ours to remove.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(FsError::new("cannot create temp file", &tmp))?;
    let result = (|| {
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid)
                .map_err(FsError::new("cannot set owner of", &tmp))?;
        }
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(FsError::new("cannot set mode of", &tmp))?;
        seam("cannot write", &tmp)?;
        file.write_all(bytes)
            .map_err(FsError::new("cannot write", &tmp))?;
        failpoint::written(&tmp);
        failpoint::hit("after-temp-write");
        seam("cannot fsync", &tmp)?;
        file.sync_all()
            .map_err(FsError::new("cannot fsync", &tmp))?;
        failpoint::synced(&tmp);
        failpoint::hit("after-temp-fsync");
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The fault-injection seam of the crash tests (see [`failpoint`]): a no-op
/// outside test builds.
fn seam(op: &'static str, path: &Path) -> Result<()> {
    failpoint::fs_op(op, path).map_err(FsError::new(op, path))
}

/// Atomically replaces `to` with `from` (same directory).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    seam("cannot rename into place", to)?;
    fs::rename(from, to).map_err(FsError::new("cannot rename into place", to))
}

/// Makes the directory's entries (renames, links, removals) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    seam("cannot fsync directory", dir)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(FsError::new("cannot fsync directory", dir))
}

/// Removes a file; a file that is already gone is fine.
pub fn remove(path: &Path) -> Result<()> {
    seam("cannot remove", path)?;
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new("cannot remove", path)(e)),
    }
}

/// Creates a directory (and missing parents) with mode 0700, and fsyncs the
/// parent of each directory it creates: the backup directories must still
/// exist after a crash that follows the rename of the files they preserve,
/// and fsyncing a directory makes its own entries durable, not its entry in
/// its parent.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    seam("cannot create directory", dir)?;
    create_private_dir(dir)?;
    // The agent's directories above it, up to `.certctl`, existing from
    // earlier runs or made by someone else: as private as documented
    // (`.certctl` may be 0711 for the generations layout).
    for ancestor in dir.ancestors().skip(1) {
        if ancestor.file_name().is_some_and(|n| n == AGENT_DIR) {
            tighten_dir(ancestor, 0o711)?;
            break;
        }
        tighten_dir(ancestor, 0o700)?;
    }
    Ok(())
}

/// Removes from the mode of the existing directory `dir` every bit that
/// `max` does not allow (a `rejected/` or backup directory someone made
/// 0755 would show keys to every local user), with a warning naming the
/// modes. A missing directory is left alone.
pub fn tighten_dir(dir: &Path, max: u32) -> Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::new("cannot inspect", dir)(e)),
    };
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || mode & !max == 0 {
        return Ok(());
    }
    let tight = mode & max;
    fs::set_permissions(dir, fs::Permissions::from_mode(tight))
        .map_err(FsError::new("cannot set mode of", dir))?;
    tracing::warn!(
        dir = %dir.display(),
        "{} was {mode:04o}, looser than the agent allows for it: tightened to {tight:04o}",
        dir.display()
    );
    Ok(())
}

/// [`make_private_dir`] for the agent's own directories (state, drop,
/// rejected): the same durability, outside the deploy fault seam.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        match fs::symlink_metadata(cur) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(cur),
            Err(e) => return Err(FsError::new("cannot inspect", cur)(e)),
        }
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            // Made meanwhile by a deploy to another target in the same
            // directory: still make sure its entry is durable before we
            // rely on it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(FsError::new("cannot create directory", d)(e)),
        }
        fsync_dir(parent(d))?;
    }
    tighten_dir(dir, 0o700)
}

/// Keeps the current `live` file as `backup` (a hard link: same inode,
/// owner and mode; or, where linking is refused, an fsynced copy with the
/// same owner and mode).
pub fn keep_backup(live: &Path, backup: &Path) -> Result<()> {
    remove(backup)?;
    seam("cannot keep backup of", live)?;
    match fs::hard_link(live, backup) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EPERM | nix::libc::EXDEV | nix::libc::EMLINK)
            ) =>
        {
            copy_preserving(live, backup)
        }
        Err(e) => Err(FsError::new("cannot keep backup of", live)(e)),
    }
}

fn copy_preserving(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(from).map_err(FsError::new("cannot inspect", from))?;
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(from)
        .map_err(FsError::new("cannot read", from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(to)
        .map_err(FsError::new("cannot create backup", to))?;
    // Owner may fail for a non-root agent; the mode never widens anyway.
    let _ = std::os::unix::fs::fchown(&dst, Some(meta.uid()), Some(meta.gid()));
    dst.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(FsError::new("cannot set mode of", to))?;
    io::copy(&mut src, &mut dst).map_err(FsError::new("cannot copy to", to))?;
    dst.sync_all().map_err(FsError::new("cannot fsync", to))
}

/// Puts `backup` back at `live` atomically: a new link (or copy) under a
/// temp name, then a rename. The backup itself stays. A private key (PEM
/// key text, a PKCS#12 or JKS keystore) loses its "other" permission bits
/// before it becomes visible, whatever mode it had before the run that is
/// undone: `Some(line)` says what was tightened, for the run's warnings.
pub fn restore(backup: &Path, live: &Path, deploy_id: &str) -> Result<Option<String>> {
    // The backup is a hard link of the live file when nothing replaced it
    // yet (a commit cut short): nothing to do, and renaming a link over
    // another link of the same inode would do nothing and leave the temp.
    if let (Ok(b), Ok(l)) = (fs::symlink_metadata(backup), fs::symlink_metadata(live))
        && (b.dev(), b.ino()) == (l.dev(), l.ino())
    {
        return tighten_private(live, live);
    }
    // The backup's inode is what becomes live: tightened first, while it is
    // only in the private backup directory.
    let tightened = tighten_private(backup, live)?;
    let tmp = temp_path(live, &format!("{deploy_id}-restore"));
    remove(&tmp)?;
    keep_backup(backup, &tmp)?;
    if let Err(e) = rename(&tmp, live) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tightened)
}

/// Removes the "other" permission bits of `path` when it holds a private
/// key; `shown` is the path named in the warning.
fn tighten_private(path: &Path, shown: &Path) -> Result<Option<String>> {
    let meta = fs::symlink_metadata(path).map_err(FsError::new("cannot inspect", path))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() || mode & 0o007 == 0 || !holds_private_key(path) {
        return Ok(None);
    }
    let tight = mode & !0o007;
    seam("cannot set mode of", path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(tight))
        .map_err(FsError::new("cannot set mode of", path))?;
    Ok(Some(format!(
        "{} holds a private key and was {mode:04o} before: restored as {tight:04o} \
         (a key file never keeps an \"other\" permission bit)",
        shown.display()
    )))
}

/// Whether the file at `path` holds a private key: PEM key text (a key
/// file, or haproxy's combined file), or a keystore (PKCS#12, JKS).
pub fn holds_private_key(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut head = Vec::with_capacity(8192);
    if file.take(1024 * 1024).read_to_end(&mut head).is_err() {
        return false;
    }
    is_private_key(&head)
}

/// Points the symlink `link` at `target` atomically: a temp symlink beside
/// it (`.certctl-tmp-<tag>-<name>`), then a `rename` over `link`. Whatever
/// was at `link` (a symlink, or a regular file being converted) is
/// replaced in one step. The caller fsyncs the directory.
pub fn switch_link(link: &Path, target: &Path, tag: &str) -> Result<()> {
    let tmp = temp_path(link, tag);
    remove(&tmp)?;
    seam("cannot create symlink", &tmp)?;
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(FsError::new("cannot create symlink", &tmp))?;
    if let Err(e) = rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Where the symlink `link` points, as written; `None` when `link` does not
/// exist. Anything but a symlink there is an error.
pub fn read_link(link: &Path) -> Result<Option<PathBuf>> {
    match fs::symlink_metadata(link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FsError::new("cannot inspect", link)(e)),
        Ok(m) if m.file_type().is_symlink() => fs::read_link(link)
            .map(Some)
            .map_err(FsError::new("cannot read symlink", link)),
        Ok(_) => Err(FsError {
            op: "expected a symlink at",
            path: link.to_owned(),
            source: io::Error::other(
                "the generations layout keeps a symlink here; move the file away",
            ),
        }),
    }
}

/// Creates `dir` (one level) with `mode` if missing and fsyncs its parent;
/// an existing directory gets `mode`.
pub fn make_dir_with_mode(dir: &Path, mode: u32) -> Result<()> {
    seam("cannot create directory", dir)?;
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fsync_dir(parent(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))
                .map_err(FsError::new("cannot set mode of", dir))
        }
        Err(e) => Err(FsError::new("cannot create directory", dir)(e)),
    }
}

/// Removes every `.certctl-tmp-*` regular file or symlink in `dir` (a
/// symlink is removed, never followed) and returns their paths. Only for a directory whose target is
/// locked: a temp file is in use only while its run holds the lock.
pub fn remove_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FsError::new("cannot list", dir)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(FsError::new("cannot list", dir))?;
        let is_temp = entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX);
        let is_file = entry
            .file_type()
            .is_ok_and(|t| t.is_file() || t.is_symlink());
        if is_temp && is_file {
            remove(&entry.path())?;
            removed.push(entry.path());
        }
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

/// Removes a directory tree the agent owns (a backup generation).
pub fn remove_tree(dir: &Path) -> Result<()> {
    match retire_tree(dir)? {
        Some(doomed) => remove_retired(&doomed),
        None => Ok(()),
    }
}

/// The first half of [`remove_tree`]: the tree is gone from its name in
/// one step, renamed to its partial name, so a kill during the removal
/// never leaves half a set under its real name (a partial one is swept at
/// the next start). Returns what [`remove_retired`] must remove (`None`:
/// there was nothing). A name starting with `.` is already partial.
pub fn retire_tree(dir: &Path) -> Result<Option<PathBuf>> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    if name.starts_with('.') {
        return Ok(Some(dir.to_owned()));
    }
    let partial = partial_of(dir);
    // A partial left by an earlier kill is in the way of the rename.
    if fs::symlink_metadata(&partial).is_ok() {
        fs::remove_dir_all(&partial).map_err(FsError::new("cannot remove", &partial))?;
    }
    match fs::rename(dir, &partial) {
        Ok(()) => Ok(Some(partial)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FsError::new("cannot remove", dir)(e)),
    }
}

/// The second half of [`remove_tree`]: removes a tree [`retire_tree`]
/// renamed away. Nothing else uses that name meanwhile, so it needs no
/// lock; where freeing blocks is slow (unlinks on a `discard` mount) a
/// deploy leaves it until after it has answered.
pub fn remove_retired(doomed: &Path) -> Result<()> {
    match fs::remove_dir_all(doomed) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new("cannot remove", doomed)(e)),
    }
}

/// Removes every `.*.partial` directory in `dir` (sets a killed run did
/// not finish filling). Only while the target is locked.
pub fn remove_partials(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FsError::new("cannot list", dir)(e)),
    };
    let mut removed = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            && name.ends_with(".partial")
            && e.file_type().is_ok_and(|t| t.is_dir())
        {
            remove_tree(&e.path())?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// The deploy ids that have backups for `target` in `dir`, oldest first
/// (in the order their runs wrote them).
pub fn list_backups(dir: &Path, target: &str) -> Result<Vec<String>> {
    let root = dir.join(AGENT_DIR).join("backup").join(target);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FsError::new("cannot list", &root)(e)),
    };
    // A directory with nothing in it is not a backup: a run killed between
    // creating it and linking the first file into it.
    let entries: Vec<fs::DirEntry> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
        .collect();
    Ok(in_creation_order(entries, ""))
}

/// Backup sets of `target` in `dir` whose every file is the live file of
/// the same name (the same inode): a set a rollback put back, left by a
/// stop between the rollback's outcome and its clean-up. They are live,
/// not backups: removed.
pub fn remove_live_backups(dir: &Path, target: &str) -> Result<()> {
    for id in list_backups(dir, target)? {
        let set = backup_dir(dir, target, &id);
        let Ok(entries) = fs::read_dir(&set) else {
            continue;
        };
        let live = entries.filter_map(|e| e.ok()).all(|e| {
            let (Ok(b), Ok(l)) = (
                fs::symlink_metadata(e.path()),
                fs::symlink_metadata(dir.join(e.file_name())),
            ) else {
                return false;
            };
            b.is_file() && (b.dev(), b.ino()) == (l.dev(), l.ino())
        });
        if live {
            remove_tree(&set)?;
        }
    }
    Ok(())
}

/// Backup directories of `target` in `dir` that hold nothing (a run was
/// killed between creating one and linking its first file), removed.
pub fn remove_empty_backups(dir: &Path, target: &str) -> Result<()> {
    let root = dir.join(AGENT_DIR).join("backup").join(target);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::new("cannot list", &root)(e)),
    };
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        // A partial name is a set being removed (or left by a kill: swept
        // at start), not an empty backup.
        if e.file_type().is_ok_and(|t| t.is_dir())
            && !e.file_name().to_string_lossy().starts_with('.')
            && fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none())
        {
            remove_tree(&path)?;
        }
    }
    Ok(())
}

/// The names of `entries` without `prefix`, oldest first by the time each
/// directory was last written (a backup or a generation is filled by its
/// run under the target's lock and never written again), then by name. A
/// deploy's id is taken when the request arrives, so with deploys waiting
/// for the lock, id order is not the order in which they ran.
pub fn in_creation_order(entries: Vec<fs::DirEntry>, prefix: &str) -> Vec<String> {
    let mut named: Vec<(std::time::SystemTime, String)> = entries
        .into_iter()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_prefix(prefix)?.to_owned();
            let written = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            Some((written, name))
        })
        .collect();
    named.sort();
    named.into_iter().map(|(_, name)| name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_temp_sets_mode_and_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("web.key");
        let tmp = write_temp(&live, "d1", b"secret", 0o640, None, None).unwrap();
        assert!(
            tmp.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(TEMP_PREFIX)
        );
        assert_eq!(fs::metadata(&tmp).unwrap().mode() & 0o777, 0o640);
        // A second writer with the same id must not clobber it.
        assert!(write_temp(&live, "d1", b"other", 0o600, None, None).is_err());
        assert_eq!(fs::read(&tmp).unwrap(), b"secret");
    }

    #[test]
    fn publish_replaces_a_config_file_keeping_its_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("certctl-web.yml");
        publish(&file, b"one", 0o644, "hook").unwrap();
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o644);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        // A temp left by a crash is replaced, not in the way.
        let stale = dir.path().join(".certctl-tmp-hook-certctl-web.yml.part");
        fs::write(&stale, b"partial").unwrap();
        publish(&file, b"two", 0o644, "hook").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o640);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["certctl-web.yml"]);
        let link = dir.path().join("link.yml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = publish(&link, b"x", 0o644, "hook").unwrap_err().to_string();
        assert!(err.contains("refusing to replace symlink"), "{err}");
    }

    #[test]
    fn backup_and_restore_round_trip_keeps_inode_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("web.crt");
        fs::write(&live, b"old").unwrap();
        fs::set_permissions(&live, fs::Permissions::from_mode(0o604)).unwrap();
        let bdir = backup_dir(dir.path(), "web", "d1");
        make_private_dir(&bdir).unwrap();
        let backup = bdir.join("web.crt");
        keep_backup(&live, &backup).unwrap();
        let tmp = write_temp(&live, "d1", b"new", 0o644, None, None).unwrap();
        rename(&tmp, &live).unwrap();
        assert_eq!(fs::read(&live).unwrap(), b"new");
        restore(&backup, &live, "d1").unwrap();
        assert_eq!(fs::read(&live).unwrap(), b"old");
        assert_eq!(fs::metadata(&live).unwrap().mode() & 0o777, 0o604);
        assert_eq!(
            list_backups(dir.path(), "web").unwrap(),
            vec!["d1".to_owned()]
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn make_private_dir_creates_every_missing_level_private_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let deep = backup_dir(dir.path(), "web", "d1");
        make_private_dir(&deep).unwrap();
        for d in [
            dir.path().join(AGENT_DIR),
            dir.path().join(AGENT_DIR).join("backup"),
            dir.path().join(AGENT_DIR).join("backup/web"),
            deep.clone(),
        ] {
            assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700, "{d:?}");
        }
        make_private_dir(&deep).unwrap();
        make_private_dir(&backup_dir(dir.path(), "web", "d2")).unwrap();
        // An empty directory is no backup set: each gets its file, in order.
        File::create(deep.join("cert.pem")).unwrap();
        File::create(backup_dir(dir.path(), "web", "d2").join("cert.pem")).unwrap();
        assert_eq!(list_backups(dir.path(), "web").unwrap(), ["d1", "d2"]);
        // A file in the way is an error, not a silent success.
        let blocked = dir.path().join("file");
        File::create(&blocked).unwrap();
        let msg = make_private_dir(&blocked.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot"), "{msg}");
    }

    #[test]
    fn errors_an_operator_can_fix_say_how() {
        let e = FsError {
            op: "cannot create temp file",
            path: PathBuf::from("/etc/nginx/tls/.certctl-tmp-x"),
            source: io::Error::from_raw_os_error(nix::libc::EROFS),
        };
        assert!(e.to_string().contains("ReadWritePaths="), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/cert.pem");
        let msg = write_temp(&missing, "d1", b"x", 0o644, None, None)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("cannot create temp file"), "{msg}");
    }

    #[test]
    fn observe_refuses_symlinks_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = observe(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        assert!(observe(&dir.path().join("none")).unwrap().is_none());
        let e = observe(&real).unwrap().unwrap();
        assert_eq!(e.sha256, <[u8; 32]>::from(Sha256::digest(b"x")));
    }
}
