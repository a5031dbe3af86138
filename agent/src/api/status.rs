//! The `Status` answer: each target's `TargetStatus` encoded once per
//! change and sent as those bytes.
//!
//! What status shows of a target comes from state the agent holds: the
//! leaf on disk (`crate::deployed`, one `stat` a look), the last probe and
//! the last run (the engine), whether a run holds it, and the last drop
//! event (the ledger). Each of those is an `Arc` that stays the same until
//! it changes, so a target's part is encoded again only when one of them
//! is another `Arc`, its run starts or ends, or its certificate expired
//! since. A call then costs the `stat`s and a copy of the parts: no
//! per-target strings are built and nothing is measured or encoded twice
//! (`certctl_proto`'s `StatusResponse` sends the parts as field 2).
//!
//! A configuration reload replaces every part (names, kinds and paths
//! come from the configuration).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use certctl_proto::agent::v1 as pb;
use prost::Message;

use super::convert;
use crate::app::App;
use crate::config::{Config, Target};
use crate::deploy::LastDeploy;
use crate::deployed::Seen;
use crate::model::check::Checks;
use crate::model::drop::LastDrop;
use crate::sync::lock;

/// The parts of the last answers, per target of one configuration.
#[derive(Debug, Default)]
pub struct Parts {
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// The configuration the parts were made from.
    config: Option<Arc<Config>>,
    parts: HashMap<String, Part>,
}

#[derive(Debug)]
struct Part {
    /// Held, so that an `Arc` compared by address cannot be freed and
    /// its address reused by a newer value.
    made_of: Inputs,
    bytes: Bytes,
}

/// Everything a target's part is made of besides the configuration.
#[derive(Debug)]
struct Inputs {
    seen: Arc<Seen>,
    expired: bool,
    served: Option<Arc<Checks>>,
    last: Option<Arc<LastDeploy>>,
    busy: bool,
    drop: Option<Arc<LastDrop>>,
}

fn same<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

impl Inputs {
    /// What `app` holds of `target` now: a `stat` of its certificate
    /// (blocking) and a look at the engine's and the ledger's maps.
    /// `now` is in seconds since the epoch.
    fn of(app: &App, target: &Target, now: i64) -> Inputs {
        let seen = app.engine.deployed().leaf(target);
        let expired = matches!(&*seen, Seen::Leaf { not_after, .. } if *not_after <= now);
        Inputs {
            seen,
            expired,
            served: app.engine.served(&target.name),
            last: app.engine.last(&target.name),
            busy: app.engine.is_busy(&target.name),
            drop: app.drops.last(&target.name),
        }
    }

    fn same_as(&self, other: &Inputs) -> bool {
        Arc::ptr_eq(&self.seen, &other.seen)
            && self.expired == other.expired
            && same(self.served.as_ref(), other.served.as_ref())
            && same(self.last.as_ref(), other.last.as_ref())
            && self.busy == other.busy
            && same(self.drop.as_ref(), other.drop.as_ref())
    }

    /// `target`'s entry of the answer.
    fn message(&self, target: &Target) -> pb::TargetStatus {
        let disk = DiskCert::of(&self.seen, self.expired);
        let served = self.served.as_deref();
        pb::TargetStatus {
            host: convert::remote_host(target),
            name: target.name.clone(),
            kind: target.kind.as_str().to_owned(),
            cert_path: target.cert_path.display().to_string(),
            verification: verification(served, disk.sha256).to_owned(),
            cert_sha256: disk.sha256.to_owned(),
            not_after_unix: disk.not_after,
            subject: disk.subject.to_owned(),
            disk_state: disk.state.to_owned(),
            busy: self.busy,
            last: self.last.as_deref().map(|l| pb::LastDeploy {
                deploy_id: l.deploy_id.clone(),
                outcome: convert::outcome(l.outcome) as i32,
                finished_unix_ms: convert::unix_ms(l.finished),
                error: l.error.clone(),
                cert_sha256: l.cert_sha256.clone(),
            }),
            served: served.and_then(Checks::decisive).map(convert::served),
            served_endpoints: served
                .map(|c| c.0.iter().map(convert::served).collect())
                .unwrap_or_default(),
            last_drop: self.drop.as_deref().map(convert::last_drop),
        }
    }
}

impl Parts {
    /// The encoded entries of `targets` (of `config`), in their order, as
    /// `app` holds them now; `now` in seconds since the epoch. Blocking:
    /// one `stat` per target, and a read of each certificate that changed.
    pub fn answer(
        &self,
        app: &App,
        config: &Arc<Config>,
        targets: &[&Target],
        now: i64,
    ) -> Vec<Bytes> {
        // The stats before the cache is locked: concurrent calls look at
        // the disk side by side.
        let inputs: Vec<Inputs> = targets.iter().map(|t| Inputs::of(app, t, now)).collect();
        let mut cache = lock(&self.cache);
        if !cache
            .config
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, config))
        {
            cache.config = Some(config.clone());
            cache.parts.clear();
        }
        targets
            .iter()
            .zip(inputs)
            .map(|(t, now)| match cache.parts.get(&t.name) {
                Some(part) if part.made_of.same_as(&now) => part.bytes.clone(),
                _ => {
                    let bytes = Bytes::from(now.message(t).encode_to_vec());
                    cache.parts.insert(
                        t.name.clone(),
                        Part {
                            made_of: now,
                            bytes: bytes.clone(),
                        },
                    );
                    bytes
                }
            })
            .collect()
    }
}

/// The verification column of `certctl status`: what the last probe said,
/// as long as it was about the certificate that is on disk now.
/// With several endpoints, every one must have been checked against it;
/// the word is the first failing endpoint's, else `verified`.
fn verification(served: Option<&Checks>, disk_sha256: &str) -> &'static str {
    match served {
        Some(c) if !disk_sha256.is_empty() && c.all_want(disk_sha256) => c
            .decisive()
            .map_or("unverified", |d| d.state.verification()),
        _ => "unverified",
    }
}

/// What `certctl status` says about the certificate on disk.
struct DiskCert<'a> {
    sha256: &'a str,
    not_after: i64,
    subject: &'a str,
    state: &'a str,
}

impl<'a> DiskCert<'a> {
    fn state(state: &'a str) -> Self {
        Self {
            sha256: "",
            not_after: 0,
            subject: "",
            state,
        }
    }

    fn of(seen: &'a Seen, expired: bool) -> Self {
        match seen {
            Seen::Missing => DiskCert::state("missing"),
            Seen::Leaf {
                sha256,
                not_after,
                subject,
            } => DiskCert {
                sha256,
                not_after: *not_after,
                subject,
                state: if expired { "expired" } else { "ok" },
            },
            Seen::Unreadable(why) => DiskCert::state(why),
        }
    }
}
