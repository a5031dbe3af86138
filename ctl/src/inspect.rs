//! `certctl status` (also `--prometheus`), `certctl targets` and
//! `certctl watch`: read-only views.

use certctl_proto::agent::v1 as pb;
use certctl_proto::agent::v1::agent_client::AgentClient;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::cli::{Cli, HistoryArgs, StatusArgs, WatchArgs};
use crate::client::{self, CliError};
use crate::exit;
use crate::output::{
    self, drop_json, drop_line, drop_outcome_name, event_json, outcome_name, relative, served_json,
    stage_name, table,
};

/// The agent's status of `targets` (every target when empty), in the
/// order the agent lists them; a name it does not know is an error that
/// lists the configured ones, as the agent says it for one name.
pub async fn fetch_status(
    client: &mut AgentClient<Channel>,
    targets: &[String],
) -> Result<pb::StatusResponse, CliError> {
    let one = match targets {
        [one] => one.clone(),
        _ => String::new(),
    };
    let mut resp = client
        .status(pb::StatusRequest { target: one })
        .await?
        .into_inner();
    if targets.len() > 1 {
        if let Some(unknown) = targets
            .iter()
            .find(|n| !resp.targets.iter().any(|t| &t.name == *n))
        {
            let configured: Vec<&str> = resp.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(CliError::Status(
                format!(
                    "unknown target \"{unknown}\" (configured: {})",
                    configured.join(", ")
                ),
                tonic::Code::NotFound,
            ));
        }
        resp.targets.retain(|t| targets.contains(&t.name));
    }
    Ok(resp)
}

pub async fn status(cli: &Cli, args: &StatusArgs) -> Result<u8, CliError> {
    if args.check {
        return Ok(crate::check::run(cli, args).await);
    }
    if args.prometheus && cli.json {
        return Err(CliError::Usage(
            "--prometheus cannot be used with --json: the metrics are text in the Prometheus \
             exposition format; drop one of them"
                .to_owned(),
        ));
    }
    let mut client = client::connect(&cli.socket).await?;
    if args.prometheus {
        let text = client
            .metrics(pb::MetricsRequest {})
            .await?
            .into_inner()
            .text;
        print!("{text}");
        return Ok(exit::OK);
    }
    let resp = fetch_status(&mut client, &args.targets).await?;
    let agent = resp.agent.unwrap_or_default();
    if cli.json {
        let targets: Vec<_> = resp
            .targets
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "kind": t.kind,
                    "host": (!t.host.is_empty()).then_some(&t.host),
                    "cert_path": t.cert_path,
                    "cert_sha256": t.cert_sha256,
                    "not_after_unix": t.not_after_unix,
                    "subject": t.subject,
                    "disk_state": t.disk_state,
                    "verification": t.verification,
                    "busy": t.busy,
                    "served": t.served.as_ref().map(served_json),
                    "served_endpoints": t.served_endpoints.iter().map(served_json).collect::<Vec<_>>(),
                    "last": t.last.as_ref().map(|l| json!({
                        "deploy_id": l.deploy_id,
                        "outcome": outcome_name(l.outcome),
                        "finished_unix_ms": l.finished_unix_ms,
                        "error": l.error,
                        "cert_sha256": l.cert_sha256,
                    })),
                    "last_drop": t.last_drop.as_ref().map(|l| {
                        let mut v = l.drop.as_ref().map(drop_json).unwrap_or_else(|| json!({}));
                        v["message"] = json!(l.message);
                        v["unix_ms"] = json!(l.unix_ms);
                        v
                    }),
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "agent": {
                    "version": agent.version,
                    "pid": agent.pid,
                    "started_unix": agent.started_unix,
                    "config_path": agent.config_path,
                    "socket": agent.socket,
                    "drop_dir": agent.drop_dir,
                    "drops_pending": agent.drops_pending,
                    "drops_in_flight": agent.drops_in_flight,
                    "rejected_dir": agent.rejected_dir,
                    "drop_dir_watching": agent.drop_dir_watching,
                    "config_reload": agent.config_reload.as_ref().map(|r| json!({
                        "accepted": r.accepted,
                        "unix_ms": r.unix_ms,
                        "error": (!r.error.is_empty()).then_some(&r.error),
                    })),
                },
                "targets": targets,
            })
        );
        return Ok(exit::OK);
    }
    println!(
        "agent {} (pid {}), up since {}, config {}, {} target(s)",
        agent.version,
        agent.pid,
        relative(agent.started_unix),
        agent.config_path,
        resp.targets.len()
    );
    match &agent.config_reload {
        None => {}
        Some(r) if r.accepted => println!(
            "config: last reload (SIGHUP) accepted {}",
            relative(r.unix_ms / 1000)
        ),
        Some(r) => {
            println!(
                "config: last reload (SIGHUP) REJECTED {}, the previous configuration stays in \
                 force; fix the file (certctl-agent check-config) and reload again:",
                relative(r.unix_ms / 1000)
            );
            for line in r.error.lines() {
                println!("    {line}");
            }
        }
    }
    if !agent.drop_dir.is_empty() && !agent.drop_dir_watching {
        println!(
            "drops: NOT WATCHING {}: the directory is gone or was replaced; drops are not taken \
             until it is back (the agent watches it again by itself)",
            agent.drop_dir
        );
    }
    if !agent.drop_dir.is_empty() {
        println!(
            "drops: {} ({} waiting, {} in progress), rejected ones go to {}",
            agent.drop_dir, agent.drops_pending, agent.drops_in_flight, agent.rejected_dir
        );
    }
    if resp.targets.is_empty() {
        return Ok(exit::OK);
    }
    let mut rows = vec![
        [
            "TARGET",
            "KIND",
            "ON DISK",
            "EXPIRES",
            "SERVED",
            "LAST DEPLOY",
            "LAST DROP",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for t in &resp.targets {
        let disk = if t.cert_sha256.is_empty() {
            t.disk_state.clone()
        } else {
            format!("{} {}", output::short(&t.cert_sha256), t.subject)
        };
        let expires = if t.not_after_unix == 0 {
            "-".to_owned()
        } else {
            relative(t.not_after_unix)
        };
        let mut last = match &t.last {
            None => "none since agent start".to_owned(),
            Some(l) => format!(
                "{} {}",
                outcome_name(l.outcome),
                relative(l.finished_unix_ms / 1000)
            ),
        };
        if t.busy {
            last = format!("deploying now; {last}");
        }
        let last_drop = match &t.last_drop {
            None => "-".to_owned(),
            Some(l) => format!(
                "{} {}",
                l.drop
                    .as_ref()
                    .map_or("unknown", |d| drop_outcome_name(d.outcome)),
                relative(l.unix_ms / 1000)
            ),
        };
        rows.push(vec![
            t.name.clone(),
            output::kind_on(&t.kind, &t.host),
            disk,
            expires,
            t.verification.clone(),
            last,
            last_drop,
        ]);
    }
    print!("{}", table(&rows));
    for t in &resp.targets {
        if let Some(l) = &t.last
            && !l.error.is_empty()
        {
            println!("{}: last error: {}", t.name, l.error);
        }
        // One line per endpoint that failed at the last probe; with
        // several endpoints, one line per endpoint.
        let checks: Vec<&pb::ServedCheck> = if t.served_endpoints.is_empty() {
            t.served.iter().collect()
        } else {
            t.served_endpoints.iter().collect()
        };
        for c in &checks {
            if !c.error.is_empty() {
                println!(
                    "{}: {} at the last probe ({}): {}",
                    t.name,
                    c.state,
                    relative(c.checked_unix_ms / 1000),
                    c.error
                );
            } else if checks.len() > 1 {
                println!(
                    "{}: {} {} serves {} ({})",
                    t.name,
                    c.state,
                    c.endpoint,
                    output::short(&c.served_sha256),
                    relative(c.checked_unix_ms / 1000)
                );
            }
        }
        if let Some(l) = &t.last_drop {
            println!("{}: last drop: {}", t.name, l.message);
        }
    }
    Ok(exit::OK)
}

pub async fn history(cli: &Cli, args: &HistoryArgs) -> Result<u8, CliError> {
    let mut client = client::connect(&cli.socket).await?;
    let resp = client
        .history(pb::HistoryRequest {
            target: args.target.clone().unwrap_or_default(),
            limit: args.limit,
        })
        .await?
        .into_inner();
    if cli.json {
        let entries: Vec<_> = resp
            .entries
            .iter()
            .map(|e| {
                json!({
                    "deploy_id": e.deploy_id,
                    "target": e.target,
                    "op": e.op,
                    "origin": e.origin,
                    "by": output::Origin::parse(&e.origin).json(),
                    "started_unix_ms": e.started_unix_ms,
                    "finished_unix_ms": (e.finished_unix_ms != 0).then_some(e.finished_unix_ms),
                    "outcome": (e.finished_unix_ms != 0).then(|| outcome_name(e.outcome)),
                    "last_stage": e.last_stage,
                    "error": e.error,
                    "cert_sha256": e.cert_sha256,
                    "prev_sha256": e.prev_sha256,
                    "verification": e.verification,
                    "disk_sha256": e.disk_sha256,
                    "served_sha256": e.served_sha256,
                    "recovered": e.recovered,
                    "stages": e.stages.iter().map(|s| json!({
                        "unix_ms": s.unix_ms,
                        "stage": s.stage,
                        "message": s.message,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", json!({ "history": entries }));
        return Ok(exit::OK);
    }
    if resp.entries.is_empty() {
        println!("no deploys recorded");
        return Ok(exit::OK);
    }
    let mut rows = vec![
        ["WHEN", "TARGET", "ID", "OP", "RESULT", "CERT", "TOOK", "BY"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for e in &resp.entries {
        let result = if e.finished_unix_ms == 0 {
            format!("running ({})", e.last_stage)
        } else if e.recovered {
            format!("{} (recovered)", outcome_name(e.outcome))
        } else {
            outcome_name(e.outcome).to_owned()
        };
        let took = if e.finished_unix_ms == 0 {
            "-".to_owned()
        } else {
            format!("{}ms", e.finished_unix_ms - e.started_unix_ms)
        };
        rows.push(vec![
            relative(e.started_unix_ms / 1000),
            e.target.clone(),
            e.deploy_id.clone(),
            e.op.clone(),
            result,
            if e.cert_sha256.is_empty() {
                "-".to_owned()
            } else {
                output::short(&e.cert_sha256)
            },
            took,
            output::Origin::parse(&e.origin).text(&e.origin),
        ]);
    }
    print!("{}", table(&rows));
    for e in &resp.entries {
        if !e.error.is_empty() {
            println!("{} {}: {}", e.deploy_id, e.target, e.error);
        }
    }
    Ok(exit::OK)
}

pub async fn targets(cli: &Cli) -> Result<u8, CliError> {
    let mut client = client::connect(&cli.socket).await?;
    let resp = client.targets(pb::TargetsRequest {}).await?.into_inner();
    if cli.json {
        let targets: Vec<_> = resp
            .targets
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "kind": t.kind,
                    "host": (!t.host.is_empty()).then_some(&t.host),
                    "layout": t.layout,
                    "cert_path": t.cert_path,
                    "key_path": t.key_path,
                    "chain_path": (!t.chain_path.is_empty()).then_some(&t.chain_path),
                    "drop": t.drop,
                    "validate": t.validate,
                    "reload": t.reload,
                    "reload_hook": (!t.reload_hook.is_empty()).then_some(&t.reload_hook),
                    "verify_endpoint": (!t.verify_endpoint.is_empty()).then_some(&t.verify_endpoint),
                    "verify_endpoints": t.verify_endpoints,
                })
            })
            .collect();
        println!("{}", json!({ "targets": targets }));
        return Ok(exit::OK);
    }
    let mut rows = vec![
        ["TARGET", "KIND", "CERT", "KEY", "RELOAD"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for t in &resp.targets {
        rows.push(vec![
            t.name.clone(),
            output::kind_on(&t.kind, &t.host),
            t.cert_path.clone(),
            t.key_path.clone(),
            if !t.reload_hook.is_empty() {
                t.reload_hook.clone()
            } else if t.reload.is_empty() {
                "-".to_owned()
            } else {
                t.reload.join(" ")
            },
        ]);
    }
    print!("{}", table(&rows));
    Ok(exit::OK)
}

pub async fn watch(cli: &Cli, args: &WatchArgs) -> Result<u8, CliError> {
    let mut client = client::connect(&cli.socket).await?;
    if !args.targets.is_empty() {
        let configured: Vec<String> = client
            .targets(pb::TargetsRequest {})
            .await?
            .into_inner()
            .targets
            .into_iter()
            .map(|t| t.name)
            .collect();
        if let Some(unknown) = args.targets.iter().find(|n| !configured.contains(n)) {
            return Err(CliError::Status(
                format!(
                    "unknown target \"{unknown}\" (configured: {})",
                    configured.join(", ")
                ),
                tonic::Code::NotFound,
            ));
        }
    }
    let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
    while let Some(event) = stream.next().await {
        let event = event?;
        if !args.targets.is_empty() && !args.targets.contains(&event.target) {
            continue;
        }
        if cli.json {
            println!("{}", event_json(&event));
        } else if event.drop.is_some() {
            println!("{}", drop_line(&event));
        } else {
            let stage = stage_name(event.stage);
            println!(
                "{} {}: {} {}",
                if event.deploy_id.is_empty() {
                    "-"
                } else {
                    &event.deploy_id
                },
                event.target,
                stage,
                output::event_message(stage, &event.message)
            );
        }
    }
    Ok(exit::OK)
}
