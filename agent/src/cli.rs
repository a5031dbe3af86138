//! Command-line arguments of `certctl-agent` (clap). The binary parses them;
//! `xtask` renders the man page `certctl-agent(1)` and the shell completions
//! from the same definitions, so `--help` and the man page never disagree.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit status (`--help`, and the man pages' EXIT STATUS, which xtask
/// renders from this text).
pub const EXIT_STATUS: &str = "\
Exit status:
  0   stopped by SIGTERM after running deploys finished; check-config: the configuration is valid
  1   any other failure (the log says which): the socket cannot be bound, the state directory cannot be used
  64  configuration error (EX_USAGE): the message names the file, the key and what is wrong";

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
    after_help = EXIT_STATUS
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
    #[command(after_help = EXIT_STATUS)]
    CheckConfig,
    /// Print the systemd drop-in the configured targets need under the hardened unit
    /// (ReadWritePaths=, capabilities, ...), for
    /// /etc/systemd/system/certctl-agent.service.d/targets.conf; exit 0 or 64.
    #[command(after_help = EXIT_STATUS)]
    PrintDropin,
}
