//! `certctl-agent`: parse arguments, set up logging, run, map errors to exit
//! codes. Everything else lives in the `certctl_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "certctl-agent",
    version,
    about = "Deploys certificates to local servers atomically, reloads and verifies them"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        default_value = "/etc/certctl/agent.toml",
        env = "CERTCTL_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate the configuration, print the targets, exit 0 or 64.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match certctl_agent::config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("certctl-agent: {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            #[allow(clippy::print_stdout)]
            {
                print!("{}", certctl_agent::check::describe(&config));
            }
            ExitCode::SUCCESS
        }
        None => {
            certctl_agent::logging::init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(certctl_agent::daemon::run(config, &cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
