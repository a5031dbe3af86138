//! The configuration file's shape, as serde reads it. Values stay as written
//! (strings, integers) so that `resolve` can report bad values with the key
//! path, all at once; only the shape (known keys, types) is checked here.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub target: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub socket: Option<String>,
    pub drop_dir: Option<String>,
    pub state_dir: Option<String>,
    pub deploy_groups: Option<Vec<String>>,
    pub read_groups: Option<Vec<String>>,
    pub settle: Option<String>,
    pub drop_owners: Option<Vec<String>>,
    pub metrics_listen: Option<String>,
    pub clock_skew_grace: Option<String>,
    pub rejected_keep: Option<i64>,
    pub rejected_max_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub name: String,
    pub kind: String,
    pub drop: Option<String>,
    pub layout: Option<String>,
    /// Required, except for kinds that name their one file otherwise
    /// (haproxy's `pem_path`, keystore's `keystore_path`).
    pub cert_path: Option<String>,
    pub key_path: Option<String>,
    pub chain_path: Option<String>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub cert_mode: Option<RawMode>,
    pub key_mode: Option<RawMode>,
    pub validate: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
    pub command_timeout: Option<String>,
    pub backup_retention: Option<i64>,
    pub verify: Option<RawVerify>,
    /// The target's files are on another host, reached over SSH.
    pub ssh: Option<RawSsh>,
    // The kinds' own keys (docs/kinds.md); `resolve` refuses them on
    // other kinds.
    /// haproxy: the one file holding leaf, chain and key.
    pub pem_path: Option<String>,
    /// haproxy: the configuration file `haproxy -c -f` checks.
    pub haproxy_config: Option<String>,
    /// haproxy: reload through the master CLI on this socket.
    pub master_socket: Option<String>,
    /// haproxy: no reload, the runtime API on this (admin-level stats) socket.
    pub admin_socket: Option<String>,
    /// caddy (file mode): the configuration `caddy validate`/`reload` read.
    pub caddy_config: Option<String>,
    /// caddy (file mode): its config adapter.
    pub caddy_adapter: Option<String>,
    /// caddy (file mode): the admin address `caddy reload --address` uses.
    pub caddy_address: Option<String>,
    /// caddy (admin-API mode): load the certificate through this endpoint.
    pub admin_url: Option<String>,
    /// traefik: the file provider's dynamic configuration certctl writes.
    pub dynamic_config: Option<String>,
    /// envoy: the SDS resource file certctl writes.
    pub sds_path: Option<String>,
    /// envoy: the secret's name in the SDS file (default: the target name).
    pub secret_name: Option<String>,
    /// keystore: the one keystore file.
    pub keystore_path: Option<String>,
    /// keystore: `pkcs12` (default) or `jks`.
    pub keystore_type: Option<String>,
    /// keystore: the entry's alias (default: the target name).
    pub alias: Option<String>,
    /// keystore: the file holding the keystore password.
    pub password_file: Option<String>,
    /// keystore: the systemd credential holding the keystore password.
    pub password_credential: Option<String>,
}

impl RawTarget {
    /// The kind-specific keys that are set, with the kind each belongs to.
    pub fn kind_keys_set(&self) -> Vec<(&'static str, &'static str)> {
        [
            ("pem_path", "haproxy", self.pem_path.is_some()),
            ("haproxy_config", "haproxy", self.haproxy_config.is_some()),
            ("master_socket", "haproxy", self.master_socket.is_some()),
            ("admin_socket", "haproxy", self.admin_socket.is_some()),
            ("caddy_config", "caddy", self.caddy_config.is_some()),
            ("caddy_adapter", "caddy", self.caddy_adapter.is_some()),
            ("caddy_address", "caddy", self.caddy_address.is_some()),
            ("admin_url", "caddy", self.admin_url.is_some()),
            ("dynamic_config", "traefik", self.dynamic_config.is_some()),
            ("sds_path", "envoy", self.sds_path.is_some()),
            ("secret_name", "envoy", self.secret_name.is_some()),
            ("keystore_path", "keystore", self.keystore_path.is_some()),
            ("keystore_type", "keystore", self.keystore_type.is_some()),
            ("alias", "keystore", self.alias.is_some()),
            ("password_file", "keystore", self.password_file.is_some()),
            (
                "password_credential",
                "keystore",
                self.password_credential.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, kind, set)| set.then_some((key, kind)))
        .collect()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVerify {
    pub endpoint: Option<String>,
    pub endpoints: Option<Vec<RawEndpoint>>,
    pub server_name: Option<String>,
    pub protocol: Option<String>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
    pub max_backoff: Option<String>,
    pub timeout: Option<String>,
    pub interval: Option<String>,
    pub require_chain_match: Option<bool>,
    pub ca_file: Option<String>,
    pub consecutive: Option<i64>,
    pub settle: Option<String>,
}

/// `[target.ssh]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSsh {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub user: Option<String>,
    pub identity_file: Option<String>,
    pub identity_credential: Option<String>,
    pub known_hosts: Option<String>,
    pub connect_timeout: Option<String>,
}

/// An entry of `endpoints`: `"HOST:PORT"`, or a table with the address and
/// what differs for it (`server_name`, `protocol`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawEndpoint {
    pub address: String,
    pub server_name: Option<String>,
    pub protocol: Option<String>,
}

impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            server_name: Option<String>,
            protocol: Option<String>,
        }

        struct EndpointVisitor;

        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = RawEndpoint;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"HOST:PORT\" or a table { address = \"HOST:PORT\", server_name = \"...\", protocol = \"...\" }",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint {
                    address: v.to_owned(),
                    server_name: None,
                    protocol: None,
                })
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawEndpoint {
                    address: t.address,
                    server_name: t.server_name,
                    protocol: t.protocol,
                })
            }
        }

        deserializer.deserialize_any(EndpointVisitor)
    }
}

impl RawVerify {
    /// The keys set besides `endpoint`, for the "no endpoint" message.
    pub fn keys_set(&self) -> Vec<&'static str> {
        [
            ("server_name", self.server_name.is_some()),
            ("protocol", self.protocol.is_some()),
            ("attempts", self.attempts.is_some()),
            ("backoff", self.backoff.is_some()),
            ("max_backoff", self.max_backoff.is_some()),
            ("timeout", self.timeout.is_some()),
            ("interval", self.interval.is_some()),
            ("require_chain_match", self.require_chain_match.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("consecutive", self.consecutive.is_some()),
            ("settle", self.settle.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// A file mode as written: a string (right) or a number (wrong, but accepted
/// here so that the error can say "quote it" next to the key path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawMode {
    Text(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for RawMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ModeVisitor;

        impl Visitor<'_> for ModeVisitor {
            type Value = RawMode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a quoted octal mode such as \"0640\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawMode, E> {
                Ok(RawMode::Text(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawMode, E> {
                Ok(RawMode::Number(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawMode, E> {
                Ok(RawMode::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }

        deserializer.deserialize_any(ModeVisitor)
    }
}
