//! Rendering agent messages: short human lines, or JSON with stable field
//! names (documented in `docs/cli.md`).

use std::time::{SystemTime, UNIX_EPOCH};

use certctl_proto::agent::v1 as pb;
use serde_json::{Value, json};

/// `deployed`, `validate_failed`, … (the JSON and human spelling).
pub fn outcome_name(o: i32) -> &'static str {
    match pb::Outcome::try_from(o).unwrap_or(pb::Outcome::Unspecified) {
        pb::Outcome::Unspecified => "unknown",
        pb::Outcome::Deployed => "deployed",
        pb::Outcome::Unchanged => "unchanged",
        pb::Outcome::Rejected => "rejected",
        pb::Outcome::ValidateFailed => "validate_failed",
        pb::Outcome::RolledBack => "rolled_back",
        pb::Outcome::RollbackFailed => "rollback_failed",
        pb::Outcome::Busy => "busy",
        pb::Outcome::Internal => "internal",
        pb::Outcome::DryRun => "dry_run",
        pb::Outcome::Restored => "restored",
    }
}

/// `validated`, `validate-command`, … (the JSON and human spelling).
pub fn stage_name(s: i32) -> &'static str {
    match pb::Stage::try_from(s).unwrap_or(pb::Stage::Unspecified) {
        pb::Stage::Unspecified => "unknown",
        pb::Stage::Validated => "validated",
        pb::Stage::Planned => "planned",
        pb::Stage::Locked => "locked",
        pb::Stage::Staged => "staged",
        pb::Stage::Committed => "committed",
        pb::Stage::ValidateCommand => "validate-command",
        pb::Stage::Reloaded => "reloaded",
        pb::Stage::VerifyAttempt => "verify",
        pb::Stage::Rollback => "rollback",
        pb::Stage::Done => "done",
        pb::Stage::Drift => "drift",
        pb::Stage::Drop => "drop",
    }
}

/// `accepted`, `removed`, `rejected`, … (the JSON and human spelling).
pub fn drop_outcome_name(o: i32) -> &'static str {
    match pb::DropOutcome::try_from(o).unwrap_or(pb::DropOutcome::Unspecified) {
        pb::DropOutcome::Unspecified => "unknown",
        pb::DropOutcome::Accepted => "accepted",
        pb::DropOutcome::Waiting => "waiting",
        pb::DropOutcome::Removed => "removed",
        pb::DropOutcome::Rejected => "rejected",
        pb::DropOutcome::Superseded => "superseded",
        pb::DropOutcome::Withdrawn => "withdrawn",
        pb::DropOutcome::Failed => "failed",
    }
}

/// A drop as JSON; empty strings become `null` where "none" is meant.
pub fn drop_json(d: &pb::DropInfo) -> Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    json!({
        "name": d.name,
        "path": d.path,
        "form": d.form,
        "outcome": drop_outcome_name(d.outcome),
        "reason": opt(&d.reason),
        "targets": d.targets,
        "results": d.results.iter().map(|r| json!({
            "target": r.target,
            "deploy_id": r.deploy_id,
            "outcome": outcome_name(r.outcome),
            "error": r.error,
        })).collect::<Vec<_>>(),
        "rejected_path": opt(&d.rejected_path),
        "cert_sha256": opt(&d.cert_sha256),
    })
}

/// One line for a drop event: `web: drop /var/lib/certctl/drop/web.pem rejected …`
/// (the agent's message names the drop and its outcome).
pub fn drop_line(e: &pb::DeployEvent) -> String {
    let target = if e.target.is_empty() {
        "(no target)"
    } else {
        e.target.as_str()
    };
    format!("{target}: drop {}", e.message)
}

pub fn result_json(r: &pb::DeployResult) -> Value {
    json!({
        "outcome": outcome_name(r.outcome),
        "error": r.error,
        "cert_sha256": r.cert_sha256,
        "not_after_unix": r.not_after_unix,
        "subject": r.subject,
        "verification": r.verification,
        "warnings": r.warnings,
        "duration_ms": r.duration_ms,
        "disk_sha256": r.disk_sha256,
        "served_sha256": r.served_sha256,
        "served_endpoints": r.served_endpoints.iter().map(served_json).collect::<Vec<_>>(),
    })
}

pub fn served_json(c: &pb::ServedCheck) -> Value {
    json!({
        "endpoint": c.endpoint,
        "server_name": c.server_name,
        "protocol": c.protocol,
        "state": c.state,
        "error": c.error,
        "disk_sha256": c.disk_sha256,
        "served_sha256": c.served_sha256,
        "served_chain_sha256": c.served_chain_sha256,
        "served_subject": c.served_subject,
        "served_not_after_unix": c.served_not_after_unix,
        "tls_version": c.tls_version,
        "ca_validated": c.ca_validated,
        "checked_unix_ms": c.checked_unix_ms,
    })
}

fn attempt_json(a: &pb::VerifyAttempt) -> Value {
    json!({
        "attempt": a.attempt,
        "attempts": a.attempts,
        "ok": a.ok,
        "served_sha256": a.served_sha256,
        "want_sha256": a.want_sha256,
        "error": a.error,
        "reason": a.reason,
        "next_in_ms": a.next_in_ms,
        "rollback": a.rollback,
        "endpoint": a.endpoint,
        "matches": a.matches,
        "consecutive": a.consecutive,
    })
}

pub fn event_json(e: &pb::DeployEvent) -> Value {
    let mut v = json!({
        "deploy_id": e.deploy_id,
        "target": e.target,
        "stage": stage_name(e.stage),
        "message": e.message,
        "unix_ms": e.unix_ms,
    });
    if !e.files.is_empty() {
        v["files"] = e
            .files
            .iter()
            .map(|f| {
                json!({
                    "path": f.path,
                    "role": f.role,
                    "sha256": f.sha256,
                    "mode": format!("{:04o}", f.mode),
                    "uid": f.uid,
                    "gid": f.gid,
                    "changed": f.changed,
                    "mode_source": f.mode_source,
                    "owner_source": f.owner_source,
                })
            })
            .collect();
    }
    if let Some(r) = &e.result {
        v["result"] = result_json(r);
    }
    if let Some(a) = &e.attempt {
        v["attempt"] = attempt_json(a);
    }
    if let Some(c) = &e.served {
        v["served"] = served_json(c);
    }
    if let Some(d) = &e.drop {
        v["drop"] = drop_json(d);
    }
    v
}

/// An event's message without the stage name it may start with: the
/// stage is printed before it, so `verify attempt 2/3` under the stage
/// `verify` reads `attempt 2/3`.
pub fn event_message<'a>(stage: &str, message: &'a str) -> &'a str {
    message
        .strip_prefix(stage)
        .and_then(|m| m.strip_prefix(' '))
        .filter(|m| !m.is_empty())
        .unwrap_or(message)
}

/// `root:caddy`: the names of a file's owner and group on this host (the
/// agent's), each falling back to its number when the host has no name
/// for it; `root` or `:caddy` when only one is set.
pub fn owner(uid: Option<u32>, gid: Option<u32>) -> String {
    let user = uid.map(|u| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
            .ok()
            .flatten()
            .map_or_else(|| u.to_string(), |u| u.name)
    });
    let group = gid.map(|g| {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g))
            .ok()
            .flatten()
            .map_or_else(|| g.to_string(), |g| g.name)
    });
    match (user, group) {
        (Some(u), Some(g)) => format!("{u}:{g}"),
        (Some(u), None) => u,
        (None, Some(g)) => format!(":{g}"),
        (None, None) => "agent's user".to_owned(),
    }
}

/// Who asked for a deploy or rollback, as the journal records it
/// (`cli uid=1000(alice) pid=4242`, `drop /var/lib/certctl/drop/web.pem`),
/// taken apart.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `cli`, `drop`, or the first word of another origin.
    pub via: String,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub pid: Option<i32>,
    /// The drop a drop deploy came from.
    pub drop: Option<String>,
}

impl Origin {
    pub fn parse(text: &str) -> Origin {
        let (via, rest) = text.split_once(' ').unwrap_or((text, ""));
        let mut o = Origin {
            via: via.to_owned(),
            ..Origin::default()
        };
        if via == "drop" {
            o.drop = (!rest.is_empty()).then(|| rest.to_owned());
            return o;
        }
        for word in rest.split_whitespace() {
            if let Some(v) = word.strip_prefix("uid=") {
                let (num, user) = match v.split_once('(') {
                    Some((n, u)) => (n, u.strip_suffix(')')),
                    None => (v, None),
                };
                o.uid = num.parse().ok();
                o.user = user.map(str::to_owned);
            } else if let Some(v) = word.strip_prefix("pid=") {
                o.pid = v.parse().ok();
            }
        }
        o
    }

    pub fn json(&self) -> Value {
        json!({
            "via": self.via,
            "uid": self.uid,
            "user": self.user,
            "pid": self.pid,
            "drop": self.drop,
        })
    }

    /// `alice (uid 1000, pid 4242)`, `drop /var/lib/certctl/drop/web.pem`.
    pub fn text(&self, raw: &str) -> String {
        if let Some(d) = &self.drop {
            return format!("drop {d}");
        }
        let Some(uid) = self.uid else {
            return if raw.is_empty() {
                "-".to_owned()
            } else {
                raw.to_owned()
            };
        };
        let pid = self.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
        match &self.user {
            Some(u) => format!("{u} (uid {uid}{pid})"),
            None => format!(
                "uid {uid}{}",
                self.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        }
    }
}

/// `9f3a12…e1c2`.
/// A target's kind as the tables show it: with the remote host its files
/// are on (`nginx on deploy@edge1:22`).
pub fn kind_on(kind: &str, host: &str) -> String {
    if host.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind} on {host}")
    }
}

pub fn short(hex: &str) -> String {
    if hex.len() <= 12 {
        hex.to_owned()
    } else {
        format!("{}…{}", &hex[..6], &hex[hex.len() - 4..])
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `42s ago`, `3m ago`, `in 41d`: see [`span`].
pub fn relative(unix: i64) -> String {
    relative_to(unix, now_unix())
}

/// [`relative`] as seen at `now`.
pub fn relative_to(unix: i64, now: i64) -> String {
    let delta = unix - now;
    let amount = span(delta.unsigned_abs());
    if delta > 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// A length of time in one unit, rounded down, each unit used from its
/// first whole count on: seconds below a minute, minutes below an hour,
/// hours below two days, then days. So a longer time never reads shorter.
pub fn span(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3_599 => format!("{}m", secs / 60),
        3_600..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Prints rows as left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_one_unit_and_never_read_shorter_for_longer_times() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (75, "1m"),
            (90, "1m"),
            (3_599, "59m"),
            (3_600, "1h"),
            (172_799, "47h"),
            (172_800, "2d"),
            (89 * 86_400 + 5, "89d"),
        ];
        for (secs, want) in cases {
            assert_eq!(span(secs), want, "{secs}s");
        }
        assert_eq!(relative_to(100, 25), "in 1m");
        assert_eq!(relative_to(25, 100), "1m ago");
    }

    #[test]
    fn an_event_message_does_not_repeat_its_stage() {
        assert_eq!(
            event_message("verify", "verify attempt 1/3: ok"),
            "attempt 1/3: ok"
        );
        assert_eq!(event_message("verify", "verified"), "verified");
        assert_eq!(event_message("drop", "drop"), "drop");
        assert_eq!(event_message("done", "deployed"), "deployed");
    }

    #[test]
    fn owners_are_named_with_numbers_as_fallback() {
        assert_eq!(owner(Some(0), Some(0)), "root:root");
        assert_eq!(owner(Some(0), None), "root");
        assert_eq!(
            owner(Some(4_000_000_000), Some(4_000_000_001)),
            "4000000000:4000000001"
        );
        assert_eq!(owner(None, None), "agent's user");
    }

    #[test]
    fn origins_are_taken_apart() {
        let cli = Origin::parse("cli uid=1000(alice) pid=4242");
        assert_eq!(
            cli,
            Origin {
                via: "cli".to_owned(),
                uid: Some(1000),
                user: Some("alice".to_owned()),
                pid: Some(4242),
                drop: None,
            }
        );
        assert_eq!(cli.text(""), "alice (uid 1000, pid 4242)");
        let bare = Origin::parse("cli uid=0");
        assert_eq!(
            (bare.uid, bare.user.as_deref(), bare.pid),
            (Some(0), None, None)
        );
        assert_eq!(bare.text(""), "uid 0");
        let drop = Origin::parse("drop /var/lib/certctl/drop/web.pem");
        assert_eq!(drop.via, "drop");
        assert_eq!(drop.drop.as_deref(), Some("/var/lib/certctl/drop/web.pem"));
        assert_eq!(drop.text(""), "drop /var/lib/certctl/drop/web.pem");
        assert_eq!(Origin::parse("").text(""), "-");
        assert_eq!(Origin::parse("recovery").text("recovery"), "recovery");
    }
}
