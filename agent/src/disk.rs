//! The one reader of what is deployed on a target's disk: the certificate
//! set at `cert_path` (and `chain_path`), or the entry of a keystore target
//! opened as the keystore it is (PKCS#12 with the target's password, JKS
//! without it). Verification (what must be served), rollback, recovery,
//! `certctl status`, `certctl verify`, the drift watch and the metrics all
//! read through here, so they cannot disagree about what is deployed.
//!
//! Blocking: callers run it off the async threads. Never writes.

use std::path::{Path, PathBuf};

use crate::atomic::Fs;
use crate::bundle::{self, BundleError, Cert};
use crate::config::Target;
use crate::keystore::{self, KeystoreError};

/// The certificate set a target has on disk.
#[derive(Debug, Clone)]
pub struct OnDisk {
    pub leaf: Cert,
    /// The certificates after the leaf in `cert_path`, then those in
    /// `chain_path` (a keystore: the entry's chain after its leaf).
    pub chain: Vec<Cert>,
}

/// Why what is on disk cannot be read. `Display` is one line naming the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {error}", path.display())]
    Pem { path: PathBuf, error: BundleError },
    #[error("{0}")]
    Keystore(#[from] KeystoreError),
    #[error("{}: {why}", path.display())]
    KeystoreEntry { path: PathBuf, why: String },
}

impl DiskError {
    /// The short word `certctl status` shows for this error in its
    /// `disk_state` column.
    pub fn status(&self) -> String {
        match self {
            DiskError::Read { source, .. } => format!("cannot read: {source}"),
            DiskError::NoCertificate { .. } => "no certificate in the file".to_owned(),
            DiskError::Pem { error, .. } => format!("unreadable: {error}"),
            DiskError::Keystore(e) => format!("keystore: {e}"),
            DiskError::KeystoreEntry { path, why } => {
                format!("keystore: {}: {why}", path.display())
            }
        }
    }
}

/// The target's certificate set. `Ok(None)`: there is no certificate file
/// yet.
pub fn read(target: &Target) -> Result<Option<OnDisk>, DiskError> {
    read_on(&Fs::of(target), target)
}

/// [`read`] through `fs`, the target's files (a deploy reads a remote
/// target through the connection it writes with).
pub fn read_on(fs: &Fs, target: &Target) -> Result<Option<OnDisk>, DiskError> {
    if target.keystore.is_some() {
        return read_keystore(target);
    }
    let Some(mut certs) = read_pem(fs, &target.cert_path)? else {
        return Ok(None);
    };
    if certs.is_empty() {
        return Err(DiskError::NoCertificate {
            path: target.cert_path.clone(),
        });
    }
    if let Some(chain) = &target.chain_path {
        certs.extend(read_pem(fs, chain)?.unwrap_or_default());
    }
    let leaf = certs.remove(0);
    Ok(Some(OnDisk { leaf, chain: certs }))
}

/// Only the leaf: the first certificate at `cert_path` (a keystore: its
/// entry's leaf). Cheaper than [`read`] for a PEM target (the chain file is
/// not opened), and what status, metrics and the traefik hook need.
pub fn leaf(target: &Target) -> Result<Option<Cert>, DiskError> {
    leaf_on(&Fs::of(target), target)
}

/// [`leaf`] through `fs`, the target's files.
pub fn leaf_on(fs: &Fs, target: &Target) -> Result<Option<Cert>, DiskError> {
    if target.keystore.is_some() {
        return Ok(read_keystore(target)?.map(|d| d.leaf));
    }
    match fs {
        Fs::Local => leaf_in(&target.cert_path),
        fs => match fs.read_file(&target.cert_path) {
            Ok(Some(bytes)) => leaf_of(&target.cert_path, &bytes).map(Some),
            Ok(None) => Ok(None),
            Err(source) => Err(DiskError::Read {
                path: target.cert_path.clone(),
                source,
            }),
        },
    }
}

/// The first certificate of the PEM file at `path`; `Ok(None)` when there
/// is no file.
pub fn leaf_in(path: &Path) -> Result<Option<Cert>, DiskError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DiskError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    leaf_of(path, &bytes).map(Some)
}

/// The first certificate of `bytes`, the contents of the PEM file at
/// `path` (named in the error).
pub fn leaf_of(path: &Path, bytes: &[u8]) -> Result<Cert, DiskError> {
    match bundle::first_cert_in_pem(bytes) {
        Ok(Some(cert)) => Ok(cert),
        Ok(None) => Err(DiskError::NoCertificate {
            path: path.to_owned(),
        }),
        Err(error) => Err(DiskError::Pem {
            path: path.to_owned(),
            error,
        }),
    }
}

fn read_pem(fs: &Fs, path: &Path) -> Result<Option<Vec<Cert>>, DiskError> {
    match fs.read_file(path) {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => bundle::certs_in_pem(&bytes)
            .map(Some)
            .map_err(|error| DiskError::Pem {
                path: path.to_owned(),
                error,
            }),
        Err(source) => Err(DiskError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_keystore(target: &Target) -> Result<Option<OnDisk>, DiskError> {
    let Some(ks) = &target.keystore else {
        return Ok(None);
    };
    let Some(contents) = keystore::read(&target.cert_path, ks)? else {
        return Ok(None);
    };
    let (leaf, chain) = keystore::certs_of(&contents).map_err(|why| DiskError::KeystoreEntry {
        path: target.cert_path.clone(),
        why,
    })?;
    Ok(Some(OnDisk { leaf, chain }))
}
