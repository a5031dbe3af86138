//! Target kinds: what kind of server a target feeds, and the defaults that
//! kind supplies (commands, file modes, owners, verify protocol).
//!
//! This module owns the list of kind names. It guarantees that every name the
//! contract reserves parses to either a built kind or a clear "not available in
//! this version" error, never to "unknown kind". Adding a kind means adding a
//! variant, one row in [`Kind::ALL`], one arm in [`Kind::as_str`] and
//! [`Kind::defaults`], and removing its name from [`PLANNED`].

use std::fmt;
use std::str::FromStr;

/// The server a target deploys to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Plain files; no commands unless configured.
    File,
    /// nginx: `nginx -t`, then `nginx -s reload`.
    Nginx,
}

/// Kind names that the contract reserves but this version does not implement.
pub const PLANNED: &[&str] = &[
    "apache", "haproxy", "postfix", "dovecot", "caddy", "traefik", "envoy", "keystore",
];

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
    /// Protocol used by `[target.verify]` when `protocol` is not set.
    pub verify_protocol: VerifyProtocol,
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
};

// === impl Kind ===

impl Kind {
    /// Every kind built into this version, in documentation order.
    pub const ALL: &'static [Kind] = &[Kind::File, Kind::Nginx];

    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Nginx => "nginx",
        }
    }

    /// The defaults this kind supplies.
    pub fn defaults(&self) -> KindDefaults {
        match self {
            Kind::File => FILE_DEFAULTS,
            Kind::Nginx => NGINX_DEFAULTS,
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

/// `file, nginx`: the built kinds, for messages.
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
        assert_eq!(
            Kind::parse("apache").map_err(|e| e.to_string()),
            Err(
                "kind \"apache\" is not available in this version of certctl (available: file, nginx)"
                    .to_owned()
            )
        );
    }

    #[test]
    fn unknown_kind() {
        assert_eq!(
            "foo".parse::<Kind>().map_err(|e| e.to_string()),
            Err("unknown kind \"foo\" (available: file, nginx)".to_owned())
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

        for kind in Kind::ALL {
            let d = kind.defaults();
            assert_eq!(d.key_mode & 0o007, 0, "{kind}: key mode has an other bit");
            assert!(d.fullchain_in_cert);
        }
    }
}
