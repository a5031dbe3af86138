//! The `certctl` operator CLI: talks to the local agent over its Unix
//! socket, prints short human output or stable JSON, and exits with the
//! codes of the contract (see [`exit`]).
#![forbid(unsafe_code)]
// This crate is a command-line program: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod check;
pub mod cli;
pub mod client;
pub mod complete;
pub mod deploy;
pub mod exit;
pub mod inspect;
pub mod output;
pub mod rollback;
pub mod verify;

pub use cli::Cli;

/// Reports a command line clap refused (or `--help`, `--version`) and
/// returns the exit code. The usage line clap prints leaves out
/// `--socket`: it has a default, so it is never required. With `--json`
/// among the arguments, stdout carries `{"error", "exit_code"}` as for
/// every other failure, and stderr the usual text.
pub fn usage_error(e: &clap::Error, args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    use clap::error::ErrorKind;
    let code = u8::try_from(e.exit_code()).unwrap_or(exit::USAGE);
    let text = e.render().to_string();
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        print!("{text}");
        return code;
    }
    let text: String = text
        .split_inclusive('\n')
        .map(|line| {
            if line.starts_with("Usage: ") {
                line.replace(" --socket <SOCKET>", "")
            } else {
                line.to_owned()
            }
        })
        .collect();
    let words: Vec<std::ffi::OsString> =
        args.into_iter().skip(1).take_while(|a| a != "--").collect();
    let has = |w: &str| words.iter().any(|a| a == w);
    // The error and its details on one line, without the usage.
    let message = match e.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            "a command is required: see certctl --help".to_owned()
        }
        _ => text
            .lines()
            .take_while(|l| !l.starts_with("Usage: ") && !l.starts_with("For more information"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_owned(),
    };
    // A monitoring check with bad arguments is UNKNOWN, as the plugin
    // convention has it, and says so on stdout where the monitor reads.
    let (code, line) = if has("status") && has("--check") {
        let code = check::Level::Unknown.code();
        (code, Some(format!("CERTCTL UNKNOWN - {message}")))
    } else {
        (code, None)
    };
    match (has("--json"), &line) {
        (true, Some(line)) => println!(
            "{}",
            serde_json::json!({
                "status": "UNKNOWN",
                "exit_code": code,
                "summary": line,
                "error": message,
            })
        ),
        (true, None) => println!(
            "{}",
            serde_json::json!({ "error": message, "exit_code": code })
        ),
        (false, Some(line)) => println!("{line}"),
        (false, None) => {}
    }
    eprint!("{text}");
    code
}

/// Runs one command and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    let result = match &cli.command {
        cli::Command::Deploy(args) => deploy::run(&cli, args).await,
        cli::Command::Status(args) => inspect::status(&cli, args).await,
        cli::Command::Targets(args) if args.names => Ok(complete::names(&cli).await),
        cli::Command::Targets(_) => inspect::targets(&cli).await,
        cli::Command::Watch(args) => inspect::watch(&cli, args).await,
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
