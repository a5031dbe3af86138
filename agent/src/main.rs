//! `certctl-agent`: parse arguments, set up logging, run, map errors to exit
//! codes. Everything else lives in the `certctl_agent` library.

use std::process::ExitCode;

use certctl_agent::cli::{Cli, Command};
use clap::Parser;

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// Threads for blocking work (file I/O, journal writes), tokio's default
/// being 512. A burst of drops starts a deploy per target at once, and
/// each waits its turn at the journal on a blocking thread: with the
/// default, 1,000 drops took the agent to 516 threads and 207 MiB, kept
/// after the burst. More threads than this do not make the journal or the
/// disk faster; excess work queues instead (docs/performance.md).
const BLOCKING_THREADS: usize = 32;

/// jemalloc, configured at build time (`.cargo/config.toml`): glibc's
/// allocator keeps what a burst of deploys freed in per-thread arenas, and
/// an idle agent stayed at twice the memory it uses (docs/performance.md,
/// "Memory after a burst").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        Some(Command::PrintDropin) => {
            #[allow(clippy::print_stdout)]
            {
                print!(
                    "{}",
                    certctl_agent::dropin::plan(&config).render(&config.path)
                );
            }
            ExitCode::SUCCESS
        }
        None => {
            certctl_agent::logging::init();
            // Before the runtime starts threads: taking the socket edits the
            // environment (LISTEN_FDS/LISTEN_PID are not passed on).
            let activated = match certctl_agent::systemd::take_activated_socket() {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(BLOCKING_THREADS)
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(certctl_agent::daemon::run(config, &cli.config, activated)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
