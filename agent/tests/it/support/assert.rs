//! What the integration tests check after a deploy: the state of a target
//! directory, the events of a `--json` deploy, and paths as CLI arguments.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One file of a [`snapshot`]: path, bytes, mode, uid, gid.
pub type FileState = (PathBuf, Vec<u8>, u32, u32, u32);

/// Every file under `dir` (recursively, backups included) with its bytes,
/// mode and owner, sorted: equal snapshots mean "nothing changed".
pub fn snapshot(dir: &Path) -> Vec<FileState> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let path = e.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            if meta.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                out.push((path, bytes, meta.mode() & 0o7777, meta.uid(), meta.gid()));
            }
        }
    }
    out.sort();
    out
}

/// Names of `.certctl-tmp-*` files directly in `dir`.
pub fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with(".certctl-tmp-"))
        .collect()
}

/// The `result` of the final event of a `deploy --json` stream, which must be `done`.
pub fn done(lines: &[serde_json::Value]) -> &serde_json::Value {
    let last = lines.last().expect("at least one event");
    assert_eq!(last["stage"], "done", "{lines:#?}");
    &last["result"]
}

/// The `stage` of every event, in order.
pub fn stages(lines: &[serde_json::Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l["stage"].as_str().expect("stage is a string"))
        .collect()
}

/// A path as a CLI argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
