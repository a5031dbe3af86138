//! A Debian root booted with real systemd as PID 1 in `systemd-nspawn`, for
//! the end-to-end test of the package.
//!
//! - [`rootfs`]: a `debootstrap --variant=minbase` tree of Debian
//!   [`SUITE`] with systemd, dbus, nginx, apache2, haproxy, openssl,
//!   procps, and openssh-server, python3 and python3-apt for Ansible (what
//!   the package and the tests need: nothing is fetched inside later). Built once under `/var/cache/certctl-test/`
//!   (`CERTCTL_TEST_ROOTFS_CACHE` overrides the directory) and reused while
//!   [`RECIPE`] is unchanged. It is built beside the cache and renamed into
//!   place, so an interrupted build is never taken for a cache.
//!   `CERTCTL_TEST_DEBIAN_MIRROR` overrides the mirror.
//! - [`Machine::boot`]: copies the cached tree into a temp dir and boots it
//!   with `systemd-nspawn -b --register=no --keep-unit --private-network`
//!   (no host systemd or machined is needed; the container's loopback is
//!   its own, so its nginx can use port 443). [`Machine::boot_with`] takes
//!   [`BootOptions`]: another machine name, and the host's network instead
//!   of a private one (several containers side by side, each server on its
//!   own loopback port, reached from the test directly). With the unified cgroup
//!   hierarchy of a Debian 12 host where the host offers it. nspawn is a child of the test
//!   in a [`ChildGuard`]: dropping the machine powers it off from inside,
//!   then stops nspawn by PID (`SIGTERM`, which nspawn turns into a
//!   shutdown request, then `SIGKILL`), also when the test panics. Each
//!   nspawn starts in a cgroup of its own (removed after it), so containers
//!   booted side by side do not share one.
//! - [`Machine::sh`]: runs a shell command inside, through `nsenter` into
//!   every namespace of the container's PID 1, with a clean environment and
//!   a deadline. This is the command channel: no machine registration, no
//!   D-Bus on the host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{BoundedOutput, ChildGuard, read_lossy, run_bounded, tail};

/// The Debian release booted.
pub const SUITE: &str = "bookworm";
/// Packages added to the minimal base. Changing this list rebuilds the cache.
/// openssh-server, python3 and python3-apt: the fleet test manages the
/// containers with Ansible over SSH (its apt module needs python3-apt).
pub const PACKAGES: &str = "systemd,systemd-sysv,dbus,nginx,openssl,procps,apache2,haproxy,\
                            openssh-server,python3,python3-apt";
/// What a cached tree was built from; a cache with another recipe is rebuilt.
pub const RECIPE: &str = "certctl-test rootfs v3: debootstrap --variant=minbase";
/// The cache's directory name: a new recipe gets a new one, so trees of
/// both recipes can be cached side by side (branches being tested at once).
const CACHE_NAME: &str = "rootfs-bookworm-v3";
/// How long the container may take to finish booting.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default mirror for debootstrap.
const MIRROR: &str = "http://deb.debian.org/debian";
/// The file in a finished tree that records its recipe.
const STAMP: &str = ".certctl-test-rootfs";
/// PATH inside the container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the end-to-end test cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("booting a container needs root".to_owned());
    }
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ] {
        if super::find_program(
            program,
            &[
                &format!("/usr/bin/{program}"),
                &format!("/usr/sbin/{program}"),
            ],
        )
        .is_none()
        {
            return Some(format!(
                "{program} is not installed (apt-get install --no-install-recommends {package})"
            ));
        }
    }
    None
}

/// The cache directory of the tree.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("CERTCTL_TEST_ROOTFS_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/certctl-test"), PathBuf::from);
    base.join(CACHE_NAME)
}

/// The cached tree, built first when missing or stale; also says whether it
/// was built now and how long that took.
pub fn rootfs() -> (PathBuf, Option<Duration>) {
    let cache = cache_dir();
    let want = format!("{RECIPE} --include={PACKAGES} {SUITE}\n");
    if read_lossy(&cache.join(STAMP)) == want {
        return (cache, None);
    }
    let started = Instant::now();
    let parent = cache.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).expect("create the rootfs cache dir");
    let building = parent.join(format!(".rootfs-{SUITE}.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let mirror = std::env::var("CERTCTL_TEST_DEBIAN_MIRROR").unwrap_or_else(|_| MIRROR.to_owned());
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&building)
        .arg(&mirror);
    let out = run_bounded(&mut cmd, Duration::from_secs(900));
    if out.code != 0 {
        let _ = std::fs::remove_dir_all(&building);
        panic!(
            "debootstrap of {SUITE} from {mirror} failed (exit {}): it needs the Debian mirror \
             (set CERTCTL_TEST_DEBIAN_MIRROR for another one)\n{}\n{}",
            out.code,
            tail(&out.stdout, 40),
            tail(&out.stderr, 40)
        );
    }
    // Boot quietly: no login prompts on the console nspawn does not have.
    let _ = std::fs::remove_file(
        building.join("etc/systemd/system/getty.target.wants/getty@tty1.service"),
    );
    std::fs::write(building.join("etc/hostname"), "certctl-test\n").expect("write hostname");
    std::fs::write(building.join(STAMP), &want).expect("write the rootfs stamp");
    if cache.exists() {
        std::fs::remove_dir_all(&cache).expect("remove the stale rootfs cache");
    }
    std::fs::rename(&building, &cache).expect("move the new rootfs into the cache");
    (cache, Some(started.elapsed()))
}

// === impl Machine ===

/// How [`Machine::boot_with`] boots a container.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// `--machine=`: the container's name (and hostname).
    pub name: String,
    /// `--private-network` (the default): the container has its own
    /// loopback only. Off, it shares the host's network: every server in it
    /// must then listen on a port of its own on 127.0.0.1.
    pub private_network: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            name: "certctl-test".to_owned(),
            private_network: true,
        }
    }
}

/// A booted container; powered off and removed when dropped.
pub struct Machine {
    nspawn: ChildGuard,
    leader: u32,
    /// The container's root on the host (a temp copy of the cache).
    root: tempfile::TempDir,
    log: PathBuf,
    /// The cgroup nspawn was started in, removed after it exits.
    cgroup: Option<PathBuf>,
}

impl Machine {
    /// Copies `template` and boots it; `prepare` may write into the copy
    /// (the container's `/`) before the boot. Returns the machine and how
    /// long copying and booting took.
    pub fn boot(template: &Path, prepare: impl FnOnce(&Path)) -> (Machine, Duration, Duration) {
        Self::boot_with(template, &BootOptions::default(), prepare)
    }

    /// [`Self::boot`] with other [`BootOptions`].
    pub fn boot_with(
        template: &Path,
        options: &BootOptions,
        prepare: impl FnOnce(&Path),
    ) -> (Machine, Duration, Duration) {
        let started = Instant::now();
        // Beside the cache: same filesystem, so the copy is quick.
        let root = tempfile::Builder::new()
            .prefix("certctl-nspawn-")
            .tempdir_in(template.parent().expect("template has a parent"))
            .expect("create the container root");
        let mut cp = Command::new("cp");
        cp.arg("-a")
            .arg(format!("{}/.", template.display()))
            .arg(root.path());
        let out = run_bounded(&mut cp, Duration::from_secs(300));
        assert_eq!(out.code, 0, "copying the rootfs failed: {}", out.stderr);
        prepare(root.path());
        let copied = started.elapsed();

        let started = Instant::now();
        let log = root
            .path()
            .parent()
            .expect("root has a parent")
            .join(format!(
                "{}.log",
                root.path().file_name().unwrap().to_string_lossy()
            ));
        let file = std::fs::File::create(&log).expect("create the nspawn log");
        // With --keep-unit nspawn splits the cgroup it runs in into
        // `payload` (the container) and `supervisor`: two containers started
        // from one cgroup would share one `payload`, and their systemds
        // trip over each other's units (status=219/CGROUP). Each starts
        // from a cgroup of its own, made by the shell that execs nspawn.
        let cgroup = own_cgroup(&options.name);
        let mut cmd = match &cgroup {
            Some(dir) => {
                let mut sh = Command::new("/bin/sh");
                sh.args([
                    "-c",
                    "mkdir \"$0\" && echo $$ > \"$0/cgroup.procs\" \
                     || echo \"support: systemd-nspawn stays in the test's cgroup\" >&2; \
                     exec systemd-nspawn \"$@\"",
                ])
                .arg(dir);
                sh
            }
            None => Command::new("systemd-nspawn"),
        };
        cmd.arg("--directory")
            .arg(root.path())
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                "--quiet",
            ])
            .arg(format!("--machine={}", options.name))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file);
        if options.private_network {
            cmd.arg("--private-network");
        }
        // Debian 12 hosts use the unified cgroup hierarchy; on a hybrid host
        // (cgroup2 mounted beside the v1 controllers) boot the container
        // unified too, as production would be.
        if Path::new("/sys/fs/cgroup/unified").is_dir() {
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        let mut nspawn = ChildGuard::spawn(
            "systemd-nspawn",
            &mut cmd,
            Signal::SIGTERM,
            Duration::from_secs(30),
        )
        .dump_log_on_panic(&log);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let leader = loop {
            if let Some(status) = nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited before the container's systemd started ({status}):\n{}",
                    read_lossy(&log)
                );
            }
            if let Some(pid) = container_init(nspawn.pid()) {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "no container init after {BOOT_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let machine = Machine {
            nspawn,
            leader,
            root,
            log,
            cgroup,
        };
        // Nothing (no shell yet) or "offline" until the container's systemd
        // answers on its socket.
        let state = loop {
            let out = machine.sh_timeout("systemctl is-system-running --wait", BOOT_TIMEOUT);
            let state = out.stdout.trim().to_owned();
            if !matches!(state.as_str(), "" | "offline") {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "the container's systemd did not answer within {BOOT_TIMEOUT:?}: {state:?} {}",
                out.stderr
            );
            thread::sleep(Duration::from_millis(50));
        };
        if state != "running" {
            let failed = machine.sh("systemctl --failed --no-legend --plain");
            let journal = machine.sh(
                "for u in $(systemctl --failed --no-legend --plain | cut -d' ' -f1); do \
                 journalctl --no-pager -b -n 20 -u \"$u\"; done 2>&1",
            );
            panic!(
                "the container booted to state {state:?}, not \"running\"; failed units:\n{}\n{}",
                failed.stdout, journal.stdout
            );
        }
        (machine, copied, started.elapsed())
    }

    /// The container's `/` on the host.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Runs `script` with `/bin/sh -c` inside the container (60 s limit).
    pub fn sh(&self, script: &str) -> BoundedOutput {
        self.sh_timeout(script, Duration::from_secs(60))
    }

    /// [`Self::sh`] with another limit.
    pub fn sh_timeout(&self, script: &str, timeout: Duration) -> BoundedOutput {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target")
            .arg(self.leader.to_string())
            .args(["--all", "--", "/usr/bin/env", "-i"])
            .arg(format!("PATH={PATH}"))
            .args([
                "LANG=C.UTF-8",
                "HOME=/root",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
            ])
            .args(["/bin/sh", "-c", script]);
        run_bounded(&mut cmd, timeout)
    }

    /// [`Self::sh`], panicking with the output and the agent's journal
    /// unless it exits 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if out.code != 0 {
            panic!(
                "in the container, `{script}` exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                out.code,
                out.stdout,
                out.stderr,
                self.diagnostics()
            );
        }
        out.stdout
    }

    /// Polls `script` until it exits 0 (bounded); returns its last stdout.
    #[track_caller]
    pub fn until_ok(&self, what: &str, timeout: Duration, script: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.sh(script);
            if out.code == 0 {
                return out.stdout;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: `{script}` still exits {} after {timeout:?}\n{}\n{}\n{}",
                    out.code,
                    out.stdout,
                    out.stderr,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's units and journal, for failure messages.
    pub fn diagnostics(&self) -> String {
        let out = self.sh(
            "systemctl status --no-pager --lines=0 certctl-agent.socket certctl-agent.service 2>&1; \
             journalctl --no-pager -n 80 -u certctl-agent.service 2>&1",
        );
        format!("--- container: units and journal ---\n{}", out.stdout)
    }

    /// Powers the container off from inside and waits for nspawn to exit.
    pub fn power_off(&mut self) {
        let _ = self.sh("systemctl poweroff --no-block");
        if self.nspawn.wait_timeout(Duration::from_secs(30)).is_none() {
            let _ = writeln!(
                std::io::stderr(),
                "support: the container did not power off within 30s; stopping systemd-nspawn"
            );
        }
        self.nspawn.stop();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_off();
        if let Some(dir) = &self.cgroup {
            remove_cgroup(dir);
        }
        if thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "support: systemd-nspawn output kept in {}",
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A new cgroup directory for one container, beside the test's own in the
/// unified hierarchy (`/sys/fs/cgroup/unified` on a hybrid host); `None`
/// on a host without one.
fn own_cgroup(name: &str) -> Option<PathBuf> {
    let base = if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        PathBuf::from("/sys/fs/cgroup/unified")
    } else if Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        return None;
    };
    let own = read_lossy(Path::new("/proc/self/cgroup"))
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))?;
    let parent = base.join(own.trim_start_matches('/'));
    Some(parent.join(super::unique_token(&format!("certctl-test-{name}-"))))
}

/// Removes a cgroup directory and the ones systemd-nspawn and the container
/// left under it, deepest first (only empty cgroups can be removed).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The host PID of the container's init: the child of `nspawn` that is PID 1
/// of its own PID namespace.
fn container_init(nspawn: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let status = read_lossy(&entry.path().join("status"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_owned)
        };
        let is_child = field("PPid:").and_then(|p| p.parse::<u32>().ok()) == Some(nspawn);
        let ns_pids = field("NSpid:").unwrap_or_default();
        let mut ids = ns_pids.split_whitespace();
        let pid1_inside = ids.next().is_some() && ids.next_back() == Some("1");
        // Until it execs systemd it is still nspawn's setup code.
        let is_systemd = read_lossy(&entry.path().join("comm")).trim() == "systemd";
        if is_child && pid1_inside && is_systemd {
            return Some(pid);
        }
    }
    None
}
