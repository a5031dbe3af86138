//! Connecting to the agent's Unix socket, with errors that say what to do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use certctl_proto::agent::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::exit;

/// Everything that makes a command fail before or outside a deploy result.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the agent at {path}: {reason}")]
    Unreachable { path: PathBuf, reason: String },
    #[error("{0}")]
    Status(String, tonic::Code),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Internal(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::Status(_, code) => exit::for_status(*code),
            CliError::Usage(_) => exit::USAGE,
            CliError::Internal(_) => exit::INTERNAL,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let msg = if s.message().is_empty() {
            format!("the agent answered {:?}", s.code())
        } else {
            s.message().to_owned()
        };
        CliError::Status(msg, s.code())
    }
}

/// Connects to the agent at `path`.
pub async fn connect(path: &Path) -> Result<AgentClient<Channel>, CliError> {
    // Connect once ourselves so a failure can be explained precisely; the
    // channel then takes this stream.
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| unreachable(path, &e))?;
    let slot = Arc::new(Mutex::new(Some(stream)));
    let path_owned = path.to_owned();
    let channel = Endpoint::try_from("http://certctl-agent")
        .map_err(|e| CliError::Internal(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let slot = slot.clone();
            let path = path_owned.clone();
            async move {
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                let stream = match taken {
                    Some(s) => s,
                    None => UnixStream::connect(path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| CliError::Unreachable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

fn unreachable(path: &Path, e: &std::io::Error) -> CliError {
    use std::os::unix::fs::FileTypeExt as _;
    // Connecting to a path that is not a socket fails as "refused": say
    // what the path is instead.
    if e.kind() != std::io::ErrorKind::NotFound
        && let Ok(meta) = std::fs::metadata(path)
        && !meta.file_type().is_socket()
    {
        let what = if meta.is_dir() {
            "a directory"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "a device or FIFO"
        };
        return CliError::Unreachable {
            path: path.to_owned(),
            reason: format!(
                "not a socket ({what}): pass the agent's control socket with --socket or \
                 CERTCTL_SOCKET (default /run/certctl/agent.sock, agent.socket in its configuration)"
            ),
        };
    }
    let reason = match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no socket there ({e}): is certctl-agent running? (systemctl status certctl-agent), or pass --socket / set CERTCTL_SOCKET"
        ),
        std::io::ErrorKind::ConnectionRefused => format!(
            "nothing is listening ({e}): the agent is not running; start it (systemctl start certctl-agent)"
        ),
        std::io::ErrorKind::PermissionDenied => {
            let group = std::fs::metadata(path)
                .ok()
                .and_then(|m| {
                    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                        .ok()
                        .flatten()
                })
                .map(|g| g.name);
            match group {
                Some(g) => format!(
                    "permission denied: join group {g} (e.g. `sudo usermod -aG {g} $USER`, then log in again)"
                ),
                None => format!(
                    "permission denied ({e}): ask an administrator for access to the socket"
                ),
            }
        }
        _ => e.to_string(),
    };
    CliError::Unreachable {
        path: path.to_owned(),
        reason,
    }
}
