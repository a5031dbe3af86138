//! When a drop is complete enough to take: a pure state machine over the
//! changes the watcher reports, with the clock passed in.
//!
//! Per top-level entry of the drop directory it keeps at most one
//! *version*: a drop that arrived and was not taken yet.
//!
//! - A rename into the drop directory ([`Change::RenamedIn`]) is a complete
//!   new version, due at once. If a version was already waiting, that one
//!   was replaced before the agent took it: it is reported as superseded.
//! - Anything written in place ([`Change::Written`]: created, written,
//!   closed after writing, chmod/chown, or any change inside a directory
//!   drop) starts a version or extends it: it is due once nothing changed
//!   for `settle`.
//! - An entry found by a scan ([`Change::Present`]: at start-up, after an
//!   event overflow) is due `settle` after its last change on disk.
//! - A directory that was due but held an incomplete set is marked
//!   [`Tracker::waiting`]: it is due again once it changed and settled, or
//!   after `incomplete_limit` without a change (then it is rejected).
//! - An entry that left ([`Change::Gone`]) before it was taken was withdrawn.
//!
//! Taking a drop renames it aside, which the watcher reports as the entry
//! going away: that *echo* is expected and swallowed. A rename-in reported
//! before the echo happened before the take, so the take already got it (or
//! something newer): it is reported as superseded, never as a new version.
//! This keeps one outcome per arrival even when events queue up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A change to one top-level entry, as the watcher saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The entry itself was renamed into the drop directory.
    RenamedIn,
    /// The entry, or something inside it, was written in place.
    Written,
    /// The entry was found on disk by a scan; it last changed `age` ago.
    Present { age: Duration },
    /// The entry left the drop directory (renamed away or removed).
    Gone,
}

/// Something the caller must record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A version of this entry was replaced before it was taken.
    Superseded(String),
    /// A version of this entry left before it was taken.
    Withdrawn(String),
}

/// An entry that is due to be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub entry: String,
    /// When the version last changed: the newest of a drop name wins.
    pub changed: Instant,
    /// The version stayed incomplete for the whole limit: reject it.
    pub incomplete_expired: bool,
}

/// How long to wait before the `attempt`-th retry (0-based) of something
/// that failed for a transient reason (descriptors or space ran out, an
/// I/O error): 250ms, doubling, at most 30s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(30))
}

#[derive(Debug, Clone)]
struct Version {
    changed: Instant,
    quiet_until: Instant,
    /// Found incomplete at this instant; due again after a change.
    waiting: Option<Instant>,
    /// Taking it failed; due again after a change.
    stuck: bool,
    /// Transient failures to take it so far.
    retries: u32,
}

impl Version {
    fn new(changed: Instant, quiet_until: Instant) -> Self {
        Self {
            changed,
            quiet_until,
            waiting: None,
            stuck: false,
            retries: 0,
        }
    }

    /// When this version is due (`None`: only after a change).
    fn due_at(&self, incomplete_limit: Duration) -> Option<(Instant, bool)> {
        if self.stuck {
            return None;
        }
        match self.waiting {
            Some(checked) if self.changed <= checked => {
                Some((self.changed + incomplete_limit, true))
            }
            _ => Some((self.quiet_until, false)),
        }
    }
}

/// The versions of every entry that has one.
#[derive(Debug)]
pub struct Tracker {
    incomplete_limit: Duration,
    versions: HashMap<String, Version>,
    /// Takes whose "gone" echo has not been seen yet, per entry.
    echoes: HashMap<String, u32>,
}

impl Tracker {
    pub fn new(incomplete_limit: Duration) -> Self {
        Self {
            incomplete_limit,
            versions: HashMap::new(),
            echoes: HashMap::new(),
        }
    }

    /// Applies one change seen `now`; `settle` is the configured quiet time.
    pub fn observe(
        &mut self,
        entry: &str,
        change: Change,
        settle: Duration,
        now: Instant,
    ) -> Option<Note> {
        if let Some(pending) = self.echoes.get_mut(entry) {
            match change {
                // Happened before the take: the take got this or newer.
                Change::RenamedIn => return Some(Note::Superseded(entry.to_owned())),
                Change::Written => return None,
                Change::Gone => {
                    *pending -= 1;
                    if *pending == 0 {
                        self.echoes.remove(entry);
                    }
                    return None;
                }
                Change::Present { .. } => {}
            }
        }
        match change {
            Change::RenamedIn => {
                let replaced = self
                    .versions
                    .insert(entry.to_owned(), Version::new(now, now));
                replaced.map(|_| Note::Superseded(entry.to_owned()))
            }
            Change::Written => {
                let v = self
                    .versions
                    .entry(entry.to_owned())
                    .or_insert_with(|| Version::new(now, now));
                v.changed = now;
                v.quiet_until = now + settle;
                v.stuck = false;
                None
            }
            Change::Present { age } => {
                self.versions.entry(entry.to_owned()).or_insert_with(|| {
                    let changed = now.checked_sub(age).unwrap_or(now);
                    Version::new(changed, now + settle.saturating_sub(age))
                });
                None
            }
            Change::Gone => self
                .versions
                .remove(entry)
                .map(|_| Note::Withdrawn(entry.to_owned())),
        }
    }

    /// The entries due `now`, skipping those `blocked` says must wait (a
    /// deploy of their drop name is running).
    pub fn due(&self, now: Instant, blocked: impl Fn(&str) -> bool) -> Vec<Due> {
        let mut due: Vec<Due> = self
            .versions
            .iter()
            .filter(|(entry, _)| !blocked(entry))
            .filter_map(|(entry, v)| {
                let (at, expired) = v.due_at(self.incomplete_limit)?;
                (at <= now).then(|| Due {
                    entry: entry.clone(),
                    changed: v.changed,
                    incomplete_expired: expired,
                })
            })
            .collect();
        due.sort_by(|a, b| a.changed.cmp(&b.changed).then(a.entry.cmp(&b.entry)));
        due
    }

    /// When the next entry that is not `blocked` becomes due.
    pub fn next_deadline(&self, blocked: impl Fn(&str) -> bool) -> Option<Instant> {
        self.versions
            .iter()
            .filter(|(entry, _)| !blocked(entry))
            .filter_map(|(_, v)| v.due_at(self.incomplete_limit).map(|(at, _)| at))
            .min()
    }

    /// The entry was due but is an incomplete set: wait for a change, or
    /// for the limit. Returns true the first time for this version.
    pub fn waiting(&mut self, entry: &str, now: Instant) -> bool {
        match self.versions.get_mut(entry) {
            Some(v) => v.waiting.replace(now).is_none(),
            None => false,
        }
    }

    /// The entry was taken (renamed aside): its version is over, and the
    /// watcher will report the entry gone once, which is swallowed.
    pub fn taken(&mut self, entry: &str) {
        self.versions.remove(entry);
        *self.echoes.entry(entry.to_owned()).or_insert(0) += 1;
    }

    /// The entry was gone when it was to be taken: forget its version.
    pub fn vanished(&mut self, entry: &str) {
        self.versions.remove(entry);
    }

    /// Taking the entry failed: it waits for its next change.
    pub fn stuck(&mut self, entry: &str) {
        if let Some(v) = self.versions.get_mut(entry) {
            v.stuck = true;
        }
    }

    /// Taking the entry failed for a transient reason: it is due again
    /// after a back-off ([`backoff`]), which it returns.
    pub fn retry(&mut self, entry: &str, now: Instant) -> Option<Duration> {
        let v = self.versions.get_mut(entry)?;
        let wait = backoff(v.retries);
        v.retries = v.retries.saturating_add(1);
        v.stuck = false;
        v.quiet_until = now + wait;
        Some(wait)
    }

    /// Events were lost (queue overflow): echoes can no longer be matched.
    /// The caller scans the directory and reports what it finds as
    /// [`Change::Present`].
    pub fn lost_events(&mut self) {
        self.echoes.clear();
    }

    /// Entries with a version not taken yet.
    pub fn pending(&self) -> usize {
        self.versions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(2);
    const LIMIT: Duration = Duration::from_secs(300);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn due(t: &Tracker, now: Instant) -> Vec<(String, bool)> {
        t.due(now, |_| false)
            .into_iter()
            .map(|d| (d.entry, d.incomplete_expired))
            .collect()
    }

    #[test]
    fn a_rename_in_is_due_at_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        assert_eq!(t.observe("web.pem", Change::RenamedIn, SETTLE, t0), None);
        assert_eq!(due(&t, t0), [("web.pem".to_owned(), false)]);
        assert_eq!(t.next_deadline(|_| false), Some(t0));
    }

    #[test]
    fn a_file_written_in_place_waits_for_settle_after_the_last_write() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        // Chunks with pauses shorter than settle keep pushing it out.
        for i in 0..5 {
            t.observe("web.pem", Change::Written, SETTLE, t0 + ms(1500 * i));
            assert!(due(&t, t0 + ms(1500 * i + 1499)).is_empty());
        }
        let last = t0 + ms(6000);
        assert_eq!(t.next_deadline(|_| false), Some(last + SETTLE));
        assert!(due(&t, last + SETTLE - ms(1)).is_empty());
        assert_eq!(due(&t, last + SETTLE).len(), 1);
        // One version, not five: nothing was superseded.
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn a_rename_over_a_waiting_version_supersedes_it() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        t.observe("web.pem", Change::RenamedIn, SETTLE, t0);
        assert_eq!(
            t.observe("web.pem", Change::RenamedIn, SETTLE, t0 + ms(5)),
            Some(Note::Superseded("web.pem".to_owned()))
        );
        // A rename over a file still being written replaces it too.
        t.observe("api.pem", Change::Written, SETTLE, t0);
        assert_eq!(
            t.observe("api.pem", Change::RenamedIn, SETTLE, t0 + ms(10)),
            Some(Note::Superseded("api.pem".to_owned()))
        );
        assert_eq!(due(&t, t0 + ms(10)).len(), 2);
    }

    #[test]
    fn the_echo_of_a_take_is_swallowed_and_earlier_renames_were_superseded() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        t.observe("web.pem", Change::RenamedIn, SETTLE, t0);
        t.taken("web.pem");
        // Queued before the take's own "gone": the take got it or newer.
        assert_eq!(
            t.observe("web.pem", Change::RenamedIn, SETTLE, t0 + ms(1)),
            Some(Note::Superseded("web.pem".to_owned()))
        );
        assert_eq!(t.observe("web.pem", Change::Written, SETTLE, t0), None);
        assert_eq!(t.observe("web.pem", Change::Gone, SETTLE, t0), None);
        assert_eq!(t.pending(), 0);
        // After the echo, a rename-in is a new drop.
        assert_eq!(
            t.observe("web.pem", Change::RenamedIn, SETTLE, t0 + ms(2)),
            None
        );
        assert_eq!(t.pending(), 1);
        // And a "gone" now is a withdrawal.
        assert_eq!(
            t.observe("web.pem", Change::Gone, SETTLE, t0 + ms(3)),
            Some(Note::Withdrawn("web.pem".to_owned()))
        );
    }

    #[test]
    fn an_incomplete_directory_waits_for_a_change_or_the_limit() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        t.observe("web", Change::Written, SETTLE, t0);
        let quiet = t0 + SETTLE;
        assert_eq!(due(&t, quiet), [("web".to_owned(), false)]);
        assert!(t.waiting("web", quiet));
        assert!(!t.waiting("web", quiet), "announced once per version");
        assert!(due(&t, quiet + ms(1)).is_empty());
        assert_eq!(t.next_deadline(|_| false), Some(t0 + LIMIT));
        // The certificate arrives: due again once quiet.
        let later = t0 + ms(3000);
        t.observe("web", Change::Written, SETTLE, later);
        assert!(due(&t, later + SETTLE - ms(1)).is_empty());
        assert_eq!(due(&t, later + SETTLE), [("web".to_owned(), false)]);
        // Still incomplete: nothing changes for the whole limit.
        t.waiting("web", later + SETTLE);
        assert_eq!(t.next_deadline(|_| false), Some(later + LIMIT));
        assert_eq!(due(&t, later + LIMIT), [("web".to_owned(), true)]);
    }

    #[test]
    fn present_entries_settle_from_their_age() {
        let t0 = Instant::now() + Duration::from_secs(3600);
        let mut t = Tracker::new(LIMIT);
        t.observe(
            "old.pem",
            Change::Present {
                age: Duration::from_secs(60),
            },
            SETTLE,
            t0,
        );
        t.observe("new.pem", Change::Present { age: ms(500) }, SETTLE, t0);
        assert_eq!(due(&t, t0), [("old.pem".to_owned(), false)]);
        assert_eq!(due(&t, t0 + ms(1500)).len(), 2);
        // A scan does not restart a version the watcher already reported.
        t.observe("new.pem", Change::Present { age: ms(0) }, SETTLE, t0);
        assert_eq!(due(&t, t0 + ms(1500)).len(), 2);
        // Newest first is the caller's choice; due() sorts oldest first.
        let d = t.due(t0 + ms(1500), |_| false);
        assert!(d[0].changed < d[1].changed);
    }

    #[test]
    fn transient_failures_back_off_up_to_thirty_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(6), Duration::from_secs(16));
        assert_eq!(backoff(7), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30));
        let mut t = Tracker::new(Duration::from_secs(300));
        let now = Instant::now();
        t.observe("web.pem", Change::RenamedIn, Duration::ZERO, now);
        assert_eq!(t.retry("web.pem", now), Some(Duration::from_millis(250)));
        assert!(t.due(now, |_| false).is_empty());
        assert_eq!(
            t.next_deadline(|_| false),
            Some(now + Duration::from_millis(250))
        );
        assert_eq!(t.retry("web.pem", now), Some(Duration::from_millis(500)));
        assert_eq!(t.due(now + Duration::from_millis(500), |_| false).len(), 1);
        assert_eq!(t.retry("gone.pem", now), None);
    }

    #[test]
    fn blocked_and_stuck_entries_are_not_due_and_set_no_deadline() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        t.observe("web.pem", Change::RenamedIn, SETTLE, t0);
        assert!(t.due(t0, |e| e == "web.pem").is_empty());
        assert_eq!(t.next_deadline(|e| e == "web.pem"), None);
        t.stuck("web.pem");
        assert!(due(&t, t0).is_empty());
        assert_eq!(t.next_deadline(|_| false), None);
        t.observe("web.pem", Change::Written, SETTLE, t0 + ms(1));
        assert_eq!(due(&t, t0 + ms(1) + SETTLE).len(), 1);
    }

    #[test]
    fn lost_events_forget_pending_echoes() {
        let t0 = Instant::now();
        let mut t = Tracker::new(LIMIT);
        t.observe("web.pem", Change::RenamedIn, SETTLE, t0);
        t.taken("web.pem");
        t.lost_events();
        assert_eq!(t.observe("web.pem", Change::RenamedIn, SETTLE, t0), None);
        assert_eq!(t.pending(), 1);
        t.vanished("web.pem");
        assert_eq!(t.pending(), 0);
    }
}
