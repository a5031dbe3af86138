//! `certctl status --check`: the agent's status judged by the
//! monitoring-plugin convention (Nagios, Icinga, Sensu, a cron job): exit 0
//! OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, and one summary line with
//! performance data.
//!
//! Which state is which level is decided in [`judge`], a pure function of
//! the agent's answer and the time, and documented in `docs/cli.md`
//! ("`certctl status --check`"): a target that does not serve a valid
//! certificate, or needs an operator, is CRITICAL; one that will soon, or
//! whose last renewal did not arrive, is WARNING; anything that keeps the
//! check from seeing the targets is UNKNOWN.

use std::fmt;

use certctl_proto::agent::v1 as pb;
use serde_json::json;

use crate::cli::{Cli, StatusArgs};
use crate::client;
use crate::output::{drop_outcome_name, outcome_name, relative_to, short};

/// Seconds in a day, for `--warn-days`.
const DAY: i64 = 86_400;

/// A monitoring-plugin state, ordered from best to worst. The discriminant
/// is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Level {
    /// The process exit code of this level.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        })
    }
}

/// One thing found wrong, for a target or (with an empty `target`) for the
/// agent itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub target: String,
    pub level: Level,
    pub reason: String,
}

/// The judgement of one status answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub level: Level,
    pub targets: usize,
    pub findings: Vec<Finding>,
    /// `(target, whole days until its certificate on disk expires)`.
    pub days_left: Vec<(String, i64)>,
    pub warn_days: u32,
}

/// Judges the agent's status answer at `now_unix`.
pub fn judge(resp: &pb::StatusResponse, now_unix: i64, warn_days: u32) -> Report {
    let mut findings = Vec::new();
    let mut days_left = Vec::new();
    let mut find = |target: &str, level: Level, reason: String| {
        findings.push(Finding {
            target: target.to_owned(),
            level,
            reason,
        });
    };
    let agent = resp.agent.clone().unwrap_or_default();
    if !agent.drop_dir.is_empty() && !agent.drop_dir_watching {
        find(
            "",
            Level::Warning,
            format!("the drop directory {} is not watched", agent.drop_dir),
        );
    }
    if let Some(r) = &agent.config_reload
        && !r.accepted
    {
        find(
            "",
            Level::Warning,
            format!(
                "the last configuration reload was rejected {}: {}",
                relative_to(r.unix_ms / 1000, now_unix),
                r.error.lines().collect::<Vec<_>>().join("; ")
            ),
        );
    }
    for t in &resp.targets {
        let name = t.name.as_str();
        if t.disk_state == "missing" {
            find(
                name,
                Level::Critical,
                format!("no certificate at {}", t.cert_path),
            );
        } else if t.disk_state != "ok" {
            find(
                name,
                Level::Critical,
                format!("the certificate on disk cannot be read: {}", t.disk_state),
            );
        } else if t.not_after_unix != 0 {
            let left = t.not_after_unix - now_unix;
            days_left.push((t.name.clone(), left.div_euclid(DAY)));
            if left <= 0 {
                find(
                    name,
                    Level::Critical,
                    format!("expired {}", relative_to(t.not_after_unix, now_unix)),
                );
            } else if left < i64::from(warn_days) * DAY {
                find(
                    name,
                    Level::Warning,
                    format!("expires {}", relative_to(t.not_after_unix, now_unix)),
                );
            }
        }
        match t.verification.as_str() {
            "mismatch" => find(
                name,
                Level::Critical,
                match &t.served {
                    Some(s) if !s.served_sha256.is_empty() => format!(
                        "{} serves {}, not the certificate on disk {}",
                        s.endpoint,
                        short(&s.served_sha256),
                        short(&t.cert_sha256)
                    ),
                    _ => "the endpoint serves another certificate than the one on disk".to_owned(),
                },
            ),
            "unreachable" => find(
                name,
                Level::Warning,
                match &t.served {
                    Some(s) => format!("{} unreachable at the last probe", s.endpoint),
                    None => "the endpoint was unreachable at the last probe".to_owned(),
                },
            ),
            _ => {}
        }
        let last_ok_ms = match &t.last {
            Some(l) => {
                let outcome = pb::Outcome::try_from(l.outcome).unwrap_or(pb::Outcome::Unspecified);
                match outcome {
                    pb::Outcome::RollbackFailed => find(
                        name,
                        Level::Critical,
                        "the last deploy's rollback failed: operator action needed (certctl history)"
                            .to_owned(),
                    ),
                    pb::Outcome::Rejected
                    | pb::Outcome::ValidateFailed
                    | pb::Outcome::RolledBack
                    | pb::Outcome::Internal => find(
                        name,
                        Level::Warning,
                        format!("the last deploy {}", outcome_name(l.outcome)),
                    ),
                    _ => {}
                }
                l.finished_unix_ms
            }
            None => 0,
        };
        if let Some(d) = &t.last_drop {
            let outcome = d
                .drop
                .as_ref()
                .and_then(|d| pb::DropOutcome::try_from(d.outcome).ok());
            // A later deploy that finished replaces what a failed drop left.
            if matches!(
                outcome,
                Some(pb::DropOutcome::Rejected | pb::DropOutcome::Failed)
            ) && d.unix_ms > last_ok_ms
            {
                find(
                    name,
                    Level::Warning,
                    format!(
                        "the last drop was {}",
                        d.drop
                            .as_ref()
                            .map_or("unknown", |d| drop_outcome_name(d.outcome))
                    ),
                );
            }
        }
    }
    let level = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    Report {
        level,
        targets: resp.targets.len(),
        findings,
        days_left,
        warn_days,
    }
}

impl Report {
    /// `CERTCTL WARNING - 1 of 3 targets warning: api expires in 12d | ...`.
    pub fn line(&self) -> String {
        let plural = if self.targets == 1 { "" } else { "s" };
        let text = if self.findings.is_empty() {
            let next = self.days_left.iter().min_by_key(|(_, d)| *d);
            match next {
                Some((name, days)) => format!(
                    "{} target{plural} ok, the next to expire is {name} in {days}d",
                    self.targets
                ),
                None => format!("{} target{plural} ok", self.targets),
            }
        } else {
            let count = |level: Level| {
                let mut names: Vec<&str> = self
                    .findings
                    .iter()
                    .filter(|f| f.level == level && !f.target.is_empty())
                    .map(|f| f.target.as_str())
                    .collect();
                names.dedup();
                names.len()
            };
            let mut counts = Vec::new();
            for level in [Level::Critical, Level::Warning] {
                let n = count(level);
                if n > 0 {
                    counts.push(format!("{n} {}", level.to_string().to_lowercase()));
                }
            }
            let reasons: Vec<String> = self
                .findings
                .iter()
                .map(|f| {
                    if f.target.is_empty() {
                        format!("agent: {}", f.reason)
                    } else {
                        format!("{}: {}", f.target, f.reason)
                    }
                })
                .collect();
            if counts.is_empty() {
                format!("{} target{plural} ok; {}", self.targets, reasons.join("; "))
            } else {
                format!(
                    "{} of {} target{plural}: {}",
                    counts.join(", "),
                    self.targets,
                    reasons.join("; ")
                )
            }
        };
        let perf: Vec<String> = self
            .days_left
            .iter()
            .map(|(name, days)| format!("{name}_days_left={days};{}:;0:", self.warn_days))
            .collect();
        if perf.is_empty() {
            format!("CERTCTL {} - {text}", self.level)
        } else {
            format!("CERTCTL {} - {text} | {}", self.level, perf.join(" "))
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "status": self.level.to_string(),
            "exit_code": self.level.code(),
            "summary": self.line(),
            "targets": self.targets,
            "warn_days": self.warn_days,
            "findings": self.findings.iter().map(|f| json!({
                "target": (!f.target.is_empty()).then_some(&f.target),
                "status": f.level.to_string(),
                "reason": f.reason,
            })).collect::<Vec<_>>(),
            "days_left": self.days_left.iter().map(|(n, d)| json!({"target": n, "days": d})).collect::<Vec<_>>(),
        })
    }
}

/// Runs the check: the agent's status, judged; every failure to get it is
/// UNKNOWN (exit 3), never an error of its own.
pub async fn run(cli: &Cli, args: &StatusArgs) -> u8 {
    let answer = async {
        let mut client = client::connect(&cli.socket).await?;
        crate::inspect::fetch_status(&mut client, &args.targets).await
    }
    .await;
    match answer {
        Ok(resp) => {
            let report = judge(&resp, crate::output::now_unix(), args.warn_days);
            if cli.json {
                println!("{}", report.json());
            } else {
                println!("{}", report.line());
            }
            report.level.code()
        }
        Err(e) => {
            let line = format!("CERTCTL UNKNOWN - {e}");
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "status": "UNKNOWN",
                        "exit_code": Level::Unknown.code(),
                        "summary": line,
                        "error": e.to_string(),
                    })
                );
            } else {
                println!("{line}");
            }
            Level::Unknown.code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn target(name: &str, days_left: i64) -> pb::TargetStatus {
        pb::TargetStatus {
            name: name.to_owned(),
            kind: "file".to_owned(),
            cert_path: format!("/etc/tls/{name}.crt"),
            cert_sha256: "ab".repeat(32),
            not_after_unix: NOW + days_left * DAY + 60,
            disk_state: "ok".to_owned(),
            verification: "verified".to_owned(),
            ..Default::default()
        }
    }

    fn resp(targets: Vec<pb::TargetStatus>) -> pb::StatusResponse {
        pb::StatusResponse {
            agent: Some(pb::AgentInfo::default()),
            targets,
            ..pb::StatusResponse::default()
        }
    }

    fn level(t: pb::TargetStatus) -> Level {
        judge(&resp(vec![t]), NOW, 21).level
    }

    #[test]
    fn healthy_targets_are_ok_with_the_next_expiry_and_perfdata() {
        let r = judge(&resp(vec![target("web", 80), target("api", 40)]), NOW, 21);
        assert_eq!(r.level, Level::Ok);
        assert_eq!(
            r.line(),
            "CERTCTL OK - 2 targets ok, the next to expire is api in 40d \
             | web_days_left=80;21:;0: api_days_left=40;21:;0:"
        );
    }

    #[test]
    fn each_state_has_its_level() {
        assert_eq!(level(target("web", 20)), Level::Warning);
        assert_eq!(level(target("web", 21)), Level::Ok);
        assert_eq!(level(target("web", -1)), Level::Critical);
        let mut t = target("web", 80);
        t.disk_state = "missing".to_owned();
        t.not_after_unix = 0;
        assert_eq!(level(t), Level::Critical);
        let mut t = target("web", 80);
        t.disk_state = "unreadable: not PEM".to_owned();
        assert_eq!(level(t), Level::Critical);
        let mut t = target("web", 80);
        t.verification = "mismatch".to_owned();
        assert_eq!(level(t), Level::Critical);
        let mut t = target("web", 80);
        t.verification = "unreachable".to_owned();
        assert_eq!(level(t), Level::Warning);
        let mut t = target("web", 80);
        t.verification = "unverified".to_owned();
        assert_eq!(level(t), Level::Ok);
        for (outcome, want) in [
            (pb::Outcome::RollbackFailed, Level::Critical),
            (pb::Outcome::RolledBack, Level::Warning),
            (pb::Outcome::ValidateFailed, Level::Warning),
            (pb::Outcome::Rejected, Level::Warning),
            (pb::Outcome::Deployed, Level::Ok),
            (pb::Outcome::Restored, Level::Ok),
        ] {
            let mut t = target("web", 80);
            t.last = Some(pb::LastDeploy {
                outcome: outcome as i32,
                finished_unix_ms: NOW * 1000,
                ..Default::default()
            });
            assert_eq!(level(t), want, "{outcome:?}");
        }
    }

    #[test]
    fn a_rejected_drop_warns_until_a_later_deploy() {
        let drop = |unix_ms| pb::LastDrop {
            drop: Some(pb::DropInfo {
                outcome: pb::DropOutcome::Rejected as i32,
                ..Default::default()
            }),
            unix_ms,
            ..Default::default()
        };
        let mut t = target("web", 80);
        t.last_drop = Some(drop(NOW * 1000));
        assert_eq!(level(t.clone()), Level::Warning);
        t.last = Some(pb::LastDeploy {
            outcome: pb::Outcome::Deployed as i32,
            finished_unix_ms: NOW * 1000 + 1,
            ..Default::default()
        });
        assert_eq!(level(t), Level::Ok);
    }

    #[test]
    fn the_worst_level_wins_and_every_problem_is_named() {
        let mut missing = target("api", 0);
        missing.disk_state = "missing".to_owned();
        missing.not_after_unix = 0;
        let r = judge(
            &resp(vec![target("web", 3), missing, target("mail", 90)]),
            NOW,
            21,
        );
        assert_eq!(r.level, Level::Critical);
        assert_eq!(
            r.line(),
            "CERTCTL CRITICAL - 1 critical, 1 warning of 3 targets: web: expires in 3d; \
             api: no certificate at /etc/tls/api.crt \
             | web_days_left=3;21:;0: mail_days_left=90;21:;0:"
        );
    }

    #[test]
    fn agent_problems_warn() {
        let mut r = resp(vec![target("web", 80)]);
        r.agent = Some(pb::AgentInfo {
            drop_dir: "/var/lib/certctl/drop".to_owned(),
            drop_dir_watching: false,
            ..Default::default()
        });
        let report = judge(&r, NOW, 21);
        assert_eq!(report.level, Level::Warning);
        assert!(
            report.line().contains("agent: the drop directory"),
            "{}",
            report.line()
        );
        let mut r = resp(vec![target("web", 80)]);
        r.agent = Some(pb::AgentInfo {
            config_reload: Some(pb::ConfigReload {
                accepted: false,
                unix_ms: (NOW - 120) * 1000,
                error: "/etc/certctl/agent.toml: a\n/etc/certctl/agent.toml: b".to_owned(),
            }),
            ..Default::default()
        });
        let report = judge(&r, NOW, 21);
        assert_eq!(report.level, Level::Warning);
        assert!(
            report.line().contains(
                "agent: the last configuration reload was rejected 2m ago: \
                 /etc/certctl/agent.toml: a; /etc/certctl/agent.toml: b"
            ),
            "{}",
            report.line()
        );
        r.agent = Some(pb::AgentInfo {
            config_reload: Some(pb::ConfigReload {
                accepted: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(judge(&r, NOW, 21).level, Level::Ok);
    }
}
