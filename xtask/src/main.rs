//! `cargo xtask`: development tasks.
//!
//! - `cargo xtask gen`: regenerate the man pages and shell completions under
//!   `packaging/` from the CLI definitions (commit the result).
//! - `cargo xtask check-gen`: fail when they are stale (the test suite does
//!   the same).
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool

use std::process::ExitCode;

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "gen" => gen_files(),
        "check-gen" => check(),
        _ => {
            eprintln!("usage: cargo xtask gen | check-gen");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e:#}");
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
    let stale = xtask::stale(&xtask::repo_root())?;
    if stale.is_empty() {
        println!("generated files are up to date");
        return Ok(());
    }
    anyhow::bail!("stale: {stale:?}; run `cargo xtask gen`")
}
