//! Figure 7: host scale. One agent with ten times the targets of figure 4
//! (10,000 by default): a burst of a drop for every one of them, Status of
//! all of them, then a restart with a journal of 100,000 runs and the time
//! until the agent serves.
#![allow(clippy::disallowed_methods)] // the harness renames drops in, as producers do

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use certctl_proto::agent::v1 as pb;

use super::Plan;
use super::agent::{self, Agent, Layout};
use super::pki::{Pki, Set};
use super::scale;
use super::stats::{Row, mib, secs};

/// Figure 7's rows.
pub async fn figures(bin: &Path, root: &Path, plan: &Plan, pki: &[Pki; 2]) -> Result<Vec<Row>> {
    let n = plan.host_targets;
    eprintln!("==> 7: {n} targets: generating {} certificates", 2 * n);
    let mut layout = Layout::new(&root.join("host"))?;
    let mut sets: [Vec<Set>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        layout.file_target(&scale::name(i), "")?;
        for (s, issuer) in sets.iter_mut().zip(pki) {
            s.push(issuer.leaf(&format!("{}.bench.test", scale::name(i)))?);
        }
    }
    let mut rows = Vec::new();

    let t0 = Instant::now();
    let agent = Agent::start(bin, &layout, &plan.wrap)?;
    let empty_start = t0.elapsed();

    // Watch events are not followed here: 10,000 deploys overflow any
    // watcher's backlog; the burst is timed to the drop directory empty.
    let (_events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let rejected = root.join("host/state/rejected");
    let mut drained = Duration::ZERO;
    for (b, round) in sets.iter().enumerate() {
        eprintln!(
            "==> 7: burst of {n} drops{}",
            if b == 0 { " (first deploys)" } else { "" }
        );
        let r = scale::burst(
            agent.pid(),
            &mut events,
            &layout.drop_dir(),
            &rejected,
            round,
        )
        .await?;
        drained = r.drained;
    }
    rows.push(
        Row::new(
            "7",
            format!("{n} drops at once (replacing every target's files) → drop dir empty"),
        )
        .n(1)
        .measured(format!(
            "{}; {:.0} deploys/s; peak RSS {}, RSS after {}",
            secs(drained.as_secs_f64()),
            n as f64 / drained.as_secs_f64(),
            mib(agent::vm_kib(agent.pid(), "VmHWM")?),
            mib(agent::vm_kib(agent.pid(), "VmRSS")?)
        )),
    );

    for clients in [1, plan.host_clients] {
        eprintln!(
            "==> 7: Status of {n} targets, {clients} × {} calls",
            plan.host_calls
        );
        let (mut row, _, _) = scale::status_latency(&agent, n, clients, plan.host_calls).await?;
        row.id = "7";
        rows.push(row.baseline(format!(
            "RSS after {}",
            mib(agent::vm_kib(agent.pid(), "VmRSS")?)
        )));
    }
    drop(agent);

    let runs = fill_journal(
        &root.join("host/state/journal.sqlite"),
        n,
        plan.journal_runs,
    )?;
    eprintln!("==> 7: start-up with {n} targets and {runs} journal runs");
    let log_from = std::fs::metadata(layout.log()).map_or(0, |m| m.len());
    let t0 = Instant::now();
    let agent = Agent::start(bin, &layout, &plan.wrap)?;
    let ready = t0.elapsed();
    let mut client = agent.client().await?;
    let status = client.status(pb::StatusRequest::default()).await?;
    let first_status = t0.elapsed();
    // The leftover sweep runs after READY (an agent that swept before it
    // never says so: then it was done at READY).
    let swept = sweep_done(&layout.log(), log_from, Duration::from_secs(20))
        .map_or(ready, |()| t0.elapsed());
    anyhow::ensure!(
        status.get_ref().targets.len() == n,
        "status listed {} targets",
        status.get_ref().targets.len()
    );
    rows.push(
        Row::new(
            "7",
            format!("start-up, {n} targets, {runs} journal runs: start → socket accepting (READY)"),
        )
        .n(1)
        .measured(format!(
            "{}; first Status answered at {}; leftovers swept at {}; RSS {}",
            secs(ready.as_secs_f64()),
            secs(first_status.as_secs_f64()),
            secs(swept.as_secs_f64()),
            mib(agent::vm_kib(agent.pid(), "VmRSS")?)
        ))
        .baseline(format!(
            "empty journal, no files: {}",
            secs(empty_start.as_secs_f64())
        ))
        .goal("< 1 s", ready < Duration::from_secs(1)),
    );
    Ok(rows)
}

/// Waits until the agent's log, after byte `from`, says its start-up
/// sweep is done; `None` when it does not within `limit`.
pub fn sweep_done(log: &Path, from: u64, limit: Duration) -> Option<()> {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let tail = text
            .get(usize::try_from(from).unwrap_or(0)..)
            .unwrap_or_default();
        if tail.windows(19).any(|w| w == b"start-up sweep done") {
            return Some(());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Adds finished runs to the agent's journal (stopped) until it holds
/// `want`, spread over the `n` targets and older than every real run;
/// returns how many it holds.
fn fill_journal(path: &Path, n: usize, want: usize) -> Result<usize> {
    let mut db = rusqlite::Connection::open(path)
        .with_context(|| format!("open the journal {}", path.display()))?;
    let have: i64 = db.query_row("SELECT count(*) FROM deploys", [], |r| r.get(0))?;
    let have = usize::try_from(have)?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let tx = db.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO deploys (id, target, op, origin, started_ms, stage, files, cert_sha256,
                                  prev_sha256, inputs, finished_ms, outcome, error, verification,
                                  disk_sha256, served_sha256)
             VALUES (?1, ?2, 'deploy', 'bench', ?3, 'done', '[]', ?4, ?4, '[]', ?3, 'deployed',
                     '', 'unverified', ?4, '')",
        )?;
        let mut stage = tx.prepare(
            "INSERT INTO stages (deploy_id, at_ms, stage, message) VALUES (?1, ?2, ?3, '')",
        )?;
        let sha = "00".repeat(32);
        for i in have..want {
            let id = format!("bench-{i:07}");
            // A day of history before the real runs, oldest first.
            let started = now_ms - 86_400_000 + i as i64;
            insert.execute(rusqlite::params![id, scale::name(i % n), started, sha])?;
            for s in ["locked", "staged", "committed", "done"] {
                stage.execute(rusqlite::params![id, started, s])?;
            }
        }
    }
    tx.commit()?;
    Ok(have.max(want))
}
