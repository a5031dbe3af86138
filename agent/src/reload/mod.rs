//! Reloads that are not commands: making a server load the files just
//! committed by talking to its own control socket or API (haproxy's master
//! CLI and runtime API, caddy's admin API), or by writing the file a
//! watching server reacts to (traefik's dynamic configuration, envoy's SDS
//! file).
//!
//! A [`ReloadHook`] takes the place of a target's `reload` command at stage
//! 8 of a deploy, in a rollback and in recovery, with the same meaning: "make
//! the server serve what is on disk now". Hooks that push a certificate read
//! it from the target's files at that moment, so a rollback (previous files
//! restored, then the hook) pushes the previous certificate: the files stay
//! the single source of truth, and a restart of the server loads the same
//! certificate the hook pushed.
//!
//! Guarantees: a hook is bounded by the target's `command_timeout`; key
//! bytes are read into zeroizing buffers and never appear in a message;
//! errors say which server refused what and what to check. Talking to the
//! sockets lives here; starting processes stays in [`crate::command`], and
//! the watched files are written through [`crate::atomic`].

pub mod caddy;
pub mod haproxy;
pub mod http;
pub mod watched;

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

pub use crate::config::hook::{Endpoint, ReloadHook};

/// Why a hook did not make the server load the files.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "{what} did not finish within {timeout:?} (command_timeout); the server may not have loaded the new files"
    )]
    Timeout { what: String, timeout: Duration },
    #[error("cannot read {path} to send it to {what}: {source}")]
    Read {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Haproxy(#[from] haproxy::HaproxyError),
    #[error(transparent)]
    Caddy(#[from] caddy::CaddyError),
    #[error(transparent)]
    Watched(#[from] watched::WatchedError),
}

impl ReloadHook {
    /// Makes the server load what is on disk now, within `timeout`.
    /// Returns a line for the stage message.
    /// `generation`: the generation `..data` points at, for hooks that
    /// name it (traefik); `None` with the in-place layout.
    pub async fn run(
        &self,
        timeout: Duration,
        generation: Option<&str>,
    ) -> Result<String, ReloadError> {
        let what = self.describe();
        crate::failpoint::hit("during-reload");
        tokio::time::timeout(timeout, self.run_unbounded(generation.map(str::to_owned)))
            .await
            .unwrap_or(Err(ReloadError::Timeout { what, timeout }))
    }

    async fn run_unbounded(&self, generation: Option<String>) -> Result<String, ReloadError> {
        match self {
            ReloadHook::HaproxyMaster { socket } => Ok(haproxy::master_reload(socket).await?),
            ReloadHook::HaproxyRuntime { socket, pem } => {
                let bytes = self.read(pem).await?;
                let name = pem.display().to_string();
                Ok(haproxy::runtime_update(socket, &name, &bytes).await?)
            }
            ReloadHook::CaddyAdmin {
                endpoint,
                id,
                cert,
                key,
            } => {
                // Nothing on disk (a first deploy rolled back): nothing of
                // ours may stay loaded either.
                if !tokio::fs::try_exists(cert).await.unwrap_or(true) {
                    return Ok(caddy::unload(endpoint, id).await?);
                }
                let cert_pem = self.read(cert).await?;
                let key_pem = self.read(key).await?;
                let cert_text = self.text(&cert_pem, cert)?;
                let key_text = self.text(&key_pem, key)?;
                Ok(caddy::load_pem(endpoint, id, cert_text, key_text).await?)
            }
            ReloadHook::TraefikDynamic {
                config,
                target,
                cert,
                key,
            } => {
                let (config, target, cert, key) =
                    (config.clone(), target.clone(), cert.clone(), key.clone());
                Ok(blocking(move || {
                    watched::write_traefik(&config, &target, &cert, &key, generation.as_deref())
                })
                .await?)
            }
            ReloadHook::EnvoySds {
                sds,
                secret,
                cert,
                key,
            } => {
                let (sds, secret, cert, key) =
                    (sds.clone(), secret.clone(), cert.clone(), key.clone());
                Ok(blocking(move || watched::write_envoy(&sds, &secret, &cert, &key)).await?)
            }
        }
    }

    /// PEM is ASCII: anything else is not a file certctl wrote.
    fn text<'a>(&self, bytes: &'a [u8], path: &Path) -> Result<&'a str, ReloadError> {
        std::str::from_utf8(bytes).map_err(|_| ReloadError::Read {
            what: self.describe(),
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM text"),
        })
    }

    async fn read(&self, path: &Path) -> Result<Zeroizing<Vec<u8>>, ReloadError> {
        tokio::fs::read(path)
            .await
            .map(Zeroizing::new)
            .map_err(|source| ReloadError::Read {
                what: self.describe(),
                path: path.to_owned(),
                source,
            })
    }
}

/// Runs a hook's file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, watched::WatchedError> + Send + 'static,
) -> Result<T, watched::WatchedError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(watched::WatchedError::Read {
            path: PathBuf::new(),
            file: PathBuf::new(),
            why: format!("the file task failed: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hook_is_bounded_by_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("master.sock");
        // Accepts and never answers.
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let hook = ReloadHook::HaproxyMaster { socket };
        let err = hook.run(Duration::from_millis(50), None).await.unwrap_err();
        assert!(matches!(err, ReloadError::Timeout { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("haproxy master CLI `reload` on "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_named() {
        let hook = ReloadHook::HaproxyRuntime {
            socket: PathBuf::from("/nonexistent/admin.sock"),
            pem: PathBuf::from("/nonexistent/live.pem"),
        };
        let err = hook
            .run(Duration::from_secs(5), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read /nonexistent/live.pem to send it to haproxy runtime API"),
            "{err}"
        );
    }
}
