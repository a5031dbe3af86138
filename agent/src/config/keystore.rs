//! A `keystore` target's settings: the format, the alias, where the
//! password comes from. Data only: encoding and reading keystores is
//! `crate::keystore`'s behaviour.

use std::path::PathBuf;

/// The environment variable systemd sets to the directory holding a
/// service's credentials (`LoadCredential=`, `SetCredentialEncrypted=`).
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Java refuses shorter keystore passwords (`keytool`: "at least 6
/// characters").
pub const MIN_PASSWORD_LEN: usize = 6;

/// The keystore format of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreType {
    /// PKCS#12: Java's default keystore type since Java 9.
    Pkcs12,
    /// JKS: Java's legacy proprietary format, written by `keytool`.
    Jks,
}

impl StoreType {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreType::Pkcs12 => "pkcs12",
            StoreType::Jks => "jks",
        }
    }

    /// Parses `keystore_type` as written in the configuration file.
    pub fn parse(name: &str) -> Option<StoreType> {
        [StoreType::Pkcs12, StoreType::Jks]
            .into_iter()
            .find(|t| t.as_str() == name)
    }
}

/// Where a keystore's password comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file (its first line, without the line end).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl PasswordSource {
    /// `password_file /etc/…` or `credential keystore-pass`, for messages.
    pub fn describe(&self) -> String {
        match self {
            PasswordSource::File(p) => format!("password_file {}", p.display()),
            PasswordSource::Credential(c) => format!("systemd credential {c}"),
        }
    }
}

/// A `keystore` target's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeystoreConfig {
    pub store_type: StoreType,
    /// The entry's alias.
    pub alias: String,
    pub password: PasswordSource,
    /// Private scratch directory for the `keytool` conversion to JKS
    /// (`<state_dir>/keystore`).
    pub scratch_dir: PathBuf,
}
