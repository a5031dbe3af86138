//! Deploying a certificate set to a target: planning (pure), the atomic
//! filesystem protocol, and the staged execution with rollback.

pub mod apply;
pub mod atomic;
pub mod event;
pub mod plan;

pub use apply::{Engine, LastDeploy, Request};
pub use event::{Event, Outcome, Report, Stage, Verification};
