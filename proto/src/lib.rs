//! The certctl agent's gRPC API, `certctl.agent.v1`.
//!
//! The schema lives in `certctl/agent/v1/agent.proto`; field numbers are never
//! reused and changes are additive.

#![allow(clippy::all, clippy::pedantic)]

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("certctl.agent.v1");
        pub use crate::status::StatusResponse;
    }
}

mod status;
