//! One way to take a `std::sync::Mutex`: a panic while it was held does not
//! poison the agent. Every mutex in the agent guards plain data updated in
//! one step (maps of last results, counters), so the data is consistent even
//! after a panic elsewhere, and refusing it would turn one bug into an
//! outage.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
