//! The parts of a target that depend on its kind: which keys name its files
//! (`cert_path`/`key_path`/`chain_path`, or haproxy's `pem_path`), the
//! kinds' own keys (refused on other kinds), and the default commands or
//! reload hook built from them.
//!
//! Like the rest of `resolve`, every problem is recorded under its key and
//! resolution carries on, so one run reports everything.

use std::path::{Path, PathBuf};

use super::Resolver;
use crate::kind::{self, Kind};
use crate::reload::{ReloadHook, caddy};

/// The default validate and reload argv of a target, and its reload hook.
pub(super) struct KindCommands {
    pub validate: Vec<String>,
    pub reload: Vec<String>,
    pub hook: Option<ReloadHook>,
}

impl Resolver<'_> {
    /// Records every kind-specific key set on a target of another kind.
    pub(super) fn foreign_kind_keys(&mut self, label: &str, kind: Kind, raw: &super::RawTarget) {
        for (key, owner) in raw.kind_keys_set() {
            if owner != kind.as_str() {
                self.problem(
                    format!("{label}.{key}"),
                    format!(
                        "is a key of kind {owner}, and this target's kind is {kind}: remove it \
                         (docs/kinds.md lists each kind's keys)"
                    ),
                );
            }
        }
    }

    /// `(cert_path, key_path, chain_path)`. For a kind with `combined_pem`
    /// the one `pem_path` is both the cert and the key file.
    pub(super) fn target_files(
        &mut self,
        label: &str,
        kind: Kind,
        raw: &super::RawTarget,
    ) -> (PathBuf, PathBuf, Option<PathBuf>) {
        let key = |k: &str| format!("{label}.{k}");
        if kind.defaults().combined_pem {
            for (k, set) in [
                ("cert_path", raw.cert_path.is_some()),
                ("key_path", raw.key_path.is_some()),
                ("chain_path", raw.chain_path.is_some()),
            ] {
                if set {
                    self.problem(
                        key(k),
                        format!(
                            "kind {kind} reads leaf, chain and key from one file: \
                             remove {k} and set pem_path"
                        ),
                    );
                }
            }
            let pem = match &raw.pem_path {
                Some(text) => self.target_file(&key("pem_path"), text),
                None => {
                    self.problem(
                        label,
                        format!(
                            "missing required key \"pem_path\" (kind {kind} deploys leaf, chain \
                             and key as one PEM file)"
                        ),
                    );
                    PathBuf::new()
                }
            };
            return (pem.clone(), pem, None);
        }
        let mut required = |k: &str, text: &Option<String>| match text {
            Some(text) => self.target_file(&key(k), text),
            None => {
                self.problem(label, format!("missing required key \"{k}\""));
                PathBuf::new()
            }
        };
        let cert = required("cert_path", &raw.cert_path);
        let key_path = required("key_path", &raw.key_path);
        let chain = raw
            .chain_path
            .as_ref()
            .map(|p| self.target_file(&key("chain_path"), p));
        (cert, key_path, chain)
    }

    /// The kind's default commands, built from its own keys, and its
    /// reload hook.
    pub(super) fn kind_commands(
        &mut self,
        label: &str,
        kind: Kind,
        raw: &super::RawTarget,
        cert_path: &Path,
        key_path: &Path,
    ) -> KindCommands {
        let d = kind.defaults();
        let owned = |argv: &[&str]| argv.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut commands = KindCommands {
            validate: owned(d.validate),
            reload: owned(d.reload),
            hook: None,
        };
        match kind {
            Kind::Apache if raw.validate.is_none() || raw.reload.is_none() => {
                self.apache_control(label, &mut commands);
            }
            Kind::Haproxy => self.haproxy(label, raw, cert_path, &mut commands),
            Kind::Caddy => self.caddy(label, raw, cert_path, key_path, &mut commands),
            _ => {}
        }
        if let Some(hook) = &commands.hook
            && raw.reload.is_some()
        {
            self.problem(
                format!("{label}.reload"),
                format!(
                    "this target already reloads through {}: remove reload, or the key that \
                     chose that",
                    hook.describe()
                ),
            );
        }
        commands
    }

    /// `apachectl`, or `apache2ctl` where only that exists.
    fn apache_control(&mut self, label: &str, commands: &mut KindCommands) {
        let Some(found) = kind::APACHE_CONTROL
            .iter()
            .find(|p| self.host.has_program(p))
        else {
            self.problem(
                format!("{label}.kind"),
                format!(
                    "apache's default validate and reload commands run {}, and none of them is \
                     on the agent's PATH: install Apache, or set validate and reload",
                    kind::APACHE_CONTROL.join(" or ")
                ),
            );
            return;
        };
        for argv in [&mut commands.validate, &mut commands.reload] {
            if let Some(program) = argv.first_mut() {
                (*found).clone_into(program);
            }
        }
    }

    fn haproxy(
        &mut self,
        label: &str,
        raw: &super::RawTarget,
        pem: &Path,
        commands: &mut KindCommands,
    ) {
        let key = |k: &str| format!("{label}.{k}");
        if let Some(text) = &raw.haproxy_config
            && let Some(config) = self.path(&key("haproxy_config"), text)
        {
            commands.validate = kind::haproxy_validate(&config);
        }
        let master = raw
            .master_socket
            .as_ref()
            .and_then(|t| self.path(&key("master_socket"), t));
        let admin = raw
            .admin_socket
            .as_ref()
            .and_then(|t| self.path(&key("admin_socket"), t));
        match (master, admin) {
            (Some(_), Some(_)) => self.problem(
                key("admin_socket"),
                "master_socket reloads haproxy and admin_socket replaces the certificate without \
                 a reload: set one of them",
            ),
            (Some(socket), None) => {
                commands.reload.clear();
                commands.hook = Some(ReloadHook::HaproxyMaster { socket });
            }
            (None, Some(socket)) => {
                // The runtime API names the certificate by its path, one word.
                let name = pem.display().to_string();
                if name.contains(char::is_whitespace) {
                    self.problem(
                        key("pem_path"),
                        format!(
                            "{name:?} contains white space, which haproxy's runtime API cannot \
                             take in a certificate name: use a path without spaces"
                        ),
                    );
                }
                commands.reload.clear();
                commands.hook = Some(ReloadHook::HaproxyRuntime {
                    socket,
                    pem: pem.to_owned(),
                });
            }
            (None, None) => {}
        }
    }

    fn caddy(
        &mut self,
        label: &str,
        raw: &super::RawTarget,
        cert_path: &Path,
        key_path: &Path,
        commands: &mut KindCommands,
    ) {
        let key = |k: &str| format!("{label}.{k}");
        if let Some(url) = &raw.admin_url {
            for (k, set) in [
                ("caddy_config", raw.caddy_config.is_some()),
                ("caddy_adapter", raw.caddy_adapter.is_some()),
                ("caddy_address", raw.caddy_address.is_some()),
            ] {
                if set {
                    self.problem(
                        key(k),
                        format!(
                            "is for file mode (`caddy reload`), and admin_url loads the \
                             certificate through the admin API: remove {k}"
                        ),
                    );
                }
            }
            match caddy::parse_admin_url(url, &self.base) {
                Ok(endpoint) => {
                    commands.validate.clear();
                    commands.reload.clear();
                    commands.hook = Some(ReloadHook::CaddyAdmin {
                        endpoint,
                        id: format!("certctl-{}", raw.name),
                        cert: cert_path.to_owned(),
                        key: key_path.to_owned(),
                    });
                }
                Err(why) => self.problem(key("admin_url"), why),
            }
            return;
        }
        let config = match &raw.caddy_config {
            Some(text) => self
                .path(&key("caddy_config"), text)
                .unwrap_or_else(|| PathBuf::from(kind::CADDY_CONFIG)),
            None => PathBuf::from(kind::CADDY_CONFIG),
        };
        let adapter = match &raw.caddy_adapter {
            Some(a) if a.is_empty() || a.contains(char::is_whitespace) => {
                self.problem(
                    key("caddy_adapter"),
                    format!("{a:?} is not an adapter name (examples: \"caddyfile\", \"json\")"),
                );
                kind::CADDY_ADAPTER.to_owned()
            }
            Some(a) => a.clone(),
            None if config.extension().is_some_and(|e| e == "json") => "json".to_owned(),
            None => kind::CADDY_ADAPTER.to_owned(),
        };
        let address = match &raw.caddy_address {
            Some(a) if a.is_empty() || a.contains(char::is_whitespace) => {
                self.problem(
                    key("caddy_address"),
                    format!(
                        "{a:?} is not an admin address (examples: \"localhost:2019\", \
                         \"unix//run/caddy/admin.sock\")"
                    ),
                );
                None
            }
            other => other.as_deref(),
        };
        (commands.validate, commands.reload) = kind::caddy_commands(&config, &adapter, address);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use crate::config::{Config, ConfigError, Host, Target, VerifyProtocol, parse_with};
    use crate::kind::Kind;
    use crate::reload::{Endpoint, ReloadHook};

    /// A Debian-like host as root, with the given programs on `PATH`.
    struct FakeHost {
        programs: &'static [&'static str],
    }

    impl Host for FakeHost {
        fn user_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(
                HashMap::from([("root", 0), ("www-data", 33), ("caddy", 998)])
                    .get(name)
                    .copied(),
            )
        }
        fn group_id(&self, name: &str) -> Result<Option<u32>, String> {
            Ok(HashMap::from([
                ("root", 0),
                ("www-data", 33),
                ("haproxy", 997),
                ("caddy", 998),
            ])
            .get(name)
            .copied())
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
        fn has_program(&self, program: &str) -> bool {
            self.programs.contains(&program)
        }
    }

    const DEBIAN: FakeHost = FakeHost {
        programs: &["apachectl", "apache2ctl"],
    };

    struct Env(tempfile::TempDir);

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("tls")).unwrap();
            Env(dir)
        }

        fn dir(&self) -> &Path {
            self.0.path()
        }

        /// Parses one `[[target]]` named `t` with `body`.
        fn parse_on(&self, body: &str, host: &FakeHost) -> Result<Config, ConfigError> {
            let text = format!("[[target]]\nname = \"t\"\n{body}\n");
            parse_with(&text, &self.dir().join("agent.toml"), host)
        }

        fn target(&self, body: &str) -> Target {
            match self.parse_on(body, &DEBIAN) {
                Ok(mut c) => c.targets.remove(0),
                Err(e) => panic!("expected a valid config, got:\n{e}\n--- target:\n{body}"),
            }
        }

        /// The messages of an invalid target, one per line, without the file.
        fn errors_on(&self, body: &str, host: &FakeHost) -> String {
            match self.parse_on(body, host) {
                Ok(_) => panic!("expected an error for:\n{body}"),
                Err(e) => e
                    .to_string()
                    .replace(
                        &format!("{}: ", self.dir().join("agent.toml").display()),
                        "",
                    )
                    .replace("target \"t\" (target[0])", "t"),
            }
        }

        fn errors(&self, body: &str) -> String {
            self.errors_on(body, &DEBIAN)
        }
    }

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    const FILES: &str = "cert_path = \"tls/c.pem\"\nkey_path = \"tls/k.pem\"";

    #[test]
    fn haproxy_deploys_one_pem_with_its_defaults() {
        let env = Env::new();
        let t = env.target("kind = \"haproxy\"\npem_path = \"tls/site.pem\"");
        let pem = env.dir().join("tls/site.pem");
        assert_eq!((&t.cert_path, &t.key_path), (&pem, &pem));
        assert_eq!(t.paths().collect::<Vec<_>>(), [pem.as_path()]);
        assert_eq!(
            t.validate,
            argv(&["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"])
        );
        assert_eq!(t.reload, argv(&["systemctl", "reload", "haproxy"]));
        assert_eq!(t.reload_hook, None);
        assert_eq!(t.default_key_mode, 0o600);
        assert_eq!(t.default_owner.map(|i| i.id), Some(0));
        assert_eq!(t.default_group.map(|i| i.id), Some(997));

        let t = env.target(
            "kind = \"haproxy\"\npem_path = \"tls/site.pem\"\nhaproxy_config = \"h.cfg\"\n\
             master_socket = \"run/master.sock\"",
        );
        assert_eq!(
            t.validate,
            argv(&[
                "haproxy",
                "-c",
                "-f",
                &env.dir().join("h.cfg").display().to_string()
            ])
        );
        assert!(t.reload.is_empty() && t.reloads());
        assert_eq!(
            t.reload_hook,
            Some(ReloadHook::HaproxyMaster {
                socket: env.dir().join("run/master.sock")
            })
        );

        let t = env.target(
            "kind = \"haproxy\"\npem_path = \"tls/site.pem\"\nadmin_socket = \"/run/haproxy/admin.sock\"",
        );
        assert!(t.reload.is_empty());
        assert_eq!(
            t.reload_hook,
            Some(ReloadHook::HaproxyRuntime {
                socket: PathBuf::from("/run/haproxy/admin.sock"),
                pem,
            })
        );
    }

    #[test]
    fn haproxy_mistakes() {
        let env = Env::new();
        for (body, want) in [
            (
                format!("kind = \"haproxy\"\n{FILES}"),
                "t.cert_path: kind haproxy reads leaf, chain and key from one file: remove cert_path and set pem_path",
            ),
            (
                format!("kind = \"haproxy\"\n{FILES}"),
                "t: missing required key \"pem_path\" (kind haproxy deploys leaf, chain and key as one PEM file)",
            ),
            (
                "kind = \"haproxy\"\npem_path = \"tls/p.pem\"\nchain_path = \"tls/ch.pem\"".to_owned(),
                "t.chain_path: kind haproxy reads leaf, chain and key from one file",
            ),
            (
                "kind = \"haproxy\"\npem_path = \"tls/p.pem\"\nmaster_socket = \"m.sock\"\nadmin_socket = \"a.sock\"".to_owned(),
                "t.admin_socket: master_socket reloads haproxy and admin_socket replaces the certificate without a reload: set one of them",
            ),
            (
                "kind = \"haproxy\"\npem_path = \"tls/p.pem\"\nadmin_socket = \"a.sock\"\nreload = [\"true\"]".to_owned(),
                "t.reload: this target already reloads through haproxy runtime API on",
            ),
            (
                "kind = \"haproxy\"\npem_path = \"tls/my site.pem\"\nadmin_socket = \"a.sock\"".to_owned(),
                "contains white space, which haproxy's runtime API cannot take in a certificate name",
            ),
            (
                format!("kind = \"nginx\"\n{FILES}\npem_path = \"tls/p.pem\"\nadmin_url = \"localhost:2019\""),
                "t.pem_path: is a key of kind haproxy, and this target's kind is nginx: remove it (docs/kinds.md lists each kind's keys)\n\
                 t.admin_url: is a key of kind caddy, and this target's kind is nginx",
            ),
        ] {
            let got = env.errors(&body);
            assert!(got.contains(want), "got:\n{got}\nwant:\n{want}");
        }
    }

    #[test]
    fn a_combined_pem_is_one_file_of_one_target() {
        let env = Env::new();
        let text = "[[target]]\nname = \"a\"\nkind = \"haproxy\"\npem_path = \"tls/p.pem\"\n\
                    [[target]]\nname = \"b\"\nkind = \"file\"\ncert_path = \"tls/p.pem\"\nkey_path = \"tls/k.pem\"\n";
        let err = parse_with(text, &env.dir().join("agent.toml"), &DEBIAN)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target \"b\" (target[1]).cert_path:")
                && err.contains("is also target \"a\" (target[0]).pem_path"),
            "{err}"
        );
    }

    #[test]
    fn apache_uses_the_control_program_the_host_has() {
        let env = Env::new();
        let body = format!("kind = \"apache\"\n{FILES}");
        let t = env.target(&body);
        assert_eq!(t.validate, argv(&["apachectl", "configtest"]));
        assert_eq!(t.reload, argv(&["apachectl", "graceful"]));
        assert_eq!((t.default_cert_mode, t.default_key_mode), (0o644, 0o600));
        assert_eq!(t.default_group.map(|g| g.name), Some("www-data".to_owned()));

        let only_apache2ctl = FakeHost {
            programs: &["apache2ctl"],
        };
        let mut c = env.parse_on(&body, &only_apache2ctl).unwrap();
        let t = c.targets.remove(0);
        assert_eq!(t.validate, argv(&["apache2ctl", "configtest"]));
        assert_eq!(t.reload, argv(&["apache2ctl", "graceful"]));

        let none = FakeHost { programs: &[] };
        assert_eq!(
            env.errors_on(&body, &none),
            "t.kind: apache's default validate and reload commands run apachectl or apache2ctl, \
             and none of them is on the agent's PATH: install Apache, or set validate and reload"
        );
        // Explicit commands need neither.
        let explicit =
            format!("{body}\nvalidate = [\"/opt/httpd/bin/apachectl\", \"-t\"]\nreload = []");
        assert!(env.parse_on(&explicit, &none).is_ok());
    }

    #[test]
    fn caddy_file_mode_and_admin_api_mode() {
        let env = Env::new();
        let t = env.target(&format!("kind = \"caddy\"\n{FILES}"));
        assert_eq!(
            t.reload,
            argv(&[
                "caddy",
                "reload",
                "--force",
                "--config",
                "/etc/caddy/Caddyfile",
                "--adapter",
                "caddyfile"
            ])
        );
        assert_eq!(
            t.validate,
            argv(&[
                "caddy",
                "validate",
                "--config",
                "/etc/caddy/Caddyfile",
                "--adapter",
                "caddyfile"
            ])
        );
        assert_eq!(t.default_key_mode, 0o640);
        assert_eq!(t.default_group.map(|g| g.name), Some("caddy".to_owned()));

        let t = env.target(&format!(
            "kind = \"caddy\"\n{FILES}\ncaddy_config = \"caddy.json\"\ncaddy_address = \"localhost:2020\""
        ));
        let json = env.dir().join("caddy.json").display().to_string();
        assert_eq!(
            t.reload,
            argv(&[
                "caddy",
                "reload",
                "--force",
                "--config",
                &json,
                "--address",
                "localhost:2020"
            ])
        );

        let t = env.target(&format!(
            "kind = \"caddy\"\n{FILES}\nadmin_url = \"unix//run/caddy/admin.sock\""
        ));
        assert!(t.validate.is_empty() && t.reload.is_empty());
        assert_eq!(
            t.reload_hook,
            Some(ReloadHook::CaddyAdmin {
                endpoint: Endpoint::Unix(PathBuf::from("/run/caddy/admin.sock")),
                id: "certctl-t".to_owned(),
                cert: env.dir().join("tls/c.pem"),
                key: env.dir().join("tls/k.pem"),
            })
        );

        let got = env.errors(&format!(
            "kind = \"caddy\"\n{FILES}\nadmin_url = \"https://localhost:2019\"\ncaddy_config = \"Caddyfile\""
        ));
        assert!(
            got.contains("t.admin_url: \"https://localhost:2019\" uses https"),
            "{got}"
        );
        assert!(
            got.contains("t.caddy_config: is for file mode (`caddy reload`), and admin_url loads"),
            "{got}"
        );
        let got = env.errors(&format!("kind = \"caddy\"\n{FILES}\ncaddy_adapter = \"\""));
        assert!(
            got.contains("t.caddy_adapter: \"\" is not an adapter name"),
            "{got}"
        );
    }

    #[test]
    fn mail_kinds_verify_with_the_protocol_of_their_port() {
        let env = Env::new();
        let protocol = |kind: &str, endpoint: &str, extra: &str| {
            env.target(&format!(
                "kind = \"{kind}\"\n{FILES}\n[target.verify]\nendpoint = \"{endpoint}\"\n{extra}"
            ))
            .verify
            .unwrap()
            .protocol
        };
        use VerifyProtocol::*;
        assert_eq!(protocol("postfix", "mail.example.com:25", ""), SmtpStarttls);
        assert_eq!(protocol("postfix", "127.0.0.1:587", ""), SmtpStarttls);
        assert_eq!(protocol("postfix", "127.0.0.1:465", ""), Tls);
        assert_eq!(protocol("dovecot", "127.0.0.1:993", ""), Tls);
        assert_eq!(protocol("dovecot", "127.0.0.1:995", ""), Tls);
        assert_eq!(protocol("dovecot", "127.0.0.1:143", ""), ImapStarttls);
        assert_eq!(protocol("dovecot", "127.0.0.1:110", ""), Pop3Starttls);
        assert_eq!(protocol("dovecot", "127.0.0.1:10143", ""), ImapStarttls);
        assert_eq!(
            protocol("dovecot", "127.0.0.1:993", "protocol = \"imap-starttls\""),
            ImapStarttls
        );

        let t = env.target(&format!("kind = \"postfix\"\n{FILES}"));
        assert_eq!(t.kind, Kind::Postfix);
        assert_eq!(t.validate, argv(&["postfix", "check"]));
        assert_eq!(t.reload, argv(&["postfix", "reload"]));
        assert_eq!(t.default_key_mode, 0o600);
        assert_eq!(
            (t.default_owner.map(|i| i.id), t.default_group.map(|i| i.id)),
            (Some(0), Some(0))
        );
        let t = env.target(&format!("kind = \"dovecot\"\n{FILES}"));
        assert_eq!(t.validate, argv(&["doveconf", "-n"]));
        assert_eq!(t.reload, argv(&["doveadm", "reload"]));
    }
}
