//! Command-line arguments of `certctl-agent` (clap). The binary parses them;
//! `xtask` renders the man page `certctl-agent(8)` and the shell completions
//! from the same definitions, so `--help` and the man page never disagree.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Deploys certificates to local servers atomically, reloads and verifies them.
#[derive(Debug, Parser)]
#[command(
    name = "certctl-agent",
    version,
    about = "Deploys certificates to local servers atomically, reloads and verifies them",
    long_about = "Deploys certificates to local servers atomically, reloads and verifies them.\n\n\
        Without a command, runs the agent: serves the certctl control socket (or takes the one \
        systemd passes by socket activation), watches the drop directory and, when configured, \
        serves Prometheus metrics. SIGHUP re-reads the configuration; SIGTERM finishes running \
        deploys and exits 0. Logs go to the journal when stderr is connected to it, else to \
        stderr; CERTCTL_LOG (or RUST_LOG) sets the level, e.g. CERTCTL_LOG=debug.",
    after_help = "Exit status: 0 after SIGTERM, 64 for a configuration error, 1 for any other failure."
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        default_value = crate::config::DEFAULT_PATH,
        env = "CERTCTL_CONFIG",
        value_name = "PATH"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands besides running the agent.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and validate the configuration, print the targets, exit 0 or 64.
    CheckConfig,
    /// Print the systemd drop-in the configured targets need under the hardened unit
    /// (ReadWritePaths=, capabilities, ...), for
    /// /etc/systemd/system/certctl-agent.service.d/targets.conf; exit 0 or 64.
    PrintDropin,
}
