//! The local control API: gRPC (`certctl.agent.v1.Agent`) over a Unix
//! socket, authorized per call from kernel peer credentials.

pub mod auth;
pub mod convert;
pub mod server;
pub mod socket;
