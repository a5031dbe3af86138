#!/usr/bin/env bash
# Builds the Debian package of certctl (agent, CLI, units, man pages,
# completions, default configuration):
#
#   packaging/build-deb.sh                      # -> target/debian/certctl_<version>_<arch>.deb
#   packaging/build-deb.sh --features failpoints --output DIR   # test build (see packaging/README.md)
#
# It builds both binaries in release mode, then packages them with cargo-deb
# (metadata: [package.metadata.deb] in agent/Cargo.toml). cargo-deb is
# installed with `cargo install --locked` when missing. cargo-deb writes no
# DEBIAN/md5sums (what `dpkg --verify` and debsums check), so the package
# is unpacked, given one and packed again with dpkg-deb. The path of the
# .deb is printed on stdout; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

# The cargo-deb release this packaging is written and tested against.
CARGO_DEB_VERSION=3.8.0

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "$0" >&2
}

features=""
output=""
while [ $# -gt 0 ]; do
    case "$1" in
        --features) features="${2:?--features needs a list, e.g. failpoints}"; shift 2 ;;
        --output) output="${2:?--output needs a file or directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; usage; exit 2 ;;
    esac
done

if ! cargo deb --version >/dev/null 2>&1; then
    echo "==> cargo-deb is missing: cargo install cargo-deb --locked --version $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

# Features are the agent's (agent/Cargo.toml [features]), so the agent is
# built on its own: `certctl-agent/<feature>` would name the crate's
# dev-dependency on itself, not the package being built.
build=(cargo build --release --locked -p certctl-agent)
if [ -n "$features" ]; then
    build+=(--features "$features")
fi
echo "==> ${build[*]}" >&2
"${build[@]}" >&2
echo "==> cargo build --release --locked -p certctl-cli" >&2
cargo build --release --locked -p certctl-cli >&2

deb=(cargo deb -p certctl-agent --no-build)
if [ -n "$output" ]; then
    mkdir -p "$(dirname "$output/x")"
    deb+=(--output "$output")
fi
echo "==> ${deb[*]}" >&2
path=$("${deb[@]}" | tail -n 1)

echo "==> DEBIAN/md5sums" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -R "$path" "$work/root"
(
    cd "$work/root"
    find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
        | xargs -0 md5sum >DEBIAN/md5sums
)
chmod 0644 "$work/root/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz --build "$work/root" "$work/out.deb" >/dev/null
mv "$work/out.deb" "$path"
echo "$path"
