//! The crash-safety invariants of DEPLOY-PROTOCOL.md, checked from the
//! outside after an agent was killed, crashed or hit a filesystem fault and
//! was restarted:
//!
//! 1. each target holds one complete certificate set (one of the sets the
//!    test deployed, never a mix, never empty or truncated);
//! 2. owner and mode of the files are the expected ones;
//! 3. every journal entry is terminal (`certctl history`);
//! 4. no `.certctl-tmp-*` file is left and backups are within retention;
//! 5. `certctl status` reports the leaf that is on disk.
//!
//! Each check returns the list of violations (empty: all held), so loops
//! can count them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::TestEnv;
use super::assert::temp_files;
use super::pki::Leaf;

/// A `kind = "file"` target as the crash tests set it up.
pub struct FileTarget<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub retention: usize,
}

/// Checks invariants 1, 2 and 4 for `t`, whose files must equal one of
/// `sets`. Returns the violations.
pub fn files(t: &FileTarget<'_>, sets: &[&Leaf]) -> Vec<String> {
    let mut v = Vec::new();
    let cert = std::fs::read_to_string(t.dir.join("cert.pem"));
    let key = std::fs::read_to_string(t.dir.join("key.pem"));
    match (&cert, &key) {
        (Ok(cert), Ok(key)) => {
            if !sets
                .iter()
                .any(|s| *cert == s.fullchain_pem() && *key == s.key_pem)
            {
                let which = |text: &str, pick: fn(&Leaf) -> String| {
                    sets.iter()
                        .position(|s| pick(s) == text)
                        .map_or("unknown bytes".to_owned(), |i| format!("set {i}"))
                };
                v.push(format!(
                    "{}: torn set: cert.pem is {}, key.pem is {}",
                    t.name,
                    which(cert, Leaf::fullchain_pem),
                    which(key, |l| l.key_pem.clone())
                ));
            }
        }
        _ => v.push(format!(
            "{}: a file is missing: cert.pem {:?}, key.pem {:?}",
            t.name,
            cert.as_ref().err().map(ToString::to_string),
            key.as_ref().err().map(ToString::to_string)
        )),
    }
    for (file, mode) in [("cert.pem", 0o644), ("key.pem", 0o600)] {
        if let Ok(meta) = std::fs::metadata(t.dir.join(file))
            && meta.mode() & 0o7777 != mode
        {
            v.push(format!(
                "{}: {file} has mode {:04o}, want {mode:04o}",
                t.name,
                meta.mode() & 0o7777
            ));
        }
    }
    let temps = temp_files(t.dir);
    if !temps.is_empty() {
        v.push(format!("{}: temp files left: {temps:?}", t.name));
    }
    // The generations layout: the names are links through ..data, and
    // at most `retention` generations besides the current one are kept.
    if let Ok(current) = std::fs::read_link(t.dir.join("..data")) {
        for file in ["cert.pem", "key.pem"] {
            match std::fs::read_link(t.dir.join(file)) {
                Ok(link) if link == Path::new("..data").join(file) => {}
                other => v.push(format!(
                    "{}: {file} is not the ..data link: {other:?}",
                    t.name
                )),
            }
        }
        if !t.dir.join(&current).is_dir() {
            v.push(format!(
                "{}: ..data points at a missing {current:?}",
                t.name
            ));
        }
        let gens = std::fs::read_dir(t.dir.join(".certctl")).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
                .count()
        });
        if gens > t.retention + 1 {
            v.push(format!(
                "{}: {gens} generations kept, retention is {} besides the current one",
                t.name, t.retention
            ));
        }
    }
    let backups = t.dir.join(".certctl/backup").join(t.name);
    let partial = partial_sets_left(&backups);
    let sets: Vec<String> = std::fs::read_dir(&backups).map_or(Vec::new(), |d| {
        d.filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect()
    });
    if !partial.is_empty() {
        v.push(format!(
            "{}: partial backup sets left in {}: {partial:?}",
            t.name,
            backups.display()
        ));
    }
    let kept = sets.len();
    if kept > t.retention {
        v.push(format!(
            "{}: {kept} backup sets kept, retention is {}",
            t.name, t.retention
        ));
    }
    v
}

/// The `.<id>.partial` sets still in the backup directory `root` after a
/// moment. A set beyond retention is renamed so before the run answers and
/// removed right after it: gone within moments (one left by a kill is
/// swept at the next start), and never a set. Waits up to 5 s.
pub fn partial_sets_left(root: &Path) -> Vec<String> {
    let partials = || -> Vec<String> {
        std::fs::read_dir(root).map_or(Vec::new(), |d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && n.ends_with(".partial"))
                .collect()
        })
    };
    let waited = std::time::Instant::now();
    while !partials().is_empty() && waited.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    partials()
}

/// Invariant 3: every run in the journal has an outcome.
pub fn journal(env: &TestEnv) -> Vec<String> {
    let out = env.ctl(&["--json", "history", "--limit", "10000"]);
    if out.code != 0 {
        return vec![format!("certctl history failed: {out}")];
    }
    out.json()["history"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["outcome"].is_null())
                .map(|e| {
                    format!(
                        "journal: {} of {} has no outcome (stage {})",
                        e["deploy_id"], e["target"], e["last_stage"]
                    )
                })
                .collect()
        })
        .unwrap_or_else(|| vec![format!("history is not a list: {out}")])
}

/// Invariant 5: `certctl status` reports the leaf on disk.
pub fn status(env: &TestEnv, t: &FileTarget<'_>, sets: &[&Leaf]) -> Vec<String> {
    let Ok(cert) = std::fs::read_to_string(t.dir.join("cert.pem")) else {
        return Vec::new();
    };
    let Some(on_disk) = sets.iter().find(|s| cert == s.fullchain_pem()) else {
        return Vec::new();
    };
    let out = env.ctl(&["--json", "status", t.name]);
    if out.code != 0 {
        return vec![format!("certctl status failed: {out}")];
    }
    let said = out.json()["targets"][0]["cert_sha256"].clone();
    if said != on_disk.sha256_hex.as_str() {
        vec![format!(
            "{}: status says {said}, disk holds {}",
            t.name, on_disk.sha256_hex
        )]
    } else {
        Vec::new()
    }
}
