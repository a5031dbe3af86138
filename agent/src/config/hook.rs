//! How a target's server is made to load new files when that is not a
//! command: the reload hooks a target's kind and keys resolve to. Data only:
//! running a hook is `crate::reload`'s behaviour.

use std::path::{Path, PathBuf};

/// How a target's server is made to load new files, when that is not a
/// command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadHook {
    /// haproxy's master CLI on `socket`: `reload`, confirmed by `show proc`.
    HaproxyMaster { socket: PathBuf },
    /// haproxy's runtime API on `socket` (`stats socket ... level admin`):
    /// `set ssl cert` + `commit ssl cert` with the content of `pem`, under
    /// the name haproxy loaded it as (its path); no reload.
    HaproxyRuntime { socket: PathBuf, pem: PathBuf },
    /// caddy's admin API at `endpoint`: the certificate in `cert` (leaf and
    /// chain) with the key in `key`, loaded as the `load_pem` entry `id`.
    CaddyAdmin {
        endpoint: Endpoint,
        id: String,
        cert: PathBuf,
        key: PathBuf,
    },
    /// traefik's file provider: the dynamic configuration `config` naming
    /// `cert` and `key`, rewritten with the set's generation and leaf.
    TraefikDynamic {
        config: PathBuf,
        target: String,
        cert: PathBuf,
        key: PathBuf,
    },
    /// envoy's file-based SDS: the resource file `sds` with the TLS
    /// certificate secret `secret` on `cert` and `key`, watching their
    /// directory.
    EnvoySds {
        sds: PathBuf,
        secret: String,
        cert: PathBuf,
        key: PathBuf,
    },
}

impl ReloadHook {
    /// What the hook does, for `check-config` and messages.
    pub fn describe(&self) -> String {
        match self {
            ReloadHook::HaproxyMaster { socket } => {
                format!("haproxy master CLI `reload` on {}", socket.display())
            }
            ReloadHook::HaproxyRuntime { socket, pem } => format!(
                "haproxy runtime API on {}: set ssl cert {} + commit (no reload)",
                socket.display(),
                pem.display()
            ),
            ReloadHook::CaddyAdmin { endpoint, id, .. } => {
                format!("caddy admin API at {endpoint}: load_pem entry {id}")
            }
            ReloadHook::TraefikDynamic { config, .. } => format!(
                "traefik dynamic configuration {} rewritten (traefik's file provider watches it)",
                config.display()
            ),
            ReloadHook::EnvoySds { sds, secret, .. } => format!(
                "envoy SDS file {} (secret {secret}; envoy watches the certificate directory)",
                sds.display()
            ),
        }
    }

    /// The file this hook writes, with the key naming it, for hooks that
    /// write one: no two targets may write the same file.
    pub fn writes(&self) -> Option<(&'static str, &PathBuf)> {
        match self {
            ReloadHook::TraefikDynamic { config, .. } => Some(("dynamic_config", config)),
            ReloadHook::EnvoySds { sds, .. } => Some(("sds_path", sds)),
            _ => None,
        }
    }
}

/// Where an HTTP endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port` over TCP; `host` is sent as the `Host` header too.
    Tcp { host: String, port: u16 },
    /// A Unix socket; the `Host` header is empty.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } => write!(f, "http://{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix/{}", path.display()),
        }
    }
}

impl Endpoint {
    /// The `Host` header: `host:port` for TCP (what caddy checks against
    /// its listen address), empty for a Unix socket.
    pub fn host_header(&self) -> String {
        match self {
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix(_) => String::new(),
        }
    }
}

/// Parses an `admin_url`: `http://HOST:PORT`, `HOST:PORT` (caddy's own
/// form) or `unix/PATH` (caddy's form for a Unix socket, e.g.
/// `unix//run/caddy/admin.sock`). A relative socket path is taken from
/// `base`. `Err` completes "admin_url ...".
pub fn parse_admin_url(text: &str, base: &Path) -> Result<Endpoint, String> {
    const FORMS: &str = "write \"http://127.0.0.1:2019\", \"localhost:2019\" or \
                         \"unix//run/caddy/admin.sock\"";
    if let Some(path) = text.strip_prefix("unix/") {
        if path.is_empty() {
            return Err(format!("{text:?} names no socket: {FORMS}"));
        }
        let path: PathBuf = base.join(path).components().collect();
        return Ok(Endpoint::Unix(path));
    }
    if text.starts_with("https://") {
        return Err(format!(
            "{text:?} uses https: certctl talks plain HTTP to a loopback or Unix-socket admin \
             endpoint; {FORMS}"
        ));
    }
    let rest = text.strip_prefix("http://").unwrap_or(text);
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('@') {
        return Err(format!(
            "{text:?} has a path: give the admin endpoint only; {FORMS}"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6
            .split_once("]:")
            .ok_or_else(|| format!("{text:?} has no port: {FORMS}"))?;
        (format!("[{host}]"), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no port: {FORMS}"))?;
        (host.to_owned(), port)
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{text:?} has no host: {FORMS}"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?} has an invalid port {port:?}: {FORMS}"))?;
    Ok(Endpoint::Tcp { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls() {
        let base = Path::new("/etc/certctl");
        let tcp = |host: &str, port| Endpoint::Tcp {
            host: host.to_owned(),
            port,
        };
        for (text, want) in [
            ("http://127.0.0.1:2019", tcp("127.0.0.1", 2019)),
            ("http://localhost:2019/", tcp("localhost", 2019)),
            ("localhost:2019", tcp("localhost", 2019)),
            ("[::1]:2019", tcp("[::1]", 2019)),
            (
                "unix//run/caddy/admin.sock",
                Endpoint::Unix(PathBuf::from("/run/caddy/admin.sock")),
            ),
            (
                "unix/run/admin.sock",
                Endpoint::Unix(PathBuf::from("/etc/certctl/run/admin.sock")),
            ),
        ] {
            assert_eq!(parse_admin_url(text, base), Ok(want), "{text}");
        }
        for (text, why) in [
            ("https://127.0.0.1:2019", "uses https"),
            ("http://127.0.0.1:2019/config/", "has a path"),
            ("http://127.0.0.1", "has no port"),
            ("127.0.0.1:0", "invalid port"),
            (":2019", "has no host"),
            ("unix/", "names no socket"),
        ] {
            let err = parse_admin_url(text, base).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
