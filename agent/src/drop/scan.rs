//! Reading the drop directory, which is untrusted input: listing it, and
//! reading one drop into memory with every check that does not need to
//! parse PEM.
//!
//! Guarantees of [`read`]:
//! - **no symlink is ever followed**: every open is relative to a directory
//!   descriptor with `O_NOFOLLOW`, and the type is checked first with
//!   `fstatat(AT_SYMLINK_NOFOLLOW)` so that a FIFO or device is never
//!   opened; the opened file's `fstat` must be the same inode;
//! - only regular files are read, each at most [`Limits::max_file_bytes`],
//!   a drop at most [`Limits::max_drop_bytes`] in all, a directory drop at
//!   most [`Limits::max_files`] files, flat (no subdirectories);
//! - with `drop_owners` set, the drop (the directory and every file in it)
//!   must be owned by one of those users or groups, read from `fstat`;
//! - file contents live in zeroize-on-drop buffers sized before reading.
//!
//! Nothing here writes; [`reject`](super::reject) owns every change.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use zeroize::Zeroizing;

use super::names::{self, DIR_FILE_EXTENSIONS};
use crate::config::{Host, SystemHost};

/// Size and count limits of one drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest file read (the same limit as `certctl deploy` inputs).
    pub max_file_bytes: u64,
    /// Largest drop, all its files together.
    pub max_drop_bytes: u64,
    /// Most files in a directory drop (ignored names not counted).
    pub max_files: usize,
}

/// The limits the agent applies.
pub const LIMITS: Limits = Limits {
    max_file_bytes: 1024 * 1024,
    max_drop_bytes: 1024 * 1024,
    max_files: 16,
};

pub use crate::model::drop::Form;

/// Which form the entry's name promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    File,
    Directory,
}

/// Who may own dropped files (`agent.drop_owners`), resolved to ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owners {
    uids: Vec<u32>,
    gids: Vec<u32>,
    /// As configured, for messages.
    names: Vec<String>,
}

impl Owners {
    /// Resolves configured names on this host: a name may be a user, a
    /// group, or both; a number is a uid or a gid. Names that no longer
    /// resolve allow nothing.
    pub fn resolve(names: &[String]) -> Self {
        Self::resolve_with(names, &SystemHost)
    }

    /// [`Self::resolve`] against `host` (a seam for tests).
    pub fn resolve_with(names: &[String], host: &dyn Host) -> Self {
        let mut o = Owners {
            names: names.to_vec(),
            ..Owners::default()
        };
        for n in names {
            if let Ok(id) = n.parse::<u32>() {
                o.uids.push(id);
                o.gids.push(id);
                continue;
            }
            if let Ok(Some(uid)) = host.user_id(n) {
                o.uids.push(uid);
            }
            if let Ok(Some(gid)) = host.group_id(n) {
                o.gids.push(gid);
            }
        }
        o
    }

    /// Whether a file owned by `uid`:`gid` is accepted.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.names.is_empty() || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// A drop read into memory: named PEM inputs for the bundle check.
pub struct Contents {
    pub form: Form,
    /// (name for messages, bytes), directory files sorted by name.
    pub files: Vec<(String, Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // May hold a private key: names and sizes only.
        let files: Vec<(&str, usize)> = self
            .files
            .iter()
            .map(|(n, b)| (n.as_str(), b.len()))
            .collect();
        f.debug_struct("Contents")
            .field("form", &self.form)
            .field("files", &files)
            .finish()
    }
}

/// Why a drop cannot be used, before its PEM is even parsed. The message
/// names the file and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "{shown} is not a drop name: a drop is <name>.pem or a directory <name>/, where <name> \
         uses 1 to 63 characters from a-z, 0-9, '.', '_' and '-' and starts with a letter or digit"
    )]
    InvalidName { shown: String },
    #[error(
        "{shown} is a {found}, not a drop: a bundle file is named <name>.pem, and a directory \
         drop <name>/ is a directory (rename it accordingly)"
    )]
    NotADrop { shown: String, found: &'static str },
    #[error(
        "{shown} is a symbolic link: the agent never follows links in the drop directory; \
         drop the file itself (e.g. cp -L, or install -m 0600 SRC DEST)"
    )]
    Symlink { shown: String },
    #[error(
        "{shown} has {links} hard links: it may be another file's name (someone else's file, \
         linked in), so it is not read; drop a file of its own (copy it, e.g. install -m 0600 \
         SRC DEST, or cat it into a temp file and rename that in)"
    )]
    HardLinked { shown: String, links: u64 },
    #[error("{shown} is a {kind}, not a regular file: drop plain files only")]
    NotRegular { shown: String, kind: &'static str },
    #[error(
        "{shown} is {size} bytes, more than the {limit}-byte limit: a certificate set is a few \
         KiB; drop only the key, the certificate and its chain"
    )]
    TooLarge {
        shown: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{shown} holds more than {limit} files: a directory drop holds the key, the certificate \
         and the chain; remove the rest"
    )]
    TooManyFiles { shown: String, limit: usize },
    #[error(
        "{shown} is a directory inside a directory drop: directory drops are flat; \
         put the files directly in the drop's directory"
    )]
    Subdirectory { shown: String },
    #[error(
        "{shown} is not a .{} file: remove it from the directory drop, or rename it if it \
         holds PEM", DIR_FILE_EXTENSIONS.join(", .")
    )]
    UnexpectedFile { shown: String },
    #[error(
        "{shown} is owned by {owner}, which agent.drop_owners ({allowed}) does not allow: \
         have an allowed user write it, chown it, or add its owner to drop_owners"
    )]
    Owner {
        shown: String,
        owner: String,
        allowed: String,
    },
    #[error(
        "{shown} holds no .{} file yet", DIR_FILE_EXTENSIONS.join(", .")
    )]
    Empty { shown: String },
    #[error("{shown} changed while it was being read: write drops elsewhere and rename them in")]
    Changed { shown: String },
    #[error("cannot read {shown}: {errno}{}", remedy(*.errno))]
    Io { shown: String, errno: Errno },
}

fn remedy(e: Errno) -> &'static str {
    match e {
        Errno::EACCES | Errno::EPERM => {
            " (the agent may not read it: make it readable by the agent's user, or run the agent as root)"
        }
        _ => "",
    }
}

impl Problem {
    /// The stable short code of the problem (`DropInfo.reason`).
    pub fn code(&self) -> &'static str {
        match self {
            Problem::InvalidName { .. } => "invalid_name",
            Problem::NotADrop { .. } => "not_a_drop",
            Problem::Symlink { .. } => "symlink",
            Problem::NotRegular { .. } => "not_regular",
            Problem::HardLinked { .. } => "hard_link",
            Problem::TooLarge { .. } => "too_large",
            Problem::TooManyFiles { .. } => "too_many_files",
            Problem::Subdirectory { .. } => "subdirectory",
            Problem::UnexpectedFile { .. } => "unexpected_file",
            Problem::Owner { .. } => "owner",
            Problem::Empty { .. } => "incomplete",
            Problem::Changed { .. } | Problem::Io { .. } => "unreadable",
        }
    }

    /// Whether trying again later may succeed: descriptors, memory or
    /// space ran out, or an I/O error (not a problem of the drop).
    pub fn is_transient(&self) -> bool {
        matches!(self, Problem::Io { errno, .. } if is_transient(*errno))
    }

    /// Whether waiting may fix it: a directory still being filled.
    pub fn may_settle(&self) -> bool {
        matches!(self, Problem::Empty { .. } | Problem::Changed { .. })
    }
}

/// Whether a failed read or change may succeed when tried again later: descriptors
/// or memory exhausted, no space, an I/O error.
pub fn is_transient(e: Errno) -> bool {
    matches!(
        e,
        Errno::EMFILE
            | Errno::ENFILE
            | Errno::ENOSPC
            | Errno::EDQUOT
            | Errno::EIO
            | Errno::ENOMEM
            | Errno::EAGAIN
            | Errno::EINTR
            | Errno::EBUSY
    )
}

/// Why [`read`] returned no contents.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing is there (any more).
    Gone,
    Problem(Problem),
}

impl From<Problem> for ReadError {
    fn from(p: Problem) -> Self {
        ReadError::Problem(p)
    }
}

/// Opens the drop directory itself (trusted: from the configuration, so a
/// symlinked `drop_dir` is followed).
pub fn open_root(path: &Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Top-level names in `dir`, ignored ones included (callers classify).
pub fn list(dir: BorrowedFd<'_>) -> nix::Result<Vec<String>> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// The form of `name` in `dir` (`None`: nothing there).
pub fn form<P: ?Sized + nix::NixPath>(dir: BorrowedFd<'_>, name: &P) -> Option<Form> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
    Some(match file_type(&st) {
        SFlag::S_IFREG => Form::File,
        SFlag::S_IFDIR => Form::Directory,
        _ => Form::Other,
    })
}

/// How long ago `name` in `dir` last changed (for a directory: it or any
/// entry in it), from the inode change times; `None` when it is gone.
pub fn age(dir: BorrowedFd<'_>, name: &str, now: SystemTime) -> Option<Duration> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
    let mut latest = ctime(&st);
    if file_type(&st) == SFlag::S_IFDIR
        && let Ok(fd) = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        && let Ok(mut d) = Dir::from_fd(fd)
    {
        let names: Vec<String> = d
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .take(1024)
            .collect();
        for n in names {
            if let Ok(st) = fstatat(d.as_fd(), n.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                latest = latest.max(ctime(&st));
            }
        }
    }
    Some(now.duration_since(latest).unwrap_or(Duration::ZERO))
}

/// Reads the drop at `name` in `dir`, shown in messages as `shown` (its
/// public path), expecting the form its name promises.
pub fn read(
    dir: BorrowedFd<'_>,
    name: &str,
    shown: &Path,
    expect: Expect,
    owners: &Owners,
    limits: &Limits,
) -> Result<Contents, ReadError> {
    let shown_s = crate::model::fmt::shown(shown);
    let st = stat_nofollow(dir, name, &shown_s)?;
    match (expect, file_type(&st)) {
        (Expect::File, SFlag::S_IFREG) => {
            check_links(&st, &shown_s)?;
            let fd = open_checked(dir, name, &st, &shown_s, false)?;
            check_owner(&st, owners, &shown_s)?;
            let bytes = read_file(fd, &st, &shown_s, limits.max_file_bytes)?;
            Ok(Contents {
                form: Form::File,
                files: vec![(shown_s, bytes)],
            })
        }
        (Expect::Directory, SFlag::S_IFDIR) => {
            let fd = open_checked(dir, name, &st, &shown_s, true)?;
            check_owner(&st, owners, &shown_s)?;
            read_dir(fd, shown, owners, limits)
        }
        (_, SFlag::S_IFLNK) => Err(Problem::Symlink { shown: shown_s }.into()),
        (Expect::File, SFlag::S_IFDIR) => Err(Problem::NotADrop {
            shown: shown_s,
            found: "directory",
        }
        .into()),
        (Expect::Directory, SFlag::S_IFREG) => Err(Problem::NotADrop {
            shown: shown_s,
            found: "file",
        }
        .into()),
        (_, t) => Err(Problem::NotRegular {
            shown: shown_s,
            kind: kind_name(t),
        }
        .into()),
    }
}

fn read_dir(
    fd: OwnedFd,
    shown: &Path,
    owners: &Owners,
    limits: &Limits,
) -> Result<Contents, ReadError> {
    let shown_s = crate::model::fmt::shown(shown);
    let io = |errno| Problem::Io {
        shown: shown_s.clone(),
        errno,
    };
    let mut d = Dir::from_fd(fd).map_err(io)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io)?;
        let raw = e.file_name();
        let Ok(name) = raw.to_str() else {
            return Err(Problem::UnexpectedFile {
                shown: crate::model::fmt::shown(
                    &shown.join(std::ffi::OsStr::from_bytes(raw.to_bytes())),
                ),
            }
            .into());
        };
        if name == "." || name == ".." || names::is_ignored(name) {
            continue;
        }
        if names.len() == limits.max_files {
            return Err(Problem::TooManyFiles {
                shown: shown_s,
                limit: limits.max_files,
            }
            .into());
        }
        names.push(name.to_owned());
    }
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    let mut total = 0u64;
    for name in &names {
        let file_shown = crate::model::fmt::shown(&shown.join(name));
        let st = match stat_nofollow(d.as_fd(), name, &file_shown) {
            Ok(st) => st,
            // Removed while we listed: the directory is still changing.
            Err(ReadError::Gone) => return Err(Problem::Changed { shown: shown_s }.into()),
            Err(e) => return Err(e),
        };
        match file_type(&st) {
            SFlag::S_IFREG => {}
            SFlag::S_IFLNK => return Err(Problem::Symlink { shown: file_shown }.into()),
            SFlag::S_IFDIR => return Err(Problem::Subdirectory { shown: file_shown }.into()),
            t => {
                return Err(Problem::NotRegular {
                    shown: file_shown,
                    kind: kind_name(t),
                }
                .into());
            }
        }
        if !names::is_dir_file(name) {
            return Err(Problem::UnexpectedFile { shown: file_shown }.into());
        }
        check_links(&st, &file_shown)?;
        check_owner(&st, owners, &file_shown)?;
        let fd = open_checked(d.as_fd(), name, &st, &file_shown, false)?;
        let left = limits.max_drop_bytes.saturating_sub(total);
        let bytes = read_file(fd, &st, &file_shown, limits.max_file_bytes.min(left)).map_err(
            |e| match e {
                ReadError::Problem(Problem::TooLarge { shown, size, .. })
                    if size <= limits.max_file_bytes =>
                {
                    // This file alone would fit: the drop as a whole does not.
                    ReadError::Problem(Problem::TooLarge {
                        shown: format!("{shown} (with the files before it)"),
                        size: total.saturating_add(size),
                        limit: limits.max_drop_bytes,
                    })
                }
                e => e,
            },
        )?;
        total += bytes.len() as u64;
        files.push((file_shown, bytes));
    }
    if files.is_empty() {
        return Err(Problem::Empty { shown: shown_s }.into());
    }
    Ok(Contents {
        form: Form::Directory,
        files,
    })
}

fn stat_nofollow(dir: BorrowedFd<'_>, name: &str, shown: &str) -> Result<FileStat, ReadError> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(st),
        Err(Errno::ENOENT) => Err(ReadError::Gone),
        Err(errno) => Err(Problem::Io {
            shown: shown.to_owned(),
            errno,
        }
        .into()),
    }
}

/// Opens what `st` described, never following a link, and checks that the
/// same inode was opened.
fn open_checked(
    dir: BorrowedFd<'_>,
    name: &str,
    st: &FileStat,
    shown: &str,
    directory: bool,
) -> Result<OwnedFd, ReadError> {
    let mut flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => {
            return Err(Problem::Symlink {
                shown: shown.to_owned(),
            }
            .into());
        }
        Err(Errno::ENOENT | Errno::ENOTDIR) => {
            return Err(Problem::Changed {
                shown: shown.to_owned(),
            }
            .into());
        }
        Err(errno) => {
            return Err(Problem::Io {
                shown: shown.to_owned(),
                errno,
            }
            .into());
        }
    };
    let now = fstat(&fd).map_err(|errno| Problem::Io {
        shown: shown.to_owned(),
        errno,
    })?;
    if now.st_ino != st.st_ino || now.st_dev != st.st_dev {
        return Err(Problem::Changed {
            shown: shown.to_owned(),
        }
        .into());
    }
    Ok(fd)
}

/// A regular file with more than one name may be someone else's file
/// linked into the drop directory: never read.
fn check_links(st: &FileStat, shown: &str) -> Result<(), Problem> {
    if st.st_nlink > 1 {
        return Err(Problem::HardLinked {
            shown: shown.to_owned(),
            // nlink_t is u32 on some architectures.
            #[allow(clippy::unnecessary_cast)]
            links: st.st_nlink as u64,
        });
    }
    Ok(())
}

fn check_owner(st: &FileStat, owners: &Owners, shown: &str) -> Result<(), Problem> {
    if owners.allows(st.st_uid, st.st_gid) {
        return Ok(());
    }
    let host = SystemHost;
    let user = host.user_name(st.st_uid).map_or_else(
        || format!("uid {}", st.st_uid),
        |n| format!("{n} (uid {})", st.st_uid),
    );
    let group = host.group_name(st.st_gid).map_or_else(
        || format!("gid {}", st.st_gid),
        |n| format!("{n} (gid {})", st.st_gid),
    );
    Err(Problem::Owner {
        shown: shown.to_owned(),
        owner: format!("user {user}, group {group}"),
        allowed: owners.names.join(", "),
    })
}

/// Reads at most `limit` bytes into a buffer allocated once (so no copy of
/// key bytes is left behind by a reallocation).
fn read_file(
    fd: OwnedFd,
    st: &FileStat,
    shown: &str,
    limit: u64,
) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > limit {
        return Err(Problem::TooLarge {
            shown: shown.to_owned(),
            size,
            limit,
        }
        .into());
    }
    let cap = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap.min(size as usize + 1)));
    let file = File::from(fd);
    // One byte more than allowed tells a file that grew after fstat.
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Problem::Io {
            shown: shown.to_owned(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
    if buf.len() as u64 > limit {
        return Err(Problem::TooLarge {
            shown: shown.to_owned(),
            size: buf.len() as u64,
            limit,
        }
        .into());
    }
    Ok(buf)
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn kind_name(t: SFlag) -> &'static str {
    match t {
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFDIR => "directory",
        _ => "special file",
    }
}

fn ctime(st: &FileStat) -> SystemTime {
    let secs = u64::try_from(st.st_ctime).unwrap_or(0);
    let nanos = u32::try_from(st.st_ctime_nsec).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos.min(999_999_999))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::PathBuf;

    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        fd: OwnedFd,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fd = open_root(dir.path()).unwrap();
            Fixture { dir, fd }
        }

        fn read(&self, name: &str, expect: Expect) -> Result<Contents, ReadError> {
            self.read_with(name, expect, &Owners::default(), &LIMITS)
        }

        fn read_with(
            &self,
            name: &str,
            expect: Expect,
            owners: &Owners,
            limits: &Limits,
        ) -> Result<Contents, ReadError> {
            read(
                self.fd.as_fd(),
                name,
                &self.dir.path().join(name),
                expect,
                owners,
                limits,
            )
        }

        fn problem(&self, name: &str, expect: Expect) -> Problem {
            match self.read(name, expect) {
                Err(ReadError::Problem(p)) => p,
                other => panic!("{name}: expected a problem, got {other:?}"),
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
    }

    #[test]
    fn reads_a_bundle_file_and_a_directory_in_name_order() {
        let f = Fixture::new();
        std::fs::write(f.path("web.pem"), b"PEM").unwrap();
        let c = f.read("web.pem", Expect::File).unwrap();
        assert_eq!(c.form, Form::File);
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].1.as_slice(), b"PEM");
        assert!(c.files[0].0.ends_with("/web.pem"));

        std::fs::create_dir(f.path("api")).unwrap();
        std::fs::write(f.path("api/key.pem"), b"K").unwrap();
        std::fs::write(f.path("api/cert.crt"), b"C").unwrap();
        std::fs::write(f.path("api/.cert.crt.swp"), b"ignored").unwrap();
        std::fs::write(f.path("api/chain.pem~"), b"ignored").unwrap();
        let c = f.read("api", Expect::Directory).unwrap();
        assert_eq!(c.form, Form::Directory);
        let names: Vec<&str> = c.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 2);
        assert!(names[0].ends_with("api/cert.crt") && names[1].ends_with("api/key.pem"));
        assert!(!format!("{c:?}").contains('K'.to_string().repeat(2).as_str()));
    }

    #[test]
    fn symlinks_are_never_followed() {
        let f = Fixture::new();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"secret").unwrap();
        symlink(outside.path(), f.path("web.pem")).unwrap();
        assert_eq!(f.problem("web.pem", Expect::File).code(), "symlink");
        symlink("/", f.path("root")).unwrap();
        assert_eq!(f.problem("root", Expect::Directory).code(), "symlink");
        std::fs::create_dir(f.path("api")).unwrap();
        symlink(outside.path(), f.path("api/key.pem")).unwrap();
        let p = f.problem("api", Expect::Directory);
        assert_eq!(p.code(), "symlink");
        assert!(p.to_string().contains("api/key.pem"), "{p}");
    }

    #[test]
    fn special_files_and_wrong_forms_are_refused_unopened() {
        let f = Fixture::new();
        nix::unistd::mkfifo(&f.path("web.pem"), Mode::from_bits_truncate(0o600)).unwrap();
        // A FIFO with no writer would block a plain open: it is never opened.
        let p = f.problem("web.pem", Expect::File);
        assert_eq!(p.code(), "not_regular");
        assert!(p.to_string().contains("FIFO"), "{p}");
        std::fs::create_dir(f.path("api.pem")).unwrap();
        assert_eq!(f.problem("api.pem", Expect::File).code(), "not_a_drop");
        std::fs::write(f.path("web.crt"), b"x").unwrap();
        let p = f.problem("web.crt", Expect::Directory);
        assert_eq!(p.code(), "not_a_drop");
        assert!(p.to_string().contains("<name>.pem"), "{p}");
        assert!(matches!(
            f.read("none.pem", Expect::File),
            Err(ReadError::Gone)
        ));
    }

    #[test]
    fn sizes_and_counts_are_limited() {
        let f = Fixture::new();
        let small = Limits {
            max_file_bytes: 10,
            max_drop_bytes: 15,
            max_files: 3,
        };
        let owners = Owners::default();
        std::fs::write(f.path("big.pem"), vec![b'A'; 11]).unwrap();
        let Err(ReadError::Problem(p)) = f.read_with("big.pem", Expect::File, &owners, &small)
        else {
            panic!("oversized file accepted");
        };
        assert_eq!(p.code(), "too_large");
        assert!(p.to_string().contains("11 bytes"), "{p}");

        std::fs::create_dir(f.path("d")).unwrap();
        std::fs::write(f.path("d/a.pem"), vec![b'A'; 8]).unwrap();
        std::fs::write(f.path("d/b.pem"), vec![b'A'; 8]).unwrap();
        let Err(ReadError::Problem(p)) = f.read_with("d", Expect::Directory, &owners, &small)
        else {
            panic!("oversized drop accepted");
        };
        assert_eq!(p.code(), "too_large");
        assert!(p.to_string().contains("15-byte limit"), "{p}");

        std::fs::create_dir(f.path("many")).unwrap();
        for i in 0..4 {
            std::fs::write(f.path(&format!("many/{i}.pem")), b"x").unwrap();
        }
        let Err(ReadError::Problem(p)) = f.read_with("many", Expect::Directory, &owners, &small)
        else {
            panic!("too many files accepted");
        };
        assert_eq!(p.code(), "too_many_files");
    }

    #[test]
    fn directory_drops_are_flat_and_hold_only_pem_files() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.path("d/sub")).unwrap();
        assert_eq!(f.problem("d", Expect::Directory).code(), "subdirectory");
        std::fs::create_dir(f.path("e")).unwrap();
        std::fs::write(f.path("e/README"), b"x").unwrap();
        assert_eq!(f.problem("e", Expect::Directory).code(), "unexpected_file");
        std::fs::create_dir(f.path("empty")).unwrap();
        std::fs::write(f.path("empty/.key.pem.tmp"), b"x").unwrap();
        let p = f.problem("empty", Expect::Directory);
        assert_eq!(p.code(), "incomplete");
        assert!(p.may_settle());
    }

    #[test]
    fn owners_restrict_whose_files_are_taken() {
        let f = Fixture::new();
        std::fs::write(f.path("web.pem"), b"x").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let my_gid = nix::unistd::getegid().as_raw();
        let mine = Owners::resolve(&[me.to_string()]);
        assert!(mine.allows(me, u32::MAX));
        assert!(f.read_with("web.pem", Expect::File, &mine, &LIMITS).is_ok());
        let other = me.wrapping_add(4242);
        let not_mine = Owners::resolve(&[other.to_string()]);
        if my_gid != other {
            let Err(ReadError::Problem(p)) =
                f.read_with("web.pem", Expect::File, &not_mine, &LIMITS)
            else {
                panic!("file of another owner accepted");
            };
            assert_eq!(p.code(), "owner");
            assert!(p.to_string().contains("drop_owners"), "{p}");
        }
        assert!(Owners::default().allows(1, 2));
        // An unreadable file is a problem with a remedy, not a crash.
        if !nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(f.path("web.pem"), std::fs::Permissions::from_mode(0o000))
                .unwrap();
            assert_eq!(f.problem("web.pem", Expect::File).code(), "unreadable");
        }
    }

    struct FakeHost;

    impl Host for FakeHost {
        fn user_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(match name {
                "certbot" => Some(1001),
                "both" => Some(1002),
                _ => None,
            })
        }
        fn group_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(match name {
                "certctl" => Some(2001),
                "both" => Some(2002),
                _ => None,
            })
        }
        fn user_name(&self, _: u32) -> Option<String> {
            None
        }
        fn group_name(&self, _: u32) -> Option<String> {
            None
        }
        fn euid(&self) -> u32 {
            0
        }
    }

    #[test]
    fn drop_owners_match_the_owner_uid_or_the_group_gid() {
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let o = Owners::resolve_with(&names(&["certbot", "certctl", "both", "77"]), &FakeHost);
        assert!(o.allows(1001, 9)); // user certbot
        assert!(o.allows(9, 2001)); // group certctl
        assert!(o.allows(1002, 9) && o.allows(9, 2002)); // a name that is both
        assert!(o.allows(77, 9) && o.allows(9, 77)); // a number is either
        assert!(!o.allows(2001, 1001), "a uid is not a gid");
        assert!(!o.allows(0, 0), "root is not exempt");
        // A name gone from the host since the config was loaded allows nothing.
        let gone = Owners::resolve_with(&names(&["nobody-here"]), &FakeHost);
        assert!(!gone.allows(0, 0));
    }

    #[test]
    fn ages_come_from_the_newest_change_inside() {
        let f = Fixture::new();
        std::fs::create_dir(f.path("d")).unwrap();
        std::fs::write(f.path("d/key.pem"), b"x").unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        let age = age(f.fd.as_fd(), "d", later).unwrap();
        assert!(age >= Duration::from_secs(59) && age <= Duration::from_secs(61));
        assert!(super::age(f.fd.as_fd(), "none", later).is_none());
        assert_eq!(form(f.fd.as_fd(), "d"), Some(Form::Directory));
        let names = list(f.fd.as_fd()).unwrap();
        assert_eq!(names, vec!["d".to_owned()]);
    }
}
