//! A real `certctl-agent` on temp directories: its configuration, its
//! process (stopped by PID when dropped), gRPC clients on its socket, and
//! what `/proc` says about it.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use certctl_proto::agent::v1 as pb;
use certctl_proto::agent::v1::agent_client::AgentClient;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// How long the agent may take to bind its socket (recovery and the
/// start-up sweep of 1,000 targets included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// The layout of one agent: `<root>/{agent.toml, run/agent.sock, state,
/// drop, targets/<name>}`.
pub struct Layout {
    pub root: PathBuf,
    targets: String,
}

impl Layout {
    pub fn new(root: &Path) -> Result<Layout> {
        for sub in ["run", "state", "drop", "targets"] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("create {}", root.join(sub).display()))?;
        }
        Ok(Layout {
            root: root.to_owned(),
            targets: String::new(),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("run/agent.sock")
    }

    pub fn drop_dir(&self) -> PathBuf {
        self.root.join("drop")
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    pub fn log(&self) -> PathBuf {
        self.root.join("agent.log")
    }

    /// `<root>/targets/<name>`, created.
    pub fn target_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.root.join("targets").join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(d)
    }

    /// Adds a `kind = "file"` target with `cert.pem`, `chain.pem` and
    /// `key.pem` in its own directory, plus `extra` TOML; returns the
    /// directory.
    pub fn file_target(&mut self, name: &str, extra: &str) -> Result<PathBuf> {
        let dir = self.target_dir(name)?;
        let _ = write!(
            self.targets,
            "\n[[target]]\nname = {name:?}\nkind = \"file\"\ncert_path = {:?}\nchain_path = {:?}\nkey_path = {:?}\n{extra}\n",
            dir.join("cert.pem"),
            dir.join("chain.pem"),
            dir.join("key.pem"),
        );
        Ok(dir)
    }

    /// Adds a target with a TOML body of its own.
    pub fn raw_target(&mut self, name: &str, body: &str) {
        let _ = write!(self.targets, "\n[[target]]\nname = {name:?}\n{body}\n");
    }

    /// Writes `agent.toml`: the socket, state and drop directories under
    /// the root, `settle` at its default, the targets added so far.
    pub fn write_config(&self) -> Result<PathBuf> {
        let text = format!(
            "# written by `cargo xtask bench`\n[agent]\nsocket = {:?}\nstate_dir = {:?}\ndrop_dir = {:?}\ndeploy_groups = []\nread_groups = []\n{}",
            self.socket(),
            self.root.join("state"),
            self.drop_dir(),
            self.targets
        );
        let path = self.config();
        write_file(&path, text.as_bytes())?;
        Ok(path)
    }
}

/// Writes a whole file (setup only: the harness's own files, not targets).
#[allow(clippy::disallowed_methods)] // harness setup, not a target file
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// A running `certctl-agent`, stopped (SIGTERM, then SIGKILL) and reaped
/// when dropped.
pub struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `bin --config <layout config>` with the default log level,
    /// as a service runs it, and waits until the socket accepts. A
    /// non-empty `wrap` is the command the agent runs under (a profiler).
    pub fn start(bin: &Path, layout: &Layout, wrap: &[String]) -> Result<Agent> {
        let config = layout.write_config()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.log())
            .context("open agent.log")?;
        #[allow(clippy::disallowed_methods)] // the harness starts the agent under test
        let mut cmd = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut agent = Agent {
            child,
            socket: layout.socket(),
            log: layout.log(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited at start ({status}):\n{}",
                    agent.log_tail()
                );
            }
            if std::os::unix::net::UnixStream::connect(&agent.socket).is_ok() {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not bind its socket within {START_TIMEOUT:?}:\n{}",
                    agent.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new connection (one client) on the agent's socket.
    pub async fn client(&self) -> Result<AgentClient<Channel>> {
        certctl_cli::client::connect(&self.socket)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The last lines of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM, a bounded wait, then SIGKILL; reaps the process. The
    /// signals go to the process group the agent was started in (its own),
    /// so an agent run under `--wrap` (strace detaches on SIGTERM) stops
    /// too. While the leader is unreaped its group id cannot be reused.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let group = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every event of a Watch stream, with the instant it arrived here.
pub type Arrivals = mpsc::UnboundedReceiver<(Instant, pb::DeployEvent)>;

/// Opens a Watch stream; returns once the agent has subscribed it (the
/// response headers come after the subscription).
pub async fn watch(agent: &Agent) -> Result<Arrivals> {
    let mut client = agent.client().await?;
    let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if tx.send((Instant::now(), ev)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Calls Deploy and follows the stream to its DONE event; returns the
/// result.
pub async fn deploy(
    client: &mut AgentClient<Channel>,
    req: pb::DeployRequest,
) -> Result<pb::DeployResult> {
    let target = req.target.clone();
    let mut stream = client.deploy(req).await?.into_inner();
    while let Some(ev) = stream.message().await? {
        if let Some(r) = ev.result {
            return Ok(r);
        }
    }
    bail!("the deploy stream of {target} ended before DONE")
}

/// A number field of `/proc/<pid>/status`: `VmHWM` or `VmRSS` in KiB,
/// `Threads`.
pub fn vm_kib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command: state is the 1st, utime the
    // 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, else Linux's 100).
pub fn clock_ticks() -> f64 {
    #[allow(clippy::disallowed_methods)] // a one-off query, not part of a measurement
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
