//! The caller on the other end of an accepted control-socket connection,
//! from the kernel only: never from the user database.
//!
//! - uid, gid and pid: `SO_PEERCRED` (filled by the kernel at `connect`; a
//!   client cannot forge them). The gid is the primary (effective) group.
//! - Supplementary groups: the `Groups:` line of `/proc/<pid>/status`, the
//!   kernel's view of the process's credentials now (there is no safe
//!   wrapper for `SO_PEERGROUPS`, and the agent forbids `unsafe`). The
//!   `Uid:` line's effective uid must be the one `SO_PEERCRED` gave.
//! - Pid reuse: the pid comes from `SO_PEERPIDFD` (Linux >= 6.5), whose
//!   pidfd pins the process: its `/proc/self/fdinfo` `Pid:` line is read
//!   before and after the status file, and the groups are used only if
//!   both name the same live pid (not `-1`: exited; not `0`: in another pid
//!   namespace). On older kernels there is no pidfd and the pid of
//!   `SO_PEERCRED` is used as is: a caller that exits right after
//!   `connect` could, in principle, have its pid reused by another process
//!   of the same uid before the status file is read (the `Uid:` check
//!   still holds), and that process's groups would be used.
//! - When the groups cannot be read (the process is gone, `/proc` is
//!   hidden), the caller has its primary group only: never more access
//!   than its credentials give.
//!
//! The groups are read when the connection is accepted, after `connect`:
//! a process that dropped a group before that is refused that group's
//! access; gaining a group needs privilege.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt};

use super::auth::Caller;

/// What `SO_PEERCRED` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// `SO_PEERCRED` of a connected Unix socket.
pub fn cred(sock: &impl AsFd) -> std::io::Result<Cred> {
    let c = getsockopt(sock, sockopt::PeerCredentials)?;
    Ok(Cred {
        uid: c.uid(),
        gid: c.gid(),
        pid: (c.pid() > 0).then_some(c.pid()),
    })
}

/// The caller of `sock` with its kernel-held groups. Reads `/proc`:
/// call it off the async threads.
pub fn caller(sock: &impl AsFd, cred: Cred) -> Caller {
    let supplementary = match getsockopt(sock, sockopt::PeerPidfd) {
        Ok(pidfd) => groups_via_pidfd(&pidfd, cred.uid),
        // ENOPROTOOPT before Linux 6.5: the pid of SO_PEERCRED.
        Err(_) => cred
            .pid
            .and_then(|pid| read_status(&proc_status(pid), cred.uid)),
    };
    let mut groups = vec![cred.gid];
    groups.extend(supplementary.unwrap_or_default());
    groups.sort_unstable();
    groups.dedup();
    Caller {
        uid: cred.uid,
        gid: cred.gid,
        pid: cred.pid,
        user: user_name(cred.uid),
        groups,
    }
}

fn proc_status(pid: i32) -> std::path::PathBuf {
    Path::new("/proc").join(pid.to_string()).join("status")
}

fn groups_via_pidfd(pidfd: &OwnedFd, uid: u32) -> Option<Vec<u32>> {
    let fdinfo = Path::new("/proc/self/fdinfo").join(pidfd.as_raw_fd().to_string());
    let pid_now = || {
        std::fs::read_to_string(&fdinfo)
            .ok()
            .and_then(|t| field(&t, "Pid:").and_then(|v| v.trim().parse::<i32>().ok()))
    };
    let before = pid_now().filter(|p| *p > 0)?;
    let groups = read_status(&proc_status(before), uid)?;
    (pid_now() == Some(before)).then_some(groups)
}

/// The `Groups:` of a status file whose effective uid is `uid`.
fn read_status(path: &Path, uid: u32) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_status(&text, uid)
}

fn parse_status(text: &str, uid: u32) -> Option<Vec<u32>> {
    let euid: u32 = field(text, "Uid:")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    if euid != uid {
        return None;
    }
    field(text, "Groups:")?
        .split_whitespace()
        .map(|g| g.parse().ok())
        .collect()
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(name))
}

/// The user's name for messages, from `/etc/passwd` only (no NSS daemon is
/// asked; a missing name is shown as the uid).
fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.split(':');
        let name = parts.next()?;
        let id: u32 = parts.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_groups_need_the_right_uid() {
        let text = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t4 27 990 \n";
        assert_eq!(parse_status(text, 1000), Some(vec![4, 27, 990]));
        assert_eq!(parse_status(text, 1001), None);
        let none = "Uid:\t5\t5\t5\t5\nGroups:\t\n";
        assert_eq!(parse_status(none, 5), Some(vec![]));
    }

    #[tokio::test]
    async fn own_credentials_through_a_socket_pair() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let c = cred(&a).unwrap();
        assert_eq!(c.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(c.pid, Some(i32::try_from(std::process::id()).unwrap()));
        let caller = caller(&a, c);
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(nix::unistd::Gid::as_raw)
            .chain([c.gid])
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(caller.groups, want);
    }
}
