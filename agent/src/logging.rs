//! Log setup: where log lines go and which ones.
//!
//! Where: when the agent's stderr is connected to the systemd journal (a
//! service with the default `StandardError=journal`; systemd says so in
//! `JOURNAL_STREAM`), lines go to the journal through its native protocol
//! with structured fields ([`journal`]): `TARGET`, `DEPLOY_ID` from the
//! deploy span, `STAGE`, `OUTCOME`, `CERT_SHA256`, `NOT_AFTER`, ... from the
//! events. Otherwise (started by hand, in a container, by tests) they are
//! human-readable lines on stderr, where the same fields appear as
//! `deploy{target=web deploy_id=…}: … stage="committed"`. A journal that
//! cannot be reached falls back to stderr with a warning.
//!
//! Which: `CERTCTL_LOG`, else `RUST_LOG`, in `tracing` `EnvFilter` syntax
//! (`debug`, `warn,certctl_agent::deploy=debug`); default `info`. A filter
//! that does not parse is reported and `info` is used.

pub mod journal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variables read for the filter, first match wins.
pub const FILTER_VARS: [&str; 2] = ["CERTCTL_LOG", "RUST_LOG"];

/// Where [`init`] sends log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Journal,
    Stderr,
}

/// Installs the global subscriber. Call once, from the binary.
pub fn init() -> Destination {
    let (filter, bad_filter) = filter_from(|var| std::env::var(var).ok());
    let mut fallback = None;
    if journal::stderr_is_journal() {
        match journal::JournalLayer::connect() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init();
                if let Some(bad) = bad_filter {
                    tracing::warn!("{bad}");
                }
                return Destination::Journal;
            }
            Err(e) => fallback = Some(e),
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if let Some(e) = fallback {
        tracing::warn!(
            "stderr is the journal but {} cannot be reached ({e}): logging plain lines to stderr, \
             without structured fields",
            journal::JOURNAL_SOCKET
        );
    }
    if let Some(bad) = bad_filter {
        tracing::warn!("{bad}");
    }
    Destination::Stderr
}

/// The filter from the first of [`FILTER_VARS`] that is set and not
/// empty, and a warning when it does not parse.
fn filter_from(get: impl Fn(&str) -> Option<String>) -> (EnvFilter, Option<String>) {
    for var in FILTER_VARS {
        let Some(value) = get(var).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        return match EnvFilter::try_new(&value) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new("info"),
                Some(format!(
                    "{var}={value:?} is not a log filter ({e}); logging at info. Use a level \
                     (error, warn, info, debug, trace) or directives such as \
                     \"info,certctl_agent::deploy=debug\""
                )),
            ),
        };
    }
    (EnvFilter::new("info"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn certctl_log_wins_over_rust_log() {
        let (f, bad) = filter_from(env(&[("CERTCTL_LOG", "debug"), ("RUST_LOG", "error")]));
        assert!(bad.is_none());
        assert_eq!(f.to_string(), "debug");
        let (f, _) = filter_from(env(&[("CERTCTL_LOG", " "), ("RUST_LOG", "warn")]));
        assert_eq!(f.to_string(), "warn");
        let (f, _) = filter_from(env(&[]));
        assert_eq!(f.to_string(), "info");
    }

    #[test]
    fn a_bad_filter_falls_back_to_info_and_says_so() {
        let (f, bad) = filter_from(env(&[("CERTCTL_LOG", "debug,=[")]));
        assert_eq!(f.to_string(), "info");
        let bad = bad.unwrap();
        assert!(bad.starts_with("CERTCTL_LOG=\"debug,=[\""), "{bad}");
        assert!(bad.contains("logging at info"), "{bad}");
    }
}
