//! Prometheus metrics: what the agent counts while it works, and the text
//! exposition format (0.0.4) it is read in.
//!
//! The agent keeps one [`Metrics`] (owned by the [`Engine`](crate::deploy::Engine),
//! reachable as `engine.metrics()`). Code paths report what happened through
//! small calls named after the event:
//!
//! | call | by | series |
//! |---|---|---|
//! | [`Metrics::deploy_finished`] | `Engine::deploy` | `certctl_deploys_total`, automatic `certctl_rollbacks_total` |
//! | [`Metrics::rollback_finished`] | `Engine::rollback` | operator `certctl_rollbacks_total` |
//! | [`Metrics::stage_event`], [`Metrics::command_finished`], [`Metrics::verification_finished`], [`Metrics::run_finished`] | `deploy::progress::Run` | `certctl_stage_duration_seconds` |
//! | [`Metrics::verify_attempt`] | `deploy::progress::Run` | `certctl_verify_attempts_total` |
//! | [`Metrics::drop_outcome`] | the drop directory watcher | `certctl_drops_total` |
//! | [`Metrics::drop_dir_watching`] | the drop directory watcher | `certctl_drop_dir_watching` |
//! | [`Metrics::config_reload`] | `daemon` (SIGHUP) | `certctl_config_reloads_total`, `certctl_config_reload_successful`, `certctl_config_reload_timestamp_seconds` |
//!
//! [`Metrics::render`] renders everything, adding what the caller read at
//! scrape time (each target's certificate `not_after`, through
//! [`crate::disk`]: `App::exposition`), up-time and build info. This module
//! does no I/O and knows no configuration.
//! `docs/metrics.md` describes every series for operators.
//!
//! Guarantees: a series moves only when the code path it names ran (nothing
//! is estimated or derived from logs); recording takes one short mutex hold
//! and never does I/O; rendering is deterministic (series sorted by labels)
//! and label values are escaped, so the text always parses.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::model::event::{Outcome, Stage};

/// Upper bounds (seconds) of the stage-duration histogram buckets: from
/// sub-millisecond planning to verification loops with backoff.
const STAGE_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// The drop outcomes documented for `certctl_drops_total`; they are exported
/// (at zero) before the first drop, so `rate()` works from the start.
pub const DROP_OUTCOMES: [&str; 6] = [
    "accepted",
    "removed",
    "rejected",
    "superseded",
    "withdrawn",
    "failed",
];

/// Every counter and histogram of one agent.
#[derive(Debug)]
pub struct Metrics {
    started: SystemTime,
    started_at: Instant,
    inner: Mutex<Inner>,
}

/// The result of one `SIGHUP` configuration reload, for `certctl status`
/// and the `certctl_config_reload_*` gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReload {
    /// The new configuration is in force; else the previous one stayed.
    pub accepted: bool,
    pub at: SystemTime,
    /// Why it was rejected (the configuration error); empty when accepted.
    pub error: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// (target, outcome)
    deploys: BTreeMap<(String, &'static str), u64>,
    /// (target, trigger, result)
    rollbacks: BTreeMap<(String, &'static str, &'static str), u64>,
    /// (target, result)
    verify_attempts: BTreeMap<(String, String), u64>,
    /// outcome
    drops: BTreeMap<String, u64>,
    /// Whether the drop directory is watched (`None`: not started yet).
    drop_dir_watching: Option<bool>,
    /// result
    reloads: BTreeMap<&'static str, u64>,
    /// The last `SIGHUP` reload; `None` before the first.
    last_reload: Option<ConfigReload>,
    /// stage
    stages: BTreeMap<&'static str, Histogram>,
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [u64; STAGE_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let i = STAGE_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(STAGE_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Which rollback a `certctl_rollbacks_total` sample counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackTrigger {
    /// A deploy put the previous files back after its validate command,
    /// reload or verification failed.
    Deploy,
    /// `certctl rollback`.
    Operator,
}

impl RollbackTrigger {
    fn as_str(self) -> &'static str {
        match self {
            RollbackTrigger::Deploy => "deploy",
            RollbackTrigger::Operator => "operator",
        }
    }
}

/// The state of one target at scrape time: its certificate on disk, its
/// last run and its latest probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetCert {
    pub target: String,
    /// `not_after` of the leaf at `cert_path`, Unix seconds; `None` when the
    /// file is missing or holds no readable certificate.
    pub not_after: Option<i64>,
    /// The target's last run ended `rollback_failed`: an operator has to
    /// look (it is never retried behind their back).
    pub needs_operator: bool,
    /// The outcome of the target's last run (`deployed`, `rolled_back`,
    /// ...); `None` before its first.
    pub last_outcome: Option<&'static str>,
    /// The state of the target's latest probe of what is served (by a
    /// deploy or the drift watch: `verified`, `mismatch`, `unreachable`,
    /// ...); `None` before its first.
    pub served: Option<&'static str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics; the agent's start time is now.
    pub fn new() -> Self {
        let mut inner = Inner::default();
        for outcome in DROP_OUTCOMES {
            inner.drops.insert(outcome.to_owned(), 0);
        }
        for result in ["ok", "rejected"] {
            inner.reloads.insert(result, 0);
        }
        Self {
            started: SystemTime::now(),
            started_at: Instant::now(),
            inner: Mutex::new(inner),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // === recording ===

    /// A deploy ended with `outcome`. Counts it, and counts the automatic
    /// rollback its outcome implies (validate, reload or verification
    /// failed and the previous files were put back, or putting them back
    /// failed).
    pub fn deploy_finished(&self, target: &str, outcome: Outcome) {
        let mut m = self.inner();
        *m.deploys
            .entry((target.to_owned(), outcome.as_str()))
            .or_default() += 1;
        let rollback = match outcome {
            Outcome::ValidateFailed | Outcome::RolledBack => Some("ok"),
            Outcome::RollbackFailed => Some("failed"),
            _ => None,
        };
        if let Some(result) = rollback {
            *m.rollbacks
                .entry((target.to_owned(), RollbackTrigger::Deploy.as_str(), result))
                .or_default() += 1;
        }
    }

    /// `certctl rollback` ended with `outcome`. A rollback refused before it
    /// touched anything (nothing to roll back to, target busy) is not counted.
    pub fn rollback_finished(&self, target: &str, outcome: Outcome) {
        let result = match outcome {
            Outcome::Restored => "ok",
            Outcome::Rejected | Outcome::Busy | Outcome::DryRun => return,
            _ => "failed",
        };
        *self
            .inner()
            .rollbacks
            .entry((
                target.to_owned(),
                RollbackTrigger::Operator.as_str(),
                result,
            ))
            .or_default() += 1;
    }

    /// A deploy or rollback reported `stage`. Stages reported when their
    /// work is done (`validated` … `committed`) record the time since the
    /// previous stage; a `rollback` event starts the rollback clock
    /// ([`Self::run_finished`] stops it). Commands and verification are timed
    /// where they run ([`Self::command_finished`], [`Self::verification_finished`]).
    pub fn stage_event(&self, stage: Stage, timer: &StageTimer) {
        match stage {
            Stage::Validated
            | Stage::Planned
            | Stage::Locked
            | Stage::Staged
            | Stage::Committed => {
                let took = timer.lap();
                self.observe_stage(stage.as_str(), took);
            }
            Stage::Rollback => {
                timer.lap();
                timer.rollback_started();
            }
            _ => {
                timer.lap();
            }
        }
    }

    /// A validate (`purpose` "validate") or reload command ran for `took`,
    /// whether it succeeded or not.
    pub fn command_finished(&self, purpose: &str, took: Duration) {
        let stage = match purpose {
            "validate" => Stage::ValidateCommand,
            _ => Stage::Reloaded,
        };
        self.observe_stage(stage.as_str(), took);
    }

    /// A verification loop (every attempt and wait) took `took`.
    pub fn verification_finished(&self, took: Duration, timer: &StageTimer) {
        timer.lap();
        self.observe_stage(Stage::VerifyAttempt.as_str(), took);
    }

    /// A deploy or rollback run ended: closes a rollback that was started.
    pub fn run_finished(&self, timer: &StageTimer) {
        if let Some(took) = timer.rollback_elapsed() {
            self.observe_stage(Stage::Rollback.as_str(), took);
        }
    }

    /// One verification attempt of a deploy or rollback: `ok`, else the
    /// probe's short reason code (`refused`, `mismatch`, `timeout`, ...).
    pub fn verify_attempt(&self, target: &str, ok: bool, reason: &str) {
        let result = if ok {
            "ok"
        } else if reason.is_empty() {
            "failed"
        } else {
            reason
        };
        *self
            .inner()
            .verify_attempts
            .entry((target.to_owned(), result.to_owned()))
            .or_default() += 1;
    }

    /// Whether the drop directory is watched now
    /// (`certctl_drop_dir_watching`). Called by the drop directory's
    /// runner when it starts, loses and regains its watch.
    pub fn drop_dir_watching(&self, watching: bool) {
        self.inner().drop_dir_watching = Some(watching);
    }

    /// A drop event: `outcome` is the drop's outcome (`drop::DropOutcome`):
    /// `"accepted"` (taken, deploys start), `"removed"` (deployed and
    /// removed), `"rejected"` (moved to `<state_dir>/rejected/` with a
    /// reason), `"superseded"`, `"withdrawn"` or `"failed"`. Called by the
    /// drop directory's `record`.
    pub fn drop_outcome(&self, outcome: &str) {
        *self.inner().drops.entry(outcome.to_owned()).or_default() += 1;
    }

    /// A `SIGHUP` configuration reload was applied (`error` is `None`) or
    /// rejected for `error`.
    pub fn config_reload(&self, error: Option<&str>) {
        let result = if error.is_none() { "ok" } else { "rejected" };
        let mut m = self.inner();
        *m.reloads.entry(result).or_default() += 1;
        m.last_reload = Some(ConfigReload {
            accepted: error.is_none(),
            at: SystemTime::now(),
            error: error.unwrap_or_default().to_owned(),
        });
    }

    /// The last `SIGHUP` reload's result; `None` before the first.
    pub fn last_config_reload(&self) -> Option<ConfigReload> {
        self.inner().last_reload.clone()
    }

    fn observe_stage(&self, stage: &'static str, took: Duration) {
        self.inner()
            .stages
            .entry(stage)
            .or_default()
            .observe(took.as_secs_f64());
    }

    // === rendering ===

    /// The text exposition, with `certs` read from disk by the caller.
    pub fn render(&self, certs: &[TargetCert]) -> String {
        let m = self.inner();
        let mut out = String::with_capacity(4096);

        header(
            &mut out,
            "certctl_build_info",
            "gauge",
            "Always 1; the labels say which certctl-agent runs.",
        );
        sample(
            &mut out,
            "certctl_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        header(
            &mut out,
            "certctl_agent_start_time_seconds",
            "gauge",
            "When the agent started, seconds since the Unix epoch.",
        );
        sample(
            &mut out,
            "certctl_agent_start_time_seconds",
            &[],
            unix_seconds(self.started),
        );
        header(
            &mut out,
            "certctl_agent_uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
        );
        sample(
            &mut out,
            "certctl_agent_uptime_seconds",
            &[],
            self.started_at.elapsed().as_secs_f64(),
        );
        header(
            &mut out,
            "certctl_targets_configured",
            "gauge",
            "Targets in the configuration in force.",
        );
        sample(
            &mut out,
            "certctl_targets_configured",
            &[],
            certs.len() as f64,
        );

        header(
            &mut out,
            "certctl_deploys_total",
            "counter",
            "Deploys that ended, by target and outcome (deployed, unchanged, rejected, validate_failed, rolled_back, rollback_failed, busy, internal, dry_run).",
        );
        for ((target, outcome), n) in &m.deploys {
            sample(
                &mut out,
                "certctl_deploys_total",
                &[("target", target), ("outcome", outcome)],
                *n as f64,
            );
        }
        header(
            &mut out,
            "certctl_rollbacks_total",
            "counter",
            "Rollbacks: trigger=deploy after a failed validate, reload or verification; trigger=operator for certctl rollback. result=ok or failed.",
        );
        for ((target, trigger, result), n) in &m.rollbacks {
            sample(
                &mut out,
                "certctl_rollbacks_total",
                &[("target", target), ("trigger", trigger), ("result", result)],
                *n as f64,
            );
        }
        header(
            &mut out,
            "certctl_verify_attempts_total",
            "counter",
            "Verification attempts of deploys and rollbacks, by target and result (ok, or the probe's reason code).",
        );
        for ((target, result), n) in &m.verify_attempts {
            sample(
                &mut out,
                "certctl_verify_attempts_total",
                &[("target", target), ("result", result)],
                *n as f64,
            );
        }
        header(
            &mut out,
            "certctl_drops_total",
            "counter",
            "Drop events of the drop directory, by outcome (accepted, removed, rejected, superseded, withdrawn, failed).",
        );
        for (outcome, n) in &m.drops {
            sample(
                &mut out,
                "certctl_drops_total",
                &[("outcome", outcome)],
                *n as f64,
            );
        }
        if let Some(watching) = m.drop_dir_watching {
            header(
                &mut out,
                "certctl_drop_dir_watching",
                "gauge",
                "1 while the drop directory is watched; 0 while it is gone or replaced and not watched yet (drops are not taken).",
            );
            sample(
                &mut out,
                "certctl_drop_dir_watching",
                &[],
                if watching { 1.0 } else { 0.0 },
            );
        }
        header(
            &mut out,
            "certctl_config_reloads_total",
            "counter",
            "SIGHUP configuration reloads, by result (ok, rejected).",
        );
        for (result, n) in &m.reloads {
            sample(
                &mut out,
                "certctl_config_reloads_total",
                &[("result", result)],
                *n as f64,
            );
        }

        // As Prometheus's own: the configuration loaded at start counts as
        // the first successful load.
        let (successful, at) = match &m.last_reload {
            Some(r) => (r.accepted, r.at),
            None => (true, self.started),
        };
        header(
            &mut out,
            "certctl_config_reload_successful",
            "gauge",
            "1 if the last configuration load (at start or SIGHUP) was accepted, 0 if it was rejected and the previous configuration stays in force.",
        );
        sample(
            &mut out,
            "certctl_config_reload_successful",
            &[],
            if successful { 1.0 } else { 0.0 },
        );
        header(
            &mut out,
            "certctl_config_reload_timestamp_seconds",
            "gauge",
            "When the last configuration load (at start or SIGHUP) happened, accepted or not, in Unix seconds.",
        );
        sample(
            &mut out,
            "certctl_config_reload_timestamp_seconds",
            &[],
            unix_seconds(at),
        );

        header(
            &mut out,
            "certctl_stage_duration_seconds",
            "histogram",
            "Time spent in each deploy stage (validated, planned, locked, staged, committed, validate-command, reloaded, verify, rollback).",
        );
        for (stage, h) in &m.stages {
            let mut cumulative = 0;
            for (i, bound) in STAGE_BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                sample(
                    &mut out,
                    "certctl_stage_duration_seconds_bucket",
                    &[("stage", stage), ("le", &format_float(*bound))],
                    cumulative as f64,
                );
            }
            sample(
                &mut out,
                "certctl_stage_duration_seconds_bucket",
                &[("stage", stage), ("le", "+Inf")],
                h.count as f64,
            );
            sample(
                &mut out,
                "certctl_stage_duration_seconds_sum",
                &[("stage", stage)],
                h.sum,
            );
            sample(
                &mut out,
                "certctl_stage_duration_seconds_count",
                &[("stage", stage)],
                h.count as f64,
            );
        }

        header(
            &mut out,
            "certctl_cert_not_after_seconds",
            "gauge",
            "Expiry (not_after) of the certificate on disk at each target's cert_path, seconds since the Unix epoch; absent while the file is missing or unreadable.",
        );
        for c in certs {
            if let Some(t) = c.not_after {
                sample(
                    &mut out,
                    "certctl_cert_not_after_seconds",
                    &[("target", &c.target)],
                    t as f64,
                );
            }
        }
        header(
            &mut out,
            "certctl_target_needs_operator",
            "gauge",
            "1 while the target's last run ended rollback_failed (what is on disk or served is not what the agent could prove); absent otherwise.",
        );
        for c in certs.iter().filter(|c| c.needs_operator) {
            sample(
                &mut out,
                "certctl_target_needs_operator",
                &[("target", &c.target)],
                1.0,
            );
        }
        header(
            &mut out,
            "certctl_target_last_outcome",
            "gauge",
            "1 for the outcome of each target's last run (deployed, unchanged, validate_failed, rolled_back, rollback_failed, restored, ...); absent before its first.",
        );
        for c in certs {
            if let Some(outcome) = c.last_outcome {
                sample(
                    &mut out,
                    "certctl_target_last_outcome",
                    &[("target", &c.target), ("outcome", outcome)],
                    1.0,
                );
            }
        }
        header(
            &mut out,
            "certctl_served_state",
            "gauge",
            "1 for the state of each target's latest probe of what is served, by a deploy or the drift watch (verified, mismatch, chain-mismatch, unreachable, expiring); absent before its first.",
        );
        for c in certs {
            if let Some(state) = c.served {
                sample(
                    &mut out,
                    "certctl_served_state",
                    &[("target", &c.target), ("state", state)],
                    1.0,
                );
            }
        }
        out
    }
}

// === impl StageTimer ===

/// Per-run clock for stage durations (see [`Metrics::stage_event`]).
/// Interior mutability, because stages are reported through `&Run`.
#[derive(Debug)]
pub struct StageTimer {
    last: Mutex<Instant>,
    rollback: Mutex<Option<Instant>>,
}

impl Default for StageTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl StageTimer {
    /// A clock started now.
    pub fn new() -> Self {
        Self {
            last: Mutex::new(Instant::now()),
            rollback: Mutex::new(None),
        }
    }

    /// Time since the previous lap (or the start); starts the next one.
    fn lap(&self) -> Duration {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let took = now.saturating_duration_since(*last);
        *last = now;
        took
    }

    fn rollback_started(&self) {
        self.rollback
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(Instant::now);
    }

    fn rollback_elapsed(&self) -> Option<Duration> {
        self.rollback
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|at| at.elapsed())
    }
}

// === text format ===

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_float(value));
    out.push('\n');
}

/// Label values escape `\`, `"` and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes `\` and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Integers without a fraction, everything else as Rust prints it.
fn format_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Value of the sample whose line starts with `series` (name + labels).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn render(m: &Metrics) -> String {
        m.render(&[
            TargetCert {
                target: "web".into(),
                not_after: Some(1_900_000_000),
                needs_operator: false,
                ..TargetCert::default()
            },
            TargetCert {
                target: "gone".into(),
                not_after: None,
                needs_operator: false,
                ..TargetCert::default()
            },
        ])
    }

    #[test]
    fn drop_outcomes_start_at_zero_and_count() {
        let m = Metrics::new();
        let before = render(&m);
        for o in DROP_OUTCOMES {
            assert_eq!(
                value(&before, &format!("certctl_drops_total{{outcome=\"{o}\"}}")),
                Some(0.0),
                "{before}"
            );
        }
        m.drop_outcome("accepted");
        m.drop_outcome("accepted");
        m.drop_outcome("rejected");
        m.drop_outcome("superseded");
        let after = render(&m);
        assert_eq!(
            value(&after, "certctl_drops_total{outcome=\"accepted\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&after, "certctl_drops_total{outcome=\"rejected\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&after, "certctl_drops_total{outcome=\"superseded\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn deploy_outcomes_imply_automatic_rollbacks() {
        let m = Metrics::new();
        m.deploy_finished("web", Outcome::Deployed);
        m.deploy_finished("web", Outcome::RolledBack);
        m.deploy_finished("web", Outcome::ValidateFailed);
        m.deploy_finished("web", Outcome::RollbackFailed);
        m.deploy_finished("web", Outcome::Rejected);
        let t = render(&m);
        for (outcome, n) in [
            ("deployed", 1.0),
            ("rolled_back", 1.0),
            ("validate_failed", 1.0),
            ("rollback_failed", 1.0),
            ("rejected", 1.0),
        ] {
            assert_eq!(
                value(
                    &t,
                    &format!("certctl_deploys_total{{target=\"web\",outcome=\"{outcome}\"}}")
                ),
                Some(n),
                "{t}"
            );
        }
        assert_eq!(
            value(
                &t,
                "certctl_rollbacks_total{target=\"web\",trigger=\"deploy\",result=\"ok\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_rollbacks_total{target=\"web\",trigger=\"deploy\",result=\"failed\"}"
            ),
            Some(1.0)
        );
    }

    #[test]
    fn operator_rollbacks_count_only_what_touched_files() {
        let m = Metrics::new();
        m.rollback_finished("web", Outcome::Restored);
        m.rollback_finished("web", Outcome::Rejected);
        m.rollback_finished("web", Outcome::Busy);
        m.rollback_finished("web", Outcome::RollbackFailed);
        let t = render(&m);
        assert_eq!(
            value(
                &t,
                "certctl_rollbacks_total{target=\"web\",trigger=\"operator\",result=\"ok\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_rollbacks_total{target=\"web\",trigger=\"operator\",result=\"failed\"}"
            ),
            Some(1.0)
        );
        assert!(!t.contains("certctl_deploys_total{"), "{t}");
    }

    #[test]
    fn stage_histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        let timer = StageTimer::new();
        m.stage_event(Stage::Validated, &timer);
        m.command_finished("validate", Duration::from_millis(30));
        m.command_finished("reload", Duration::from_secs(3));
        m.command_finished("reload", Duration::from_secs(500));
        m.verification_finished(Duration::from_millis(7), &timer);
        m.stage_event(Stage::Rollback, &timer);
        m.run_finished(&timer);
        m.run_finished(&timer);
        let t = render(&m);
        let b = |stage: &str, le: &str| {
            value(
                &t,
                &format!("certctl_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("reloaded", "2.5"), Some(0.0), "{t}");
        assert_eq!(b("reloaded", "5"), Some(1.0));
        assert_eq!(b("reloaded", "120"), Some(1.0));
        assert_eq!(b("reloaded", "+Inf"), Some(2.0));
        assert_eq!(
            value(&t, "certctl_stage_duration_seconds_sum{stage=\"reloaded\"}"),
            Some(503.0)
        );
        assert_eq!(b("validate-command", "0.05"), Some(1.0));
        assert_eq!(b("validate-command", "0.025"), Some(0.0));
        assert_eq!(
            value(&t, "certctl_stage_duration_seconds_count{stage=\"verify\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_stage_duration_seconds_count{stage=\"validated\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_stage_duration_seconds_count{stage=\"rollback\"}"
            ),
            Some(1.0),
            "a rollback is observed once"
        );
    }

    #[test]
    fn verify_attempts_by_result_and_reloads_by_result() {
        let m = Metrics::new();
        m.verify_attempt("web", false, "refused");
        m.verify_attempt("web", false, "refused");
        m.verify_attempt("web", true, "");
        assert_eq!(
            value(&render(&m), "certctl_config_reload_successful"),
            Some(1.0)
        );
        m.config_reload(None);
        m.config_reload(Some("bad"));
        m.config_reload(Some("worse"));
        let last = m.last_config_reload().unwrap();
        assert!(!last.accepted);
        assert_eq!(last.error, "worse");
        let t = render(&m);
        assert_eq!(
            value(
                &t,
                "certctl_verify_attempts_total{target=\"web\",result=\"refused\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_verify_attempts_total{target=\"web\",result=\"ok\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "certctl_config_reloads_total{result=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "certctl_config_reloads_total{result=\"rejected\"}"),
            Some(2.0)
        );
        assert_eq!(value(&t, "certctl_config_reload_successful"), Some(0.0));
        assert!(value(&t, "certctl_config_reload_timestamp_seconds").is_some_and(|v| v > 0.0));
    }

    #[test]
    fn the_last_outcome_and_the_served_state_are_one_series_each() {
        let m = Metrics::new();
        let t = m.render(&[
            TargetCert {
                target: "web".into(),
                last_outcome: Some("rolled_back"),
                served: Some("mismatch"),
                ..TargetCert::default()
            },
            TargetCert {
                target: "new".into(),
                ..TargetCert::default()
            },
        ]);
        assert_eq!(
            value(
                &t,
                "certctl_target_last_outcome{target=\"web\",outcome=\"rolled_back\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "certctl_served_state{target=\"web\",state=\"mismatch\"}"
            ),
            Some(1.0)
        );
        assert!(
            t.contains("# TYPE certctl_target_last_outcome gauge\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE certctl_served_state gauge\n"), "{t}");
        assert!(!t.contains("target=\"new\""), "{t}");
    }

    #[test]
    fn a_target_whose_rollback_failed_needs_an_operator() {
        let m = Metrics::new();
        let t = m.render(&[
            TargetCert {
                target: "web".into(),
                not_after: None,
                needs_operator: true,
                ..TargetCert::default()
            },
            TargetCert {
                target: "ok".into(),
                not_after: None,
                needs_operator: false,
                ..TargetCert::default()
            },
        ]);
        assert_eq!(
            value(&t, "certctl_target_needs_operator{target=\"web\"}"),
            Some(1.0)
        );
        assert!(
            !t.contains("certctl_target_needs_operator{target=\"ok\"}"),
            "{t}"
        );
    }

    #[test]
    fn gauges_and_format() {
        let m = Metrics::new();
        let t = render(&m);
        assert_eq!(
            value(&t, "certctl_cert_not_after_seconds{target=\"web\"}"),
            Some(1_900_000_000.0)
        );
        assert!(!t.contains("target=\"gone\""), "{t}");
        assert_eq!(value(&t, "certctl_targets_configured"), Some(2.0));
        assert!(value(&t, "certctl_agent_uptime_seconds").is_some());
        assert!(value(&t, "certctl_agent_start_time_seconds").unwrap() > 1.7e9);
        assert_eq!(
            value(
                &t,
                &format!(
                    "certctl_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
        // Every line is a comment or `name{labels} value`, every family has
        // HELP and TYPE exactly once.
        for line in t.lines() {
            assert!(
                line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("certctl_"),
                "{line}"
            );
        }
        let types = t.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = t.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        // 16 families since the last-outcome and served-state gauges.
        assert_eq!(types, 16);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut out = String::new();
        sample(&mut out, "x", &[("k", "v\"")], 1.5);
        assert_eq!(out, "x{k=\"v\\\"\"} 1.5\n");
        assert_eq!(format_float(0.001), "0.001");
        assert_eq!(format_float(120.0), "120");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
    }

    #[test]
    fn stage_timer_laps() {
        let t = StageTimer::new();
        let a = t.lap();
        let b = t.lap();
        assert!(a >= Duration::ZERO && b >= Duration::ZERO);
        assert_eq!(t.rollback_elapsed(), None);
        t.rollback_started();
        assert!(t.rollback_elapsed().is_some());
        assert_eq!(t.rollback_elapsed(), None, "taken once");
    }
}
