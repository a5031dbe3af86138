//! Target names in `certctl`'s shell completions. clap_complete renders
//! the static part (commands, options, files for `--cert`); this adds the
//! names of the configured targets wherever a command takes a `TARGET`,
//! asked at completion time from `certctl targets --names` (the running
//! agent, or its configuration file when the agent cannot be asked), with
//! the `--socket` given on the command line, if any.

use clap_complete::Shell;

/// Options of `certctl` that take a value: the word after one is that
/// value, never a target.
fn value_options(cmd: &clap::Command) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |c: &clap::Command| {
        for a in c.get_arguments() {
            if a.get_action().takes_values()
                && let Some(long) = a.get_long()
            {
                out.push(format!("--{long}"));
            }
        }
    };
    add(cmd);
    for sub in cmd.get_subcommands() {
        add(sub);
    }
    out.sort();
    out.dedup();
    out
}

/// The commands with a `TARGET` positional, and whether it takes several.
fn target_commands(cmd: &clap::Command) -> Vec<(String, bool)> {
    cmd.get_subcommands()
        .filter_map(|sub| {
            sub.get_positionals()
                .find(|a| matches!(a.get_id().as_str(), "target" | "targets"))
                .map(|a| {
                    let many = matches!(a.get_num_args(), Some(r) if r.max_values() > 1);
                    (sub.get_name().to_owned(), many)
                })
        })
        .collect()
}

/// `script`, as clap_complete rendered it for `shell`, with target names
/// completed.
pub fn with_target_names(shell: Shell, cmd: &clap::Command, script: &str) -> String {
    match shell {
        Shell::Bash => bash(cmd, script),
        Shell::Zsh => zsh(script),
        Shell::Fish => fish(cmd, script),
        _ => script.to_owned(),
    }
}

fn bash(cmd: &clap::Command, script: &str) -> String {
    let commands = target_commands(cmd);
    let one: Vec<&str> = commands
        .iter()
        .filter(|(_, many)| !many)
        .map(|(n, _)| n.as_str())
        .collect();
    let all: Vec<&str> = commands.iter().map(|(n, _)| n.as_str()).collect();
    let values = value_options(cmd).join("|");
    let registered = script.replace(
        "complete -F _certctl ",
        "complete -F _certctl_with_targets ",
    );
    format!(
        r#"{registered}
# Target names where a command takes a TARGET, from `certctl targets --names`
# (the agent, else its configuration file); everything else as above.
_certctl_with_targets() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local i w sub="" given=0 socket=()
    for (( i = 1; i < COMP_CWORD; i++ )); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in
            --socket) socket=(--socket "${{COMP_WORDS[i+1]}}"); (( i++ )) ;;
            --socket=*) socket=("$w") ;;
            {values}) (( i++ )) ;;
            -*) ;;
            *) if [[ -z "$sub" ]]; then sub="$w"; else (( given++ )); fi ;;
        esac
    done
    case "$prev" in
        {values}) _certctl "$@"; return ;;
    esac
    if [[ "$cur" != -* ]]; then
        case "$sub" in
            {one})
                if (( given == 0 )); then
                    COMPREPLY=( $(compgen -W "$(certctl "${{socket[@]}}" targets --names 2>/dev/null)" -- "$cur") )
                    return 0
                fi ;;
            {many})
                COMPREPLY=( $(compgen -W "$(certctl "${{socket[@]}}" targets --names 2>/dev/null)" -- "$cur") )
                return 0 ;;
        esac
    fi
    _certctl "$@"
}}
"#,
        one = one.join("|"),
        many = all
            .iter()
            .filter(|n| !one.contains(n))
            .copied()
            .collect::<Vec<_>>()
            .join("|"),
    )
}

fn zsh(script: &str) -> String {
    let function = r#"(( $+functions[_certctl_target_names] )) ||
_certctl_target_names() {
    local -a names socket
    local i=${words[(I)--socket]}
    (( i )) && socket=(--socket "${words[i+1]}")
    names=(${(f)"$(_call_program targets certctl $socket targets --names 2>/dev/null)"})
    _wanted targets expl 'target' compadd -a names
}

"#;
    let mut out = String::with_capacity(script.len() + function.len());
    for line in script.split_inclusive('\n') {
        let is_target = line.starts_with("':target -- ")
            || line.starts_with("'::target -- ")
            || line.starts_with("'*::targets -- ");
        if is_target {
            out.push_str(&line.replace(":_default'", ":_certctl_target_names'"));
        } else {
            if line.starts_with("if [ \"$funcstack[1]\" = \"_certctl\" ]; then") {
                out.push_str(function);
            }
            out.push_str(line);
        }
    }
    out
}

fn fish(cmd: &clap::Command, script: &str) -> String {
    let names: Vec<String> = target_commands(cmd).into_iter().map(|(n, _)| n).collect();
    format!(
        r#"{script}
# Target names where a command takes a TARGET, from `certctl targets --names`
# (the agent, else its configuration file).
function __fish_certctl_target_names
    set -l cmd (commandline -opc)
    set -l socket
    set -l i (contains -i -- --socket $cmd)
    and test $i -lt (count $cmd)
    and set socket --socket $cmd[(math $i + 1)]
    certctl $socket targets --names 2>/dev/null
end
complete -c certctl -n "__fish_certctl_using_subcommand {names}" -f -a "(__fish_certctl_target_names)"
"#,
        names = names.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_commands_that_take_targets_are_found() {
        let cmd = certctl_cli::Cli::command();
        let mut found = target_commands(&cmd);
        found.sort();
        assert_eq!(
            found,
            [
                ("deploy".to_owned(), false),
                ("history".to_owned(), false),
                ("rollback".to_owned(), false),
                ("status".to_owned(), true),
                ("verify".to_owned(), false),
                ("watch".to_owned(), true),
            ]
        );
        let values = value_options(&cmd);
        for option in [
            "--cert",
            "--key",
            "--chain",
            "--socket",
            "--limit",
            "--warn-days",
        ] {
            assert!(values.iter().any(|v| v == option), "{values:?}");
        }
        assert!(!values.iter().any(|v| v == "--json"), "{values:?}");
    }
}
