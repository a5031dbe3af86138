//! Accepting control-socket connections: who is calling is decided here,
//! before a byte of a request is read, and every connection is counted.
//!
//! For each accepted `UnixStream`:
//! 1. `SO_PEERCRED` gives the caller's uid (a cheap `getsockopt`); the
//!    connection takes a slot of its budget or is closed at once (accepted
//!    and dropped, never left in the backlog): [`MAX_CONNECTIONS`] in all
//!    for unprivileged callers and [`MAX_PER_UID`] per uid; root and the
//!    agent's own user have their own [`MAX_PRIVILEGED`], so no other user
//!    can starve them.
//! 2. The caller's groups are read from the kernel (`api::peer`, off the
//!    async threads, bounded by [`RESOLVE_TIMEOUT`]).
//! 3. A caller that may neither read nor deploy is answered by
//!    `api::deny` (one `PERMISSION_DENIED`, tiny windows, closed); every
//!    other connection goes to the tonic server as a [`PeerStream`], whose
//!    connect info ([`ConnInfo`]) carries the caller to the handlers.
//!
//! A connection with no call open for [`IDLE_TIMEOUT`] is closed.
//! An accept error (`EMFILE`, `ENFILE`, ...) waits [`ACCEPT_BACKOFF`]
//! instead of spinning. [`PeerStream`]s fail every read and write once
//! the `kill` token is cancelled: that is how shutdown ends connections
//! that graceful shutdown would wait for forever (a peer that stopped
//! reading).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::activity::Activity;
use super::auth::{Caller, ConnInfo, Policy};
use super::{deny, peer};
use crate::app::App;
use crate::sync::lock;

/// Connections of unprivileged callers, all uids together.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections of one unprivileged uid.
pub const MAX_PER_UID: usize = 32;
/// Connections of root and the agent's own user, counted apart.
pub const MAX_PRIVILEGED: usize = 64;
/// The wait after a failed `accept` (e.g. out of file descriptors).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a failing `accept` is warned about.
pub const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// How long a connection may stay open without a call on it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long reading a caller's credentials may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections the tonic server serves, each with its caller.
/// Accepting stops when the returned stream is dropped.
pub fn incoming(
    listener: UnixListener,
    app: Arc<App>,
    kill: CancellationToken,
) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, app, kill, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: UnixListener,
    app: Arc<App>,
    kill: CancellationToken,
    tx: mpsc::Sender<io::Result<PeerStream>>,
) {
    let slots = Arc::new(Slots::default());
    // Failed accepts are warned about once per ACCEPT_WARN_EVERY; the
    // others go to the debug log.
    let mut warned: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if warned.is_none_or(|w| w.elapsed() >= ACCEPT_WARN_EVERY) {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        "control socket: accept failed: {e}; retrying every {ACCEPT_BACKOFF:?}"
                    );
                } else {
                    tracing::debug!("control socket: accept failed: {e}");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(cred) = peer::cred(&stream) else {
            continue;
        };
        let policy = Policy::of(&app.config(), app.socket.clone());
        let Some(slot) = slots.take(cred.uid, policy.privileged(cred.uid)) else {
            tracing::debug!(
                uid = cred.uid,
                "control socket: connection limit reached; closed"
            );
            continue;
        };
        let tx = tx.clone();
        let kill = kill.clone();
        tokio::spawn(async move {
            let Some((stream, caller)) = resolve(stream, cred).await else {
                return;
            };
            if !policy.may_connect(&caller) {
                tracing::debug!(caller = %caller.describe(), "control socket: refused connection");
                deny::serve(stream, policy, caller).await;
                drop(slot);
                return;
            }
            let activity = Arc::new(Activity::default());
            let stream = PeerStream {
                inner: stream,
                info: ConnInfo {
                    caller,
                    activity: activity.clone(),
                },
                activity,
                idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                kill: Box::pin(kill.cancelled_owned()),
                killed: false,
                _slot: slot,
            };
            let _ = tx.send(Ok(stream)).await;
        });
    }
}

/// The caller of `stream`, read off the async threads.
async fn resolve(stream: UnixStream, cred: peer::Cred) -> Option<(UnixStream, Arc<Caller>)> {
    let std_stream = stream.into_std().ok()?;
    let work = tokio::task::spawn_blocking(move || {
        let caller = peer::caller(&std_stream, cred);
        (std_stream, caller)
    });
    let (std_stream, caller) = tokio::time::timeout(RESOLVE_TIMEOUT, work)
        .await
        .ok()?
        .ok()?;
    let stream = UnixStream::from_std(std_stream).ok()?;
    Some((stream, Arc::new(caller)))
}

/// Connection counts by budget.
#[derive(Default)]
struct Slots {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    unprivileged: usize,
    privileged: usize,
    per_uid: HashMap<u32, usize>,
}

impl Slots {
    fn take(self: &Arc<Self>, uid: u32, privileged: bool) -> Option<Slot> {
        let mut c = lock(&self.counts);
        if privileged {
            if c.privileged >= MAX_PRIVILEGED {
                return None;
            }
            c.privileged += 1;
        } else {
            let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
            if c.unprivileged >= MAX_CONNECTIONS || mine >= MAX_PER_UID {
                return None;
            }
            c.unprivileged += 1;
            c.per_uid.insert(uid, mine + 1);
        }
        Some(Slot {
            slots: self.clone(),
            uid,
            privileged,
        })
    }
}

/// One counted connection; given back on drop.
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
    privileged: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.slots.counts);
        if self.privileged {
            c.privileged -= 1;
        } else {
            c.unprivileged -= 1;
            if let Some(n) = c.per_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    c.per_uid.remove(&self.uid);
                }
            }
        }
    }
}

/// An authorized connection: the socket, its caller, its slot, and the
/// switch that ends it at shutdown.
pub struct PeerStream {
    inner: UnixStream,
    info: ConnInfo,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    killed: bool,
    activity: Arc<Activity>,
    /// Fires to check whether the connection has had no call for
    /// [`IDLE_TIMEOUT`].
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl PeerStream {
    /// True once the kill switch is on or the connection went idle;
    /// registers the waker otherwise.
    fn killed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.killed && self.kill.as_mut().poll(cx).is_ready() {
            self.killed = true;
        }
        while !self.killed && self.idle.as_mut().poll(cx).is_ready() {
            match self.activity.idle_for() {
                Some(d) if d >= IDLE_TIMEOUT => {
                    tracing::debug!(
                        caller = %self.info.caller.describe(),
                        "control socket: closing a connection idle for {IDLE_TIMEOUT:?}"
                    );
                    self.killed = true;
                }
                idle => {
                    let wait = IDLE_TIMEOUT - idle.unwrap_or_default();
                    self.idle.as_mut().reset(tokio::time::Instant::now() + wait);
                }
            }
        }
        self.killed
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed by the agent (shutting down, or idle)",
    )
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_per_uid_and_privileged_apart() {
        let slots = Arc::new(Slots::default());
        let mine: Vec<_> = (0..MAX_PER_UID)
            .map(|_| slots.take(1000, false).unwrap())
            .collect();
        assert!(slots.take(1000, false).is_none());
        // Another uid and root still get in.
        let other = slots.take(1001, false).unwrap();
        let root = slots.take(0, true).unwrap();
        drop(mine);
        assert!(slots.take(1000, false).is_some());
        drop((other, root));
        let c = lock(&slots.counts);
        assert_eq!((c.unprivileged, c.privileged), (0, 0));
        assert!(c.per_uid.is_empty());
    }

    #[test]
    fn the_total_budget_holds_across_uids() {
        let slots = Arc::new(Slots::default());
        let all: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|i| slots.take(2000 + u32::try_from(i).unwrap(), false).unwrap())
            .collect();
        assert!(slots.take(1, false).is_none());
        assert!(slots.take(0, true).is_some());
        drop(all);
    }
}
