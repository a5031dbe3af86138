//! What is deployed, kept in memory: per target, the leaf at `cert_path`
//! as last read through [`crate::disk`] (fingerprint, expiry, subject), with
//! the stamp of the file it was read from (device, inode, size, mtime,
//! ctime) and the SHA-256 of its bytes. `certctl status` and the metrics
//! ask here instead of reading and parsing every certificate on every call.
//!
//! Guarantees: [`Deployed::leaf`] says what a read of the file through
//! [`crate::disk::leaf`] would say now. Each call `stat`s the file (one
//! system call, no read): a file replaced behind the agent's back has
//! another inode, one rewritten in place another ctime (which no one can
//! set), so either is read again. An entry whose ctime is too close to the
//! moment it was read ([`RACY`]: a second change within the same timestamp
//! tick would leave the stamp as it was) is not trusted until it is read
//! again later; a read whose bytes hash as before is not parsed again.
//!
//! A remote target's file (`[target.ssh]`) has no stamp to compare over
//! SFTP (no inode, no ctime): it is read again through its connection
//! when its entry is older than [`REMOTE_FRESH`], and after every run on
//! it ([`Deployed::refresh`]); a change made on that host behind the
//! agent's back shows within that time.
//!
//! Blocking (`stat`, reads): callers run it off the async threads.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::config::Target;
use crate::disk;
use crate::sync::lock;

/// A file changed less than this before it was read may change again
/// without a new ctime (the kernel stamps files from a clock that ticks
/// every few milliseconds), so its entry is read again on the next call.
pub const RACY: Duration = Duration::from_millis(100);

/// How long what was read of a remote target's file is shown without
/// reading it again.
pub const REMOTE_FRESH: Duration = Duration::from_secs(30);

/// Largest certificate file read for status (a keystore or PEM set is a
/// few KiB; the same bound as a deploy's input).
const MAX_BYTES: u64 = 1024 * 1024;

/// What is at a target's `cert_path`, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// No file yet.
    Missing,
    /// The leaf: lowercase hex SHA-256 of its DER, `notAfter` in seconds
    /// since the Unix epoch, subject.
    Leaf {
        sha256: String,
        not_after: i64,
        subject: String,
    },
    /// The file cannot be read as a certificate: the short word of
    /// [`disk::DiskError::status`].
    Unreadable(String),
}

impl Seen {
    fn of(read: Result<Option<crate::bundle::Cert>, disk::DiskError>) -> Seen {
        match read {
            Ok(None) => Seen::Missing,
            Ok(Some(leaf)) => Seen::Leaf {
                sha256: leaf.sha256_hex(),
                not_after: leaf.not_after,
                subject: leaf.subject,
            },
            Err(e) => Seen::Unreadable(e.status()),
        }
    }
}

/// The identity of one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether a change after `read_at` could have left this stamp as it
    /// is: the file's ctime is within [`RACY`] of the read.
    fn racy(&self, read_at: SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let ctime = u64::try_from(secs)
            .ok()
            .map(|s| UNIX_EPOCH + Duration::new(s, u32::try_from(nanos).unwrap_or(0)));
        match ctime {
            Some(ctime) => ctime + RACY > read_at,
            // Before 1970: a clock or a file nobody can reason about.
            None => true,
        }
    }
}

#[derive(Debug)]
struct Entry {
    path: PathBuf,
    /// The stamp of the file the entry was read from; `None` for a file
    /// that was missing.
    stamp: Option<Stamp>,
    /// When that stamp was taken.
    read_at: SystemTime,
    /// SHA-256 of the bytes read (a PEM file).
    content: Option<[u8; 32]>,
    seen: Arc<Seen>,
}

impl Entry {
    fn trusted(&self, path: &std::path::Path, now: Option<Stamp>) -> bool {
        self.path == path
            && match (self.stamp, now) {
                (None, None) => true,
                (Some(was), Some(now)) => was == now && !was.racy(self.read_at),
                _ => false,
            }
    }
}

/// Reads so far, per target name.
#[derive(Debug, Default)]
pub struct Deployed {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Deployed {
    pub fn new() -> Self {
        Self::default()
    }

    /// What `target` has at `cert_path` now. One `stat` when nothing
    /// changed since the last call; a read when the file changed, a parse
    /// when its bytes did.
    pub fn leaf(&self, target: &Target) -> Arc<Seen> {
        if target.is_remote() {
            return self.remote_leaf(target, false);
        }
        let path = &target.cert_path;
        let read_at = SystemTime::now();
        let now = match std::fs::metadata(path) {
            Ok(m) => Some(Stamp::of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // Not cached: the read names the error the way status shows it.
            Err(_) => return Arc::new(Seen::of(disk::leaf(target))),
        };
        let known = {
            let entries = lock(&self.entries);
            match entries.get(&target.name) {
                Some(e) if e.trusted(path, now) => return e.seen.clone(),
                Some(e) if e.path == *path => e.content.map(|c| (c, e.seen.clone())),
                _ => None,
            }
        };
        let (stamp, content, seen) = match now {
            None => (None, None, Arc::new(Seen::Missing)),
            Some(_) if target.keystore.is_some() => {
                // Keystores are opened as what they are; the stamp from
                // before the read is the conservative one.
                (now, None, Arc::new(Seen::of(disk::leaf(target))))
            }
            Some(_) => match read(path) {
                Ok((stamp, bytes)) => {
                    let hash: [u8; 32] = Sha256::digest(&bytes).into();
                    let seen = match known {
                        Some((was, seen)) if was == hash => seen,
                        _ => Arc::new(Seen::of(disk::leaf_of(path, &bytes).map(Some))),
                    };
                    (Some(stamp), Some(hash), seen)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (None, None, Arc::new(Seen::Missing))
                }
                Err(_) => return Arc::new(Seen::of(disk::leaf(target))),
            },
        };
        lock(&self.entries).insert(
            target.name.clone(),
            Entry {
                path: path.clone(),
                stamp,
                read_at,
                content,
                seen: seen.clone(),
            },
        );
        seen
    }

    /// What `target` has now, read again whatever was read before: after a
    /// run changed it.
    pub fn refresh(&self, target: &Target) -> Arc<Seen> {
        if target.is_remote() {
            return self.remote_leaf(target, true);
        }
        self.leaf(target)
    }

    /// A remote target's leaf: the entry while younger than
    /// [`REMOTE_FRESH`] (unless `again`), else a read over SFTP.
    fn remote_leaf(&self, target: &Target, again: bool) -> Arc<Seen> {
        let path = &target.cert_path;
        let now = SystemTime::now();
        if !again
            && let Some(e) = lock(&self.entries).get(&target.name)
            && e.path == *path
            && now
                .duration_since(e.read_at)
                .is_ok_and(|age| age < REMOTE_FRESH)
        {
            return e.seen.clone();
        }
        let seen = Arc::new(Seen::of(disk::leaf(target)));
        lock(&self.entries).insert(
            target.name.clone(),
            Entry {
                path: path.clone(),
                stamp: None,
                read_at: now,
                content: None,
                seen: seen.clone(),
            },
        );
        seen
    }

    /// Forgets every entry (the configuration changed: paths, keystore
    /// passwords).
    pub fn clear(&self) {
        lock(&self.entries).clear();
    }
}

/// The file's stamp (of the open file) and bytes.
fn read(path: &std::path::Path) -> std::io::Result<(Stamp, Vec<u8>)> {
    let file = std::fs::File::open(path)?;
    let stamp = Stamp::of(&file.metadata()?);
    let mut bytes = Vec::with_capacity(usize::try_from(stamp.size.min(MAX_BYTES)).unwrap_or(0));
    file.take(MAX_BYTES).read_to_end(&mut bytes)?;
    Ok((stamp, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp_with_ctime(secs: i64) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (secs, 0),
            ctime: (secs, 0),
        }
    }

    #[test]
    fn a_file_changed_just_before_it_was_read_is_not_trusted() {
        let read_at = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(stamp_with_ctime(1_000).racy(read_at));
        assert!(!stamp_with_ctime(999).racy(read_at));
        assert!(stamp_with_ctime(-1).racy(read_at));
    }
}
