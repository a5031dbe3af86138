//! `cargo xtask bench`: builds the binaries, starts real agents on temp
//! directories, measures the figures of docs/performance.md and prints
//! them as one table. Every comparison is measured in the same run,
//! interleaved with what it is compared to. Nothing here asserts a time:
//! the goals are printed, met (✓) or not (✗).
//!
//! `--smoke` runs every figure with a few iterations at a small scale,
//! on the debug binaries (`cargo test` has built them already; a release
//! build alone takes minutes on a 2-core runner), so CI keeps the harness
//! working without spending time on numbers nobody reads.

mod agent;
mod deploy;
mod drop;
mod floor;
mod host;
mod pki;
mod scale;
mod stats;
mod verify;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use agent::{Agent, Layout, write_file};
use stats::Row;

/// Command-line options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// A few iterations of every figure at a small scale, on the debug
    /// binaries: checks that the harness works, measures nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Targets (and drops) of the scale and idle figures; figure 7 has ten
    /// times as many, and ten journal runs for each of those.
    #[arg(long)]
    pub targets: Option<usize>,
    /// Seconds the agent is left alone for the idle figure.
    #[arg(long)]
    pub idle: Option<u64>,
    /// Deploys measured in figure 1 (figures 2 and 3 take half).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Use the binaries as they are in the target directory.
    #[arg(long)]
    pub no_build: bool,
    /// Keep the temp directory (configs, agent logs, journals).
    #[arg(long)]
    pub keep: bool,
    /// Measure this `certctl-agent` binary instead of the one built (to
    /// compare two builds: run once with each).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// A second `certctl-agent` binary whose deploys figure 1 measures in
    /// the same loop (before/after comparisons on a noisy machine).
    #[arg(long)]
    pub compare_bin: Option<PathBuf>,
    /// Where the temp directory goes (default: $TMPDIR or /tmp): the
    /// filesystem under test.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only these figures (e.g. `--only 1,3`).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u8>,
    /// Run the agent under this command, for profiling, e.g.
    /// `--wrap "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"`
    /// (the figures then measure the profiler too).
    #[arg(long, allow_hyphen_values = true)]
    pub wrap: Option<String>,
}

/// How much of everything one run does.
struct Plan {
    deploys: usize,
    e2e: usize,
    drops: usize,
    warmup: usize,
    targets: usize,
    bursts: usize,
    clients: usize,
    calls: usize,
    idle: Duration,
    probes: usize,
    backoff: Duration,
    schedule_runs: usize,
    /// Figure 7: targets, journal runs at the restart, Status calls per
    /// client and concurrent clients.
    host_targets: usize,
    journal_runs: usize,
    host_calls: usize,
    host_clients: usize,
    only: Vec<u8>,
    wrap: Vec<String>,
    compare: Option<PathBuf>,
}

impl Plan {
    fn of(o: &Options) -> Plan {
        let mut p = if o.smoke {
            Plan {
                deploys: 5,
                e2e: 3,
                drops: 3,
                warmup: 1,
                targets: 20,
                bursts: 1,
                clients: 5,
                calls: 2,
                idle: Duration::from_secs(3),
                probes: 3,
                backoff: Duration::from_millis(20),
                schedule_runs: 1,
                host_targets: 50,
                journal_runs: 500,
                host_calls: 2,
                host_clients: 2,
                only: Vec::new(),
                wrap: Vec::new(),
                compare: None,
            }
        } else {
            Plan {
                deploys: 300,
                e2e: 100,
                drops: 150,
                warmup: 10,
                targets: 1000,
                bursts: 3,
                clients: 50,
                calls: 20,
                idle: Duration::from_secs(60),
                probes: 50,
                // The configuration's default.
                backoff: Duration::from_secs(1),
                schedule_runs: 3,
                host_targets: 10_000,
                journal_runs: 100_000,
                host_calls: 5,
                host_clients: 10,
                only: Vec::new(),
                wrap: Vec::new(),
                compare: None,
            }
        };
        if let Some(n) = o.iterations {
            p.deploys = n.max(1);
            p.e2e = (n / 2).max(1);
            p.drops = (n / 2).max(1);
        }
        if let Some(t) = o.targets {
            p.targets = t.max(1);
            p.host_targets = 10 * p.targets;
            p.journal_runs = 10 * p.host_targets;
        }
        if let Some(s) = o.idle {
            p.idle = Duration::from_secs(s);
        }
        p.only.clone_from(&o.only);
        p.compare.clone_from(&o.compare_bin);
        p.wrap = o
            .wrap
            .as_deref()
            .map(|w| w.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        p
    }

    /// Whether figure `k` is measured in this run.
    fn wants(&self, k: u8) -> bool {
        self.only.is_empty() || self.only.contains(&k)
    }
}

/// The two binaries under test.
struct Bins {
    agent: PathBuf,
    certctl: PathBuf,
    profile: &'static str,
}

fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// The workspace's target directory, as cargo sees it.
fn target_dir() -> Result<PathBuf> {
    #[allow(clippy::disallowed_methods)] // asking cargo, not deploying
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace())
        .output()
        .context("cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Builds (unless told not to, or, for the smoke run, when `cargo test`
/// already did) and finds the binaries.
fn binaries(o: &Options) -> Result<Bins> {
    let profile = if o.smoke { "debug" } else { "release" };
    let dir = target_dir()?.join(profile);
    let bins = Bins {
        agent: dir.join("certctl-agent"),
        certctl: dir.join("certctl"),
        profile,
    };
    let present = bins.agent.is_file() && bins.certctl.is_file();
    let build = !(o.no_build || o.smoke && present);
    if build {
        let mut args = vec!["build", "-p", "certctl-agent", "-p", "certctl-cli"];
        if !o.smoke {
            args.push("--release");
        }
        eprintln!("==> cargo {}", args.join(" "));
        #[allow(clippy::disallowed_methods)] // building what is measured
        let status = Command::new(cargo())
            .args(&args)
            .current_dir(workspace())
            .status()
            .context("cargo build")?;
        if !status.success() {
            bail!("cargo build failed");
        }
    }
    let mut bins = bins;
    if let Some(agent) = &o.agent_bin {
        bins.agent = std::path::absolute(agent)?;
    }
    for b in [&bins.agent, &bins.certctl] {
        if !b.is_file() {
            bail!("{} is missing: build it (without --no-build)", b.display());
        }
    }
    Ok(bins)
}

/// Runs the benchmark and prints the table.
pub fn run(o: &Options) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::of(o);
    let bins = binaries(o)?;
    let tmp = tempfile::Builder::new()
        .prefix("certctl-bench-")
        .tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))
        .context("create temp dir")?;
    let root = tmp.path().to_owned();
    if o.keep {
        // Left for inspection.
        std::mem::forget(tmp);
        eprintln!("==> keeping {}", root.display());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(figures(&bins, &root, &plan))?;
    println!(
        "certctl bench{} ({} binaries, {} s): {}\n",
        if o.smoke { " --smoke" } else { "" },
        bins.profile,
        started.elapsed().as_secs(),
        machine(&root)
    );
    print!("{}", stats::render(&rows));
    Ok(())
}

/// Cores, kernel, and the filesystem the temp directory is on.
fn machine(dir: &Path) -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    #[allow(clippy::disallowed_methods)] // asking df, not deploying
    let fs = Command::new("df")
        .arg("--output=fstype")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.trim().to_owned()))
        .unwrap_or_default();
    let parent = dir.parent().unwrap_or(dir);
    format!(
        "{cores} cores, Linux {}, {} on {fs}",
        kernel.trim(),
        parent.display()
    )
}

async fn figures(bins: &Bins, root: &Path, plan: &Plan) -> Result<Vec<Row>> {
    // Two issuers, so that the two sets a figure alternates between differ
    // in every file: key, leaf and chain.
    let pki = [pki::Pki::new()?, pki::Pki::new()?];
    let mut rows = Vec::new();
    if [1, 2, 3, 6].iter().any(|k| plan.wants(*k)) {
        rows.extend(one_target_figures(bins, root, plan, &pki).await?);
    }
    if [4, 5].iter().any(|k| plan.wants(*k)) {
        rows.extend(many_target_figures(bins, root, plan, &pki).await?);
    }
    if plan.wants(7) {
        rows.extend(host::figures(&bins.agent, root, plan, &pki).await?);
    }
    // Figure order, whatever order they were measured in.
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

/// Figures 1, 2, 3 and 6: one agent, a target for each.
async fn one_target_figures(
    bins: &Bins,
    root: &Path,
    plan: &Plan,
    pki: &[pki::Pki; 2],
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let sets = [
        pki[0].leaf("deploy.bench.test")?,
        pki[1].leaf("deploy.bench.test")?,
    ];
    let mut main = Layout::new(&root.join("main"))?;
    main.file_target("deploy", "")?;
    main.file_target("e2e", "")?;
    main.file_target("dropbench", "")?;
    let verify_sets = [
        pki[0].leaf(verify::SERVER_NAME)?,
        pki[1].leaf(verify::SERVER_NAME)?,
    ];
    let nginx_bin = verify::nginx_bin().filter(|_| plan.wants(6));
    let nginx = match &nginx_bin {
        Some(bin) => {
            let dir = main.target_dir("verify")?;
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            verify::place(&verify_sets[0], &cert, &key)?;
            let nginx = verify::Nginx::start(bin, &root.join("nginx"), &cert, &key)?;
            main.raw_target(
                "verify",
                &format!(
                    "kind = \"file\"\ncert_path = {cert:?}\nkey_path = {key:?}\n\
                     [target.verify]\nendpoint = {:?}\nserver_name = {:?}\nattempts = 3\n\
                     backoff = {:?}\ntimeout = \"5s\"\n",
                    nginx.endpoint(),
                    verify::SERVER_NAME,
                    format!("{}ms", plan.backoff.as_millis()),
                ),
            );
            Some(nginx)
        }
        None => None,
    };
    let agent = Agent::start(&bins.agent, &main, &plan.wrap)?;

    if plan.wants(1) {
        eprintln!("==> 1: deploy overhead ({} deploys)", plan.deploys);
        let floor_dir = root.join("floor");
        std::fs::create_dir_all(&floor_dir)?;
        let other = match &plan.compare {
            Some(bin) => {
                let mut layout = Layout::new(&root.join("compare"))?;
                layout.file_target("deploy", "")?;
                Some(Agent::start(
                    &std::path::absolute(bin)?,
                    &layout,
                    &plan.wrap,
                )?)
            }
            None => None,
        };
        rows.extend(
            deploy::overhead(
                &agent,
                other.as_ref(),
                "deploy",
                &floor_dir,
                &sets,
                plan.warmup,
                plan.deploys,
            )
            .await?,
        );
    }

    if plan.wants(2) {
        eprintln!(
            "==> 2: certctl deploy vs the shell recipe ({} each)",
            plan.e2e
        );
        let inputs = [root.join("input/a"), root.join("input/b")];
        for (dir, set) in inputs.iter().zip(&sets) {
            std::fs::create_dir_all(dir)?;
            write_file(&dir.join("cert.pem"), set.cert.as_bytes())?;
            write_file(&dir.join("chain.pem"), set.chain.as_bytes())?;
            write_file(&dir.join("key.pem"), set.key.as_bytes())?;
        }
        let recipe_dir = root.join("recipe");
        std::fs::create_dir_all(&recipe_dir)?;
        rows.push(deploy::end_to_end(
            &bins.certctl,
            &main.socket(),
            "e2e",
            &[&inputs[0], &inputs[1]],
            &recipe_dir,
            plan.warmup,
            plan.e2e,
        )?);
    }

    if plan.wants(3) {
        eprintln!("==> 3: drop to deployed ({} drops)", plan.drops);
        let mut events = agent::watch(&agent).await?;
        rows.extend(
            drop::latency(
                &mut events,
                &main.drop_dir(),
                "dropbench",
                &sets,
                plan.warmup,
                plan.drops,
            )
            .await?,
        );
    }

    if plan.wants(6) {
        eprintln!("==> 6: verification");
        match &nginx {
            Some(nginx) => {
                rows.push(
                    verify::probe(
                        &agent,
                        "verify",
                        nginx,
                        &pki[0].root_pem,
                        plan.warmup,
                        plan.probes,
                    )
                    .await?,
                );
                rows.push(
                    verify::schedule(
                        &agent,
                        "verify",
                        &verify_sets[1],
                        3,
                        plan.backoff,
                        plan.schedule_runs,
                    )
                    .await?,
                );
            }
            None => rows.push(Row::skipped(
                "6",
                "verify: probe and retry schedule",
                "nginx is not installed (apt-get install nginx)",
            )),
        }
    }
    drop(agent);
    drop(nginx);
    Ok(rows)
}

/// Figures 4 and 5: one agent with `plan.targets` targets, then the agent
/// given with `--compare-bin` on the same load (its rows follow each of
/// this build's, marked), and the ratios of the two.
async fn many_target_figures(
    bins: &Bins,
    root: &Path,
    plan: &Plan,
    pki: &[pki::Pki; 2],
) -> Result<Vec<Row>> {
    let n = plan.targets;
    eprintln!("==> 4: {n} targets: generating {} certificates", 2 * n);
    let mut round_sets: [Vec<pki::Set>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        for (s, issuer) in round_sets.iter_mut().zip(pki) {
            s.push(issuer.leaf(&format!("{}.bench.test", scale::name(i)))?);
        }
    }
    let mut runs = vec![Scaled::start(&bins.agent, &root.join("scale"), plan, "").await?];
    if let Some(bin) = &plan.compare {
        let bin = std::path::absolute(bin)?;
        runs.push(
            Scaled::start(&bin, &root.join("scale-compare"), plan, " (--compare-bin)").await?,
        );
    }
    // With a compared build both agents run at once and take turns: burst
    // b of one, then burst b of the other, whichever went first going
    // second in the next round. This machine's `/tmp` gets slower from one
    // burst to the next (freed inodes the kernel searches past), so one
    // build's bursts all before the other's would favour the first.
    for b in 0..=plan.bursts {
        let order: Vec<usize> = if b % 2 == 0 {
            (0..runs.len()).collect()
        } else {
            (0..runs.len()).rev().collect()
        };
        for i in order {
            runs[i].burst(b, plan, &round_sets).await?;
        }
    }
    for run in &mut runs {
        run.bursts_done()?;
    }
    // One at a time from here (the other agent is idle meanwhile: no
    // drops, no calls).
    let mut done = Vec::with_capacity(runs.len());
    for run in runs {
        done.push(run.finish(plan).await?);
    }
    let mut done = done.into_iter();
    let this = done.next().context("no agent was measured")?;
    let Some(other) = done.next() else {
        return Ok(this.rows);
    };
    let mut rows = Vec::new();
    // Each row of this build followed by the compared build's.
    let mut theirs = other.rows.into_iter().peekable();
    for row in this.rows {
        let id = row.id;
        rows.push(row);
        if let Some(next) = theirs.next_if(|r| r.id == id) {
            rows.push(next);
        }
    }
    rows.extend(theirs);
    if plan.wants(4) {
        if let (Some(a), Some(b)) = (this.rate, other.rate) {
            rows.push(
                Row::new(
                    "4",
                    format!("{n} drops at once: deploys/s, this build vs --compare-bin"),
                )
                .n(plural_bursts(plan.bursts))
                .measured(format!("{a:.0} deploys/s"))
                .baseline(format!("{b:.0} deploys/s"))
                .ratio(a / b)
                .goal("≥ 2.00×", a / b >= 2.0),
            );
        }
        if let (Some(a), Some(b)) = (this.status_p99, other.status_p99) {
            rows.push(
                Row::new(
                    "4",
                    format!(
                        "Status p99, {} clients, this build vs --compare-bin",
                        plan.clients
                    ),
                )
                .n(plan.clients * plan.calls)
                .measured(stats::secs(a))
                .baseline(stats::secs(b))
                .ratio(a / b),
            );
        }
    }
    Ok(rows)
}

fn plural_bursts(n: usize) -> String {
    if n == 1 {
        "1 burst".to_owned()
    } else {
        format!("{n} bursts")
    }
}

/// What one agent build did under figures 4 and 5.
struct ScaleRun {
    rows: Vec<Row>,
    /// Median deploys/s of the bursts.
    rate: Option<f64>,
    /// p99 of Status under `plan.clients` clients, seconds.
    status_p99: Option<f64>,
}

/// One agent build under figures 4 and 5: started in a layout of its own,
/// then its bursts, then [`Scaled::finish`]; `mark` follows the name of
/// every row.
struct Scaled {
    bin: PathBuf,
    many: Layout,
    agent: Agent,
    /// The Watch stream the bursts follow; gone once they are done.
    events: Option<agent::Arrivals>,
    rejected: PathBuf,
    bursts: Vec<scale::Burst>,
    /// VmHWM and VmRSS (KiB) right after the bursts.
    peak: (f64, f64),
    mark: &'static str,
}

impl Scaled {
    async fn start(bin: &Path, dir: &Path, plan: &Plan, mark: &'static str) -> Result<Scaled> {
        let mut many = Layout::new(dir)?;
        for i in 0..plan.targets {
            many.file_target(&scale::name(i), "")?;
        }
        let agent = Agent::start(bin, &many, &plan.wrap)?;
        let events = agent::watch(&agent).await?;
        Ok(Scaled {
            bin: bin.to_owned(),
            many,
            agent,
            events: Some(events),
            rejected: dir.join("state/rejected"),
            bursts: Vec::new(),
            peak: (f64::NAN, f64::NAN),
            mark,
        })
    }

    /// Burst `b`: 0 is the warm-up, which creates every file (no backups
    /// yet) and is not counted.
    async fn burst(
        &mut self,
        b: usize,
        plan: &Plan,
        round_sets: &[Vec<pki::Set>; 2],
    ) -> Result<()> {
        eprintln!(
            "==> 4{}: burst {b} of {}{}",
            self.mark,
            plan.bursts,
            if b == 0 { " (warm-up)" } else { "" }
        );
        let events = self.events.as_mut().context("the bursts are done")?;
        let r = scale::burst(
            self.agent.pid(),
            events,
            &self.many.drop_dir(),
            &self.rejected,
            &round_sets[b % 2],
        )
        .await?;
        if b > 0 {
            self.bursts.push(r);
        }
        Ok(())
    }

    /// Ends the bursts: the Watch stream goes, and the peak and current
    /// RSS are read for figure 4.
    fn bursts_done(&mut self) -> Result<()> {
        self.events = None;
        let pid = self.agent.pid();
        self.peak = (agent::vm_kib(pid, "VmHWM")?, agent::vm_kib(pid, "VmRSS")?);
        Ok(())
    }

    /// The rest of figures 4 and 5 after the bursts: idle, Status, a
    /// restart and idle again.
    async fn finish(self, plan: &Plan) -> Result<ScaleRun> {
        let Scaled {
            bin,
            many,
            agent,
            bursts,
            peak: (hwm_bursts, rss_bursts),
            mark,
            ..
        } = self;
        let mut rows = Vec::new();
        let n = plan.targets;
        if plan.wants(4) {
            rows.extend(scale::burst_rows(n, &bursts, hwm_bursts, rss_bursts));
        }
        // Idle before the Status load below, whose responses (50 × 1,000
        // targets at once) are a peak of their own.
        if plan.wants(5) {
            eprintln!(
                "==> 5{mark}: idle for {} s after the bursts",
                plan.idle.as_secs()
            );
            rows.extend(scale::idle(agent.pid(), n, plan.idle, "after the bursts", 20.0).await?);
        }
        let mut status_p99 = None;
        if plan.wants(4) {
            eprintln!("==> 4{mark}: Status, 1 client × {} calls", plan.calls);
            let (one_client, _, answer) = scale::status_latency(&agent, n, 1, plan.calls).await?;
            rows.push(one_client);
            eprintln!(
                "==> 4{mark}: Status, {} clients × {} calls",
                plan.clients, plan.calls
            );
            let rss_before = agent::vm_kib(agent.pid(), "VmRSS")?;
            let (status_row, samples, _) =
                scale::status_latency(&agent, n, plan.clients, plan.calls).await?;
            status_p99 = Some(samples.p99());
            rows.push(
                status_row
                    .baseline(format!(
                        "RSS before {}, peak during it {}, after {}",
                        stats::mib(rss_before),
                        stats::mib(agent::vm_kib(agent.pid(), "VmHWM")?),
                        stats::mib(agent::vm_kib(agent.pid(), "VmRSS")?)
                    ))
                    .goal("p99 < 5 ms", samples.p99() < 0.005),
            );
            if mark.is_empty() {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                rows.push(scale::status_decode_floor(&answer, n, plan.clients, cores));
            }
        }
        drop(agent);
        if plan.wants(5) {
            eprintln!(
                "==> 5{mark}: idle for {} s after a restart",
                plan.idle.as_secs()
            );
            let from = std::fs::metadata(many.log()).map_or(0, |m| m.len());
            let agent = Agent::start(&bin, &many, &plan.wrap)?;
            // Idle once started: the leftover sweep runs right after READY.
            // (An agent without that log line is measured from the deadline.)
            let _ = host::sweep_done(&many.log(), from, Duration::from_secs(30));
            rows.extend(scale::idle(agent.pid(), n, plan.idle, "fresh start", 15.0).await?);
        }
        for r in &mut rows {
            r.what.push_str(mark);
            if !mark.is_empty() {
                // Goals are for this build.
                r.goal.clear();
                r.met = None;
            }
        }
        Ok(ScaleRun {
            rate: scale::rate(n, &bursts),
            rows,
            status_p99,
        })
    }
}
