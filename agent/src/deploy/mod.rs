//! Deploying a certificate set to a target, and putting the previous one
//! back. Read in this order:
//!
//! - `engine`: the state every run shares (locks, events, last results).
//! - `run`: a deploy, its stages in order in one file.
//! - `plan`: what to write (pure).
//! - `in_place`, `generations`: stages 5 and 6 in each layout; `commit`:
//!   committed files, undo and pruning, shared by both.
//! - `progress`: what a run tells (events, journal rows, metrics, report).
//! - `error`: why a run ended early; the variant decides the outcome.
//! - `rollback`: `certctl rollback`; `recover`: finishing runs a crash
//!   left open.

pub mod commit;
pub mod engine;
pub mod error;
pub mod generations;
pub mod in_place;
pub mod plan;
pub mod progress;
pub mod recover;
pub mod rollback;
pub mod run;

pub use crate::model::event::{Event, Outcome, Report, Stage, Verification};
pub use engine::{Engine, Input, LastDeploy, Request};
pub use error::DeployError;
