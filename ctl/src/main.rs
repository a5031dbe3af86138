//! `certctl`: the operator CLI. Parses arguments and hands them to
//! `certctl_cli::run`, whose result is the process exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match <certctl_cli::Cli as clap::Parser>::try_parse() {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(certctl_cli::usage_error(&e, std::env::args_os())),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("certctl: cannot start: {e}");
            }
            return ExitCode::from(certctl_cli::exit::INTERNAL);
        }
    };
    ExitCode::from(runtime.block_on(certctl_cli::run(cli)))
}
