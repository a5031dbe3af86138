//! What both sides of [`atomic`](super) share: the names the agent
//! creates beside a target, the error every step returns, what a file
//! was found to be, and how a private key is recognised.

use std::io;
use std::path::{Path, PathBuf};

/// A file as found on disk before the deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`st_mode & 0o7777`).
    pub mode: u32,
    /// What the file holds: the SHA-256 of its bytes, or for a keystore
    /// that opens with the target's password, its
    /// [`content_digest`](crate::keystore::content_digest) (the bytes of
    /// two encodings of the same material differ: fresh salts).
    pub sha256: [u8; 32],
}

/// Prefix of every temp file the agent creates beside a target.
pub const TEMP_PREFIX: &str = ".certctl-tmp-";

/// The agent's own directory beside a target's files.
pub const AGENT_DIR: &str = ".certctl";

/// A filesystem operation that failed, with the path it failed on and, for
/// the failures an operator can fix, what to do.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}{}", remedy(.source))]
pub struct FsError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What an operator can do about an I/O error, as a message suffix.
fn remedy(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(nix::libc::EACCES | nix::libc::EPERM) => {
            " (the agent may not change this directory: run it as root or give it write access)"
        }
        Some(nix::libc::EROFS) => {
            " (read-only filesystem: under systemd, add the directory to ReadWritePaths= of certctl-agent.service)"
        }
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT) => {
            " (no space left: free some and deploy again)"
        }
        _ => "",
    }
}

impl FsError {
    pub(super) fn new(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FsError {
        let path = path.to_owned();
        move |source| FsError { op, path, source }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// The parent directory of a target file (configuration guarantees one).
pub fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

/// The temp file name for `final_path` in deploy `deploy_id`.
pub fn temp_path(final_path: &Path, deploy_id: &str) -> PathBuf {
    let base = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(final_path).join(format!("{TEMP_PREFIX}{deploy_id}-{base}"))
}

/// The directory holding one deploy's backups of the files in `dir`.
pub fn backup_dir(dir: &Path, target: &str, deploy_id: &str) -> PathBuf {
    dir.join(AGENT_DIR)
        .join("backup")
        .join(target)
        .join(deploy_id)
}

/// Whether `head` (the first MiB of a file) holds a private key: see
/// [`holds_private_key`].
pub fn is_private_key(head: &[u8]) -> bool {
    let head = &head[..head.len().min(1024 * 1024)];
    let pem_key = head.windows(16).any(|w| w == b"PRIVATE KEY-----");
    let jks = head.starts_with(&[0xFE, 0xED, 0xFE, 0xED]);
    // PFX ::= SEQUENCE { version INTEGER (3), ... } in DER.
    let pkcs12 = match head {
        [0x30, 0x82, _, _, 0x02, 0x01, 0x03, ..] | [0x30, 0x81, _, 0x02, 0x01, 0x03, ..] => true,
        [0x30, l, 0x02, 0x01, 0x03, ..] => *l < 0x80,
        _ => false,
    };
    pem_key || jks || pkcs12
}

/// Where a backup set or a generation is filled before it is renamed to
/// `dir` whole: `.<name>.partial` beside it (a dot name: never listed as a
/// backup or a generation).
pub fn partial_of(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    parent(dir).join(format!(".{name}.partial"))
}
