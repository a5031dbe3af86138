//! certctl agent: deploys certificate sets to local servers atomically, runs
//! their validate and reload commands, and rolls back when anything fails.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map and the
//! invariants every module upholds.

#![forbid(unsafe_code)]
// Unit tests set up fixtures with plain std::fs; the policy of clippy.toml
// still holds for the library itself (checked without cfg(test)).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod api;
pub mod app;
pub mod atomic;
pub mod bundle;
pub mod check;
pub mod cli;
pub mod command;
pub mod config;
pub mod daemon;
pub mod deploy;
pub mod deployed;
pub mod disk;
pub mod drift;
pub mod drop;
pub mod dropin;
pub mod failpoint;
#[cfg(test)]
pub mod fuzzing;
pub mod journal;
pub mod keystore;
pub mod kind;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod reload;
pub mod remote;
pub mod sync;
pub mod systemd;
pub mod verify;
