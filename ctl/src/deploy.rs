//! `certctl deploy`: read the input files, stream the agent's stages as they
//! happen, exit with the code of the outcome.

use certctl_proto::agent::v1 as pb;
use tokio_stream::StreamExt;

use crate::cli::{Cli, DeployArgs};
use crate::client::{self, CliError};
use crate::exit;
use crate::output::{self, event_json, outcome_name, stage_name};

/// Largest input file read (the agent enforces the same limit).
const MAX_INPUT: u64 = 1024 * 1024;

/// Reads an input file with a hard limit: opened without blocking (a FIFO
/// with no writer does not hang), refused unless it is a regular file
/// (`/dev/zero` reports size 0 and never ends), and read up to the limit
/// plus one byte, so nothing larger is ever allocated.
fn read_input(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot =
        |e: std::io::Error| CliError::Usage(format!("cannot read {flag} {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        return Err(CliError::Usage(format!(
            "{flag} {} is {what}: give the certificate or key file itself",
            path.display()
        )));
    }
    if meta.len() > MAX_INPUT {
        return Err(CliError::Usage(format!(
            "{flag} {} is {} bytes: that is not a certificate or key file (limit {MAX_INPUT})",
            path.display(),
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_INPUT + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(CliError::Usage(format!(
            "{flag} {} grew past {MAX_INPUT} bytes while it was read: that is not a certificate \
             or key file",
            path.display()
        )));
    }
    Ok(bytes)
}

pub async fn run(cli: &Cli, args: &DeployArgs) -> Result<u8, CliError> {
    let request = pb::DeployRequest {
        target: args.target.clone(),
        cert_pem: read_input("--cert", &args.cert)?,
        key_pem: match &args.key {
            Some(p) => read_input("--key", p)?,
            None => Vec::new(),
        },
        chain_pem: match &args.chain {
            Some(p) => read_input("--chain", p)?,
            None => Vec::new(),
        },
        dry_run: args.dry_run,
        no_verify: args.no_verify,
        no_reload: args.no_reload,
        no_wait: args.no_wait,
    };
    let mut client = client::connect(&cli.socket).await?;
    let stream = client.deploy(request).await?.into_inner();
    follow(cli, "deploy", &args.target, stream).await
}

/// Prints the events of a deploy or rollback as they arrive and returns the
/// exit code of its outcome.
pub async fn follow(
    cli: &Cli,
    what: &str,
    target: &str,
    mut stream: tonic::Streaming<pb::DeployEvent>,
) -> Result<u8, CliError> {
    while let Some(event) = stream.next().await {
        let event = event?;
        if cli.json {
            println!("{}", event_json(&event));
        } else {
            print_human(&event);
        }
        if let Some(result) = event.result {
            let outcome = pb::Outcome::try_from(result.outcome).unwrap_or(pb::Outcome::Unspecified);
            if !result.error.is_empty() && !cli.json {
                eprintln!(
                    "certctl: {what} {}: {}: {}",
                    event.target,
                    outcome_name(result.outcome),
                    result.error
                );
            }
            return Ok(exit::for_outcome(outcome));
        }
    }
    Err(CliError::Internal(format!(
        "the agent closed the stream before the {what} of {target} finished: check `certctl status {target}` and the agent's log"
    )))
}

fn print_human(e: &pb::DeployEvent) {
    let stage = stage_name(e.stage);
    match &e.result {
        None => {
            println!(
                "{}: {stage:<16} {}",
                e.target,
                output::event_message(stage, &e.message)
            );
            for f in e.files.iter() {
                let owner = output::owner(f.uid, f.gid);
                println!(
                    "    {} {:<5} {} mode {:04o} ({}) owner {owner} ({}){}",
                    if f.changed { "write" } else { "keep " },
                    f.role,
                    f.path,
                    f.mode,
                    f.mode_source,
                    f.owner_source,
                    if f.changed { "" } else { ", already identical" }
                );
            }
        }
        Some(r) => {
            for w in &r.warnings {
                println!("{}: warning          {w}", e.target);
            }
            let summary = match pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified)
            {
                pb::Outcome::Deployed => format!(
                    "deployed {} ({}) in {}ms, {}",
                    output::short(&r.cert_sha256),
                    r.subject,
                    r.duration_ms,
                    r.verification
                ),
                pb::Outcome::Unchanged => format!(
                    "unchanged: {} is already deployed; nothing written, no reload, {}",
                    output::short(&r.cert_sha256),
                    r.verification
                ),
                pb::Outcome::DryRun => "dry run: nothing was changed".to_owned(),
                pb::Outcome::Restored => format!(
                    "restored {} ({}) in {}ms, {}",
                    output::short(&r.cert_sha256),
                    r.subject,
                    r.duration_ms,
                    r.verification
                ),
                _ => outcome_name(r.outcome).to_owned(),
            };
            println!("{}: {stage:<16} {summary}", e.target);
        }
    }
}
