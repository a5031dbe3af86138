//! The files of a target as the agent describes them: what a file holds
//! and where its resolved mode or owner came from.

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Cert,
    Key,
    Chain,
    /// Leaf, chain and key in one file (haproxy): a key file for modes.
    Pem,
    /// A Java keystore holding key and chain: a key file for modes.
    Keystore,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cert => "cert",
            Role::Key => "key",
            Role::Chain => "chain",
            Role::Pem => "pem",
            Role::Keystore => "keystore",
        }
    }

    /// The file holds a private key: it takes the key's mode, and never an
    /// "other" bit.
    pub fn holds_key(self) -> bool {
        matches!(self, Role::Key | Role::Pem | Role::Keystore)
    }
}

/// Where a resolved mode or owner came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Explicit,
    Existing,
    Default,
    /// Nothing configured and no file: the agent's own user and group.
    Agent,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Explicit => "explicit",
            Source::Existing => "existing",
            Source::Default => "default",
            Source::Agent => "agent",
        }
    }
}
