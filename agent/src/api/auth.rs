//! Who may call the agent: decided from kernel-held credentials.
//!
//! The caller (uid, gid, pid and every group it holds) is read once per
//! connection when it is accepted (`api::peer`, `api::accept`) and travels
//! with each request as [`ConnInfo`]; no user-database lookup is made per
//! call. Root and the agent's own user are always allowed; members of
//! `deploy_groups` may deploy and read; members of `read_groups` may only
//! read. A refusal names the socket, the caller and the group to join.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::Request;

use super::activity::Activity;
use crate::config::{Config, Group};

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// status, targets, watch
    Read,
    /// deploy (and later rollback)
    Deploy,
}

/// The process on the other end of the socket.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub user: Option<String>,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

impl Caller {
    /// For logs and deploy records: `uid=1000(alice) pid=4242`.
    pub fn describe(&self) -> String {
        let user = self
            .user
            .as_deref()
            .map(|u| format!("({u})"))
            .unwrap_or_default();
        match self.pid {
            Some(pid) => format!("uid={}{user} pid={pid}", self.uid),
            None => format!("uid={}{user}", self.uid),
        }
    }
}

/// Why a call was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no peer credentials on this connection: connect through the Unix socket {socket}")]
    NoCredentials { socket: PathBuf },
    #[error("permission denied: {caller} may not {what} through {socket}: {remedy}")]
    Denied {
        caller: String,
        what: &'static str,
        socket: PathBuf,
        remedy: String,
    },
}

/// The authorization rules of one agent.
#[derive(Debug, Clone)]
pub struct Policy {
    pub socket: PathBuf,
    pub deploy_groups: Vec<Group>,
    pub read_groups: Vec<Group>,
    /// The agent's own uid: a caller running as the agent's user could
    /// change everything the agent can anyway.
    pub agent_uid: u32,
}

/// What each request on an accepted connection carries (tonic's connect
/// info): the caller, as the kernel described it at accept.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub caller: Arc<Caller>,
    /// The calls open on the connection (`api::gate` counts them).
    pub activity: Arc<Activity>,
}

/// The caller of a request that arrived over the control socket.
pub fn caller<T>(req: &Request<T>, socket: &std::path::Path) -> Result<Arc<Caller>, AuthError> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|i| i.caller.clone())
        .ok_or_else(|| AuthError::NoCredentials {
            socket: socket.to_owned(),
        })
}

/// What a method of `certctl.agent.v1.Agent` needs, from its HTTP/2 path
/// (`/certctl.agent.v1.Agent/Deploy`): known before its body is read.
pub fn access_of(path: &str) -> Access {
    match path.rsplit('/').next() {
        Some("Deploy" | "Rollback") => Access::Deploy,
        _ => Access::Read,
    }
}

impl Policy {
    /// The rules of `config` for the socket at `socket`.
    pub fn of(config: &Config, socket: PathBuf) -> Self {
        Self {
            socket,
            deploy_groups: config.agent.deploy_groups.clone(),
            read_groups: config.agent.read_groups.clone(),
            agent_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Root and the agent's own user: always allowed, with their own
    /// connection budget.
    pub fn privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.agent_uid
    }

    /// Whether `caller` may make any call at all.
    pub fn may_connect(&self, caller: &Caller) -> bool {
        self.authorize(caller, Access::Read).is_ok()
    }

    /// Allows or refuses `caller` for `access`.
    pub fn authorize(&self, caller: &Caller, access: Access) -> Result<(), AuthError> {
        if self.privileged(caller.uid) {
            return Ok(());
        }
        let member = |groups: &[Group]| groups.iter().any(|g| caller.groups.contains(&g.gid));
        let allowed = match access {
            Access::Deploy => member(&self.deploy_groups),
            Access::Read => member(&self.deploy_groups) || member(&self.read_groups),
        };
        if allowed {
            return Ok(());
        }
        let (what, groups): (&'static str, Vec<&Group>) = match access {
            Access::Deploy => ("deploy", self.deploy_groups.iter().collect()),
            Access::Read => (
                "read agent state",
                self.read_groups.iter().chain(&self.deploy_groups).collect(),
            ),
        };
        let remedy = if groups.is_empty() {
            format!(
                "only root may {what}: no {} is configured in the agent's [agent] section",
                if access == Access::Deploy {
                    "deploy_groups"
                } else {
                    "read_groups or deploy_groups"
                }
            )
        } else {
            let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
            let user = caller
                .user
                .clone()
                .unwrap_or_else(|| caller.uid.to_string());
            format!(
                "join group {} (e.g. `usermod -aG {} {user}`, then log in again)",
                names.join(" or "),
                names[0]
            )
        };
        Err(AuthError::Denied {
            caller: caller.describe(),
            what,
            socket: self.socket.clone(),
            remedy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            socket: "/run/certctl/agent.sock".into(),
            deploy_groups: vec![Group {
                name: "certctl".into(),
                gid: 990,
            }],
            read_groups: vec![Group {
                name: "monitor".into(),
                gid: 991,
            }],
            agent_uid: 0,
        }
    }

    fn caller(uid: u32, groups: &[u32]) -> Caller {
        Caller {
            uid,
            gid: groups.first().copied().unwrap_or(uid),
            pid: Some(1),
            user: Some("alice".into()),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn access_matrix() {
        let p = policy();
        let cases = [
            (caller(0, &[0]), Access::Deploy, true),
            (caller(1000, &[1000, 990]), Access::Deploy, true),
            (caller(1000, &[1000, 990]), Access::Read, true),
            (caller(1000, &[1000, 991]), Access::Read, true),
            (caller(1000, &[1000, 991]), Access::Deploy, false),
            (caller(1000, &[1000]), Access::Read, false),
            (caller(1000, &[1000]), Access::Deploy, false),
        ];
        for (c, access, want) in cases {
            assert_eq!(p.authorize(&c, access).is_ok(), want, "{c:?} {access:?}");
        }
    }

    #[test]
    fn refusal_names_socket_and_group() {
        let msg = policy()
            .authorize(&caller(1000, &[1000]), Access::Deploy)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/run/certctl/agent.sock"), "{msg}");
        assert!(msg.contains("usermod -aG certctl alice"), "{msg}");
        let none = Policy {
            deploy_groups: vec![],
            ..policy()
        };
        let msg = none
            .authorize(&caller(1000, &[1000]), Access::Deploy)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("only root may deploy"), "{msg}");
    }

    #[test]
    fn access_follows_the_method() {
        assert_eq!(access_of("/certctl.agent.v1.Agent/Deploy"), Access::Deploy);
        assert_eq!(
            access_of("/certctl.agent.v1.Agent/Rollback"),
            Access::Deploy
        );
        assert_eq!(access_of("/certctl.agent.v1.Agent/Status"), Access::Read);
        assert_eq!(access_of("/x"), Access::Read);
    }

    #[test]
    fn agent_user_is_allowed() {
        let p = Policy {
            agent_uid: 1000,
            ..policy()
        };
        assert!(p.authorize(&caller(1000, &[1000]), Access::Deploy).is_ok());
    }
}
