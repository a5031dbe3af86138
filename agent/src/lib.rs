//! certctl agent: deploys certificate sets to local servers atomically, runs
//! their validate and reload commands, and rolls back when anything fails.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map and the
//! invariants every module upholds.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod config;
pub mod kind;
