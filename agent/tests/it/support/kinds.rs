//! What every kind test does through the agent: deploy a leaf, check that
//! the deploy was verified by the agent's own probe, or that it failed at
//! the validate command.

use super::assert::{arg, done, stages};
use super::pki::Leaf;
use super::{CtlOutput, TestEnv, toml_str};

/// A `[target.verify]` table for `endpoint` and SNI `sni`, with no
/// `protocol` (the kind decides) and retries short enough for tests.
pub fn verify_table(endpoint: &str, sni: &str) -> String {
    format!(
        "[target.verify]\n\
         endpoint = {}\n\
         server_name = {}\n\
         attempts = 8\n\
         backoff = \"200ms\"\n\
         max_backoff = \"2s\"\n\
         timeout = \"5s\"\n",
        toml_str(endpoint),
        toml_str(sni)
    )
}

/// `certctl --json deploy TARGET --cert <leaf+chain> --key <key>`, the
/// inputs written as `<stem>.*`.
pub fn deploy(env: &TestEnv, target: &str, leaf: &Leaf, stem: &str) -> CtlOutput {
    let f = env.inputs(leaf, stem);
    env.ctl(&[
        "--json",
        "deploy",
        target,
        "--cert",
        arg(&f.fullchain),
        "--key",
        arg(&f.key),
    ])
}

/// Panics (with `log`, the server's log, and the agent's output) unless
/// `out` is a deploy of `leaf` that exited 0, reloaded and was verified.
/// Returns the events.
#[track_caller]
pub fn assert_verified(
    out: &CtlOutput,
    leaf: &Leaf,
    log: &dyn Fn() -> String,
) -> Vec<serde_json::Value> {
    let context = || format!("{out}\nserver log:\n{}", log());
    assert_eq!(out.code, 0, "{}", context());
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{}", context());
    assert_eq!(
        result["cert_sha256"],
        leaf.sha256_hex.as_str(),
        "{}",
        context()
    );
    assert_eq!(result["verification"], "verified", "{}", context());
    assert_eq!(
        result["served_sha256"],
        leaf.sha256_hex.as_str(),
        "{}",
        context()
    );
    assert!(stages(&lines).contains(&"reloaded"), "{}", context());
    lines
}

/// Panics unless `out` is a deploy that failed at the validate command
/// (exit 4) and put the previous files back.
#[track_caller]
pub fn assert_validate_failed(out: &CtlOutput, log: &dyn Fn() -> String) {
    let context = || format!("{out}\nserver log:\n{}", log());
    assert_eq!(out.code, 4, "{}", context());
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "validate_failed", "{}", context());
    let st = stages(&lines);
    assert!(
        st.contains(&"rollback") && !st.contains(&"reloaded"),
        "{}",
        context()
    );
}
