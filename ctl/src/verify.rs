//! `certctl verify`: probe a target's endpoint now and compare what it
//! serves with the certificate on disk.

use certctl_proto::agent::v1 as pb;
use serde_json::json;

use crate::cli::{Cli, VerifyArgs};
use crate::client::{self, CliError};
use crate::exit;
use crate::output::{relative, served_json, short};

pub async fn run(cli: &Cli, args: &VerifyArgs) -> Result<u8, CliError> {
    let mut client = client::connect(&cli.socket).await?;
    let resp = client
        .verify(pb::VerifyRequest {
            target: args.target.clone(),
        })
        .await?
        .into_inner();
    let checks: Vec<pb::ServedCheck> = if resp.checks.is_empty() {
        resp.check.iter().cloned().collect()
    } else {
        resp.checks.clone()
    };
    let served = |c: &pb::ServedCheck| matches!(c.state.as_str(), "verified" | "expiring");
    let code = if !checks.is_empty() && checks.iter().all(served) {
        exit::OK
    } else {
        exit::ROLLED_BACK
    };
    if cli.json {
        let check = resp.check.clone().unwrap_or_default();
        println!(
            "{}",
            json!({
                "target": resp.target,
                "check": served_json(&check),
                "checks": checks.iter().map(served_json).collect::<Vec<_>>(),
                "exit_code": code,
            })
        );
        return Ok(code);
    }
    for check in &checks {
        print_check(&resp.target, check);
    }
    Ok(code)
}

/// What one endpoint served, as an operator reads it.
fn print_check(target: &str, check: &pb::ServedCheck) {
    let sni = if check.server_name.is_empty() {
        "no SNI".to_owned()
    } else {
        format!("SNI {}", check.server_name)
    };
    println!(
        "{}: {} {} ({sni}, {}{})",
        target,
        check.state,
        check.endpoint,
        check.protocol,
        if check.tls_version.is_empty() {
            String::new()
        } else {
            format!(", {}", check.tls_version)
        }
    );
    println!("    on disk  {}", check.disk_sha256);
    if check.served_sha256.is_empty() {
        println!("    served   nothing");
    } else {
        println!(
            "    served   {} {}, expires {}",
            check.served_sha256,
            check.served_subject,
            relative(check.served_not_after_unix)
        );
        let chain: Vec<String> = check.served_chain_sha256.iter().map(|h| short(h)).collect();
        println!(
            "    chain    {} intermediate(s){}{}",
            chain.len(),
            if chain.is_empty() { "" } else { ": " },
            chain.join(", ")
        );
        if check.ca_validated {
            println!("    trust    chain and name validated against verify.ca_file");
        }
    }
    if !check.error.is_empty() {
        eprintln!("certctl: verify {}: {}", target, check.error);
    }
}
