//! `certctl-agent print-dropin`: the systemd drop-in a configuration needs
//! under the shipped, hardened unit (`systemd/certctl-agent.service`,
//! `docs/systemd.md`).
//!
//! The shipped unit makes the whole file system read-only
//! (`ProtectSystem=strict`), keeps only three capabilities and allows IP on
//! loopback only. Every target needs its directories granted, and the
//! validate and reload commands run inside the same sandbox: what they
//! need is decided by the program each command runs (so a kind's default
//! command and the same command configured by hand get the same lines).
//!
//! Pure: a resolved [`Config`] in, a [`DropIn`] out, rendered as the text of
//! `/etc/systemd/system/certctl-agent.service.d/targets.conf`. Every line
//! carries a comment saying which target needs it and why, so an operator
//! can review it before installing it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::hook::{Endpoint, ReloadHook};
use crate::config::keystore::StoreType;
use crate::config::{Config, Target};

/// Where the package installs the drop-in this module prints.
pub const PATH: &str = "/etc/systemd/system/certctl-agent.service.d/targets.conf";

/// Directories the shipped unit already makes writable
/// (`StateDirectory=certctl`, `RuntimeDirectory=certctl`).
const UNIT_WRITABLE: &[&str] = &["/var/lib/certctl", "/run/certctl"];

/// One `ReadWritePaths=` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The directory (or file) made writable.
    pub path: PathBuf,
    /// `-` prefix: a path that may be missing on this host is skipped by
    /// systemd instead of failing the start.
    pub optional: bool,
    /// Who needs it and why, for the comment above the line.
    pub why: String,
}

/// One capability added to `CapabilityBoundingSet=`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// `CAP_...`.
    pub name: &'static str,
    /// Who needs it and why.
    pub why: String,
}

/// What the configured targets need beyond the shipped unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropIn {
    /// `ReadWritePaths=`, each path once, in the order first needed.
    pub paths: Vec<Grant>,
    /// `CapabilityBoundingSet=` additions, each once.
    pub capabilities: Vec<Capability>,
    /// `IPAddressAllow=` additions (addresses, or `any`), with why.
    pub ip_allow: Vec<(String, String)>,
    /// `MemoryDenyWriteExecute=no` (a JIT runs), with why.
    pub jit: Option<String>,
    /// Things the drop-in cannot grant by itself, printed as comments.
    pub notes: Vec<String>,
}

/// What `config` needs in its drop-in.
pub fn plan(config: &Config) -> DropIn {
    let mut d = DropIn::default();
    let a = &config.agent;
    for (key, dir) in [
        ("state_dir", Some(a.state_dir.as_path())),
        ("drop_dir", Some(a.drop_dir.as_path())),
        ("socket", a.socket.parent()),
    ] {
        if let Some(dir) = dir
            && !UNIT_WRITABLE.iter().any(|w| dir.starts_with(w))
        {
            d.path(dir, false, format!("agent.{key}: the agent writes there"));
        }
    }
    if let Some(addr) = a.metrics_listen
        && !addr.ip().is_loopback()
    {
        d.ip(
            "any",
            format!(
                "agent.metrics_listen = {addr}: scrapers on other hosts \
                 (narrow this to their addresses)"
            ),
        );
    }
    for t in &config.targets {
        target(&mut d, t);
    }
    d
}

/// One target's needs.
fn target(d: &mut DropIn, t: &Target) {
    let name = &t.name;
    if let Some(ssh) = &t.ssh {
        // Its files are written and its commands run on that host: here
        // the agent only connects (the control socket is in the state
        // directory, the key and known_hosts are only read).
        remote(d, name, "SSH host", &ssh.host);
        verify_endpoints(d, t);
        return;
    }
    let mut files: Vec<&Path> = vec![&t.cert_path, &t.key_path];
    files.extend(t.chain_path.as_deref());
    for f in files {
        if let Some(dir) = f.parent() {
            d.path(
                dir,
                false,
                format!("target {name}: its files, their temp files and backups (.certctl/)"),
            );
        }
    }
    match &t.reload_hook {
        Some(ReloadHook::TraefikDynamic { config, .. }) => {
            if let Some(dir) = config.parent() {
                d.path(
                    dir,
                    false,
                    format!("target {name}: rewrites traefik's dynamic configuration"),
                );
            }
        }
        Some(ReloadHook::EnvoySds { sds, .. }) => {
            if let Some(dir) = sds.parent() {
                d.path(
                    dir,
                    false,
                    format!("target {name}: writes envoy's SDS file"),
                );
            }
        }
        Some(ReloadHook::CaddyAdmin {
            endpoint: Endpoint::Tcp { host, .. },
            ..
        }) => remote(d, name, "caddy admin_url", host),
        // Connecting to a Unix socket needs no grant: the kernel does not
        // refuse it on a read-only mount.
        Some(ReloadHook::HaproxyMaster { .. } | ReloadHook::HaproxyRuntime { .. })
        | Some(ReloadHook::CaddyAdmin { .. })
        | None => {}
    }
    if let Some(ks) = &t.keystore
        && ks.store_type == StoreType::Jks
    {
        d.jit.get_or_insert_with(|| {
            format!("target {name}: keytool (a JVM, whose JIT needs writable code pages)")
        });
    }
    for argv in [&t.validate, &t.reload] {
        if let Some(program) = argv.first() {
            command(d, name, program);
        }
    }
    verify_endpoints(d, t);
}

/// The addresses a target is verified at.
fn verify_endpoints(d: &mut DropIn, t: &Target) {
    if let Some(v) = &t.verify {
        for e in &v.endpoints {
            let host = match e.address.rsplit_once(':') {
                Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => e.address.as_str(),
            };
            remote(d, &t.name, "verify endpoint", host);
        }
    }
}

/// What a validate or reload command needs, by the program it runs.
fn command(d: &mut DropIn, name: &str, program: &str) {
    let base = Path::new(program)
        .file_name()
        .and_then(|b| b.to_str())
        .unwrap_or(program);
    match base {
        "nginx" => {
            d.path(
                Path::new("/run"),
                true,
                format!(
                    "target {name}: nginx -t opens the pid file (/run/nginx.pid) for \
                     writing; the file is replaced at every nginx start, so its directory \
                     is granted"
                ),
            );
            d.path(
                Path::new("/var/log/nginx"),
                true,
                format!("target {name}: nginx -t opens its error and access logs"),
            );
            d.capability(
                "CAP_NET_BIND_SERVICE",
                format!("target {name}: nginx -t test-binds its listen addresses below 1024"),
            );
        }
        "apachectl" | "apache2ctl" | "apache2" | "httpd" => {
            d.path(
                Path::new("/run/apache2"),
                true,
                format!(
                    "target {name}: apachectl creates its run directory (pid file, \
                     socks/) when it is missing"
                ),
            );
            d.path(
                Path::new("/var/lock/apache2"),
                true,
                format!("target {name}: apachectl creates its lock directory when it is missing"),
            );
        }
        "postfix" => {
            d.path(
                Path::new("/var/spool/postfix/pid"),
                true,
                format!(
                    "target {name}: postfix reload runs `master -t`, which opens the \
                     master's lock file read-write"
                ),
            );
        }
        "keytool" | "java" => {
            d.jit.get_or_insert_with(|| {
                format!("target {name}: {base} (a JVM, whose JIT needs writable code pages)")
            });
        }
        // haproxy -c, systemctl (talks to systemd over its socket; the
        // reload runs in the server's own unit), doveconf, doveadm, caddy:
        // nothing beyond the target's directories.
        _ => {}
    }
}

/// A host the agent or its commands connect to: loopback needs nothing,
/// another address an `IPAddressAllow=`, a name a note.
fn remote(d: &mut DropIn, name: &str, what: &str, host: &str) {
    if host.eq_ignore_ascii_case("localhost") {
        return;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => {}
        Ok(ip) => d.ip(&ip.to_string(), format!("target {name}: {what} {host}")),
        Err(_) => d.notes.push(format!(
            "target {name}: {what} {host} is a host name: add IPAddressAllow= with its \
             addresses (and the DNS server's)"
        )),
    }
}

// === impl DropIn ===

impl DropIn {
    fn path(&mut self, path: &Path, optional: bool, why: String) {
        if let Some(g) = self.paths.iter_mut().find(|g| g.path == path) {
            // A required grant wins over an optional one for the same path.
            g.optional &= optional;
            return;
        }
        self.paths.push(Grant {
            path: path.to_path_buf(),
            optional,
            why,
        });
    }

    fn capability(&mut self, name: &'static str, why: String) {
        if !self.capabilities.iter().any(|c| c.name == name) {
            self.capabilities.push(Capability { name, why });
        }
    }

    fn ip(&mut self, addr: &str, why: String) {
        if !self.ip_allow.iter().any(|(a, _)| a == addr) {
            self.ip_allow.push((addr.to_owned(), why));
        }
    }

    /// The drop-in file for the configuration at `config_path`.
    pub fn render(&self, config_path: &Path) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# {PATH}");
        let _ = writeln!(
            out,
            "# What the targets of {} need under the hardened certctl-agent.service",
            config_path.display()
        );
        let _ = writeln!(
            out,
            "# (printed by `certctl-agent print-dropin`; see docs/systemd.md). Install it, then:"
        );
        let _ = writeln!(
            out,
            "#   systemctl daemon-reload && systemctl restart certctl-agent"
        );
        let _ = writeln!(out, "[Service]");
        for g in &self.paths {
            let _ = writeln!(out, "# {}", g.why);
            let dash = if g.optional { "-" } else { "" };
            let _ = writeln!(out, "ReadWritePaths={dash}{}", quote(&g.path));
        }
        for c in &self.capabilities {
            let _ = writeln!(out, "# {}", c.why);
            let _ = writeln!(out, "CapabilityBoundingSet={}", c.name);
        }
        for (addr, why) in &self.ip_allow {
            let _ = writeln!(out, "# {why}");
            let _ = writeln!(out, "IPAddressAllow={addr}");
        }
        if let Some(why) = &self.jit {
            let _ = writeln!(out, "# {why}");
            let _ = writeln!(out, "MemoryDenyWriteExecute=no");
        }
        for n in &self.notes {
            let _ = writeln!(out, "# note: {n}");
        }
        out
    }
}

/// A path as systemd reads it in a space-separated list: spaces, quotes and
/// backslashes escaped C-style inside double quotes when present.
fn quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    if !s
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '%'))
    {
        return s.into_owned();
    }
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            // A specifier in a unit file.
            '%' => q.push_str("%%"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["tls", "web", "mail", "my dir"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let path = dir.path().join("agent.toml");
        let text = format!(
            "[agent]\nstate_dir = \"/var/lib/certctl/state\"\n\
             drop_dir = \"/var/lib/certctl/drop\"\nsocket = \"/run/certctl/agent.sock\"\n{body}"
        );
        let config = crate::config::parse(&text, &path).unwrap();
        (dir, config)
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn nginx_gets_its_directories_pid_file_logs_and_port_binding() {
        let (dir, c) = parse(
            r#"[[target]]
name = "web"
kind = "nginx"
cert_path = "tls/web.crt"
key_path = "tls/web.key"
chain_path = "web/chain.pem"
"#,
        );
        let text = plan(&c).render(&c.path);
        let d = dir.path().display();
        assert_eq!(
            lines(&text),
            [
                "[Service]".to_owned(),
                format!("ReadWritePaths={d}/tls"),
                format!("ReadWritePaths={d}/web"),
                "ReadWritePaths=-/run".to_owned(),
                "ReadWritePaths=-/var/log/nginx".to_owned(),
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE".to_owned(),
            ]
        );
        assert!(text.starts_with(&format!("# {PATH}\n")), "{text}");
        assert!(
            text.contains("# target web: nginx -t opens the pid file"),
            "{text}"
        );
    }

    #[test]
    fn a_remote_target_needs_only_its_ssh_host_and_verify_endpoint() {
        let (dir, _) = parse("");
        std::fs::write(dir.path().join("id"), "key").unwrap();
        std::fs::write(dir.path().join("known_hosts"), "edge ssh-ed25519 AAAA").unwrap();
        let body = r#"[[target]]
name = "edge"
kind = "nginx"
cert_path = "/etc/nginx/tls/edge.crt"
key_path = "/etc/nginx/tls/edge.key"
[target.ssh]
host = "192.0.2.7"
user = "certdeploy"
identity_file = "id"
known_hosts = "known_hosts"
[target.verify]
endpoint = "198.51.100.9:443"
"#;
        let path = dir.path().join("agent.toml");
        let c = crate::config::parse(body, &path).unwrap();
        let text = plan(&c).render(&c.path);
        // Nothing of nginx's on this host: no directories, no /run, no
        // port binding; the two addresses it connects to.
        assert_eq!(
            lines(&text),
            [
                "[Service]",
                "IPAddressAllow=192.0.2.7",
                "IPAddressAllow=198.51.100.9"
            ],
            "{text}"
        );
        assert!(text.contains("# target edge: SSH host 192.0.2.7"), "{text}");
    }

    #[test]
    fn kinds_get_what_their_commands_need() {
        let (dir, c) = parse(
            r#"[[target]]
name = "a"
kind = "apache"
cert_path = "tls/a.crt"
key_path = "tls/a.key"
validate = ["apache2ctl", "configtest"]
reload = ["apache2ctl", "graceful"]

[[target]]
name = "h"
kind = "haproxy"
pem_path = "web/h.pem"
reload = ["systemctl", "reload", "haproxy"]

[[target]]
name = "m"
kind = "postfix"
cert_path = "mail/m.crt"
key_path = "mail/m.key"
"#,
        );
        let d = dir.path().display();
        assert_eq!(
            lines(&plan(&c).render(&c.path)),
            [
                "[Service]".to_owned(),
                format!("ReadWritePaths={d}/tls"),
                "ReadWritePaths=-/run/apache2".to_owned(),
                "ReadWritePaths=-/var/lock/apache2".to_owned(),
                format!("ReadWritePaths={d}/web"),
                format!("ReadWritePaths={d}/mail"),
                "ReadWritePaths=-/var/spool/postfix/pid".to_owned(),
            ]
        );
    }

    #[test]
    fn a_custom_command_is_judged_by_its_program() {
        let (_dir, c) = parse(
            r#"[[target]]
name = "f"
kind = "file"
cert_path = "tls/f.crt"
key_path = "tls/f.key"
validate = ["/usr/sbin/nginx", "-t"]
"#,
        );
        let p = plan(&c);
        assert_eq!(p.capabilities.len(), 1);
        assert_eq!(p.capabilities[0].name, "CAP_NET_BIND_SERVICE");
        assert!(p.paths.iter().any(|g| g.path == Path::new("/run")));
    }

    #[test]
    fn agent_directories_outside_the_units_own_are_granted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        let path = dir.path().join("agent.toml");
        let text = "[agent]\nstate_dir = \"/srv/certctl/state\"\ndrop_dir = \"/srv/certctl/drop\"\n\
                    metrics_listen = \"0.0.0.0:9793\"\n";
        let c = crate::config::parse(text, &path).unwrap();
        let out = plan(&c).render(&c.path);
        assert_eq!(
            lines(&out),
            [
                "[Service]",
                "ReadWritePaths=/srv/certctl/state",
                "ReadWritePaths=/srv/certctl/drop",
                "IPAddressAllow=any",
            ]
        );
    }

    #[test]
    fn remote_endpoints_and_jit() {
        let (_dir, c) = parse(
            r#"[[target]]
name = "k"
kind = "keystore"
keystore_path = "tls/k.jks"
keystore_type = "jks"
password_file = "tls/pw"

[target.verify]
endpoints = ["192.0.2.10:8443", "[::1]:8443", "app.example.net:443", "localhost:1"]
"#,
        );
        let p = plan(&c);
        assert_eq!(
            p.ip_allow
                .iter()
                .map(|(a, _)| a.as_str())
                .collect::<Vec<_>>(),
            ["192.0.2.10"]
        );
        assert!(p.jit.is_some());
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        let out = p.render(&c.path);
        assert!(out.contains("\nMemoryDenyWriteExecute=no\n"), "{out}");
        assert!(
            out.contains("# note: target k: verify endpoint app.example.net"),
            "{out}"
        );
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        assert_eq!(quote(Path::new("/etc/a b")), "\"/etc/a b\"");
        assert_eq!(quote(Path::new("/etc/50%")), "\"/etc/50%%\"");
        assert_eq!(quote(Path::new("/etc/nginx/tls")), "/etc/nginx/tls");
    }

    #[test]
    fn no_targets_no_lines() {
        let (_dir, c) = parse("");
        assert_eq!(lines(&plan(&c).render(&c.path)), ["[Service]"]);
    }

    /// The drop-ins docs/kinds.md shows are what print-dropin prints for
    /// the example next to them (its directories made under a temp root).
    #[test]
    fn the_kinds_page_shows_what_is_printed() {
        let page =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kinds.md"))
                .unwrap();
        let block = |section: &str, fence: &str, after: &str| -> String {
            let start = page.find(section).unwrap() + section.len();
            let rest = &page[start..];
            let rest = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
            let rest = &rest[rest.find(after).unwrap()..];
            let open = rest.find(fence).unwrap() + fence.len();
            let body = &rest[open..];
            body[..body.find("```").unwrap()].to_owned()
        };
        for kind in ["nginx", "apache", "haproxy", "postfix", "dovecot"] {
            let section = format!("\n## {kind}\n");
            let toml_text = block(&section, "```toml\n", "```toml\n");
            let shown = block(&section, "```ini\n", "**Drop-in**");
            let root = tempfile::tempdir().unwrap();
            let r = root.path().to_str().unwrap();
            let mut text = toml_text.clone();
            for line in toml_text.lines() {
                let Some((key, value)) = line.split_once('=') else {
                    continue;
                };
                let key = key.trim();
                if !["cert_path", "key_path", "pem_path"].contains(&key) {
                    continue;
                }
                let value = value.split('#').next().unwrap().trim().trim_matches('"');
                let dir = Path::new(value).parent().unwrap();
                std::fs::create_dir_all(format!("{r}{}", dir.display())).unwrap();
                text = text.replace(value, &format!("{r}{value}"));
            }
            let c = crate::config::parse(&text, &root.path().join("agent.toml"))
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            let printed = plan(&c).render(&c.path).replace(r, "");
            let printed = &printed[printed.find("[Service]").unwrap()..];
            assert_eq!(printed, shown, "docs/kinds.md, {kind}");
        }
    }
}
