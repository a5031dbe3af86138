//! The agent's life: start-up, serving, configuration reloads, shutdown, and
//! what systemd is told about each.
//!
//! Start-up creates the state directory, takes the control socket (the one
//! systemd passed by socket activation, else a socket bound here), binds the
//! optional metrics endpoint, and only then reports `READY=1` and serves:
//! every start-up step goes before [`run`]'s "start-up done" line, so a
//! client that systemd queued on the activated socket is answered by an
//! agent that is fully up.
//!
//! The main loop (the future `run` returns, driven by the thread that called
//! `block_on`) accepts connections, applies `SIGHUP` reloads between
//! `RELOADING=1` and `READY=1`, keeps `STATUS=` current from engine events,
//! and sends `WATCHDOG=1` at half the watchdog interval after a round trip
//! through the task scheduler: if the main loop or the scheduler hangs, the
//! pings stop and systemd restarts the agent.
//!
//! `SIGTERM`/`SIGINT` send `STOPPING=1`, stop accepting calls, cut pending
//! verification waits short, end watch streams, wait for running deploys to
//! finish (a deploy is never abandoned between stages), cut the client
//! connections still open 2 s after that (a watcher that stopped reading
//! would hold graceful shutdown forever), and remove the socket if the
//! agent bound it (an activated socket belongs to systemd).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certctl_proto::agent::v1::agent_server::AgentServer;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::gate::Gate;
use crate::api::metrics_endpoint::{self, Exposition};
use crate::api::server::{DRAIN_TIMEOUT, Service};
use crate::api::socket;
use crate::api::{accept, limits};
use crate::app::App;
use crate::atomic;
use crate::config::{self, Config};
use crate::deploy::Engine;
use crate::drop;
use crate::journal::Journal;
use crate::systemd::{ActivatedSocket, Notifier, StatusBoard};

/// How far each `EXTEND_TIMEOUT_USEC=` during start-up recovery pushes
/// systemd's start timeout (re-sent every third of it).
const RECOVERY_EXTEND: Duration = Duration::from_secs(60);

/// How often `STATUS=` is refreshed while idle (its "3m ago" ages).
const STATUS_REFRESH: Duration = Duration::from_secs(30);

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
    #[error(
        "cannot listen on agent.metrics_listen {addr}: {source}; choose a free port in {config} \
         or stop what listens there"
    )]
    Metrics {
        addr: SocketAddr,
        config: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the control socket systemd passed: {0}")]
    Activated(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the control socket failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error(transparent)]
    Drop(#[from] drop::StartError),
}

/// Runs the agent with `config` (loaded from `config_path`) until a
/// termination signal. `activated` is the control socket systemd passed,
/// if any ([`crate::systemd::take_activated_socket`]).
pub async fn run(
    config: Config,
    config_path: &Path,
    activated: Option<ActivatedSocket>,
) -> Result<(), DaemonError> {
    let notifier = Arc::new(Notifier::from_env());
    // Handlers first: once the socket accepts, a SIGHUP or SIGTERM must be
    // handled, not kill the process with its default action. Signals that
    // arrive during start-up are queued and acted on when serving starts.
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let config = Arc::new(config);
    for w in config.warnings() {
        warn!("{w}");
    }
    let state_dir = config.agent.state_dir.clone();
    atomic::create_private_dir(&state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    // Remote targets' SSH control sockets: private to the agent.
    let ssh_dir = state_dir.join("ssh");
    atomic::create_private_dir(&ssh_dir).map_err(|source| DaemonError::StateDir {
        path: ssh_dir.clone(),
        source,
    })?;
    atomic::remote::set_control_dir(ssh_dir);
    let journal = Arc::new(Journal::open(&state_dir)?);
    let engine = Engine::new(state_dir.join("locks"), journal);
    // Before any call is accepted: finish what a previous run of the agent
    // left half done. A recovery that verifies can take a while: systemd's
    // start timeout is extended while it runs.
    let recovered = {
        let recovery = engine.recover(&config);
        let mut recovery = pin!(recovery);
        // Nothing is sent for a quick (or empty) recovery.
        let every = RECOVERY_EXTEND / 3;
        let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                r = &mut recovery => break r?,
                _ = extend.tick() => notifier.starting(
                    "recovering deploys interrupted by the last stop",
                    RECOVERY_EXTEND,
                ),
            }
        }
    };
    for r in &recovered {
        info!(outcome = r.outcome.as_str(), "recovery: {}", r.error);
    }
    if !recovered.is_empty() {
        info!(runs = recovered.len(), "recovery done");
    }
    // What status shows of each target's last run: one journal query now,
    // none per status call.
    tokio::task::block_in_place(|| engine.seed(&config.targets))?;
    // A drop directory the agent cannot use stops it before the socket exists.
    let drops = drop::prepare(&config)?;

    // The metrics port first: if it is taken, nothing else is left behind.
    let metrics_listener = match config.agent.metrics_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics {
                    addr,
                    config: config.path.clone(),
                    source,
                })?,
        ),
    };
    let (listener, socket_path, bound_here) = control_socket(&config, activated)?;

    let (down_tx, down_rx) = watch::channel(false);
    let shared = Arc::new(App::new(
        config.clone(),
        engine,
        socket_path.clone(),
        down_rx.clone(),
    ));
    // Drops already there, or taken before a restart, are picked up now.
    drops.spawn(shared.clone(), down_rx);

    let stop = {
        let shared = shared.clone();
        let notifier = notifier.clone();
        async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
            notifier.stopping("stopping: finishing running deploys");
            shared.close();
            shared.engine.shut_down();
            let _ = down_tx.send(true);
        }
    };
    tokio::spawn(crate::drift::run(shared.clone(), shared.shutdown_signal()));

    if let Some(l) = metrics_listener {
        info!(listen = %config.agent.metrics_listen.map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint: GET /metrics");
        tokio::spawn(metrics_endpoint::serve(
            l,
            Arc::new(Scrape(shared.clone())),
            shared.shutdown_signal(),
        ));
    }
    let mut events = shared.engine.subscribe();
    let mut events_open = true;
    let mut board = StatusBoard::new();

    // === start-up done ===
    // Every step that must finish before clients are served goes above this
    // line: the control socket is listening, and READY=1 says so.
    info!(
        socket = %socket_path.display(),
        config = %config_path.display(),
        targets = config.targets.len(),
        version = env!("CARGO_PKG_VERSION"),
        "ready"
    );
    notifier.ready(&status_line(&shared, &board));
    // Leftovers of earlier runs (temp files a failing disk kept, half-filled
    // sets, backups beyond retention) are swept while the agent serves: at
    // thousands of targets that is most of a start. Each group of targets
    // sharing a directory is locked while it is swept, so no deploy runs
    // there meanwhile.
    {
        let (shared, config) = (shared.clone(), config.clone());
        // Held like a deploy's: a stop waits for the group being swept.
        let token = shared.deploy_guard();
        tokio::spawn(async move {
            let _token = token;
            let started = std::time::Instant::now();
            let swept = shared.engine.sweep_leftovers(&config).await;
            info!(
                targets = swept,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "start-up sweep done"
            );
        });
    }

    // Connections still open once deploys are drained (a watcher that
    // stopped reading holds graceful shutdown forever) are cut after
    // CLOSE_GRACE.
    let kill = CancellationToken::new();
    tokio::spawn(close_after_drain(shared.clone(), kill.clone()));
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(limits::MAX_STREAMS)
        .initial_stream_window_size(limits::STREAM_WINDOW)
        .initial_connection_window_size(limits::CONNECTION_WINDOW)
        .http2_max_header_list_size(limits::MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(limits::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(limits::KEEPALIVE_TIMEOUT))
        .layer(Gate::new(shared.clone()))
        .add_service(
            AgentServer::new(Service::new(shared.clone()))
                .max_decoding_message_size(limits::MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(
            accept::incoming(listener, shared.clone(), kill.clone()),
            stop,
        );
    let mut server = pin!(server);
    let mut watchdog = notifier.watchdog_period().map(tokio::time::interval);
    let mut refresh = notifier
        .enabled()
        .then(|| tokio::time::interval(STATUS_REFRESH));
    let served = loop {
        tokio::select! {
            r = &mut server => break r,
            _ = hup.recv() => {
                notifier.reloading();
                reload(&shared, config_path);
                notifier.ready(&status_line(&shared, &board));
            }
            () = tick(&mut watchdog) => watchdog_ping(&notifier).await,
            () = shared.drops.watching_changed.notified() => {
                notifier.status(&status_line(&shared, &board));
            }
            () = tick(&mut refresh) => {
                notifier.status(&status_line(&shared, &board));
            }
            ev = events.recv(), if events_open => {
                match ev {
                    Ok(ev) => board.observe(&ev),
                    // Missed events: the next ones correct the line.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => events_open = false,
                }
                notifier.status(&status_line(&shared, &board));
            }
        }
    };
    shared.close();
    if bound_here {
        socket::remove(&socket_path);
    }
    served.map_err(DaemonError::Serve)?;

    // Every admitted deploy holds a task token: drained() resolves when the
    // last one finished. The watchdog keeps being fed meanwhile.
    let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
    let mut deadline = pin!(deadline);
    loop {
        tokio::select! {
            () = shared.drained() => break,
            () = &mut deadline => {
                error!("deploys still running after {DRAIN_TIMEOUT:?}; exiting anyway");
                break;
            }
            () = tick(&mut watchdog) => watchdog_ping(&notifier).await,
        }
    }
    info!("stopped");
    Ok(())
}

/// After `SIGTERM`: once every admitted deploy finished (or
/// `DRAIN_TIMEOUT` passed), gives clients [`limits::CLOSE_GRACE`] to read
/// what is left, then cuts every connection still open.
async fn close_after_drain(shared: Arc<App>, kill: CancellationToken) {
    let mut down = shared.shutdown_signal();
    if down.wait_for(|d| *d).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, shared.drained()).await;
    tokio::time::sleep(limits::CLOSE_GRACE).await;
    info!("closing the connections still open");
    kill.cancel();
}

/// The control socket: systemd's when activated, else bound at
/// `agent.socket`. Returns the listener, its path and whether the agent
/// bound it (and so removes it at exit).
fn control_socket(
    config: &Config,
    activated: Option<ActivatedSocket>,
) -> Result<(tokio::net::UnixListener, PathBuf, bool), DaemonError> {
    let configured = &config.agent.socket;
    let Some(a) = activated else {
        let groups: Vec<_> = config
            .agent
            .deploy_groups
            .iter()
            .chain(&config.agent.read_groups)
            .collect();
        return Ok((socket::bind(configured, &groups)?, configured.clone(), true));
    };
    let path = a.path.clone().unwrap_or_else(|| configured.clone());
    if a.path.as_deref() != Some(configured.as_path()) {
        warn!(
            activated = %a.path.as_deref().map_or_else(|| "(unnamed)".to_owned(), |p| p.display().to_string()),
            configured = %configured.display(),
            "socket activation: systemd's socket is used; agent.socket in {} names another path, \
             so certctl needs --socket (or CERTCTL_SOCKET) unless the two agree",
            config.path.display()
        );
    } else {
        info!(socket = %path.display(), "socket activation: using the socket systemd passed");
    }
    a.listener
        .set_nonblocking(true)
        .map_err(DaemonError::Activated)?;
    let listener =
        tokio::net::UnixListener::from_std(a.listener).map_err(DaemonError::Activated)?;
    Ok((listener, path, false))
}

/// What the metrics endpoint serves: the engine's metrics with what is
/// read at scrape time, as `certctl status --prometheus` gets them.
struct Scrape(Arc<App>);

impl Exposition for Scrape {
    async fn render(&self) -> String {
        self.0.exposition().await
    }
}

/// Completes at the next tick of `interval`, never when there is none.
/// The `STATUS=` line: what deploys do, led by a warning while the drop
/// directory is not watched.
fn status_line(shared: &App, board: &StatusBoard) -> String {
    let line = board.line(shared.config().targets.len(), SystemTime::now());
    match shared.drops.dirs() {
        Some((dir, _)) if !shared.drops.watching() => format!(
            "NOT WATCHING the drop directory {}; {line}",
            crate::model::fmt::shown(dir)
        ),
        _ => line,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One watchdog ping, sent only after a spawned task ran: a scheduler that
/// no longer runs tasks stops the pings as surely as a hung main loop.
async fn watchdog_ping(notifier: &Notifier) {
    crate::systemd::hang_main_loop_if_asked();
    let period = notifier.watchdog_period().unwrap_or(Duration::from_secs(1));
    match tokio::time::timeout(period, tokio::spawn(async {})).await {
        Ok(Ok(())) => notifier.watchdog(),
        _ => warn!("watchdog: a spawned task did not run within {period:?}; not pinging systemd"),
    }
}

fn reload(shared: &App, path: &Path) {
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
            if new.agent.metrics_listen != shared.config().agent.metrics_listen {
                warn!(
                    "agent.metrics_listen changed: the new address takes effect at the next restart"
                );
            }
            for w in new.warnings() {
                warn!("{w}");
            }
            info!(targets = new.targets.len(), "configuration reloaded");
            shared.engine.metrics().config_reload(None);
            shared.replace_config(Arc::new(new));
        }
        Err(e) => {
            shared.engine.metrics().config_reload(Some(&e.to_string()));
            error!("configuration reload rejected, the previous configuration stays in force: {e}")
        }
    }
}
