//! The agent's life: start-up, serving, configuration reloads, shutdown.
//!
//! Start-up creates the state directory, binds the control socket and only
//! then serves. `SIGHUP` re-reads the configuration: a bad new one is logged
//! and the old one stays in force. The drift watch ([`crate::drift`]) runs
//! beside the server. `SIGTERM`/`SIGINT` stop accepting calls, cut pending
//! verification waits short, end watch streams, wait for running deploys to
//! finish (a deploy is never abandoned between stages) and remove the socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use certctl_proto::agent::v1::agent_server::AgentServer;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::api::server::{DRAIN_TIMEOUT, Service, Shared};
use crate::api::socket;
use crate::config::{self, Config};
use crate::deploy::Engine;
use crate::deploy::atomic;
use crate::drop;
use crate::journal::Journal;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(
        "cannot create state directory {path}: {source}: check state_dir in the config and that the agent may write there"
    )]
    StateDir {
        path: PathBuf,
        #[source]
        source: atomic::FsError,
    },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the control socket failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error(transparent)]
    Drop(#[from] drop::StartError),
}

/// Runs the agent with `config` (loaded from `config_path`) until a
/// termination signal.
pub async fn run(config: Config, config_path: &Path) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let state_dir = config.agent.state_dir.clone();
    atomic::create_private_dir(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let journal = Arc::new(Journal::open(&state_dir)?);
    let engine = Engine::new(state_dir.join("locks"), journal);
    // Before any call is accepted: finish what a previous run of the agent
    // left half done.
    let recovered = engine.recover(&config).await?;
    for r in &recovered {
        info!(outcome = r.outcome.as_str(), "recovery: {}", r.error);
    }
    if !recovered.is_empty() {
        info!(runs = recovered.len(), "recovery done");
    }
    // A drop directory the agent cannot use stops it before the socket exists.
    let drops = drop::prepare(&config)?;

    let socket_path = config.agent.socket.clone();
    let groups: Vec<_> = config
        .agent
        .deploy_groups
        .iter()
        .chain(&config.agent.read_groups)
        .collect();
    let listener = socket::bind(&socket_path, &groups)?;

    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    let (down_tx, down_rx) = watch::channel(false);
    let shared = Arc::new(Shared::new(
        config.clone(),
        engine,
        socket_path.clone(),
        drain_tx,
        down_rx.clone(),
    ));
    // Drops already there, or taken before a restart, are picked up now.
    drops.spawn(shared.clone(), down_rx);

    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let reloader = {
        let shared = shared.clone();
        let path = config_path.to_owned();
        async move {
            loop {
                hup.recv().await;
                reload(&shared, &path);
            }
        }
    };
    let stop = {
        let shared = shared.clone();
        async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
            shared.close();
            shared.engine.shut_down();
            let _ = down_tx.send(true);
        }
    };
    tokio::spawn(crate::drift::run(shared.clone(), shared.shutdown_signal()));

    info!(
        socket = %socket_path.display(),
        config = %config_path.display(),
        targets = config.targets.len(),
        version = env!("CARGO_PKG_VERSION"),
        "ready"
    );
    let server = tonic::transport::Server::builder()
        .add_service(AgentServer::new(Service::new(shared.clone())))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop);
    let served = tokio::select! {
        r = server => r,
        () = reloader => Ok(()),
    };
    shared.close();
    socket::remove(&socket_path);
    served.map_err(DaemonError::Serve)?;

    // Every deploy holds a drain sender: recv() returns None when the last
    // one finished.
    if tokio::time::timeout(DRAIN_TIMEOUT, drain_rx.recv())
        .await
        .is_err()
    {
        error!("deploys still running after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    info!("stopped");
    Ok(())
}

fn reload(shared: &Shared, path: &Path) {
    match config::load(path) {
        Ok(new) => {
            if new.agent.socket != shared.socket {
                warn!(
                    old = %shared.socket.display(),
                    new = %new.agent.socket.display(),
                    "agent.socket changed: the new path takes effect at the next restart"
                );
            }
            let old = shared.config();
            for (key, before, after) in [
                ("drop_dir", &old.agent.drop_dir, &new.agent.drop_dir),
                ("state_dir", &old.agent.state_dir, &new.agent.state_dir),
            ] {
                if before != after {
                    warn!(
                        old = %before.display(),
                        new = %after.display(),
                        "agent.{key} changed: the new path takes effect at the next restart"
                    );
                }
            }
            info!(targets = new.targets.len(), "configuration reloaded");
            shared.replace_config(Arc::new(new));
        }
        Err(e) => {
            error!("configuration reload rejected, the previous configuration stays in force: {e}")
        }
    }
}
