//! Living under systemd: readiness, status, watchdog and socket activation.
//!
//! This module owns every `sd_notify(3)` message the agent sends and the
//! takeover of a socket-activated control socket. The daemon
//! ([`crate::daemon`]) decides *when*; this module decides *what*.
//!
//! Guarantees:
//! - Without `NOTIFY_SOCKET` (started by hand, by a test, by another
//!   supervisor) every notification is a no-op. A failed send is logged once
//!   and never stops the agent.
//! - `READY=1` carries the first `STATUS=` line; `RELOADING=1` carries
//!   `MONOTONIC_USEC=` (what systemd ≥ 253 needs for `Type=notify-reload`;
//!   older versions ignore it); `STATUS=` is sent only when the text changed.
//! - [`take_activated_socket`] accepts exactly one inherited descriptor and
//!   only if it is a Unix stream socket in the listening state; anything else
//!   is an error naming what systemd passed, never a silent fallback to
//!   binding a second socket.
//! - [`StatusBoard`] is pure: engine events in, one status line out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use sd_notify::NotifyState;

use crate::model::event::{Event, Outcome, Stage};
use crate::sync::lock;

// === impl Notifier ===

/// Sends `sd_notify` messages to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    /// Set after the first failed send, so a broken socket is logged once.
    failed: AtomicBool,
    /// The last `STATUS=` text sent.
    status: Mutex<String>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        Self {
            enabled,
            watchdog: if enabled {
                sd_notify::watchdog_enabled()
            } else {
                None
            },
            failed: AtomicBool::new(false),
            status: Mutex::new(String::new()),
        }
    }

    /// A notifier that sends nothing (for tests of code that takes one).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            watchdog: None,
            failed: AtomicBool::new(false),
            status: Mutex::new(String::new()),
        }
    }

    /// True when a service manager listens (`NOTIFY_SOCKET` is set).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, as
    /// `sd_watchdog_enabled(3)` recommends. `None` when no watchdog is set.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|d| (d / 2).max(Duration::from_millis(1)))
    }

    /// Start-up is complete: the control socket is listening.
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        *lock(&self.status) = status;
    }

    /// A configuration reload begins; [`Self::ready`] ends it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Shutdown begins: running deploys are being finished.
    pub fn stopping(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        *lock(&self.status) = status;
    }

    /// Tells what the agent is doing; nothing is sent when the text did not change.
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        {
            let mut last = lock(&self.status);
            if *last == status {
                return;
            }
            last.clone_from(&status);
        }
        self.send(&[NotifyState::Status(&status)]);
    }

    /// Start-up is still busy (recovering interrupted runs): `STATUS=` and
    /// `EXTEND_TIMEOUT_USEC=`, so systemd's start timeout counts from now
    /// for another `extend` instead of killing a recovery that verifies.
    pub fn starting(&self, status: &str, extend: Duration) {
        let status = one_line(status);
        let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::Status(&status),
            NotifyState::ExtendTimeoutUsec(usec),
        ]);
    }

    /// The main loop is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "cannot notify systemd through NOTIFY_SOCKET: {e}; readiness and watchdog \
                 messages are lost (further failures are not logged)"
            );
        }
    }
}

/// `STATUS=` is one line: a newline would end the field.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

// === socket activation ===

/// The control socket systemd opened for us (`certctl-agent.socket`).
#[derive(Debug)]
pub struct ActivatedSocket {
    pub listener: std::os::unix::net::UnixListener,
    /// Where it is bound; `None` for an abstract or unnamed socket.
    pub path: Option<PathBuf>,
}

/// Why the socket passed by systemd cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "socket activation: cannot read LISTEN_FDS/LISTEN_PID: {0}; start the agent through \
         certctl-agent.socket, or without those variables"
    )]
    Env(#[source] std::io::Error),
    #[error(
        "socket activation: systemd passed {0} sockets, the agent takes exactly one: give \
         certctl-agent.socket a single ListenStream= line"
    )]
    Count(usize),
    #[error(
        "socket activation: the descriptor systemd passed is not a Unix stream socket ({0}): \
         certctl-agent.socket must use ListenStream=/path/to/agent.sock"
    )]
    NotUnixStream(#[source] std::io::Error),
    #[error(
        "socket activation: the Unix socket systemd passed is not listening: check \
         certctl-agent.socket (ListenStream=, Accept=no)"
    )]
    NotListening,
    #[error("socket activation: cannot inspect the socket systemd passed: {0}")]
    Inspect(#[source] std::io::Error),
}

/// Takes the listening control socket systemd passed (`LISTEN_FDS=1`,
/// `LISTEN_PID` = this process), or `None` when the agent was not socket
/// activated and binds the socket itself.
///
/// Call it once, before any thread is started: it removes `LISTEN_FDS` and
/// `LISTEN_PID` from the environment so no child process inherits them.
pub fn take_activated_socket() -> Result<Option<ActivatedSocket>, ActivationError> {
    // sd-notify applies the protocol strictly (LISTEN_PID must be ours) and
    // marks the descriptors close-on-exec; listenfd turns the descriptor into
    // a typed listener after checking its family and type, without `unsafe`
    // on our side.
    let count = sd_notify::listen_fds().map_err(ActivationError::Env)?.len();
    match count {
        0 => return Ok(None),
        1 => {}
        n => return Err(ActivationError::Count(n)),
    }
    let listener = listenfd::ListenFd::from_env()
        .take_unix_listener(0)
        .map_err(ActivationError::NotUnixStream)?
        .ok_or(ActivationError::Count(0))?;
    let listening = nix::sys::socket::getsockopt(&listener, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|e| ActivationError::Inspect(e.into()))?;
    if !listening {
        return Err(ActivationError::NotListening);
    }
    let path = listener
        .local_addr()
        .map_err(ActivationError::Inspect)?
        .as_pathname()
        .map(PathBuf::from);
    Ok(Some(ActivatedSocket { listener, path }))
}

// === impl StatusBoard ===

/// What the agent is doing, kept from engine events for `STATUS=`.
#[derive(Debug, Default)]
pub struct StatusBoard {
    /// Per target: the deploy holding it and what it did last.
    running: BTreeMap<String, (String, String)>,
    /// The last finished deploy: target, outcome, when.
    last: Option<(String, Outcome, SystemTime)>,
}

impl StatusBoard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one engine event into account.
    pub fn observe(&mut self, event: &Event) {
        if event.deploy_id.is_empty() {
            // Drift and other events outside a deploy.
            return;
        }
        match event.stage {
            Stage::Done => {
                if self
                    .running
                    .get(&event.target)
                    .is_some_and(|(id, _)| *id == event.deploy_id)
                {
                    self.running.remove(&event.target);
                }
                if let Some(r) = &event.report
                    && r.outcome != Outcome::DryRun
                {
                    self.last = Some((event.target.clone(), r.outcome, event.at));
                }
            }
            Stage::Drift => {}
            stage => {
                let what = match (&event.attempt, stage) {
                    (Some(a), _) if a.rollback => {
                        format!("rolling back, verify attempt {}/{}", a.attempt, a.attempts)
                    }
                    (Some(a), _) => format!("verify attempt {}/{}", a.attempt, a.attempts),
                    (None, Stage::Rollback) => "rolling back".to_owned(),
                    (None, Stage::ValidateCommand) => "validate command ok".to_owned(),
                    (None, Stage::Validated) => "input checked".to_owned(),
                    (None, s) => s.as_str().to_owned(),
                };
                self.running
                    .insert(event.target.clone(), (event.deploy_id.clone(), what));
            }
        }
    }

    /// One line: `deploying web: verify attempt 2/3` while deploys run,
    /// `idle, 12 targets, last deploy web ok 3m ago` otherwise.
    pub fn line(&self, targets: usize, now: SystemTime) -> String {
        if let Some((target, (_, what))) = self.running.iter().next() {
            let more = self.running.len() - 1;
            return if more == 0 {
                format!("deploying {target}: {what}")
            } else {
                format!("deploying {target}: {what} (and {more} more)")
            };
        }
        let targets = match targets {
            1 => "1 target".to_owned(),
            n => format!("{n} targets"),
        };
        match &self.last {
            None => format!("idle, {targets}, no deploy since start"),
            Some((target, outcome, at)) => {
                let result = match outcome {
                    Outcome::Deployed | Outcome::Unchanged | Outcome::Restored => "ok",
                    other => other.as_str(),
                };
                let ago = now.duration_since(*at).unwrap_or_default();
                format!(
                    "idle, {targets}, last deploy {target} {result} {} ago",
                    short_duration(ago)
                )
            }
        }
    }
}

/// `42s`, `3m`, `5h`, `2d`: coarse on purpose, the line is refreshed rarely.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

// === test failpoint ===

/// Name of the environment variable of the watchdog failpoint.
pub const HANG_FAILPOINT_ENV: &str = "CERTCTL_TEST_HANG_WATCHDOG";

/// Test failpoint, compiled only into debug builds and builds with the
/// `failpoints` feature: when `CERTCTL_TEST_HANG_WATCHDOG` names a file and
/// that file exists, it is removed (so a restarted agent does not hang
/// again) and the calling thread, the daemon's main loop, blocks forever.
/// The watchdog pings stop with it, which is what the end-to-end test needs
/// to prove that systemd restarts a hung agent.
#[cfg(any(debug_assertions, feature = "failpoints"))]
pub fn hang_main_loop_if_asked() {
    let Some(path) = std::env::var_os(HANG_FAILPOINT_ENV) else {
        return;
    };
    #[allow(clippy::disallowed_methods)] // a test trigger file, not a target
    if std::fs::remove_file(&path).is_ok() {
        tracing::warn!(
            "failpoint {HANG_FAILPOINT_ENV}: {} existed; the main loop hangs now \
             (no more watchdog pings, no new connections)",
            std::path::Path::new(&path).display()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Release builds without the `failpoints` feature: nothing.
#[cfg(not(any(debug_assertions, feature = "failpoints")))]
#[inline]
pub fn hang_main_loop_if_asked() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::VerifyProtocol;
    use crate::model::check::{Attempt, CheckState, ServedCheck};
    use crate::model::event::{Report, Verification};

    fn event(target: &str, id: &str, stage: Stage) -> Event {
        Event::new(id, target, stage, String::new())
    }

    fn done(target: &str, id: &str, outcome: Outcome, at: SystemTime) -> Event {
        Event {
            at,
            report: Some(Report {
                deploy_id: id.to_owned(),
                outcome,
                error: String::new(),
                cert_sha256: String::new(),
                not_after: 0,
                subject: String::new(),
                verification: Verification::Unverified,
                warnings: Vec::new(),
                duration: Duration::ZERO,
                disk_sha256: String::new(),
                served_sha256: String::new(),
                served: Vec::new(),
            }),
            ..event(target, id, Stage::Done)
        }
    }

    fn attempt(k: u32, n: u32, rollback: bool) -> Attempt {
        Attempt {
            attempt: k,
            attempts: n,
            matches: 0,
            consecutive: 3,
            check: ServedCheck {
                endpoint: "127.0.0.1:443".to_owned(),
                server_name: String::new(),
                protocol: VerifyProtocol::Tls,
                want_sha256: String::new(),
                served_sha256: String::new(),
                served_chain_sha256: Vec::new(),
                served_subject: String::new(),
                served_not_after: 0,
                state: CheckState::Unreachable,
                reason: "refused",
                error: String::new(),
                checked: SystemTime::UNIX_EPOCH,
                tls_version: String::new(),
                ca_validated: false,
            },
            next_in: None,
            rollback,
        }
    }

    #[test]
    fn idle_line_counts_targets_and_ages_the_last_deploy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut b = StatusBoard::new();
        assert_eq!(b.line(1, t0), "idle, 1 target, no deploy since start");
        b.observe(&done("web", "d1", Outcome::Deployed, t0));
        assert_eq!(
            b.line(12, t0 + Duration::from_secs(185)),
            "idle, 12 targets, last deploy web ok 3m ago"
        );
        b.observe(&done("mail", "d2", Outcome::RolledBack, t0));
        assert_eq!(
            b.line(2, t0 + Duration::from_secs(7200)),
            "idle, 2 targets, last deploy mail rolled_back 2h ago"
        );
        // A dry run is not a deploy.
        b.observe(&done("web", "d3", Outcome::DryRun, t0));
        assert!(b.line(2, t0).contains("last deploy mail"));
    }

    #[test]
    fn running_deploys_show_their_latest_step() {
        let mut b = StatusBoard::new();
        let now = SystemTime::now();
        b.observe(&event("web", "d1", Stage::Committed));
        assert_eq!(b.line(3, now), "deploying web: committed");
        b.observe(&Event {
            attempt: Some(attempt(2, 3, false)),
            ..event("web", "d1", Stage::VerifyAttempt)
        });
        assert_eq!(b.line(3, now), "deploying web: verify attempt 2/3");
        b.observe(&event("mail", "d2", Stage::Locked));
        assert_eq!(
            b.line(3, now),
            "deploying mail: locked (and 1 more)",
            "targets in name order"
        );
        b.observe(&done("mail", "d2", Outcome::Deployed, now));
        b.observe(&event("web", "d1", Stage::Rollback));
        assert_eq!(b.line(3, now), "deploying web: rolling back");
        b.observe(&Event {
            attempt: Some(attempt(1, 3, true)),
            ..event("web", "d1", Stage::VerifyAttempt)
        });
        assert_eq!(
            b.line(3, now),
            "deploying web: rolling back, verify attempt 1/3"
        );
        b.observe(&done("web", "d1", Outcome::RolledBack, now));
        assert!(
            b.line(3, now)
                .starts_with("idle, 3 targets, last deploy web rolled_back")
        );
    }

    #[test]
    fn events_outside_deploys_and_stale_done_are_ignored() {
        let mut b = StatusBoard::new();
        let now = SystemTime::now();
        b.observe(&event("web", "", Stage::Drift));
        b.observe(&event("web", "new", Stage::Staged));
        // The Done of an older deploy of the same target does not clear it.
        b.observe(&done("web", "old", Outcome::Busy, now));
        assert_eq!(b.line(1, now), "deploying web: staged");
    }

    #[test]
    fn durations_are_coarse() {
        assert_eq!(short_duration(Duration::from_secs(5)), "5s");
        assert_eq!(short_duration(Duration::from_secs(60)), "1m");
        assert_eq!(short_duration(Duration::from_secs(3 * 3600 + 59)), "3h");
        assert_eq!(short_duration(Duration::from_secs(3 * 86_400)), "3d");
    }

    #[test]
    fn a_disabled_notifier_sends_nothing_and_has_no_watchdog() {
        let n = Notifier::disabled();
        assert!(!n.enabled());
        assert_eq!(n.watchdog_period(), None);
        n.ready("idle");
        n.status("busy");
        n.watchdog();
        assert!(!n.failed.load(Ordering::Relaxed));
        assert_eq!(one_line("a\nb"), "a b");
    }
}
