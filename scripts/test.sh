#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the real servers and the
# systemd tools the integration tests drive (when root and missing), builds
# the Debian package the systemd-nspawn test installs (as root), then
# tests, the benchmark harness's smoke run, lints and format check.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# jemalloc, the agent's allocator, is built from C with make (agent/src/main.rs).
command -v make >/dev/null 2>&1 || need+=(make)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
# The mail tests look for these service binaries (agent/tests/it/support/dovecot.rs).
[ -x /usr/lib/dovecot/imap-login ] || [ -x /usr/libexec/dovecot/imap-login ] || need+=(dovecot-imapd)
[ -x /usr/lib/dovecot/pop3-login ] || [ -x /usr/libexec/dovecot/pop3-login ] || need+=(dovecot-pop3d)
# The fsync-ordering test runs the agent under strace (agent/tests/it/strace.rs).
command -v strace >/dev/null 2>&1 || need+=(strace)
# The kind tests (agent/tests/it/*_kind.rs) run these servers too.
command -v apache2 >/dev/null 2>&1 || [ -x /usr/sbin/apache2 ] || need+=(apache2)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v caddy >/dev/null 2>&1 || [ -x /usr/bin/caddy ] || need+=(caddy)
# The keystore kind's tests list keystores with keytool and serve one from Java.
command -v keytool >/dev/null 2>&1 || need+=(default-jdk-headless)
# The package test runs lintian on the built .deb (agent/tests/it/package.rs).
command -v lintian >/dev/null 2>&1 || need+=(lintian)
# The ACME recipes (examples/acme/, agent/tests/it/acme.rs) run these
# clients against pebble, the ACME test server.
command -v pebble >/dev/null 2>&1 || need+=(pebble)
command -v certbot >/dev/null 2>&1 || need+=(certbot)
command -v lego >/dev/null 2>&1 || need+=(lego)
command -v dehydrated >/dev/null 2>&1 || need+=(dehydrated)
command -v uacme >/dev/null 2>&1 || need+=(uacme)
# The alerting rules' test runs promtool (agent/tests/it/alert_rules.rs).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The completion tests run certctl's zsh and fish scripts (bash is there).
command -v zsh >/dev/null 2>&1 || need+=(zsh)
command -v fish >/dev/null 2>&1 || need+=(fish)
# systemd: systemd-analyze (unit checks) and systemd-socket-activate;
# systemd-container and debootstrap: the end-to-end test of the package.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
# The SSH transport's tests run a real sshd with the external sftp-server,
# and the agent's side is the OpenSSH client (agent/tests/it/remote_transport.rs).
[ -x /usr/sbin/sshd ] && [ -x /usr/lib/openssh/sftp-server ] || need+=(openssh-server)
# The fleet test drives containers with Ansible over SSH (agent/tests/it/fleet.rs).
command -v ansible-playbook >/dev/null 2>&1 || need+=(ansible-core)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
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

if [ "$(id -u)" -eq 0 ] && ! id certctl-ssh-test >/dev/null 2>&1; then
    # The unprivileged account the SSH transport's tests log in as
    # (agent/tests/it/support/sshd.rs): a POSIX shell, since remote
    # commands run through it, and the password field `*` (no password,
    # but not locked: sshd without PAM refuses a locked `!` account).
    echo "==> creating the account certctl-ssh-test (SSH transport tests)"
    useradd --system --create-home --home-dir /var/lib/certctl-ssh-test \
        --shell /bin/sh certctl-ssh-test
    usermod -p '*' certctl-ssh-test
fi

if [ "$(id -u)" -eq 0 ] && [ -z "${CERTCTL_TEST_DEB:-}" ]; then
    # The package the systemd-nspawn test installs: a release build with
    # the watchdog failpoint compiled in (installs cargo-deb when missing).
    echo "==> packaging/build-deb.sh --features failpoints (for the end-to-end test)"
    deb=$(packaging/build-deb.sh --features failpoints \
        --output "${CARGO_TARGET_DIR:-target}/debian/e2e")
    CERTCTL_TEST_DEB=$(realpath "$deb")
    export CERTCTL_TEST_DEB
fi

echo "==> cargo test"
cargo test --workspace --locked
# The benchmark harness, a few iterations of every figure on the debug
# binaries cargo test just built, so it cannot rot (docs/performance.md).
# With --compare-bin (the same agent), so the comparison paths run too.
echo "==> cargo xtask bench --smoke"
cargo run --locked --quiet -p xtask -- bench --smoke \
    --compare-bin "${CARGO_TARGET_DIR:-target}/debug/certctl-agent"
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> all checks passed"
