//! The man pages: clap_mangen renders NAME, SYNOPSIS, DESCRIPTION, OPTIONS
//! and COMMANDS from the clap definitions; this module adds what an
//! operator looks for in a man page and `--help` cannot hold: EXIT STATUS
//! (from the commands' `after_help`, so it says what `--help` says),
//! ENVIRONMENT, FILES, SIGNALS, EXAMPLES and SEE ALSO.
//!
//! Both programs are in `/usr/bin` (the package's assets and
//! `ExecStart=` of `certctl-agent.service`), so both are in section 1:
//! section 8 is for programs in `/usr/sbin`.

use std::fmt::Write as _;

/// Section of every page.
pub const SECTION: &str = "1";

/// One page's own sections, besides the generated ones.
struct Extra {
    environment: &'static [(&'static str, &'static str)],
    files: &'static [(&'static str, &'static str)],
    signals: &'static [(&'static str, &'static str)],
    examples: &'static [(&'static str, &'static str)],
    see_also: &'static [&'static str],
}

const CTL_ENV: &[(&str, &str)] = &[(
    "CERTCTL_SOCKET",
    "The agent's control socket, when --socket is not given (default /run/certctl/agent.sock).",
)];

const CTL_FILES: &[(&str, &str)] = &[(
    "/run/certctl/agent.sock",
    "The agent's control socket. Members of the groups in deploy_groups may deploy, roll back \
     and reload; members of read_groups may only read; root always may.",
)];

const AGENT_ENV: &[(&str, &str)] = &[
    (
        "CERTCTL_CONFIG",
        "The configuration file, when --config is not given (default /etc/certctl/agent.toml).",
    ),
    (
        "CERTCTL_LOG",
        "Log filter in tracing's EnvFilter syntax, e.g. debug or certctl_agent=debug,info; \
         RUST_LOG is read when it is unset. Default: info.",
    ),
    (
        "NOTIFY_SOCKET, LISTEN_FDS, LISTEN_PID, WATCHDOG_USEC, JOURNAL_STREAM",
        "Set by systemd: readiness, status and watchdog notifications, socket activation of the \
         control socket, and logging to the journal with structured fields.",
    ),
    (
        "CREDENTIALS_DIRECTORY",
        "Set by systemd's LoadCredential=: where keystore passwords given as credentials are read.",
    ),
];

const AGENT_FILES: &[(&str, &str)] = &[
    (
        "/etc/certctl/agent.toml",
        "The configuration (docs/configuration.md).",
    ),
    (
        "/run/certctl/agent.sock",
        "The control socket certctl(1) talks to.",
    ),
    (
        "/var/lib/certctl/drop/",
        "The drop directory: producers put <target>.pem or <target>/ here.",
    ),
    (
        "/var/lib/certctl/state/",
        "The deploy journal and history, locks, and rejected drops (rejected/, each with a \
         .reason file).",
    ),
    (
        "/usr/lib/systemd/system/certctl-agent.service, certctl-agent.socket",
        "The units that run the agent.",
    ),
    (
        "/usr/share/doc/certctl/",
        "The operator documentation: configuration, kinds, drop directory, CLI, metrics, systemd.",
    ),
];

const AGENT_SIGNALS: &[(&str, &str)] = &[
    (
        "SIGHUP",
        "Re-read the configuration (systemctl reload certctl-agent). A bad new configuration is \
         rejected and the running one stays in force; certctl status shows the result.",
    ),
    (
        "SIGTERM, SIGINT",
        "Finish or safely abort running deploys (never leaving a torn target), then exit 0.",
    ),
];

const SEE_ALSO_CTL: &[&str] = &["certctl-agent(1)", "systemctl(1)"];

fn extra(page: &str) -> Extra {
    let ctl = |examples, see_also| Extra {
        environment: CTL_ENV,
        files: CTL_FILES,
        signals: &[],
        examples,
        see_also,
    };
    match page {
        "certctl" => ctl(
            &[
                (
                    "Deploy a bundle (key, leaf and chain in one file):",
                    "certctl deploy web --cert /tmp/web-bundle.pem",
                ),
                (
                    "Deploy separate files, checking first what would change:",
                    "certctl deploy web --cert web.crt --key web.key --chain chain.pem --dry-run",
                ),
                (
                    "See every target, or judge them as a monitoring check:",
                    "certctl status\ncertctl status --check --warn-days 21",
                ),
                ("Put the previous certificate back:", "certctl rollback web"),
            ],
            SEE_ALSO_CTL,
        ),
        "certctl-deploy" => ctl(
            &[
                ("A bundle:", "certctl deploy web --cert /tmp/web-bundle.pem"),
                (
                    "Separate files, machine-readable progress:",
                    "certctl --json deploy web --cert web.crt --key web.key --chain chain.pem",
                ),
                (
                    "The first certificate of a server that is not running yet:",
                    "certctl deploy mail --cert mail.pem --no-reload",
                ),
            ],
            &["certctl(1)", "certctl-rollback(1)", "certctl-status(1)"],
        ),
        "certctl-status" => ctl(
            &[
                ("Every target:", "certctl status"),
                (
                    "Nagios/Icinga plugin, from cron or NRPE:",
                    "certctl status --check --warn-days 14 web api",
                ),
                (
                    "The agent's Prometheus metrics over the control socket:",
                    "certctl status --prometheus",
                ),
            ],
            &["certctl(1)", "certctl-verify(1)"],
        ),
        "certctl-rollback" => ctl(
            &[(
                "Restore the previous certificate set, reload and verify:",
                "certctl rollback web",
            )],
            &["certctl(1)", "certctl-history(1)"],
        ),
        "certctl-verify" => ctl(
            &[(
                "Probe now and compare with the certificate on disk:",
                "certctl verify web",
            )],
            &["certctl(1)", "certctl-status(1)"],
        ),
        "certctl-history" => ctl(
            &[(
                "The last five deploys of one target:",
                "certctl history web --limit 5",
            )],
            &["certctl(1)"],
        ),
        "certctl-watch" => ctl(
            &[(
                "Follow two targets' deploys and drops as JSON lines:",
                "certctl --json watch web api",
            )],
            &["certctl(1)"],
        ),
        "certctl-targets" => ctl(
            &[("The configured targets:", "certctl targets")],
            &["certctl(1)"],
        ),
        "certctl-agent" => Extra {
            environment: AGENT_ENV,
            files: AGENT_FILES,
            signals: AGENT_SIGNALS,
            examples: &[
                (
                    "Check a changed configuration, then apply it:",
                    "certctl-agent check-config\nsystemctl reload certctl-agent",
                ),
                (
                    "Run by hand from a checkout, without root:",
                    "certctl-agent --config examples/agent.toml",
                ),
                (
                    "Debug logging for one run:",
                    "CERTCTL_LOG=debug certctl-agent --config ./agent.toml",
                ),
            ],
            see_also: &["certctl(1)", "systemctl(1)", "systemd.service(5)"],
        },
        _ if page.starts_with("certctl-agent-") => Extra {
            environment: &AGENT_ENV[..1],
            files: &AGENT_FILES[..1],
            signals: &[],
            examples: &[],
            see_also: &["certctl-agent(1)"],
        },
        _ => ctl(&[], &["certctl(1)"]),
    }
}

/// Text for roff: backslashes and hyphens escaped, and a leading `.` or
/// `'` (a request) made literal.
fn escape(text: &str) -> String {
    let s = text.replace('\\', "\\\\").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// `.TP` entries: a bold tag, its text indented below.
fn tagged(out: &mut String, items: &[(&str, &str)]) {
    for (tag, text) in items {
        let _ = writeln!(out, ".TP\n\\fB{}\\fR\n{}", escape(tag), escape(text));
    }
}

/// The EXIT STATUS section from an `after_help` text: lines
/// `  CODE  meaning` become `.TP` entries, the others paragraphs.
fn exit_status(out: &mut String, after_help: &str) {
    out.push_str(".SH \"EXIT STATUS\"\n");
    for line in after_help
        .lines()
        .skip_while(|l| l.starts_with("Exit status"))
    {
        let trimmed = line.trim_start();
        let split = trimmed
            .split_once(char::is_whitespace)
            .filter(|(code, _)| !code.is_empty() && code.chars().all(|c| c.is_ascii_digit()));
        match split {
            Some((code, meaning)) if line.starts_with(' ') => {
                tagged(out, &[(code, meaning.trim_start())]);
            }
            _ => {
                let _ = writeln!(out, ".PP\n{}", escape(trimmed));
            }
        }
    }
}

/// The sections this module adds to the page `name` of `cmd`.
pub fn sections(name: &str, cmd: &clap::Command) -> String {
    let e = extra(name);
    let mut out = String::new();
    if let Some(help) = cmd.get_after_help() {
        exit_status(&mut out, &help.to_string());
    }
    if !e.environment.is_empty() {
        out.push_str(".SH ENVIRONMENT\n");
        tagged(&mut out, e.environment);
    }
    if !e.files.is_empty() {
        out.push_str(".SH FILES\n");
        tagged(&mut out, e.files);
    }
    if !e.signals.is_empty() {
        out.push_str(".SH SIGNALS\n");
        tagged(&mut out, e.signals);
    }
    if !e.examples.is_empty() {
        out.push_str(".SH EXAMPLES\n");
        for (what, commands) in e.examples {
            let _ = writeln!(out, ".PP\n{}\n.PP\n.RS 4\n.nf", escape(what));
            for line in commands.lines() {
                let _ = writeln!(out, "{}", escape(line));
            }
            out.push_str(".fi\n.RE\n");
        }
    }
    let mut see_also: Vec<String> = e.see_also.iter().map(|s| (*s).to_owned()).collect();
    // Every page of a program points to its commands' pages.
    if name == "certctl" || name == "certctl-agent" {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            see_also.push(format!("{name}-{}({SECTION})", sub.get_name()));
        }
    }
    let _ = writeln!(
        out,
        ".SH \"SEE ALSO\"\n{}\n.PP\nThe operator documentation in /usr/share/doc/certctl/ \
         (cli.md, configuration.md, kinds.md, drop\\-directory.md, metrics.md, systemd.md).",
        see_also
            .iter()
            .map(|s| {
                let (page, section) = s.split_once('(').unwrap_or((s, ""));
                format!("\\fB{}\\fR({section}", escape(page))
            })
            .collect::<Vec<_>>()
            .join(",\n")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_escapes() {
        assert_eq!(escape("--socket"), "\\-\\-socket");
        assert_eq!(escape(".hidden"), "\\&.hidden");
        assert_eq!(escape("a\\b"), "a\\\\b");
    }

    #[test]
    fn exit_status_lines_become_entries() {
        let mut out = String::new();
        exit_status(
            &mut out,
            "Exit status:\n  0  done\n  64  config error\nmore text.",
        );
        assert_eq!(
            out,
            ".SH \"EXIT STATUS\"\n.TP\n\\fB0\\fR\ndone\n.TP\n\\fB64\\fR\nconfig error\n.PP\nmore text.\n"
        );
    }
}
