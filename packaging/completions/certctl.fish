# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_certctl_global_optspecs
    string join \n socket= json h/help V/version
end

function __fish_certctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_certctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_certctl_using_subcommand
    set -l cmd (__fish_certctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c certctl -n "__fish_certctl_needs_command" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_needs_command" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_needs_command" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_needs_command" -s V -l version -d 'Print version'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "deploy" -d 'Deploy a certificate, its chain and key to a target; streams each stage'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "status" -d 'Agent health and, per target, the certificate on disk and the last result'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "targets" -d 'Configured targets and their kinds, files and commands'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "watch" -d 'Stream every deploy and drop-directory event of the agent until interrupted'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "rollback" -d 'Put the previous certificate set back, reload, and verify it is served'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "history" -d 'Past deploys and rollbacks, newest first, from the agent\'s journal'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "verify" -d 'Probe the target\'s endpoint now and compare what it serves with the certificate on disk (exit 0 match, 5 mismatch or unreachable)'
complete -c certctl -n "__fish_certctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l cert -d 'Certificate (PEM): the leaf, optionally followed by its chain; or a whole bundle (key, leaf and chain in any order) when --key is omitted' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l key -d 'Private key (PEM)' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l chain -d 'Intermediate certificates (PEM), in any order' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l dry-run -d 'Check the input and show what would be written; change nothing'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l no-verify -d 'Skip the TLS check of the served certificate after the reload'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l no-reload -d 'Install without reloading or verifying (the server is not running yet): write the files atomically, run the validate command, stop'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l no-wait -d 'Fail with exit code 8 instead of waiting when the target is busy'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand deploy" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand status" -l warn-days -d 'With --check: WARNING when a certificate expires within this many days' -r
complete -c certctl -n "__fish_certctl_using_subcommand status" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand status" -l prometheus -d 'Print the agent\'s Prometheus metrics (text exposition format) instead: the same text as its metrics_listen endpoint, over the control socket'
complete -c certctl -n "__fish_certctl_using_subcommand status" -l check -d 'Judge the status as a monitoring plugin: print one summary line and exit 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN'
complete -c certctl -n "__fish_certctl_using_subcommand status" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand targets" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand targets" -l names -d 'Only the names, one a line (what the shell completions offer): from the agent, or from its configuration file when the agent cannot be asked'
complete -c certctl -n "__fish_certctl_using_subcommand targets" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand targets" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand watch" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand watch" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand watch" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand rollback" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand rollback" -l no-verify -d 'Skip the TLS check of the served certificate after the reload'
complete -c certctl -n "__fish_certctl_using_subcommand rollback" -l no-wait -d 'Fail with exit code 8 instead of waiting when the target is busy'
complete -c certctl -n "__fish_certctl_using_subcommand rollback" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand rollback" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand history" -l limit -d 'How many entries, newest first (at most 10000)' -r
complete -c certctl -n "__fish_certctl_using_subcommand history" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand history" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand history" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand verify" -l socket -d 'The agent\'s control socket' -r -F
complete -c certctl -n "__fish_certctl_using_subcommand verify" -l json -d 'Machine output: one JSON document, or one JSON object per line for streams'
complete -c certctl -n "__fish_certctl_using_subcommand verify" -s h -l help -d 'Print help'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "deploy" -d 'Deploy a certificate, its chain and key to a target; streams each stage'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "status" -d 'Agent health and, per target, the certificate on disk and the last result'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "targets" -d 'Configured targets and their kinds, files and commands'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "watch" -d 'Stream every deploy and drop-directory event of the agent until interrupted'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "rollback" -d 'Put the previous certificate set back, reload, and verify it is served'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "history" -d 'Past deploys and rollbacks, newest first, from the agent\'s journal'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "verify" -d 'Probe the target\'s endpoint now and compare what it serves with the certificate on disk (exit 0 match, 5 mismatch or unreachable)'
complete -c certctl -n "__fish_certctl_using_subcommand help; and not __fish_seen_subcommand_from deploy status targets watch rollback history verify help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'

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
complete -c certctl -n "__fish_certctl_using_subcommand deploy status watch rollback history verify" -f -a "(__fish_certctl_target_names)"
