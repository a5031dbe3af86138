//! What the transport is given (an [`Endpoint`], plain data) and what it
//! says when it cannot deliver ([`RemoteError`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// An SSH account on a remote host, with the files that authenticate both
/// ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The private key the agent logs in with (the only one offered).
    pub identity_file: PathBuf,
    /// The only known_hosts file consulted: the host's key must be in it.
    pub known_hosts: PathBuf,
    /// Bounds TCP connect, key exchange and authentication together.
    pub connect_timeout: Duration,
}

impl Endpoint {
    /// `user@host:port`, for messages.
    pub fn display(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    /// Refuses host and user names that OpenSSH would read as options or
    /// that cannot be a name at all (empty, leading `-`, whitespace,
    /// control characters, `@`).
    pub fn check(&self) -> Result<(), RemoteError> {
        for (what, v) in [("host", &self.host), ("user", &self.user)] {
            let bad = v.is_empty()
                || v.starts_with('-')
                || v.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '\'');
            if bad {
                return Err(RemoteError::Unreachable(format!(
                    "{what} name {:?} is not usable for ssh: fix the target's ssh settings",
                    crate::model::fmt::clipped(v, 80)
                )));
            }
        }
        if self.port == 0 {
            return Err(RemoteError::Unreachable(
                "port 0 is not usable for ssh: fix the target's ssh settings".to_owned(),
            ));
        }
        Ok(())
    }
}

/// What a remote command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOutput {
    /// The remote exit status; `None` when ssh reported none (the command
    /// was killed by a signal, or ssh itself failed: then `stderr` says
    /// why). ssh's own failures exit 255, so 255 may be either.
    pub code: Option<i32>,
    /// The first and last `OUTPUT_LIMIT / 2` bytes of each stream, lossy
    /// UTF-8, with a marker where bytes were dropped.
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

impl RemoteOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why the transport failed. Messages are one lowercase line that says
/// what to do; text from the server is clipped and escaped.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(
        "host key of {host} port {port} is not in the known_hosts file (the host presented {fingerprint}): \
         check the fingerprint out of band, then add the host's key to the target's known_hosts file"
    )]
    HostKeyUnknown {
        host: String,
        port: u16,
        fingerprint: String,
    },
    #[error(
        "host key of {host} port {port} does not match the known_hosts file (the host presented {fingerprint}): \
         the host was reinstalled or someone is intercepting; check out of band before replacing the pinned key"
    )]
    HostKeyChanged {
        host: String,
        port: u16,
        fingerprint: String,
    },
    #[error(
        "ssh authentication failed for {endpoint}: {detail}; install the agent's public key in the account's authorized_keys"
    )]
    AuthFailed { endpoint: String, detail: String },
    #[error(
        "ssh connection to {endpoint} did not complete within {timeout:?}: check the host is up and reachable"
    )]
    ConnectTimeout { endpoint: String, timeout: Duration },
    #[error("ssh could not reach the host: {0}")]
    Unreachable(String),
    #[error("the OpenSSH client (ssh) is not installed or not on PATH: install openssh-client")]
    NoSshClient,
    #[error(
        "remote command `{command}` did not finish within {timeout:?}: {}",
        if *.remote_stopped { "it was killed on the remote host" } else { "it could not be killed on the remote host and may still run there" }
    )]
    CommandTimeout {
        command: String,
        timeout: Duration,
        /// Whether its process group on the remote host was killed.
        remote_stopped: bool,
    },
    #[error("ssh transport failed: {0}")]
    Protocol(String),
    #[error("ssh transport i/o failed: {0}")]
    Io(#[from] io::Error),
}
