//! Snapshot tests of what `certctl` prints: `--help` of every command, and
//! its usage and connection errors with their exit codes.
//!
//! Each `tests/cmd/NAME.toml` runs `certctl` once with the arguments and
//! environment it gives (never the caller's: no home, no terminal width, no
//! `CERTCTL_SOCKET`) and `status.code`, the exit code it must end with;
//! `NAME.stdout` and `NAME.stderr` are exactly what it must print, and a
//! `NAME.in/` directory, when there is one, is its working directory.
//!
//! After a deliberate change of the output, regenerate the snapshots and read
//! the diff before committing it:
//!
//! ```text
//! TRYCMD=overwrite cargo test -p certctl-cli --test cli
//! ```

#[test]
fn cli() {
    trycmd::TestCases::new()
        .register_bin("certctl", trycmd::cargo::cargo_bin!("certctl"))
        .case("tests/cmd/*.toml");
}
