//! `certctl targets --names`: the target names, one a line, which the
//! bash, zsh and fish completions under `packaging/completions/` offer
//! (xtask adds the call to the scripts clap_complete generates).
//!
//! Names come from the running agent, asked with a short deadline so a
//! hung agent never hangs the shell; when it cannot be asked (not running,
//! no access to its socket), from the configuration file it would read
//! (`CERTCTL_CONFIG`, else `/etc/certctl/agent.toml`), which is
//! world-readable as packaged, with a note on stderr. The exit code is 0
//! either way: a completion offers what it can.

use std::path::PathBuf;
use std::time::Duration;

use certctl_proto::agent::v1 as pb;

use crate::cli::Cli;
use crate::client;
use crate::exit;

/// How long the agent may take to answer before the configuration file is
/// read instead.
const AGENT_DEADLINE: Duration = Duration::from_millis(1500);

/// Where the agent reads its configuration by default.
const DEFAULT_CONFIG: &str = "/etc/certctl/agent.toml";

/// Prints the configured target names, one a line, sorted (with `--json`:
/// `{"names": [...]}`); always exit 0.
pub async fn names(cli: &Cli) -> u8 {
    let from_agent = tokio::time::timeout(AGENT_DEADLINE, async {
        let mut client = client::connect(&cli.socket).await.ok()?;
        let resp = client.targets(pb::TargetsRequest {}).await.ok()?;
        Some(
            resp.into_inner()
                .targets
                .into_iter()
                .map(|t| t.name)
                .collect::<Vec<_>>(),
        )
    })
    .await
    .ok()
    .flatten();
    let mut names = from_agent.unwrap_or_else(|| {
        let path: PathBuf = std::env::var_os("CERTCTL_CONFIG")
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), Into::into);
        eprintln!(
            "certctl: the agent at {} did not answer: names from {}",
            cli.socket.display(),
            path.display()
        );
        std::fs::read_to_string(&path)
            .map(|text| names_in_config(&text))
            .unwrap_or_default()
    });
    names.sort();
    names.dedup();
    if cli.json {
        println!("{}", serde_json::json!({ "names": names }));
        return exit::OK;
    }
    for name in names {
        println!("{name}");
    }
    exit::OK
}

/// The `name` of every `[[target]]` of an agent configuration; none when
/// it is not TOML. Only names the agent would accept are kept, so nothing
/// from the file reaches the shell but `[a-z0-9._-]`.
pub fn names_in_config(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(targets) = table.get("target").and_then(toml::Value::as_array) else {
        return Vec::new();
    };
    targets
        .iter()
        .filter_map(|t| t.get("name").and_then(toml::Value::as_str))
        .filter(|n| {
            !n.is_empty()
                && n.len() <= 63
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_target_tables_and_only_valid_ones() {
        let text = "[agent]\nsocket = \"/x\"\n\
                    [[target]]\nname = \"web\"\nkind = \"nginx\"\n\
                    [[target]]\nname = \"api.v2\"\n\
                    [[target]]\nname = \"$(rm -rf /)\"\n\
                    [[target]]\nkind = \"file\"\n";
        assert_eq!(names_in_config(text), ["web", "api.v2"]);
        assert!(names_in_config("not toml [").is_empty());
        assert!(names_in_config("").is_empty());
    }
}
