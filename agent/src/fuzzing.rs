//! The case budget of the property tests that fuzz the parsers of untrusted
//! and semi-trusted input (test builds only).
//!
//! Every such test lives in a module named `fuzz` next to the parser it
//! tries to break, so `cargo test -p certctl-agent --lib fuzz` runs them
//! all. In the normal suite each runs [`config`]'s fixed budget;
//! `CERTCTL_FUZZ_CASES=<n>` raises it for a long run (docs/reliability.md
//! gives the command and the last results). Failures are not persisted to
//! files: a failing case is printed with its minimal input and becomes a
//! regression test by hand.

use proptest::test_runner::Config;

/// Cases per property when `CERTCTL_FUZZ_CASES` is not set.
pub const DEFAULT_CASES: u32 = 256;

/// The environment variable that sets the cases per property.
pub const CASES_VAR: &str = "CERTCTL_FUZZ_CASES";

/// `cases` per property for a fast in-suite property (a slower one passes
/// a smaller number), or what `CERTCTL_FUZZ_CASES` asks for, scaled the
/// same way.
pub fn config(cases: u32) -> Config {
    let cases = match std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(n) => {
            let scaled = n * u64::from(cases) / u64::from(DEFAULT_CASES);
            u32::try_from(scaled.max(1)).unwrap_or(u32::MAX)
        }
        None => cases,
    };
    Config {
        cases,
        failure_persistence: None,
        // Shrinking a failure of a networked property can take long; a
        // failing case is printed as found after this many steps.
        max_shrink_iters: 4096,
        ..Config::default()
    }
}
