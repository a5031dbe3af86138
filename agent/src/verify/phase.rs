//! The phases of one probe, named in every probe error: shared by the
//! probe and the STARTTLS preambles it runs.

use std::fmt;

/// The part of an attempt that was running when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Resolve,
    Connect,
    /// Waiting for the plaintext greeting of a STARTTLS protocol.
    Greeting,
    /// The plaintext commands up to the go-ahead for TLS.
    Starttls,
    Handshake,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Resolve => "resolve",
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Starttls => "starttls",
            Phase::Handshake => "handshake",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
