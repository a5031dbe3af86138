//! Development tasks for certctl, run as `cargo xtask <task>` (an alias in
//! `.cargo/config.toml`). Today: `bench`, the benchmark harness of
//! docs/performance.md.
// This crate is a command-line program: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Development tasks for certctl")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Measure the agent against the floor and the alternatives; print one table.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.task {
        Task::Bench(o) => bench::run(o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
