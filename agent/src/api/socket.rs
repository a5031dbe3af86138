//! Creating the control socket without a permission race.
//!
//! The socket is bound inside a fresh 0700 directory next to its final path,
//! given its final group and mode there, and only then renamed into place,
//! so no process can connect while it still has umask-derived permissions.
//! A stale socket left by a crashed agent is replaced; a socket on which
//! another agent still answers is an error.
//!
//! Mode: 0660 with the group set to the one configured group when all of
//! `deploy_groups` and `read_groups` are a single group; 0600 when none is
//! configured (only root and the agent's user); 0666 when several groups are
//! configured: the file mode cannot express two groups, and every call is
//! authorized from kernel credentials anyway (`api::auth`).
#![allow(clippy::disallowed_methods)] // the socket file is the agent's own

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Group;

/// Why the socket could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create control socket {path}: {reason}")]
pub struct SocketError {
    pub path: PathBuf,
    pub reason: String,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> SocketError {
    SocketError {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Binds the control socket at `path`.
pub fn bind(path: &Path, groups: &[&Group]) -> Result<tokio::net::UnixListener, SocketError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    if !parent.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| {
                err(
                    path,
                    format!("cannot create directory {}: {e}", parent.display()),
                )
            })?;
    }
    clear_stale(path)?;

    let staging = parent.join(format!(".certctl-sock-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| err(path, format!("cannot create {}: {e}", staging.display())))?;
    let result = (|| {
        let tmp = staging.join("agent.sock");
        let std_listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(|e| err(path, e))?;
        let mut distinct: Vec<u32> = groups.iter().map(|g| g.gid).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mode = match distinct.as_slice() {
            [] => 0o600,
            [gid] => {
                std::os::unix::fs::chown(&tmp, None, Some(*gid)).map_err(|e| {
                    err(path, format!("cannot give the socket to group {gid}: {e}"))
                })?;
                0o660
            }
            _ => 0o666,
        };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| err(path, e))?;
        fs::rename(&tmp, path).map_err(|e| err(path, e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| err(path, e))?;
        tokio::net::UnixListener::from_std(std_listener).map_err(|e| err(path, e))
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}

fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(err(
            path,
            "a file that is not a socket is in the way: remove it or choose another agent.socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(err(
            path,
            "another agent is already listening there: stop it first, or give this one another agent.socket",
        )),
        Err(_) => fs::remove_file(path)
            .map_err(|e| err(path, format!("cannot remove the stale socket: {e}"))),
    }
}

/// Removes the socket at shutdown (only if it is still a socket).
pub fn remove(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn binds_with_private_mode_and_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let l = bind(&path, &[]).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A live agent is not replaced.
        let e = bind(&path, &[]).unwrap_err().to_string();
        assert!(e.contains("already listening"), "{e}");
        drop(l);
        // The dead one's socket is stale now.
        bind(&path, &[]).unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("run")).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[test]
    fn refuses_a_regular_file_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        fs::write(&path, b"x").unwrap();
        let e = clear_stale(&path).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
    }
}
