//! The `generations` layout: the whole certificate set switches with one
//! `rename`.
//!
//! `<dir>/.certctl/gen-<deploy-id>/` holds a complete set (every file of
//! the target, by the base names of its configured paths); `<dir>/..data`
//! is a symlink to the current generation; each configured path is a
//! symlink `<name> -> ..data/<name>`, so its name never changes. A deploy
//! writes and fsyncs a new generation, then replaces `..data` with one
//! `rename` of a temp symlink and fsyncs `<dir>`: a reader sees the old set
//! or the new one, never a mix (servers that watch files, like traefik or
//! envoy, reload exactly once). Rollback is the same switch back.
//!
//! The first deploy of a target whose paths are regular files converts
//! them: the files are kept as backups (as in the in-place layout) and each
//! is replaced by its symlink after the switch.
//!
//! Guarantees: a generation is complete and fsynced (files and directory)
//! before `..data` points at it; `..data` is only ever replaced by
//! `rename`; `backup_retention` generations besides the current one are
//! kept; the current generation is never removed.

use std::path::{Path, PathBuf};

use super::commit::{self, Committed};
use super::plan::Plan;
use crate::atomic::Existing;
use crate::atomic::{self, AGENT_DIR, FsError, Result};
use crate::failpoint;

/// The symlink to the current generation, in the target's directory.
pub const DATA: &str = "..data";

const PREFIX: &str = "gen-";

pub use super::commit::Switch;

pub fn data_link(dir: &Path) -> PathBuf {
    dir.join(DATA)
}

/// `<dir>/.certctl/gen-<id>`.
pub fn gen_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join(AGENT_DIR).join(format!("{PREFIX}{id}"))
}

/// What `..data` points at for generation `id` (relative, so the directory
/// can be moved or bind-mounted).
fn link_target(id: &str) -> PathBuf {
    PathBuf::from(AGENT_DIR).join(format!("{PREFIX}{id}"))
}

/// The id of the generation `..data` points at.
pub fn current(dir: &Path) -> Result<Option<String>> {
    Ok(atomic::read_link(&data_link(dir))?.and_then(|t| id_of(&t)))
}

fn id_of(link: &Path) -> Option<String> {
    link.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)
        .map(str::to_owned)
}

/// Every generation id in `dir`, oldest first (in the order their runs
/// wrote them: [`atomic::in_creation_order`]).
pub fn list(dir: &Path) -> Result<Vec<String>> {
    let root = dir.join(AGENT_DIR);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(FsError {
                op: "cannot list",
                path: root,
                source: e,
            });
        }
    };
    let entries: Vec<std::fs::DirEntry> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .collect();
    Ok(atomic::in_creation_order(entries, PREFIX))
}

/// The newest generation other than the current one: what `certctl
/// rollback` switches to.
pub fn previous(dir: &Path) -> Result<Option<String>> {
    let cur = current(dir)?;
    Ok(list(dir)?
        .into_iter()
        .rev()
        .find(|id| Some(id) != cur.as_ref()))
}

/// The link a configured path must be: `..data/<name>`.
fn name_link(live: &Path) -> PathBuf {
    Path::new(DATA).join(live.file_name().unwrap_or_default())
}

/// Whether `live` is already the layout's symlink.
pub fn is_linked(live: &Path) -> bool {
    atomic::read_link(live)
        .ok()
        .flatten()
        .is_some_and(|t| t == name_link(live))
}

/// What a deploy compares with: the file in the current generation when
/// `live` is the layout's link, the file itself when it is a regular file
/// (to be converted), nothing when it is missing. Any other symlink is an
/// error (it would be replaced).
pub fn observe(live: &Path) -> Result<Option<Existing>> {
    if is_linked(live) {
        // `..data` is followed; the final name in the generation is not.
        return atomic::observe(&atomic::parent(live).join(name_link(live)));
    }
    atomic::observe(live)
}

/// Writes every file of `plan` into a new generation and makes it durable.
/// On error the generation is removed; nothing visible changed.
pub fn stage(plan: &Plan, dir: &Path, id: &str) -> Result<PathBuf> {
    // The generations and the files in them are read by the server through
    // the links: the directories are traversable, the files keep their modes.
    atomic::make_dir_with_mode(&dir.join(AGENT_DIR), 0o711)?;
    // Filled under a partial name and renamed whole: a kill in the middle
    // never leaves half a generation (a partial one is swept at the next
    // start).
    let generation = gen_dir(dir, id);
    let partial = atomic::partial_of(&generation);
    atomic::make_dir_with_mode(&partial, 0o755)?;
    let written = (|| {
        for f in &plan.files {
            let name = f.path.file_name().unwrap_or_default();
            let dest = partial.join(name);
            let tmp = atomic::write_temp(&dest, id, &f.bytes, f.mode, f.uid, f.gid)?;
            atomic::rename(&tmp, &dest)?;
        }
        atomic::fsync_dir(&partial)?;
        atomic::rename(&partial, &generation)?;
        atomic::fsync_dir(&dir.join(AGENT_DIR))
    })();
    if let Err(e) = written {
        let _ = atomic::remove_tree(&partial);
        let _ = atomic::remove_tree(&generation);
        return Err(e);
    }
    Ok(generation)
}

/// The configured paths that are not yet the layout's links (converted by
/// this run), with whether something is there.
pub fn to_convert(plan: &Plan) -> Vec<(PathBuf, bool)> {
    plan.files
        .iter()
        .filter(|f| !is_linked(&f.path))
        .map(|f| (f.path.clone(), std::fs::symlink_metadata(&f.path).is_ok()))
        .collect()
}

/// Switches `..data` to `generation` (one rename) and converts `convert`
/// paths into links, keeping the files they replace as backups. On error,
/// undoes what was done.
pub(super) fn commit(
    dir: &Path,
    generation: &Path,
    convert: &[(PathBuf, bool)],
    target: &str,
    id: &str,
) -> Result<Committed> {
    let data = data_link(dir);
    let previous = atomic::read_link(&data)?;
    let gen_id = id_of(generation).unwrap_or_else(|| id.to_owned());
    let mut committed = Committed {
        fs: atomic::LOCAL,
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: None,
    };
    // Backups of regular files about to become links.
    let bdir = atomic::backup_dir(dir, target, id);
    let mut backups = Vec::new();
    for (live, existed) in convert {
        if *existed {
            if committed.backup_dirs.is_empty() {
                atomic::make_private_dir(&bdir)?;
                committed.backup_dirs.push(bdir.clone());
            }
            let b = bdir.join(live.file_name().unwrap_or_default());
            atomic::keep_backup(live, &b)?;
            backups.push(Some(b));
        } else {
            backups.push(None);
        }
    }
    if !committed.backup_dirs.is_empty() {
        atomic::fsync_dir(&bdir)?;
    }
    failpoint::hit("after-backup");
    // The switch.
    let switched =
        atomic::switch_link(&data, &link_target(&gen_id), id).and_then(|()| atomic::fsync_dir(dir));
    if let Err(e) = switched {
        for d in &committed.backup_dirs {
            let _ = atomic::remove_tree(d);
        }
        return Err(e);
    }
    committed.switch = Some(Switch {
        data,
        previous,
        generation: generation.to_owned(),
        created: true,
    });
    failpoint::hit("between-renames");
    // Stable names.
    for ((live, _), backup) in convert.iter().zip(backups) {
        if let Err(e) = atomic::switch_link(live, &name_link(live), id) {
            let _ = commit::undo(&committed, id);
            return Err(e);
        }
        committed.files.push((live.clone(), backup));
    }
    if !convert.is_empty()
        && let Err(e) = atomic::fsync_dir(dir)
    {
        let _ = commit::undo(&committed, id);
        return Err(e);
    }
    Ok(committed)
}

/// Switches `..data` to generation `to` (an existing one): `certctl
/// rollback`.
pub(super) fn switch_to(dir: &Path, to: &str, id: &str) -> Result<Committed> {
    let data = data_link(dir);
    let previous = atomic::read_link(&data)?;
    atomic::switch_link(&data, &link_target(to), id)?;
    atomic::fsync_dir(dir)?;
    Ok(Committed {
        fs: atomic::LOCAL,
        files: Vec::new(),
        backup_dirs: Vec::new(),
        switch: Some(Switch {
            data,
            previous,
            generation: gen_dir(dir, to),
            created: false,
        }),
    })
}

/// Keeps the newest `keep` generations besides the current one.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let cur = current(dir)?;
    let others: Vec<String> = list(dir)?
        .into_iter()
        .filter(|id| Some(id) != cur.as_ref())
        .collect();
    let excess = others.len().saturating_sub(keep);
    for id in &others[..excess] {
        atomic::remove_tree(&gen_dir(dir, id))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_link_targets_and_directories() {
        assert_eq!(
            id_of(Path::new(".certctl/gen-20261122T101010.000Z-abcd")).as_deref(),
            Some("20261122T101010.000Z-abcd")
        );
        assert_eq!(id_of(Path::new("elsewhere")), None);
        let dir = tempfile::tempdir().unwrap();
        // Listed in the order they were written, then by name: made in
        // name order, so a clock tick between two of them changes nothing.
        for id in ["a", "b", "c"] {
            std::fs::create_dir_all(gen_dir(dir.path(), id)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join(".certctl/backup")).unwrap();
        assert_eq!(list(dir.path()).unwrap(), ["a", "b", "c"]);
        atomic::switch_link(&data_link(dir.path()), &link_target("c"), "t").unwrap();
        assert_eq!(current(dir.path()).unwrap().as_deref(), Some("c"));
        assert_eq!(previous(dir.path()).unwrap().as_deref(), Some("b"));
        prune(dir.path(), 1).unwrap();
        assert_eq!(list(dir.path()).unwrap(), ["b", "c"]);
    }

    #[test]
    fn a_configured_path_is_linked_only_through_data() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("cert.pem");
        assert!(!is_linked(&live));
        std::os::unix::fs::symlink("..data/cert.pem", &live).unwrap();
        assert!(is_linked(&live));
        let other = dir.path().join("key.pem");
        std::os::unix::fs::symlink("/etc/passwd", &other).unwrap();
        assert!(!is_linked(&other));
        assert!(observe(&other).is_err(), "a foreign link is refused");
    }
}
