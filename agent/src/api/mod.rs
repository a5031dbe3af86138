//! The local control API: gRPC (`certctl.agent.v1.Agent`) over a Unix
//! socket, authorized per call from kernel peer credentials; and the
//! Prometheus endpoint on `metrics_listen` (`metrics_endpoint`).

pub mod auth;
pub mod convert;
pub mod metrics_endpoint;
pub mod server;
pub mod socket;
