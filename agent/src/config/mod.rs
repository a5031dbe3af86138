//! Agent configuration: reads the TOML file of the contract, validates it and
//! resolves it into plain types that the rest of the agent uses.
//!
//! Guarantees of a [`Config`] returned by [`load`] or [`parse`]:
//! - every key was known (unknown keys are errors, with a "did you mean");
//! - every path is absolute (relative ones are resolved against the config
//!   file's directory), and every target file's parent directory existed at
//!   load time; no two targets share a deployed file;
//! - every user and group named was resolved to an id on this host;
//! - an explicit private-key mode never has an "other" bit or a special bit;
//! - kind defaults are already applied: `validate`/`reload` are the effective
//!   argv, `default_*` hold the kind's fallbacks for this host.
//!
//! Nothing outside this module sees TOML. Errors name the file, the key and
//! the problem; validation collects every problem, not just the first.
//!
//! Layout: `raw` (serde shapes), `resolve` (validation and defaults), `error`
//! (messages), `host` (user and group lookups, replaceable in tests).

mod error;
#[cfg(test)]
mod fuzz;
pub mod hook;
pub mod host;
pub mod keystore;
mod raw;
mod resolve;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kind::Kind;
pub use crate::kind::VerifyProtocol;
pub use error::{ConfigError, Problem};
use hook::ReloadHook;
pub use host::{Host, SystemHost};
use keystore::KeystoreConfig;

/// Where the agent looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/certctl/agent.toml";

/// A validated, resolved configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The configuration file, absolute.
    pub path: PathBuf,
    /// The `[agent]` table.
    pub agent: AgentConfig,
    /// The `[[target]]` tables, in file order. May be empty.
    pub targets: Vec<Target>,
}

/// The `[agent]` table, with defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// gRPC control socket.
    pub socket: PathBuf,
    /// Watched drop directory.
    pub drop_dir: PathBuf,
    /// Journal, history, rejected drops.
    pub state_dir: PathBuf,
    /// Groups whose members may deploy, roll back and reload.
    pub deploy_groups: Vec<Group>,
    /// Groups whose members may only read status, history and events.
    pub read_groups: Vec<Group>,
    /// Quiet time before a file written in place in the drop directory is taken.
    pub settle: Duration,
    /// When non-empty, only drops owned by these users or groups are accepted.
    /// Names as configured; each named an existing user or group at load time.
    pub drop_owners: Vec<String>,
    /// Prometheus endpoint; off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// A certificate whose `not_before` is at most this far in the future is accepted.
    pub clock_skew_grace: Duration,
    /// At most this many rejected drops are kept in `<state_dir>/rejected/`
    /// (the oldest are pruned first).
    pub rejected_keep: u32,
    /// Rejected drops older than this are pruned.
    pub rejected_max_age: Duration,
}

/// A group resolved on this host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Group {
    /// The group name (or the number as written, when the gid has no name).
    pub name: String,
    /// The numeric group id.
    pub gid: u32,
}

/// A user or group resolved on this host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ident {
    /// The name (or the number as written, when the id has no name).
    pub name: String,
    /// The numeric uid or gid.
    pub id: u32,
}

/// How a target's files are replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Each configured file is replaced by its own `rename`.
    InPlace,
    /// One `rename` of `<dir>/..data` switches the whole set.
    Generations,
}

/// One `[[target]]`, with kind defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Unique, `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
    /// The server kind.
    pub kind: Kind,
    /// The drop name this target takes (default: `name`). Targets may share one.
    pub drop: String,
    /// How files are replaced.
    pub layout: Layout,
    /// Certificate file (leaf, plus the chain when `chain_path` is `None` and
    /// the kind says `fullchain_in_cert`). Absolute. For a kind that
    /// deploys one file (haproxy's `pem_path`, a keystore's
    /// `keystore_path`), that file, and then equal to `key_path`.
    pub cert_path: PathBuf,
    /// Private key file. Absolute.
    pub key_path: PathBuf,
    /// Chain file. Absolute.
    pub chain_path: Option<PathBuf>,
    /// Explicit owner of the deployed files.
    pub owner: Option<Ident>,
    /// Explicit group of the deployed files.
    pub group: Option<Ident>,
    /// The kind's default owner on this host; `None` if the kind has none, none
    /// of its candidates exists, or the agent is not running as root.
    pub default_owner: Option<Ident>,
    /// The kind's default group on this host; same rules as `default_owner`.
    pub default_group: Option<Ident>,
    /// Explicit mode of the certificate and chain files.
    pub cert_mode: Option<u32>,
    /// Explicit mode of the key file; never has an "other" or special bit.
    pub key_mode: Option<u32>,
    /// The kind's certificate mode.
    pub default_cert_mode: u32,
    /// The kind's key mode; never has an "other" bit.
    pub default_key_mode: u32,
    /// Effective validate argv; empty: no validate command.
    pub validate: Vec<String>,
    /// Effective reload argv; empty: no reload command.
    pub reload: Vec<String>,
    /// A reload that is not a command (haproxy's master CLI or runtime API,
    /// caddy's admin API, traefik's dynamic configuration, envoy's SDS
    /// file); when set, `reload` is empty.
    pub reload_hook: Option<ReloadHook>,
    /// Limit for each validate or reload command.
    pub command_timeout: Duration,
    /// Backups (previous generations) kept; at least 1.
    pub backup_retention: u32,
    /// Post-deploy verification; `None`: results are "unverified".
    pub verify: Option<VerifyConfig>,
    /// Kind `keystore`: format, alias and password of the one file
    /// (`keystore_path`, which is `cert_path` and `key_path`).
    pub keystore: Option<KeystoreConfig>,
    /// `[target.ssh]`: the files are on another host, written over SSH
    /// and its commands run there (docs/remote.md). `None`: this host.
    pub ssh: Option<SshConfig>,
}

impl Target {
    /// Whether the target's files are on another host.
    pub fn is_remote(&self) -> bool {
        self.ssh.is_some()
    }
}

/// `[target.ssh]`: how the agent reaches the host a remote target's files
/// are on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SshConfig {
    /// Host name or address, as `ssh` takes it.
    pub host: String,
    /// 1 to 65535; 22 by default.
    pub port: u16,
    /// The account the agent logs in as.
    pub user: String,
    /// The private key the agent authenticates with.
    pub identity: SshIdentity,
    /// The pinned host keys: the only keys the host may present. Absolute.
    pub known_hosts: PathBuf,
    /// Limit on connecting, host key check and login included.
    pub connect_timeout: Duration,
}

/// Where a remote target's private SSH key is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SshIdentity {
    /// `identity_file`: an absolute path.
    File(PathBuf),
    /// `identity_credential`: a systemd credential (`LoadCredential=`),
    /// read from `$CREDENTIALS_DIRECTORY` when the agent connects.
    Credential(String),
}

/// `[target.verify]`, present only when an endpoint is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyConfig {
    /// Where the certificate must be served (`endpoint`, or each entry of
    /// `endpoints`), in configured order; never empty. Verified only when
    /// every one passes.
    pub endpoints: Vec<VerifyEndpoint>,
    /// Tries, 1 to 20.
    pub attempts: u32,
    /// First wait between tries; doubles each time.
    pub backoff: Duration,
    /// Cap on the wait; at least `backoff`.
    pub max_backoff: Duration,
    /// Limit per try.
    pub timeout: Duration,
    /// Drift watch period; `None`: off.
    pub interval: Option<Duration>,
    /// Also require the served intermediates to equal the deployed chain.
    pub require_chain_match: bool,
    /// Validate the served chain and name against this CA bundle. Absolute.
    pub ca_file: Option<PathBuf>,
    /// Matching handshakes in a row (fresh connections) an endpoint must
    /// give to pass, 1 to 20; any other result restarts the count.
    pub consecutive: u32,
    /// The span those matches must cover: handshakes are
    /// `settle / (consecutive - 1)` apart. Zero when `consecutive` is 1.
    pub settle: Duration,
}

/// One endpoint of `[target.verify]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyEndpoint {
    /// `host:port` or `[v6]:port`; the host is a DNS name or an IP address.
    pub address: String,
    /// SNI to send; `None`: the first DNS SAN of the deployed certificate
    /// (no SNI when the endpoint's host is an IP address and the
    /// certificate has no DNS name).
    pub server_name: Option<String>,
    /// What is spoken before the TLS handshake.
    pub protocol: VerifyProtocol,
}

impl VerifyConfig {
    /// The first endpoint: the one single-endpoint fields describe.
    pub fn first(&self) -> &VerifyEndpoint {
        &self.endpoints[0]
    }

    /// The endpoints' addresses, comma-separated.
    pub fn addresses(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The server names set in the configuration (each endpoint's, once).
    pub fn server_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for name in self
            .endpoints
            .iter()
            .filter_map(|e| e.server_name.as_deref())
        {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

// === impl Config ===

impl Config {
    /// The target called `name`.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The targets that take drops named `drop`, in file order.
    pub fn targets_for_drop<'a>(&'a self, drop: &'a str) -> impl Iterator<Item = &'a Target> {
        self.targets.iter().filter(move |t| t.drop == drop)
    }

    /// Things that are valid but worth telling the operator (for
    /// `check-config` and the log at start and reload).
    pub fn warnings(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.targets.is_empty() {
            notes.push(format!(
                "{}: no [[target]] is configured: every drop will be rejected until one is added",
                self.path.display()
            ));
        }
        if let Some(addr) = self.agent.metrics_listen
            && !addr.ip().is_loopback()
        {
            notes.push(format!(
                "{}: agent.metrics_listen: {addr} is not a loopback address: the metrics \
                 endpoint has no authentication, so limit who can reach it with a firewall",
                self.path.display()
            ));
        }
        notes
    }
}

// === impl Target ===

impl Target {
    /// The files this target deploys, in the order cert, key, chain, each
    /// once (a combined PEM is both cert and key).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        let key = (self.key_path != self.cert_path).then_some(self.key_path.as_path());
        [
            Some(self.cert_path.as_path()),
            key,
            self.chain_path.as_deref(),
        ]
        .into_iter()
        .flatten()
    }

    /// True when stage 8 does something: a reload command or hook.
    pub fn reloads(&self) -> bool {
        self.reload_hook.is_some() || !self.reload.is_empty()
    }
}

// === impl Layout ===

impl Layout {
    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Layout::InPlace => "in-place",
            Layout::Generations => "generations",
        }
    }
}

// === loading ===

/// The largest configuration file read (thousands of targets fit).
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Reads and parses the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_bounded(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Reads the file at `path` with a hard limit: opened without blocking (a
/// FIFO with no writer does not hang), refused unless it is a regular file
/// (`/dev/zero` reports size 0 and never ends), read up to the limit plus
/// one byte so that nothing larger is ever allocated.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a directory, device, FIFO or socket): name the TOML file itself",
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_CONFIG_BYTES) as usize);
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG_BYTES} bytes: this is not a certctl configuration"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text: a configuration is TOML",
        )
    })
}

/// Parses configuration text. `path` names the file in messages, and its
/// directory is the base of relative paths. Users and groups are looked up
/// on this host.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse_with(text, path, &SystemHost)
}

/// [`parse`], looking users and groups up in `host` (a seam for tests).
///
/// Unknown keys are reported together with every other problem: each one
/// found is recorded with its line and removed, and the file read again,
/// so one misspelt key does not hide the rest.
pub fn parse_with(text: &str, path: &Path, host: &dyn Host) -> Result<Config, ConfigError> {
    use serde::Deserialize as _;
    let path = resolve::absolute(path);
    let mut doc = toml::de::DeTable::parse(text).map_err(|e| error::syntax(&path, text, &e))?;
    let mut unknown = Vec::new();
    let raw = loop {
        match raw::RawConfig::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(raw) => break raw,
            Err(e) => {
                let removed = error::is_unknown_key(&e)
                    && unknown.len() < error::MAX_UNKNOWN_KEYS
                    && e.span()
                        .is_some_and(|span| remove_key(doc.get_mut(), &span));
                let problem = error::syntax_problem(text, &e);
                if !removed {
                    if unknown.is_empty() {
                        return Err(error::syntax(&path, text, &e));
                    }
                    // A shape error after unknown keys: report them all.
                    unknown.push(problem);
                    return Err(ConfigError::Invalid {
                        path,
                        problems: unknown,
                    });
                }
                unknown.push(problem);
            }
        }
    };
    match resolve::resolve(raw, path.clone(), host) {
        Ok(config) if unknown.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError::Invalid {
            path,
            problems: unknown,
        }),
        Err(ConfigError::Invalid { path, problems }) => {
            unknown.extend(problems);
            Err(ConfigError::Invalid {
                path,
                problems: unknown,
            })
        }
        Err(other) => Err(other),
    }
}

/// Removes the key whose name starts at `span.start` from `table` or any
/// table below it; `false` when there is none.
fn remove_key(table: &mut toml::de::DeTable<'_>, span: &std::ops::Range<usize>) -> bool {
    let found = table.keys().find(|k| k.span().start == span.start).cloned();
    if let Some(key) = found {
        return table.remove(&key).is_some();
    }
    table
        .iter_mut()
        .any(|(_, v)| remove_in_value(v.get_mut(), span))
}

fn remove_in_value(value: &mut toml::de::DeValue<'_>, span: &std::ops::Range<usize>) -> bool {
    match value {
        toml::de::DeValue::Table(t) => remove_key(t, span),
        toml::de::DeValue::Array(a) => a.iter_mut().any(|v| remove_in_value(v.get_mut(), span)),
        _ => false,
    }
}
