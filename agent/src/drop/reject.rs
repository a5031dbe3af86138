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

/// A failed change, naming the path and the remedy where there is one.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {path}: {errno}{}", remedy(*.errno))]
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

    /// Removes a taken drop (file, link or directory tree) after its deploys.
    pub fn remove_taken(&self, claimed: &str) -> Result<(), MoveError> {
        remove_at(self.drop.as_fd(), claimed, &self.root.join(claimed))
    }

    /// Moves the taken drop `claimed` (public entry `entry`) into
    /// `rejected/` as `<stamp>-<entry>`, then writes `<stamp>-<entry>.reason`
    /// holding what `reason` makes of the new path.
    pub fn move_aside(
        &self,
        claimed: &str,
        entry: &str,
        now: SystemTime,
        reason: impl FnOnce(&Path) -> String,
    ) -> Result<MovedAside, MoveError> {
        let (dir, rejected) = (self.drop.as_fd(), self.rejected.as_fd());
        let stamp = file_stamp(now);
        let mut name = format!("{stamp}-{entry}");
        let mut n = 1;
        while exists(rejected, &name) || exists(rejected, &format!("{name}.reason")) {
            n += 1;
            name = format!("{stamp}-{n}-{entry}");
        }
        let dst = self.rejected_path.join(&name);
        match renameat(dir, claimed, rejected, name.as_str()) {
            Ok(()) => {}
            Err(Errno::EXDEV) => {
                // Another filesystem: copy, make the copy durable, then remove.
                copy_at(dir, claimed, rejected, &name, &dst)?;
                nix::unistd::fsync(rejected).map_err(err("fsync", &self.rejected_path))?;
                remove_at(dir, claimed, &self.root.join(claimed))?;
            }
            Err(e) => return Err(err("move to rejected/", &self.root.join(entry))(e)),
        }
        let reason_name = format!("{name}.reason");
        let reason_path = self.rejected_path.join(&reason_name);
        write_new(
            rejected,
            &reason_name,
            &reason_path,
            reason(&dst).as_bytes(),
        )?;
        nix::unistd::fsync(rejected).map_err(err("fsync", &self.rejected_path))?;
        Ok(MovedAside {
            path: dst,
            reason_path,
        })
    }
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
        let _ = writeln!(
            s,
            "drop:     {} ({})",
            self.public_path.display(),
            self.form
        );
        let _ = writeln!(s, "moved to: {}", self.moved_to.display());
        let _ = writeln!(s, "when:     {}", crate::bundle::rfc3339(unix));
        let targets = if self.targets.is_empty() {
            "(none: no target takes this drop name)".to_owned()
        } else {
            self.targets.join(", ")
        };
        let _ = writeln!(s, "targets:  {targets}");
        let _ = writeln!(s, "reason:   {}", self.code);
        let _ = writeln!(s, "problem:  {}", self.problem);
        for (target, outcome, id, error) in self.results {
            let id = if id.is_empty() {
                String::new()
            } else {
                format!(" (deploy {id})")
            };
            if error.is_empty() {
                let _ = writeln!(s, "result:   {target}: {outcome}{id}");
            } else {
                let _ = writeln!(s, "result:   {target}: {outcome}{id}: {error}");
            }
        }
        let _ = writeln!(s, "remedy:   {}", self.remedy);
        let _ = writeln!(
            s,
            "retry:    fix the cause, then move it back: mv {} {}",
            shell_quote(self.moved_to),
            shell_quote(self.public_path)
        );
        s
    }
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
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
    }
}
