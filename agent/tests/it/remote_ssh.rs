//! Remote targets (`[target.ssh]`) end to end: the real agent writes a
//! target's files through a real OpenSSH server from Debian
//! ([`Sshd`]: its own host key, an unprivileged account, a loopback port)
//! and runs the target's commands there; nginx, on this machine but
//! running as that account, serves the files; the agent verifies by a TLS
//! handshake from its side.
//!
//! The remote host is this machine, so the tests look at the files
//! directly: what a reader on the remote side sees during deploys, what a
//! crash leaves, who owns what.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::assert::{arg, done, temp_files};
use crate::support::invariants::{self, FileTarget};
use crate::support::nginx::{Nginx, nginx_available};
use crate::support::pki::{self, Leaf};
use crate::support::readers::FileReader;
use crate::support::sshd::{Sshd, sshd_available};
use crate::support::{TestEnv, tls, toml_array, toml_path, toml_str};

const SNI: &str = "edge.test";
const TARGET: &str = "edge";
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote nginx target: sshd with its account, nginx running as that
/// account on files in `dir` (the account's), and the agent's config.
struct Remote {
    env: TestEnv,
    sshd: Sshd,
    nginx: Nginx,
    /// `<account dir>/tls`, holding `cert.pem` and `key.pem`.
    dir: PathBuf,
}

impl Remote {
    /// `old` in place and served; the target pinned to the host key(s) in
    /// the file `pin` picks (the real one: [`Sshd::known_hosts`]).
    fn start(old: &Leaf, pin: fn(&Sshd) -> PathBuf) -> Option<Remote> {
        if !nginx_available() || !sshd_available() {
            return None;
        }
        let sshd = Sshd::start();
        let dir = sshd.account_dir().join("tls");
        std::fs::create_dir(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        pki::write_mode(&cert, &old.fullchain_pem(), 0o644);
        pki::write_mode(&key, &old.key_pem, 0o600);
        for p in [&dir, &cert, &key] {
            chown(p, sshd.uid(), sshd.gid());
        }
        let nginx = Nginx::builder(&sshd.account_dir().join("nginx"))
            .vhost(SNI, &cert, &key)
            .run_as(sshd.user())
            .start();
        serves(&nginx, old);
        let mut env = TestEnv::new();
        let ep = sshd.endpoint();
        let body = format!(
            "kind = \"nginx\"\n\
             cert_path = {cert}\n\
             key_path = {key}\n\
             validate = {validate}\n\
             reload = {reload}\n\
             command_timeout = \"30s\"\n\
             [target.ssh]\n\
             host = \"127.0.0.1\"\n\
             port = {port}\n\
             user = {user}\n\
             identity_file = {identity}\n\
             known_hosts = {known_hosts}\n\
             [target.verify]\n\
             endpoint = {endpoint}\n\
             server_name = {sni}\n\
             timeout = \"5s\"\n",
            cert = toml_path(&cert),
            key = toml_path(&key),
            validate = toml_array(&nginx.validate_argv()),
            reload = toml_array(&nginx.reload_argv()),
            port = ep.port,
            user = toml_str(&ep.user),
            identity = toml_path(&ep.identity_file),
            known_hosts = toml_path(&pin(&sshd)),
            endpoint = toml_str(nginx.endpoint()),
            sni = toml_str(SNI),
        );
        env.target(TARGET, &body);
        Some(Remote {
            env,
            sshd,
            nginx,
            dir,
        })
    }

    fn deploy(&self, leaf: &Leaf, stem: &str) -> crate::support::CtlOutput {
        let f = self.env.inputs(leaf, stem);
        self.env.ctl(&[
            "--json",
            "deploy",
            TARGET,
            "--cert",
            arg(&f.fullchain),
            "--key",
            arg(&f.key),
        ])
    }

    /// Replaces the target's validate command with `validate` (a TOML
    /// array) and, when given, its `command_timeout`.
    fn set_validate(&mut self, validate: &str, timeout: Option<&str>) {
        let body = target_body(&self.env.config_text());
        let mut body = body.replace(
            &format!("validate = {}", toml_array(&self.nginx.validate_argv())),
            &format!("validate = {validate}"),
        );
        if let Some(t) = timeout {
            body = body.replace(
                "command_timeout = \"30s\"",
                &format!("command_timeout = {}", toml_str(t)),
            );
        }
        self.env.replace_target(TARGET, &body);
    }

    fn file_target(&self) -> FileTarget<'_> {
        FileTarget {
            name: TARGET,
            dir: &self.dir,
            retention: 3,
        }
    }

    /// Names and bytes of everything in the target's directory (backups
    /// included), for "nothing was written".
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>, u32)> {
        let mut out = Vec::new();
        walk(&self.dir, &mut out);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>, u32)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            walk(&e.path(), out);
        } else {
            out.push((
                e.path(),
                std::fs::read(e.path()).unwrap_or_default(),
                meta.mode(),
            ));
        }
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap();
    }
}

#[track_caller]
fn serves(nginx: &Nginx, leaf: &Leaf) {
    if let Err(e) = tls::wait_until_served(nginx.port(), SNI, &leaf.sha256_hex, SERVE_TIMEOUT) {
        panic!("{e}\nnginx logs:\n{}", nginx.error_log());
    }
}

/// How many times sshd let the agent log in.
fn logins(sshd: &Sshd) -> usize {
    sshd.log().matches("Accepted publickey").count()
}

#[test]
fn a_remote_nginx_deploy_is_written_over_ssh_and_verified_by_handshake() {
    let a = pki::issue_cert(&[SNI]);
    let Some(r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    let _agent = r.env.spawn_agent();
    let b = pki::issue_cert(&[SNI]);
    let out = r.deploy(&b, "b");
    out.assert_code(0);
    let lines = out.json_lines();
    let result = done(&lines);
    assert_eq!(result["outcome"], "deployed", "{out}");
    assert_eq!(result["verification"], "verified", "{out}");
    assert_eq!(result["disk_sha256"], b.sha256_hex.as_str(), "{out}");
    serves(&r.nginx, &b);

    // The files are b's, with the modes and owner they had: the account's.
    let cert = r.dir.join("cert.pem");
    let key = r.dir.join("key.pem");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), b.fullchain_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), b.key_pem);
    for (f, mode) in [(&cert, 0o644), (&key, 0o600)] {
        let m = std::fs::metadata(f).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "{}", f.display());
        assert_eq!((m.uid(), m.gid()), (r.sshd.uid(), r.sshd.gid()));
    }
    assert!(temp_files(&r.dir).is_empty(), "{:?}", temp_files(&r.dir));
    // The previous files are kept as a backup on the remote side, private.
    let backups = r.dir.join(".certctl/backup").join(TARGET);
    let sets: Vec<_> = std::fs::read_dir(&backups).unwrap().flatten().collect();
    assert_eq!(sets.len(), 1, "{sets:?}");
    assert_eq!(
        std::fs::read_to_string(sets[0].path().join("cert.pem")).unwrap(),
        a.fullchain_pem()
    );
    assert_eq!(
        std::fs::metadata(&backups).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The same material again: nothing to write, nothing reloaded.
    let again = r.deploy(&b, "b2");
    again.assert_code(0);
    assert_eq!(done(&again.json_lines())["outcome"], "unchanged", "{again}");

    // Shown like a local target, with the host its files are on.
    let host = format!("{}@127.0.0.1:{}", r.sshd.user(), r.sshd.port());
    let targets = r.env.ctl(&["--json", "targets"]);
    targets.assert_code(0);
    assert_eq!(
        targets.json()["targets"][0]["host"],
        host.as_str(),
        "{targets}"
    );
    let status = r.env.ctl(&["--json", "status"]);
    status.assert_code(0);
    let t = &status.json()["targets"][0];
    assert_eq!(t["host"], host.as_str(), "{status}");
    assert_eq!(t["cert_sha256"], b.sha256_hex.as_str(), "{status}");
    assert_eq!(t["disk_state"], "ok", "{status}");
    let text = r.env.ctl(&["status"]);
    assert!(text.stdout.contains(&format!("nginx on {host}")), "{text}");
    let list = r.env.ctl(&["targets"]);
    assert!(list.stdout.contains(&format!("nginx on {host}")), "{list}");

    // One login for all of it: the connection is reused.
    assert_eq!(logins(&r.sshd), 1, "sshd log:\n{}", r.sshd.log());
}

#[test]
fn an_unknown_or_changed_host_key_is_refused_before_anything_is_sent() {
    let a = pki::issue_cert(&[SNI]);
    let b = pki::issue_cert(&[SNI]);
    for (which, pin) in [
        ("changed", Sshd::wrong_known_hosts as fn(&Sshd) -> PathBuf),
        ("unknown", Sshd::empty_known_hosts),
    ] {
        let Some(r) = Remote::start(&a, pin) else {
            return;
        };
        let before = r.snapshot();
        let _agent = r.env.spawn_agent();
        let out = r.deploy(&b, "b");
        assert_ne!(out.code, 0, "{which}: {out}");
        let error = done(&out.json_lines())["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains(&r.sshd.host_fingerprint()),
            "{which}: the presented key's fingerprint is named: {error}"
        );
        let said = if which == "changed" {
            "does not match the known_hosts file"
        } else {
            "is not in the known_hosts file"
        };
        assert!(error.contains(said), "{which}: {error}");
        assert_eq!(r.snapshot(), before, "{which}: nothing is written");
        assert_eq!(logins(&r.sshd), 0, "{which}: never logged in");
        serves(&r.nginx, &a);
    }
}

/// The body of target `edge` in a config text (what follows its name).
fn target_body(config: &str) -> String {
    let start = config
        .find(&format!("name = {}\n", toml_str(TARGET)))
        .expect("the target in the config");
    let body = &config[start..];
    body.split_once('\n')
        .map_or("", |(_, rest)| rest)
        .trim()
        .to_owned()
}

#[test]
fn a_failing_remote_validate_command_puts_the_previous_files_back() {
    let a = pki::issue_cert(&[SNI]);
    let Some(mut r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    r.set_validate(
        "[\"sh\", \"-c\", \"echo 'emerg: broken on the remote side' >&2; exit 1\"]",
        None,
    );
    let _agent = r.env.spawn_agent();
    let before = std::fs::read(r.dir.join("cert.pem")).unwrap();
    let b = pki::issue_cert(&[SNI]);
    let out = r.deploy(&b, "b");
    assert_ne!(out.code, 0, "{out}");
    let lines = out.json_lines();
    let error = done(&lines)["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("emerg: broken on the remote side") && error.contains("previous files"),
        "the remote stderr and the rollback are said: {out}"
    );
    assert_eq!(std::fs::read(r.dir.join("cert.pem")).unwrap(), before);
    let v = invariants::files(&r.file_target(), &[&a]);
    assert!(v.is_empty(), "{v:#?}");
    serves(&r.nginx, &a);
}

#[test]
fn a_hung_remote_command_is_stopped_on_the_remote_host_at_its_timeout() {
    let a = pki::issue_cert(&[SNI]);
    let Some(mut r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    r.set_validate("[\"sleep\", \"300\"]", Some("1s"));
    let _agent = r.env.spawn_agent();
    let b = pki::issue_cert(&[SNI]);
    let out = r.deploy(&b, "b");
    assert_ne!(out.code, 0, "{out}");
    let error = done(&out.json_lines())["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("timed out after 1s"), "{error}");
    let v = invariants::files(&r.file_target(), &[&a]);
    assert!(v.is_empty(), "{v:#?}");
    // The remote `sleep` is gone too, not left running on that host.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = sleeping(r.sshd.uid());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remote sleep still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PIDs of `sleep 300` processes of `uid`.
fn sleeping(uid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(e.path()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if meta.uid() == uid && cmd.starts_with(b"sleep\x00300") {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_killed_agent_mid_remote_deploy_is_recovered_over_ssh() {
    let old = pki::issue_cert(&[SNI]);
    for (point, expect) in [
        ("after-temp-write", "old"),
        ("after-backup", "old"),
        ("between-renames", "old"),
        ("after-commit", "new"),
        ("during-reload", "new"),
    ] {
        let Some(r) = Remote::start(&old, Sshd::known_hosts) else {
            return;
        };
        let new = pki::issue_cert(&[SNI]);
        let mut agent = r.env.spawn_agent_env(&[("CERTCTL_FAILPOINT", point)]);
        let out = r.deploy(&new, "new");
        assert_ne!(out.code, 0, "{point}: the deploy cannot finish: {out}");
        let status = agent
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{point}: the agent did not crash:\n{}", agent.log()));
        assert!(!status.success(), "{point}: {}", agent.log());
        assert!(
            agent.log().contains("failpoint: aborting"),
            "{point}: died elsewhere:\n{}",
            agent.log()
        );
        drop(agent);

        // Recovery at start acts on the remote files through SSH.
        let _agent = r.env.spawn_agent();
        let want = if expect == "old" { &old } else { &new };
        let v = invariants::files(&r.file_target(), &[want]);
        assert!(v.is_empty(), "{point}: {v:#?}");
        let v = invariants::journal(&r.env);
        assert!(v.is_empty(), "{point}: {v:#?}");
        serves(&r.nginx, want);
        let history = r.env.ctl(&["--json", "history", TARGET]);
        assert_eq!(
            history.json()["history"][0]["recovered"],
            true,
            "{point}: {history}"
        );
    }
}

#[test]
fn a_temp_file_left_on_the_remote_host_is_swept_by_the_next_deploy() {
    let a = pki::issue_cert(&[SNI]);
    let Some(r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    // What a run killed after writing a temp (and whose journal was lost
    // with it) leaves.
    let stray = r.dir.join(".certctl-tmp-20261201T000000Z-dead-cert.pem");
    std::fs::write(&stray, "partial").unwrap();
    chown(&stray, r.sshd.uid(), r.sshd.gid());
    let _agent = r.env.spawn_agent();
    assert!(stray.exists(), "remote targets are not swept at start");
    let b = pki::issue_cert(&[SNI]);
    r.deploy(&b, "b").assert_code(0);
    assert!(!stray.exists(), "the next deploy sweeps it");
    let v = invariants::files(&r.file_target(), &[&b]);
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn a_remote_deploys_sweep_leaves_another_targets_temp_files_alone() {
    // Two remote targets in one remote directory: each deploy holds only
    // its own target's lock, so its sweep must not take the other's temp
    // files (which, during that target's deploy, are its files in flight).
    let a = pki::issue_cert(&[SNI]);
    let Some(mut r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    let body = target_body(&r.env.config_text());
    let ssh = body
        .split_once("[target.ssh]")
        .and_then(|(_, rest)| rest.split_once("[target.verify]"))
        .map(|(ssh, _)| ssh.trim().to_owned())
        .expect("the [target.ssh] table");
    r.env.target(
        "other",
        &format!(
            "kind = \"file\"\ncert_path = {}\nkey_path = {}\n[target.ssh]\n{ssh}\n",
            toml_path(&r.dir.join("other.crt")),
            toml_path(&r.dir.join("other.key")),
        ),
    );
    let mine = r.dir.join(".certctl-tmp-20261201T000000Z-dead-cert.pem");
    let theirs = r.dir.join(".certctl-tmp-20261201T000000Z-busy-other.crt");
    for p in [&mine, &theirs] {
        std::fs::write(p, "partial").unwrap();
        chown(p, r.sshd.uid(), r.sshd.gid());
    }
    let _agent = r.env.spawn_agent();
    let b = pki::issue_cert(&[SNI]);
    r.deploy(&b, "b").assert_code(0);
    assert!(!mine.exists(), "the deploy to {TARGET} sweeps its own");
    assert!(theirs.exists(), "and leaves the other target's");
    let c = pki::issue_cert(&["other.test"]);
    let f = r.env.inputs(&c, "c");
    r.env
        .ctl(&[
            "deploy",
            "other",
            "--cert",
            arg(&f.fullchain),
            "--key",
            arg(&f.key),
        ])
        .assert_code(0);
    assert!(!theirs.exists(), "the other target's deploy sweeps its own");
    assert_eq!(
        std::fs::read_to_string(r.dir.join("other.crt")).unwrap(),
        c.fullchain_pem()
    );
    let v = invariants::files(&r.file_target(), &[&b]);
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn a_reader_on_the_remote_host_never_sees_a_torn_file() {
    let a = pki::issue_cert(&[SNI]);
    let b = pki::issue_cert(&[SNI]);
    let Some(r) = Remote::start(&a, Sshd::known_hosts) else {
        return;
    };
    let _agent = r.env.spawn_agent();
    let (fa, fb) = (a.fullchain_pem(), b.fullchain_pem());
    let certs = FileReader::start(&r.dir.join("cert.pem"), move |text| {
        if text == fa || text == fb {
            Ok(())
        } else {
            Err(format!("neither set's certificate ({} bytes)", text.len()))
        }
    });
    let (ka, kb) = (a.key_pem.clone(), b.key_pem.clone());
    let keys = FileReader::start(&r.dir.join("key.pem"), move |text| {
        if text == ka || text == kb {
            Ok(())
        } else {
            Err(format!("neither set's key ({} bytes)", text.len()))
        }
    });
    for i in 0..6 {
        let leaf = if i % 2 == 0 { &b } else { &a };
        r.deploy(leaf, &format!("d{i}")).assert_code(0);
    }
    let (certs, keys) = (certs.finish(), keys.finish());
    for seen in [&certs, &keys] {
        assert!(seen.violations.is_empty(), "{:#?}", seen.violations);
        assert!(seen.checked > 0, "the reader ran");
    }
    serves(&r.nginx, &a);
}
