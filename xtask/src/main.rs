//! `cargo xtask <task>`: development tasks for certctl (an alias in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask gen`: regenerate the man pages and shell completions under
//!   `packaging/` from the CLI definitions (commit the result).
//! - `cargo xtask check-gen`: fail when they are stale (the test suite does
//!   the same).
//! - `cargo xtask bench`: the benchmark harness of docs/performance.md.
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
    /// Regenerate the man pages and shell completions under packaging/.
    Gen,
    /// Fail when the generated man pages or completions are stale.
    CheckGen,
    /// Measure the agent against the floor and the alternatives; print one table.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.task {
        Task::Gen => gen_files(),
        Task::CheckGen => check(),
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

fn gen_files() -> anyhow::Result<()> {
    let root = xtask::repo_root();
    for g in xtask::generated()? {
        let path = root.join(&g.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        #[allow(clippy::disallowed_methods)] // generated source files, not targets
        std::fs::write(&path, &g.content)?;
        println!("wrote {}", g.path.display());
    }
    Ok(())
}

fn check() -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let orphans = xtask::orphans(&root)?;
    if !orphans.is_empty() {
        anyhow::bail!("not generated (remove them): {orphans:?}");
    }
    let stale = xtask::stale(&root)?;
    if stale.is_empty() {
        println!("generated files are up to date");
        return Ok(());
    }
    anyhow::bail!("stale: {stale:?}; run `cargo xtask gen`")
}
