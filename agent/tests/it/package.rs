//! The Debian package's own files and the built `.deb`:
//!
//! - `packaging/debian/postrm` holds cargo-deb's `#DEBHELPER#` marker once,
//!   on a line of its own (cargo-deb expands every occurrence, comments
//!   included), and purge removes only the agent's own directories;
//! - `packaging/debian/changelog` starts with the package's version;
//! - the built package has `DEBIAN/md5sums` covering every file,
//!   `changelog.Debian.gz`, and `lintian` reports no error and no warning
//!   on it (`packaging/debian/lintian-overrides` says why one is overridden).
//!
//! The `.deb` is `CERTCTL_TEST_DEB` (set by `scripts/test.sh`), else it is
//! built as the systemd-nspawn test builds it, as root only (a release
//! build); without root and without `CERTCTL_TEST_DEB` the lintian test
//! says it skipped. A missing `lintian` fails unless
//! `CERTCTL_TEST_ALLOW_MISSING_SERVERS=1`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::process::run_bounded;
use crate::support::{find_program, server_missing};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap()
}

/// `version-revision` as agent/Cargo.toml's `[package.metadata.deb]` makes it.
fn package_version() -> String {
    let manifest: toml::Value = toml::from_str(&read("agent/Cargo.toml")).unwrap();
    let revision = manifest["package"]["metadata"]["deb"]["revision"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !revision.is_empty(),
        "a non-native package: it has a revision"
    );
    format!("{}-{revision}", env!("CARGO_PKG_VERSION"))
}

#[test]
fn postrm_expands_debhelper_once_and_purges_only_the_agents_state() {
    let postrm = read("packaging/debian/postrm");
    assert_eq!(
        postrm.matches("#DEBHELPER#").count(),
        1,
        "cargo-deb expands every #DEBHELPER#, comments included:\n{postrm}"
    );
    assert!(postrm.lines().any(|l| l == "#DEBHELPER#"), "{postrm}");
    let purge: Vec<&str> = postrm
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("rm ") || l.starts_with("rmdir "))
        .collect();
    assert_eq!(
        purge,
        [
            "rm -rf /var/lib/certctl/state /var/lib/certctl/drop /run/certctl",
            "rmdir --ignore-fail-on-non-empty /var/lib/certctl 2>/dev/null || true",
        ],
        "purge removes the agent's directories, never /var/lib/certctl wholesale"
    );
    // The directories purge removes are the ones the package creates.
    let tmpfiles = read("packaging/tmpfiles.d/certctl-agent.conf");
    for dir in ["/var/lib/certctl/state", "/var/lib/certctl/drop"] {
        assert!(tmpfiles.contains(dir), "{dir} not in tmpfiles.d");
    }
}

#[test]
fn changelog_starts_with_the_package_version() {
    let changelog = read("packaging/debian/changelog");
    let first = changelog.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("certctl ({}) ", package_version())),
        "packaging/debian/changelog must start with the package version {}: {first}",
        package_version()
    );
}

#[test]
fn the_built_package_passes_lintian() {
    let deb = match std::env::var_os("CERTCTL_TEST_DEB") {
        Some(p) => std::path::PathBuf::from(p),
        None if nix::unistd::geteuid().is_root() => crate::nspawn::package(),
        None => {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIPPED the_built_package_passes_lintian: no CERTCTL_TEST_DEB, and building one needs root\n",
            );
            return;
        }
    };
    let info = run_bounded(
        Command::new("dpkg-deb").arg("-I").arg(&deb).arg("md5sums"),
        Duration::from_secs(60),
    );
    assert_eq!(info.code, 0, "no DEBIAN/md5sums: {}", info.stderr);
    let contents = run_bounded(
        Command::new("dpkg-deb").arg("-c").arg(&deb),
        Duration::from_secs(60),
    );
    assert_eq!(contents.code, 0, "{}", contents.stderr);
    let files: Vec<&str> = contents
        .stdout
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches("./"))
        .collect();
    let mut sums: Vec<&str> = info
        .stdout
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, p)| p))
        .collect();
    sums.sort_unstable();
    let mut want = files.clone();
    want.sort_unstable();
    assert_eq!(sums, want, "md5sums lists every file of the package");
    assert!(
        files.contains(&"usr/share/doc/certctl/changelog.Debian.gz"),
        "{files:?}"
    );
    let version = run_bounded(
        Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"),
        Duration::from_secs(60),
    );
    assert_eq!(version.stdout.trim(), package_version());

    let Some(lintian) = find_program("lintian", &["/usr/bin/lintian"]) else {
        if server_missing("lintian") {
            return;
        }
        unreachable!()
    };
    let out = run_bounded(
        Command::new(lintian)
            .args(["--tag-display-limit", "0"])
            .arg(&deb),
        Duration::from_secs(600),
    );
    let errors: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        errors.is_empty(),
        "lintian reports errors or warnings on {}:\n{}\n{}",
        deb.display(),
        out.stdout,
        out.stderr
    );
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("lintian on {}:\n{}", deb.display(), out.stdout).as_bytes(),
    );
}
