//! Sessions reused across deploys: one live master per endpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::endpoint::{Endpoint, RemoteError};
use super::session::{Session, sweep_stale};
use crate::sync::lock;

/// A session's slot: connecting holds the slot's lock, so two deploys to
/// one host make one connection, and other hosts do not wait for it.
type Slot = Arc<Mutex<Option<Arc<Session>>>>;

/// Endpoint → live [`Session`]. A session is handed out again while it
/// answers `ssh -O check`; a dead one is replaced by a new connection (a
/// deploy still holding the old one keeps it until it lets go).
pub struct Pool {
    control_dir: PathBuf,
    slots: Mutex<HashMap<Endpoint, Slot>>,
}

impl Pool {
    /// A pool whose control sockets live in `control_dir` (created 0700
    /// on first use; keep it short: see `session::MAX_CONTROL_PATH`).
    /// Masters left there by agent processes that are gone are ended.
    pub fn new(control_dir: PathBuf) -> Pool {
        sweep_stale(&control_dir);
        Pool {
            control_dir,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The live session to `ep`, connecting when there is none.
    pub fn session(&self, ep: &Endpoint) -> Result<Arc<Session>, RemoteError> {
        let slot = Arc::clone(lock(&self.slots).entry(ep.clone()).or_default());
        let mut slot = lock(&slot);
        if let Some(s) = slot.as_ref() {
            if s.is_alive() {
                return Ok(Arc::clone(s));
            }
            tracing::info!(endpoint = %ep.display(), "ssh connection lost, reconnecting");
        }
        *slot = None;
        let s = Arc::new(Session::connect(ep, &self.control_dir)?);
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }

    /// Closes every session no deploy holds any more.
    pub fn close_idle(&self) {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let mut slot = lock(&slot);
            if slot.as_ref().is_some_and(|s| Arc::strong_count(s) == 1) {
                *slot = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pool>();
        check::<Session>();
    }
}
