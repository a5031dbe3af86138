//! The parts of a target that depend on its kind: which keys name its files
//! (`cert_path`/`key_path`/`chain_path`, or the one file of haproxy's
//! `pem_path` and a keystore's `keystore_path`), the kinds' own keys
//! (refused on other kinds), the default commands or reload hook built
//! from them (traefik's dynamic configuration, envoy's SDS file), and a
//! keystore's format, alias and password source.
//!
//! Like the rest of `resolve`, every problem is recorded under its key and
//! resolution carries on, so one run reports everything.

use std::path::{Path, PathBuf};

use super::Resolver;
use crate::config::hook::{self, ReloadHook};
use crate::config::keystore::{KeystoreConfig, PasswordSource, StoreType};
use crate::kind::{self, Kind};

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

    /// `(cert_path, key_path, chain_path)`. For a kind that deploys one
    /// file (haproxy's `pem_path`, a keystore's `keystore_path`) that file
    /// is both the cert and the key file.
    pub(super) fn target_files(
        &mut self,
        label: &str,
        kind: Kind,
        raw: &super::RawTarget,
    ) -> (PathBuf, PathBuf, Option<PathBuf>) {
        let key = |k: &str| format!("{label}.{k}");
        if let Some(single) = kind.single_file_key() {
            let (what, raw_path) = match kind {
                Kind::Keystore => (
                    "writes leaf, chain and key into one keystore file",
                    &raw.keystore_path,
                ),
                _ => ("reads leaf, chain and key from one file", &raw.pem_path),
            };
            for (k, set) in [
                ("cert_path", raw.cert_path.is_some()),
                ("key_path", raw.key_path.is_some()),
                ("chain_path", raw.chain_path.is_some()),
            ] {
                if set {
                    self.problem(
                        key(k),
                        format!("kind {kind} {what}: remove {k} and set {single}"),
                    );
                }
            }
            let file = match raw_path {
                Some(text) => self.target_file(&key(single), text),
                None => {
                    let why = match kind {
                        Kind::Keystore => "kind keystore deploys leaf, chain and key as one \
                                           keystore file"
                            .to_owned(),
                        _ => format!("kind {kind} deploys leaf, chain and key as one PEM file"),
                    };
                    self.problem(label, format!("missing required key \"{single}\" ({why})"));
                    PathBuf::new()
                }
            };
            return (file.clone(), file, None);
        }
        if matches!(kind, Kind::Traefik | Kind::Envoy) && raw.chain_path.is_some() {
            let (file, field) = match kind {
                Kind::Traefik => ("the dynamic configuration", "certFile"),
                _ => ("the SDS secret", "certificate_chain"),
            };
            self.problem(
                key("chain_path"),
                format!(
                    "{kind} reads the chain from the certificate file ({field} in {file}): \
                     remove chain_path, and cert_path gets the leaf followed by the chain"
                ),
            );
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
            Kind::Traefik => self.traefik(label, raw, cert_path, key_path, &mut commands),
            Kind::Envoy => self.envoy(label, raw, cert_path, key_path, &mut commands),
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
        let found = if self.remote {
            // Run on the remote host: Debian's apache2 has both names.
            kind::APACHE_CONTROL.first()
        } else {
            kind::APACHE_CONTROL
                .iter()
                .find(|p| self.host.has_program(p))
        };
        let Some(found) = found else {
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

    /// traefik: the dynamic configuration file written after every switch.
    fn traefik(
        &mut self,
        label: &str,
        raw: &super::RawTarget,
        cert: &Path,
        key: &Path,
        commands: &mut KindCommands,
    ) {
        let Some(config) = self.written_file(
            label,
            "dynamic_config",
            raw.dynamic_config.as_deref(),
            "kind traefik writes the file provider's dynamic configuration there",
            &["yml", "yaml"],
            "traefik's file provider reads .yml, .yaml and .toml files; certctl writes YAML",
        ) else {
            return;
        };
        commands.hook = Some(ReloadHook::TraefikDynamic {
            config,
            target: raw.name.clone(),
            cert: cert.to_owned(),
            key: key.to_owned(),
        });
    }

    /// envoy: the SDS resource file, written when it changes.
    fn envoy(
        &mut self,
        label: &str,
        raw: &super::RawTarget,
        cert: &Path,
        key: &Path,
        commands: &mut KindCommands,
    ) {
        let secret = raw.secret_name.clone().unwrap_or_else(|| raw.name.clone());
        if secret.is_empty() || secret.chars().any(char::is_control) {
            self.problem(
                format!("{label}.secret_name"),
                format!(
                    "{secret:?} is not a secret name: give the name the listener's sds_config \
                     asks for (one line, not empty)"
                ),
            );
        }
        let Some(sds) = self.written_file(
            label,
            "sds_path",
            raw.sds_path.as_deref(),
            "kind envoy writes the SDS resource file there",
            &["yaml", "yml", "json"],
            "envoy reads a path_config_source as YAML (.yaml, .yml) or JSON (.json) by its \
             extension",
        ) else {
            return;
        };
        commands.hook = Some(ReloadHook::EnvoySds {
            sds,
            secret,
            cert: cert.to_owned(),
            key: key.to_owned(),
        });
    }

    /// A file a kind's hook writes (`dynamic_config`, `sds_path`):
    /// required, in an existing directory, with one of `extensions`.
    fn written_file(
        &mut self,
        label: &str,
        name: &str,
        text: Option<&str>,
        why_required: &str,
        extensions: &[&str],
        why_extension: &str,
    ) -> Option<PathBuf> {
        let Some(text) = text else {
            self.problem(
                label,
                format!("missing required key \"{name}\" ({why_required})"),
            );
            return None;
        };
        let key = format!("{label}.{name}");
        let path = self.target_file(&key, text);
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !extensions.contains(&ext) {
            self.problem(
                key,
                format!(
                    "{} must end in .{}: {why_extension}",
                    path.display(),
                    extensions.join(" or .")
                ),
            );
        }
        Some(path)
    }

    /// A keystore's format, alias and password source.
    pub(super) fn keystore(&mut self, label: &str, raw: &super::RawTarget) -> KeystoreConfig {
        let key = |k: &str| format!("{label}.{k}");
        let store_type = match raw.keystore_type.as_deref() {
            None => StoreType::Pkcs12,
            Some(text) => StoreType::parse(text).unwrap_or_else(|| {
                self.problem(
                    key("keystore_type"),
                    format!("unknown keystore type {text:?} (expected \"pkcs12\" or \"jks\")"),
                );
                StoreType::Pkcs12
            }),
        };
        if store_type == StoreType::Jks && !self.host.has_program("keytool") {
            self.problem(
                key("keystore_type"),
                "\"jks\" keystores are written by keytool, which is not on the agent's PATH: \
                 install a JDK (Debian: default-jdk-headless), or use \"pkcs12\", which Java \
                 reads by default since Java 9",
            );
        }
        let alias = raw.alias.clone().unwrap_or_else(|| raw.name.clone());
        if alias.is_empty() || alias.chars().any(char::is_control) || alias.len() > 255 {
            self.problem(
                key("alias"),
                format!("{alias:?} is not an alias: use 1 to 255 printable characters"),
            );
        }
        let password = match (&raw.password_file, &raw.password_credential) {
            (Some(_), Some(_)) => {
                self.problem(
                    key("password_credential"),
                    "password_file and password_credential both name the keystore password: \
                     set one of them",
                );
                PasswordSource::File(PathBuf::new())
            }
            (Some(file), None) => {
                PasswordSource::File(self.path(&key("password_file"), file).unwrap_or_default())
            }
            (None, Some(name)) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    self.problem(
                        key("password_credential"),
                        format!(
                            "{name:?} is not a credential name: give the name of a systemd \
                             credential (LoadCredential=NAME:/path), without a /"
                        ),
                    );
                }
                PasswordSource::Credential(name.clone())
            }
            (None, None) => {
                self.problem(
                    label,
                    "missing required key \"password_file\" (or \"password_credential\"): a \
                     keystore is encrypted with a password, which the agent reads when it deploys",
                );
                PasswordSource::File(PathBuf::new())
            }
        };
        KeystoreConfig {
            store_type,
            alias,
            password,
            scratch_dir: self.state_dir.join("keystore"),
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
            match hook::parse_admin_url(url, &self.base) {
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

    use crate::config::hook::{Endpoint, ReloadHook};
    use crate::config::keystore::{KeystoreConfig, PasswordSource, StoreType};
    use crate::config::{Config, ConfigError, Host, Layout, Target, VerifyProtocol, parse_with};
    use crate::kind::Kind;

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
    fn traefik_and_envoy_switch_generations_and_write_their_files() {
        let env = Env::new();
        let t = env.target(&format!(
            "kind = \"traefik\"\n{FILES}\ndynamic_config = \"tls/certctl-t.yml\""
        ));
        assert_eq!(t.layout, Layout::Generations);
        assert!(t.validate.is_empty() && t.reload.is_empty() && t.reloads());
        assert_eq!((t.default_cert_mode, t.default_key_mode), (0o644, 0o640));
        assert_eq!(
            t.reload_hook,
            Some(ReloadHook::TraefikDynamic {
                config: env.dir().join("tls/certctl-t.yml"),
                target: "t".to_owned(),
                cert: env.dir().join("tls/c.pem"),
                key: env.dir().join("tls/k.pem"),
            })
        );
        // An explicit layout wins.
        let t = env.target(&format!(
            "kind = \"traefik\"\n{FILES}\ndynamic_config = \"d.yaml\"\nlayout = \"in-place\""
        ));
        assert_eq!(t.layout, Layout::InPlace);

        let t = env.target(&format!(
            "kind = \"envoy\"\n{FILES}\nsds_path = \"sds.yaml\""
        ));
        assert_eq!(t.layout, Layout::Generations);
        assert_eq!(
            t.reload_hook,
            Some(ReloadHook::EnvoySds {
                sds: env.dir().join("sds.yaml"),
                secret: "t".to_owned(),
                cert: env.dir().join("tls/c.pem"),
                key: env.dir().join("tls/k.pem"),
            })
        );
        let t = env.target(&format!(
            "kind = \"envoy\"\n{FILES}\nsds_path = \"sds.json\"\nsecret_name = \"server_cert\""
        ));
        assert!(
            matches!(t.reload_hook, Some(ReloadHook::EnvoySds { ref secret, .. }) if secret == "server_cert")
        );
    }

    #[test]
    fn traefik_and_envoy_mistakes() {
        let env = Env::new();
        for (body, want) in [
            (
                format!("kind = \"traefik\"\n{FILES}"),
                "t: missing required key \"dynamic_config\" (kind traefik writes the file provider's dynamic configuration there)",
            ),
            (
                format!("kind = \"traefik\"\n{FILES}\ndynamic_config = \"d.toml\""),
                "must end in .yml or .yaml: traefik's file provider reads .yml, .yaml and .toml files; certctl writes YAML",
            ),
            (
                format!(
                    "kind = \"traefik\"\n{FILES}\ndynamic_config = \"d.yml\"\nchain_path = \"tls/ch.pem\""
                ),
                "t.chain_path: traefik reads the chain from the certificate file (certFile in the dynamic configuration): remove chain_path",
            ),
            (
                format!(
                    "kind = \"traefik\"\n{FILES}\ndynamic_config = \"d.yml\"\nreload = [\"true\"]"
                ),
                "t.reload: this target already reloads through traefik dynamic configuration",
            ),
            (
                format!("kind = \"traefik\"\n{FILES}\ndynamic_config = \"no/such/dir/d.yml\""),
                "t.dynamic_config: directory",
            ),
            (
                format!("kind = \"envoy\"\n{FILES}"),
                "t: missing required key \"sds_path\" (kind envoy writes the SDS resource file there)",
            ),
            (
                format!("kind = \"envoy\"\n{FILES}\nsds_path = \"sds.txt\""),
                "must end in .yaml or .yml or .json",
            ),
            (
                format!("kind = \"envoy\"\n{FILES}\nsds_path = \"sds.yaml\"\nsecret_name = \"\""),
                "t.secret_name: \"\" is not a secret name",
            ),
            (
                format!("kind = \"envoy\"\n{FILES}\nsds_path = \"tls/c.pem\""),
                "is also t.cert_path",
            ),
            (
                format!(
                    "kind = \"nginx\"\n{FILES}\nsds_path = \"s.yaml\"\ndynamic_config = \"d.yml\""
                ),
                "t.dynamic_config: is a key of kind traefik, and this target's kind is nginx",
            ),
        ] {
            let got = env.errors(&body);
            assert!(got.contains(want), "got:\n{got}\nwant:\n{want}");
        }
        // Two targets cannot write one dynamic configuration.
        let text = "[[target]]\nname = \"a\"\nkind = \"traefik\"\ncert_path = \"tls/a.pem\"\nkey_path = \"tls/a.key\"\ndynamic_config = \"d.yml\"\n\
             [[target]]\nname = \"b\"\nkind = \"traefik\"\ncert_path = \"tls/b.pem\"\nkey_path = \"tls/b.key\"\ndynamic_config = \"d.yml\"\n";
        let err = parse_with(text, &env.dir().join("agent.toml"), &DEBIAN)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target \"b\" (target[1]).dynamic_config:")
                && err.contains("is also target \"a\" (target[0]).dynamic_config"),
            "{err}"
        );
    }

    #[test]
    fn keystore_writes_one_file_with_a_password_from_a_file_or_a_credential() {
        let env = Env::new();
        let t = env.target(
            "kind = \"keystore\"\nkeystore_path = \"tls/app.p12\"\npassword_file = \"tls/pw\"",
        );
        let p12 = env.dir().join("tls/app.p12");
        assert_eq!(
            (&t.cert_path, &t.key_path, &t.chain_path),
            (&p12, &p12, &None)
        );
        assert_eq!(t.paths().collect::<Vec<_>>(), [p12.as_path()]);
        assert_eq!(t.layout, Layout::InPlace);
        assert!(t.validate.is_empty() && t.reload.is_empty() && !t.reloads());
        assert_eq!(t.default_key_mode, 0o640);
        assert_eq!(t.default_group, None);
        assert_eq!(
            t.keystore,
            Some(KeystoreConfig {
                store_type: StoreType::Pkcs12,
                alias: "t".to_owned(),
                password: PasswordSource::File(env.dir().join("tls/pw")),
                scratch_dir: PathBuf::from("/var/lib/certctl/state/keystore"),
            })
        );
        let with_programs = FakeHost {
            programs: &["keytool"],
        };
        let mut c = env
            .parse_on(
                "kind = \"keystore\"\nkeystore_path = \"tls/app.jks\"\nkeystore_type = \"jks\"\n\
                 alias = \"tomcat\"\npassword_credential = \"app-keystore\"\n\
                 reload = [\"systemctl\", \"restart\", \"tomcat10\"]",
                &with_programs,
            )
            .unwrap();
        let t = c.targets.remove(0);
        let ks = t.keystore.unwrap();
        assert_eq!(ks.store_type, StoreType::Jks);
        assert_eq!(ks.alias, "tomcat");
        assert_eq!(
            ks.password,
            PasswordSource::Credential("app-keystore".into())
        );
        assert_eq!(t.reload, argv(&["systemctl", "restart", "tomcat10"]));
    }

    #[test]
    fn keystore_mistakes() {
        let env = Env::new();
        let ks = "kind = \"keystore\"\nkeystore_path = \"tls/a.p12\"\n";
        for (body, want) in [
            (
                format!("kind = \"keystore\"\n{FILES}\npassword_file = \"pw\""),
                "t.cert_path: kind keystore writes leaf, chain and key into one keystore file: remove cert_path and set keystore_path",
            ),
            (
                "kind = \"keystore\"\npassword_file = \"pw\"".to_owned(),
                "t: missing required key \"keystore_path\" (kind keystore deploys leaf, chain and key as one keystore file)",
            ),
            (
                ks.to_owned(),
                "t: missing required key \"password_file\" (or \"password_credential\")",
            ),
            (
                format!("{ks}password_file = \"pw\"\npassword_credential = \"c\""),
                "t.password_credential: password_file and password_credential both name the keystore password: set one of them",
            ),
            (
                format!("{ks}password_credential = \"a/b\""),
                "t.password_credential: \"a/b\" is not a credential name",
            ),
            (
                format!("{ks}password_file = \"pw\"\nkeystore_type = \"PKCS12\""),
                "t.keystore_type: unknown keystore type \"PKCS12\" (expected \"pkcs12\" or \"jks\")",
            ),
            (
                format!("{ks}password_file = \"pw\"\nkeystore_type = \"jks\""),
                "t.keystore_type: \"jks\" keystores are written by keytool, which is not on the agent's PATH",
            ),
            (
                format!("{ks}password_file = \"pw\"\nalias = \"\""),
                "t.alias: \"\" is not an alias",
            ),
            (
                format!("kind = \"file\"\n{FILES}\nalias = \"x\"\npassword_file = \"pw\""),
                "t.alias: is a key of kind keystore, and this target's kind is file",
            ),
        ] {
            let got = env.errors(&body);
            assert!(got.contains(want), "got:\n{got}\nwant:\n{want}");
        }
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
            .first()
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
