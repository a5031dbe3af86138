//! Figure 3: a bundle renamed into the drop directory → the deploy
//! committed, as a Watch stream sees it (the COMMITTED event of the
//! target: the new files are renamed into place, the directory fsynced
//! and the journal says so). `settle` stays at its default (2 s): renamed
//! bundles are taken at once, so it must not show.
#![allow(clippy::disallowed_methods)] // the harness renames drops in, as producers do

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use certctl_proto::agent::v1 as pb;

use super::agent::{Arrivals, write_file};
use super::pki::Set;
use super::stats::{Row, Samples, med_p99};

/// How long one drop may take before the harness gives up.
const DROP_TIMEOUT: Duration = Duration::from_secs(60);

/// What one drop took: renamed in → COMMITTED, → DONE, → drop removed.
struct Timing {
    committed: Duration,
    done: Duration,
    removed: Duration,
}

async fn one(
    events: &mut Arrivals,
    drop_dir: &Path,
    name: &str,
    target: &str,
    set: &Set,
) -> Result<Timing> {
    let tmp = drop_dir.join(format!(".{name}.pem.tmp"));
    write_file(&tmp, set.bundle().as_bytes())?;
    let t0 = Instant::now();
    std::fs::rename(&tmp, drop_dir.join(format!("{name}.pem")))?;
    let (mut committed, mut done) = (None, None);
    let deadline = tokio::time::Instant::now() + DROP_TIMEOUT;
    loop {
        let Ok(Some((at, ev))) = tokio::time::timeout_at(deadline, events.recv()).await else {
            bail!("drop {name}: no outcome within {DROP_TIMEOUT:?}");
        };
        if ev.target != target {
            continue;
        }
        match pb::Stage::try_from(ev.stage) {
            Ok(pb::Stage::Committed) => committed = committed.or(Some(at - t0)),
            Ok(pb::Stage::Done) => {
                let r = ev.result.unwrap_or_default();
                if r.outcome != pb::Outcome::Deployed as i32 {
                    bail!("drop {name}: deploy ended {} ({})", r.outcome, r.error);
                }
                done = Some(at - t0);
            }
            Ok(pb::Stage::Drop) => {
                let d = ev.drop.unwrap_or_default();
                match pb::DropOutcome::try_from(d.outcome) {
                    Ok(pb::DropOutcome::Removed) => {
                        let (Some(committed), Some(done)) = (committed, done) else {
                            bail!("drop {name}: removed before its deploy was seen (events lost?)");
                        };
                        return Ok(Timing {
                            committed,
                            done,
                            removed: at - t0,
                        });
                    }
                    Ok(pb::DropOutcome::Accepted) => {}
                    other => bail!("drop {name}: {other:?} ({}): {}", d.reason, ev.message),
                }
            }
            _ => {}
        }
    }
}

/// Drops `n` bundles (after `warmup`), one at a time, each once the
/// previous one was removed.
pub async fn latency(
    events: &mut Arrivals,
    drop_dir: &Path,
    name: &str,
    sets: &[Set; 2],
    warmup: usize,
    n: usize,
) -> Result<Vec<Row>> {
    let (mut committed, mut done, mut removed) =
        (Samples::default(), Samples::default(), Samples::default());
    for i in 0..warmup + n {
        let t = one(events, drop_dir, name, name, &sets[i % 2]).await?;
        if i >= warmup {
            committed.push(t.committed);
            done.push(t.done);
            removed.push(t.removed);
        }
    }
    let p99 = committed.p99();
    Ok(vec![
        Row::new(
            "3",
            "drop → committed: bundle renamed in → COMMITTED on a Watch stream",
        )
        .n(n)
        .measured(med_p99(&committed))
        .goal("p99 < 50 ms", p99 < 0.050),
        Row::new("3", "drop → done (DONE event) / → drop removed")
            .n(n)
            .measured(format!("{} · {}", med_p99(&done), med_p99(&removed))),
    ])
}
