//! The local control API: gRPC (`certctl.agent.v1.Agent`) over a Unix
//! socket, authorized from kernel credentials read when a connection is
//! accepted (`accept`, `peer`; refused connections get `deny`, deploy calls
//! pass `gate` before their body is read; `status` keeps each target's
//! part of a Status answer encoded); and the Prometheus endpoint on
//! `metrics_listen` (`metrics_endpoint`).

pub mod accept;
pub mod activity;
pub mod auth;
pub mod convert;
pub mod deny;
pub mod gate;
pub mod limits;
pub mod metrics_endpoint;
pub mod peer;
pub mod server;
pub mod socket;
pub mod status;
