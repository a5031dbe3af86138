//! Deploying to hosts that run no agent: file operations and commands over
//! SSH, with the same protocol as on the local host.
//!
//! # The system's OpenSSH client, not a Rust SSH stack
//! The agent runs `ssh` (OpenSSH, package `openssh-client`, a runtime
//! recommendation of the package; building needs nothing): no second
//! implementation of SSH and its cryptography lives inside the agent, the
//! known_hosts format, key types, ciphers and `ssh_config` knowledge
//! operators already have apply unchanged, and connections are reused by
//! OpenSSH's own `ControlMaster`. The configuration files of the user are
//! not read (`-F none`): everything the agent relies on is an explicit `-o`.
//!
//! SFTP (version 3 plus OpenSSH's extensions) is spoken by the agent's own
//! small client ([`Sftp`]) over the stdin and stdout of
//! `ssh -s <host> sftp`: the `sftp` program cannot create a file with its
//! mode, then write, fsync and rename it in that order, and this client
//! sends exactly the requests the protocol needs.
//!
//! # What each step is on the server (OpenSSH's `sftp-server`)
//! - [`Sftp::create_excl`]: `SSH_FXP_OPEN` with `CREAT|EXCL|WRITE` and the
//!   mode (`open(2)`, narrowed by the server's umask), then `SSH_FXP_FSETSTAT`
//!   with the mode (`fchmod(2)`, exact): the file has its final mode before
//!   any byte. The owner is set with [`Sftp::fsetstat`] (`fchown(2)`: root
//!   may give any owner, others only a group they belong to).
//! - [`Sftp::fsync`]: `fsync@openssh.com` (`fsync(2)` on the handle).
//! - [`Sftp::fsync_dir`]: the directory opened read-only with
//!   `SSH_FXP_OPEN` (`open(dir, O_RDONLY)`, which Linux permits, gives an
//!   ordinary file handle) and `fsync@openssh.com` on it: possible on every
//!   OpenSSH server with the extension (6.5 and later). Elsewhere
//!   `Unsupported`.
//! - [`Sftp::posix_rename`]: `posix-rename@openssh.com` (`rename(2)`,
//!   atomic over an existing file). Plain `SSH_FXP_RENAME` is never used: it
//!   refuses an existing target, and OpenSSH implements it as `link` then
//!   `unlink`. Without the extension: `Unsupported`.
//! - [`Sftp::hardlink`]: `hardlink@openssh.com` (`link(2)`), for backups.
//! - [`Sftp::symlink`]: `SSH_FXP_SYMLINK`, whose two paths OpenSSH reads in
//!   the opposite order from the draft (target first).
//!
//! OpenSSH 9.2's `sftp-server` announces `posix-rename@openssh.com`,
//! `statvfs@openssh.com`, `fstatvfs@openssh.com`, `hardlink@openssh.com`,
//! `fsync@openssh.com`, `lsetstat@openssh.com`, `limits@openssh.com`,
//! `expand-path@openssh.com` and (newer) `copy-data`, `home-directory`,
//! `users-groups-by-id@openssh.com`.
//!
//! # Commands
//! [`Session::run`] sends an argv as one command line for the account's
//! login shell, each argument single-quoted (`quote`), bounded in time and
//! output. At the deadline the local ssh is killed and the command's
//! process group on the remote host is killed over the same master (sshd
//! itself signals nothing when a channel without a terminal closes).
//!
//! # Host keys and timeouts
//! The host key must be in the endpoint's known_hosts file
//! (`StrictHostKeyChecking=yes`, no global file, no updates); an unknown or
//! changed key fails [`Session::connect`] before any channel is opened, with
//! the SHA256 fingerprint of the key the host presented (from the master's
//! `-v` log, `Server host key:`). Connecting (TCP, key exchange, login) is
//! bounded by `Endpoint::connect_timeout`; a dead connection is noticed by
//! keepalives (30 s) and by `ssh -O check` before reuse ([`Pool`]); every
//! SFTP request waits at most its timeout.
//!
//! Text from the server (status messages, ssh's log) reaches messages
//! clipped and escaped. `docs/remote.md` says the same for operators.

mod endpoint;
mod pool;
mod quote;
mod session;
mod sftp;
mod wire;

pub use endpoint::{Endpoint, RemoteError, RemoteOutput};
pub use pool::Pool;
pub use quote::{command_line, quote};
pub use session::{MAX_CONTROL_PATH, OUTPUT_LIMIT, Session, sweep_stale};
pub use sftp::{
    CHUNK, DEFAULT_REQUEST_TIMEOUT, EXT_FSYNC, EXT_HARDLINK, EXT_POSIX_RENAME, Handle,
    MAX_DIR_ENTRIES, Sftp, status_error,
};
pub use wire::{Attrs, MAX_PACKET};
