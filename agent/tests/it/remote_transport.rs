//! The SSH transport (`certctl_agent::remote`) against a real OpenSSH
//! server on this machine (`support::sshd`): the real `ssh` client, the
//! real `sftp-server`. Since the server runs here, every remote file
//! operation is checked against the local filesystem directly.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use certctl_agent::remote::{
    EXT_FSYNC, EXT_HARDLINK, EXT_POSIX_RENAME, OUTPUT_LIMIT, Pool, RemoteError, Session,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::sshd::{Sshd, sshd_available};

fn start() -> Option<Sshd> {
    sshd_available().then(Sshd::start)
}

fn connect(sshd: &Sshd) -> Session {
    Session::connect(&sshd.endpoint(), &sshd.control_dir())
        .unwrap_or_else(|e| panic!("connect: {e}\nsshd log:\n{}", sshd.log()))
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// PIDs whose command line has the argument `arg`.
fn processes_with_arg(arg: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|a| a == arg.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// Proves nothing got past key exchange: no login, no channel, no file.
fn assert_nothing_happened(sshd: &Sshd) {
    let log = sshd.log();
    assert!(
        !log.contains("Accepted publickey"),
        "a login happened:\n{log}"
    );
    assert!(
        !log.contains("subsystem request"),
        "a channel was opened:\n{log}"
    );
    assert_eq!(
        std::fs::read_dir(sshd.account_dir()).unwrap().count(),
        0,
        "something was written"
    );
}

#[test]
fn remote_transport_pool_reuses_the_master_and_reconnects_when_it_dies() {
    let Some(sshd) = start() else { return };
    let pool = Pool::new(sshd.control_dir());
    let ep = sshd.endpoint();
    let a = pool
        .session(&ep)
        .unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()));
    let b = pool.session(&ep).unwrap();
    assert!(
        Arc::ptr_eq(&a, &b),
        "second session() made a new connection"
    );
    assert!(a.is_alive());
    let first = a.master_pid();
    // Both commands and sftp ride on the one master: one login only.
    assert!(
        a.run(&argv(&["true"]), Duration::from_secs(10))
            .unwrap()
            .success()
    );
    a.sftp().unwrap().lstat(Path::new("/")).unwrap();
    assert_eq!(
        sshd.log().matches("Accepted publickey").count(),
        1,
        "{}",
        sshd.log()
    );
    drop((a, b));

    kill(
        Pid::from_raw(i32::try_from(first).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let c = pool.session(&ep).unwrap();
    assert_ne!(c.master_pid(), first, "a dead master was handed out");
    assert!(c.is_alive());
    assert!(
        c.run(&argv(&["true"]), Duration::from_secs(10))
            .unwrap()
            .success()
    );
    assert_eq!(sshd.log().matches("Accepted publickey").count(), 2);

    // Closing removes the control socket.
    drop(c);
    pool.close_idle();
    assert_eq!(std::fs::read_dir(sshd.control_dir()).unwrap().count(), 0);
}

#[test]
fn remote_transport_unknown_host_key_is_refused_with_its_fingerprint() {
    let Some(sshd) = start() else { return };
    let mut ep = sshd.endpoint();
    ep.known_hosts = sshd.empty_known_hosts();
    let started = Instant::now();
    let err = Session::connect(&ep, &sshd.control_dir()).unwrap_err();
    let msg = err.to_string();
    match &err {
        RemoteError::HostKeyUnknown {
            host,
            port,
            fingerprint,
        } => {
            assert_eq!(host, "127.0.0.1");
            assert_eq!(*port, sshd.port());
            assert_eq!(*fingerprint, sshd.host_fingerprint(), "{msg}");
        }
        other => panic!("not HostKeyUnknown: {other:?}"),
    }
    assert!(msg.contains(&sshd.host_fingerprint()), "{msg}");
    assert!(msg.contains("known_hosts"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_nothing_happened(&sshd);
    // The file stays as it was: the key was not learnt.
    assert_eq!(
        std::fs::read_to_string(sshd.empty_known_hosts()).unwrap(),
        ""
    );
}

#[test]
fn remote_transport_changed_host_key_is_refused_with_its_fingerprint() {
    let Some(sshd) = start() else { return };
    let mut ep = sshd.endpoint();
    ep.known_hosts = sshd.wrong_known_hosts();
    let before = std::fs::read_to_string(&ep.known_hosts).unwrap();
    let err = Session::connect(&ep, &sshd.control_dir()).unwrap_err();
    match &err {
        RemoteError::HostKeyChanged { fingerprint, .. } => {
            assert_eq!(*fingerprint, sshd.host_fingerprint(), "{err}");
        }
        other => panic!("not HostKeyChanged: {other:?}"),
    }
    assert!(err.to_string().contains(&sshd.host_fingerprint()));
    assert_nothing_happened(&sshd);
    assert_eq!(std::fs::read_to_string(&ep.known_hosts).unwrap(), before);
}

#[test]
fn remote_transport_wrong_client_key_and_closed_port_fail_clearly() {
    let Some(sshd) = start() else { return };
    let mut ep = sshd.endpoint();
    ep.identity_file = sshd.path().join("other_ed25519");
    let err = Session::connect(&ep, &sshd.control_dir()).unwrap_err();
    assert!(matches!(err, RemoteError::AuthFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("authorized_keys"), "{err}");

    let mut ep = sshd.endpoint();
    ep.port = crate::support::free_port();
    let err = Session::connect(&ep, &sshd.control_dir()).unwrap_err();
    assert!(matches!(err, RemoteError::Unreachable(_)), "{err:?}");
}

#[test]
fn remote_transport_sftp_file_operations_match_the_local_filesystem() {
    let Some(sshd) = start() else { return };
    let s = connect(&sshd);
    let mut sftp = s.sftp().unwrap();
    for ext in [EXT_FSYNC, EXT_POSIX_RENAME, EXT_HARDLINK] {
        assert!(
            sftp.extensions().iter().any(|(n, _)| n == ext),
            "{ext} missing in {:?}",
            sftp.extensions()
        );
    }
    let dir = sshd.account_dir();
    let target = dir.join("cert.pem");
    let tmp = dir.join(".certctl-tmp-cert.pem");
    std::fs::write(&target, b"old").unwrap();
    nix::unistd::chown(&target, Some(sshd.uid().into()), Some(sshd.gid().into())).unwrap();

    // The mode is there before any byte, exactly (0664 survives a 022 umask).
    for mode in [0o640, 0o664, 0o600] {
        let h = sftp.create_excl(&tmp, mode).unwrap();
        let m = std::fs::symlink_metadata(&tmp).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{mode:o}");
        assert_eq!(m.len(), 0);
        assert_eq!(m.uid(), sshd.uid());
        sftp.close(h).unwrap();
        if mode != 0o600 {
            sftp.remove(&tmp).unwrap();
        }
    }
    // Exclusive: an existing file is AlreadyExists.
    let e = sftp.create_excl(&tmp, 0o600).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    sftp.remove(&tmp).unwrap();

    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let h = sftp.create_excl(&tmp, 0o640).unwrap();
    // Owner: the account's own group is allowed, another owner is not.
    sftp.fsetstat(&h, None, Some(sshd.gid()), None).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        let e = sftp.fsetstat(&h, Some(0), Some(0), None).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
    sftp.write_all(&h, &body).unwrap();
    sftp.fsync(&h).unwrap();
    sftp.close(h).unwrap();
    assert_eq!(std::fs::read(&tmp).unwrap(), body);
    let a = sftp.lstat(&tmp).unwrap();
    assert!(a.is_file());
    assert_eq!((a.size, a.perm(), a.uid), (100_000, 0o640, sshd.uid()));

    // Backup by hard link, then the atomic replace over the existing file.
    let backup = dir.join("cert.pem.bak");
    sftp.hardlink(&target, &backup).unwrap();
    assert_eq!(
        std::fs::metadata(&target).unwrap().ino(),
        std::fs::metadata(&backup).unwrap().ino()
    );
    sftp.posix_rename(&tmp, &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), body);
    assert_eq!(std::fs::read(&backup).unwrap(), b"old");
    assert!(!tmp.exists());
    sftp.fsync_dir(&dir).unwrap();

    // Reading back, bounded.
    let h = sftp.open_read(&target).unwrap();
    assert_eq!(sftp.read_to_end(&h, 1 << 20).unwrap(), body);
    sftp.close(h).unwrap();
    let h = sftp.open_read(&target).unwrap();
    let e = sftp.read_to_end(&h, 1000).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    sftp.close(h).unwrap();

    // Directories and links.
    let sub = dir.join("sub");
    sftp.mkdir(&sub, 0o750).unwrap();
    assert!(std::fs::metadata(&sub).unwrap().is_dir());
    assert!(sftp.stat(&sub).unwrap().is_dir());
    sftp.symlink(Path::new("cert.pem"), &dir.join("live.pem"))
        .unwrap();
    assert_eq!(
        std::fs::read_link(dir.join("live.pem")).unwrap(),
        Path::new("cert.pem")
    );
    assert_eq!(
        sftp.read_link(&dir.join("live.pem")).unwrap(),
        Path::new("cert.pem")
    );
    assert!(sftp.lstat(&dir.join("live.pem")).unwrap().is_symlink());
    assert!(sftp.stat(&dir.join("live.pem")).unwrap().is_file());
    let mut names: Vec<String> = sftp
        .read_dir(&dir)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n.into_string().unwrap())
        .collect();
    names.sort();
    let mut local: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    local.sort();
    assert_eq!(names, local);
    assert_eq!(names, ["cert.pem", "cert.pem.bak", "live.pem", "sub"]);

    // Errors keep their kind.
    let missing = dir.join("missing");
    assert_eq!(
        sftp.lstat(&missing).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert_eq!(
        sftp.remove(&missing).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    let e = sftp.create_excl(Path::new("/root/x"), 0o600).unwrap_err();
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
    assert!(
        sftp.rmdir(&dir).is_err(),
        "a non-empty directory was removed"
    );

    sftp.remove(&dir.join("live.pem")).unwrap();
    sftp.remove(&backup).unwrap();
    sftp.rmdir(&sub).unwrap();
    assert!(!sub.exists() && !backup.exists());
    // The channel is still good after all those errors.
    assert!(sftp.lstat(&target).unwrap().is_file());
}

#[test]
fn remote_transport_run_round_trips_hostile_argv_with_codes_timeouts_and_bounds() {
    let Some(sshd) = start() else { return };
    let s = connect(&sshd);
    let hostile = [
        "a b",
        "'",
        "\"",
        "$(touch pwned)",
        "`touch pwned2`",
        "line\nbreak",
        "",
        "*",
        "; exit 7",
        "\\",
        "$HOME",
    ];
    let mut cmd = argv(&["printf", "%s\\0"]);
    cmd.extend(argv(&hostile));
    let out = s.run(&cmd, Duration::from_secs(10)).unwrap();
    assert!(out.success(), "{out:?}");
    let got: Vec<&str> = out.stdout.split('\0').collect();
    assert_eq!(&got[..got.len() - 1], &hostile[..]);
    assert!(!sshd.account_dir().join("pwned").exists());

    // Exit codes and stderr.
    let out = s
        .run(
            &argv(&["sh", "-c", "echo oops >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(out.code, Some(3));
    assert_eq!(out.stderr, "oops\n");
    // Runs as the account.
    let out = s
        .run(&argv(&["id", "-un"]), Duration::from_secs(10))
        .unwrap();
    assert_eq!(out.stdout.trim(), sshd.user());

    // Output is bounded.
    let out = s
        .run(
            &argv(&["sh", "-c", "yes 0123456789 | head -c 1000000"]),
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(out.success());
    assert!(
        out.stdout.len() < OUTPUT_LIMIT + 100,
        "{}",
        out.stdout.len()
    );
    assert!(out.stdout.contains("bytes dropped"));

    // The timeout stops the local ssh and kills the command's process
    // group on the remote host; the session stays usable.
    let token = crate::support::unique_token("certctl-hung-");
    let started = Instant::now();
    let err = s
        .run(
            &argv(&["sh", "-c", "sleep 30 & sleep 30", &token]),
            Duration::from_millis(800),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RemoteError::CommandTimeout {
                remote_stopped: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    crate::support::wait_until(Duration::from_secs(5), "the hung command is killed", || {
        processes_with_arg(&token).is_empty()
    });
    assert!(s.is_alive());
    assert!(
        s.run(&argv(&["true"]), Duration::from_secs(10))
            .unwrap()
            .success()
    );

    // A NUL cannot be passed: refused before anything runs.
    assert!(
        s.run(&argv(&["echo", "a\0b"]), Duration::from_secs(10))
            .is_err()
    );
}

#[test]
fn remote_transport_stalled_sftp_server_times_out() {
    let Some(sshd) = start() else { return };
    let s = connect(&sshd);
    let mut sftp = s.sftp().unwrap();
    sftp.set_timeout(Duration::from_secs(1));
    sftp.lstat(&sshd.account_dir()).unwrap();
    let servers = sshd.descendants_named("/usr/lib/openssh/sftp-server");
    assert_eq!(servers.len(), 1, "{servers:?}");
    let pid = Pid::from_raw(i32::try_from(servers[0]).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let e = sftp.lstat(&sshd.account_dir()).unwrap_err();
    let took = started.elapsed();
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Unusable from then on (half an answer may be in the pipe).
    assert_eq!(
        sftp.lstat(&sshd.account_dir()).unwrap_err().kind(),
        std::io::ErrorKind::BrokenPipe
    );
    // A new channel works.
    drop(sftp);
    s.sftp().unwrap().lstat(&sshd.account_dir()).unwrap();
}

/// The system calls traced on the server side.
const TRACED: &str = "openat,fchmod,fchown,write,fsync,fdatasync,rename,renameat,renameat2,link,linkat,unlink,unlinkat,close";

/// The first line at or after `from` that contains all of `parts`.
fn find(lines: &[&str], from: usize, parts: &[&str]) -> Option<usize> {
    (from..lines.len()).find(|&i| parts.iter().all(|p| lines[i].contains(p)))
}

/// The return value at the end of a trace line (`... = 3`).
fn ret(line: &str) -> String {
    line.rsplit("= ").next().unwrap().trim().to_owned()
}

#[test]
fn remote_transport_server_side_order_is_mode_write_fsync_rename_fsync_dir() {
    let Some(sshd) = start() else { return };
    let Some(strace) = crate::support::find_program("strace", &["/usr/bin/strace"]) else {
        panic!("strace is not installed: apt-get install strace");
    };
    if !nix::unistd::Uid::effective().is_root() {
        // sftp-server makes itself undumpable: only root's strace can read
        // the paths of its system calls.
        let _ = writeln!(std::io::stderr(), "SKIPPED: tracing sftp-server needs root");
        return;
    }
    let s = connect(&sshd);
    let mut sftp = s.sftp().unwrap();
    sftp.lstat(Path::new("/")).unwrap();
    let servers = sshd.descendants_named("/usr/lib/openssh/sftp-server");
    assert_eq!(servers.len(), 1, "{servers:?}");
    let trace_path = sshd.path().join("sftp.trace");
    let mut cmd = std::process::Command::new(strace);
    cmd.args(["-qq", "-e", &format!("trace={TRACED}"), "-o"])
        .arg(&trace_path)
        .args(["-p", &servers[0].to_string()])
        .stdin(std::process::Stdio::null());
    let mut tracer = crate::support::ChildGuard::spawn(
        "strace",
        &mut cmd,
        Signal::SIGINT,
        Duration::from_secs(5),
    );
    crate::support::wait_until(Duration::from_secs(10), "strace attached", || {
        std::fs::read_to_string(format!("/proc/{}/status", servers[0]))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    });
    let dir = sshd.account_dir();
    let (tmp, target, backup) = (
        dir.join(".certctl-tmp-key.pem"),
        dir.join("key.pem"),
        dir.join("key.pem.bak"),
    );
    std::fs::write(&target, b"old").unwrap();
    nix::unistd::chown(&target, Some(sshd.uid().into()), Some(sshd.gid().into())).unwrap();
    // What a deploy does, in its order.
    let body = vec![7u8; 70_000];
    let h = sftp.create_excl(&tmp, 0o640).unwrap();
    sftp.fsetstat(&h, None, Some(sshd.gid()), None).unwrap();
    sftp.write_all(&h, &body).unwrap();
    sftp.fsync(&h).unwrap();
    sftp.close(h).unwrap();
    sftp.hardlink(&target, &backup).unwrap();
    sftp.posix_rename(&tmp, &target).unwrap();
    sftp.fsync_dir(&dir).unwrap();
    drop(sftp);
    // The server exits with its channel; strace then ends and flushes.
    assert!(
        tracer.wait_timeout(Duration::from_secs(10)).is_some(),
        "strace did not end"
    );
    let (tmp, target, backup, dir) = (
        tmp.display().to_string(),
        target.display().to_string(),
        backup.display().to_string(),
        dir.display().to_string(),
    );

    let trace = std::fs::read_to_string(&trace_path).unwrap();
    // strace pads before ` = `: one space between words.
    let normal: Vec<String> = trace
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let lines: Vec<&str> = normal.iter().map(String::as_str).collect();
    let why = || trace.clone();
    let create = find(
        &lines,
        0,
        &[&format!(
            "openat(AT_FDCWD, \"{tmp}\", O_WRONLY|O_CREAT|O_EXCL, 0640) = "
        )],
    )
    .unwrap_or_else(|| panic!("no exclusive create with the mode:\n{}", why()));
    let fd = ret(lines[create]);
    let chmod = find(&lines, create, &[&format!("fchmod({fd}, 0640) = 0")]).unwrap();
    let close = find(&lines, create, &[&format!("close({fd}) = 0")]).unwrap();
    let writes: Vec<usize> = (create..close)
        .filter(|&i| lines[i].contains(&format!("write({fd}, ")))
        .collect();
    assert!(writes.len() >= 3, "70 KB in 32 KiB chunks:\n{}", why());
    let fsync = find(&lines, create, &[&format!("fsync({fd}) = 0")]).unwrap();
    let link = find(
        &lines,
        0,
        &[&format!("\"{target}\", "), &format!("\"{backup}\""), "link"],
    )
    .unwrap_or_else(|| panic!("no hard link:\n{}", why()));
    let rename = find(
        &lines,
        0,
        &[
            "rename",
            &format!("\"{tmp}\", "),
            &format!("\"{target}\") = 0"),
        ],
    )
    .unwrap_or_else(|| panic!("no rename:\n{}", why()));
    let dir_open = find(
        &lines,
        rename,
        &[&format!("openat(AT_FDCWD, \"{dir}\", O_RDONLY) = ")],
    )
    .unwrap();
    let dir_fd = ret(lines[dir_open]);
    let dir_fsync = find(&lines, dir_open, &[&format!("fsync({dir_fd}) = 0")])
        .unwrap_or_else(|| panic!("no fsync of the directory:\n{}", why()));

    // Mode before the first byte, every byte before the fsync, the fsync
    // and the backup before the rename, the directory fsync after it.
    assert!(chmod < writes[0], "{}", why());
    assert!(
        *writes.last().unwrap() < fsync && fsync < close,
        "{}",
        why()
    );
    assert!(fsync < rename && link < rename, "{}", why());
    assert!(rename < dir_open && dir_open < dir_fsync, "{}", why());
    // No plain SSH_FXP_RENAME (link + unlink of the temp) anywhere.
    assert!(
        find(&lines, 0, &["unlink", &format!("\"{tmp}\"")]).is_none(),
        "{}",
        why()
    );
}

#[test]
fn remote_transport_connect_to_a_silent_host_is_bounded() {
    let Some(sshd) = start() else { return };
    // Connections complete in the backlog, and nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ep = sshd.endpoint();
    ep.port = silent.local_addr().unwrap().port();
    ep.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = Session::connect(&ep, &sshd.control_dir()).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, RemoteError::ConnectTimeout { .. }), "{err:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(err.to_string().contains("reachable"), "{err}");
}

#[test]
fn remote_transport_a_new_pool_ends_masters_left_by_a_dead_agent() {
    let Some(sshd) = start() else { return };
    let s = connect(&sshd);
    let mut done = std::process::Command::new("true").spawn().unwrap();
    done.wait().unwrap();
    let dead = done.id();
    // The socket as a crashed agent process (`dead`) would have left it.
    let sockets: Vec<_> = std::fs::read_dir(sshd.control_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let name = sockets[0].file_name().unwrap().to_str().unwrap().to_owned();
    let hash = name.split('-').next().unwrap();
    let stale = sshd.control_dir().join(format!("{hash}-{dead}-0"));
    std::fs::rename(&sockets[0], &stale).unwrap();
    let master = s.master_pid();
    assert!(crate::support::process::pid_alive(master));

    let _pool = Pool::new(sshd.control_dir());
    assert!(!stale.exists());
    crate::support::wait_until(Duration::from_secs(5), "the stale master exits", || {
        !s.is_alive()
    });
}
