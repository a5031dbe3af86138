//! The floor: the system calls any safe deploy of the same files must make,
//! and nothing else. For each file a temp file created exclusively with its
//! final mode, written and `fsync`ed; the current files kept as backups by
//! hard link and the backup directory `fsync`ed; every temp renamed over
//! its file; the directory `fsync`ed. No checks, no plan, no lock, no
//! journal, no pruning: what is left between this and a deploy by the agent
//! is the agent's own cost.
#![allow(clippy::disallowed_methods)] // the floor is a writer by definition: it is what the agent is measured against

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One file of a set: its name in the directory, its mode, its bytes.
pub struct FloorFile<'a> {
    pub name: &'a str,
    pub mode: u32,
    pub bytes: &'a [u8],
}

/// A directory deployed to by the floor, with its backup directory.
pub struct Floor {
    dir: PathBuf,
    backup: PathBuf,
    seq: u64,
}

impl Floor {
    /// `dir` must exist; the backup directory is made once, up front (a
    /// safe deploy needs somewhere durable to keep the previous files).
    pub fn new(dir: &Path) -> Result<Floor> {
        let backup = dir.join(".backup");
        fs::create_dir_all(&backup).with_context(|| format!("create {}", backup.display()))?;
        fsync_dir(dir)?;
        Ok(Floor {
            dir: dir.to_owned(),
            backup,
            seq: 0,
        })
    }

    /// Replaces (or creates) every file of `files`.
    pub fn deploy(&mut self, files: &[FloorFile<'_>]) -> Result<()> {
        self.seq += 1;
        let mut temps = Vec::with_capacity(files.len());
        for f in files {
            let tmp = self.dir.join(format!(".tmp-{}-{}", self.seq, f.name));
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .open(&tmp)
                .with_context(|| format!("create {}", tmp.display()))?;
            file.write_all(f.bytes)?;
            file.sync_all()?;
            temps.push(tmp);
        }
        let mut linked = false;
        for f in files {
            let kept = self.backup.join(format!("{}-{}", self.seq, f.name));
            // Nothing to keep on the first deploy: the link says so itself.
            match fs::hard_link(self.dir.join(f.name), &kept) {
                Ok(()) => linked = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("link {}", kept.display())),
            }
        }
        if linked {
            fsync_dir(&self.backup)?;
        }
        for (tmp, f) in temps.iter().zip(files) {
            fs::rename(tmp, self.dir.join(f.name))
                .with_context(|| format!("rename {}", tmp.display()))?;
        }
        fsync_dir(&self.dir)
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}
