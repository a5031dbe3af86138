//! Files generated from the CLI definitions (clap) and shipped in the
//! Debian package: the man pages `certctl(1)` and `certctl-agent(8)` (with
//! one page per subcommand, `certctl-deploy(1)`, ...), and bash, zsh and
//! fish completions for both programs.
//!
//! They are checked in under `packaging/` so that packaging needs no build
//! step of its own; `cargo xtask gen` rewrites them and the test below fails
//! when a CLI change was not regenerated, so they never drift from `--help`.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// One generated file: path relative to the repository root, and content.
pub struct Generated {
    pub path: PathBuf,
    pub content: Vec<u8>,
}

/// The repository root (the parent of `xtask/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every generated file, rendered in memory.
pub fn generated() -> anyhow::Result<Vec<Generated>> {
    let programs = [
        (certctl_cli::Cli::command(), "certctl", "1"),
        (certctl_agent::cli::Cli::command(), "certctl-agent", "8"),
    ];
    let mut out = Vec::new();
    for (cmd, name, section) in programs {
        man_pages(cmd.clone(), section, &mut out)?;
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut script);
            out.push(Generated {
                path: PathBuf::from(format!("packaging/completions/{file}")),
                content: script,
            });
        }
    }
    Ok(out)
}

/// The man page of `cmd` and one per subcommand (`certctl-deploy(1)`, ...),
/// named as `clap_mangen::generate_to` names them.
fn man_pages(cmd: clap::Command, section: &str, out: &mut Vec<Generated>) -> anyhow::Result<()> {
    fn walk(cmd: clap::Command, section: &str, out: &mut Vec<Generated>) -> anyhow::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .section(section)
            .manual("certctl")
            .source(format!("certctl {}", env!("CARGO_PKG_VERSION")));
        let mut page = Vec::new();
        man.render(&mut page)?;
        out.push(Generated {
            path: Path::new("packaging/man").join(man.get_filename()),
            content: page,
        });
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub.clone(), section, out)?;
        }
        Ok(())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    walk(cmd, section, out)
}

/// The generated files whose checked-in copy under `root` differs or is missing.
pub fn stale(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(generated()?
        .into_iter()
        .filter(|g| std::fs::read(root.join(&g.path)).ok().as_deref() != Some(&g.content[..]))
        .map(|g| g.path)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_are_up_to_date() {
        let stale = stale(&repo_root()).unwrap();
        assert!(
            stale.is_empty(),
            "generated files differ from the CLI definitions: {stale:?}; run `cargo xtask gen` and commit the result"
        );
    }

    #[test]
    fn man_pages_name_their_section_and_commands() {
        let files = generated().unwrap();
        let page = |p: &str| {
            String::from_utf8(
                files
                    .iter()
                    .find(|g| g.path == Path::new(p))
                    .unwrap()
                    .content
                    .clone(),
            )
            .unwrap()
        };
        let ctl = page("packaging/man/certctl.1");
        assert!(ctl.contains(".TH certctl 1"), "{ctl}");
        for sub in ["deploy", "status", "rollback", "verify", "watch", "targets"] {
            assert!(ctl.contains(sub), "certctl(1) lacks {sub}");
        }
        let agent = page("packaging/man/certctl-agent.8");
        assert!(agent.contains(".TH certctl-agent 8"), "{agent}");
        assert!(agent.contains("check\\-config"), "{agent}");
    }
}
