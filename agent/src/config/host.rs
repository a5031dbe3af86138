//! The facts about this host that resolving a configuration depends on:
//! user and group databases, the agent's effective uid, and which programs
//! are on `PATH` (for kinds whose default command has several names). A
//! trait so that tests can describe a host instead of depending on the
//! machine they run on.

use nix::unistd::{self, Gid, Uid};

/// `PATH` given to commands when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `PATH` commands run with: the agent's own, else [`DEFAULT_PATH`].
pub fn search_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned())
}

/// Where `program` (a bare name) would be found when a command runs: the
/// first executable file of that name on the commands' `PATH`.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&search_path())
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// User and group lookups (through NSS on a real host).
pub trait Host {
    /// The uid of user `name`; `Ok(None)` when there is no such user.
    fn user_id(&self, name: &str) -> Result<Option<u32>, String>;
    /// The gid of group `name`; `Ok(None)` when there is no such group.
    fn group_id(&self, name: &str) -> Result<Option<u32>, String>;
    /// The name of user `uid`, if it has one.
    fn user_name(&self, uid: u32) -> Option<String>;
    /// The name of group `gid`, if it has one.
    fn group_name(&self, gid: u32) -> Option<String>;
    /// The effective uid of the agent.
    fn euid(&self) -> u32;
    /// Whether `program` is found on the `PATH` commands run with.
    fn has_program(&self, program: &str) -> bool {
        find_program(program).is_some()
    }
}

/// The real host, through `getpwnam_r` and friends.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemHost;

impl Host for SystemHost {
    fn user_id(&self, name: &str) -> Result<Option<u32>, String> {
        unistd::User::from_name(name)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.desc().to_owned())
    }

    fn group_id(&self, name: &str) -> Result<Option<u32>, String> {
        unistd::Group::from_name(name)
            .map(|g| g.map(|g| g.gid.as_raw()))
            .map_err(|e| e.desc().to_owned())
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        unistd::User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }

    fn group_name(&self, gid: u32) -> Option<String> {
        unistd::Group::from_gid(Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.name)
    }

    fn euid(&self) -> u32 {
        unistd::geteuid().as_raw()
    }
}
