//! Log setup: human-readable lines on stderr, level from `RUST_LOG`
//! (default `info`). Fields carry `target` and `deploy_id` from the deploy
//! span, so every line of one deploy can be found with one grep.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, from the binary.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
