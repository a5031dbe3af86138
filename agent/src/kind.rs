//! Target kinds: what kind of server a target feeds, and the defaults that
//! kind supplies (commands, file modes, owners, verify protocol).
//!
//! This module owns the list of kind names and every kind's defaults, so
//! `docs/kinds.md` can be checked against one place. It guarantees that every
//! name the contract reserves parses to either a built kind or a clear "not
//! available in this version" error, never to "unknown kind". Adding a kind
//! means adding a variant, one row in [`Kind::ALL`], one arm in
//! [`Kind::as_str`] and [`Kind::defaults`], and removing its name from
//! [`PLANNED`].
//!
//! Defaults that depend on a kind's own configuration keys (haproxy's
//! `haproxy_config`, caddy's `caddy_config`, ...) are built by the functions
//! at the end of this file; `config` calls them when it resolves a target.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The server a target deploys to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Plain files; no commands unless configured.
    File,
    /// nginx: `nginx -t`, then `nginx -s reload`.
    Nginx,
    /// Apache httpd: `apachectl configtest`, then `apachectl graceful`.
    Apache,
    /// HAProxy: one combined PEM (`pem_path`), `haproxy -c`, then
    /// `systemctl reload haproxy`, the master CLI or the runtime API.
    Haproxy,
    /// Postfix: `postfix check`, then `postfix reload`; verified over SMTP
    /// with STARTTLS.
    Postfix,
    /// Dovecot: `doveconf -n`, then `doveadm reload`; verified over IMAP or
    /// POP3, by port.
    Dovecot,
    /// Caddy: `caddy validate`, then `caddy reload --force`, or the
    /// certificate loaded through the admin API (`admin_url`).
    Caddy,
    /// Traefik: the generations layout, and the file provider's dynamic
    /// configuration (`dynamic_config`) rewritten after every switch.
    Traefik,
    /// Envoy: the generations layout, and an SDS resource file (`sds_path`)
    /// whose secret watches the target's directory.
    Envoy,
    /// A Java keystore (`keystore_path`): PKCS#12 written in-process, or JKS
    /// through `keytool`.
    Keystore,
}

/// Kind names that the contract reserves but this version does not implement.
pub const PLANNED: &[&str] = &[];

/// The protocol spoken before the TLS handshake when verifying a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerifyProtocol {
    /// TLS from the first byte.
    Tls,
    /// SMTP, upgraded with `STARTTLS`.
    SmtpStarttls,
    /// IMAP, upgraded with `STARTTLS`.
    ImapStarttls,
    /// POP3, upgraded with `STLS`.
    Pop3Starttls,
}

/// What a kind supplies when the target's configuration says nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindDefaults {
    /// Validate command argv; empty means none.
    pub validate: &'static [&'static str],
    /// Reload command argv; empty means none.
    pub reload: &'static [&'static str],
    /// Mode of the certificate (and chain) file.
    pub cert_mode: u32,
    /// Mode of the private key file; never has an "other" bit.
    pub key_mode: u32,
    /// Owner candidates, the first that exists on this host wins; empty: no chown.
    pub owners: &'static [&'static str],
    /// Group candidates, the first that exists on this host wins; empty: no chgrp.
    pub groups: &'static [&'static str],
    /// When `chain_path` is absent, `cert_path` gets the leaf followed by the chain.
    pub fullchain_in_cert: bool,
    /// Protocol used by `[target.verify]` when `protocol` is not set (see
    /// [`Kind::verify_protocol_for`] for kinds that decide by port).
    pub verify_protocol: VerifyProtocol,
    /// The certificate, the chain and the key go to one file (`pem_path`),
    /// which gets the key's mode.
    pub combined_pem: bool,
    /// The layout when the target does not name one.
    pub layout: DefaultLayout,
}

/// A kind's layout when the configuration says nothing (the names of
/// `layout`: `"in-place"`, `"generations"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultLayout {
    /// Each file replaced by its own rename.
    InPlace,
    /// The whole set switched by one rename of `..data`.
    Generations,
}

const FILE_DEFAULTS: KindDefaults = KindDefaults {
    validate: &[],
    reload: &[],
    cert_mode: 0o644,
    key_mode: 0o600,
    owners: &[],
    groups: &[],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

const NGINX_DEFAULTS: KindDefaults = KindDefaults {
    validate: &["nginx", "-t"],
    reload: &["nginx", "-s", "reload"],
    cert_mode: 0o644,
    key_mode: 0o640,
    owners: &["root"],
    // Debian/Ubuntu first, then RHEL/Alpine.
    groups: &["www-data", "nginx"],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

/// `apachectl` is the upstream name (and a symlink on Debian); Debian and
/// Ubuntu also ship `apache2ctl`. `config` uses the first one on `PATH`.
pub const APACHE_CONTROL: &[&str] = &["apachectl", "apache2ctl"];

const APACHE_DEFAULTS: KindDefaults = KindDefaults {
    validate: &["apachectl", "configtest"],
    reload: &["apachectl", "graceful"],
    cert_mode: 0o644,
    // The parent process reads the key as root before it starts children.
    key_mode: 0o600,
    owners: &["root"],
    // Debian/Ubuntu first, then RHEL/Fedora/Alpine.
    groups: &["www-data", "apache"],
    // SSLCertificateFile takes the chain after the leaf since Apache 2.4.8.
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

/// Where Debian, Ubuntu and RHEL keep haproxy's configuration.
pub const HAPROXY_CONFIG: &str = "/etc/haproxy/haproxy.cfg";

const HAPROXY_DEFAULTS: KindDefaults = KindDefaults {
    validate: &["haproxy", "-c", "-f", HAPROXY_CONFIG],
    reload: &["systemctl", "reload", "haproxy"],
    cert_mode: 0o644,
    // The combined file holds the key: it takes this mode.
    key_mode: 0o600,
    owners: &["root"],
    groups: &["haproxy"],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: true,
    layout: DefaultLayout::InPlace,
};

const POSTFIX_DEFAULTS: KindDefaults = KindDefaults {
    validate: &["postfix", "check"],
    reload: &["postfix", "reload"],
    cert_mode: 0o644,
    // smtpd reads the key as root before it drops privileges.
    key_mode: 0o600,
    owners: &["root"],
    groups: &["root"],
    // smtpd_tls_cert_file takes the chain after the leaf (Postfix >= 3.4).
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::SmtpStarttls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

const DOVECOT_DEFAULTS: KindDefaults = KindDefaults {
    validate: &["doveconf", "-n"],
    reload: &["doveadm", "reload"],
    cert_mode: 0o644,
    // The config process (root) reads `ssl_key = </path`.
    key_mode: 0o600,
    owners: &["root"],
    groups: &["root"],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::ImapStarttls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

/// Where Debian's package keeps the Caddyfile.
pub const CADDY_CONFIG: &str = "/etc/caddy/Caddyfile";
/// The config adapter for [`CADDY_CONFIG`].
pub const CADDY_ADAPTER: &str = "caddyfile";

const CADDY_DEFAULTS: KindDefaults = KindDefaults {
    validate: &[
        "caddy",
        "validate",
        "--config",
        CADDY_CONFIG,
        "--adapter",
        CADDY_ADAPTER,
    ],
    // A plain reload skips an unchanged config, and new certificate files do
    // not change the config: only --force makes caddy read them.
    reload: &[
        "caddy",
        "reload",
        "--force",
        "--config",
        CADDY_CONFIG,
        "--adapter",
        CADDY_ADAPTER,
    ],
    cert_mode: 0o644,
    // caddy runs as its own user from the start and reads the files itself.
    key_mode: 0o640,
    owners: &["root"],
    groups: &["caddy"],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

const TRAEFIK_DEFAULTS: KindDefaults = KindDefaults {
    // traefik has no command that checks a configuration.
    validate: &[],
    // The reload is the dynamic configuration rewritten (a hook).
    reload: &[],
    cert_mode: 0o644,
    // traefik runs as root (its images, most hosts) or, with the systemd
    // unit its documentation and most guides use, as traefik:traefik with
    // CAP_NET_BIND_SERVICE: 0640 with group traefik serves both; where
    // the group does not exist the key is root's alone.
    key_mode: 0o640,
    owners: &["root"],
    groups: &["traefik"],
    // certFile holds the leaf and the chain.
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    // traefik reads cert and key separately when its configuration
    // reloads: only one switch guarantees it a matching pair.
    layout: DefaultLayout::Generations,
};

const ENVOY_DEFAULTS: KindDefaults = KindDefaults {
    validate: &[],
    reload: &[],
    cert_mode: 0o644,
    // The official images run envoy as user `envoy`; distribution
    // packages as root.
    key_mode: 0o640,
    owners: &["root"],
    groups: &["envoy"],
    // certificate_chain holds the leaf and the chain.
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    // envoy re-reads the pair when `..data` is renamed in the watched
    // directory: the Kubernetes-style rotation it is built for.
    layout: DefaultLayout::Generations,
};

const KEYSTORE_DEFAULTS: KindDefaults = KindDefaults {
    validate: &[],
    // Java services load their keystore at start: the operator names the
    // restart (`reload = ["systemctl", "restart", "myservice"]`).
    reload: &[],
    cert_mode: 0o644,
    // The keystore holds the key. 0640 so that `group = "<service group>"`
    // is all a Java service running as its own user needs.
    key_mode: 0o640,
    owners: &["root"],
    groups: &[],
    fullchain_in_cert: true,
    verify_protocol: VerifyProtocol::Tls,
    combined_pem: false,
    layout: DefaultLayout::InPlace,
};

// === impl Kind ===

impl Kind {
    /// Every kind built into this version, in documentation order.
    pub const ALL: &'static [Kind] = &[
        Kind::File,
        Kind::Nginx,
        Kind::Apache,
        Kind::Haproxy,
        Kind::Postfix,
        Kind::Dovecot,
        Kind::Caddy,
        Kind::Traefik,
        Kind::Envoy,
        Kind::Keystore,
    ];

    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Nginx => "nginx",
            Kind::Apache => "apache",
            Kind::Haproxy => "haproxy",
            Kind::Postfix => "postfix",
            Kind::Dovecot => "dovecot",
            Kind::Caddy => "caddy",
            Kind::Traefik => "traefik",
            Kind::Envoy => "envoy",
            Kind::Keystore => "keystore",
        }
    }

    /// The defaults this kind supplies.
    pub fn defaults(&self) -> KindDefaults {
        match self {
            Kind::File => FILE_DEFAULTS,
            Kind::Nginx => NGINX_DEFAULTS,
            Kind::Apache => APACHE_DEFAULTS,
            Kind::Haproxy => HAPROXY_DEFAULTS,
            Kind::Postfix => POSTFIX_DEFAULTS,
            Kind::Dovecot => DOVECOT_DEFAULTS,
            Kind::Caddy => CADDY_DEFAULTS,
            Kind::Traefik => TRAEFIK_DEFAULTS,
            Kind::Envoy => ENVOY_DEFAULTS,
            Kind::Keystore => KEYSTORE_DEFAULTS,
        }
    }

    /// The key that names the one file of a kind that deploys a single
    /// file (haproxy's combined PEM, a keystore) instead of `cert_path`,
    /// `key_path` and `chain_path`.
    pub fn single_file_key(&self) -> Option<&'static str> {
        match self {
            Kind::Haproxy => Some("pem_path"),
            Kind::Keystore => Some("keystore_path"),
            _ => None,
        }
    }

    /// The verify protocol when `[target.verify]` names none, for an
    /// endpoint on `port`. Mail servers speak different protocols on
    /// different ports: Dovecot is IMAP or POP3, with implicit TLS or
    /// STARTTLS; Postfix is SMTP with STARTTLS except on the submissions
    /// port.
    pub fn verify_protocol_for(&self, port: u16) -> VerifyProtocol {
        match (self, port) {
            // smtps / submissions (RFC 8314): TLS from the first byte.
            (Kind::Postfix, 465) | (Kind::Dovecot, 993 | 995) => VerifyProtocol::Tls,
            (Kind::Dovecot, 110) => VerifyProtocol::Pop3Starttls,
            _ => self.defaults().verify_protocol,
        }
    }

    /// Parses a kind name as written in the configuration file.
    pub fn parse(name: &str) -> Result<Kind, KindError> {
        if let Some(kind) = Kind::ALL.iter().find(|k| k.as_str() == name) {
            return Ok(*kind);
        }
        if PLANNED.contains(&name) {
            Err(KindError::NotAvailable(name.to_owned()))
        } else {
            Err(KindError::Unknown(name.to_owned()))
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = KindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::parse(s)
    }
}

// === impl VerifyProtocol ===

impl VerifyProtocol {
    /// Every protocol, in documentation order.
    pub const ALL: &'static [VerifyProtocol] = &[
        VerifyProtocol::Tls,
        VerifyProtocol::SmtpStarttls,
        VerifyProtocol::ImapStarttls,
        VerifyProtocol::Pop3Starttls,
    ];

    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            VerifyProtocol::Tls => "tls",
            VerifyProtocol::SmtpStarttls => "smtp-starttls",
            VerifyProtocol::ImapStarttls => "imap-starttls",
            VerifyProtocol::Pop3Starttls => "pop3-starttls",
        }
    }

    /// Parses a protocol name as written in the configuration file.
    pub fn parse(name: &str) -> Option<VerifyProtocol> {
        VerifyProtocol::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == name)
    }
}

impl fmt::Display for VerifyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl KindError ===

/// A kind name that does not name a built kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    /// kind "{0}" is not available in this version of certctl (available: …)
    #[error(
        "kind \"{0}\" is not available in this version of certctl (available: {avail})",
        avail = available()
    )]
    NotAvailable(String),
    /// unknown kind "{0}" (available: …)
    #[error("unknown kind \"{0}\" (available: {avail})", avail = available())]
    Unknown(String),
}

// === defaults built from a kind's own keys ===

/// haproxy's validate argv for its configuration file `config`:
/// `haproxy -c -f <config>`.
pub fn haproxy_validate(config: &Path) -> Vec<String> {
    vec![
        "haproxy".to_owned(),
        "-c".to_owned(),
        "-f".to_owned(),
        config.display().to_string(),
    ]
}

/// caddy's file-mode validate and reload argv: `caddy validate` and
/// `caddy reload --force` for the configuration file `config` read with
/// `adapter` (`"json"`: caddy's own format, no `--adapter`), talking to the
/// admin endpoint `address` when given (else the one the config names).
pub fn caddy_commands(
    config: &Path,
    adapter: &str,
    address: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let mut tail = vec!["--config".to_owned(), config.display().to_string()];
    if adapter != "json" {
        tail.extend(["--adapter".to_owned(), adapter.to_owned()]);
    }
    let mut validate = vec!["caddy".to_owned(), "validate".to_owned()];
    validate.extend(tail.iter().cloned());
    let mut reload = vec![
        "caddy".to_owned(),
        "reload".to_owned(),
        "--force".to_owned(),
    ];
    reload.extend(tail);
    if let Some(address) = address {
        reload.extend(["--address".to_owned(), address.to_owned()]);
    }
    (validate, reload)
}

/// `file, nginx, ...`: the built kinds, for messages.
fn available() -> String {
    Kind::ALL
        .iter()
        .map(Kind::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &str =
        "file, nginx, apache, haproxy, postfix, dovecot, caddy, traefik, envoy, keystore";

    #[test]
    fn names_round_trip() {
        for kind in Kind::ALL {
            assert_eq!(Kind::parse(kind.as_str()), Ok(*kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        for p in VerifyProtocol::ALL {
            assert_eq!(VerifyProtocol::parse(p.as_str()), Some(*p));
        }
    }

    #[test]
    fn planned_kinds_are_not_available() {
        for name in PLANNED {
            assert!(Kind::ALL.iter().all(|k| k.as_str() != *name));
            assert!(matches!(Kind::parse(name), Err(KindError::NotAvailable(_))));
        }
        // Every name the contract reserves is built now.
        for name in ["traefik", "envoy", "keystore"] {
            assert!(Kind::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn unknown_kind() {
        assert_eq!(
            "foo".parse::<Kind>().map_err(|e| e.to_string()),
            Err(format!("unknown kind \"foo\" (available: {ALL})"))
        );
        // Names are case-sensitive, like every other value in the file.
        assert!(matches!(Kind::parse("Nginx"), Err(KindError::Unknown(_))));
    }

    #[test]
    fn defaults() {
        let file = Kind::File.defaults();
        assert!(file.validate.is_empty() && file.reload.is_empty());
        assert_eq!((file.cert_mode, file.key_mode), (0o644, 0o600));
        assert!(file.owners.is_empty() && file.groups.is_empty());

        let nginx = Kind::Nginx.defaults();
        assert_eq!(nginx.validate, ["nginx", "-t"]);
        assert_eq!(nginx.reload, ["nginx", "-s", "reload"]);
        assert_eq!((nginx.cert_mode, nginx.key_mode), (0o644, 0o640));
        assert_eq!(nginx.owners, ["root"]);
        assert_eq!(nginx.groups, ["www-data", "nginx"]);

        let apache = Kind::Apache.defaults();
        assert_eq!(apache.validate, ["apachectl", "configtest"]);
        assert_eq!(apache.reload, ["apachectl", "graceful"]);
        assert_eq!((apache.cert_mode, apache.key_mode), (0o644, 0o600));
        assert_eq!(apache.groups, ["www-data", "apache"]);
        assert_eq!(APACHE_CONTROL, ["apachectl", "apache2ctl"]);

        let haproxy = Kind::Haproxy.defaults();
        assert_eq!(
            haproxy.validate,
            ["haproxy", "-c", "-f", "/etc/haproxy/haproxy.cfg"]
        );
        assert_eq!(haproxy.reload, ["systemctl", "reload", "haproxy"]);
        assert_eq!(haproxy.key_mode, 0o600);
        assert_eq!(
            (haproxy.owners, haproxy.groups),
            (&["root"][..], &["haproxy"][..])
        );
        assert!(haproxy.combined_pem);

        let postfix = Kind::Postfix.defaults();
        assert_eq!(postfix.validate, ["postfix", "check"]);
        assert_eq!(postfix.reload, ["postfix", "reload"]);
        assert_eq!(postfix.verify_protocol, VerifyProtocol::SmtpStarttls);

        let dovecot = Kind::Dovecot.defaults();
        assert_eq!(dovecot.validate, ["doveconf", "-n"]);
        assert_eq!(dovecot.reload, ["doveadm", "reload"]);

        let caddy = Kind::Caddy.defaults();
        let (validate, reload) = caddy_commands(Path::new(CADDY_CONFIG), CADDY_ADAPTER, None);
        assert_eq!(caddy.validate, validate);
        assert_eq!(caddy.reload, reload);
        assert_eq!(caddy.key_mode, 0o640);
        assert_eq!(caddy.groups, ["caddy"]);

        for kind in [Kind::Traefik, Kind::Envoy] {
            let d = kind.defaults();
            assert!(d.validate.is_empty() && d.reload.is_empty(), "{kind}");
            assert_eq!(d.layout, DefaultLayout::Generations, "{kind}");
            assert_eq!(d.key_mode, 0o640, "{kind}");
        }
        assert_eq!(Kind::Traefik.defaults().groups, ["traefik"]);
        assert_eq!(Kind::Envoy.defaults().groups, ["envoy"]);
        let ks = Kind::Keystore.defaults();
        assert!(ks.validate.is_empty() && ks.reload.is_empty());
        assert_eq!((ks.key_mode, ks.layout), (0o640, DefaultLayout::InPlace));
        assert!(ks.groups.is_empty());

        for kind in Kind::ALL {
            let d = kind.defaults();
            assert_eq!(d.key_mode & 0o007, 0, "{kind}: key mode has an other bit");
            assert!(d.fullchain_in_cert);
            assert_eq!(d.combined_pem, *kind == Kind::Haproxy, "{kind}");
            let single = match kind {
                Kind::Haproxy => Some("pem_path"),
                Kind::Keystore => Some("keystore_path"),
                _ => None,
            };
            assert_eq!(kind.single_file_key(), single, "{kind}");
        }
        assert_eq!(
            haproxy_validate(Path::new(HAPROXY_CONFIG)),
            Kind::Haproxy.defaults().validate
        );
    }

    #[test]
    fn verify_protocol_by_port() {
        use VerifyProtocol::*;
        let cases = [
            (Kind::Dovecot, 993, Tls),
            (Kind::Dovecot, 995, Tls),
            (Kind::Dovecot, 143, ImapStarttls),
            (Kind::Dovecot, 110, Pop3Starttls),
            (Kind::Dovecot, 10143, ImapStarttls),
            (Kind::Postfix, 25, SmtpStarttls),
            (Kind::Postfix, 587, SmtpStarttls),
            (Kind::Postfix, 465, Tls),
            (Kind::Nginx, 993, Tls),
            (Kind::Apache, 443, Tls),
            (Kind::Haproxy, 443, Tls),
            (Kind::Caddy, 443, Tls),
            (Kind::Traefik, 443, Tls),
            (Kind::Envoy, 10443, Tls),
            (Kind::Keystore, 8443, Tls),
            (Kind::File, 25, Tls),
        ];
        for (kind, port, want) in cases {
            assert_eq!(kind.verify_protocol_for(port), want, "{kind} port {port}");
        }
    }

    #[test]
    fn caddy_commands_follow_the_keys() {
        let (validate, reload) = caddy_commands(
            Path::new("/srv/caddy.json"),
            "json",
            Some("unix//run/caddy/admin.sock"),
        );
        assert_eq!(
            validate,
            ["caddy", "validate", "--config", "/srv/caddy.json"]
        );
        assert_eq!(
            reload,
            [
                "caddy",
                "reload",
                "--force",
                "--config",
                "/srv/caddy.json",
                "--address",
                "unix//run/caddy/admin.sock"
            ]
        );
    }
}
