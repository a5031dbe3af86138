//! Files generated from the CLI definitions (clap) and shipped in the
//! Debian package: the man pages `certctl(1)` and `certctl-agent(1)` (with
//! one page per subcommand, `certctl-deploy(1)`, ...; see [`man`] for their
//! sections), and bash, zsh and fish completions for both programs
//! (`certctl`'s complete target names: see [`complete`]).
//!
//! They are checked in under `packaging/` so that packaging needs no build
//! step of its own; `cargo xtask gen` rewrites them and the test below fails
//! when a CLI change was not regenerated, so they never drift from `--help`.

pub mod complete;
pub mod man;

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
        (certctl_cli::Cli::command(), "certctl", man::SECTION),
        (
            certctl_agent::cli::Cli::command(),
            "certctl-agent",
            man::SECTION,
        ),
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
            if name == "certctl" {
                script = complete::with_target_names(shell, &cmd, &String::from_utf8(script)?)
                    .into_bytes();
            }
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
        let filename = man.get_filename();
        let name = filename
            .strip_suffix(&format!(".{section}"))
            .unwrap_or(&filename);
        let page = with_sections(&String::from_utf8(page)?, &man::sections(name, &cmd));
        out.push(Generated {
            path: Path::new("packaging/man").join(man.get_filename()),
            content: page.into_bytes(),
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

/// `page` with `sections` in place of clap_mangen's EXTRA section (the
/// `after_help` text, which becomes EXIT STATUS) and before VERSION.
fn with_sections(page: &str, sections: &str) -> String {
    let mut page = page.to_owned();
    if let Some(start) = page.find(".SH EXTRA\n") {
        let end = page[start + 1..]
            .find("\n.SH ")
            .map_or(page.len(), |i| start + 1 + i + 1);
        page.replace_range(start..end, "");
    }
    let at = page.find(".SH VERSION\n").unwrap_or(page.len());
    page.insert_str(at, sections);
    page
}

/// Files under `root`'s `packaging/man` and `packaging/completions` that
/// are not generated (left over from a renamed command or page).
pub fn orphans(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let generated: Vec<PathBuf> = generated()?.into_iter().map(|g| g.path).collect();
    let mut out = Vec::new();
    for dir in ["packaging/man", "packaging/completions"] {
        for entry in std::fs::read_dir(root.join(dir))? {
            let path = Path::new(dir).join(entry?.file_name());
            if !generated.contains(&path) {
                out.push(path);
            }
        }
    }
    Ok(out)
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
    fn nothing_stale_is_left_beside_the_generated_files() {
        let orphans = orphans(&repo_root()).unwrap();
        assert!(
            orphans.is_empty(),
            "not generated from the CLI definitions: {orphans:?}; remove them (git rm)"
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
        let agent = page("packaging/man/certctl-agent.1");
        assert!(agent.contains(".TH certctl-agent 1"), "{agent}");
        assert!(agent.contains("check\\-config"), "{agent}");
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH ENVIRONMENT",
            ".SH FILES",
            ".SH EXAMPLES",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(ctl.contains(section), "certctl(1) lacks {section}");
            assert!(agent.contains(section), "certctl-agent(1) lacks {section}");
        }
        assert!(agent.contains(".SH SIGNALS"), "{agent}");
        assert!(agent.contains("\\fB64\\fR"), "{agent}");
        assert!(ctl.contains("CERTCTL_SOCKET"), "{ctl}");
        assert!(!ctl.contains(".SH EXTRA"), "{ctl}");
        let status = page("packaging/man/certctl-status.1");
        assert!(status.contains("CRITICAL"), "{status}");
        // Every page is in section 1, as the binaries are in /usr/bin.
        assert!(
            files
                .iter()
                .all(|g| !g.path.to_string_lossy().ends_with(".8"))
        );
    }
}
