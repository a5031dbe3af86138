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
use std::time::SystemTime;

use bytes::Bytes;
use certctl_proto::agent::v1 as pb;
use prost::Message;
use tokio::sync::watch;

use super::convert;
use crate::app::App;
use crate::config::{Config, Target};
use crate::deploy::LastDeploy;
use crate::deployed::Seen;
use crate::model::check::Checks;
use crate::model::drop::LastDrop;
use crate::sync::lock;

/// The parts of the last answers, per target of one configuration, and
/// the look at every target that concurrent calls share.
#[derive(Debug)]
pub struct Parts {
    cache: Mutex<Cache>,
    passes: Mutex<Passes>,
    /// The number of the last pass that ended.
    ended: watch::Sender<u64>,
}

impl Default for Parts {
    fn default() -> Self {
        Parts {
            cache: Mutex::default(),
            passes: Mutex::default(),
            ended: watch::Sender::new(0),
        }
    }
}

/// Looks at every target ("passes"), numbered from 1. A call that asks
/// for every target takes the answer of a pass that began after the call
/// arrived: the one it starts itself, or the next one when a pass is
/// running already. 50 calls at once cost two passes, not 50, and none
/// is answered from a look older than the call.
#[derive(Debug, Default)]
struct Passes {
    /// The number of the last pass begun.
    begun: u64,
    running: bool,
    latest: Option<Answer>,
}

#[derive(Debug)]
struct Answer {
    pass: u64,
    config: Arc<Config>,
    targets: Arc<[Bytes]>,
}

/// Ends a pass (also when it panicked): waiters then start the next.
struct Running<'a> {
    parts: &'a Parts,
    pass: u64,
    answer: Option<Answer>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut passes = lock(&self.parts.passes);
        passes.running = false;
        if let Some(answer) = self.answer.take() {
            passes.latest = Some(answer);
        }
        drop(passes);
        self.parts.ended.send_replace(self.pass);
    }
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
    /// The encoded entries of every target of `config`, from a look that
    /// began after this call (see [`Passes`]). A pass blocks its caller's
    /// thread (`block_in_place`); the others wait without a thread.
    pub async fn every(&self, app: &App, config: &Arc<Config>) -> Arc<[Bytes]> {
        let mut ended = self.ended.subscribe();
        let need = lock(&self.passes).begun + 1;
        loop {
            let pass = {
                let mut passes = lock(&self.passes);
                match &passes.latest {
                    Some(a) if a.pass >= need && Arc::ptr_eq(&a.config, config) => {
                        return a.targets.clone();
                    }
                    _ if passes.running => None,
                    _ => {
                        passes.running = true;
                        passes.begun += 1;
                        Some(passes.begun)
                    }
                }
            };
            let Some(pass) = pass else {
                // A pass that began before this call: wait for its end,
                // then take or start the next one.
                let _ = ended.changed().await;
                continue;
            };
            let mut running = Running {
                parts: self,
                pass,
                answer: None,
            };
            let targets: Vec<&Target> = config.targets.iter().collect();
            let now = convert::unix_ms(SystemTime::now()) / 1000;
            let bytes: Arc<[Bytes]> =
                tokio::task::block_in_place(|| self.answer(app, config, &targets, now)).into();
            running.answer = Some(Answer {
                pass,
                config: config.clone(),
                targets: bytes.clone(),
            });
            return bytes;
        }
    }

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
            .map(|(t, inputs)| match cache.parts.get(&t.name) {
                Some(part) if part.made_of.same_as(&inputs) => part.bytes.clone(),
                _ => {
                    let bytes = Bytes::from(inputs.message(t).encode_to_vec());
                    cache.parts.insert(
                        t.name.clone(),
                        Part {
                            made_of: inputs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::Engine;
    use crate::journal::Journal;
    use std::path::Path;

    const TARGETS: usize = 3;

    fn app(dir: &Path) -> (Arc<App>, Arc<Config>) {
        let mut text = format!(
            "[agent]\nsocket = \"{0}/agent.sock\"\nstate_dir = \"{0}/state\"\n\
             drop_dir = \"{0}/drop\"\ndeploy_groups = []\nread_groups = []\n",
            dir.display()
        );
        for i in 0..TARGETS {
            std::fs::create_dir_all(dir.join(format!("t{i}"))).unwrap();
            text.push_str(&format!(
                "[[target]]\nname = \"t{i}\"\nkind = \"file\"\n\
                 cert_path = \"{0}/t{i}/cert.pem\"\nkey_path = \"{0}/t{i}/key.pem\"\n",
                dir.display()
            ));
        }
        let config = Arc::new(crate::config::parse(&text, &dir.join("agent.toml")).unwrap());
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let journal = Arc::new(Journal::open(&state).unwrap());
        let engine = Engine::new(state.join("locks"), journal);
        let (_, down) = tokio::sync::watch::channel(false);
        let app = App::new(config.clone(), engine, dir.join("agent.sock"), down);
        (Arc::new(app), config)
    }

    fn cert_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["a.test".to_owned()])
            .unwrap()
            .cert
            .pem()
    }

    /// `t0`'s fingerprint in an answer.
    fn first_sha(answer: &[Bytes]) -> String {
        pb::TargetStatus::decode(answer[0].clone())
            .unwrap()
            .cert_sha256
    }

    /// The fingerprint a full read of `pem` gives.
    fn sha_of(pem: &str) -> String {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der))
    }

    /// While other calls keep a pass running all the time, a call made
    /// after a file changed never gets an answer from a look that began
    /// before the change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_shared_look_is_never_older_than_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let (app, config) = app(dir.path());
        let parts = Arc::new(Parts::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hammer = Vec::new();
        for _ in 0..6 {
            let (app, config, parts, stop) =
                (app.clone(), config.clone(), parts.clone(), stop.clone());
            hammer.push(tokio::spawn(async move {
                let mut calls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(parts.every(&app, &config).await.len(), TARGETS);
                    calls += 1;
                    tokio::task::yield_now().await;
                }
                calls
            }));
        }
        let cert = dir.path().join("t0/cert.pem");
        let tmp = dir.path().join("t0/next.tmp");
        for round in 0..200 {
            let pem = cert_pem();
            std::fs::write(&tmp, &pem).unwrap();
            std::fs::rename(&tmp, &cert).unwrap();
            let answer = parts.every(&app, &config).await;
            assert_eq!(first_sha(&answer), sha_of(&pem), "round {round}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut calls = 200;
        for h in hammer {
            calls += h.await.unwrap();
        }
        // The looks were shared: fewer passes than calls.
        let passes = lock(&parts.passes).begun;
        assert!(passes < calls, "{passes} passes for {calls} calls");
    }

    /// A configuration reload between a pass and a call: the call looks
    /// again with its own configuration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_is_of_the_callers_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let (app, config) = app(dir.path());
        let parts = Parts::default();
        assert_eq!(parts.every(&app, &config).await.len(), TARGETS);
        let mut fewer = (*config).clone();
        fewer.targets.truncate(1);
        let fewer = Arc::new(fewer);
        assert_eq!(parts.every(&app, &fewer).await.len(), 1);
        assert_eq!(parts.every(&app, &config).await.len(), TARGETS);
    }
}
