//! A model-based test of what the agent promises about the files on disk.
//!
//! A seeded random sequence of operations runs against the real agent and
//! the real `certctl` on three `file` targets: `a` and `b` in place, `c`
//! with the generations layout; `a` starts with the operator's own set
//! (key mode 0644), `b` and `c` start empty. Their validate and reload
//! commands are one small shell script whose behaviour the test sets
//! through files beside it (fail once, fail always, sleep first) and which
//! records what it saw on disk. The operations: deploys that succeed, fail
//! validation or the reload (once or always), deploys of an older set or
//! of the set in place, dry runs, rejected input, `certctl rollback` (also
//! with failing commands), configuration changes applied with SIGHUP
//! (reload command, validate command, `backup_retention`), clean restarts,
//! SIGKILL in the middle of deploys and rollbacks, and concurrent deploys
//! to one target.
//!
//! A small model predicts, per target, the set on disk, the backup stack
//! (in place) or the generations and which one is current, and the key's
//! mode. After every step the test reads every target directory and
//! compares; it checks that no `.certctl-tmp-*` file is left, that no
//! live key has an "other" bit or group write, that `certctl status`
//! reports the leaf on disk, that `certctl history` has the step's run as
//! the newest with the outcome the model expects, and what the validate
//! and reload commands saw on disk when they ran. After a SIGKILL a target
//! holds the set from before the operation or the one after it, never
//! anything else (and the one after when the client had been told so).
//!
//! A mismatch is recorded with the seed and the step, and the model then
//! follows what is on disk, so one run reports every kind of mismatch it
//! meets; the test fails at the end and lists them. Replay a run with
//! `CERTCTL_MODEL_SEED=<n> cargo test -p certctl-agent --test it model`;
//! `CERTCTL_MODEL_STEPS` sets the number of steps (default 500).
//!
//! Two deterministic tests pin the sequences behind the first mismatches
//! this loop found: a first deploy that ended `rollback_failed` must not be
//! undone again by the next start (after a later deploy succeeded), and
//! `certctl rollback` must not put back a key that others can read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::assert::{arg, temp_files};
use crate::support::pki::{self, Leaf};
use crate::support::process::{self, ChildGuard};
use crate::support::{AgentProc, CtlOutput, TestEnv, invariants, toml_array, toml_path};

const SEED_VAR: &str = "CERTCTL_MODEL_SEED";
const STEPS_VAR: &str = "CERTCTL_MODEL_STEPS";
const DEFAULT_STEPS: usize = 500;
/// Bound for a SIGHUP to be applied and for a client to end.
const WAIT: Duration = Duration::from_secs(60);
/// The mode bits a private key must never have: any "other" bit, group write.
const LOOSE: u32 = 0o027;

// === the random sequence ===

#[test]
fn random_operations_keep_every_target_as_the_model_says() {
    let seed = seed();
    let steps = steps();
    eprintln!(
        "model: seed {seed}, {steps} steps (replay: {SEED_VAR}={seed} {STEPS_VAR}={steps} \
         cargo test -p certctl-agent --test it model)"
    );
    let started = Instant::now();
    let mut rig = Rig::new(seed, steps);
    for _ in 0..steps {
        rig.step += 1;
        rig.random_step();
    }
    rig.step += 1;
    rig.trace("final clean restart".to_owned());
    rig.restart("final restart");
    for v in invariants::journal(&rig.env) {
        rig.violation("journal", v);
    }
    rig.report(started.elapsed());
}

fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_VAR}={v:?} is not a decimal number: {e}")),
        Err(_) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let mut r = Rng(now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32));
            // 40 bits: short enough to type.
            r.next() >> 24
        }
    }
}

fn steps() -> usize {
    std::env::var(STEPS_VAR).map_or(DEFAULT_STEPS, |v| {
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{STEPS_VAR}={v:?} is not a number: {e}"))
    })
}

/// splitmix64: tiny, seedable, plenty for picking test steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        (self.next() % n as u64) as usize
    }
}

// === the model ===

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    InPlace,
    Generations,
}

impl Layout {
    fn toml(self) -> &'static str {
        match self {
            Layout::InPlace => "in-place",
            Layout::Generations => "generations",
        }
    }
}

/// What a cert/key pair of files holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Absent,
    /// A known set, by index in [`Rig::sets`].
    Set(usize),
    /// Anything else (torn, half, unknown bytes), described.
    Other(String),
}

/// A backup set or a generation: what it holds, and its key's mode.
#[derive(Clone, Debug)]
struct Entry {
    content: Content,
    key_mode: u32,
}

/// One target's files as the model predicts them, or as read from disk.
#[derive(Clone, Debug)]
struct State {
    live: Content,
    cert_mode: u32,
    /// The live key's mode. `None` in a prediction: any mode without an
    /// "other" bit or group write (a loose key brought back by a rollback).
    key_mode: Option<u32>,
    /// The live key is the operator's own file that the agent never
    /// replaced: its mode is the operator's business.
    operator_key: bool,
    /// In place: the backup sets, oldest first.
    backups: Vec<Entry>,
    /// Generations layout: the generations, oldest first, and the current one.
    gens: Vec<Entry>,
    current: Option<usize>,
}

impl State {
    fn empty() -> State {
        State {
            live: Content::Absent,
            cert_mode: 0,
            key_mode: None,
            operator_key: false,
            backups: Vec::new(),
            gens: Vec::new(),
            current: None,
        }
    }

    /// The key mode a deploy writes: the existing one, tightened to the
    /// kind's 0600 when it has an "other" bit; 0600 when there is none.
    fn next_key_mode(&self) -> u32 {
        match (&self.live, self.key_mode) {
            (Content::Absent, _) => 0o600,
            (_, Some(m)) if m & 0o007 == 0 => m,
            _ => 0o600,
        }
    }

    /// After a successful deploy of `set`.
    fn deployed(&self, set: usize, layout: Layout, keep: usize) -> State {
        let mode = self.next_key_mode();
        let mut s = self.clone();
        match layout {
            Layout::InPlace => {
                if self.live != Content::Absent {
                    s.backups.push(Entry {
                        content: self.live.clone(),
                        key_mode: self.key_mode.unwrap_or(0o600),
                    });
                }
                prune_backups(&mut s.backups, keep);
            }
            Layout::Generations => {
                // The first deploy over regular files keeps them as backups.
                if self.gens.is_empty() && self.live != Content::Absent {
                    s.backups.push(Entry {
                        content: self.live.clone(),
                        key_mode: self.key_mode.unwrap_or(0o600),
                    });
                }
                s.gens.push(Entry {
                    content: Content::Set(set),
                    key_mode: mode,
                });
                s.current = Some(s.gens.len() - 1);
                prune_gens(&mut s.gens, &mut s.current, keep);
            }
        }
        s.cert_mode = if self.live == Content::Absent {
            0o644
        } else {
            self.cert_mode
        };
        s.live = Content::Set(set);
        s.key_mode = Some(mode);
        s.operator_key = false;
        s
    }

    /// After a successful `certctl rollback`; `None`: nothing to roll back to.
    fn rolled_back(&self, layout: Layout, keep: usize) -> Option<State> {
        let mut s = self.clone();
        let restored = match layout {
            Layout::InPlace => {
                // A backup directory without files is no backup set (it
                // should not exist; the check that found it said so).
                let top = s.backups.pop().filter(|t| t.content != Content::Absent)?;
                if self.live != Content::Absent {
                    s.backups.push(Entry {
                        content: self.live.clone(),
                        key_mode: self.key_mode.unwrap_or(0o600),
                    });
                }
                prune_backups(&mut s.backups, keep);
                top
            }
            Layout::Generations => {
                let to = (0..s.gens.len()).rev().find(|i| Some(*i) != s.current)?;
                s.current = Some(to);
                let e = s.gens[to].clone();
                prune_gens(&mut s.gens, &mut s.current, keep);
                e
            }
        };
        s.live = restored.content;
        // Correct behaviour: a key never comes back with an "other" bit.
        s.key_mode = (restored.key_mode & 0o007 == 0).then_some(restored.key_mode);
        s.cert_mode = 0o644;
        s.operator_key = false;
        Some(s)
    }

    /// After a start: backups beyond retention are pruned.
    fn restarted(&self, keep: usize) -> State {
        let mut s = self.clone();
        prune_backups(&mut s.backups, keep);
        s
    }
}

fn prune_backups(backups: &mut Vec<Entry>, keep: usize) {
    let excess = backups.len().saturating_sub(keep);
    backups.drain(..excess);
}

/// Keeps the newest `keep` generations besides the current one.
fn prune_gens(gens: &mut Vec<Entry>, current: &mut Option<usize>, keep: usize) {
    let others: Vec<usize> = (0..gens.len()).filter(|i| Some(*i) != *current).collect();
    let excess = others.len().saturating_sub(keep);
    let gone = &others[..excess];
    let mut kept = Vec::new();
    let mut cur = None;
    for (i, e) in gens.drain(..).enumerate() {
        if gone.contains(&i) {
            continue;
        }
        if Some(i) == *current {
            cur = Some(kept.len());
        }
        kept.push(e);
    }
    *gens = kept;
    *current = cur;
}

/// How a command behaves in one step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fail {
    No,
    Once,
    Always,
}

/// The part of a target's configuration the sequence changes.
#[derive(Clone, Debug)]
struct Cfg {
    /// `validate` is the hook (else `[]`).
    validate: bool,
    /// `reload = ["false"]` (else the hook).
    reload_false: bool,
    retention: usize,
}

/// A hook call the model expects: (validate or reload, run id, what it sees).
type Call = (&'static str, String, Content);

/// What one run is predicted to end with.
struct Prediction {
    /// Allowed (outcome, exit code) pairs.
    outcomes: Vec<(&'static str, i32)>,
    after: State,
    /// Hook calls in order: (validate or reload, what it must see on disk).
    hooks: Vec<(&'static str, Content)>,
}

fn predict_deploy(
    s: &State,
    cfg: &Cfg,
    layout: Layout,
    set: usize,
    v: Fail,
    r: Fail,
) -> Prediction {
    let new = Content::Set(set);
    if s.live == new && s.key_mode == Some(s.next_key_mode()) {
        return Prediction {
            outcomes: vec![("unchanged", 0)],
            after: s.clone(),
            hooks: Vec::new(),
        };
    }
    let mut hooks = Vec::new();
    if cfg.validate {
        hooks.push(("validate", new.clone()));
        if v != Fail::No {
            return Prediction {
                outcomes: vec![("validate_failed", 4)],
                after: s.clone(),
                hooks,
            };
        }
    }
    if !cfg.reload_false {
        hooks.push(("reload", new.clone()));
    }
    if !cfg.reload_false && r == Fail::No {
        return Prediction {
            outcomes: vec![("deployed", 0)],
            after: s.deployed(set, layout, cfg.retention),
            hooks,
        };
    }
    if !cfg.reload_false {
        hooks.push(("reload", s.live.clone()));
    }
    let again_fails = cfg.reload_false || r == Fail::Always;
    let outcomes = match (again_fails, &s.live) {
        (false, _) => vec![("rolled_back", 5)],
        // A first deploy: the new files are removed; what the outcome
        // should be is open (today rollback_failed), the files must be
        // gone either way.
        (true, Content::Absent) => vec![("rollback_failed", 6), ("rolled_back", 5)],
        (true, _) => vec![("rollback_failed", 6)],
    };
    Prediction {
        outcomes,
        after: s.clone(),
        hooks,
    }
}

fn predict_rollback(s: &State, cfg: &Cfg, layout: Layout, v: Fail, r: Fail) -> Prediction {
    let Some(after) = s.rolled_back(layout, cfg.retention) else {
        return Prediction {
            outcomes: vec![("rejected", 3)],
            after: s.clone(),
            hooks: Vec::new(),
        };
    };
    let restored = after.live.clone();
    let mut hooks = Vec::new();
    if cfg.validate {
        hooks.push(("validate", restored.clone()));
        if v != Fail::No {
            return Prediction {
                outcomes: vec![("validate_failed", 4)],
                after: s.clone(),
                hooks,
            };
        }
    }
    if !cfg.reload_false {
        hooks.push(("reload", restored));
    }
    if !cfg.reload_false && r == Fail::No {
        return Prediction {
            outcomes: vec![("restored", 0)],
            after,
            hooks,
        };
    }
    if !cfg.reload_false {
        hooks.push(("reload", s.live.clone()));
    }
    Prediction {
        outcomes: vec![("rollback_failed", 6)],
        after: s.clone(),
        hooks,
    }
}

/// The newest run of a target, as the model expects `certctl history` to show it.
#[derive(Clone, Debug)]
struct Newest {
    id: String,
    op: String,
    outcome: String,
    recovered: bool,
    /// Ended `rollback_failed` and not yet retried by a start.
    retry: bool,
}

impl Newest {
    fn of(id: &str, op: &str, outcome: &str) -> Newest {
        Newest {
            id: id.to_owned(),
            op: op.to_owned(),
            outcome: outcome.to_owned(),
            recovered: false,
            retry: outcome == "rollback_failed",
        }
    }

    fn from_history(e: &Value) -> Newest {
        let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        let recovered = e["recovered"] == true;
        let outcome = s("outcome");
        Newest {
            retry: outcome == "rollback_failed" && !recovered,
            id: s("deploy_id"),
            op: s("op"),
            outcome,
            recovered,
        }
    }
}

struct Target {
    name: String,
    dir: PathBuf,
    /// The hook's control directory (knob files and `calls.log`).
    hooks: PathBuf,
    layout: Layout,
    cfg: Cfg,
    state: State,
    newest: Option<Newest>,
}

struct SetInfo {
    name: String,
    leaf: Leaf,
    files: pki::LeafFiles,
    /// SHA-256 of the cert file and key file this set is deployed as.
    cert_file_sha: String,
    key_file_sha: String,
    /// The operator's own set, never deployed by the sequence.
    operator: bool,
}

/// What `certctl --json deploy|rollback` reported.
struct RunOut {
    code: i32,
    id: String,
    outcome: String,
    result: Value,
    text: String,
}

struct Violation {
    kind: String,
    step: usize,
    msg: String,
    trace: String,
}

// === the rig ===

struct Rig {
    seed: u64,
    steps: usize,
    step: usize,
    rng: Rng,
    env: TestEnv,
    agent: Option<AgentProc>,
    hook: PathBuf,
    targets: Vec<Target>,
    sets: Vec<SetInfo>,
    violations: Vec<Violation>,
    trace: Vec<String>,
    stats: BTreeMap<String, usize>,
    /// Per target, what the previous check found wrong: a problem that
    /// persists is reported once, when it appears.
    reported: Vec<BTreeSet<String>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "model: panicked at seed {} step {} (replay: {SEED_VAR}={} {STEPS_VAR}={} cargo \
                 test -p certctl-agent --test it model); last steps:\n{}",
                self.seed,
                self.step,
                self.seed,
                self.steps,
                self.recent_trace()
            );
        }
    }
}

const HOOK_SCRIPT: &str = r#"#!/bin/sh
# The model test's validate and reload command: hook.sh DIR validate|reload.
# Fails once when DIR/WHAT.once exists (removing it), else exits with the
# code in DIR/WHAT.rc (0 without it); sleeps DIR/WHAT.sleep seconds first;
# appends what it saw on disk to DIR/calls.log.
d=$1
w=$2
sum() {
    if [ -e "$1" ]; then sha256sum < "$1" | cut -c1-64; else echo -; fi
}
if [ -e "$d/$w.sleep" ]; then sleep "$(cat "$d/$w.sleep")"; fi
rc=0
if [ -e "$d/$w.once" ]; then
    rm -f "$d/$w.once"
    rc=1
elif [ -e "$d/$w.rc" ]; then
    rc=$(cat "$d/$w.rc")
fi
echo "$w $CERTCTL_DEPLOY_ID $(sum "$CERTCTL_CERT_PATH") $(sum "$CERTCTL_KEY_PATH") $rc" >> "$d/calls.log"
if [ "$rc" != 0 ]; then echo "$w of $CERTCTL_TARGET refused (exit $rc)" >&2; fi
exit "$rc"
"#;

/// The TOML body of target `t` for its current [`Cfg`].
fn body(hook_script: &Path, t: &Target) -> String {
    let hook = |what: &str| {
        toml_array(&[
            hook_script.to_str().unwrap(),
            t.hooks.to_str().unwrap(),
            what,
        ])
    };
    format!(
        "kind = \"file\"\ncert_path = {}\nkey_path = {}\nlayout = \"{}\"\nvalidate = {}\n\
         reload = {}\nbackup_retention = {}\ncommand_timeout = \"30s\"\n",
        toml_path(&t.dir.join("cert.pem")),
        toml_path(&t.dir.join("key.pem")),
        t.layout.toml(),
        if t.cfg.validate {
            hook("validate")
        } else {
            "[]".to_owned()
        },
        if t.cfg.reload_false {
            "[\"false\"]".to_owned()
        } else {
            hook("reload")
        },
        t.cfg.retention
    )
}

impl Rig {
    fn new(seed: u64, steps: usize) -> Rig {
        let mut env = TestEnv::new();
        let hook = env.path().join("hook.sh");
        pki::write_mode(&hook, HOOK_SCRIPT, 0o755);
        let mut rng = Rng(seed);
        let mut targets = Vec::new();
        for (name, layout) in [
            ("a", Layout::InPlace),
            ("b", Layout::InPlace),
            ("c", Layout::Generations),
        ] {
            let hooks = env.path().join("hooks").join(name);
            std::fs::create_dir_all(&hooks).unwrap();
            let t = Target {
                name: name.to_owned(),
                dir: env.target_dir(name),
                hooks,
                layout,
                cfg: Cfg {
                    validate: true,
                    reload_false: false,
                    retention: 1 + rng.below(3),
                },
                state: State::empty(),
                newest: None,
            };
            env.target(name, &body(&hook, &t));
            targets.push(t);
        }
        let mut rig = Rig {
            seed,
            steps,
            step: 0,
            rng,
            env,
            agent: None,
            hook,
            targets,
            sets: Vec::new(),
            violations: Vec::new(),
            trace: Vec::new(),
            stats: BTreeMap::new(),
            reported: vec![BTreeSet::new(); 3],
        };
        // `a` starts with the operator's own set, its key readable by all.
        let own = rig.new_set(true);
        let dir = rig.targets[0].dir.clone();
        pki::write_mode(
            &dir.join("cert.pem"),
            &rig.sets[own].leaf.fullchain_pem(),
            0o644,
        );
        pki::write_mode(&dir.join("key.pem"), &rig.sets[own].leaf.key_pem, 0o644);
        rig.targets[0].state = State {
            live: Content::Set(own),
            cert_mode: 0o644,
            key_mode: Some(0o644),
            operator_key: true,
            ..State::empty()
        };
        rig.agent = Some(rig.env.spawn_agent());
        rig.trace(format!(
            "start: a holds the operator's set {} (key 0644), b and c are empty; \
             retention a={} b={} c={}",
            rig.sets[own].name,
            rig.targets[0].cfg.retention,
            rig.targets[1].cfg.retention,
            rig.targets[2].cfg.retention
        ));
        rig.check_all("start");
        rig
    }

    fn agent(&self) -> &AgentProc {
        self.agent.as_ref().expect("the agent is running")
    }

    fn new_set(&mut self, operator: bool) -> usize {
        let i = self.sets.len();
        let name = if operator {
            format!("own{i}")
        } else {
            format!("s{i}")
        };
        let leaf = pki::issue_cert(&["model.test"]);
        let files = self.env.inputs(&leaf, &name);
        self.sets.push(SetInfo {
            cert_file_sha: sha_hex(leaf.fullchain_pem().as_bytes()),
            key_file_sha: sha_hex(leaf.key_pem.as_bytes()),
            name,
            leaf,
            files,
            operator,
        });
        i
    }

    // --- recording ---

    fn trace(&mut self, line: String) {
        self.trace.push(format!("{:>4} {line}", self.step));
    }

    fn recent_trace(&self) -> String {
        let from = self.trace.len().saturating_sub(12);
        self.trace[from..].join("\n")
    }

    fn violation(&mut self, kind: &str, msg: String) {
        let msg = format!("seed {} step {}: {msg}", self.seed, self.step);
        eprintln!("model: MISMATCH [{kind}] {msg}");
        let trace = self.recent_trace();
        self.violations.push(Violation {
            kind: kind.to_owned(),
            step: self.step,
            msg,
            trace,
        });
    }

    fn count(&mut self, what: String) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn describe(&self, c: &Content) -> String {
        match c {
            Content::Absent => "nothing".to_owned(),
            Content::Set(i) => self.sets[*i].name.clone(),
            Content::Other(s) => s.clone(),
        }
    }

    fn describe_entries(&self, entries: &[Entry]) -> String {
        let v: Vec<String> = entries.iter().map(|e| self.describe(&e.content)).collect();
        format!("[{}]", v.join(", "))
    }

    fn leaf_sha(&self, c: &Content, ti: usize) -> String {
        match c {
            Content::Absent => String::new(),
            Content::Set(i) => self.sets[*i].leaf.sha256_hex.clone(),
            Content::Other(_) => std::fs::read(self.targets[ti].dir.join("cert.pem"))
                .ok()
                .and_then(|b| leaf_sha_of_pem(&b))
                .unwrap_or_default(),
        }
    }

    // --- knobs ---

    fn knobs(&self, ti: usize, v: Fail, r: Fail) {
        let h = &self.targets[ti].hooks;
        for (what, f) in [("validate", v), ("reload", r)] {
            match f {
                Fail::No => {}
                Fail::Once => pki::write_mode(&h.join(format!("{what}.once")), "", 0o644),
                Fail::Always => pki::write_mode(&h.join(format!("{what}.rc")), "1\n", 0o644),
            }
        }
    }

    fn clear_knobs(&self, ti: usize, keep_rc: bool) {
        let h = &self.targets[ti].hooks;
        for what in ["validate", "reload"] {
            let mut knobs = vec!["once", "sleep"];
            if !keep_rc {
                knobs.push("rc");
            }
            for k in knobs {
                let _ = std::fs::remove_file(h.join(format!("{what}.{k}")));
            }
        }
    }

    /// The hook calls target `ti` logged since the last call: (what, id, saw).
    fn take_calls(&self, ti: usize) -> Vec<(String, String, Content)> {
        let log = self.targets[ti].hooks.join("calls.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let [what, id, cert, key, _rc] = f[..] else {
                    return ("garbled".to_owned(), l.to_owned(), Content::Absent);
                };
                let saw = if cert == "-" && key == "-" {
                    Content::Absent
                } else if let Some(i) = self
                    .sets
                    .iter()
                    .position(|s| s.cert_file_sha == cert && s.key_file_sha == key)
                {
                    Content::Set(i)
                } else {
                    let name = |sha: &str, pick: fn(&SetInfo) -> &str| {
                        self.sets.iter().find(|s| pick(s) == sha).map_or_else(
                            || format!("unknown {}", &sha[..sha.len().min(12)]),
                            |s| s.name.clone(),
                        )
                    };
                    Content::Other(format!(
                        "torn: cert of {}, key of {}",
                        name(cert, |s| &s.cert_file_sha),
                        name(key, |s| &s.key_file_sha)
                    ))
                };
                (what.to_owned(), id.to_owned(), saw)
            })
            .collect()
    }

    /// Checks what the hooks of every target saw: `want` per target
    /// (what, run id, content), nothing for the others.
    fn check_calls(&mut self, label: &str, want: &[(usize, Vec<Call>)]) {
        for ti in 0..self.targets.len() {
            let got = self.take_calls(ti);
            let want: Vec<(String, String, Content)> = want
                .iter()
                .filter(|(t, _)| *t == ti)
                .flat_map(|(_, calls)| calls.iter())
                .map(|(w, id, c)| ((*w).to_owned(), id.clone(), c.clone()))
                .collect();
            if got != want {
                let show = |calls: &[(String, String, Content)]| -> String {
                    let v: Vec<String> = calls
                        .iter()
                        .map(|(w, id, c)| format!("{w} of {id} saw {}", self.describe(c)))
                        .collect();
                    format!("[{}]", v.join("; "))
                };
                let msg = format!(
                    "{}: the validate/reload commands ran as [{}], expected {}",
                    self.targets[ti].name,
                    show(&got),
                    show(&want)
                );
                self.violation(&format!("commands after {label}"), msg);
            }
        }
    }

    // --- observing ---

    /// What is in the pair `cert`/`key`.
    fn content_at(&self, cert: &Path, key: &Path) -> Content {
        let c = std::fs::read(cert);
        let k = std::fs::read(key);
        match (&c, &k) {
            (Ok(c), Ok(k)) => {
                let ci = self
                    .sets
                    .iter()
                    .position(|s| s.leaf.fullchain_pem().as_bytes() == c.as_slice());
                let ki = self
                    .sets
                    .iter()
                    .position(|s| s.leaf.key_pem.as_bytes() == k.as_slice());
                match (ci, ki) {
                    (Some(i), Some(j)) if i == j => Content::Set(i),
                    _ => {
                        let name = |i: Option<usize>, bytes: &[u8]| {
                            i.map_or_else(
                                || {
                                    format!(
                                        "unknown bytes ({} bytes, leaf {})",
                                        bytes.len(),
                                        leaf_sha_of_pem(bytes).unwrap_or_default()
                                    )
                                },
                                |i| self.sets[i].name.clone(),
                            )
                        };
                        Content::Other(format!(
                            "a torn set: cert.pem of {}, key.pem of {}",
                            name(ci, c),
                            name(ki, k)
                        ))
                    }
                }
            }
            _ if not_found(&c) && not_found(&k) => Content::Absent,
            _ => Content::Other(format!(
                "half a set: cert.pem {}, key.pem {}",
                c.as_ref()
                    .map_or_else(|e| e.to_string(), |b| format!("{} bytes", b.len())),
                k.as_ref()
                    .map_or_else(|e| e.to_string(), |b| format!("{} bytes", b.len()))
            )),
        }
    }

    /// Target `ti` as it is on disk, and what is wrong with it whatever
    /// the model says.
    fn observe(&self, ti: usize) -> (State, Vec<(&'static str, String)>) {
        let t = &self.targets[ti];
        let mut problems = Vec::new();
        let mode = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.mode() & 0o7777);
        let live = self.content_at(&t.dir.join("cert.pem"), &t.dir.join("key.pem"));
        // In the order their runs wrote them (the agent's order: a deploy's
        // id is taken before it waits for the lock), then by name; an empty
        // backup directory is no backup set.
        let entries_in = |d: &Path, prefix: &str| -> Vec<(String, PathBuf)> {
            let mut v: Vec<(std::time::SystemTime, String, PathBuf)> = std::fs::read_dir(d)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .filter(|e| {
                            std::fs::read_dir(e.path()).is_ok_and(|mut r| r.next().is_some())
                        })
                        .filter_map(|e| {
                            let n = e.file_name().to_string_lossy().into_owned();
                            let written = e.metadata().and_then(|m| m.modified()).ok()?;
                            n.strip_prefix(prefix)
                                .map(|id| (written, id.to_owned(), e.path()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v.into_iter().map(|(_, id, p)| (id, p)).collect()
        };
        let entry = |d: &Path| Entry {
            content: self.content_at(&d.join("cert.pem"), &d.join("key.pem")),
            key_mode: mode(&d.join("key.pem")),
        };
        // A set beyond retention is renamed to `.<id>.partial` under the
        // lock and removed right after the run has answered: gone within
        // moments, never left behind (a kill's is swept at the next start).
        let backup_root = t.dir.join(".certctl/backup").join(&t.name);
        let left = invariants::partial_sets_left(&backup_root);
        if !left.is_empty() {
            problems.push((
                "partial backup sets",
                format!("{}: still in {}: {left:?}", t.name, backup_root.display()),
            ));
        }
        let backups: Vec<Entry> = entries_in(&backup_root, "")
            .iter()
            .filter(|(id, _)| !id.starts_with('.'))
            .map(|(_, d)| entry(d))
            .collect();
        let mut gens = Vec::new();
        let mut current = None;
        if t.layout == Layout::Generations {
            let found = entries_in(&t.dir.join(".certctl"), "gen-");
            for (_, d) in &found {
                gens.push(entry(d));
                let temps = temp_files(d);
                if !temps.is_empty() {
                    problems.push((
                        "temp files",
                        format!("{}: left in {}: {temps:?}", t.name, d.display()),
                    ));
                }
            }
            if let Ok(link) = std::fs::read_link(t.dir.join("..data")) {
                let id = link
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("gen-"))
                    .unwrap_or_default()
                    .to_owned();
                current = found.iter().position(|(i, _)| *i == id);
                if current.is_none() {
                    problems.push((
                        "generations",
                        format!(
                            "{}: ..data points at {link:?}, which is not a generation",
                            t.name
                        ),
                    ));
                }
            }
            if live != Content::Absent {
                for f in ["cert.pem", "key.pem"] {
                    let link = std::fs::read_link(t.dir.join(f));
                    if link.as_deref().ok() != Some(Path::new("..data").join(f).as_path()) {
                        problems.push((
                            "generations",
                            format!("{}: {f} is not the ..data link: {link:?}", t.name),
                        ));
                    }
                }
            }
        }
        if live == Content::Absent {
            let left: Vec<&str> = ["cert.pem", "key.pem", "..data"]
                .into_iter()
                .filter(|f| std::fs::symlink_metadata(t.dir.join(f)).is_ok())
                .collect();
            if !left.is_empty() {
                problems.push((
                    "dangling entries",
                    format!("{}: no certificate readable, but {left:?} exist", t.name),
                ));
            }
        }
        let temps = temp_files(&t.dir);
        if !temps.is_empty() {
            problems.push(("temp files", format!("{}: left: {temps:?}", t.name)));
        }
        let present = live != Content::Absent;
        let state = State {
            cert_mode: if present {
                mode(&t.dir.join("cert.pem"))
            } else {
                0
            },
            key_mode: present.then(|| mode(&t.dir.join("key.pem"))),
            live,
            operator_key: false,
            backups,
            gens,
            current,
        };
        (state, problems)
    }

    /// Model vs disk for target `ti`.
    fn diff(&self, ti: usize, want: &State, got: &State) -> Vec<(&'static str, String)> {
        let name = &self.targets[ti].name;
        let mut d = Vec::new();
        if want.live != got.live {
            d.push((
                "files",
                format!(
                    "{name}: expected {} on disk, found {}",
                    self.describe(&want.live),
                    self.describe(&got.live)
                ),
            ));
        } else if got.live != Content::Absent {
            if got.cert_mode != want.cert_mode {
                d.push((
                    "cert mode",
                    format!(
                        "{name}: cert.pem has mode {:04o}, expected {:04o}",
                        got.cert_mode, want.cert_mode
                    ),
                ));
            }
            // A restore takes the "other" bits off a loose key: `w` with
            // them removed is what any rollback brings back.
            if let (Some(w), Some(g)) = (want.key_mode, got.key_mode)
                && w != g
                && g & LOOSE == 0
                && g != w & !0o007
            {
                d.push((
                    "key mode",
                    format!("{name}: key.pem has mode {g:04o}, expected {w:04o}"),
                ));
            }
        }
        if let Some(g) = got.key_mode
            && g & LOOSE != 0
            && !(want.operator_key && want.live == got.live)
        {
            d.push((
                "key readable by others",
                format!(
                    "{name}: key.pem ({}) has mode {g:04o}: an \"other\" bit or group write",
                    self.describe(&got.live)
                ),
            ));
        }
        let contents = |e: &[Entry]| e.iter().map(|e| e.content.clone()).collect::<Vec<_>>();
        if contents(&want.backups) != contents(&got.backups) {
            d.push((
                "backups",
                format!(
                    "{name}: backup sets (oldest first) are {}, expected {}",
                    self.describe_entries(&got.backups),
                    self.describe_entries(&want.backups)
                ),
            ));
        }
        if contents(&want.gens) != contents(&got.gens) || want.current != got.current {
            d.push((
                "generations",
                format!(
                    "{name}: generations (oldest first) are {} with current {:?}, expected {} \
                     with current {:?}",
                    self.describe_entries(&got.gens),
                    got.current,
                    self.describe_entries(&want.gens),
                    want.current
                ),
            ));
        }
        d
    }

    /// Among `candidates` for target `ti`, the one the disk matches (else the first).
    fn pick(&self, ti: usize, candidates: Vec<State>) -> State {
        let (got, _) = self.observe(ti);
        let mut first = None;
        for c in candidates {
            if self.diff(ti, &c, &got).is_empty() {
                return c;
            }
            first.get_or_insert(c);
        }
        first.expect("at least one candidate")
    }

    /// Every check of every target against the model; then the model
    /// follows the disk. Returns `certctl status` and `certctl history`.
    fn check_all(&mut self, label: &str) -> (Value, Value) {
        for ti in 0..self.targets.len() {
            let (got, problems) = self.observe(ti);
            let want = self.targets[ti].state.clone();
            let mut found = BTreeSet::new();
            for (kind, msg) in problems.into_iter().chain(self.diff(ti, &want, &got)) {
                if !self.reported[ti].contains(&msg) {
                    self.violation(&format!("{kind} after {label}"), msg.clone());
                }
                found.insert(msg);
            }
            self.reported[ti] = found;
            let operator_key = want.operator_key && want.live == got.live;
            self.targets[ti].state = State {
                operator_key,
                ..got
            };
        }

        let status = self.env.ctl(&["--json", "status"]);
        let status = if status.code == 0 {
            status.json()
        } else {
            self.violation(
                &format!("status after {label}"),
                format!("certctl status failed: {status}"),
            );
            Value::Null
        };
        for ti in 0..self.targets.len() {
            let t = &self.targets[ti];
            let Some(st) = status["targets"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == t.name.as_str()))
            else {
                continue;
            };
            let want_sha = self.leaf_sha(&t.state.live, ti);
            let want_state = if t.state.live == Content::Absent {
                "missing"
            } else {
                "ok"
            };
            if st["cert_sha256"] != want_sha.as_str() || st["disk_state"] != want_state {
                let msg = format!(
                    "{}: status says cert_sha256 {} disk_state {}, the disk holds {} \
                     ({want_sha:?}, {want_state})",
                    t.name,
                    st["cert_sha256"],
                    st["disk_state"],
                    self.describe(&t.state.live)
                );
                self.violation(&format!("status after {label}"), msg);
            }
        }

        let history = self.env.ctl(&["--json", "history", "--limit", "100"]);
        let history = if history.code == 0 {
            history.json()
        } else {
            self.violation(
                &format!("history after {label}"),
                format!("certctl history failed: {history}"),
            );
            Value::Null
        };
        let entries = history["history"].as_array().cloned().unwrap_or_default();
        for e in entries.iter().filter(|e| e["outcome"].is_null()) {
            self.violation(
                &format!("journal after {label}"),
                format!(
                    "run {} of {} has no outcome (stage {})",
                    e["deploy_id"], e["target"], e["last_stage"]
                ),
            );
        }
        for ti in 0..self.targets.len() {
            let name = self.targets[ti].name.clone();
            let mut got = entries
                .iter()
                .find(|e| e["target"] == name.as_str())
                .cloned();
            if got.is_none() && self.targets[ti].newest.is_some() {
                // Beyond the newest 100 of all targets: ask for this one.
                let one = self.env.ctl(&["--json", "history", &name, "--limit", "1"]);
                got = one.json()["history"].get(0).cloned();
            }
            let got = got.map(|e| Newest::from_history(&e));
            let want = self.targets[ti].newest.clone();
            let same = match (&want, &got) {
                (None, None) => true,
                (Some(w), Some(g)) => {
                    w.id == g.id
                        && w.op == g.op
                        && w.outcome == g.outcome
                        && w.recovered == g.recovered
                }
                _ => false,
            };
            if !same {
                let show = |n: &Option<Newest>| {
                    n.as_ref().map_or("none".to_owned(), |n| {
                        format!(
                            "{} {} {}{}",
                            n.op,
                            n.id,
                            n.outcome,
                            if n.recovered { " (recovered)" } else { "" }
                        )
                    })
                };
                let msg = format!(
                    "{name}: newest run in history is {}, expected {}",
                    show(&got),
                    show(&want)
                );
                self.violation(&format!("history after {label}"), msg);
            }
            self.targets[ti].newest = got;
        }
        (status, history)
    }

    // --- runs ---

    /// Runs `certctl ARGS` and parses the run it streamed.
    fn ctl_run(&mut self, args: &[&str], label: &str) -> Option<RunOut> {
        let out = self.env.ctl(args);
        match parse_run(&out.stdout, out.code) {
            Ok(r) => Some(r),
            Err(e) => {
                self.violation(&format!("cli output of {label}"), format!("{e}\n{out}"));
                None
            }
        }
    }

    /// The checks after one run on target `ti` that `pred` describes.
    fn finish_run(
        &mut self,
        ti: usize,
        op: &str,
        run: Option<RunOut>,
        pred: Prediction,
        label: &str,
    ) {
        let Some(run) = run else {
            self.targets[ti].state = pred.after;
            self.take_calls(ti);
            self.check_all(label);
            return;
        };
        let name = self.targets[ti].name.clone();
        self.count(format!("{label} -> {}", run.outcome));
        if !pred
            .outcomes
            .iter()
            .any(|(o, c)| *o == run.outcome && *c == run.code)
        {
            let msg = format!(
                "{name}: {label} ended {} (exit {}), expected {:?}:\n{}",
                run.outcome, run.code, pred.outcomes, run.text
            );
            self.violation(&format!("outcome of {label}"), msg);
        }
        let tightening = self.targets[ti].state.operator_key
            && self.targets[ti]
                .state
                .key_mode
                .is_some_and(|m| m & 0o007 != 0);
        if tightening && run.outcome == "deployed" {
            let warned = run.result["warnings"].as_array().is_some_and(|w| {
                w.iter()
                    .any(|w| w.as_str().unwrap_or_default().contains("tightened to 0600"))
            });
            if !warned {
                self.violation(
                    "no tightening warning",
                    format!(
                        "{name}: the deploy over a 0644 key did not warn that it was \
                         tightened:\n{}",
                        run.text
                    ),
                );
            }
        }
        self.targets[ti].state = pred.after;
        self.targets[ti].newest = Some(Newest::of(&run.id, op, &run.outcome));
        let calls = pred
            .hooks
            .into_iter()
            .map(|(w, c)| (w, run.id.clone(), c))
            .collect();
        self.check_calls(label, &[(ti, calls)]);
        let (status, history) = self.check_all(label);

        // What the agent told about the disk is what is on it.
        let disk = self.leaf_sha(&self.targets[ti].state.live, ti);
        if run.outcome != "dry_run" && run.result["disk_sha256"] != disk.as_str() {
            let msg = format!(
                "{name}: the {label} result says disk_sha256 {}, the disk holds {disk:?}",
                run.result["disk_sha256"]
            );
            self.violation("result disk_sha256", msg);
        }
        if let Some(e) = history["history"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["deploy_id"] == run.id.as_str()))
            && e["disk_sha256"] != disk.as_str()
        {
            let msg = format!(
                "{name}: history says disk_sha256 {} for {}, the disk holds {disk:?}",
                e["disk_sha256"], run.id
            );
            self.violation("history disk_sha256", msg);
        }
        if let Some(st) = status["targets"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name.as_str()))
            && (st["last"]["deploy_id"] != run.id.as_str()
                || st["last"]["outcome"] != run.outcome.as_str())
        {
            let msg = format!(
                "{name}: status' last run is {} {}, expected {} {}",
                st["last"]["deploy_id"], st["last"]["outcome"], run.id, run.outcome
            );
            self.violation("status last", msg);
        }
    }

    fn deploy(&mut self, ti: usize, set: usize, v: Fail, r: Fail, label: &str) {
        let t = &self.targets[ti];
        let pred = predict_deploy(&t.state, &t.cfg, t.layout, set, v, r);
        let line = format!(
            "{label}: deploy {} to {} (validate {v:?}, reload {r:?}; config {:?}; {} on disk)",
            self.sets[set].name,
            t.name,
            t.cfg,
            self.describe(&t.state.live)
        );
        self.trace(line);
        self.knobs(ti, v, r);
        let name = self.targets[ti].name.clone();
        let bundle = self.sets[set].files.bundle.clone();
        let run = self.ctl_run(&["--json", "deploy", &name, "--cert", arg(&bundle)], label);
        self.clear_knobs(ti, false);
        if self.targets[ti].state.live == Content::Absent
            && let Some(r) = &run
            && r.outcome != "deployed"
        {
            self.count(format!("first deploy, {label} -> {}", r.outcome));
        }
        self.finish_run(ti, "deploy", run, pred, label);
    }

    fn rollback(&mut self, ti: usize, v: Fail, r: Fail) {
        let t = &self.targets[ti];
        let pred = predict_rollback(&t.state, &t.cfg, t.layout, v, r);
        let line = format!(
            "rollback {} (validate {v:?}, reload {r:?}; config {:?}; {} on disk)",
            t.name,
            t.cfg,
            self.describe(&t.state.live)
        );
        self.trace(line);
        self.knobs(ti, v, r);
        let name = self.targets[ti].name.clone();
        let run = self.ctl_run(&["--json", "rollback", &name], "rollback");
        self.clear_knobs(ti, false);
        self.finish_run(ti, "rollback", run, pred, "rollback");
    }

    // --- the steps ---

    fn random_step(&mut self) {
        let ti = self.rng.below(self.targets.len());
        let roll = self.rng.below(100);
        match roll {
            0..=25 => {
                let s = self.new_set(false);
                self.deploy(ti, s, Fail::No, Fail::No, "deploy");
            }
            26..=29 => {
                let live = self.targets[ti].state.live.clone();
                let older: Vec<usize> = (0..self.sets.len())
                    .filter(|i| !self.sets[*i].operator && live != Content::Set(*i))
                    .collect();
                let s = if older.is_empty() {
                    self.new_set(false)
                } else {
                    older[self.rng.below(older.len())]
                };
                self.deploy(ti, s, Fail::No, Fail::No, "deploy of an older set");
            }
            30..=35 => {
                let s = self.new_set(false);
                self.deploy(ti, s, Fail::Once, Fail::No, "deploy, validate fails once");
            }
            36..=39 => {
                let s = self.new_set(false);
                self.deploy(ti, s, Fail::Always, Fail::No, "deploy, validate fails");
            }
            40..=45 => {
                let s = self.new_set(false);
                self.deploy(ti, s, Fail::No, Fail::Once, "deploy, reload fails once");
            }
            46..=50 => {
                let s = self.new_set(false);
                self.deploy(ti, s, Fail::No, Fail::Always, "deploy, reload fails");
            }
            51..=62 => {
                let (v, r) = match self.rng.below(10) {
                    0 => (Fail::Always, Fail::No),
                    1 => (Fail::No, Fail::Once),
                    2 => (Fail::No, Fail::Always),
                    _ => (Fail::No, Fail::No),
                };
                self.rollback(ti, v, r);
            }
            63..=70 => self.config_change(ti),
            71..=75 => {
                self.trace("clean restart (SIGTERM, start)".to_owned());
                self.restart("restart");
            }
            76..=85 => self.kill_during_runs(),
            86..=90 => self.concurrent(ti),
            91..=93 => match self.targets[ti].state.live.clone() {
                Content::Set(s) if !self.sets[s].operator => {
                    self.deploy(ti, s, Fail::No, Fail::No, "deploy of the set in place");
                }
                _ => {
                    let s = self.new_set(false);
                    self.deploy(ti, s, Fail::No, Fail::No, "deploy");
                }
            },
            94..=95 => self.dry_run(ti),
            _ => self.rejected(ti),
        }
    }

    fn dry_run(&mut self, ti: usize) {
        let s = self.new_set(false);
        let name = self.targets[ti].name.clone();
        self.trace(format!("dry run of {} to {name}", self.sets[s].name));
        let bundle = self.sets[s].files.bundle.clone();
        let run = self.ctl_run(
            &[
                "--json",
                "deploy",
                &name,
                "--cert",
                arg(&bundle),
                "--dry-run",
            ],
            "dry run",
        );
        if let Some(run) = run
            && (run.outcome != "dry_run" || run.code != 0)
        {
            self.violation("outcome of dry run", format!("{name}: {}", run.text));
        }
        self.check_calls("dry run", &[]);
        self.check_all("dry run");
    }

    fn rejected(&mut self, ti: usize) {
        let a = self.new_set(false);
        let b = self.new_set(false);
        let name = self.targets[ti].name.clone();
        self.trace(format!(
            "deploy to {name} of {}'s certificate with {}'s key (rejected)",
            self.sets[a].name, self.sets[b].name
        ));
        let (cert, key) = (
            self.sets[a].files.cert.clone(),
            self.sets[b].files.key.clone(),
        );
        let run = self.ctl_run(
            &[
                "--json",
                "deploy",
                &name,
                "--cert",
                arg(&cert),
                "--key",
                arg(&key),
            ],
            "mismatched key",
        );
        let pred = Prediction {
            outcomes: vec![("rejected", 3)],
            after: self.targets[ti].state.clone(),
            hooks: Vec::new(),
        };
        self.finish_run(ti, "deploy", run, pred, "mismatched key");
    }

    fn config_change(&mut self, ti: usize) {
        let what = match self.rng.below(3) {
            0 => {
                let c = &mut self.targets[ti].cfg;
                c.reload_false = !c.reload_false;
                format!(
                    "reload = {}",
                    if c.reload_false {
                        "[\"false\"]"
                    } else {
                        "the hook"
                    }
                )
            }
            1 => {
                let old = self.targets[ti].cfg.retention;
                let new = 1 + (old + self.rng.below(2)) % 3;
                self.targets[ti].cfg.retention = new;
                format!("backup_retention {old} -> {new}")
            }
            _ => {
                let c = &mut self.targets[ti].cfg;
                c.validate = !c.validate;
                format!("validate = {}", if c.validate { "the hook" } else { "[]" })
            }
        };
        let name = self.targets[ti].name.clone();
        self.trace(format!("config change + SIGHUP: {name}: {what}"));
        let body = body(&self.hook, &self.targets[ti]);
        self.env.replace_target(&name, &body);
        self.env.write_config();
        let needle = "configuration reloaded";
        let before = self.agent().log().matches(needle).count();
        self.agent().signal(Signal::SIGHUP);
        let deadline = Instant::now() + WAIT;
        while self.agent().log().matches(needle).count() <= before {
            assert!(
                Instant::now() < deadline,
                "seed {} step {}: the agent did not apply the SIGHUP within {WAIT:?}",
                self.seed,
                self.step
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.check_calls("config change", &[]);
        self.check_all("config change");
    }

    /// What a start does to the model: backups pruned, `rollback_failed`
    /// runs retried once (`failing`: targets whose reload fails now).
    fn model_start(&mut self, failing: &[usize]) {
        for ti in 0..self.targets.len() {
            let t = &mut self.targets[ti];
            t.state = t.state.restarted(t.cfg.retention);
            if let Some(n) = &mut t.newest
                && n.retry
            {
                n.retry = false;
                n.recovered = true;
                n.outcome = if t.cfg.reload_false || failing.contains(&ti) {
                    "rollback_failed"
                } else {
                    "rolled_back"
                }
                .to_owned();
            }
        }
    }

    fn restart(&mut self, label: &str) {
        let mut agent = self.agent.take().expect("the agent is running");
        let status = agent.terminate();
        if !status.success() {
            self.violation("clean stop", format!("SIGTERM: the agent exited {status}"));
        }
        drop(agent);
        self.model_start(&[]);
        self.agent = Some(self.env.spawn_agent());
        for ti in 0..self.targets.len() {
            self.take_calls(ti);
        }
        self.check_all(label);
    }

    /// One to three deploys or rollbacks in flight on distinct targets,
    /// then SIGKILL at a random instant and a start.
    fn kill_during_runs(&mut self) {
        struct InFlight {
            ti: usize,
            what: String,
            client: ChildGuard,
            out: PathBuf,
            before: State,
            after: Option<State>,
            reload_fails: bool,
        }
        let n = 1 + self.rng.below(self.targets.len());
        let mut pool: Vec<usize> = (0..self.targets.len()).collect();
        let mut chosen = Vec::new();
        for _ in 0..n {
            chosen.push(pool.remove(self.rng.below(pool.len())));
        }
        let mut flights = Vec::new();
        let mut plan = Vec::new();
        for &ti in &chosen {
            let kind = self.rng.below(100);
            let (op, set, reload_fails) = match kind {
                0..=69 => ("deploy", Some(self.new_set(false)), false),
                70..=84 => ("deploy", Some(self.new_set(false)), true),
                _ => ("rollback", None, false),
            };
            let t = &self.targets[ti];
            let r = if reload_fails { Fail::Always } else { Fail::No };
            let pred = match set {
                Some(s) => predict_deploy(&t.state, &t.cfg, t.layout, s, Fail::No, r),
                None => predict_rollback(&t.state, &t.cfg, t.layout, Fail::No, Fail::No),
            };
            let success = pred
                .outcomes
                .iter()
                .any(|(o, _)| *o == "deployed" || *o == "restored");
            let what = match set {
                Some(s) => format!(
                    "deploy {} to {}{}",
                    self.sets[s].name,
                    t.name,
                    if reload_fails { " (reload fails)" } else { "" }
                ),
                None => format!("rollback {}", t.name),
            };
            plan.push(what.clone());
            // Slow commands widen the windows between the stages.
            let h = t.hooks.clone();
            for w in ["validate", "reload"] {
                let delay = ["", "0.02", "0.1"][self.rng.below(3)];
                if !delay.is_empty() {
                    pki::write_mode(&h.join(format!("{w}.sleep")), delay, 0o644);
                }
            }
            self.knobs(ti, Fail::No, r);
            let name = t.name.clone();
            let file = format!("kill-{}-{name}.out", self.step);
            let args: Vec<String> = match set {
                Some(s) => vec![
                    "--json".into(),
                    op.into(),
                    name.clone(),
                    "--cert".into(),
                    arg(&self.sets[s].files.bundle).to_owned(),
                ],
                None => vec!["--json".into(), op.into(), name.clone()],
            };
            let before = t.state.clone();
            let after = success.then_some(pred.after);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (client, out) = self.env.ctl_spawn(&args, &file);
            flights.push(InFlight {
                ti,
                what,
                client,
                out,
                before,
                after,
                reload_fails,
            });
        }
        let delay = self.rng.below(201);
        self.trace(format!(
            "SIGKILL {delay} ms into [{}], start",
            plan.join("; ")
        ));
        std::thread::sleep(Duration::from_millis(delay as u64));
        let mut agent = self.agent.take().expect("the agent is running");
        agent.signal(Signal::SIGKILL);
        let killed = Instant::now();
        let _ = agent.wait_exit(WAIT);
        drop(agent);
        for f in &mut flights {
            if f.client.wait_timeout(WAIT).is_none() {
                self.violation(
                    "kill",
                    format!("{}: the client did not end after the agent died", f.what),
                );
            }
        }
        let failing: Vec<usize> = flights
            .iter()
            .filter(|f| f.reload_fails)
            .map(|f| f.ti)
            .collect();
        for &ti in &chosen {
            // The failing reload stays failing through recovery.
            self.clear_knobs(ti, true);
        }
        let before_newest: Vec<Option<Newest>> =
            self.targets.iter().map(|t| t.newest.clone()).collect();
        self.model_start(&failing);
        self.agent = Some(self.env.spawn_agent());
        for &ti in &chosen {
            self.clear_knobs(ti, false);
        }
        // Commands the dead agent started may still be finishing (they
        // run in their own process groups): let them, then forget them.
        let settle = Duration::from_millis(300);
        if let Some(left) = settle.checked_sub(killed.elapsed()) {
            std::thread::sleep(left);
        }
        for ti in 0..self.targets.len() {
            self.take_calls(ti);
        }

        let history = self
            .env
            .ctl(&["--json", "history", "--limit", "100"])
            .json();
        let entries = history["history"].as_array().cloned().unwrap_or_default();
        for f in flights {
            let text = std::fs::read_to_string(&f.out).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .filter(|l| l.starts_with('{'))
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let client_id = lines
                .iter()
                .find_map(|l| l["deploy_id"].as_str().filter(|s| !s.is_empty()))
                .map(str::to_owned);
            let told = lines.iter().find(|l| l["stage"] == "done").map(|l| {
                l["result"]["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            });
            let t = &self.targets[f.ti];
            let newest = entries.iter().find(|e| e["target"] == t.name.as_str());
            let prev_id = before_newest[f.ti].as_ref().map(|n| n.id.clone());
            let newest_id = newest
                .and_then(|e| e["deploy_id"].as_str())
                .map(str::to_owned);
            let before = f.before.restarted(t.cfg.retention);
            let after = f.after.as_ref().map(|a| a.restarted(t.cfg.retention));
            let mut candidates = Vec::new();
            let name = t.name.clone();
            if newest_id.is_none() || newest_id == prev_id {
                // Never journaled: it cannot have touched a file.
                self.count("kill: before the run was journaled".to_owned());
                candidates.push(before);
                if let Some(told) = &told {
                    self.violation(
                        "kill",
                        format!(
                            "{name}: the client was told {told}, but the run is not in history"
                        ),
                    );
                }
            } else {
                let e = newest.expect("newest");
                let outcome = e["outcome"].as_str().unwrap_or_default().to_owned();
                let recovered = e["recovered"] == true;
                self.count(format!(
                    "kill: {} -> {outcome}{}",
                    f.what.split(' ').next().unwrap_or_default(),
                    if recovered { " (recovered)" } else { "" }
                ));
                if let Some(id) = &client_id
                    && Some(id) != newest_id.as_ref()
                {
                    self.violation(
                        "kill",
                        format!("{name}: the newest run is {newest_id:?}, the client's was {id}"),
                    );
                }
                if let Some(told) = &told
                    && *told != outcome
                    && !(told == "rollback_failed" && recovered)
                {
                    self.violation(
                        "kill",
                        format!("{name}: the client was told {told}, history says {outcome}"),
                    );
                }
                match (outcome.as_str(), after) {
                    ("deployed" | "restored", Some(a)) => candidates.push(a),
                    ("deployed" | "restored", None) => {
                        self.violation(
                            "kill",
                            format!(
                                "{name}: {} ended {outcome}, which the model did not allow",
                                f.what
                            ),
                        );
                        candidates.push(before);
                    }
                    _ => candidates.push(before),
                }
                self.targets[f.ti].newest = Some(Newest::from_history(e));
            }
            let picked = self.pick(f.ti, candidates);
            self.targets[f.ti].state = picked;
        }
        self.check_all("kill -9");
    }

    /// Two or three deploys of fresh sets to one target at once: they run
    /// one after the other in lock order, which history tells.
    fn concurrent(&mut self, ti: usize) {
        let k = 2 + self.rng.below(2);
        let sets: Vec<usize> = (0..k).map(|_| self.new_set(false)).collect();
        let name = self.targets[ti].name.clone();
        let names: Vec<String> = sets.iter().map(|s| self.sets[*s].name.clone()).collect();
        self.trace(format!(
            "{k} concurrent deploys to {name}: {}",
            names.join(", ")
        ));
        let mut clients = Vec::new();
        for (i, s) in sets.iter().enumerate() {
            let bundle = self.sets[*s].files.bundle.clone();
            let file = format!("concurrent-{}-{i}.out", self.step);
            clients.push(
                self.env
                    .ctl_spawn(&["--json", "deploy", &name, "--cert", arg(&bundle)], &file),
            );
            std::thread::sleep(Duration::from_millis(self.rng.below(5) as u64));
        }
        let mut runs = Vec::new();
        for ((mut c, out), s) in clients.into_iter().zip(&sets) {
            let code = c.wait_timeout(WAIT).map_or(-1, process::exit_code);
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            match parse_run(&text, code) {
                Ok(r) => runs.push((r, *s)),
                Err(e) => self.violation("cli output of concurrent deploys", e),
            }
        }
        let h = self
            .env
            .ctl(&["--json", "history", &name, "--limit", &k.to_string()])
            .json();
        let mut order: Vec<String> = h["history"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["deploy_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        order.reverse();
        runs.sort_by_key(|(r, _)| {
            order
                .iter()
                .position(|id| *id == r.id)
                .unwrap_or(usize::MAX)
        });
        if runs.len() != k || runs.iter().map(|(r, _)| &r.id).ne(order.iter()) {
            let ids: Vec<&str> = runs.iter().map(|(r, _)| r.id.as_str()).collect();
            self.violation(
                "concurrent deploys",
                format!("{name}: the runs {ids:?} are not the newest {k} in history: {order:?}"),
            );
        }
        let mut state = self.targets[ti].state.clone();
        let mut calls = Vec::new();
        let (cfg, layout) = (self.targets[ti].cfg.clone(), self.targets[ti].layout);
        for (r, s) in &runs {
            let pred = predict_deploy(&state, &cfg, layout, *s, Fail::No, Fail::No);
            self.count(format!("concurrent deploy -> {}", r.outcome));
            if !pred
                .outcomes
                .iter()
                .any(|(o, c)| *o == r.outcome && *c == r.code)
            {
                let msg = format!(
                    "{name}: a concurrent deploy ended {} (exit {}), expected {:?}:\n{}",
                    r.outcome, r.code, pred.outcomes, r.text
                );
                self.violation("outcome of concurrent deploys", msg);
            }
            calls.extend(pred.hooks.into_iter().map(|(w, c)| (w, r.id.clone(), c)));
            state = pred.after;
        }
        self.targets[ti].state = state;
        if let Some((r, _)) = runs.last() {
            self.targets[ti].newest = Some(Newest::of(&r.id, "deploy", &r.outcome));
        }
        self.check_calls("concurrent deploys", &[(ti, calls)]);
        self.check_all("concurrent deploys");
    }

    // --- the end ---

    fn report(&mut self, took: Duration) {
        let mut summary = String::new();
        for (k, v) in &self.stats {
            let _ = writeln!(summary, "  {v:>5}  {k}");
        }
        eprintln!(
            "model: seed {}: {} steps in {:.1} s, {} mismatches\n{summary}",
            self.seed,
            self.steps,
            took.as_secs_f64(),
            self.violations.len()
        );
        if self.violations.is_empty() {
            return;
        }
        eprintln!(
            "model: every step of seed {}:\n{}",
            self.seed,
            self.trace.join("\n")
        );
        let mut kinds: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, v) in self.violations.iter().enumerate() {
            match kinds.iter_mut().find(|(k, _)| *k == v.kind) {
                Some((_, list)) => list.push(i),
                None => kinds.push((v.kind.clone(), vec![i])),
            }
        }
        let mut msg = format!(
            "seed {}: {} mismatches of {} kinds between the model and the agent in {} steps \
             (replay: {SEED_VAR}={} {STEPS_VAR}={} cargo test -p certctl-agent --test it model)\n",
            self.seed,
            self.violations.len(),
            kinds.len(),
            self.steps,
            self.seed,
            self.steps
        );
        for (kind, list) in &kinds {
            let first = &self.violations[list[0]];
            let steps: Vec<String> = list
                .iter()
                .map(|i| self.violations[*i].step.to_string())
                .collect();
            let _ = writeln!(
                msg,
                "\n[{kind}] {} time(s), at steps {}\n  first: {}\n  steps up to it:\n{}",
                list.len(),
                steps.join(", "),
                first.msg,
                first.trace
            );
        }
        panic!("{msg}");
    }
}

/// The run a `certctl --json deploy|rollback` stream reports.
fn parse_run(stdout: &str, code: i32) -> Result<RunOut, String> {
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a line is not JSON ({e})"))?;
    let done = lines
        .iter()
        .rev()
        .find(|l| l["stage"] == "done")
        .ok_or_else(|| format!("no done event (exit {code})"))?;
    Ok(RunOut {
        code,
        id: done["deploy_id"].as_str().unwrap_or_default().to_owned(),
        outcome: done["result"]["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        result: done["result"].clone(),
        text: format!("exit code {code}\n{stdout}"),
    })
}

fn not_found(r: &std::io::Result<Vec<u8>>) -> bool {
    r.as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of the first certificate in a PEM file.
fn leaf_sha_of_pem(pem: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = text[start..end].split_whitespace().collect();
    let der = data_encoding::BASE64.decode(b64.as_bytes()).ok()?;
    Some(sha_hex(&der))
}

// === the sequences behind the first mismatches ===

/// A `file` target body for the deterministic tests.
fn plain_body(dir: &Path, layout: &str, reload: &str) -> String {
    format!(
        "kind = \"file\"\ncert_path = {}\nkey_path = {}\nlayout = \"{layout}\"\nreload = {reload}\n",
        toml_path(&dir.join("cert.pem")),
        toml_path(&dir.join("key.pem"))
    )
}

fn deploy_bundle(env: &TestEnv, target: &str, leaf: &Leaf, stem: &str) -> CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&["--json", "deploy", target, "--cert", arg(&f.bundle)])
}

fn outcome_of(out: &CtlOutput) -> String {
    parse_run(&out.stdout, out.code).map_or_else(|e| format!("({e})"), |r| r.outcome)
}

/// `reload = ["false"]`, a first deploy to an empty target (rollback_failed
/// today), `reload = ["true"]` and SIGHUP, a deploy that succeeds, a clean
/// restart: the target must still hold the later certificate. In both
/// layouts.
#[test]
fn a_first_deploy_that_failed_is_not_undone_again_after_a_later_deploy() {
    let mut failures = Vec::new();
    for layout in ["in-place", "generations"] {
        let mut env = TestEnv::new();
        let dir = env.target_dir("site");
        env.target("site", &plain_body(&dir, layout, "[\"false\"]"));
        let mut agent = env.spawn_agent();

        let first = pki::issue_cert(&["site.test"]);
        let out = deploy_bundle(&env, "site", &first, "first");
        let first_outcome = outcome_of(&out);
        eprintln!(
            "{layout}: a first deploy whose reload fails ended {first_outcome} (exit {})",
            out.code
        );
        assert!(
            [5, 6].contains(&out.code),
            "{layout}: a first deploy whose reload fails: {out}"
        );
        for f in ["cert.pem", "key.pem", "..data"] {
            assert!(
                std::fs::symlink_metadata(dir.join(f)).is_err(),
                "{layout}: {f} is left after the failed first deploy ({first_outcome})"
            );
        }

        env.replace_target("site", &plain_body(&dir, layout, "[\"true\"]"));
        env.write_config();
        agent.signal(Signal::SIGHUP);
        agent.wait_for_log("configuration reloaded", WAIT);
        let second = pki::issue_cert(&["site.test"]);
        let out = deploy_bundle(&env, "site", &second, "second");
        out.assert_code(0);
        assert_eq!(outcome_of(&out), "deployed", "{layout}: {out}");
        assert_eq!(
            std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
            second.fullchain_pem(),
            "{layout}"
        );

        let status = agent.terminate();
        assert!(status.success(), "{layout}: SIGTERM: {status}");
        let _agent = env.spawn_agent();
        let cert = std::fs::read(dir.join("cert.pem"));
        let key = std::fs::read(dir.join("key.pem"));
        let held = |r: &std::io::Result<Vec<u8>>, want: &str| match r {
            Ok(b) if b.as_slice() == want.as_bytes() => "the later set".to_owned(),
            Ok(b) => format!("other bytes (leaf {:?})", leaf_sha_of_pem(b)),
            Err(e) => e.to_string(),
        };
        let cert_held = held(&cert, &second.fullchain_pem());
        let key_held = held(&key, &second.key_pem);
        if cert_held != "the later set" || key_held != "the later set" {
            let history = env.ctl(&["--json", "history", "site"]).json();
            let runs: Vec<String> = history["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    format!(
                        "{} {} recovered={}",
                        e["deploy_id"], e["outcome"], e["recovered"]
                    )
                })
                .collect();
            failures.push(format!(
                "{layout}: after the restart cert.pem holds {cert_held}, key.pem holds {key_held} \
                 (the first deploy ended {first_outcome}; history, newest first: {runs:?})"
            ));
            continue;
        }
        let st = env.ctl(&["--json", "status", "site"]).json();
        assert_eq!(
            st["targets"][0]["cert_sha256"],
            second.sha256_hex.as_str(),
            "{layout}: {st}"
        );
    }
    assert!(
        failures.is_empty(),
        "a clean restart undid a later deploy:\n{}",
        failures.join("\n")
    );
}

/// An operator's key with mode 0644: the first deploy tightens it to
/// 0600; `certctl rollback` then puts the operator's set back, and the key
/// it puts back must not be readable by others either.
#[test]
fn a_rollback_never_brings_back_a_key_readable_by_others() {
    let mut env = TestEnv::new();
    let dir = env.file_target("app", "reload = [\"true\"]\n");
    let own = pki::issue_cert(&["app.test"]);
    pki::write_mode(&dir.join("cert.pem"), &own.fullchain_pem(), 0o644);
    pki::write_mode(&dir.join("key.pem"), &own.key_pem, 0o644);
    let _agent = env.spawn_agent();
    let key_mode = || {
        std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };

    let new = pki::issue_cert(&["app.test"]);
    let out = deploy_bundle(&env, "app", &new, "new");
    out.assert_code(0);
    let run = parse_run(&out.stdout, out.code).unwrap();
    assert!(
        run.result["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("tightened to 0600")),
        "{out}"
    );
    assert_eq!(key_mode(), 0o600, "after the deploy");

    let out = env.ctl(&["--json", "rollback", "app"]);
    out.assert_code(0);
    assert_eq!(outcome_of(&out), "restored", "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        own.fullchain_pem()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        own.key_pem
    );
    let mode = key_mode();
    assert!(
        mode & LOOSE == 0,
        "certctl rollback put back key.pem with mode {mode:04o}: readable by others (the \
         deploy had tightened it to 0600)"
    );

    // And back again: the deployed set with its 0600 key.
    env.ctl(&["rollback", "app"]).assert_code(0);
    assert_eq!(
        std::fs::read_to_string(dir.join("key.pem")).unwrap(),
        new.key_pem
    );
    assert_eq!(key_mode(), 0o600, "after the second rollback");
}
