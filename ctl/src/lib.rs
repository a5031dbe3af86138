//! The `certctl` operator CLI: talks to the local agent over its Unix
//! socket, prints short human output or stable JSON, and exits with the
//! codes of the contract (see [`exit`]).
#![forbid(unsafe_code)]
// This crate is a command-line program: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod check;
pub mod cli;
pub mod client;
pub mod deploy;
pub mod exit;
pub mod inspect;
pub mod output;
pub mod rollback;
pub mod verify;

pub use cli::Cli;

/// Runs one command and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    let result = match &cli.command {
        cli::Command::Deploy(args) => deploy::run(&cli, args).await,
        cli::Command::Status(args) => inspect::status(&cli, args).await,
        cli::Command::Targets => inspect::targets(&cli).await,
        cli::Command::Watch => inspect::watch(&cli).await,
        cli::Command::Rollback(args) => rollback::run(&cli, args).await,
        cli::Command::Verify(args) => verify::run(&cli, args).await,
        cli::Command::History(args) => inspect::history(&cli, args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": e.to_string(), "exit_code": e.code() })
                );
            }
            eprintln!("certctl: {e}");
            e.code()
        }
    }
}
