//! One lock per target, so deploys to a target never interleave.
//!
//! Two layers: an in-process async mutex (deploys inside this agent queue
//! fairly, in arrival order) and an advisory `flock` on
//! `<state_dir>/locks/<target>.lock` (a second agent, or any tool that honours
//! the same file, is excluded too). Locks of different targets are
//! independent, so deploys to different targets run in parallel. Both layers
//! are released when the [`TargetGuard`] is dropped, also on panic or when
//! the process dies (the kernel drops `flock`s with the descriptor).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// `no_wait` was asked and another deploy holds the target.
    #[error("target {target} is busy: another deploy holds it{by}")]
    Busy { target: String, by: &'static str },
    #[error(
        "cannot open lock file {path}: {source}: the agent needs write access to its state_dir"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Flock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The task waiting for the `flock` ended abnormally (runtime shutdown).
    #[error("waiting for the lock on {path} was interrupted: {source}")]
    Interrupted {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The per-target locks of one agent.
#[derive(Debug)]
pub struct Locks {
    dir: PathBuf,
    mutexes: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Proof that the caller holds a target: dropping it releases both layers.
#[derive(Debug)]
pub struct TargetGuard {
    _flock: Flock<File>,
    _inner: OwnedMutexGuard<()>,
}

impl Locks {
    /// Lock files live in `dir` (created 0700 when missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            mutexes: Mutex::new(HashMap::new()),
        }
    }

    fn mutex(&self, target: &str) -> Arc<AsyncMutex<()>> {
        let mut map = self
            .mutexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up by `&str` first: status asks for every target on each
        // look, and a known target costs no allocation.
        if let Some(m) = map.get(target) {
            return m.clone();
        }
        map.entry(target.to_owned()).or_default().clone()
    }

    /// True while some deploy in this agent holds `target`.
    pub fn is_busy(&self, target: &str) -> bool {
        self.mutex(target).try_lock().is_err()
    }

    /// Takes the target's lock, waiting for the current holder unless
    /// `no_wait`, in which case a held lock is [`LockError::Busy`].
    pub async fn acquire(&self, target: &str, no_wait: bool) -> Result<TargetGuard, LockError> {
        let mutex = self.mutex(target);
        let inner = if no_wait {
            mutex.try_lock_owned().map_err(|_| LockError::Busy {
                target: target.to_owned(),
                by: "",
            })?
        } else {
            mutex.lock_owned().await
        };
        let path = self.dir.join(format!("{target}.lock"));
        let file = open_lock_file(&self.dir, &path)?;
        let flock = if no_wait {
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    LockError::Busy {
                        target: target.to_owned(),
                        by: " (another process holds its lock file)",
                    }
                } else {
                    LockError::Flock {
                        path: path.clone(),
                        source: errno,
                    }
                }
            })?
        } else {
            let p = path.clone();
            tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
                .await
                .map_err(|source| LockError::Interrupted {
                    path: p.clone(),
                    source,
                })?
                .map_err(|(_, errno)| LockError::Flock {
                    path: p,
                    source: errno,
                })?
        };
        Ok(TargetGuard {
            _flock: flock,
            _inner: inner,
        })
    }
}

fn open_lock_file(dir: &Path, path: &Path) -> Result<File, LockError> {
    let open_err = |source| LockError::Open {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(open_err)?;
    crate::atomic::tighten_dir(dir, 0o700).map_err(|e| LockError::Open {
        path: dir.to_owned(),
        source: e.source,
    })?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(open_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_target_serializes_and_no_wait_reports_busy() {
        let dir = tempfile::tempdir().unwrap();
        let locks = Locks::new(dir.path().join("locks"));
        let g = locks.acquire("web", false).await.unwrap();
        assert!(locks.is_busy("web"));
        let err = locks.acquire("web", true).await.unwrap_err();
        assert!(matches!(err, LockError::Busy { .. }), "{err}");
        // Another target is independent.
        let other = locks.acquire("api", true).await.unwrap();
        drop(other);
        drop(g);
        assert!(!locks.is_busy("web"));
        locks.acquire("web", true).await.unwrap();
    }

    #[tokio::test]
    async fn flock_excludes_a_second_lock_table() {
        // Two `Locks` over one directory behave like two agents.
        let dir = tempfile::tempdir().unwrap();
        let a = Locks::new(dir.path());
        let b = Locks::new(dir.path());
        let g = a.acquire("web", false).await.unwrap();
        let err = b.acquire("web", true).await.unwrap_err();
        assert!(err.to_string().contains("lock file"), "{err}");
        let waiter = tokio::spawn(async move { b.acquire("web", false).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
