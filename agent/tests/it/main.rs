//! Integration tests of `certctl-agent`: the real agent binary on a temp
//! socket, driven by the real `certctl`, deploying to real servers.
//!
//! `support/` holds the harness (see its module doc); `harness` tests the
//! harness itself so that a red test elsewhere is about the agent, not the rig.

// Test support prints skips and child-process logs to stderr on purpose;
// libtest captures it per test and shows it only on failure.
#![allow(clippy::print_stderr)]
// Fixtures are written with std::fs directly; any clippy.toml ban on it is for agent code.
#![allow(clippy::disallowed_methods)]
// Test helpers fail loudly on a broken fixture: unwrap is the point.
#![allow(clippy::unwrap_used)]

// Not every test module uses every helper.
#[allow(dead_code)]
mod support;

mod acme;
mod agent_lifecycle;
mod alert_rules;
mod apache_kind;
mod caddy_kind;
mod cli_output;
mod crash;
mod deploy_file;
mod drop;
mod envoy_kind;
mod fleet;
mod generations;
mod haproxy_kind;
mod harness;
mod hostile_clients;
mod hostile_input;
mod keystore_kind;
mod layering;
mod live_state;
mod mail;
mod mail_kinds;
mod metrics;
mod model;
mod nginx;
mod nspawn;
mod package;
mod print_dropin;
mod remote_ssh;
mod remote_transport;
mod socket_activation;
mod status_check;
mod status_state;
mod strace;
mod systemd_notify;
mod systemd_units;
mod traefik_kind;
mod verify;
mod verify_rule;
