# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_certctl_agent_global_optspecs
    string join \n config= h/help V/version
end

function __fish_certctl_agent_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_certctl_agent_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_certctl_agent_using_subcommand
    set -l cmd (__fish_certctl_agent_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -l config -d 'Configuration file' -r -F
complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -s V -l version -d 'Print version'
complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -f -a "check-config" -d 'Parse and validate the configuration, print the targets, exit 0 or 64'
complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -f -a "print-dropin" -d 'Print the systemd drop-in the configured targets need under the hardened unit (ReadWritePaths=, capabilities, ...), for /etc/systemd/system/certctl-agent.service.d/targets.conf; exit 0 or 64'
complete -c certctl-agent -n "__fish_certctl_agent_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand check-config" -l config -d 'Configuration file' -r -F
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand check-config" -s h -l help -d 'Print help'
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand print-dropin" -l config -d 'Configuration file' -r -F
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand print-dropin" -s h -l help -d 'Print help'
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand help; and not __fish_seen_subcommand_from check-config print-dropin help" -f -a "check-config" -d 'Parse and validate the configuration, print the targets, exit 0 or 64'
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand help; and not __fish_seen_subcommand_from check-config print-dropin help" -f -a "print-dropin" -d 'Print the systemd drop-in the configured targets need under the hardened unit (ReadWritePaths=, capabilities, ...), for /etc/systemd/system/certctl-agent.service.d/targets.conf; exit 0 or 64'
complete -c certctl-agent -n "__fish_certctl_agent_using_subcommand help; and not __fish_seen_subcommand_from check-config print-dropin help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
