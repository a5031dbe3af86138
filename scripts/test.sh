#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real servers the
# integration tests drive (when root and missing), then tests, the
# benchmark harness's smoke run, lints and format check. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
# The mail tests look for these service binaries (agent/tests/it/support/dovecot.rs).
[ -x /usr/lib/dovecot/imap-login ] || [ -x /usr/libexec/dovecot/imap-login ] || need+=(dovecot-imapd)
[ -x /usr/lib/dovecot/pop3-login ] || [ -x /usr/libexec/dovecot/pop3-login ] || need+=(dovecot-pop3d)
# The fsync-ordering test runs the agent under strace (agent/tests/it/strace.rs).
command -v strace >/dev/null 2>&1 || need+=(strace)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "==> installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if [[ " ${need[*]} " == *" postfix "* ]]; then
            # Without answers postfix's configuration asks what kind of mail
            # server this is; the tests run private instances and need none.
            debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select Local only
postfix postfix/mailname string localhost
EOF
        fi
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "==> missing ${need[*]}: install them (as root: apt-get install ${need[*]}), or set CERTCTL_TEST_ALLOW_MISSING_SERVERS=1 to skip the tests that need them" >&2
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"

echo "==> cargo test"
cargo test --workspace --locked
# The benchmark harness, a few iterations of every figure on the debug
# binaries cargo test just built, so it cannot rot (docs/performance.md).
echo "==> cargo xtask bench --smoke"
cargo run --locked --quiet -p xtask -- bench --smoke
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> all checks passed"
