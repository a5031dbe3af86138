//! `certctl-agent check-config`: the human summary of a valid configuration.

use std::fmt::Write as _;

use crate::command::display_argv;
use crate::config::Config;

/// What `check-config` prints for a configuration that loaded.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let a = &config.agent;
    let _ = writeln!(out, "{}: ok", config.path.display());
    let _ = writeln!(out, "  socket     {}", a.socket.display());
    let _ = writeln!(out, "  state_dir  {}", a.state_dir.display());
    let _ = writeln!(out, "  drop_dir   {}", a.drop_dir.display());
    let names = |g: &[crate::config::Group]| {
        if g.is_empty() {
            "(root only)".to_owned()
        } else {
            g.iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(out, "  deploy     {}", names(&a.deploy_groups));
    let _ = writeln!(out, "  read       {}", names(&a.read_groups));
    let _ = writeln!(out, "{} target(s)", config.targets.len());
    for t in &config.targets {
        let _ = writeln!(
            out,
            "  {} ({}, {})",
            t.name,
            t.kind.as_str(),
            t.layout.as_str()
        );
        if let Some(ssh) = &t.ssh {
            let _ = writeln!(
                out,
                "    host      {} (over SSH, key {}, host keys pinned in {}; paths and commands are that host's)",
                crate::atomic::remote::shown(ssh),
                match &ssh.identity {
                    crate::config::SshIdentity::File(p) => p.display().to_string(),
                    crate::config::SshIdentity::Credential(n) => format!("credential {n}"),
                },
                ssh.known_hosts.display()
            );
        }
        if let Some(ks) = &t.keystore {
            let _ = writeln!(
                out,
                "    keystore  {} ({}, alias {}, password from {})",
                t.cert_path.display(),
                ks.store_type.as_str(),
                ks.alias,
                ks.password.describe()
            );
        } else if t.kind.defaults().combined_pem {
            let _ = writeln!(out, "    pem       {}", t.cert_path.display());
        } else {
            let _ = writeln!(out, "    cert      {}", t.cert_path.display());
            let _ = writeln!(out, "    key       {}", t.key_path.display());
        }
        if let Some(c) = &t.chain_path {
            let _ = writeln!(out, "    chain     {}", c.display());
        }
        let cmd = |argv: &[String]| {
            if argv.is_empty() {
                "(none)".to_owned()
            } else {
                display_argv(argv)
            }
        };
        let _ = writeln!(out, "    validate  {}", cmd(&t.validate));
        let reload = t
            .reload_hook
            .as_ref()
            .map_or_else(|| cmd(&t.reload), crate::reload::ReloadHook::describe);
        let _ = writeln!(out, "    reload    {reload}");
        let verify = t.verify.as_ref().map_or_else(
            || "(none: deploys report \"unverified\")".to_owned(),
            // The protocol may be the kind's choice for the port: show it.
            |v| {
                let endpoints: Vec<String> = v
                    .endpoints
                    .iter()
                    .map(|e| match &e.server_name {
                        Some(name) => format!("{} ({}, SNI {name})", e.address, e.protocol),
                        None => format!("{} ({})", e.address, e.protocol),
                    })
                    .collect();
                let rule = if v.consecutive > 1 {
                    format!(
                        "; {} matches in a row over {}",
                        v.consecutive,
                        humantime::format_duration(v.settle)
                    )
                } else {
                    String::new()
                };
                format!("{}{rule}", endpoints.join(", "))
            },
        );
        let _ = writeln!(out, "    verify    {verify}");
    }
    for w in config.warnings() {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
