//! Deploying a certificate set to a target: planning (pure), the atomic
//! filesystem protocol, the staged execution with rollback, verification
//! that the new certificate is served, and the operator's rollback.

pub mod apply;
pub mod generations;
pub mod plan;
pub mod recover;
pub mod rollback;
pub mod verify;

pub use crate::model::event::{Event, Outcome, Report, Stage, Verification};
pub use apply::{Engine, LastDeploy, Request};
