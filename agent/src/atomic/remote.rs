//! The same protocol as the rest of [`atomic`](super), for a target whose
//! files are on another host: every step is an SFTP request over the
//! agent's SSH connection to it ([`crate::remote`]).
//!
//! The order is the local one, step for step: the temp file is created
//! exclusive with mode 0600, given its owner and final mode (`fsetstat`)
//! before the first byte, written, fsynced (`fsync@openssh.com`), renamed
//! over the live file (`posix-rename@openssh.com`: never the plain SFTP
//! rename, which refuses to replace a file), and the directory is fsynced
//! where the server allows it. Backups are hard links
//! (`hardlink@openssh.com`) in `.certctl/backup/<target>/<id>/` beside the
//! files, or fsynced copies where linking is refused.
//!
//! What differs, and why (docs/remote.md): SFTP reports no inode, so "the
//! backup is the live file" is told by content, owner and mode rather than
//! by inode; and a server without `fsync@openssh.com` cannot make a
//! directory durable, which is logged once per connection rather than
//! failing every deploy.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::base::{
    AGENT_DIR, Existing, FsError, Result, TEMP_PREFIX, backup_dir, is_private_key, parent,
    partial_of, temp_path,
};
use crate::config::keystore::CREDENTIALS_DIRECTORY;
use crate::config::{SshConfig, SshIdentity};
use crate::failpoint;
use crate::remote::{Attrs, Endpoint, Pool, Sftp};
use crate::sync::lock;

/// The most a file read back from the remote host may hold: target files
/// are certificates and keys.
const READ_LIMIT: usize = 1024 * 1024;

/// The connections of this process, one per remote host (reused across
/// deploys).
static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets where the SSH control sockets live (`<state_dir>/ssh`, made
/// private by the caller). Called once at start; later calls are ignored.
pub fn set_control_dir(dir: PathBuf) {
    let _ = POOL.set(Pool::new(dir));
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(std::env::temp_dir().join("certctl-ssh")))
}

/// `ssh` as configured, with the key's path resolved (a credential is read
/// from `$CREDENTIALS_DIRECTORY`).
pub fn endpoint(ssh: &SshConfig) -> io::Result<Endpoint> {
    let identity_file = match &ssh.identity {
        SshIdentity::File(p) => p.clone(),
        SshIdentity::Credential(name) => match std::env::var_os(CREDENTIALS_DIRECTORY) {
            Some(dir) => Path::new(&dir).join(name),
            None => {
                return Err(io::Error::other(format!(
                    "the SSH key credential {name} is not available: CREDENTIALS_DIRECTORY is \
                     not set; run the agent under systemd with LoadCredential={name}:<file> (or \
                     use identity_file)"
                )));
            }
        },
    };
    Ok(Endpoint {
        host: ssh.host.clone(),
        port: ssh.port,
        user: ssh.user.clone(),
        identity_file,
        known_hosts: ssh.known_hosts.clone(),
        connect_timeout: ssh.connect_timeout,
    })
}

/// One SFTP channel to a remote target's host, opened on first use over
/// the host's shared connection and reopened after it broke.
pub struct RemoteFs {
    ssh: SshConfig,
    sftp: Mutex<Option<Sftp>>,
    /// The server cannot fsync a directory: said once.
    dir_sync_unsupported: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RemoteFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteFs({})", shown(&self.ssh))
    }
}

/// `user@host:port`, as errors name the remote host.
pub fn shown(ssh: &SshConfig) -> String {
    format!("{}@{}:{}", ssh.user, ssh.host, ssh.port)
}

impl RemoteFs {
    pub fn new(ssh: SshConfig) -> Arc<RemoteFs> {
        Arc::new(RemoteFs {
            ssh,
            sftp: Mutex::new(None),
            dir_sync_unsupported: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The host's connection, for running commands there.
    pub fn session(&self) -> io::Result<Arc<crate::remote::Session>> {
        let ep = endpoint(&self.ssh)?;
        pool()
            .session(&ep)
            .map_err(|e| io::Error::other(format!("on {}: {e}", shown(&self.ssh))))
    }

    /// Runs `f` on the channel, opening it first when needed. A channel
    /// that failed below SFTP (broken pipe, end of stream, stalled) is
    /// dropped, so the next call opens a new one.
    fn with<T>(&self, f: impl FnOnce(&mut Sftp) -> io::Result<T>) -> io::Result<T> {
        let mut guard = lock(&self.sftp);
        if guard.is_none() {
            let session = self.session()?;
            let sftp = session
                .sftp()
                .map_err(|e| io::Error::other(format!("on {}: {e}", shown(&self.ssh))))?;
            *guard = Some(sftp);
        }
        let Some(sftp) = guard.as_mut() else {
            return Err(io::Error::other("no SFTP channel"));
        };
        let result = f(sftp);
        if let Err(e) = &result
            && matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::ConnectionReset
            )
        {
            *guard = None;
        }
        result
    }

    fn err(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FsError {
        let path = path.to_owned();
        let host = shown(&self.ssh);
        move |e| FsError {
            op,
            path,
            source: io::Error::new(e.kind(), format!("on {host}: {e}")),
        }
    }

    fn lstat(&self, path: &Path) -> io::Result<Option<Attrs>> {
        match self.with(|s| s.lstat(path)) {
            Ok(a) => Ok(Some(a)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `user@host:port`.
    pub fn host(&self) -> String {
        shown(&self.ssh)
    }

    /// [`super::Fs::exists`].
    pub fn exists(&self, path: &Path) -> Result<bool> {
        self.lstat(path)
            .map(|a| a.is_some())
            .map_err(self.err("cannot inspect", path))
    }

    /// [`super::Fs::is_file`].
    pub fn is_file(&self, path: &Path) -> Result<bool> {
        self.lstat(path)
            .map(|a| a.is_some_and(|a| a.is_file()))
            .map_err(self.err("cannot inspect", path))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.with(|s| {
            let h = s.open_read(path)?;
            let bytes = s.read_to_end(&h, READ_LIMIT);
            let closed = s.close(h);
            let bytes = bytes?;
            closed?;
            Ok(bytes)
        })
    }

    /// Sets the mode of the file or directory `path`: opened for reading
    /// (OpenSSH's server opens a directory too) and `fsetstat`, which
    /// acts on what was opened, never on what a symlink swapped in later
    /// would name.
    fn set_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.with(|s| {
            let h = s.open_read(path)?;
            let set = s.fsetstat(&h, None, None, Some(mode));
            let closed = s.close(h);
            set.and(closed)
        })
    }

    /// [`super::Fs::observe`].
    pub fn observe(&self, path: &Path) -> Result<Option<Existing>> {
        let Some(attrs) = self.lstat(path).map_err(self.err("cannot inspect", path))? else {
            return Ok(None);
        };
        if attrs.is_symlink() {
            return Err(FsError {
                op: "refusing to replace symlink",
                path: path.to_owned(),
                source: io::Error::other(format!(
                    "on {}: certctl replaces files atomically and would replace the link itself: \
                     point the target at the real file, or remove the link",
                    shown(&self.ssh)
                )),
            });
        }
        if !attrs.is_file() {
            return Err(FsError {
                op: "refusing to replace",
                path: path.to_owned(),
                source: io::Error::other(format!("on {}: not a regular file", shown(&self.ssh))),
            });
        }
        let bytes = self.read(path).map_err(self.err("cannot read", path))?;
        Ok(Some(Existing {
            uid: attrs.uid,
            gid: attrs.gid,
            mode: attrs.perm(),
            sha256: Sha256::digest(&bytes).into(),
        }))
    }

    /// The bytes of the remote file `path`; `None` when there is none.
    pub fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("on {}: {e}", shown(&self.ssh)),
            )),
        }
    }

    /// [`super::Fs::write_temp`].
    pub fn write_temp(
        &self,
        final_path: &Path,
        deploy_id: &str,
        bytes: &[u8],
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<PathBuf> {
        let tmp = temp_path(final_path, deploy_id);
        self.write_temp_at(&tmp, bytes, mode, uid, gid)?;
        Ok(tmp)
    }

    fn write_temp_at(
        &self,
        tmp: &Path,
        bytes: &[u8],
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let h = self
            .with(|s| s.create_excl(tmp, 0o600))
            .map_err(self.err("cannot create temp file", tmp))?;
        let written = (|| {
            if uid.is_some() || gid.is_some() {
                self.with(|s| s.fsetstat(&h, uid, gid, None))
                    .map_err(self.err("cannot set owner of", tmp))?;
            }
            self.with(|s| s.fsetstat(&h, None, None, Some(mode)))
                .map_err(self.err("cannot set mode of", tmp))?;
            self.with(|s| s.write_all(&h, bytes))
                .map_err(self.err("cannot write", tmp))?;
            failpoint::hit("after-temp-write");
            self.with(|s| s.fsync(&h))
                .map_err(self.err("cannot fsync", tmp))?;
            failpoint::hit("after-temp-fsync");
            Ok(())
        })();
        let closed = self
            .with(|s| s.close(h))
            .map_err(self.err("cannot close", tmp));
        if let Err(e) = written.and(closed) {
            let _ = self.with(|s| s.remove(tmp));
            return Err(e);
        }
        Ok(())
    }

    /// [`super::Fs::rename`].
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.with(|s| s.posix_rename(from, to))
            .map_err(self.err("cannot rename into place", to))
    }

    /// [`super::Fs::fsync_dir`]: where the server cannot fsync a
    /// directory, a warning (once per connection) instead of a failure.
    pub fn fsync_dir(&self, dir: &Path) -> Result<()> {
        match self.with(|s| s.fsync_dir(dir)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                if !self
                    .dir_sync_unsupported
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        host = %shown(&self.ssh),
                        "the SFTP server on {} cannot fsync a directory ({e}): renames there \
                         become durable when its filesystem commits them",
                        shown(&self.ssh)
                    );
                }
                Ok(())
            }
            Err(e) => Err(self.err("cannot fsync directory", dir)(e)),
        }
    }

    /// [`super::Fs::remove`].
    pub fn remove(&self, path: &Path) -> Result<()> {
        match self.with(|s| s.remove(path)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("cannot remove", path)(e)),
        }
    }

    /// [`super::Fs::make_private_dir`]: each missing level created 0700
    /// and its parent fsynced; the agent's levels up to `.certctl` made
    /// private.
    pub fn make_private_dir(&self, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut cur = dir;
        loop {
            match self.lstat(cur).map_err(self.err("cannot inspect", cur))? {
                Some(a) if a.is_dir() => break,
                Some(_) => {
                    return Err(self.err("cannot create directory", dir)(io::Error::other(
                        format!("{} is not a directory", cur.display()),
                    )));
                }
                None => missing.push(cur),
            }
            match cur.parent() {
                Some(p) if !p.as_os_str().is_empty() => cur = p,
                _ => break,
            }
        }
        for d in missing.into_iter().rev() {
            match self.with(|s| s.mkdir(d, 0o700)) {
                Ok(()) => {}
                Err(e) if self.lstat(d).ok().flatten().is_some_and(|a| a.is_dir()) => {
                    let _ = e;
                }
                Err(e) => return Err(self.err("cannot create directory", d)(e)),
            }
            self.fsync_dir(parent(d))?;
        }
        for ancestor in dir.ancestors() {
            let Some(a) = self
                .lstat(ancestor)
                .map_err(self.err("cannot inspect", ancestor))?
            else {
                break;
            };
            let agent_dir = ancestor.file_name().is_some_and(|n| n == AGENT_DIR);
            let max = if agent_dir { 0o711 } else { 0o700 };
            if a.is_dir() && a.perm() & !max != 0 {
                self.set_mode(ancestor, a.perm() & max)
                    .map_err(self.err("cannot set mode of", ancestor))?;
            }
            if agent_dir {
                break;
            }
        }
        Ok(())
    }

    /// [`super::Fs::keep_backup`]: a hard link, or a copy where linking is
    /// refused.
    pub fn keep_backup(&self, live: &Path, backup: &Path) -> Result<()> {
        self.remove(backup)?;
        match self.with(|s| s.hardlink(live, backup)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(self.err("cannot keep backup of", live)(e))
            }
            Err(_) => self.copy_preserving(live, backup),
        }
    }

    fn copy_preserving(&self, from: &Path, to: &Path) -> Result<()> {
        let attrs = self
            .lstat(from)
            .map_err(self.err("cannot inspect", from))?
            .ok_or_else(|| {
                self.err("cannot inspect", from)(io::Error::from(io::ErrorKind::NotFound))
            })?;
        let bytes = self.read(from).map_err(self.err("cannot read", from))?;
        // The owner may be refused to an unprivileged account; the mode
        // never widens anyway.
        let h = self
            .with(|s| s.create_excl(to, 0o600))
            .map_err(self.err("cannot create backup", to))?;
        let _ = self.with(|s| s.fsetstat(&h, Some(attrs.uid), Some(attrs.gid), None));
        let done = self
            .with(|s| {
                s.fsetstat(&h, None, None, Some(attrs.perm()))?;
                s.write_all(&h, &bytes)?;
                s.fsync(&h)
            })
            .map_err(self.err("cannot copy to", to));
        let closed = self
            .with(|s| s.close(h))
            .map_err(self.err("cannot close", to));
        done.and(closed)
    }

    /// Whether the backup and the live file hold the same bytes with the
    /// same owner and mode: what a hard link of one inode looks like
    /// through SFTP, which reports no inode.
    fn same_file(&self, a: &Path, b: &Path) -> io::Result<bool> {
        let (Some(x), Some(y)) = (self.lstat(a)?, self.lstat(b)?) else {
            return Ok(false);
        };
        if !(x.is_file() && y.is_file())
            || (x.size, x.uid, x.gid, x.mode) != (y.size, y.uid, y.gid, y.mode)
        {
            return Ok(false);
        }
        Ok(self.read(a)? == self.read(b)?)
    }

    /// [`super::Fs::restore`].
    pub fn restore(&self, backup: &Path, live: &Path, deploy_id: &str) -> Result<Option<String>> {
        let tightened = self.tighten_private(backup, live)?;
        let tmp = temp_path(live, &format!("{deploy_id}-restore"));
        self.remove(&tmp)?;
        self.keep_backup(backup, &tmp)?;
        if let Err(e) = self.rename(&tmp, live) {
            let _ = self.remove(&tmp);
            return Err(e);
        }
        // Renaming a link over another link of the same inode does
        // nothing and leaves the temp name: gone either way.
        self.remove(&tmp)?;
        Ok(tightened)
    }

    fn tighten_private(&self, path: &Path, shown_path: &Path) -> Result<Option<String>> {
        let attrs = self
            .lstat(path)
            .map_err(self.err("cannot inspect", path))?
            .ok_or_else(|| {
                self.err("cannot inspect", path)(io::Error::from(io::ErrorKind::NotFound))
            })?;
        let mode = attrs.perm();
        if !attrs.is_file() || mode & 0o007 == 0 {
            return Ok(None);
        }
        let bytes = self.read(path).map_err(self.err("cannot read", path))?;
        if !is_private_key(&bytes) {
            return Ok(None);
        }
        let tight = mode & !0o007;
        self.set_mode(path, tight)
            .map_err(self.err("cannot set mode of", path))?;
        Ok(Some(format!(
            "{} on {} holds a private key and was {mode:04o} before: restored as {tight:04o} \
             (a key file never keeps an \"other\" permission bit)",
            shown_path.display(),
            shown(&self.ssh)
        )))
    }

    /// [`super::Fs::remove_temps`].
    pub fn remove_temps(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        self.remove_temps_where(dir, |_| true)
    }

    /// [`Self::remove_temps`] of the temp files whose name `chosen`
    /// accepts: a remote target's own, when other targets may be
    /// deploying in the same directory.
    pub fn remove_temps_where(
        &self,
        dir: &Path,
        chosen: impl Fn(&str) -> bool,
    ) -> Result<Vec<PathBuf>> {
        let entries = self.list(dir)?;
        let mut removed = Vec::new();
        for (name, attrs) in entries {
            if name.starts_with(TEMP_PREFIX)
                && chosen(&name)
                && (attrs.is_file() || attrs.is_symlink())
            {
                let path = dir.join(&name);
                self.remove(&path)?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            self.fsync_dir(dir)?;
        }
        Ok(removed)
    }

    /// The entries of `dir`; none when it does not exist.
    fn list(&self, dir: &Path) -> Result<Vec<(String, Attrs)>> {
        match self.with(|s| s.read_dir(dir)) {
            Ok(e) => Ok(e
                .into_iter()
                .map(|(name, a)| (name.to_string_lossy().into_owned(), a))
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err("cannot list", dir)(e)),
        }
    }

    /// [`super::Fs::remove_tree`]: renamed to its partial name first, then
    /// emptied and removed.
    pub fn remove_tree(&self, dir: &Path) -> Result<()> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let doomed = if name.starts_with('.') {
            dir.to_owned()
        } else {
            let partial = partial_of(dir);
            if self
                .lstat(&partial)
                .map_err(self.err("cannot inspect", &partial))?
                .is_some()
            {
                self.remove_all(&partial)?;
            }
            match self.with(|s| s.posix_rename(dir, &partial)) {
                Ok(()) => partial,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(self.err("cannot remove", dir)(e)),
            }
        };
        self.remove_all(&doomed)
    }

    fn remove_all(&self, dir: &Path) -> Result<()> {
        for (name, attrs) in self.list(dir)? {
            let path = dir.join(&name);
            if attrs.is_dir() {
                self.remove_all(&path)?;
            } else {
                self.remove(&path)?;
            }
        }
        match self.with(|s| s.rmdir(dir)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("cannot remove", dir)(e)),
        }
    }

    /// [`super::Fs::remove_partials`].
    pub fn remove_partials(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (name, attrs) in self.list(dir)? {
            if name.starts_with('.') && name.ends_with(".partial") && attrs.is_dir() {
                let path = dir.join(&name);
                self.remove_tree(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// [`super::Fs::list_backups`]: oldest first by the time each set was
    /// written, then by name.
    pub fn list_backups(&self, dir: &Path, target: &str) -> Result<Vec<String>> {
        let root = dir.join(AGENT_DIR).join("backup").join(target);
        let mut sets = Vec::new();
        for (name, attrs) in self.list(&root)? {
            if !attrs.is_dir() || name.starts_with('.') {
                continue;
            }
            if self.list(&root.join(&name))?.is_empty() {
                continue;
            }
            sets.push((attrs.mtime, name));
        }
        sets.sort();
        Ok(sets.into_iter().map(|(_, n)| n).collect())
    }

    /// [`super::Fs::remove_live_backups`]: a set whose every file is the
    /// live file (by content, owner and mode) is removed.
    pub fn remove_live_backups(&self, dir: &Path, target: &str) -> Result<()> {
        for id in self.list_backups(dir, target)? {
            let set = backup_dir(dir, target, &id);
            let entries = self.list(&set)?;
            let mut live = !entries.is_empty();
            for (name, _) in &entries {
                if !self
                    .same_file(&set.join(name), &dir.join(name))
                    .map_err(self.err("cannot inspect", &set))?
                {
                    live = false;
                    break;
                }
            }
            if live {
                self.remove_tree(&set)?;
            }
        }
        Ok(())
    }

    /// [`super::Fs::remove_empty_backups`].
    pub fn remove_empty_backups(&self, dir: &Path, target: &str) -> Result<()> {
        let root = dir.join(AGENT_DIR).join("backup").join(target);
        for (name, attrs) in self.list(&root)? {
            let path = root.join(&name);
            if attrs.is_dir() && self.list(&path)?.is_empty() {
                self.remove_tree(&path)?;
            }
        }
        Ok(())
    }
}
