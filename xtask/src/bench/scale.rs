//! Figures 4 and 5: many targets. One agent with N `file` targets (each
//! with its own drop name); a bundle for every one of them renamed into the
//! drop directory at once; then Status under concurrent clients; then the
//! agent left alone.
#![allow(clippy::disallowed_methods)] // the harness renames drops in, as producers do

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use certctl_proto::agent::v1 as pb;

use super::agent::{self, Agent, Arrivals, write_file};
use super::pki::Set;
use super::stats::{Row, Samples, med_p99, mib, min_max, secs};

/// How long one burst may take before the harness gives up.
const BURST_TIMEOUT: Duration = Duration::from_secs(600);

/// The name of target `i` (also its drop name).
pub fn name(i: usize) -> String {
    format!("t{i:04}")
}

/// What one burst took.
pub struct Burst {
    /// First rename → last COMMITTED event (None when the Watch stream
    /// lagged and missed some).
    pub committed: Option<Duration>,
    /// First rename → the drop directory empty again (every drop deployed
    /// and removed).
    pub drained: Duration,
    /// The most threads the agent had, sampled every 10 ms.
    pub threads: u64,
}

/// Renames a bundle for each target into the drop directory, as fast as
/// possible, and waits until every drop is gone again.
pub async fn burst(
    pid: u32,
    events: &mut Arrivals,
    drop_dir: &Path,
    rejected_dir: &Path,
    sets: &[Set],
) -> Result<Burst> {
    let n = sets.len();
    for (i, set) in sets.iter().enumerate() {
        write_file(
            &drop_dir.join(format!(".{}.pem.tmp", name(i))),
            set.bundle().as_bytes(),
        )?;
    }
    while events.try_recv().is_ok() {}
    let t0 = Instant::now();
    for i in 0..n {
        let n = name(i);
        std::fs::rename(
            drop_dir.join(format!(".{n}.pem.tmp")),
            drop_dir.join(format!("{n}.pem")),
        )?;
    }
    let mut committed: HashSet<String> = HashSet::with_capacity(n);
    let mut last_commit = None;
    let deadline = t0 + BURST_TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut threads = 0;
    let drained = loop {
        tokio::select! {
            ev = events.recv() => {
                let Some((at, ev)) = ev else { bail!("the Watch stream ended") };
                if ev.stage == pb::Stage::Committed as i32 && committed.insert(ev.target) {
                    last_commit = Some(at - t0);
                }
            }
            _ = tick.tick() => {
                threads = threads.max(agent::vm_kib(pid, "Threads").unwrap_or(0.0) as u64);
                if dir_is_empty(drop_dir)? {
                    break t0.elapsed();
                }
                if Instant::now() > deadline {
                    bail!("{n} drops not done after {BURST_TIMEOUT:?}");
                }
            }
        }
    };
    // Events that arrived while the directory was being looked at.
    while let Ok((at, ev)) = events.try_recv() {
        if ev.stage == pb::Stage::Committed as i32 && committed.insert(ev.target) {
            last_commit = Some(at - t0);
        }
    }
    if std::fs::read_dir(rejected_dir).is_ok_and(|mut d| d.next().is_some()) {
        // The run's directory goes with the error: the reasons are said here.
        let mut reasons: Vec<String> = std::fs::read_dir(rejected_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".reason"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        let total = reasons.len();
        reasons.truncate(3);
        bail!(
            "{total} drop(s) were rejected (in {}); the first reasons:\n{}",
            rejected_dir.display(),
            reasons.join("\n")
        );
    }
    Ok(Burst {
        committed: (committed.len() == n).then_some(last_commit).flatten(),
        drained,
        threads,
    })
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)?.next().is_none())
}

/// Figure 4's rows from the measured bursts and the peak RSS.
pub fn burst_rows(n: usize, bursts: &[Burst], hwm_kib: f64, rss_kib: f64) -> Vec<Row> {
    let mut committed = Samples::default();
    let mut drained = Samples::default();
    let mut rate = Samples::default();
    let mut lagged = false;
    for b in bursts {
        drained.push(b.drained);
        match b.committed {
            Some(c) => {
                committed.push(c);
                rate.push_value(n as f64 / c.as_secs_f64());
            }
            None => lagged = true,
        }
    }
    let mut rows = vec![
        Row::new(
            "4",
            format!("{n} drops at once → all committed (last COMMITTED on Watch); deploys/s"),
        )
        .n(plural(bursts.len(), "burst"))
        .measured(if lagged {
            "Watch stream lagged: see the next row".to_owned()
        } else {
            format!(
                "{} ({}); {:.0} deploys/s ({:.0}–{:.0})",
                secs(committed.median()),
                min_max(&committed),
                rate.median(),
                rate.min(),
                rate.max()
            )
        }),
        Row::new(
            "4",
            format!("{n} drops at once → all deployed and removed (drop dir empty)"),
        )
        .n(plural(bursts.len(), "burst"))
        .measured(format!(
            "{} ({}); {:.0} drops/s",
            secs(drained.median()),
            min_max(&drained),
            n as f64 / drained.median()
        )),
    ];
    let threads = bursts.iter().map(|b| b.threads).max().unwrap_or(0);
    rows.push(
        Row::new(
            "4",
            format!("peak RSS (VmHWM) of the agent through the bursts, {n} targets"),
        )
        .n(1)
        .measured(format!(
            "{} (threads: up to {threads}); RSS after them {}",
            mib(hwm_kib),
            mib(rss_kib)
        )),
    );
    rows
}

/// The median deploys/s of `bursts` of `n` drops (`None` when a Watch
/// stream lagged).
pub fn rate(n: usize, bursts: &[Burst]) -> Option<f64> {
    let mut rate = Samples::default();
    for b in bursts {
        rate.push_value(n as f64 / b.committed?.as_secs_f64());
    }
    (rate.len() > 0).then(|| rate.median())
}

/// Status (every target) from `clients` connections at once, `calls`
/// each, back to back: the row, the samples and one answer as it came
/// over the wire (encoded again: the same bytes).
pub async fn status_latency(
    agent: &Agent,
    n: usize,
    clients: usize,
    calls: usize,
) -> Result<(Row, Samples, Vec<u8>)> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(agent.client().await?);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            let mut took = Vec::with_capacity(calls);
            let mut last = None;
            for _ in 0..calls {
                let t = Instant::now();
                let r = c.status(pb::StatusRequest::default()).await?;
                took.push(t.elapsed());
                if r.get_ref().targets.len() != n {
                    bail!("status listed {} targets", r.get_ref().targets.len());
                }
                last = Some(r.into_inner());
            }
            Ok::<_, anyhow::Error>((took, last))
        });
    }
    let mut all = Samples::default();
    let mut answer = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (took, last) = r??;
        for d in took {
            all.push(d);
        }
        if let Some(last) = last {
            answer = prost::Message::encode_to_vec(&last);
        }
    }
    let row = Row::new(
        "4",
        format!(
            "Status RPC (all {n} targets), {clients} concurrent client{}",
            if clients == 1 { "" } else { "s" }
        ),
    )
    .n(all.len())
    .measured(med_p99(&all));
    Ok((row, all, answer))
}

/// The client's own share of a Status call: decoding `answer` (as the
/// harness's clients do), timed alone. `clients` calls at once on `cores`
/// cores cannot all end sooner than `clients` decodes spread over them,
/// whatever the agent does.
pub fn status_decode_floor(answer: &[u8], n: usize, clients: usize, cores: usize) -> Row {
    let mut one = Samples::default();
    for _ in 0..200 {
        let t = Instant::now();
        let decoded = <pb::StatusResponse as prost::Message>::decode(answer);
        one.push(t.elapsed());
        std::hint::black_box(decoded.ok());
    }
    let bound = one.median() * clients as f64 / cores.max(1) as f64;
    Row::new(
        "4",
        format!(
            "Status answer of {n} targets ({:.0} KiB): decoding it in the client alone; \
             {clients} of those on {cores} cores",
            answer.len() as f64 / 1024.0
        ),
    )
    .n(one.len())
    .measured(format!("{} / {}", secs(one.median()), secs(one.p99())))
    .baseline(format!(
        "{clients} decodes at once end after {}",
        secs(bound)
    ))
}

/// Figure 5: RSS and CPU of the agent (`pid`) left alone for `window`.
/// The RSS goal is `goal_mib` at its highest over the second half of the
/// window: what the agent holds once idle. The first seconds after a burst
/// still hold the burst (its blocking threads wait 10 s for more work
/// before they exit, freed pages go back after a second); the row shows
/// the whole window's highest too.
pub async fn idle(
    pid: u32,
    n: usize,
    window: Duration,
    when: &str,
    goal_mib: f64,
) -> Result<Vec<Row>> {
    let hz = agent::clock_ticks();
    let mut rss = Samples::default();
    let mut settled = Samples::default();
    let t0 = Instant::now();
    let ticks0 = agent::cpu_ticks(pid)?;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    while t0.elapsed() < window {
        every.tick().await;
        let kib = agent::vm_kib(pid, "VmRSS")?;
        rss.push_value(kib);
        if t0.elapsed() >= window / 2 {
            settled.push_value(kib);
        }
    }
    let ticks = agent::cpu_ticks(pid)? - ticks0;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = ticks as f64 / hz / elapsed * 100.0;
    let last = agent::vm_kib(pid, "VmRSS")?;
    // What of it is the agent's own memory, and what mapped files (the
    // binary's and the libraries' pages: clean, shared with the page cache).
    let anon = agent::vm_kib(pid, "RssAnon")?;
    let file = agent::vm_kib(pid, "RssFile")?;
    let idle_max = settled.max().max(last);
    Ok(vec![
        Row::new(
            "5",
            format!("idle RSS (VmRSS), {n} targets, watcher on, {when}"),
        )
        .n(format!("{:.0} s", elapsed))
        .measured(format!(
            "{} (second half's max; end {}: anonymous {}, files {}; whole window's max {})",
            mib(idle_max),
            mib(last),
            mib(anon),
            mib(file),
            mib(rss.max())
        ))
        .goal(format!("< {goal_mib:.0} MiB"), idle_max / 1024.0 < goal_mib),
        Row::new("5", format!("idle CPU (utime+stime), {when}"))
            .n(format!("{:.0} s", elapsed))
            .measured(format!(
                "{cpu:.3} % ({ticks} ticks of 1/{hz:.0} s in {elapsed:.0} s)"
            ))
            .goal("< 0.1 %", cpu < 0.1),
    ])
}

/// `1 burst`, `3 bursts`.
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}
