//! Coalescing: at most one drop per drop name is being deployed, and of
//! the drops of one name that are due, the newest wins. Pure.
//!
//! Every target takes exactly one drop name, so one deploy in flight per
//! drop name is one per target. Drops of a name that become due while its
//! deploy runs stay where they are (in the drop directory) and are not
//! taken until it ends; of those, the newest wins when it does. A drop a
//! newer one replaced in place (a rename over it) is reported superseded
//! by [`settle`](super::settle); one that is still on disk when a newer one
//! of its name is taken (the other form: `web.pem` beside `web/`) is
//! superseded here and moved aside, so it cannot later overwrite the newer.
//!
//! The queue holds names, never file contents: a waiting drop costs a few
//! bytes however large the burst.

use std::collections::{BTreeMap, HashSet};

use super::settle::Due;

/// The drop names whose deploy is running.
#[derive(Debug, Default)]
pub struct Queue {
    in_flight: HashSet<String>,
}

impl Queue {
    /// Whether a deploy of drop `name` is running.
    pub fn busy(&self, name: &str) -> bool {
        self.in_flight.contains(name)
    }

    /// A deploy of `name` starts.
    pub fn start(&mut self, name: &str) {
        self.in_flight.insert(name.to_owned());
    }

    /// The deploy of `name` ended: its next drop may be taken.
    pub fn finish(&mut self, name: &str) {
        self.in_flight.remove(name);
    }
}

/// What to do with the due drops of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub name: String,
    /// The newest: take and deploy it.
    pub take: Due,
    /// Older ones still on disk: take and move them aside as superseded.
    pub supersede: Vec<Due>,
}

/// Groups `due` drops by name (`name_of` gives an entry's drop name) and
/// picks the newest of each name. Entries without a drop name are not
/// deployed, so they compete with nothing: each is its own pick.
pub fn pick(due: Vec<Due>, name_of: impl Fn(&str) -> Option<String>) -> Vec<Pick> {
    let mut by_name: BTreeMap<String, Vec<Due>> = BTreeMap::new();
    let mut picks = Vec::new();
    for d in due {
        match name_of(&d.entry) {
            Some(name) => by_name.entry(name).or_default().push(d),
            None => picks.push(Pick {
                name: String::new(),
                take: d,
                supersede: Vec::new(),
            }),
        }
    }
    for (name, mut ds) in by_name {
        // Oldest first; the last is the newest (ties: by entry name, so the
        // choice is stable).
        ds.sort_by(|a, b| a.changed.cmp(&b.changed).then(a.entry.cmp(&b.entry)));
        if let Some(take) = ds.pop() {
            picks.push(Pick {
                name,
                take,
                supersede: ds,
            });
        }
    }
    picks
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn due(entry: &str, changed: Instant) -> Due {
        Due {
            entry: entry.to_owned(),
            changed,
            incomplete_expired: false,
        }
    }

    fn name_of(entry: &str) -> Option<String> {
        (entry != "Bad").then(|| entry.trim_end_matches(".pem").to_owned())
    }

    #[test]
    fn the_newest_drop_of_a_name_wins_and_the_older_is_superseded() {
        let t0 = Instant::now();
        let picks = pick(
            vec![
                due("web.pem", t0 + Duration::from_millis(5)),
                due("web", t0),
                due("api.pem", t0),
            ],
            name_of,
        );
        assert_eq!(picks.len(), 2);
        let web = picks.iter().find(|p| p.name == "web").unwrap();
        assert_eq!(web.take.entry, "web.pem");
        assert_eq!(web.supersede.len(), 1);
        assert_eq!(web.supersede[0].entry, "web");
        let api = picks.iter().find(|p| p.name == "api").unwrap();
        assert!(api.supersede.is_empty());
    }

    #[test]
    fn entries_without_a_name_are_picked_alone() {
        let t0 = Instant::now();
        let picks = pick(vec![due("Bad", t0), due("web.pem", t0)], name_of);
        assert_eq!(picks.len(), 2);
        assert!(
            picks
                .iter()
                .any(|p| p.name.is_empty() && p.take.entry == "Bad")
        );
    }

    #[test]
    fn one_deploy_per_name_is_in_flight() {
        let mut q = Queue::default();
        assert!(!q.busy("web"));
        q.start("web");
        assert!(q.busy("web"));
        assert!(!q.busy("api"));
        q.finish("web");
        assert!(!q.busy("web"));
    }
}
