//! Command-line arguments (clap). `--help` of every command is generated
//! from these doc comments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit status of every command but `status --check` (`--help`, and the man
/// pages' EXIT STATUS, which xtask renders from this text).
pub const EXIT_STATUS: &str = "\
Exit status:
  0  done: deployed, unchanged, dry run, restored; verify: served
  1  internal or unexpected error
  2  usage error: bad arguments, unreadable or oversized input file
  3  input rejected: bad PEM, key mismatch, expired, unknown target
  4  validate command failed; previous files restored, no reload
  5  reload or verification failed; rolled back and re-verified (verify: not served)
  6  rollback failed: operator action needed
  7  agent unreachable or permission denied
  8  target busy and --no-wait given
status --check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.";

/// Exit status of `certctl status`.
pub const STATUS_EXIT_STATUS: &str = "\
Exit status:
  0  the status was printed (without --check); with --check: OK
  1  with --check: WARNING (a certificate expires within --warn-days, an endpoint was unreachable, the last deploy, drop or configuration reload failed)
  2  with --check: CRITICAL (a certificate missing, unreadable or expired, another one served, a failed rollback); without: usage error
  3  with --check: UNKNOWN (agent unreachable, permission denied, unknown target, bad arguments)
  7  without --check: agent unreachable or permission denied";

/// Exit status of the read-only commands (`targets`, `history`, `watch`).
pub const READ_EXIT_STATUS: &str = "\
Exit status:
  0  done (watch: the agent stopped the stream)
  1  internal or unexpected error
  2  usage error
  3  unknown target
  7  agent unreachable or permission denied";

/// Operator CLI of the certctl agent: deploy certificates, inspect targets.
#[derive(Debug, Parser)]
#[command(name = "certctl", version, after_help = EXIT_STATUS)]
pub struct Cli {
    /// The agent's control socket.
    #[arg(
        long,
        global = true,
        env = "CERTCTL_SOCKET",
        default_value = "/run/certctl/agent.sock"
    )]
    pub socket: PathBuf,
    /// Machine output: one JSON document, or one JSON object per line for streams.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deploy a certificate, its chain and key to a target; streams each stage.
    #[command(after_help = EXIT_STATUS)]
    Deploy(DeployArgs),
    /// Agent health and, per target, the certificate on disk and the last result.
    #[command(after_help = STATUS_EXIT_STATUS)]
    Status(StatusArgs),
    /// Configured targets and their kinds, files and commands.
    #[command(after_help = READ_EXIT_STATUS)]
    Targets(TargetsArgs),
    /// Stream every deploy and drop-directory event of the agent until interrupted.
    #[command(after_help = READ_EXIT_STATUS)]
    Watch(WatchArgs),
    /// Put the previous certificate set back, reload, and verify it is served.
    #[command(after_help = EXIT_STATUS)]
    Rollback(RollbackArgs),
    /// Past deploys and rollbacks, newest first, from the agent's journal.
    #[command(after_help = READ_EXIT_STATUS)]
    History(HistoryArgs),
    /// Probe the target's endpoint now and compare what it serves with the
    /// certificate on disk (exit 0 match, 5 mismatch or unreachable).
    #[command(after_help = EXIT_STATUS)]
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Target name, as configured in the agent.
    pub target: String,
    /// Skip the TLS check of the served certificate after the reload.
    #[arg(long)]
    pub no_verify: bool,
    /// Fail with exit code 8 instead of waiting when the target is busy.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// Only the names, one a line (what the shell completions offer): from
    /// the agent, or from its configuration file when the agent cannot be
    /// asked.
    #[arg(long)]
    pub names: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only the events of these targets (all when none is given).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only this target.
    pub target: Option<String>,
    /// How many entries, newest first (at most 10000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Target name, as configured in the agent.
    pub target: String,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Target name, as configured in the agent.
    pub target: String,
    /// Certificate (PEM): the leaf, optionally followed by its chain; or a
    /// whole bundle (key, leaf and chain in any order) when --key is omitted.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Intermediate certificates (PEM), in any order.
    #[arg(long, value_name = "FILE")]
    pub chain: Option<PathBuf>,
    /// Check the input and show what would be written; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the TLS check of the served certificate after the reload.
    #[arg(long)]
    pub no_verify: bool,
    /// Install without reloading or verifying (the server is not running
    /// yet): write the files atomically, run the validate command, stop.
    #[arg(long)]
    pub no_reload: bool,
    /// Fail with exit code 8 instead of waiting when the target is busy.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only these targets (all when none is given).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Print the agent's Prometheus metrics (text exposition format) instead:
    /// the same text as its metrics_listen endpoint, over the control socket.
    #[arg(long, conflicts_with_all = ["targets", "check"])]
    pub prometheus: bool,
    /// Judge the status as a monitoring plugin: print one summary line and
    /// exit 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN.
    #[arg(long)]
    pub check: bool,
    /// With --check: WARNING when a certificate expires within this many days.
    #[arg(long, value_name = "DAYS", default_value_t = 21, requires = "check")]
    pub warn_days: u32,
}
