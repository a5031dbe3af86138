//! The agent's vocabulary: value types shared across floors, with no
//! behaviour beyond describing themselves. Everything above may import
//! this; it imports nothing of the agent but `kind` (the verify protocol).
//!
//! - `stage`: stages, outcomes and operations: the one spelling of each.
//! - `event`: deploy events and reports.
//! - `check`: what a probe found compared with what was expected, and one
//!   attempt of a retry loop.
//! - `drop`: drop outcomes and drop events.
//! - `file`: what a target's file holds and where its mode came from.
//! - `fmt`: how fingerprints, durations and instants are written.

pub mod check;
pub mod drop;
pub mod event;
pub mod file;
pub mod fmt;
pub mod stage;
