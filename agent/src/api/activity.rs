//! Whether a connection is in use: the calls (HTTP/2 streams) open on it,
//! and since when it has had none. `api::gate` opens a [`StreamGuard`] per
//! call, held until its response body ends; `api::accept` closes a
//! connection that stayed without any call for its idle timeout.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// The calls of one connection.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<(usize, Instant)>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
        }
    }
}

impl Activity {
    /// A call starts; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> StreamGuard {
        lock(&self.state).0 += 1;
        StreamGuard(self.clone())
    }

    /// How long the connection has had no call; `None` while one is open.
    pub fn idle_for(&self) -> Option<Duration> {
        let s = lock(&self.state);
        (s.0 == 0).then(|| s.1.elapsed())
    }
}

/// One open call.
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.0 -= 1;
        if s.0 == 0 {
            s.1 = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_only_without_calls() {
        let a = Arc::new(Activity::default());
        assert!(a.idle_for().is_some());
        let one = a.begin();
        let two = a.begin();
        assert!(a.idle_for().is_none());
        drop(one);
        assert!(a.idle_for().is_none());
        drop(two);
        assert!(a.idle_for().unwrap() < Duration::from_secs(5));
    }
}
