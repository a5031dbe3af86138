//! Validation and resolution: raw values in, a [`Config`] or every problem out.
//!
//! Each check records a [`Problem`] under the key path and carries on with a
//! placeholder, so one run reports everything that is wrong. The only I/O is
//! reading metadata (target directories, `ca_file`) and user/group lookups
//! through [`Host`]; nothing is created or changed.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::ServerName;

use super::error::{ConfigError, Problem, suggest};
use super::host::Host;
use super::raw::{RawAgent, RawConfig, RawEndpoint, RawMode, RawTarget, RawVerify};
use super::{
    AgentConfig, Config, Group, Ident, Layout, Target, VerifyConfig, VerifyEndpoint, VerifyProtocol,
};
use crate::kind::{DefaultLayout, Kind};

mod kinds;
mod remote;

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);

/// `verify.consecutive` by default: three matching handshakes in a row.
const DEFAULT_CONSECUTIVE: u32 = 3;
/// `verify.settle` by default: the three matches span one second, about
/// five times the longest handover of nginx's workers measured after
/// `nginx -s reload` (docs/verification.md).
const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

/// `path` made absolute against the working directory, without `.` components.
/// Symlinks and `..` are kept: resolving them lexically could change the file
/// meant.
pub(super) fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.components().collect()
}

pub(super) fn resolve(
    raw: RawConfig,
    path: PathBuf,
    host: &dyn Host,
) -> Result<Config, ConfigError> {
    let base = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let mut r = Resolver {
        base,
        host,
        problems: Vec::new(),
        state_dir: PathBuf::new(),
        remote: false,
    };
    let agent = r.agent(raw.agent);
    r.state_dir.clone_from(&agent.state_dir);
    let mut targets = Vec::with_capacity(raw.target.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut files: HashMap<PathBuf, String> = HashMap::new();
    let own_dirs = [
        ("agent.drop_dir", dir_identity(&agent.drop_dir)),
        ("agent.state_dir", dir_identity(&agent.state_dir)),
    ];
    for (index, raw_target) in raw.target.into_iter().enumerate() {
        let label = format!("target {:?} (target[{index}])", raw_target.name);
        if let Some(first) = names.get(&raw_target.name) {
            r.problem(
                format!("{label}.name"),
                format!(
                    "{:?} is already the name of target[{first}]: target names must be unique",
                    raw_target.name
                ),
            );
        } else {
            names.insert(raw_target.name.clone(), index);
        }
        let target = r.target(&label, raw_target);
        // A combined PEM or a keystore is one file in two roles, named by
        // one key.
        let single = target.kind.single_file_key();
        let written = target.reload_hook.as_ref().and_then(|h| h.writes());
        for (role, file) in [
            (single.unwrap_or("cert_path"), Some(&target.cert_path)),
            ("key_path", single.is_none().then_some(&target.key_path)),
            ("chain_path", target.chain_path.as_ref()),
            (
                written.map_or("", |(key, _)| key),
                written.map(|(_, path)| path),
            ),
        ] {
            let Some(file) = file else { continue };
            let key = format!("{label}.{role}");
            let id = match &target.ssh {
                // Another host's file: the same path on two hosts is two files.
                Some(ssh) => {
                    PathBuf::from(format!("ssh://{}:{}{}", ssh.host, ssh.port, file.display()))
                }
                None => file_identity(file),
            };
            if let Some(other) = files.get(&id) {
                r.problem(
                    &key,
                    format!(
                        "{} is also {other}: each deployed file belongs to one target and one role",
                        file.display()
                    ),
                );
            } else {
                files.insert(id.clone(), key.clone());
            }
            for (dir_key, dir) in &own_dirs {
                if target.ssh.is_none() && id.starts_with(dir) {
                    r.problem(
                        &key,
                        format!(
                            "{} is inside {dir_key} ({}): deploy targets outside the agent's own directories",
                            file.display(),
                            dir.display()
                        ),
                    );
                }
            }
        }
        targets.push(target);
    }
    if r.problems.is_empty() {
        Ok(Config {
            path,
            agent,
            targets,
        })
    } else {
        Err(ConfigError::Invalid {
            path,
            problems: r.problems,
        })
    }
}

struct Resolver<'h> {
    /// The config file's directory: the base of relative paths.
    base: PathBuf,
    host: &'h dyn Host,
    problems: Vec<Problem>,
    /// `agent.state_dir`, resolved (scratch space of kinds that need it).
    state_dir: PathBuf,
    /// The target being resolved has `[target.ssh]`: its paths and owners
    /// are the remote host's, not looked up here.
    remote: bool,
}

#[derive(Clone, Copy)]
enum Db {
    User,
    Group,
}

impl Db {
    fn noun(self) -> &'static str {
        match self {
            Db::User => "user",
            Db::Group => "group",
        }
    }
}

// === impl Resolver: tables ===

impl Resolver<'_> {
    fn agent(&mut self, raw: RawAgent) -> AgentConfig {
        let socket = self.dir_path(
            "agent.socket",
            raw.socket.as_deref(),
            "/run/certctl/agent.sock",
        );
        let drop_dir = self.dir_path(
            "agent.drop_dir",
            raw.drop_dir.as_deref(),
            "/var/lib/certctl/drop",
        );
        let state_dir = self.dir_path(
            "agent.state_dir",
            raw.state_dir.as_deref(),
            "/var/lib/certctl/state",
        );
        let (d, s) = (dir_identity(&drop_dir), dir_identity(&state_dir));
        if d.starts_with(&s) || s.starts_with(&d) {
            self.problem(
                "agent.drop_dir",
                format!(
                    "{} and agent.state_dir {} overlap: the drop directory is untrusted input, \
                     so use two separate directories",
                    drop_dir.display(),
                    state_dir.display()
                ),
            );
        }

        let deploy_groups = match raw.deploy_groups {
            Some(names) => self.groups("agent.deploy_groups", &names),
            // The default group only counts where the package created it.
            None => self
                .host
                .group_id("certctl")
                .ok()
                .flatten()
                .map(|gid| Group {
                    name: "certctl".to_owned(),
                    gid,
                })
                .into_iter()
                .collect(),
        };
        let read_groups = self.groups(
            "agent.read_groups",
            raw.read_groups.as_deref().unwrap_or(&[]),
        );

        let drop_owners = raw.drop_owners.unwrap_or_default();
        for (i, name) in drop_owners.iter().enumerate() {
            self.drop_owner(&format!("agent.drop_owners[{i}]"), name);
        }

        let metrics_listen = raw.metrics_listen.and_then(|text| match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    "agent.metrics_listen",
                    format!(
                        "{text:?} is not an IP address and port \
                         (examples: \"127.0.0.1:9793\", \"[::1]:9793\"; host names are not accepted)"
                    ),
                );
                None
            }
        });

        AgentConfig {
            socket,
            drop_dir,
            state_dir,
            deploy_groups,
            read_groups,
            settle: self.duration(
                "agent.settle",
                raw.settle.as_deref(),
                2 * SECOND,
                Duration::ZERO,
                HOUR,
            ),
            drop_owners,
            metrics_listen,
            clock_skew_grace: self.duration(
                "agent.clock_skew_grace",
                raw.clock_skew_grace.as_deref(),
                5 * MINUTE,
                Duration::ZERO,
                DAY,
            ),
            rejected_keep: self.count(
                "agent.rejected_keep",
                raw.rejected_keep,
                100,
                (1, 100_000),
                " (at least the latest rejected drop is kept, with its reason)",
            ),
            rejected_max_age: self.duration(
                "agent.rejected_max_age",
                raw.rejected_max_age.as_deref(),
                30 * DAY,
                HOUR,
                3650 * DAY,
            ),
        }
    }

    fn target(&mut self, label: &str, raw: RawTarget) -> Target {
        let key = |k: &str| format!("{label}.{k}");

        if !valid_name(&raw.name) {
            self.problem(
                key("name"),
                format!("{:?} is not a valid target name: {NAME_RULE}", raw.name),
            );
        }
        let kind = Kind::parse(&raw.kind).unwrap_or_else(|e| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            let message = match suggest(&raw.kind, &names) {
                Some(best) => format!("{e}: did you mean \"{best}\"?"),
                None => e.to_string(),
            };
            self.problem(key("kind"), message);
            Kind::File
        });
        let defaults = kind.defaults();
        // A defaulted drop name is the target name, already checked.
        if let Some(drop) = &raw.drop
            && !valid_name(drop)
        {
            self.problem(
                key("drop"),
                format!("{drop:?} is not a valid drop name: {NAME_RULE}"),
            );
        }
        let drop = raw.drop.clone().unwrap_or_else(|| raw.name.clone());
        let ssh = self.ssh(label, &raw);
        self.remote = raw.ssh.is_some();
        let layout = match raw.layout.as_deref() {
            None => match defaults.layout {
                DefaultLayout::InPlace => Layout::InPlace,
                DefaultLayout::Generations => Layout::Generations,
            },
            Some("in-place") => Layout::InPlace,
            Some("generations") => Layout::Generations,
            Some(other) => {
                self.problem(
                    key("layout"),
                    match suggest(other, &["in-place", "generations"]) {
                        Some(best) => format!(
                            "unknown layout {other:?} (expected \"in-place\" or \"generations\"): did you mean \"{best}\"?"
                        ),
                        None => format!(
                            "unknown layout {other:?} (expected \"in-place\" or \"generations\")"
                        ),
                    },
                );
                Layout::InPlace
            }
        };

        self.foreign_kind_keys(label, kind, &raw);
        let (cert_path, key_path, chain_path) = self.target_files(label, kind, &raw);
        let commands = self.kind_commands(label, kind, &raw, &cert_path, &key_path);
        let keystore = (kind == Kind::Keystore).then(|| self.keystore(label, &raw));
        if layout == Layout::Generations {
            let dir = cert_path.parent();
            let names: Vec<_> = [Some(&cert_path), Some(&key_path), chain_path.as_ref()]
                .into_iter()
                .flatten()
                .collect();
            if names.iter().any(|p| p.parent() != dir) {
                self.problem(
                    key("layout"),
                    "\"generations\" switches the whole set with one symlink in one directory: \
                     cert_path, key_path and chain_path must be in the same directory",
                );
            }
            if names.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == "..data" || n.starts_with(".certctl"))
            }) {
                self.problem(
                    key("layout"),
                    "the names \"..data\" and \".certctl*\" are the layout's own: rename the file",
                );
            }
        }

        let owner = raw
            .owner
            .and_then(|s| self.ident(&key("owner"), &s, Db::User));
        let group = raw
            .group
            .and_then(|s| self.ident(&key("group"), &s, Db::Group));
        // A remote target's files belong to the account the agent logs in
        // as unless owner or group says otherwise.
        let root = self.host.euid() == 0 && !self.remote;
        let default_owner = root
            .then(|| self.first_existing(defaults.owners, Db::User))
            .flatten();
        let default_group = root
            .then(|| self.first_existing(defaults.groups, Db::Group))
            .flatten();

        let cert_mode = raw
            .cert_mode
            .and_then(|m| self.mode(&key("cert_mode"), "cert_mode", &m, false));
        let key_mode = raw
            .key_mode
            .and_then(|m| self.mode(&key("key_mode"), "key_mode", &m, true));

        let validate = self.argv(&key("validate"), raw.validate, &commands.validate);
        let reload = self.argv(&key("reload"), raw.reload, &commands.reload);
        let command_timeout = self.duration(
            &key("command_timeout"),
            raw.command_timeout.as_deref(),
            30 * SECOND,
            Duration::from_millis(1),
            HOUR,
        );
        let backup_retention = self.count(
            &key("backup_retention"),
            raw.backup_retention,
            3,
            (1, 100),
            " (rollback restores the newest backup, so keep at least one)",
        );
        let verify = self.verify(label, raw.verify, kind);

        Target {
            name: raw.name,
            kind,
            drop,
            layout,
            cert_path,
            key_path,
            chain_path,
            owner,
            group,
            default_owner,
            default_group,
            cert_mode,
            key_mode,
            default_cert_mode: defaults.cert_mode,
            default_key_mode: defaults.key_mode,
            validate,
            reload,
            reload_hook: commands.hook,
            command_timeout,
            backup_retention,
            verify,
            keystore,
            ssh,
        }
    }

    fn verify(&mut self, label: &str, raw: Option<RawVerify>, kind: Kind) -> Option<VerifyConfig> {
        let mut raw = raw?;
        let key = |k: &str| format!("{label}.verify.{k}");
        let entries: Vec<(String, RawEndpoint)> = match (raw.endpoint.take(), raw.endpoints.take())
        {
            (None, None) => {
                let set = raw.keys_set();
                if !set.is_empty() {
                    self.problem(
                        format!("{label}.verify"),
                        format!(
                            "sets {} but no endpoint, so nothing would be verified: \
                             add endpoint = \"HOST:PORT\" (or endpoints = [\"HOST:PORT\", ...]) \
                             or remove the [target.verify] table",
                            set.join(", ")
                        ),
                    );
                }
                return None;
            }
            (Some(_), Some(_)) => {
                self.problem(
                    key("endpoints"),
                    "is set together with verify.endpoint: keep one of the two keys \
                     (endpoint = \"HOST:PORT\" for one endpoint, endpoints = [...] for several)",
                );
                return None;
            }
            (Some(address), None) => vec![(
                key("endpoint"),
                RawEndpoint {
                    address,
                    server_name: None,
                    protocol: None,
                },
            )],
            (None, Some(list)) => {
                if list.is_empty() {
                    self.problem(
                        key("endpoints"),
                        "is empty: list at least one \"HOST:PORT\", or remove the [target.verify] table",
                    );
                    return None;
                }
                list.into_iter()
                    .enumerate()
                    .map(|(i, e)| (key(&format!("endpoints[{i}]")), e))
                    .collect()
            }
        };
        let mut endpoints: Vec<VerifyEndpoint> = Vec::with_capacity(entries.len());
        for (entry_key, entry) in entries {
            let endpoint = self.verify_endpoint(&key, &entry_key, entry, &raw, kind);
            if endpoints
                .iter()
                .any(|e| e.address == endpoint.address && e.server_name == endpoint.server_name)
            {
                self.problem(
                    &entry_key,
                    format!(
                        "{:?} is listed twice{}: remove one of the entries",
                        endpoint.address,
                        endpoint
                            .server_name
                            .as_ref()
                            .map(|n| format!(" with server_name {n:?}"))
                            .unwrap_or_default()
                    ),
                );
            }
            endpoints.push(endpoint);
        }
        let attempts = self.count(&key("attempts"), raw.attempts, 3, (1, 20), "");
        let backoff = self.duration(
            &key("backoff"),
            raw.backoff.as_deref(),
            SECOND,
            Duration::ZERO,
            10 * MINUTE,
        );
        // An explicit backoff above the default cap raises the default cap.
        let max_backoff = self.duration(
            &key("max_backoff"),
            raw.max_backoff.as_deref(),
            (16 * SECOND).max(backoff),
            Duration::ZERO,
            HOUR,
        );
        if max_backoff < backoff {
            self.problem(
                key("max_backoff"),
                format!(
                    "{} is less than backoff ({}): the cap must be at least the first wait",
                    humantime::format_duration(max_backoff),
                    humantime::format_duration(backoff)
                ),
            );
        }
        let timeout = self.duration(
            &key("timeout"),
            raw.timeout.as_deref(),
            10 * SECOND,
            Duration::from_millis(1),
            5 * MINUTE,
        );
        let interval = raw
            .interval
            .as_deref()
            .map(|text| self.duration(&key("interval"), Some(text), HOUR, SECOND, 30 * DAY));
        let ca_file = raw.ca_file.and_then(|text| {
            let path = self.path(&key("ca_file"), &text)?;
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => self.problem(
                    key("ca_file"),
                    format!("{} is not a regular file", path.display()),
                ),
                Err(e) => self.problem(
                    key("ca_file"),
                    format!("cannot use {}: {e}", path.display()),
                ),
            }
            Some(path)
        });
        let consecutive = self.count(
            &key("consecutive"),
            raw.consecutive,
            DEFAULT_CONSECUTIVE,
            (1, 20),
            ": 1 passes on the first matching handshake",
        );
        let settle = if consecutive == 1 {
            match raw.settle.as_deref() {
                Some(text)
                    if self.duration(
                        &key("settle"),
                        Some(text),
                        Duration::ZERO,
                        Duration::ZERO,
                        MINUTE,
                    ) > Duration::ZERO =>
                {
                    self.problem(
                        key("settle"),
                        format!(
                            "{text:?} is the span that consecutive matches must cover, but \
                             consecutive = 1 has no span: raise consecutive (e.g. 3) or remove settle"
                        ),
                    );
                    Duration::ZERO
                }
                _ => Duration::ZERO,
            }
        } else {
            self.duration(
                &key("settle"),
                raw.settle.as_deref(),
                DEFAULT_SETTLE,
                Duration::ZERO,
                MINUTE,
            )
        };
        Some(VerifyConfig {
            endpoints,
            attempts,
            backoff,
            max_backoff,
            timeout,
            interval,
            require_chain_match: raw.require_chain_match.unwrap_or(false),
            ca_file,
            consecutive,
            settle,
        })
    }

    /// One endpoint: its address checked, its server name and protocol
    /// (its own, else the table's, else the kind's for its port).
    fn verify_endpoint(
        &mut self,
        key: &dyn Fn(&str) -> String,
        entry_key: &str,
        entry: RawEndpoint,
        raw: &RawVerify,
        kind: Kind,
    ) -> VerifyEndpoint {
        let own = entry.server_name.is_some() || entry.protocol.is_some();
        // The kind's protocol, which for mail servers depends on the port.
        let default_protocol = match check_endpoint(&entry.address) {
            Ok(port) => kind.verify_protocol_for(port),
            Err(why) => {
                let at = if own {
                    format!("{entry_key}.address")
                } else {
                    entry_key.to_owned()
                };
                self.problem(at, format!("{:?} {why}", entry.address));
                kind.defaults().verify_protocol
            }
        };
        let (name_key, server_name) = match entry.server_name {
            Some(name) => (format!("{entry_key}.server_name"), Some(name)),
            None => (key("server_name"), raw.server_name.clone()),
        };
        if let Some(name) = &server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            self.problem(
                name_key,
                format!("{name:?} is not a DNS name or IP address (and takes no port)"),
            );
        }
        let (protocol_key, protocol_text) = match entry.protocol {
            Some(text) => (format!("{entry_key}.protocol"), Some(text)),
            None => (key("protocol"), raw.protocol.clone()),
        };
        let protocol = match protocol_text.as_deref() {
            None => default_protocol,
            Some(text) => VerifyProtocol::parse(text).unwrap_or_else(|| {
                let names: Vec<&str> = VerifyProtocol::ALL
                    .iter()
                    .map(VerifyProtocol::as_str)
                    .collect();
                self.problem(
                    protocol_key,
                    format!(
                        "unknown protocol {text:?} (expected one of: {})",
                        names.join(", ")
                    ),
                );
                default_protocol
            }),
        };
        VerifyEndpoint {
            address: entry.address,
            server_name,
            protocol,
        }
    }
}

// === impl Resolver: values ===

impl Resolver<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// A relative path joined to the config directory; `.` components dropped.
    fn path(&mut self, key: &str, text: &str) -> Option<PathBuf> {
        if text.is_empty() {
            self.problem(key, "is empty: give a path");
            return None;
        }
        if text.contains('\0') {
            self.problem(key, format!("{text:?} contains a NUL byte"));
            return None;
        }
        Some(self.base.join(text).components().collect())
    }

    /// An agent path (socket or directory) with its default. Not checked on
    /// disk: the agent creates its own directories.
    fn dir_path(&mut self, key: &str, text: Option<&str>, default: &str) -> PathBuf {
        self.path(key, text.unwrap_or(default))
            .unwrap_or_else(|| PathBuf::from(default))
    }

    /// A deployed file: its directory must exist, and it must not be a directory.
    fn target_file(&mut self, key: &str, text: &str) -> PathBuf {
        let Some(path) = self.path(key, text) else {
            return PathBuf::new();
        };
        if self.remote {
            // A path on the remote host (absolute: checked with the
            // [target.ssh] table), looked at when the agent connects.
            return path;
        }
        if text.ends_with('/')
            || matches!(
                path.components().next_back(),
                Some(Component::RootDir | Component::ParentDir)
            )
        {
            self.problem(
                key,
                format!("{text:?} names a directory: give the path of a file"),
            );
            return path;
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                self.problem(key, format!("{} is not a directory", dir.display()));
                return path;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.problem(
                    key,
                    format!(
                        "directory {} does not exist: create it, or fix the path \
                         (certctl does not create target directories)",
                        dir.display()
                    ),
                );
                return path;
            }
            Err(e) => {
                self.problem(key, format!("cannot use directory {}: {e}", dir.display()));
                return path;
            }
        }
        if let Ok(meta) = fs::symlink_metadata(&path)
            && meta.is_dir()
        {
            self.problem(
                key,
                format!("{} is a directory: give the path of a file", path.display()),
            );
        }
        path
    }

    fn duration(
        &mut self,
        key: &str,
        text: Option<&str>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(text) = text else { return default };
        let Ok(value) = humantime::parse_duration(text) else {
            self.problem(
                key,
                format!("{text:?} is not a duration (examples: \"500ms\", \"2s\", \"1m\")"),
            );
            return default;
        };
        if value < min {
            let why = if min == Duration::from_millis(1) {
                "must be more than 0".to_owned()
            } else {
                format!("must be at least {}", humantime::format_duration(min))
            };
            self.problem(key, format!("{text:?} is too short: {why}"));
            return default;
        }
        if value > max {
            self.problem(
                key,
                format!(
                    "{text:?} is too long: at most {}",
                    humantime::format_duration(max)
                ),
            );
            return default;
        }
        value
    }

    /// An integer in `min..=max`; `why_min` follows the message of a value below `min`.
    fn count(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: u32,
        (min, max): (u32, u32),
        why_min: &str,
    ) -> u32 {
        let Some(value) = value else { return default };
        match u32::try_from(value) {
            Ok(v) if (min..=max).contains(&v) => v,
            _ => {
                let why = if value < i64::from(min) { why_min } else { "" };
                self.problem(
                    key,
                    format!("{value} is out of range: use {min} to {max}{why}"),
                );
                default
            }
        }
    }

    fn mode(&mut self, key: &str, name: &str, raw: &RawMode, private_key: bool) -> Option<u32> {
        let text = match raw {
            RawMode::Text(text) => text,
            RawMode::Number(n) => {
                let example = if (0..=7777).contains(n) && n.to_string().chars().all(|c| c < '8') {
                    format!("{n:04}")
                } else {
                    "0640".to_owned()
                };
                self.problem(
                    key,
                    format!(
                        "{n} is a number; modes are octal strings, so quote it: {name} = \"{example}\""
                    ),
                );
                return None;
            }
        };
        let digits_ok =
            (1..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let Some(mode) = digits_ok
            .then(|| u32::from_str_radix(text, 8).ok())
            .flatten()
        else {
            self.problem(
                key,
                format!("{text:?} is not an octal mode: write it like \"0640\""),
            );
            return None;
        };
        if mode > 0o777 {
            self.problem(
                key,
                format!("{text:?} sets a setuid, setgid or sticky bit: certificate files take only permission bits, like \"0640\""),
            );
            return None;
        }
        if private_key && mode & 0o007 != 0 {
            let what = if mode & 0o004 != 0 {
                "read"
            } else if mode & 0o002 != 0 {
                "overwrite"
            } else {
                "reach"
            };
            self.problem(
                key,
                format!("{text:?} would let any local user {what} the private key: use \"0600\" or \"0640\""),
            );
            return None;
        }
        Some(mode)
    }

    fn ident(&mut self, key: &str, spec: &str, db: Db) -> Option<Ident> {
        let noun = db.noun();
        if spec.is_empty() {
            self.problem(key, format!("is empty: give a {noun} name or a numeric id"));
            return None;
        }
        if spec.bytes().all(|b| b.is_ascii_digit()) {
            let Ok(id) = spec.parse::<u32>() else {
                self.problem(key, format!("{spec:?} is not a valid {noun} id"));
                return None;
            };
            let name = match db {
                _ if self.remote => None,
                Db::User => self.host.user_name(id),
                Db::Group => self.host.group_name(id),
            };
            return Some(Ident {
                name: name.unwrap_or_else(|| spec.to_owned()),
                id,
            });
        }
        if self.remote {
            // Refused with the [target.ssh] table: names are this host's.
            return None;
        }
        match lookup(self.host, db, spec) {
            Ok(Some(id)) => Some(Ident {
                name: spec.to_owned(),
                id,
            }),
            Ok(None) => {
                self.problem(
                    key,
                    format!("no {noun} {spec:?} on this host: create it, or fix the name"),
                );
                None
            }
            Err(e) => {
                self.problem(key, format!("cannot look up {noun} {spec:?}: {e}"));
                None
            }
        }
    }

    fn groups(&mut self, key: &str, names: &[String]) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let Some(ident) = self.ident(&format!("{key}[{i}]"), name, Db::Group)
                && !groups.iter().any(|g| g.gid == ident.id)
            {
                groups.push(Group {
                    name: ident.name,
                    gid: ident.id,
                });
            }
        }
        groups
    }

    fn drop_owner(&mut self, key: &str, name: &str) {
        if name.is_empty() {
            self.problem(key, "is empty: give a user or group name, or a numeric id");
            return;
        }
        if name.bytes().all(|b| b.is_ascii_digit()) {
            if name.parse::<u32>().is_err() {
                self.problem(key, format!("{name:?} is not a valid id"));
            }
            return;
        }
        let user = lookup(self.host, Db::User, name);
        let group = lookup(self.host, Db::Group, name);
        match (user, group) {
            (Ok(Some(_)), _) | (_, Ok(Some(_))) => {}
            (Err(e), _) | (_, Err(e)) => {
                self.problem(key, format!("cannot look up {name:?}: {e}"));
            }
            (Ok(None), Ok(None)) => self.problem(
                key,
                format!("no user or group {name:?} on this host: create it, or fix the name"),
            ),
        }
    }

    /// The first candidate that exists; lookup failures count as absent.
    fn first_existing(&self, candidates: &[&str], db: Db) -> Option<Ident> {
        candidates.iter().find_map(|name| {
            lookup(self.host, db, name).ok().flatten().map(|id| Ident {
                name: (*name).to_owned(),
                id,
            })
        })
    }

    fn argv(
        &mut self,
        key: &str,
        explicit: Option<Vec<String>>,
        default: &[String],
    ) -> Vec<String> {
        let mut argv = explicit.unwrap_or_else(|| default.to_vec());
        let Some(program) = argv.first_mut() else {
            return argv;
        };
        if program.is_empty() {
            self.problem(
                key,
                "the program (first element) is empty: name a program, or write [] for no command",
            );
        } else if program.contains('/') {
            if !program.starts_with('/') {
                // A relative program path is a relative path like any other.
                let resolved: PathBuf = self.base.join(&*program).components().collect();
                *program = resolved.to_string_lossy().into_owned();
            }
        } else if program.contains(char::is_whitespace) {
            let words: Vec<String> = program
                .split_whitespace()
                .map(|w| format!("{w:?}"))
                .collect();
            self.problem(
                key,
                format!(
                    "{program:?} is not a program name: commands are argv arrays, never shell strings; \
                     write [{}]",
                    words.join(", ")
                ),
            );
        }
        if argv.iter().any(|a| a.contains('\0')) {
            self.problem(key, "an argument contains a NUL byte");
        }
        argv
    }
}

// === helpers ===

const NAME_RULE: &str = "use 1 to 63 characters from a-z, 0-9, '.', '_' and '-', \
                         starting with a letter or digit";

/// `[a-z0-9][a-z0-9._-]{0,62}`
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok
        && name.len() <= 63
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn lookup(host: &dyn Host, db: Db, name: &str) -> Result<Option<u32>, String> {
    match db {
        Db::User => host.user_id(name),
        Db::Group => host.group_id(name),
    }
}

/// The endpoint's port; `Err` completes the sentence "ENDPOINT ...".
fn check_endpoint(endpoint: &str) -> Result<u16, String> {
    const FORM: &str =
        "write HOST:PORT, e.g. \"127.0.0.1:443\", \"mail.example.com:25\" or \"[::1]:443\"";
    let port = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("has no port: {FORM}"))?;
        host.parse::<Ipv6Addr>().map_err(|_| {
            format!("has {host:?} in brackets, which is not an IPv6 address: {FORM}")
        })?;
        port
    } else {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| format!("has no port: {FORM}"))?;
        if host.contains(':') {
            return Err(format!(
                "is ambiguous: put an IPv6 address in brackets: {FORM}"
            ));
        }
        if host.is_empty() || ServerName::try_from(host).is_err() {
            return Err(format!(
                "does not start with a host name or IP address: {FORM}"
            ));
        }
        port
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("has an invalid port {port:?}: use 1 to 65535")),
    }
}

/// What `path` is, for telling whether two configured files are the same:
/// the parent's canonical form joined with the file name. Falls back to the
/// path itself when the parent cannot be resolved (already reported).
fn file_identity(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            fs::canonicalize(dir).map_or_else(|_| path.to_path_buf(), |d| d.join(name))
        }
        _ => path.to_path_buf(),
    }
}

/// A directory's canonical form when it exists, else the path itself.
fn dir_identity(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "0", "web-1.example_com", &"a".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            ".web",
            "_web",
            "web/1",
            "wéb",
            "web 1",
            &"a".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        for ok in [
            "127.0.0.1:443",
            "localhost:25",
            "mail.example.com:993",
            "[::1]:443",
            "[2001:db8::1]:8443",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("127.0.0.1", "has no port"),
            ("example.com", "has no port"),
            ("::1:443", "brackets"),
            ("[::1]", "has no port"),
            ("[foo]:443", "not an IPv6 address"),
            (":443", "host name"),
            ("exa mple.com:443", "host name"),
            ("example.com:0", "invalid port"),
            ("example.com:65536", "invalid port"),
            ("example.com:https", "invalid port"),
        ] {
            let err = check_endpoint(bad).err().unwrap_or_default();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
