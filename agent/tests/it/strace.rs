//! The real agent under `strace -f`: every file it publishes beside a target
//! goes `fsync(temp)` → `rename` → `fsync(dir)`, and every backup it relies
//! on to undo that is durable before the file it preserves is replaced.
//!
//! One agent run, traced from start to stop, deploys through the real CLI to
//! a `file` target with cert, key and chain files: a first deploy (files
//! created), a replacing deploy (backups made), a deploy whose validate
//! command fails (the previous files restored) and a `certctl rollback`
//! (backups swapped in). The trace is replayed in order over a model of the
//! target directory in which names point at files (inodes), so a file is
//! followed across hard links and renames. The rules, in trace order (a
//! call happens "before" another when its completion is printed before the
//! other's start; only successful calls count):
//!
//! 1. **fsync(temp)**: for every rename whose destination is a target file,
//!    the source is a `.certctl-tmp-<deploy-id>-[restore-]<name>` in the
//!    destination's directory, the file it names was created by the agent
//!    during the trace, and every write to that file completed before an
//!    `fsync`/`fdatasync` on it that completed before the rename started. A
//!    restore temp is a hard link to a backup, itself a link to a file the
//!    agent published, and fsynced, earlier in the trace, so the same test
//!    covers it without a new fsync (a copy would need its own).
//! 2. **rename**: the publications counted per scenario are exactly the
//!    expected ones (3 per commit, restore or rollback), so none can slip by
//!    unchecked.
//! 3. **fsync(dir)**: after the rename completed, an `fsync` of an fd open
//!    on the destination directory started and completed before the agent
//!    reported that deploy's next step: its log line for stage `committed`
//!    (commit, `certctl rollback`) or for the outcome (restore after a failed
//!    validate). The agent writes that line from the deploy itself before it
//!    sends the event to the client, so no client and no log reader learns
//!    of the step before the directory entry is durable.
//!
//! Backups (what `atomic.rs` promises: kept "by hard link …, falling
//! back to an fsynced copy", and `commit` fsyncs their directory before any
//! rename): for every backup created under `<dir>/.certctl/backup/`, before
//! the rename that replaces the live file it preserves, the backup's file
//! passes test 1, its directory was fsynced after it was created, and every
//! directory created on the way there (`.certctl`, `backup`, `<target>`,
//! `<deploy-id>`) had its parent fsynced after the `mkdir`. Otherwise a
//! crash right after the rename could lose the only copy of the old files.
//!
//! The journal (what `journal.rs` promises: a run is on disk before it
//! touches a file): when a temp file that is later renamed onto a target
//! gets its name (created, or linked from a backup for a restore), every
//! write to the journal's WAL before that has been covered by an `fsync` or
//! `fdatasync` of the WAL that completed before it. That holds whether
//! SQLite fsyncs at its commit or the group commit does after it.
//!
//! Also: target files are never opened for writing, written or linked
//! over; and a target file removed (undoing a deploy that created it, not
//! one of the scenarios here) is held to rule 3, with the next report line
//! of any deploy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::support::assert::{arg, done};
use crate::support::pki::Ca;
use crate::support::strace::{self, Call, FileOp};
use crate::support::{TestEnv, server_missing, toml_array, toml_path};

/// What to trace. The classes cover every call that opens, writes, syncs,
/// renames, links, removes or creates a file or directory (`%file` has the
/// path calls, `%desc` the fd calls incl. `fsync`, `fdatasync`,
/// `copy_file_range`, `sendfile`), on every architecture: naming `rename`
/// or `link` would fail where only the `*at` variants exist.
const SYSCALLS: &str = "%file,%desc,fsync,fdatasync";

const TEMP_PREFIX: &str = ".certctl-tmp-";

#[test]
fn every_published_file_is_fsynced_renamed_then_its_directory_fsynced() {
    let Some(strace_bin) = strace::strace_bin() else {
        server_missing("strace");
        return;
    };
    let started = Instant::now();
    let mut env = TestEnv::new();
    let dir = std::fs::canonicalize(env.target_dir("app")).unwrap();
    let files = ["cert.pem", "key.pem", "chain.pem"].map(|n| dir.join(n));
    // Validation fails while this file exists.
    let fail_validate = env.path().join("fail-validate");
    env.target(
        "app",
        &format!(
            "kind = \"file\"\ncert_path = {}\nkey_path = {}\nchain_path = {}\n\
             validate = {}\nreload = [\"true\"]\n",
            toml_path(&files[0]),
            toml_path(&files[1]),
            toml_path(&files[2]),
            toml_array(&["test", "!", "-e", arg(&fail_validate)]),
        ),
    );
    let trace_path = env.path().join("agent.strace");
    let agent = strace::spawn_traced_agent(&env, &strace_bin, &trace_path, SYSCALLS);

    // A new intermediate each time, so that the chain file changes too.
    let root = Ca::root("root");
    let leaves: Vec<_> = (0..3)
        .map(|i| {
            root.intermediate(&format!("int{i}"))
                .leaf(&["app.test"])
                .issue()
        })
        .collect();
    let inputs: Vec<_> = leaves
        .iter()
        .enumerate()
        .map(|(i, l)| env.inputs(l, &format!("v{i}")))
        .collect();
    let deploy = |i: usize, code: i32| {
        let out = env.ctl(&["--json", "deploy", "app", "--cert", arg(&inputs[i].bundle)]);
        out.assert_code(code);
        let lines = out.json_lines();
        (lines[0]["deploy_id"].as_str().unwrap().to_owned(), lines)
    };
    let cert_on_disk = || std::fs::read_to_string(&files[0]).unwrap();

    let mut scenarios: Vec<(&str, String)> = Vec::new();
    let (id, lines) = deploy(0, 0);
    assert_eq!(done(&lines)["outcome"], "deployed");
    scenarios.push(("first deploy", id));
    let (id, lines) = deploy(1, 0);
    assert_eq!(done(&lines)["outcome"], "deployed");
    assert_eq!(cert_on_disk(), leaves[1].cert_pem);
    scenarios.push(("replacing deploy", id));
    std::fs::write(&fail_validate, "").unwrap();
    let (id, lines) = deploy(2, 4);
    assert_eq!(done(&lines)["outcome"], "validate_failed");
    assert_eq!(cert_on_disk(), leaves[1].cert_pem, "restored");
    scenarios.push(("failed validate (restore)", id));
    std::fs::remove_file(&fail_validate).unwrap();
    let out = env.ctl(&["--json", "rollback", "app"]);
    out.assert_code(0);
    let lines = out.json_lines();
    assert_eq!(done(&lines)["outcome"], "restored", "{out}");
    assert_eq!(cert_on_disk(), leaves[0].cert_pem, "rolled back");
    scenarios.push((
        "certctl rollback",
        lines[0]["deploy_id"].as_str().unwrap().to_owned(),
    ));

    let log = std::fs::canonicalize(env.agent_log_path()).unwrap();
    let text = agent.finish();
    let calls = strace::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let audit = audit(&calls, &files, &log);
    let trace_lines: Vec<&str> = text.lines().collect();
    assert!(
        audit.violations.is_empty(),
        "{} violation(s) of the publication protocol (trace {}, kept with CERTCTL_TEST_KEEP_TMP=1):\n{}",
        audit.violations.len(),
        trace_path.display(),
        audit
            .violations
            .iter()
            .map(|v| v.render(&trace_lines))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Exactly the expected publications, per scenario: (written temps,
    // restores, backups).
    let counts = audit.counts();
    let mut summary = Vec::new();
    for ((name, id), want) in scenarios
        .iter()
        .zip([(3, 0, 0), (3, 0, 3), (3, 3, 3), (0, 3, 3)])
    {
        let got = counts.get(id.as_str()).copied().unwrap_or_default();
        assert_eq!(
            got, want,
            "{name} ({id}): (written, restored, backups) published; all counts: {counts:?}"
        );
        summary.push(format!(
            "{name}: {} written + {} restored files, {} backups",
            got.0, got.1, got.2
        ));
    }
    assert_eq!(counts.len(), scenarios.len(), "{counts:?}");
    eprintln!(
        "strace: {} calls, {} publications and {} backups checked in {:?}: {}",
        calls.len(),
        audit.publications.len(),
        audit.backups.len(),
        started.elapsed(),
        summary.join("; ")
    );
}

// === the audit ===

/// A rule broken at trace line `line` (0-based).
#[derive(Debug)]
struct Violation {
    line: usize,
    what: String,
}

impl Violation {
    fn render(&self, lines: &[&str]) -> String {
        let text = lines.get(self.line).copied().unwrap_or("");
        let text: String = text.chars().take(300).collect();
        format!("- line {}: {}\n    {text}", self.line + 1, self.what)
    }
}

/// A rename onto a target file.
#[derive(Debug)]
struct Publication {
    deploy_id: String,
    live: PathBuf,
    /// Put back from a backup (validate failure, rollback).
    restore: bool,
    /// The rename's call.
    start: usize,
    end: usize,
}

/// A backup kept under `.certctl/backup/`.
#[derive(Debug)]
struct Backup {
    deploy_id: String,
    live: PathBuf,
    path: PathBuf,
    /// Line the backup was created (link or create) at.
    end: usize,
    /// Checked against the rename that replaced `live`.
    checked: bool,
}

#[derive(Debug, Default)]
struct Audit {
    publications: Vec<Publication>,
    backups: Vec<Backup>,
    /// Target files unlinked (undoing a deploy that created them), with the
    /// line the unlink completed.
    removals: Vec<(PathBuf, usize)>,
    violations: Vec<Violation>,
}

impl Audit {
    /// Per deploy id: (written temps published, restores published, backups).
    fn counts(&self) -> BTreeMap<&str, (usize, usize, usize)> {
        let mut m: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
        for p in &self.publications {
            let c = m.entry(&p.deploy_id).or_default();
            if p.restore {
                c.1 += 1;
            } else {
                c.0 += 1;
            }
        }
        for b in &self.backups {
            m.entry(&b.deploy_id).or_default().2 += 1;
        }
        m
    }

    fn violation(&mut self, line: usize, what: String) {
        self.violations.push(Violation { line, what });
    }
}

/// One file as the model knows it.
#[derive(Debug, Default)]
struct Inode {
    /// Line of the call that created it; `None`: it existed before the trace.
    created: Option<usize>,
    /// Completion line of the latest write not covered by an fsync since.
    unsynced: Option<usize>,
    /// Completion line of the latest fsync.
    synced: Option<usize>,
}

/// Names → files, replayed from the trace.
#[derive(Default)]
struct Model {
    inodes: Vec<Inode>,
    names: HashMap<PathBuf, usize>,
}

impl Model {
    fn inode(&mut self, path: &Path) -> usize {
        if let Some(&i) = self.names.get(path) {
            return i;
        }
        self.inodes.push(Inode::default());
        let i = self.inodes.len() - 1;
        self.names.insert(path.to_owned(), i);
        i
    }

    fn create(&mut self, path: &Path, line: usize) -> usize {
        self.inodes.push(Inode {
            created: Some(line),
            ..Inode::default()
        });
        let i = self.inodes.len() - 1;
        self.names.insert(path.to_owned(), i);
        i
    }

    fn written(&mut self, path: &Path, line: usize) {
        let i = self.inode(path);
        self.inodes[i].unsynced = Some(line);
    }

    /// Rule 1 for the file at `path`, for a call starting at `before`.
    fn durable(&self, path: &Path, before: usize) -> Result<(), String> {
        let Some(&i) = self.names.get(path) else {
            return Err(format!("{} does not exist", path.display()));
        };
        let ino = &self.inodes[i];
        if ino.created.is_none() {
            return Err(format!(
                "{} existed before the trace: not published by this agent",
                path.display()
            ));
        }
        if let Some(w) = ino.unsynced {
            return Err(format!(
                "{} was written at line {} and not fsynced after that",
                path.display(),
                w + 1
            ));
        }
        match ino.synced {
            Some(s) if s < before => Ok(()),
            Some(s) => Err(format!(
                "{} was fsynced only at line {}, not before",
                path.display(),
                s + 1
            )),
            None => Err(format!("{} was never fsynced", path.display())),
        }
    }
}

/// A completed fsync/fdatasync.
struct Sync {
    path: PathBuf,
    start: usize,
    end: usize,
}

/// Is there an fsync of `dir` that started after `after` and completed
/// before `before`?
fn synced_between(syncs: &[Sync], dir: &Path, after: usize, before: usize) -> bool {
    syncs
        .iter()
        .any(|s| s.path == dir && s.start > after && s.end < before)
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("/"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `deploy{target=app deploy_id=X}: … stage="committed"` → `X`, for the
/// lines that report a committed stage or an outcome.
fn report_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    if !(text.contains("stage=\"committed\"") || text.contains(" outcome=\"")) {
        return None;
    }
    let id = text.split("deploy_id=").nth(1)?;
    let end = id.find(['}', ' ']).unwrap_or(id.len());
    Some(id[..end].to_owned())
}

/// Replays `calls` and checks the rules of the module doc for the target
/// files `targets`; `log` is the agent's log file.
fn audit(calls: &[Call], targets: &[PathBuf], log: &Path) -> Audit {
    let mut audit = Audit::default();
    let mut model = Model::default();
    let mut syncs: Vec<Sync> = Vec::new();
    let mut mkdirs: Vec<(PathBuf, usize)> = Vec::new();
    // The line each path got its name at (created or linked).
    let mut named: HashMap<PathBuf, usize> = HashMap::new();
    // Completion lines of the writes to the journal's WAL.
    let mut wal_writes: Vec<usize> = Vec::new();
    // (deploy id, start line) of every report line.
    let mut reports: Vec<(String, usize)> = Vec::new();
    let is_target = |p: &Path| targets.iter().any(|t| t == p);
    let backup_root = |p: &Path| {
        targets
            .iter()
            .map(|t| parent(t).join(".certctl/backup"))
            .find(|root| p.starts_with(root))
    };

    for call in calls {
        if call.name == "write"
            && call.fd_path(0) == Some(log)
            && let Some(id) = call.str_arg(1).and_then(report_line)
        {
            reports.push((id, call.start));
        }
        let Some(op) = call.file_op() else { continue };
        match op {
            FileOp::Open {
                path,
                create,
                exclusive,
                truncate,
                write,
            } => {
                if is_target(&path) && (write || create || truncate) {
                    audit.violation(
                        call.end,
                        format!("target {} opened for writing", path.display()),
                    );
                }
                if create && (exclusive || !model.names.contains_key(&path)) {
                    named.insert(path.clone(), call.end);
                    model.create(&path, call.end);
                    if let Some(root) = backup_root(&path) {
                        // A backup by copy.
                        new_backup(&mut audit, &root, &path, call.end);
                    }
                } else if truncate && write {
                    model.written(&path, call.end);
                }
            }
            FileOp::Write { path } => {
                if is_target(&path) {
                    audit.violation(call.end, format!("target {} written", path.display()));
                }
                if is_wal(&path) {
                    wal_writes.push(call.end);
                }
                model.written(&path, call.end);
            }
            FileOp::Sync { path, .. } => {
                if let Some(&i) = model.names.get(&path) {
                    let ino = &mut model.inodes[i];
                    if ino.unsynced.is_some_and(|w| w < call.start) {
                        ino.unsynced = None;
                    }
                    ino.synced = Some(call.end);
                }
                syncs.push(Sync {
                    path,
                    start: call.start,
                    end: call.end,
                });
            }
            FileOp::Rename { from, to, exchange } => {
                if exchange || is_target(&from) {
                    audit.violation(
                        call.end,
                        format!("target renamed away or exchanged: {}", from.display()),
                    );
                }
                if is_target(&to) {
                    if let Some(&at) = named.get(&from) {
                        journaled_before(&mut audit, &wal_writes, &syncs, &from, at);
                    }
                    publication(&mut audit, &model, &syncs, &mkdirs, call, &from, &to);
                }
                if let Some(at) = named.remove(&from) {
                    named.insert(to.clone(), at);
                }
                if let Some(i) = model.names.remove(&from) {
                    model.names.insert(to, i);
                }
            }
            FileOp::Link { from, to } => {
                if is_target(&to) {
                    audit.violation(call.end, format!("target {} linked over", to.display()));
                }
                let i = model.inode(&from);
                model.names.insert(to.clone(), i);
                named.insert(to.clone(), call.end);
                if let Some(root) = backup_root(&to) {
                    let live = new_backup(&mut audit, &root, &to, call.end);
                    if live.as_deref() != Some(from.as_path()) {
                        audit.violation(
                            call.end,
                            format!(
                                "backup {} is a link to {}, not to the live file",
                                to.display(),
                                from.display()
                            ),
                        );
                    }
                }
            }
            FileOp::Unlink { path, .. } => {
                if is_target(&path) {
                    audit.removals.push((path.clone(), call.end));
                }
                model.names.remove(&path);
            }
            FileOp::Mkdir { path } => mkdirs.push((path, call.end)),
        }
    }

    // Rule 3, now that the whole trace is known.
    let mut late = Vec::new();
    for p in &audit.publications {
        let dir = parent(&p.live);
        let Some(&(_, report)) = reports
            .iter()
            .find(|(id, line)| *id == p.deploy_id && *line > p.end)
        else {
            late.push((
                p.end,
                format!(
                    "{} published by {} but the deploy never reported a committed stage or an outcome after it",
                    p.live.display(),
                    p.deploy_id
                ),
            ));
            continue;
        };
        if !synced_between(&syncs, dir, p.end, report) {
            let next = syncs
                .iter()
                .find(|s| s.path == dir && s.start > p.end)
                .map_or("never".to_owned(), |s| format!("at line {}", s.start + 1));
            late.push((
                p.start,
                format!(
                    "{} renamed into place, but {} was not fsynced before the deploy reported at line {} (next directory fsync: {next})",
                    p.live.display(),
                    dir.display(),
                    report + 1
                ),
            ));
        }
    }
    for (live, end) in &audit.removals {
        let dir = parent(live);
        let report = reports.iter().find(|(_, line)| line > end).map(|r| r.1);
        if !report.is_some_and(|r| synced_between(&syncs, dir, *end, r)) {
            late.push((
                *end,
                format!(
                    "{} removed, but {} was not fsynced after that before the next report",
                    live.display(),
                    dir.display()
                ),
            ));
        }
    }
    for b in &audit.backups {
        if !b.checked {
            late.push((
                b.end,
                format!(
                    "backup {} was made but {} was never replaced after it",
                    b.path.display(),
                    b.live.display()
                ),
            ));
        }
    }
    for (line, what) in late {
        audit.violation(line, what);
    }
    audit
}

/// The journal's WAL (`<state_dir>/journal.sqlite-wal`).
fn is_wal(p: &Path) -> bool {
    file_name(p) == "journal.sqlite-wal"
}

/// The journal rule for the temp `temp`, named at line `at`: the WAL's
/// last write (`writes`) before then was fsynced before then.
fn journaled_before(audit: &mut Audit, writes: &[usize], syncs: &[Sync], temp: &Path, at: usize) {
    let Some(&w) = writes.iter().rev().find(|&&w| w < at) else {
        audit.violation(
            at,
            format!(
                "{} made before the run wrote anything to the journal",
                temp.display()
            ),
        );
        return;
    };
    if !syncs
        .iter()
        .any(|s| is_wal(&s.path) && s.start > w && s.end < at)
    {
        audit.violation(
            at,
            format!(
                "{} made before the journal's WAL, written at line {}, was fsynced: the run's record must be on disk before it touches a file",
                temp.display(),
                w + 1
            ),
        );
    }
}

/// Records a backup at `path` under `root` (`<dir>/.certctl/backup`);
/// returns the live file it preserves (`<dir>/<name>`).
fn new_backup(audit: &mut Audit, root: &Path, path: &Path, line: usize) -> Option<PathBuf> {
    // <root>/<target>/<deploy-id>/<name>
    let rel: Vec<_> = path.strip_prefix(root).ok()?.components().collect();
    let [_, id, name] = rel.as_slice() else {
        audit.violation(
            line,
            format!("unexpected file {} in the backups", path.display()),
        );
        return None;
    };
    let live = parent(parent(root)).join(name.as_os_str());
    audit.backups.push(Backup {
        deploy_id: id.as_os_str().to_string_lossy().into_owned(),
        live: live.clone(),
        path: path.to_owned(),
        end: line,
        checked: false,
    });
    Some(live)
}

/// Rules 1 and the backup rules for the rename `call` of `from` onto the
/// target file `to`; records the publication for rule 3.
fn publication(
    audit: &mut Audit,
    model: &Model,
    syncs: &[Sync],
    mkdirs: &[(PathBuf, usize)],
    call: &Call,
    from: &Path,
    to: &Path,
) {
    let name = file_name(to);
    let id = file_name(from)
        .strip_prefix(TEMP_PREFIX)
        .and_then(|s| s.strip_suffix(&format!("-{name}")))
        .map(str::to_owned);
    let Some(id) = id.filter(|_| parent(from) == parent(to)) else {
        audit.violation(
            call.end,
            format!(
                "{} renamed onto {}: not a {TEMP_PREFIX}<deploy-id>-{name} beside it",
                from.display(),
                to.display()
            ),
        );
        return;
    };
    let (deploy_id, restore) = match id.strip_suffix("-restore") {
        Some(id) => (id.to_owned(), true),
        None => (id, false),
    };
    if let Err(e) = model.durable(from, call.start) {
        audit.violation(call.start, format!("published before fsync: {e}"));
    }
    // The backups of the file being replaced must be durable by now.
    for i in 0..audit.backups.len() {
        let b = &audit.backups[i];
        if b.checked || b.live != to {
            continue;
        }
        let (bpath, bend) = (b.path.clone(), b.end);
        audit.backups[i].checked = true;
        if let Err(e) = model.durable(&bpath, call.start) {
            audit.violation(call.start, format!("backup not durable: {e}"));
        }
        let bdir = parent(&bpath);
        if !synced_between(syncs, bdir, bend, call.start) {
            audit.violation(
                call.start,
                format!(
                    "{} replaced before the directory of its backup {} was fsynced",
                    to.display(),
                    bpath.display()
                ),
            );
        }
        for (made, at) in mkdirs {
            if bpath.starts_with(made)
                && made.starts_with(parent(to))
                && *at < call.start
                && !synced_between(syncs, parent(made), *at, call.start)
            {
                audit.violation(
                    call.start,
                    format!(
                        "{} replaced before the new directory {} (mkdir at line {}) was made durable by an fsync of {}",
                        to.display(),
                        made.display(),
                        at + 1,
                        parent(made).display()
                    ),
                );
            }
        }
    }
    audit.publications.push(Publication {
        deploy_id,
        live: to.to_owned(),
        restore,
        start: call.start,
        end: call.end,
    });
}

// === the audit on canned traces ===

mod canned {
    use super::*;

    const LOG: &str = "/l/agent.log";

    fn targets() -> Vec<PathBuf> {
        vec![PathBuf::from("/d/cert.pem")]
    }

    /// Deploy A creates /d/cert.pem; deploy B replaces it (backup first),
    /// then its validate fails and the backup is restored. Lines may end in
    /// a `/* tag */` (after the result, where strace prints `-T` times and
    /// the parser ignores it) so that a test can drop or move them.
    fn good() -> Vec<String> {
        let tmp = |id: &str| format!("/d/.certctl-tmp-{id}-cert.pem");
        let create = |id: &str| {
            format!(
                r#"1 openat(AT_FDCWD</>, "{0}", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 3<{0}> /* create {id} */"#,
                tmp(id)
            )
        };
        // A journal row, and the WAL's fsync.
        let wal = |tag: &str| {
            [
                format!(r#"1 pwrite64(7</s/journal.sqlite-wal>, "row", 3, 0) = 3 /* wal {tag} */"#),
                format!(r#"1 fdatasync(7</s/journal.sqlite-wal>) = 0 /* wal sync {tag} */"#),
            ]
        };
        let report = |id: &str, what: &str| {
            format!(
                r#"1 write(2<{LOG}>, "INFO deploy{{target=app deploy_id={id}}}: x {what}\n", 60) = 60 /* report {id} {what} */"#
            )
        };
        let committed = r#"stage=\"committed\""#;
        let mut t = wal("A").to_vec();
        t.extend([
            create("A"),
            format!(r#"1 write(3<{}>, "new", 3) = 3 /* write A */"#, tmp("A")),
            format!(r#"1 fsync(3<{}>) = 0 /* fsync tmp A */"#, tmp("A")),
            format!(
                r#"1 rename("{}", "/d/cert.pem") = 0 /* rename A */"#,
                tmp("A")
            ),
            r#"1 fsync(4</d>) = 0 /* fsync dir A */"#.to_owned(),
            report("A", committed),
        ]);
        t.extend(wal("A outcome"));
        t.push(report("A", r#"outcome=\"deployed\""#));
        t.extend(wal("B"));
        let mut made = String::from("/d");
        for sub in [".certctl", "backup", "app", "B"] {
            let parent = made.clone();
            made = format!("{made}/{sub}");
            t.push(format!(r#"1 mkdir("{made}", 0700) = 0 /* mkdir {sub} */"#));
            t.push(format!(
                r#"1 fsync(5<{parent}>) = 0 /* fsync parent of {sub} */"#
            ));
        }
        t.extend([
            r#"1 linkat(AT_FDCWD</>, "/d/cert.pem", AT_FDCWD</>, "/d/.certctl/backup/app/B/cert.pem", 0) = 0 /* backup B */"#.to_owned(),
            r#"1 fsync(6</d/.certctl/backup/app/B>) = 0 /* fsync backup dir B */"#.to_owned(),
            create("B"),
            format!(r#"1 write(3<{}>, "newer", 5) = 5 /* write B */"#, tmp("B")),
            format!(r#"1 fsync(3<{}>) = 0 /* fsync tmp B */"#, tmp("B")),
            format!(r#"1 rename("{}", "/d/cert.pem") = 0 /* rename B */"#, tmp("B")),
            r#"1 fsync(4</d>) = 0 /* fsync dir B */"#.to_owned(),
            report("B", committed),
        ]);
        t.extend(wal("B rollback"));
        t.extend([
            format!(
                r#"1 linkat(AT_FDCWD</>, "/d/.certctl/backup/app/B/cert.pem", AT_FDCWD</>, "{}", 0) = 0 /* link restore B */"#,
                tmp("B-restore")
            ),
            format!(r#"1 rename("{}", "/d/cert.pem") = 0 /* rename restore B */"#, tmp("B-restore")),
            r#"1 fsync(4</d>) = 0 /* fsync dir restore B */"#.to_owned(),
            report("B", r#"outcome=\"validate_failed\""#),
        ]);
        t
    }

    fn run(lines: &[String]) -> Audit {
        let text = lines.join("\n");
        let calls = strace::parse(&text).unwrap_or_else(|e| panic!("{e}"));
        audit(&calls, &targets(), Path::new(LOG))
    }

    /// The good trace without the lines tagged `tags`.
    fn without(tags: &[&str]) -> Vec<String> {
        let t: Vec<String> = good()
            .into_iter()
            .filter(|l| !tags.iter().any(|tag| l.contains(&format!("/* {tag} */"))))
            .collect();
        assert_eq!(
            t.len(),
            good().len() - tags.len(),
            "not every tag found: {tags:?}"
        );
        t
    }

    /// `tag`'s line moved to just after the line tagged `after`.
    fn moved(tag: &str, after: &str) -> Vec<String> {
        let mut t = good();
        let from = t
            .iter()
            .position(|l| l.contains(&format!("/* {tag} */")))
            .unwrap();
        let line = t.remove(from);
        let to = t
            .iter()
            .position(|l| l.contains(&format!("/* {after} */")))
            .unwrap();
        t.insert(to + 1, line);
        t
    }

    #[track_caller]
    fn assert_violation(a: &Audit, needle: &str) {
        assert!(
            a.violations.iter().any(|v| v.what.contains(needle)),
            "want a violation containing {needle:?}, got {:#?}",
            a.violations
        );
    }

    #[test]
    fn the_protocol_followed_has_no_violations() {
        let a = run(&good());
        assert!(a.violations.is_empty(), "{:#?}", a.violations);
        assert_eq!(
            a.counts(),
            BTreeMap::from([("A", (1, 0, 0)), ("B", (1, 1, 1))])
        );
    }

    #[test]
    fn a_temp_renamed_without_fsync_is_caught() {
        let a = run(&without(&["fsync tmp A"]));
        assert_violation(
            &a,
            "published before fsync: /d/.certctl-tmp-A-cert.pem was written",
        );
        // The file is followed across links: its backup and the restore
        // from that backup are not durable either.
        assert_violation(&a, "backup not durable: /d/.certctl/backup/app/B/cert.pem");
        assert_violation(
            &a,
            "published before fsync: /d/.certctl-tmp-B-restore-cert.pem",
        );
        // Written again after its fsync.
        let a = run(&moved("write B", "fsync tmp B"));
        assert_violation(
            &a,
            "tmp-B-cert.pem was written at line 26 and not fsynced after that",
        );
        // Created and renamed, never written nor synced.
        let a = run(&without(&["write A", "fsync tmp A"]));
        assert_violation(&a, "tmp-A-cert.pem was never fsynced");
    }

    #[test]
    fn a_missing_or_late_directory_fsync_is_caught() {
        assert_violation(
            &run(&without(&["fsync dir A"])),
            "was not fsynced before the deploy reported",
        );
        let late = moved("fsync dir B", r#"report B stage=\"committed\""#);
        assert_violation(&run(&late), "was not fsynced before the deploy reported");
        assert_violation(
            &run(&without(&["fsync dir restore B"])),
            "/d was not fsynced",
        );
        // No report at all after a rename is a violation too.
        let a = run(&without(&[r#"report A stage=\"committed\""#]));
        assert!(
            a.violations.is_empty(),
            "the outcome line reports A: {:#?}",
            a.violations
        );
        let t: Vec<String> = good()
            .into_iter()
            .filter(|l| !l.contains("/* report A"))
            .collect();
        assert_violation(&run(&t), "never reported");
    }

    #[test]
    fn a_backup_not_made_durable_before_the_replacement_is_caught() {
        assert_violation(
            &run(&without(&["fsync backup dir B"])),
            "before the directory of its backup",
        );
        assert_violation(
            &run(&without(&["fsync parent of B"])),
            "before the new directory /d/.certctl/backup/app/B",
        );
        assert_violation(
            &run(&without(&["fsync parent of .certctl"])),
            "before the new directory /d/.certctl (mkdir",
        );
    }

    #[test]
    fn a_removal_needs_a_directory_fsync_too() {
        // Deploy A's validate fails: the file it created is removed.
        let mut t = without(&[r#"report A outcome=\"deployed\""#]);
        t.truncate(t.iter().position(|l| l.contains("mkdir .certctl")).unwrap());
        t.push(r#"1 unlink("/d/cert.pem") = 0"#.to_owned());
        let outcome = r#"1 write(2</l/agent.log>, "deploy{target=app deploy_id=A}: outcome=\"validate_failed\"", 9) = 9"#;
        let synced = [
            t.clone(),
            vec![r#"1 fsync(4</d>) = 0"#.to_owned(), outcome.to_owned()],
        ]
        .concat();
        let a = run(&synced);
        assert!(a.violations.is_empty(), "{:#?}", a.violations);
        assert_eq!(a.removals.len(), 1);
        let unsynced = [t, vec![outcome.to_owned()]].concat();
        assert_violation(
            &run(&unsynced),
            "/d/cert.pem removed, but /d was not fsynced",
        );
    }

    #[test]
    fn a_file_touched_before_the_run_is_on_disk_in_the_journal_is_caught() {
        assert_violation(
            &run(&without(&["wal sync A"])),
            "/d/.certctl-tmp-A-cert.pem made before the journal's WAL, written at line 1, was fsynced",
        );
        // The fsync must complete before the temp is made, not after.
        assert_violation(
            &run(&moved("wal sync B", "create B")),
            "/d/.certctl-tmp-B-cert.pem made before the journal's WAL",
        );
        // A restore is held to it too: the rollback row first.
        assert_violation(
            &run(&without(&["wal sync B rollback"])),
            "/d/.certctl-tmp-B-restore-cert.pem made before the journal's WAL",
        );
        assert_violation(
            &run(&without(&["wal A", "wal sync A"])),
            "made before the run wrote anything to the journal",
        );
    }

    #[test]
    fn writing_a_target_in_place_is_caught() {
        let mut t = good();
        t.push(
            r#"1 openat(AT_FDCWD</>, "/d/cert.pem", O_WRONLY|O_TRUNC|O_CLOEXEC) = 3</d/cert.pem>"#
                .to_owned(),
        );
        assert_violation(&run(&t), "opened for writing");
        let mut t = good();
        t.push(r#"1 rename("/d/other", "/d/cert.pem") = 0"#.to_owned());
        assert_violation(&run(&t), "not a .certctl-tmp-");
    }
}
