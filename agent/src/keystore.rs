//! Java keystores: the one file a `keystore` target deploys.
//!
//! This module owns the keystore formats. It encodes a checked bundle as
//! PKCS#12 in-process (PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC for
//! the key and the certificates, an HMAC-SHA256 MAC: what Java writes by
//! default since 8u301/11.0.12/17, and what `KeyStore.getInstance("PKCS12")`
//! and `keytool` read), converts that to JKS with `keytool` when a target
//! asks for the legacy format, and reads a keystore on disk back into
//! certificates for planning, rollback and `certctl status`.
//!
//! Guarantees:
//! - the password is read from its file or systemd credential when it is
//!   needed (deploy, status), kept in zeroizing buffers, and never appears
//!   in a message or on a command line: `keytool` gets it through
//!   `-storepass:file` from a 0600 file in a private directory of the
//!   agent's state directory, removed when `keytool` is done;
//! - key bytes handed to the PKCS#12 encoder come from zeroizing buffers
//!   (the encoder's own working copies are not zeroized: a limitation of
//!   the `p12-keystore` crate, noted in docs/kinds.md);
//! - [`content_digest`] identifies what a keystore holds (alias, key,
//!   certificates), so that a redeploy of the same material is recognised
//!   although PKCS#12 encryption uses fresh salts every time.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::bundle::{self, Bundle, Cert, KeyAlgorithm, KeyFormat};
use crate::command;

pub use crate::config::keystore::{
    CREDENTIALS_DIRECTORY, KeystoreConfig, MIN_PASSWORD_LEN, PasswordSource, StoreType,
};

/// Why a keystore could not be written or read. Never carries the password
/// or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error(
        "cannot read the keystore password from {source_name}: {error}; create it (one line, \
         at least {MIN_PASSWORD_LEN} characters) readable by the agent"
    )]
    PasswordUnreadable { source_name: String, error: String },
    #[error(
        "the keystore password credential {name} is not available: {CREDENTIALS_DIRECTORY} is \
         not set; run the agent under systemd with LoadCredential={name}:<file> (or use \
         password_file)"
    )]
    NoCredentials { name: String },
    #[error("the keystore password in {source_name} {why}")]
    PasswordInvalid {
        source_name: String,
        why: &'static str,
    },
    #[error("cannot encode the keystore: {0}")]
    Encode(String),
    #[error("{path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{0}")]
    Keytool(String),
    #[error("{op} {path}: {source}")]
    Scratch {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// === password ===

/// Reads the password from `source` (blocking): the first line, without
/// its line end.
pub fn read_password(source: &PasswordSource) -> Result<Zeroizing<String>, KeystoreError> {
    let path = match source {
        PasswordSource::File(p) => p.clone(),
        PasswordSource::Credential(name) => match std::env::var_os(CREDENTIALS_DIRECTORY) {
            Some(dir) => Path::new(&dir).join(name),
            None => return Err(KeystoreError::NoCredentials { name: name.clone() }),
        },
    };
    let source_name = source.describe();
    let bytes =
        fs::read(&path)
            .map(Zeroizing::new)
            .map_err(|e| KeystoreError::PasswordUnreadable {
                source_name: source_name.clone(),
                error: e.to_string(),
            })?;
    parse_password(&bytes, &source_name)
}

/// The password in a file's bytes: one line; a final `\n` or `\r\n` is
/// not part of it.
fn parse_password(bytes: &[u8], source_name: &str) -> Result<Zeroizing<String>, KeystoreError> {
    let invalid = |why| KeystoreError::PasswordInvalid {
        source_name: source_name.to_owned(),
        why,
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|b| matches!(b, b'\n' | b'\r' | 0)) {
        return Err(invalid(
            "has more than one line: write the password alone on one line",
        ));
    }
    let text = std::str::from_utf8(line).map_err(|_| invalid("is not UTF-8 text"))?;
    if text.chars().count() < MIN_PASSWORD_LEN {
        return Err(invalid(
            "is shorter than 6 characters, which Java refuses for a keystore",
        ));
    }
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    out.push_str(text);
    Ok(out)
}

// === writing ===

/// The private key as PKCS#8 DER (what PKCS#12 and Java store), in a
/// zeroizing buffer. PKCS#1 (RSA) and SEC1 (EC) keys are wrapped.
pub fn pkcs8_der(key: &bundle::PrivateKey) -> Zeroizing<Vec<u8>> {
    let der = key.as_der();
    let sec1;
    let mut inner = der.secret_der();
    if key.format() == KeyFormat::Sec1 {
        // PKCS#8 names the curve; the copy in SEC1 goes, as OpenSSL does.
        sec1 = without_ec_parameters(inner);
        inner = &sec1;
    }
    let algorithm: &[u8] = match (key.format(), key.algorithm()) {
        (KeyFormat::Pkcs8, _) => return Zeroizing::new(inner.to_vec()),
        // SEQUENCE { rsaEncryption, NULL }
        (_, KeyAlgorithm::Rsa) => &[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
            0x00,
        ],
        // SEQUENCE { id-ecPublicKey, prime256v1 }
        (_, KeyAlgorithm::EcdsaP256) => &[
            0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
            0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ],
        // SEQUENCE { id-ecPublicKey, secp384r1 }
        (_, KeyAlgorithm::EcdsaP384) => &[
            0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
            0x81, 0x04, 0x00, 0x22,
        ],
        // Ed25519 keys only exist as PKCS#8.
        (_, KeyAlgorithm::Ed25519) => return Zeroizing::new(inner.to_vec()),
    };
    // PrivateKeyInfo ::= SEQUENCE { version 0, algorithm, OCTET STRING key }
    let version = [0x02, 0x01, 0x00];
    let octets_len = 1 + der_len(inner.len()).len() + inner.len();
    let body_len = version.len() + algorithm.len() + octets_len;
    let mut out = Zeroizing::new(Vec::with_capacity(1 + 5 + body_len));
    out.push(0x30);
    out.extend_from_slice(&der_len(body_len));
    out.extend_from_slice(&version);
    out.extend_from_slice(algorithm);
    out.push(0x04);
    out.extend_from_slice(&der_len(inner.len()));
    out.extend_from_slice(inner);
    out
}

/// A SEC1 `ECPrivateKey` without its optional `[0] parameters` element
/// (unchanged when it has none or does not parse).
fn without_ec_parameters(sec1: &[u8]) -> Zeroizing<Vec<u8>> {
    let unchanged = || Zeroizing::new(sec1.to_vec());
    let Some((0x30, body, _)) = der_element(sec1) else {
        return unchanged();
    };
    let mut kept = Zeroizing::new(Vec::with_capacity(body.len()));
    let mut rest = body;
    while !rest.is_empty() {
        let Some((tag, _, len)) = der_element(rest) else {
            return unchanged();
        };
        if tag != 0xa0 {
            kept.extend_from_slice(&rest[..len]);
        }
        rest = &rest[len..];
    }
    let mut out = Zeroizing::new(Vec::with_capacity(kept.len() + 4));
    out.push(0x30);
    out.extend_from_slice(&der_len(kept.len()));
    out.extend_from_slice(&kept);
    out
}

/// The first DER element of `bytes`: its tag, its content and its whole
/// length.
fn der_element(bytes: &[u8]) -> Option<(u8, &[u8], usize)> {
    let tag = *bytes.first()?;
    let first = *bytes.get(1)?;
    let (len, header) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len = bytes
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, bytes.get(header..end)?, end))
}

/// A DER length.
fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// What a keystore holding `alias` with this key and these certificates
/// (leaf first) contains, as one SHA-256: equal digests mean the same
/// material under the same name.
pub fn content_digest(alias: &str, key_pkcs8: &[u8], certs: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"certctl keystore v1\0");
    h.update(alias.to_lowercase().as_bytes());
    h.update([0]);
    h.update((key_pkcs8.len() as u64).to_be_bytes());
    h.update(key_pkcs8);
    for c in certs {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c);
    }
    h.finalize().into()
}

/// [`content_digest`] of what [`pkcs12`] writes for `bundle`.
pub fn bundle_digest(bundle: &Bundle, alias: &str) -> [u8; 32] {
    let key = pkcs8_der(&bundle.key);
    let certs: Vec<&[u8]> = std::iter::once(&bundle.leaf)
        .chain(&bundle.chain)
        .map(|c| c.der.as_slice())
        .collect();
    content_digest(alias, &key, &certs)
}

/// `bundle` as a PKCS#12 keystore with one entry, `alias`: the key and
/// its chain (leaf first), encrypted with `password`.
pub fn pkcs12(
    bundle: &Bundle,
    alias: &str,
    password: &str,
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let encode = |e: p12_keystore::error::Error| KeystoreError::Encode(e.to_string());
    let key = PrivateKey::from_der(&pkcs8_der(&bundle.key)).map_err(encode)?;
    let certs = std::iter::once(&bundle.leaf)
        .chain(&bundle.chain)
        .map(|c| Certificate::from_der(&c.der))
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode)?;
    // Any stable bytes link the key to its certificate; the leaf's digest
    // is stable across redeploys of the same certificate.
    let local_key_id = Sha256::digest(&bundle.leaf.der).to_vec();
    let mut store = KeyStore::new();
    store.add_entry(
        alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certs)),
    );
    // The writer's defaults are Java's: PBES2 (PBKDF2-HMAC-SHA256,
    // AES-256-CBC) and an HMAC-SHA256 MAC, 10,000 iterations each.
    store
        .writer(password)
        .write()
        .map(Zeroizing::new)
        .map_err(encode)
}

/// Converts a PKCS#12 keystore to JKS with `keytool -importkeystore`, in
/// a private directory under `scratch_dir` that is removed afterwards. The
/// password reaches keytool as `-srcstorepass:file` and friends.
pub async fn to_jks(
    p12: &[u8],
    alias: &str,
    password: &str,
    scratch_dir: &Path,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let dir = scratch_dir.join(format!(
        "jks-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let made = {
        let (scratch, dir) = (scratch_dir.to_owned(), dir.clone());
        tokio::task::spawn_blocking(move || {
            crate::atomic::create_private_dir(&scratch)
                .map_err(|e| KeystoreError::Scratch {
                    op: "cannot create",
                    path: scratch.clone(),
                    source: e.source,
                })
                .and_then(|()| {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dir)
                        .map_err(|source| KeystoreError::Scratch {
                            op: "cannot create",
                            path: dir.clone(),
                            source,
                        })
                })
        })
        .await
        .map_err(|e| KeystoreError::Keytool(e.to_string()))
    };
    made??;
    let result = convert_in(&dir, p12, alias, password, timeout).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

use std::os::unix::fs::DirBuilderExt as _;

async fn convert_in(
    dir: &Path,
    p12: &[u8],
    alias: &str,
    password: &str,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let (src, dest, pass) = (dir.join("in.p12"), dir.join("out.jks"), dir.join("pass"));
    private_file(&src, p12)?;
    private_file(&pass, password.as_bytes())?;
    let path = |p: &Path| p.display().to_string();
    let argv: Vec<String> = [
        "keytool",
        "-importkeystore",
        "-noprompt",
        "-srckeystore",
        &path(&src),
        "-srcstoretype",
        "PKCS12",
        "-srcstorepass:file",
        &path(&pass),
        "-srcalias",
        alias,
        "-destkeystore",
        &path(&dest),
        "-deststoretype",
        "JKS",
        "-deststorepass:file",
        &path(&pass),
        "-destkeypass:file",
        &path(&pass),
        "-destalias",
        alias,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let spec = command::Spec {
        purpose: "keystore conversion",
        argv: &argv,
        timeout,
        env: Vec::new(),
    };
    command::run(&spec)
        .await
        .map_err(|e| KeystoreError::Keytool(format!("writing the JKS keystore failed: {e}")))?;
    tokio::fs::read(&dest)
        .await
        .map(Zeroizing::new)
        .map_err(|source| KeystoreError::Scratch {
            op: "cannot read what keytool wrote to",
            path: dest,
            source,
        })
}

/// A new file readable by the agent only, holding `bytes`.
fn private_file(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    let scratch = |source| KeystoreError::Scratch {
        op: "cannot write",
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(scratch)?;
    f.write_all(bytes).map_err(scratch)
}

// === reading ===

/// What a keystore holds under a target's alias.
#[derive(Debug)]
pub struct Contents {
    /// The entry's certificates, leaf first, DER.
    pub certs: Vec<Vec<u8>>,
    /// [`content_digest`] of the entry; `None` where the format's key
    /// cannot be read here (JKS).
    pub digest: Option<[u8; 32]>,
}

/// Reads the keystore at `path` as `config` describes it (blocking).
/// `Ok(None)`: no file. Reads the password for PKCS#12.
pub fn read(path: &Path, config: &KeystoreConfig) -> Result<Option<Contents>, KeystoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(KeystoreError::Read {
                path: path.to_owned(),
                why: format!("cannot read: {e}"),
            });
        }
    };
    let contents = match config.store_type {
        StoreType::Pkcs12 => {
            let password = read_password(&config.password)?;
            read_pkcs12(&bytes, &config.alias, &password)
        }
        StoreType::Jks => read_jks(&bytes, &config.alias),
    };
    contents.map(Some).map_err(|why| KeystoreError::Read {
        path: path.to_owned(),
        why,
    })
}

/// The entry `alias` of a PKCS#12 keystore. `Err` completes "PATH: ...".
pub fn read_pkcs12(bytes: &[u8], alias: &str, password: &str) -> Result<Contents, String> {
    let archive =
        p12_keystore::Pkcs12Archive::from_pkcs12(bytes, password).map_err(|e| match e {
            p12_keystore::error::Error::MacError(_) => {
                "is not a PKCS#12 keystore this password opens (MAC check failed): the password \
                 changed, or the file is not PKCS#12"
                    .to_owned()
            }
            other => format!("is not a readable PKCS#12 keystore ({other})"),
        })?;
    let key = archive
        .keys
        .iter()
        .find(|k| {
            k.friendly_name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(alias))
        })
        .ok_or_else(|| format!("has no key entry with alias {alias:?}"))?;
    let id = key.local_key_id.as_ref().ok_or_else(|| {
        format!("entry {alias:?} has no local key id linking it to a certificate")
    })?;
    let leaf = archive
        .certs
        .iter()
        .find(|c| c.local_key_id.as_deref() == Some(id.as_ref()))
        .ok_or_else(|| format!("entry {alias:?} has no certificate"))?;
    let pool: Vec<&[u8]> = archive
        .certs
        .iter()
        .filter(|c| c.local_key_id.is_none())
        .map(|c| c.cert.as_der())
        .collect();
    let certs = chain_from(leaf.cert.as_der(), &pool)?;
    let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
    let digest = content_digest(alias, key.key.as_der(), &refs);
    Ok(Contents {
        certs,
        digest: Some(digest),
    })
}

/// `leaf` followed by the certificates of `pool` that issued it, in
/// order, by name linkage.
fn chain_from(leaf: &[u8], pool: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
    let parse = |der: &[u8]| {
        bundle::cert_from_der(der.to_vec()).map_err(|e| format!("holds a bad certificate: {e}"))
    };
    let parsed: Vec<Cert> = pool.iter().map(|d| parse(d)).collect::<Result<_, _>>()?;
    let mut current = parse(leaf)?;
    let mut out = vec![leaf.to_vec()];
    while current.issuer != current.subject {
        let Some(next) = parsed
            .iter()
            .find(|c| c.subject == current.issuer && !out.contains(&c.der))
        else {
            break;
        };
        out.push(next.der.clone());
        current = next.clone();
    }
    Ok(out)
}

/// The certificate chain of entry `alias` in a JKS keystore (the format
/// of OpenJDK's `JavaKeyStore`): the chains are stored in the clear, the
/// key is not read. `Err` completes "PATH: ...".
pub fn read_jks(bytes: &[u8], alias: &str) -> Result<Contents, String> {
    let mut r = JksReader { bytes, at: 0 };
    let bad = || "is not a JKS keystore (truncated or malformed)".to_owned();
    if r.u32().ok_or_else(bad)? != 0xFEED_FEED {
        return Err("is not a JKS keystore (no 0xFEEDFEED magic)".to_owned());
    }
    let version = r.u32().ok_or_else(bad)?;
    if !matches!(version, 1 | 2) {
        return Err(format!("is a JKS keystore of unknown version {version}"));
    }
    let count = r.u32().ok_or_else(bad)?;
    for _ in 0..count {
        let tag = r.u32().ok_or_else(bad)?;
        let name = r.utf().ok_or_else(bad)?;
        r.take(8).ok_or_else(bad)?; // creation date
        let mut certs = Vec::new();
        match tag {
            1 => {
                let key_len = r.u32().ok_or_else(bad)? as usize;
                r.take(key_len).ok_or_else(bad)?;
                let n = r.u32().ok_or_else(bad)?;
                for _ in 0..n {
                    certs.push(r.cert(version).ok_or_else(bad)?);
                }
            }
            2 => {
                r.cert(version).ok_or_else(bad)?;
            }
            other => return Err(format!("has a JKS entry of unknown type {other}")),
        }
        if tag == 1 && name.eq_ignore_ascii_case(alias) {
            if certs.is_empty() {
                return Err(format!("entry {alias:?} has no certificate"));
            }
            return Ok(Contents {
                certs,
                digest: None,
            });
        }
    }
    Err(format!("has no key entry with alias {alias:?}"))
}

struct JksReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> JksReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }

    /// Java's `writeUTF`: a u16 length and (modified) UTF-8.
    fn utf(&mut self) -> Option<String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        Some(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    fn cert(&mut self, version: u32) -> Option<Vec<u8>> {
        if version == 2 {
            self.utf()?; // "X.509"
        }
        let len = self.u32()? as usize;
        self.take(len).map(<[u8]>::to_vec)
    }
}

/// What a keystore holds as certificates, for stage 9 and status: the leaf
/// and the chain after it.
pub fn certs_of(contents: &Contents) -> Result<(Cert, Vec<Cert>), String> {
    let mut certs = contents
        .certs
        .iter()
        .map(|d| bundle::cert_from_der(d.clone()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err("holds no certificate".to_owned());
    }
    let leaf = certs.remove(0);
    Ok((leaf, certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_one_line_of_at_least_six_characters() {
        for (bytes, want) in [
            (&b"changeit\n"[..], Ok("changeit")),
            (b"changeit\r\n", Ok("changeit")),
            (b"changeit", Ok("changeit")),
            (b"p\xc3\xa4ssw\xc3\xb6rd\n", Ok("pässwörd")),
            (b"short\n", Err("shorter than 6")),
            (b"two\nlines\n", Err("more than one line")),
            (b"\xff\xfe\xfd\xfc\xfb\xfa", Err("not UTF-8")),
        ] {
            let got = parse_password(bytes, "password_file /p");
            match (got, want) {
                (Ok(p), Ok(w)) => assert_eq!(p.as_str(), w),
                (Err(e), Err(w)) => {
                    let e = e.to_string();
                    assert!(e.contains(w), "{e}");
                    assert!(e.starts_with("the keystore password in password_file /p"));
                }
                (got, want) => panic!("{bytes:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_missing_credential_directory_says_how_to_provide_it() {
        // The test process has no credentials unless systemd runs it.
        if std::env::var_os(CREDENTIALS_DIRECTORY).is_some() {
            return;
        }
        let e = read_password(&PasswordSource::Credential("ks".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LoadCredential=ks:"), "{e}");
        let e = read_password(&PasswordSource::File("/nonexistent/pw".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read the keystore password from password_file /nonexistent/pw"),
            "{e}"
        );
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der_len(5), [5]);
        assert_eq!(der_len(0x7f), [0x7f]);
        assert_eq!(der_len(0x80), [0x81, 0x80]);
        assert_eq!(der_len(0x1234), [0x82, 0x12, 0x34]);
    }

    #[test]
    fn jks_chains_are_read_without_the_password() {
        // A JKS file as OpenJDK writes it: one key entry with a chain of
        // two, one trusted certificate entry, the integrity digest.
        let mut f = Vec::new();
        let utf = |f: &mut Vec<u8>, s: &str| {
            f.extend((s.len() as u16).to_be_bytes());
            f.extend(s.as_bytes());
        };
        let cert = |f: &mut Vec<u8>, der: &[u8]| {
            utf(f, "X.509");
            f.extend((der.len() as u32).to_be_bytes());
            f.extend(der);
        };
        f.extend(0xFEED_FEEDu32.to_be_bytes());
        f.extend(2u32.to_be_bytes());
        f.extend(2u32.to_be_bytes());
        f.extend(2u32.to_be_bytes());
        utf(&mut f, "ca");
        f.extend(0u64.to_be_bytes());
        cert(&mut f, b"root");
        f.extend(1u32.to_be_bytes());
        utf(&mut f, "web");
        f.extend(0u64.to_be_bytes());
        f.extend(3u32.to_be_bytes());
        f.extend(b"key");
        f.extend(2u32.to_be_bytes());
        cert(&mut f, b"leaf");
        cert(&mut f, b"intermediate");
        f.extend([0u8; 20]);
        let c = read_jks(&f, "WEB").unwrap();
        assert_eq!(c.certs, [b"leaf".to_vec(), b"intermediate".to_vec()]);
        assert!(c.digest.is_none());
        assert!(
            read_jks(&f, "other")
                .unwrap_err()
                .contains("no key entry with alias")
        );
        assert!(read_jks(&f[..30], "web").unwrap_err().contains("truncated"));
        assert!(
            read_jks(b"PK\x03\x04", "web")
                .unwrap_err()
                .contains("magic")
        );
    }

    use crate::bundle::tests::{
        P256_PKCS8, P256_SEC1, P384_PKCS8, P384_SEC1, RSA_PKCS1, RSA_PKCS8, bundle_for_key, pem_der,
    };

    #[test]
    fn keys_of_every_format_become_the_pkcs8_openssl_writes() {
        for (key, pkcs8) in [
            (RSA_PKCS1, RSA_PKCS8),
            (RSA_PKCS8, RSA_PKCS8),
            (P256_SEC1, P256_PKCS8),
            (P384_SEC1, P384_PKCS8),
        ] {
            let signer = rcgen::KeyPair::from_pem(pkcs8).unwrap();
            let bundle = bundle_for_key(key, &signer);
            assert_eq!(
                pkcs8_der(&bundle.key).as_slice(),
                pem_der(pkcs8).as_slice(),
                "{:?}",
                bundle.key
            );
        }
    }

    #[test]
    fn pkcs12_round_trips_and_is_recognised_despite_fresh_salts() {
        let signer = rcgen::KeyPair::from_pem(P256_PKCS8).unwrap();
        let bundle = bundle_for_key(P256_SEC1, &signer);
        let one = pkcs12(&bundle, "web", "changeit").unwrap();
        let two = pkcs12(&bundle, "web", "changeit").unwrap();
        assert_ne!(one.as_slice(), two.as_slice(), "salts are fresh");
        let want = bundle_digest(&bundle, "web");
        for bytes in [&one, &two] {
            let c = read_pkcs12(bytes, "web", "changeit").unwrap();
            assert_eq!(c.digest, Some(want));
            assert_eq!(
                c.certs,
                [bundle.leaf.der.clone(), bundle.chain[0].der.clone()]
            );
            let (leaf, chain) = certs_of(&c).unwrap();
            assert_eq!(leaf.sha256_hex(), bundle.leaf.sha256_hex());
            assert_eq!(chain.len(), 1);
        }
        // Aliases are case-insensitive in Java.
        assert!(read_pkcs12(&one, "WEB", "changeit").is_ok());
        assert_ne!(bundle_digest(&bundle, "other"), want);
        let e = read_pkcs12(&one, "web", "wrong-password").unwrap_err();
        assert!(e.contains("MAC check failed"), "{e}");
        let e = read_pkcs12(&one, "api", "changeit").unwrap_err();
        assert!(e.contains("no key entry with alias \"api\""), "{e}");
        let e = read_pkcs12(b"-----BEGIN CERTIFICATE-----", "web", "changeit").unwrap_err();
        assert!(e.contains("not a readable PKCS#12 keystore"), "{e}");
    }

    #[test]
    fn store_types_round_trip() {
        for t in [StoreType::Pkcs12, StoreType::Jks] {
            assert_eq!(StoreType::parse(t.as_str()), Some(t));
        }
        assert_eq!(StoreType::parse("PKCS12"), None);
    }
}
