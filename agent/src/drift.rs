//! The drift watch: re-probes every target whose `[target.verify]` sets an
//! `interval`, and reports when what is served stops matching what is on
//! disk (someone replaced the certificate, the server was restarted on old
//! files, the endpoint went away) or the served certificate nears expiry.
//!
//! Guarantees: the latest check of every probed target is kept for
//! `certctl status`; every change of state (and the first check that is not
//! `verified`) is logged and published as a `drift` event. The watch sleeps
//! until the next probe is due, so an idle agent does no work; a config
//! reload wakes it to pick up new intervals. A target being deployed is not
//! probed (the deploy verifies it); it is looked at again one interval
//! later. Up to 16 targets are probed at once, each handshake bounded by
//! `verify.timeout`. Each probe is one attempt of the verification rule
//! (`consecutive` matching handshakes over `settle`) at every endpoint, the
//! same rule a deploy is verified by: `verified` always means the same.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::app::App;
use crate::config::Target;
use crate::model::event::{Event, Stage};
use crate::model::fmt::short_hex;
use crate::verify::served::{self as verify, CheckState, Checks, Expect, ServedCheck};

/// Probes running at once.
const CONCURRENCY: usize = 16;

/// Runs until `shutdown` turns true.
pub async fn run(shared: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let config = shared.config();
        let now = Instant::now();
        // Forget targets that are gone or no longer watched; new ones are
        // probed right away.
        due.retain(|name, _| {
            config
                .target(name)
                .and_then(|t| t.verify.as_ref())
                .is_some_and(|v| v.interval.is_some())
        });
        for t in &config.targets {
            if t.verify.as_ref().and_then(|v| v.interval).is_some() {
                due.entry(t.name.clone()).or_insert(now);
            }
        }
        // Every due target, probed CONCURRENCY at a time: one slow or
        // unreachable endpoint (bounded by its timeout) does not hold up
        // the others.
        let mut batch = JoinSet::new();
        let now = Instant::now();
        let ready: Vec<&Target> = config
            .targets
            .iter()
            .filter(|t| {
                t.verify.as_ref().and_then(|v| v.interval).is_some()
                    && due.get(&t.name).is_some_and(|at| *at <= now)
            })
            .collect();
        let mut due_now = ready.into_iter();
        loop {
            while batch.len() < CONCURRENCY {
                let Some(t) = due_now.next() else { break };
                let interval = t
                    .verify
                    .as_ref()
                    .and_then(|v| v.interval)
                    .unwrap_or_default();
                due.insert(t.name.clone(), now + interval);
                if shared.engine.is_busy(&t.name) {
                    continue;
                }
                let (shared, t) = (shared.clone(), t.clone());
                batch.spawn(async move { probe(&shared, &t).await });
            }
            if batch.join_next().await.is_none() {
                break;
            }
            if *shutdown.borrow() {
                return;
            }
        }
        let next = due.values().min().copied();
        tokio::select! {
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = shared.reloaded.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Probes one target, records the check and reports a change of state.
async fn probe(shared: &App, target: &Target) {
    let Some(v) = &target.verify else { return };
    let t = target.clone();
    let disk = match tokio::task::spawn_blocking(move || crate::disk::read(&t)).await {
        Ok(Ok(Some(disk))) => disk,
        // Nothing deployed yet: nothing to compare.
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!(target = %target.name, "drift watch: cannot read the certificate on disk: {e}");
            return;
        }
        Err(_) => return,
    };
    let expect = Expect::of(v, &disk.leaf, &disk.chain);
    let now = SystemTime::now();
    let checks = Checks(
        verify::check_now(v, &expect)
            .await
            .0
            .into_iter()
            .map(|c| verify::with_expiry(c, now))
            .collect(),
    );
    let before = shared.engine.served(&target.name);
    shared.engine.record_served(&target.name, checks.clone());
    if !changed_all(before.as_deref(), &checks) {
        return;
    }
    let Some(check) = checks.decisive().cloned() else {
        return;
    };
    let message = if checks.0.len() > 1 && checks.0.iter().all(|c| c.state == CheckState::Verified)
    {
        format!(
            "{} serve the certificate on disk ({})",
            v.addresses(),
            short_hex(&check.served_sha256)
        )
    } else {
        describe(&check)
    };
    if check.state == CheckState::Verified {
        info!(target = %target.name, served = %check.served_sha256, "drift watch: {message}");
    } else {
        warn!(target = %target.name, state = check.state.as_str(), endpoint = %check.endpoint, served = %check.served_sha256, "drift watch: {message}");
    }
    shared.engine.publish(Event {
        served: Some(check),
        ..Event::new("", &target.name, Stage::Drift, message)
    });
}

/// Whether the checks of every endpoint are news compared with the
/// previous ones: any endpoint's check is (or the endpoints changed).
fn changed_all(before: Option<&Checks>, now: &Checks) -> bool {
    match before {
        Some(b) if b.0.len() == now.0.len() => {
            b.0.iter()
                .zip(&now.0)
                .any(|(b, n)| b.endpoint != n.endpoint || changed(Some(b), n))
        }
        _ => now.0.iter().any(|n| changed(None, n)),
    }
}

/// Whether `now` is news compared with the previous check.
fn changed(before: Option<&ServedCheck>, now: &ServedCheck) -> bool {
    match before {
        None => now.state != CheckState::Verified,
        Some(b) => {
            b.state != now.state
                || b.served_sha256 != now.served_sha256
                || b.want_sha256 != now.want_sha256
        }
    }
}

fn describe(c: &ServedCheck) -> String {
    match c.state {
        CheckState::Verified => format!(
            "{} serves the certificate on disk ({})",
            c.endpoint,
            short_hex(&c.served_sha256)
        ),
        CheckState::Mismatch => format!(
            "{} serves {} ({}), but the certificate on disk is {}",
            c.endpoint,
            short_hex(&c.served_sha256),
            c.served_subject,
            short_hex(&c.want_sha256)
        ),
        CheckState::ChainMismatch | CheckState::Unreachable | CheckState::Expiring => {
            c.error.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::VerifyProtocol;

    fn check(state: CheckState, served: &str, want: &str) -> ServedCheck {
        ServedCheck {
            endpoint: "127.0.0.1:443".to_owned(),
            server_name: "www.example.com".to_owned(),
            protocol: VerifyProtocol::Tls,
            want_sha256: want.to_owned(),
            served_sha256: served.to_owned(),
            served_chain_sha256: Vec::new(),
            served_subject: "CN=www.example.com".to_owned(),
            served_not_after: 0,
            state,
            reason: "",
            error: "endpoint down".to_owned(),
            checked: SystemTime::UNIX_EPOCH,
            tls_version: String::new(),
            ca_validated: false,
        }
    }

    #[test]
    fn only_changes_are_news() {
        let ok = check(CheckState::Verified, "aa", "aa");
        let off = check(CheckState::Mismatch, "bb", "aa");
        assert!(!changed(None, &ok), "a first good check is not news");
        assert!(changed(None, &off));
        assert!(!changed(Some(&off), &off.clone()));
        assert!(changed(Some(&ok), &off));
        assert!(changed(Some(&off), &ok), "back in sync is news");
        let other = check(CheckState::Mismatch, "cc", "aa");
        assert!(
            changed(Some(&off), &other),
            "a different wrong cert is news"
        );
        let redeployed = check(CheckState::Verified, "dd", "dd");
        assert!(changed(Some(&ok), &redeployed));
    }

    #[test]
    fn messages_name_both_fingerprints() {
        let m = describe(&check(
            CheckState::Mismatch,
            &"b".repeat(64),
            &"a".repeat(64),
        ));
        assert!(
            m.contains("bbbbbb…bbbb") && m.contains("aaaaaa…aaaa"),
            "{m}"
        );
        assert_eq!(
            describe(&check(CheckState::Unreachable, "", "aa")),
            "endpoint down"
        );
    }
}
