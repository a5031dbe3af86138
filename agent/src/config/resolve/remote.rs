//! `[target.ssh]`: a target whose files are on another host. What such a
//! target may be (a file-based kind, in place, with command reloads), and
//! the keys that reach the host: `host`, `port`, `user`, the key
//! (`identity_file` or `identity_credential`) and the pinned host keys
//! (`known_hosts`, required). docs/remote.md has the reasons.
//!
//! Paths of a remote target are paths on the remote host: they must be
//! absolute and are not looked at here. Owners and groups are numeric
//! ids: names would be looked up on this host, whose users are not the
//! remote host's.

use std::path::PathBuf;
use std::time::Duration;

use super::super::raw::{RawSsh, RawTarget};
use super::super::{SshConfig, SshIdentity};
use super::{Resolver, SECOND};
use crate::kind::Kind;

/// The kinds whose files a remote target can write: the servers that read
/// plain files and reload by a command.
pub(super) const REMOTE_KINDS: &[Kind] = &[
    Kind::File,
    Kind::Nginx,
    Kind::Apache,
    Kind::Haproxy,
    Kind::Postfix,
    Kind::Dovecot,
    Kind::Caddy,
];

impl Resolver<'_> {
    /// The `[target.ssh]` table, checked; `None` when absent or broken
    /// (the problems are recorded).
    pub(super) fn ssh(&mut self, label: &str, raw: &RawTarget) -> Option<SshConfig> {
        let ssh = raw.ssh.as_ref()?;
        let key = |k: &str| format!("{label}.ssh.{k}");
        let host = self.ssh_host(&key("host"), ssh);
        let port = match ssh.port {
            None => 22,
            Some(p) => match u16::try_from(p) {
                Ok(p) if p != 0 => p,
                _ => {
                    self.problem(key("port"), format!("{p} is not a port: use 1 to 65535"));
                    22
                }
            },
        };
        let user = match ssh.user.as_deref() {
            None => {
                self.problem(
                    key("user"),
                    "is missing: name the account the agent logs in as on the remote host",
                );
                String::new()
            }
            Some(u) if !valid_user(u) => {
                self.problem(
                    key("user"),
                    format!(
                        "{u:?} is not an account name: use letters, digits, '.', '_' and '-', \
                         not starting with '-'"
                    ),
                );
                String::new()
            }
            Some(u) => u.to_owned(),
        };
        let identity = match (&ssh.identity_file, &ssh.identity_credential) {
            (Some(_), Some(_)) => {
                self.problem(
                    key("identity_file"),
                    "is set together with identity_credential: keep one of the two",
                );
                None
            }
            (Some(file), None) => self
                .ssh_file(&key("identity_file"), file, "the private key")
                .map(SshIdentity::File),
            (None, Some(name)) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    self.problem(
                        key("identity_credential"),
                        format!(
                            "{name:?} is not a credential name: give the name of \
                             LoadCredential=NAME:FILE in the agent's unit"
                        ),
                    );
                    None
                } else {
                    Some(SshIdentity::Credential(name.clone()))
                }
            }
            (None, None) => {
                self.problem(
                    key("identity_file"),
                    "is missing: give the private key the agent logs in with (identity_file), \
                     or a systemd credential holding it (identity_credential)",
                );
                None
            }
        };
        let known_hosts = match &ssh.known_hosts {
            Some(file) => self.ssh_file(&key("known_hosts"), file, "the pinned host keys"),
            None => {
                self.problem(
                    key("known_hosts"),
                    format!(
                        "is missing: the host key is pinned, never taken on first use; write the \
                         host's key to a file (ssh-keyscan -p {port} {h} > FILE, then compare its \
                         fingerprint with the host's own: ssh-keygen -lf FILE) and name it here",
                        h = if host.is_empty() { "HOST" } else { &host }
                    ),
                );
                None
            }
        };
        let connect_timeout = self.duration(
            &key("connect_timeout"),
            ssh.connect_timeout.as_deref(),
            10 * SECOND,
            Duration::from_millis(1),
            120 * SECOND,
        );
        self.remote_target_rules(label, raw);
        Some(SshConfig {
            host,
            port,
            user,
            identity: identity?,
            known_hosts: known_hosts?,
            connect_timeout,
        })
    }

    fn ssh_host(&mut self, key: &str, ssh: &RawSsh) -> String {
        match ssh.host.as_deref() {
            None => {
                self.problem(key, "is missing: name the host (a DNS name or an address)");
                String::new()
            }
            Some(h) if !valid_host(h) => {
                self.problem(
                    key,
                    format!(
                        "{h:?} is not a host name or address: use letters, digits, '.', '-' and \
                         ':' (an IPv6 address without brackets), not starting with '-'"
                    ),
                );
                String::new()
            }
            Some(h) => h.to_owned(),
        }
    }

    /// A file on this host that the agent reads when it connects: absolute
    /// and present now (under systemd it must also be readable there).
    fn ssh_file(&mut self, key: &str, text: &str, what: &str) -> Option<PathBuf> {
        let path = self.path(key, text)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Some(path),
            Ok(_) => {
                self.problem(key, format!("{} is not a file", path.display()));
                None
            }
            Err(e) => {
                self.problem(
                    key,
                    format!(
                        "cannot read {} ({what}): {e}; create it, or fix the path",
                        path.display()
                    ),
                );
                None
            }
        }
    }

    /// What a remote target may not be, each refused under its key.
    fn remote_target_rules(&mut self, label: &str, raw: &RawTarget) {
        let key = |k: &str| format!("{label}.{k}");
        if let Ok(kind) = Kind::parse(&raw.kind)
            && !REMOTE_KINDS.contains(&kind)
        {
            let names: Vec<&str> = REMOTE_KINDS.iter().map(|k| k.as_str()).collect();
            self.problem(
                key("ssh"),
                format!(
                    "kind {kind} cannot be remote: a remote target is one of {} (servers that \
                     read plain files and reload by a command)",
                    names.join(", ")
                ),
            );
        }
        if raw.layout.as_deref() == Some("generations") {
            self.problem(
                key("layout"),
                "a remote target is replaced in place, one atomic rename per file: remove \
                 layout, or set it to \"in-place\"",
            );
        }
        for (k, set) in [
            ("master_socket", raw.master_socket.is_some()),
            ("admin_socket", raw.admin_socket.is_some()),
            ("admin_url", raw.admin_url.is_some()),
        ] {
            if set {
                self.problem(
                    key(k),
                    "reaches a socket on this host, and this target's server is on another: \
                     remove it, and reload by a command (reload = [...], run on the remote host)",
                );
            }
        }
        for (k, spec) in [("owner", &raw.owner), ("group", &raw.group)] {
            if let Some(spec) = spec
                && !spec.bytes().all(|b| b.is_ascii_digit())
            {
                self.problem(
                    key(k),
                    format!(
                        "{spec:?}: a remote target's {k} is a numeric id on the remote host (names \
                         are looked up on this host); run `id` there to find it"
                    ),
                );
            }
        }
        for (k, text) in [
            ("cert_path", &raw.cert_path),
            ("key_path", &raw.key_path),
            ("chain_path", &raw.chain_path),
            ("pem_path", &raw.pem_path),
            ("caddy_config", &raw.caddy_config),
            ("haproxy_config", &raw.haproxy_config),
        ] {
            if let Some(text) = text
                && !text.starts_with('/')
            {
                self.problem(
                    key(k),
                    format!("{text:?} is relative: a remote target's paths are absolute paths on the remote host"),
                );
            }
        }
    }
}

/// An account name ssh can be given as `-l`.
fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 64
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A host ssh can be given as its destination: a DNS name, an IPv4 or an
/// IPv6 address (no option, user or port smuggled in).
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with('-')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use crate::config::{Config, ConfigError, Host, SshConfig, SshIdentity, parse_with};

    /// A host as root with no users but root: a remote target must not
    /// look anything up here.
    struct Bare;

    impl Host for Bare {
        fn user_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok((name == "root").then_some(0))
        }
        fn group_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok((name == "root").then_some(0))
        }
        fn user_name(&self, _uid: u32) -> Option<String> {
            None
        }
        fn group_name(&self, _gid: u32) -> Option<String> {
            None
        }
        fn euid(&self) -> u32 {
            0
        }
        fn has_program(&self, _program: &str) -> bool {
            false
        }
    }

    struct Env(tempfile::TempDir);

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("id_ed25519"), "key").unwrap();
            std::fs::write(dir.path().join("known_hosts"), "edge1 ssh-ed25519 AAAA").unwrap();
            Env(dir)
        }

        fn dir(&self) -> &Path {
            self.0.path()
        }

        fn parse(&self, text: &str) -> Result<Config, ConfigError> {
            let text = text.replace("{dir}", &self.dir().display().to_string());
            parse_with(&text, &self.dir().join("agent.toml"), &Bare)
        }

        fn errors(&self, text: &str) -> String {
            match self.parse(text) {
                Ok(_) => panic!("expected an error for:\n{text}"),
                Err(e) => e.to_string(),
            }
        }
    }

    /// A remote nginx target `edge` with `extra` in its table and `ssh`
    /// in its `[target.ssh]`.
    fn edge(extra: &str, ssh: &str) -> String {
        format!(
            "[[target]]\nname = \"edge\"\nkind = \"nginx\"\n\
             cert_path = \"/etc/nginx/tls/edge.crt\"\nkey_path = \"/etc/nginx/tls/edge.key\"\n\
             {extra}\n[target.ssh]\n{ssh}\n"
        )
    }

    const SSH: &str = "host = \"edge1.example.net\"\nuser = \"certdeploy\"\n\
                       identity_file = \"id_ed25519\"\nknown_hosts = \"{dir}/known_hosts\"";

    #[test]
    fn a_remote_target_is_the_remote_hosts_paths_commands_and_ids() {
        let env = Env::new();
        let config = env
            .parse(&edge("owner = \"0\"\ngroup = \"33\"", SSH))
            .unwrap();
        let t = &config.targets[0];
        assert_eq!(
            t.ssh,
            Some(SshConfig {
                host: "edge1.example.net".into(),
                port: 22,
                user: "certdeploy".into(),
                identity: SshIdentity::File(env.dir().join("id_ed25519")),
                known_hosts: env.dir().join("known_hosts"),
                connect_timeout: Duration::from_secs(10),
            })
        );
        // /etc/nginx/tls need not exist here, and nginx need not be installed.
        assert_eq!(t.cert_path, PathBuf::from("/etc/nginx/tls/edge.crt"));
        assert_eq!(t.validate, ["nginx", "-t"]);
        // Numeric ids as given; no default owner from this host's users.
        assert_eq!(
            (t.owner.as_ref().unwrap().id, t.group.as_ref().unwrap().id),
            (0, 33)
        );
        assert_eq!(
            (t.default_owner.clone(), t.default_group.clone()),
            (None, None)
        );
        // Apache's control program is not looked for on this host.
        let apache = env
            .parse(&edge("", SSH).replace("kind = \"nginx\"", "kind = \"apache\""))
            .unwrap();
        assert_eq!(apache.targets[0].validate, ["apachectl", "configtest"]);
        let credential = env
            .parse(&edge(
                "",
                &(SSH
                    .replace(
                        "identity_file = \"id_ed25519\"",
                        "identity_credential = \"edge-key\"",
                    )
                    .replace("edge1.example.net", "2001:db8::7")
                    + "\nport = 2222\nconnect_timeout = \"3s\""),
            ))
            .unwrap();
        let ssh = credential.targets[0].ssh.clone().unwrap();
        assert_eq!(ssh.identity, SshIdentity::Credential("edge-key".into()));
        assert_eq!((ssh.host.as_str(), ssh.port), ("2001:db8::7", 2222));
        assert_eq!(ssh.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_same_path_is_one_file_per_host() {
        let env = Env::new();
        let two = format!(
            "{}{}",
            edge("", SSH),
            edge("", &SSH.replace("edge1.example.net", "edge2.example.net"))
                .replace("name = \"edge\"", "name = \"edge2\"")
        );
        assert!(env.parse(&two).is_ok());
        let same = format!(
            "{}{}",
            edge("", SSH),
            edge("", SSH).replace("name = \"edge\"", "name = \"edge2\"")
        );
        let e = env.errors(&same);
        assert!(e.contains("/etc/nginx/tls/edge.crt is also"), "{e}");
    }

    #[test]
    fn remote_mistakes_say_what_to_do() {
        let env = Env::new();
        for (extra, ssh, expected) in [
            (
                "",
                SSH.replace("known_hosts = \"{dir}/known_hosts\"", ""),
                "ssh.known_hosts: is missing: the host key is pinned, never taken on first use; \
                 write the host's key to a file (ssh-keyscan -p 22 edge1.example.net > FILE",
            ),
            (
                "",
                SSH.replace("{dir}/known_hosts", "{dir}/nope"),
                "ssh.known_hosts: cannot read {dir}/nope (the pinned host keys)",
            ),
            (
                "",
                SSH.replace("identity_file = \"id_ed25519\"", ""),
                "ssh.identity_file: is missing: give the private key",
            ),
            (
                "",
                format!("{SSH}\nidentity_credential = \"k\""),
                "ssh.identity_file: is set together with identity_credential",
            ),
            (
                "",
                SSH.replace("edge1.example.net", "-oProxyCommand=sh"),
                "ssh.host: \"-oProxyCommand=sh\" is not a host name or address",
            ),
            (
                "",
                SSH.replace("certdeploy", "root@x"),
                "ssh.user: \"root@x\" is not an account name",
            ),
            (
                "",
                SSH.replace("user = \"certdeploy\"", ""),
                "ssh.user: is missing",
            ),
            ("", format!("{SSH}\nport = 0"), "ssh.port: 0 is not a port"),
            (
                "",
                format!("{SSH}\nhots = \"x\""),
                "unknown key \"hots\" (did you mean \"host\"?)",
            ),
            (
                "layout = \"generations\"",
                SSH.to_owned(),
                "layout: a remote target is replaced in place",
            ),
            (
                "owner = \"www-data\"",
                SSH.to_owned(),
                "owner: \"www-data\": a remote target's owner is a numeric id on the remote host",
            ),
        ] {
            let e = env.errors(&edge(extra, &ssh));
            let expected = expected.replace("{dir}", &env.dir().display().to_string());
            assert!(e.contains(&expected), "expected {expected:?} in:\n{e}");
            assert!(
                !e.contains("on this host: create it"),
                "looked up here:\n{e}"
            );
        }
        let relative =
            env.errors(&edge("", SSH).replace("/etc/nginx/tls/edge.key", "tls/edge.key"));
        assert!(
            relative.contains(
                "key_path: \"tls/edge.key\" is relative: a remote target's paths are absolute"
            ),
            "{relative}"
        );
        let keystore = env.errors(&format!(
            "[[target]]\nname = \"java\"\nkind = \"keystore\"\nkeystore_path = \"/srv/app.p12\"\n\
             password_file = \"{{dir}}/id_ed25519\"\n[target.ssh]\n{SSH}\n"
        ));
        assert!(
            keystore.contains("ssh: kind keystore cannot be remote: a remote target is one of file, nginx, apache, haproxy, postfix, dovecot, caddy"),
            "{keystore}"
        );
        let socket = env.errors(
            &edge("", SSH)
                .replace("kind = \"nginx\"", "kind = \"haproxy\"")
                .replace(
                    "cert_path = \"/etc/nginx/tls/edge.crt\"\nkey_path = \"/etc/nginx/tls/edge.key\"",
                    "pem_path = \"/etc/haproxy/edge.pem\"\nmaster_socket = \"/run/haproxy-master.sock\"",
                ),
        );
        assert!(
            socket.contains("master_socket: reaches a socket on this host"),
            "{socket}"
        );
    }
}
