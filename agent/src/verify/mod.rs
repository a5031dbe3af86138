//! Verification: proving that a server serves the certificate that was
//! deployed (stage 9 of the deploy protocol, `[target.verify]`).
//!
//! This module owns talking to a target's TLS endpoint. It is a library with
//! no knowledge of deploys: the engine decides what to compare and when to
//! roll back. It guarantees:
//! - a [`Served`] is only returned after a complete TLS handshake in which
//!   the server proved possession of the served leaf's private key; its
//!   fingerprints are SHA-256 over the DER the server actually sent
//!   ([`probe()`]);
//! - the plaintext preambles of SMTP, IMAP and POP3 follow their RFCs, read
//!   no byte past the go-ahead and are bounded in size ([`starttls`]);
//! - every attempt, preamble included, ends by its deadline, and every
//!   failure is a one-line message naming the endpoint with a short reason
//!   code ([`ProbeError`]);
//! - the retry schedule is pure and capped, and waiting between attempts is
//!   cancellable ([`backoff`]).

pub mod backoff;
pub mod phase;
pub mod probe;
pub mod served;
pub mod starttls;

pub use backoff::{Schedule, jitter, jittered, sleep_or_cancel};
pub use probe::{Phase, Probe, ProbeError, Roots, RootsError, Served, probe};
pub use starttls::StarttlsError;
