//! A stand-in for systemd's notification socket.
//!
//! [`NotifySocket::bind`] binds a Unix datagram socket in the test's temp
//! dir; pass [`NotifySocket::path`] to the agent as `NOTIFY_SOCKET` and it
//! sends what it would send systemd (`READY=1`, `STATUS=…`, `WATCHDOG=1`,
//! `RELOADING=1`, `STOPPING=1`). Every datagram is kept, in arrival order,
//! as one message (its lines are the assignments). Waits are bounded and
//! panic with everything received so far.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The receiving end of `NOTIFY_SOCKET`.
pub struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    /// Binds `<dir>/notify.sock`.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set read timeout");
        NotifySocket {
            path,
            socket,
            received: Vec::new(),
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every message received so far (after reading what is pending).
    pub fn messages(&mut self) -> &[String] {
        self.drain();
        &self.received
    }

    /// Reads what is pending without waiting longer than the read timeout.
    pub fn drain(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.received
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// How many messages hold the line `line` (e.g. `WATCHDOG=1`).
    pub fn count(&mut self, line: &str) -> usize {
        self.drain();
        self.received
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }

    /// Index of the first message at or after `from` that has a line for
    /// which `pred` holds; waits up to `timeout` for it, else panics naming
    /// `what` and listing everything received.
    pub fn wait_for(
        &mut self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(i) = self
                .received
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, m)| m.lines().any(&pred))
                .map(|(i, _)| i)
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on NOTIFY_SOCKET within {timeout:?}; received:\n{:#?}",
                self.received
            );
        }
    }

    /// The `STATUS=` values received, in order.
    pub fn statuses(&mut self) -> Vec<String> {
        self.drain();
        self.received
            .iter()
            .flat_map(|m| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_owned)
            .collect()
    }
}
