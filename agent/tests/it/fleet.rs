//! The Ansible collection (`packaging/ansible`, collection `certctl.agent`)
//! against a fleet of three Debian hosts booted with systemd (see
//! `support::nspawn`), driven by the real `ansible-playbook` over SSH.
//!
//! The hosts share the test's network: each one's sshd and nginx listen on
//! ports of their own on 127.0.0.1, so the test probes every nginx itself.
//! The collection is built with `ansible-galaxy collection build` and
//! installed into the temp dir; `ansible-doc` reads the documentation of
//! every module, the role and the filter. SSH uses a key made for the
//! test and host keys pinned in a known_hosts file of the temp dir. Then,
//! in order:
//!
//! 1. the role `certctl.agent.agent` installs the package, writes the
//!    configuration, installs the drop-in `print-dropin` prints and adds a
//!    user to the socket group on all three; a second run changes nothing;
//! 2. the module `certctl.agent.deploy` deploys a certificate from the
//!    controller to nginx on each, verified by the agent and by the test's
//!    own handshake; no key material in Ansible's output, no temp files
//!    left on the hosts; `certctl.agent.status` reports the deployed
//!    certificate as facts;
//! 3. the same deploy again is `ok`, not `changed` (outcome `unchanged`);
//! 4. `--check --diff` with a new certificate says what would change
//!    (fingerprints) and changes nothing on disk or on the wire;
//! 5. the playbook `certctl.agent.rolling_renewal` in batches of two, then
//!    one, with the second host's nginx configuration broken: the first
//!    host is renewed, the second fails with nginx's reason from the agent,
//!    and `max_fail_percentage` stops the play after that batch: the third
//!    host is not touched.
//!
//! Timings (boot, each play, each deploy per host) are printed.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::nspawn::{self, BootOptions, Machine};
use crate::support::process::run_bounded;
use crate::support::{ALLOW_MISSING_SERVERS, find_program, free_port, pki, tls};

/// How many hosts the fleet has.
const HOSTS: usize = 3;
/// Upper bound for one `ansible-playbook` run.
const PLAY_TIMEOUT: Duration = Duration::from_secs(300);
/// The name nginx serves and the agent verifies.
const SNI: &str = "web.test";

/// A line on the test process's stderr (not captured by libtest).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Why the fleet test cannot run here, if it cannot: the container support's
/// reasons, then the controller's tools.
fn unavailable() -> Option<String> {
    if let Some(why) = nspawn::unavailable() {
        return Some(why);
    }
    for (program, package) in [
        ("ansible-playbook", "ansible-core"),
        ("ansible-galaxy", "ansible-core"),
        ("ansible-doc", "ansible-core"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ] {
        if find_program(program, &[&format!("/usr/bin/{program}")]).is_none() {
            return Some(format!(
                "{program} is not installed (apt-get install --no-install-recommends {package})"
            ));
        }
    }
    None
}

/// One host of the fleet.
struct Host {
    name: String,
    ssh_port: u16,
    nginx_port: u16,
    machine: Machine,
}

impl Host {
    /// The certificate file on the host, read from the test's side.
    fn cert_file(&self) -> Vec<u8> {
        std::fs::read(self.machine.root().join("etc/nginx/tls/web.crt")).unwrap()
    }

    fn served(&self) -> String {
        tls::served_leaf_sha256(self.nginx_port, SNI)
            .unwrap_or_else(|e| panic!("{}: probe nginx: {e}", self.name))
    }
}

/// nginx's site on the host's own loopback port.
fn site(port: u16) -> String {
    format!(
        "server {{
    listen 127.0.0.1:{port} ssl;
    server_name {SNI};
    ssl_certificate /etc/nginx/tls/web.crt;
    ssl_certificate_key /etc/nginx/tls/web.key;
    return 200 \"ok\\n\";
}}
"
    )
}

/// Writes what a host needs before it boots: root's authorized key, sshd on
/// its own port with a fresh host key, nginx on its own port with the first
/// certificate, and no other server listening on the shared network.
/// Returns the host's public key, for known_hosts.
fn prepare(
    root: &Path,
    authorized: &str,
    ssh_port: u16,
    nginx_port: u16,
    first: &pki::Leaf,
) -> String {
    let ssh_dir = root.join("root/.ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let keys = ssh_dir.join("authorized_keys");
    std::fs::write(&keys, authorized).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Every copy of the cached tree has the same host keys: each host gets
    // its own.
    for entry in std::fs::read_dir(root.join("etc/ssh")).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let host_key = root.join("etc/ssh/ssh_host_ed25519_key");
    let out = run_bounded(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "certctl-fleet", "-f"])
            .arg(&host_key),
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 0, "ssh-keygen (host key): {}", out.stderr);
    std::fs::write(
        root.join("etc/ssh/sshd_config.d/certctl-test.conf"),
        format!(
            "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey /etc/ssh/ssh_host_ed25519_key\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n"
        ),
    )
    .unwrap();

    // nginx: only the test's site, on this host's port.
    let _ = std::fs::remove_file(root.join("etc/nginx/sites-enabled/default"));
    std::fs::write(
        root.join("etc/nginx/sites-enabled/certctl-test"),
        site(nginx_port),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc/nginx/tls")).unwrap();
    std::fs::write(
        root.join("etc/nginx/tls/web.crt"),
        first.cert_pem.clone() + &first.chain_pem,
    )
    .unwrap();
    std::fs::write(root.join("etc/nginx/tls/web.key"), &first.key_pem).unwrap();
    // Apache and HAProxy are in the tree for the package test; here they
    // would take port 80 of the shared network three times over.
    for unit in [
        "apache2.service",
        "apache2-htcacheclean.service",
        "haproxy.service",
    ] {
        let _ = std::os::unix::fs::symlink("/dev/null", root.join("etc/systemd/system").join(unit));
    }
    std::fs::read_to_string(host_key.with_extension("pub")).unwrap()
}

/// The temp dir of the controller side: key, known_hosts, inventory,
/// collection, certificates, playbooks.
struct Controller {
    dir: tempfile::TempDir,
}

/// One `ansible-playbook` run, its JSON report (`support/ansible_json.py`,
/// a stdout callback) parsed.
struct Play {
    code: i32,
    took: Duration,
    report: Value,
    stdout: String,
    stderr: String,
}

/// Whether a task's name (`role : name` for a role's tasks) is `name`.
fn named(task: &Value, name: &str) -> bool {
    let full = task["task"]["name"].as_str().unwrap_or_default();
    full == name || full.ends_with(&format!(" : {name}"))
}

impl Play {
    /// Each host's result of the task named `task`, over every batch.
    fn results(&self, task: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for play in self.report["plays"].as_array().into_iter().flatten() {
            for t in play["tasks"].as_array().into_iter().flatten() {
                if named(t, task) {
                    for (host, result) in t["hosts"].as_object().into_iter().flatten() {
                        out.insert(host.clone(), result.clone());
                    }
                }
            }
        }
        out
    }

    /// `stats.<host>.<field>` of the recap (0 for a host not in it).
    fn stat(&self, host: &str, field: &str) -> u64 {
        self.report["stats"][host][field].as_u64().unwrap_or(0)
    }

    /// Seconds the task named `task` took, from its first start to its last
    /// end over every batch.
    fn task_secs(&self, task: &str) -> f64 {
        let mut spans = Vec::new();
        for play in self.report["plays"].as_array().into_iter().flatten() {
            for t in play["tasks"].as_array().into_iter().flatten() {
                if named(t, task) {
                    spans.push((
                        t["task"]["duration"]["start"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        t["task"]["duration"]["end"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ));
                }
            }
        }
        spans.iter().map(|(s, e)| iso_secs(e) - iso_secs(s)).sum()
    }

    /// The `n` slowest tasks, `name 1.2s` each, for the timings printed.
    fn slowest(&self, n: usize) -> String {
        let mut all: Vec<(f64, String)> = Vec::new();
        for play in self.report["plays"].as_array().into_iter().flatten() {
            for t in play["tasks"].as_array().into_iter().flatten() {
                let d = &t["task"]["duration"];
                let secs = iso_secs(d["end"].as_str().unwrap_or_default())
                    - iso_secs(d["start"].as_str().unwrap_or_default());
                all.push((
                    secs,
                    t["task"]["name"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        all.sort_by(|a, b| b.0.total_cmp(&a.0));
        all.iter()
            .take(n)
            .map(|(s, name)| format!("{name} {s:.1}s"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn dump(&self) -> String {
        format!(
            "ansible-playbook exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Seconds of the day of the JSON callback's `2026-12-02T02:40:01.123456Z`.
fn iso_secs(stamp: &str) -> f64 {
    let time = stamp
        .split('T')
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let m: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    let s: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    h * 3600.0 + m * 60.0 + s
}

impl Controller {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ansible-playbook PLAYBOOK ARGS` with the JSON callback, the temp
    /// collection path, the test's SSH key and known_hosts.
    fn play(&self, playbook: &str, args: &[&str]) -> Play {
        let dir = self.dir.path();
        let mut cmd = Command::new("ansible-playbook");
        cmd.current_dir(dir)
            .arg("-i")
            .arg(self.path("inventory.ini"))
            .arg(playbook)
            .args(args)
            // An empty configuration file: nothing of the host's
            // /etc/ansible applies.
            .env("ANSIBLE_CONFIG", self.path("ansible.cfg"))
            .env("ANSIBLE_HOME", self.path("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", self.path("ansible-home/tmp"))
            .env("ANSIBLE_COLLECTIONS_PATH", self.path("collections"))
            .env("ANSIBLE_CALLBACK_PLUGINS", self.path("callback_plugins"))
            .env("ANSIBLE_STDOUT_CALLBACK", "certctl_test_json")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_HOST_KEY_CHECKING", "True")
            .env("ANSIBLE_FORKS", "10")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", self.path("cp"))
            .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3");
        let started = Instant::now();
        let out = run_bounded(&mut cmd, PLAY_TIMEOUT);
        let took = started.elapsed();
        let report = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ansible-playbook {playbook}: no JSON report ({e}), exit {}\n{}\n{}",
                out.code, out.stdout, out.stderr
            )
        });
        Play {
            code: out.code,
            took,
            report,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }
}

/// Runs a controller-side command, panicking unless it exits 0; returns stdout.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert_eq!(
        out.code, 0,
        "{what} exited {}\n{}\n{}",
        out.code, out.stdout, out.stderr
    );
    out.stdout
}

/// The certificate files of `leaf` on the controller, under `certs/NAME.*`.
fn write_leaf(c: &Controller, name: &str, leaf: &pki::Leaf) {
    let dir = c.path("certs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.chain")), &leaf.chain_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &leaf.key_pem).unwrap();
}

fn leaf_vars(name: &str) -> [String; 2] {
    [
        "-e".to_owned(),
        format!("cert=certs/{name}.crt key=certs/{name}.key chain=certs/{name}.chain"),
    ]
}

/// A line of the key's base64 body: must never show in Ansible's output.
fn key_marker(leaf: &pki::Leaf) -> String {
    leaf.key_pem
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 20)
        .expect("a key body line")
        .to_owned()
}

fn assert_no_key(play: &Play, leaf: &pki::Leaf, what: &str) {
    let marker = key_marker(leaf);
    assert!(
        !play.stdout.contains(&marker) && !play.stderr.contains(&marker),
        "{what}: key material in ansible's output"
    );
    assert!(
        !play.stdout.contains("PRIVATE KEY"),
        "{what}: a PEM key in ansible's output"
    );
}

/// The role applied to the fleet, with one nginx target per host.
const SITE_PLAYBOOK: &str = r#"---
- name: Install certctl-agent on the fleet
  hosts: certctl
  gather_facts: false
  pre_tasks:
    - name: A user who deploys through the socket
      ansible.builtin.user:
        name: deployer
  roles:
    - role: certctl.agent.agent
      vars:
        certctl_agent_deb: "{{ deb }}"
        certctl_agent_socket_users: [deployer]
        certctl_agent_settings:
          read_groups: []
        certctl_agent_targets:
          - name: web
            kind: nginx
            cert_path: /etc/nginx/tls/web.crt
            key_path: /etc/nginx/tls/web.key
            verify:
              endpoint: "127.0.0.1:{{ nginx_port }}"
              server_name: web.test
              attempts: 5
              backoff: 200ms
"#;

/// The deploy module with controller-side files, then the status module.
const DEPLOY_PLAYBOOK: &str = r#"---
- name: Deploy the certificate
  hosts: certctl
  gather_facts: false
  tasks:
    - name: Deploy
      certctl.agent.deploy:
        target: web
        cert: "{{ cert }}"
        key: "{{ key }}"
        chain: "{{ chain }}"
    - name: Status
      certctl.agent.status:
    - name: Report
      ansible.builtin.debug:
        var: certctl.targets.web.cert_sha256
"#;

#[test]
fn ansible_installs_the_agent_and_rolls_certificates_across_a_fleet() {
    if let Some(why) = unavailable() {
        if std::env::var(ALLOW_MISSING_SERVERS).as_deref() == Ok("1") || why.contains("root") {
            say(&format!(
                "SKIPPED ansible_installs_the_agent_and_rolls_certificates_across_a_fleet: {why}"
            ));
            return;
        }
        panic!("the fleet test cannot run: {why}; or set {ALLOW_MISSING_SERVERS}=1");
    }
    let test_started = Instant::now();
    let deb = crate::nspawn::package();
    let (template, built) = nspawn::rootfs();
    if let Some(took) = built {
        say(&format!(
            "fleet: debootstrap of {} (cold) took {:.1}s",
            nspawn::SUITE,
            took.as_secs_f64()
        ));
    }

    // The controller: SSH key, collection, certificates.
    let c = Controller {
        dir: tempfile::Builder::new()
            .prefix("certctl-fleet-")
            .tempdir()
            .unwrap(),
    };
    for d in [
        "ansible-home/tmp",
        "callback_plugins",
        "cp",
        "collections",
        "dist",
    ] {
        std::fs::create_dir_all(c.path(d)).unwrap();
    }
    std::fs::write(
        c.path("callback_plugins/certctl_test_json.py"),
        include_str!("support/ansible_json.py"),
    )
    .unwrap();
    std::fs::write(c.path("ansible.cfg"), "").unwrap();
    let client_key = c.path("id_ed25519");
    run_ok(
        Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "certctl-fleet-test",
                "-f",
            ])
            .arg(&client_key),
        "ssh-keygen (client key)",
    );
    let authorized = std::fs::read_to_string(client_key.with_extension("pub")).unwrap();

    let collection = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ansible");
    let built = run_ok(
        Command::new("ansible-galaxy")
            .args(["collection", "build", "--force", "--output-path"])
            .arg(c.path("dist"))
            .arg(&collection)
            .env("ANSIBLE_HOME", c.path("ansible-home")),
        "ansible-galaxy collection build",
    );
    let tarball = built
        .split_whitespace()
        .last()
        .expect("ansible-galaxy names the tarball")
        .to_owned();
    run_ok(
        Command::new("ansible-galaxy")
            .args(["collection", "install", "--force", "-p"])
            .arg(c.path("collections"))
            .arg(&tarball)
            .env("ANSIBLE_HOME", c.path("ansible-home")),
        "ansible-galaxy collection install",
    );
    let docs = run_ok(
        Command::new("ansible-doc")
            .args([
                "--json",
                "-t",
                "module",
                "certctl.agent.deploy",
                "certctl.agent.status",
            ])
            .env("ANSIBLE_HOME", c.path("ansible-home"))
            .env("ANSIBLE_COLLECTIONS_PATH", c.path("collections")),
        "ansible-doc",
    );
    let docs: Value = serde_json::from_str(&docs).unwrap();
    for module in ["certctl.agent.deploy", "certctl.agent.status"] {
        assert!(
            docs[module]["doc"]["options"].is_object() && docs[module]["return"].is_object(),
            "ansible-doc {module}: {}",
            docs[module]
        );
    }
    // The role's argument spec and the filter's documentation parse too.
    for (kind, name) in [
        ("role", "certctl.agent.agent"),
        ("filter", "certctl.agent.to_toml"),
    ] {
        let doc = run_ok(
            Command::new("ansible-doc")
                .args(["--json", "-t", kind, name])
                .env("ANSIBLE_HOME", c.path("ansible-home"))
                .env("ANSIBLE_COLLECTIONS_PATH", c.path("collections")),
            "ansible-doc",
        );
        let doc: Value = serde_json::from_str(&doc).unwrap();
        assert!(doc[name].is_object(), "ansible-doc -t {kind} {name}: {doc}");
    }

    let first = pki::issue_cert(&[SNI]);
    let second = pki::issue_cert(&[SNI]);
    let third = pki::issue_cert(&[SNI]);
    for (name, leaf) in [("second", &second), ("third", &third)] {
        write_leaf(&c, name, leaf);
    }

    // Three hosts, booted side by side.
    let boot_started = Instant::now();
    // Six ports free a moment ago, and distinct: each released port could
    // come back from the next bind.
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < 2 * HOSTS {
        picked.insert(free_port());
    }
    let picked: Vec<u16> = picked.into_iter().collect();
    let ports: Vec<(u16, u16)> = picked.chunks(2).map(|p| (p[0], p[1])).collect();
    let hosts: Vec<(Host, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(i, &(ssh_port, nginx_port))| {
                let (template, authorized, first) = (&template, &authorized, &first);
                s.spawn(move || {
                    let name = format!("host{}", i + 1);
                    let mut host_key = String::new();
                    let options = BootOptions {
                        name: format!("certctl-fleet-{}", i + 1),
                        private_network: false,
                    };
                    let (machine, copied, booted) =
                        Machine::boot_with(template, &options, |root| {
                            host_key = prepare(root, authorized, ssh_port, nginx_port, first);
                        });
                    say(&format!(
                        "fleet: {name}: copied the rootfs in {:.1}s, booted in {:.1}s (ssh 127.0.0.1:{ssh_port}, nginx 127.0.0.1:{nginx_port})",
                        copied.as_secs_f64(),
                        booted.as_secs_f64()
                    ));
                    (
                        Host {
                            name,
                            ssh_port,
                            nginx_port,
                            machine,
                        },
                        host_key,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    say(&format!(
        "fleet: {HOSTS} hosts booted in {:.1}s",
        boot_started.elapsed().as_secs_f64()
    ));
    let mut known_hosts = String::new();
    let mut inventory = String::from("[certctl]\n");
    for (h, host_key) in &hosts {
        known_hosts.push_str(&format!("[127.0.0.1]:{} {host_key}", h.ssh_port));
        inventory.push_str(&format!(
            "{} ansible_host=127.0.0.1 ansible_port={} nginx_port={}\n",
            h.name, h.ssh_port, h.nginx_port
        ));
    }
    std::fs::write(c.path("known_hosts"), known_hosts).unwrap();
    inventory.push_str(&format!(
        "\n[certctl:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-F /dev/null -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
         -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes'\n",
        client_key.display(),
        c.path("known_hosts").display()
    ));
    std::fs::write(c.path("inventory.ini"), inventory).unwrap();
    std::fs::write(c.path("site.yml"), SITE_PLAYBOOK).unwrap();
    std::fs::write(c.path("deploy.yml"), DEPLOY_PLAYBOOK).unwrap();
    let hosts: Vec<Host> = hosts.into_iter().map(|(h, _)| h).collect();
    for h in &hosts {
        assert_eq!(
            h.served(),
            pki::sha256_hex(&first.der),
            "{}: before",
            h.name
        );
    }

    // 1. The role, then the role again.
    let deb_var = format!("deb={}", deb.display());
    let play = c.play("site.yml", &["-e", &deb_var]);
    assert_eq!(play.code, 0, "the role:\n{}", play.dump());
    for h in &hosts {
        assert!(
            play.stat(&h.name, "changed") > 0,
            "{}: nothing changed\n{}",
            h.name,
            play.dump()
        );
        assert_eq!(play.stat(&h.name, "failures"), 0);
        let m = &h.machine;
        assert_eq!(
            m.ok("systemctl is-active certctl-agent.socket certctl-agent.service")
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["active", "active"],
            "{}",
            h.name
        );
        let dropin = m.ok("cat /etc/systemd/system/certctl-agent.service.d/targets.conf");
        assert!(
            dropin.lines().any(|l| l == "ReadWritePaths=/etc/nginx/tls"),
            "{}: drop-in:\n{dropin}",
            h.name
        );
        assert!(
            m.ok("id -nG deployer")
                .split_whitespace()
                .any(|g| g == "certctl")
        );
        assert_eq!(m.ok("certctl targets --names").trim(), "web");
        m.ok("certctl-agent check-config");
    }
    say(&format!(
        "fleet: the role on {HOSTS} hosts took {:.1}s; slowest tasks: {}",
        play.took.as_secs_f64(),
        play.slowest(5)
    ));
    let again = c.play("site.yml", &["-e", &deb_var]);
    assert_eq!(again.code, 0, "the role again:\n{}", again.dump());
    for h in &hosts {
        assert_eq!(
            again.stat(&h.name, "changed"),
            0,
            "{}: the role again changed:\n{}",
            h.name,
            again.dump()
        );
    }
    say(&format!(
        "fleet: the role again (no change) took {:.1}s; slowest tasks: {}",
        again.took.as_secs_f64(),
        again.slowest(5)
    ));
    // The role in check mode with a changed setting: reported with its
    // diff, nothing written, nothing restarted.
    let config = |h: &Host| std::fs::read(h.machine.root().join("etc/certctl/agent.toml")).unwrap();
    let pid = |h: &Host| {
        h.machine
            .ok("systemctl show -p MainPID --value certctl-agent.service")
            .trim()
            .to_owned()
    };
    let before: Vec<(Vec<u8>, String)> = hosts.iter().map(|h| (config(h), pid(h))).collect();
    let check = c.play(
        "site.yml",
        &[
            "-e",
            &deb_var,
            "-e",
            r#"{"certctl_agent_settings": {"read_groups": [], "settle": "3s"}}"#,
            "--check",
            "--diff",
        ],
    );
    assert_eq!(check.code, 0, "the role in check mode:\n{}", check.dump());
    let written = check.results("Write the agent's configuration");
    for (h, (config_before, pid_before)) in hosts.iter().zip(&before) {
        let r = &written[&h.name];
        assert_eq!(r["changed"], true, "{}: {r}", h.name);
        assert!(
            r["diff"].to_string().contains("settle = \\\"3s\\\""),
            "{}: the diff shows the new setting: {}",
            h.name,
            r["diff"]
        );
        assert_eq!(&config(h), config_before, "{}: check mode wrote", h.name);
        assert_eq!(&pid(h), pid_before, "{}: check mode restarted", h.name);
    }
    say(&format!(
        "fleet: the role in check mode (one setting changed) took {:.1}s",
        check.took.as_secs_f64()
    ));

    // 2. Deploy from the controller.
    let vars = leaf_vars("second");
    let args: Vec<&str> = vars.iter().map(String::as_str).collect();
    let play = c.play("deploy.yml", &args);
    assert_eq!(play.code, 0, "deploy:\n{}", play.dump());
    assert_no_key(&play, &second, "deploy");
    let want = pki::sha256_hex(&second.der);
    let results = play.results("Deploy");
    let mut per_host = Vec::new();
    for h in &hosts {
        let r = &results[&h.name];
        assert_eq!(r["changed"], true, "{}: {r}", h.name);
        assert_eq!(r["outcome"], "deployed", "{}: {r}", h.name);
        assert_eq!(r["verification"], "verified", "{}: {r}", h.name);
        assert_eq!(r["cert_sha256"], want.as_str(), "{}: {r}", h.name);
        assert_eq!(
            r["invocation"]["module_args"]["key_content"], "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER",
            "{}: {r}",
            h.name
        );
        tls::wait_until_served(h.nginx_port, SNI, &want, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{}: {e}", h.name));
        assert_eq!(
            h.machine
                .ok("ls -A /tmp | grep -c '^certctl-deploy-' || true")
                .trim(),
            "0",
            "{}: the module left its temp dir",
            h.name
        );
        per_host.push(r["duration_ms"].as_u64().unwrap_or(0));
    }
    let facts = play.results("Status");
    for h in &hosts {
        assert_eq!(
            facts[&h.name]["ansible_facts"]["certctl"]["targets"]["web"]["cert_sha256"],
            want.as_str(),
            "{}",
            h.name
        );
    }
    say(&format!(
        "fleet: deploy on {HOSTS} hosts took {:.1}s (task {:.1}s; in the agent {per_host:?} ms)",
        play.took.as_secs_f64(),
        play.task_secs("Deploy")
    ));

    // 3. The same again: ok, not changed.
    let play = c.play("deploy.yml", &args);
    assert_eq!(play.code, 0, "deploy again:\n{}", play.dump());
    for (host, r) in play.results("Deploy") {
        assert_eq!(r["changed"], false, "{host}: {r}");
        assert_eq!(r["outcome"], "unchanged", "{host}: {r}");
    }
    for h in &hosts {
        assert_eq!(play.stat(&h.name, "changed"), 0, "{}", h.name);
    }
    say(&format!(
        "fleet: the same deploy again (unchanged) took {:.1}s (task {:.1}s)",
        play.took.as_secs_f64(),
        play.task_secs("Deploy")
    ));

    // 4. Check mode with a new certificate: reported, not done.
    let before: Vec<Vec<u8>> = hosts.iter().map(Host::cert_file).collect();
    let vars = leaf_vars("third");
    let third_args: Vec<&str> = vars.iter().map(String::as_str).collect();
    let mut check_args = third_args.clone();
    check_args.extend(["--check", "--diff"]);
    let play = c.play("deploy.yml", &check_args);
    assert_eq!(play.code, 0, "check mode:\n{}", play.dump());
    assert_no_key(&play, &third, "check mode");
    let new = pki::sha256_hex(&third.der);
    for (h, before) in hosts.iter().zip(&before) {
        let r = &play.results("Deploy")[&h.name];
        assert_eq!(r["changed"], true, "{}: {r}", h.name);
        assert_eq!(r["outcome"], "dry_run", "{}: {r}", h.name);
        let diff = r["diff"].to_string();
        if h.name == "host1" {
            say(&format!(
                "fleet: check mode diff on host1:\n--- {}\n{}+++ {}\n{}",
                r["diff"]["before_header"].as_str().unwrap_or_default(),
                r["diff"]["before"].as_str().unwrap_or_default(),
                r["diff"]["after_header"].as_str().unwrap_or_default(),
                r["diff"]["after"].as_str().unwrap_or_default()
            ));
        }
        assert!(
            diff.contains(&want) && diff.contains(&new),
            "{}: diff {diff}",
            h.name
        );
        assert_eq!(&h.cert_file(), before, "{}: check mode wrote", h.name);
        assert_eq!(
            h.served(),
            want,
            "{}: check mode changed what is served",
            h.name
        );
    }
    say(&format!(
        "fleet: check mode on {HOSTS} hosts took {:.1}s",
        play.took.as_secs_f64()
    ));

    // 5. A rolling renewal that meets a broken host: the first is renewed,
    //    the broken host fails with nginx's reason, the rest is untouched.
    std::fs::write(
        hosts[1].machine.root().join("etc/nginx/conf.d/broken.conf"),
        "certctl_test_not_a_directive on;\n",
    )
    .unwrap();
    // Absolute: the playbook is the collection's, its directory is not ours.
    let rolling_vars = format!(
        "certctl_target=web certctl_cert={0}/third.crt certctl_key={0}/third.key \
         certctl_chain={0}/third.chain",
        c.path("certs").display()
    );
    // Batches of two, then one: the broken host fails half of the first
    // batch, and only max_fail_percentage (0) stops the play there (a
    // batch whose every host fails stops a play whatever the setting).
    let play = c.play(
        "certctl.agent.rolling_renewal",
        &["-e", &rolling_vars, "-e", r#"{"certctl_serial": [2, 1]}"#],
    );
    assert_eq!(
        play.code,
        2,
        "the rolling renewal stops with a failure:\n{}",
        play.dump()
    );
    assert_no_key(&play, &third, "rolling renewal");
    let results = play.results("Deploy the certificate");
    let renewed = &results["host1"];
    assert_eq!(renewed["outcome"], "deployed", "{renewed}");
    tls::wait_until_served(hosts[0].nginx_port, SNI, &new, Duration::from_secs(10)).unwrap();
    let broken = &results["host2"];
    assert_eq!(broken["failed"], true, "{broken}");
    assert_eq!(broken["outcome"], "validate_failed", "{broken}");
    assert_eq!(broken["rc"], 4, "{broken}");
    let msg = broken["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("validate_failed (exit 4)") && msg.contains("certctl_test_not_a_directive"),
        "the failure names nginx's reason: {msg}"
    );
    assert_eq!(hosts[1].served(), want, "the broken host keeps serving");
    assert!(
        !results.contains_key("host3"),
        "host3 was touched: {}",
        play.dump()
    );
    assert_eq!(
        ["ok", "changed", "failures", "skipped"]
            .iter()
            .map(|f| play.stat("host3", f))
            .sum::<u64>(),
        0,
        "host3 in the recap: {}",
        play.report["stats"]
    );
    assert_eq!(hosts[2].cert_file(), before[2], "host3's files");
    assert_eq!(
        hosts[2].served(),
        want,
        "host3 serves the previous certificate"
    );
    say(&format!(
        "fleet: the rolling renewal (first batch: one renewed, the broken host failed; stop) took {:.1}s: {msg}",
        play.took.as_secs_f64()
    ));

    say(&format!(
        "fleet: the steps took {:.1}s",
        test_started.elapsed().as_secs_f64()
    ));
    // Powered off side by side, as they booted.
    let stopping = Instant::now();
    std::thread::scope(|s| {
        for h in hosts {
            s.spawn(move || drop(h));
        }
    });
    say(&format!(
        "fleet: {HOSTS} hosts powered off in {:.1}s; the whole test took {:.1}s",
        stopping.elapsed().as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    ));
}
