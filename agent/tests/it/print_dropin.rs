//! `certctl-agent print-dropin`: the real binary on a configuration prints
//! the drop-in for its targets and exits 0, and exits 64 with the
//! configuration error for a configuration that does not load, as
//! `check-config` does. (What it prints per kind is unit-tested in
//! `dropin.rs`; that it is enough under the hardened unit, in `nspawn`.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::agent_bin;
use crate::support::process::run_bounded;

fn print_dropin(config: &Path) -> (i32, String, String) {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("print-dropin").arg("--config").arg(config);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    (out.code, out.stdout, out.stderr)
}

#[test]
fn prints_the_targets_drop_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[agent]\nstate_dir = \"/var/lib/certctl/state\"\ndrop_dir = \"/var/lib/certctl/drop\"\n\
         socket = \"/run/certctl/agent.sock\"\n\n\
         [[target]]\nname = \"web\"\nkind = \"nginx\"\n\
         cert_path = \"tls/web.crt\"\nkey_path = \"tls/web.key\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = print_dropin(&config);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("# /etc/systemd/system/certctl-agent.service.d/targets.conf\n"),
        "{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "[Service]".to_owned(),
            format!("ReadWritePaths={}/tls", dir.path().display()),
            "ReadWritePaths=-/run".to_owned(),
            "ReadWritePaths=-/var/log/nginx".to_owned(),
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE".to_owned(),
        ]
    );
}

#[test]
fn a_bad_configuration_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[agent]\nno_such_key = 1\n").unwrap();
    let (code, stdout, stderr) = print_dropin(&config);
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("no_such_key"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}
