//! Stage 1 of a deploy: parse and check the certificate input.
//!
//! Responsible for turning any number of named PEM inputs (`--cert`/`--key`/
//! `--chain`, a drop bundle, the files of a drop directory) into one
//! [`Bundle`]: exactly one private key, the leaf certificate that key belongs
//! to, and the chain ordered leaf → issuer. Pure code: no filesystem, clock or
//! network access (the caller passes the time in [`CheckOptions`]).
//!
//! Guarantees of a returned [`Bundle`]:
//! - **the leaf's public key is the private key's public key** (SPKI compared
//!   after deriving it from the key with rustls/ring, so the key is usable);
//! - **`chain[0]` issued the leaf and every `chain[i+1]` issued `chain[i]`**:
//!   the issuer name equals the subject name and the signature verifies;
//!   every certificate supplied is on that path (identical copies are merged);
//! - **nothing is expired** and nothing starts later than now + grace;
//! - the leaf covers `server_name` when one is given;
//! - PEM produced by [`Bundle`] and [`Cert`] is normalized (LF, 64 columns,
//!   trailing newline), so equal inputs give byte-identical outputs.
//!
//! A missing intermediate is not an error: a leaf issued directly by a CA
//! whose certificate is not supplied is normal, and the server's clients
//! decide whether they trust what they are sent.
//!
//! **Key material never appears in a `Debug` output or an error message**, and
//! the buffers this module owns that hold it are zeroized on drop. (ring's
//! parsed key and rustls-pki-types' base64 scratch buffer are not ours to
//! zeroize; the caller owns and should zeroize the input bytes.)

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use data_encoding::BASE64;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::{SignatureAlgorithm, SignatureScheme};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use zeroize::{Zeroize, Zeroizing};

/// More certificates than this in one deploy is refused: a leaf and its chain
/// are rarely more than four, and chain building is quadratic in the count.
pub const MAX_CERTIFICATES: usize = 32;

// === Public types ===

/// One named PEM input, e.g. `("--cert", bytes)` or a drop file name.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub name: &'a str,
    pub pem: &'a [u8],
}

impl fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes may hold a private key: show only their size.
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("len", &self.pem.len())
            .finish()
    }
}

/// What [`parse_and_check`] checks against, passed in so the check is pure.
#[derive(Debug, Clone)]
pub struct CheckOptions<'a> {
    /// Now, in seconds since the Unix epoch.
    pub now_unix: i64,
    /// A `not_before` up to this far in the future is accepted (clock skew
    /// between the issuing CA and this host).
    pub clock_skew_grace: Duration,
    /// When set, the leaf must cover it: a DNS SAN (a wildcard matches
    /// exactly one label), an IP SAN, or the CN when there are no SANs.
    pub server_name: Option<&'a str>,
}

/// A checked certificate set, ready to deploy.
#[derive(Debug)]
pub struct Bundle {
    pub leaf: Cert,
    /// Issuer of the leaf first; ends with the self-signed root if supplied.
    pub chain: Vec<Cert>,
    pub key: PrivateKey,
}

/// Facts about one certificate, with its DER.
#[derive(Clone, PartialEq, Eq)]
pub struct Cert {
    pub der: Vec<u8>,
    /// SHA-256 of `der`: the certificate's fingerprint.
    pub sha256: [u8; 32],
    /// RFC 4514-style, e.g. `CN=a.test, O=Example` (control characters escaped).
    pub subject: String,
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// The subject CN, used for name matching only when there are no SANs.
    pub common_name: Option<String>,
    /// Lowercase hex, without leading zero bytes.
    pub serial_hex: String,
}

/// The private key: DER in a zeroize-on-drop buffer, with its format and algorithm.
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
    format: KeyFormat,
    algorithm: KeyAlgorithm,
}

/// Supported private key algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    Rsa,
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

/// How the private key was encoded, which decides its PEM label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyFormat {
    /// `PRIVATE KEY` (RFC 5208/5958)
    Pkcs8,
    /// `RSA PRIVATE KEY` (RFC 8017)
    Pkcs1,
    /// `EC PRIVATE KEY` (RFC 5915)
    Sec1,
}

// === Errors ===

/// Why an input was rejected. Messages never include key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The PEM structure or its base64 is broken.
    #[error("{input}: not valid PEM: {detail}")]
    BadPem { input: String, detail: String },
    /// A PEM block that is neither a certificate nor a private key.
    #[error("{input}: \"{label}\" PEM block is not a certificate or private key: remove it")]
    UnexpectedBlock { input: String, label: String },
    /// An encrypted private key: the agent has no passphrase.
    #[error(
        "{input}: the private key is encrypted: decrypt it first (e.g. openssl pkey -in KEY -out PLAIN_KEY)"
    )]
    EncryptedKey { input: String },
    /// A private key ring cannot use.
    #[error(
        "unsupported private key in {input} (\"{label}\" block): use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key"
    )]
    UnsupportedKey { input: String, label: String },
    /// A CERTIFICATE block whose DER is not an X.509 certificate.
    #[error(
        "{input}: certificate block {index} is not a valid X.509 certificate ({detail}): supply the PEM your CA issued"
    )]
    BadCertificate {
        input: String,
        index: usize,
        detail: String,
    },
    /// More than [`MAX_CERTIFICATES`] distinct certificates.
    #[error("more than {max} certificates supplied: supply the leaf and its chain only")]
    TooManyCertificates { max: usize },
    #[error(
        "no private key found in {inputs}: pass the key with --key or include it in the bundle"
    )]
    NoKey { inputs: String },
    #[error("{count} private keys found ({inputs}): a deploy takes exactly one")]
    MultipleKeys { count: usize, inputs: String },
    #[error("no certificate found in {inputs}: include the certificate issued for the key")]
    NoCertificate { inputs: String },
    /// No certificate carries the key's public key.
    #[error(
        "the private key does not match {} ({certs}): a new certificate with the old key? use the key the certificate was issued for",
        any_of(*.count)
    )]
    KeyMismatch { count: usize, certs: String },
    /// Several distinct certificates carry the key's public key.
    #[error("{count} certificates match the private key ({certs}): supply only the one to deploy")]
    MultipleLeaves { count: usize, certs: String },
    #[error("the {role} {subject} expired on {at}: {}", .role.renew_hint())]
    Expired {
        role: CertRole,
        subject: String,
        at: String,
    },
    #[error(
        "the {role} {subject} is not valid before {at}, more than {grace} from now: check this host's clock, or deploy it later"
    )]
    NotYetValid {
        role: CertRole,
        subject: String,
        at: String,
        grace: String,
    },
    /// A supplied certificate is not on the leaf's issuer path.
    #[error(
        "certificate {subject} (sha256 {fingerprint}) is not part of the chain of {leaf}: remove it, or add the intermediate that links it"
    )]
    ChainUnrelated {
        subject: String,
        fingerprint: String,
        leaf: String,
    },
    /// A certificate has the right name to be the issuer but did not sign.
    #[error(
        "{issuer} claims to issue {subject} but its signature does not verify: supply the intermediate that actually issued it"
    )]
    ChainSignature { issuer: String, subject: String },
    #[error(
        "the leaf {leaf} does not cover server name \"{server_name}\" (it covers: {covers}): fix verify.server_name or deploy a certificate for that name"
    )]
    NameNotCovered {
        leaf: String,
        server_name: String,
        covers: String,
    },
}

/// Which certificate a validity error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Leaf,
    Chain,
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Leaf => "leaf certificate",
            CertRole::Chain => "chain certificate",
        })
    }
}

impl CertRole {
    fn renew_hint(self) -> &'static str {
        match self {
            CertRole::Leaf => "renew the certificate",
            CertRole::Chain => "get the current intermediate from your CA",
        }
    }
}

impl BundleError {
    /// A stable short code for reason files, metrics and scripts.
    pub fn reason(&self) -> &'static str {
        match self {
            BundleError::BadPem { .. } | BundleError::UnexpectedBlock { .. } => "bad_pem",
            BundleError::EncryptedKey { .. } | BundleError::UnsupportedKey { .. } => {
                "unsupported_key"
            }
            BundleError::BadCertificate { .. } => "bad_certificate",
            BundleError::TooManyCertificates { .. } => "too_many_certificates",
            BundleError::NoKey { .. } => "no_key",
            BundleError::MultipleKeys { .. } => "multiple_keys",
            BundleError::NoCertificate { .. } => "no_certificate",
            BundleError::KeyMismatch { .. } => "key_mismatch",
            BundleError::MultipleLeaves { .. } => "multiple_leaves",
            BundleError::Expired { .. } => "expired",
            BundleError::NotYetValid { .. } => "not_yet_valid",
            BundleError::ChainUnrelated { .. } => "chain_unrelated",
            BundleError::ChainSignature { .. } => "chain_signature",
            BundleError::NameNotCovered { .. } => "name_not_covered",
        }
    }
}

// === impl Bundle, Cert, PrivateKey ===

impl Bundle {
    /// The leaf as normalized PEM.
    pub fn leaf_pem(&self) -> String {
        self.leaf.to_pem()
    }

    /// The chain certificates' PEM, issuer of the leaf first; `""` when empty.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(Cert::to_pem).collect()
    }

    /// The leaf then the chain.
    pub fn fullchain_pem(&self) -> String {
        let mut out = self.leaf_pem();
        out.push_str(&self.chain_pem());
        out
    }

    /// The key as PEM with its original label, in a zeroize-on-drop buffer.
    pub fn key_pem(&self) -> Zeroizing<String> {
        self.key.to_pem()
    }
}

impl Cert {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// SHA-256 of the certificate's SubjectPublicKeyInfo: the fingerprint of
    /// the key pair, safe to record (it is the public half).
    pub fn spki_sha256_hex(&self) -> String {
        match x509_parser::parse_x509_certificate(&self.der) {
            Ok((_, cert)) => hex::encode(Sha256::digest(cert.public_key().raw)),
            Err(_) => String::new(),
        }
    }

    /// Normalized PEM: LF line ends, 64-column base64, trailing newline.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        write_pem(&mut out, "CERTIFICATE", &self.der);
        out
    }

    /// Whether the certificate covers `server_name` (DNS SAN with one-label
    /// wildcards, IP SAN, or the CN when the certificate has no SANs).
    pub fn covers(&self, server_name: &str) -> bool {
        let name = server_name.strip_suffix('.').unwrap_or(server_name);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.ip_addresses.contains(&ip);
        }
        if self.dns_names.is_empty() && self.ip_addresses.is_empty() {
            return self.common_name.iter().any(|cn| dns_name_matches(cn, name));
        }
        self.dns_names.iter().any(|p| dns_name_matches(p, name))
    }

    /// The names [`Cert::covers`] looks at, for messages.
    fn covered_names(&self) -> String {
        let mut names: Vec<String> = self.dns_names.clone();
        names.extend(self.ip_addresses.iter().map(IpAddr::to_string));
        if names.is_empty() {
            names.extend(self.common_name.iter().cloned());
        }
        if names.is_empty() {
            return "no names".to_owned();
        }
        names.join(", ")
    }

    /// The subject for messages (a placeholder when empty).
    fn display_name(&self) -> String {
        match (self.subject.is_empty(), self.dns_names.first()) {
            (false, _) => self.subject.clone(),
            (true, Some(dns)) => format!("(empty subject, DNS {dns})"),
            (true, None) => "(empty subject)".to_owned(),
        }
    }

    /// `9f3ab2c4…7de1`: enough to tell certificates apart in a message.
    fn short_fingerprint(&self) -> String {
        let hex = self.sha256_hex();
        format!("{}…{}", &hex[..8], &hex[hex.len() - 4..])
    }
}

impl fmt::Debug for Cert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cert")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("sha256", &self.sha256_hex())
            .field("not_after", &rfc3339(self.not_after))
            .field("dns_names", &self.dns_names)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub fn format(&self) -> KeyFormat {
        self.format
    }

    /// The key for rustls (borrowed: no copy of the key bytes is made).
    pub fn as_der(&self) -> PrivateKeyDer<'_> {
        let der: &[u8] = &self.der;
        match self.format {
            KeyFormat::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
            KeyFormat::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
            KeyFormat::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
        }
    }

    /// PEM with the original label, in a zeroize-on-drop buffer.
    pub fn to_pem(&self) -> Zeroizing<String> {
        let label = self.format.pem_label();
        // Reserve exactly, so the buffer never reallocates and leaves a copy behind.
        let mut out = Zeroizing::new(String::with_capacity(pem_len(label, self.der.len())));
        write_pem(&mut out, label, &self.der);
        out
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::Rsa => "RSA",
            KeyAlgorithm::EcdsaP256 => "ECDSA P-256",
            KeyAlgorithm::EcdsaP384 => "ECDSA P-384",
            KeyAlgorithm::Ed25519 => "Ed25519",
        })
    }
}

impl KeyFormat {
    pub fn pem_label(self) -> &'static str {
        match self {
            KeyFormat::Pkcs8 => "PRIVATE KEY",
            KeyFormat::Pkcs1 => "RSA PRIVATE KEY",
            KeyFormat::Sec1 => "EC PRIVATE KEY",
        }
    }

    fn from_label(label: &[u8]) -> Option<Self> {
        [KeyFormat::Pkcs8, KeyFormat::Pkcs1, KeyFormat::Sec1]
            .into_iter()
            .find(|f| f.pem_label().as_bytes() == label)
    }
}

// === parse_and_check ===

/// Parse any number of PEM sources that together hold exactly one private
/// key, its leaf certificate and zero or more chain certificates, in any
/// order and any split across sources; then check them (see the module doc).
pub fn parse_and_check(
    sources: &[Source<'_>],
    opts: &CheckOptions<'_>,
) -> Result<Bundle, BundleError> {
    let inputs = sources
        .iter()
        .map(|s| sanitize(s.name))
        .collect::<Vec<_>>()
        .join(", ");

    // 1. PEM: collect key blocks and (deduplicated) certificate DER.
    let mut keys: Vec<(&str, KeyFormat, Zeroizing<Vec<u8>>)> = Vec::new();
    let mut ders: Vec<(&str, usize, Vec<u8>)> = Vec::new();
    for source in sources {
        let mut cert_index = 0;
        for block in split_pem(source)? {
            if block.label == b"CERTIFICATE" {
                cert_index += 1;
                let der = decode_block(source.name, &block, SectionKind::Certificate)?;
                if !ders.iter().any(|(_, _, d)| *d == *der) {
                    // Checked while collecting: deduplicating is quadratic.
                    if ders.len() == MAX_CERTIFICATES {
                        return Err(BundleError::TooManyCertificates {
                            max: MAX_CERTIFICATES,
                        });
                    }
                    ders.push((source.name, cert_index, der.to_vec()));
                }
            } else if let Some(format) = KeyFormat::from_label(block.label) {
                let kind = match format {
                    KeyFormat::Pkcs8 => SectionKind::PrivateKey,
                    KeyFormat::Pkcs1 => SectionKind::RsaPrivateKey,
                    KeyFormat::Sec1 => SectionKind::EcPrivateKey,
                };
                keys.push((
                    source.name,
                    format,
                    decode_block(source.name, &block, kind)?,
                ));
            } else if block.label == b"ENCRYPTED PRIVATE KEY" {
                return Err(BundleError::EncryptedKey {
                    input: sanitize(source.name),
                });
            } else if block.label != b"EC PARAMETERS" {
                // EC PARAMETERS (from `openssl ecparam -genkey`) repeats what the key says.
                return Err(BundleError::UnexpectedBlock {
                    input: sanitize(source.name),
                    label: printable(block.label),
                });
            }
        }
    }

    // 2. Exactly one key, usable by ring.
    let (key_source, format, key_der) = match keys.len() {
        0 => return Err(BundleError::NoKey { inputs }),
        1 => keys.remove(0),
        count => {
            let mut names: Vec<String> = keys.iter().map(|(name, _, _)| sanitize(name)).collect();
            names.dedup();
            return Err(BundleError::MultipleKeys {
                count,
                inputs: names.join(", "),
            });
        }
    };
    let mut key = PrivateKey {
        der: key_der,
        format,
        algorithm: KeyAlgorithm::Rsa,
    };
    let spki = key_spki(&mut key).ok_or_else(|| BundleError::UnsupportedKey {
        input: sanitize(key_source),
        label: format.pem_label().to_owned(),
    })?;

    // 3. Certificates.
    if ders.is_empty() {
        return Err(BundleError::NoCertificate { inputs });
    }
    let mut certs = Vec::with_capacity(ders.len());
    for (name, index, der) in &ders {
        certs.push(parse_cert(name, *index, der)?);
    }

    // 4. The leaf: the one certificate carrying the key's public key.
    let leaves: Vec<usize> = (0..certs.len())
        .filter(|&i| spki_matches(certs[i].0.public_key(), &spki))
        .collect();
    let leaf = match leaves.as_slice() {
        [one] => *one,
        [] => {
            return Err(BundleError::KeyMismatch {
                count: certs.len(),
                certs: list_certs(certs.iter().map(|c| &c.1)),
            });
        }
        many => {
            return Err(BundleError::MultipleLeaves {
                count: many.len(),
                certs: list_certs(many.iter().map(|&i| &certs[i].1)),
            });
        }
    };

    // 5. The chain, by issuer linkage; everything supplied must be on it.
    let path = order_chain(&certs, leaf)?;
    if let Some(stray) = (0..certs.len()).find(|i| *i != leaf && !path.contains(i)) {
        let stray = &certs[stray].1;
        return Err(BundleError::ChainUnrelated {
            subject: stray.display_name(),
            fingerprint: stray.short_fingerprint(),
            leaf: certs[leaf].1.display_name(),
        });
    }

    let bundle = Bundle {
        leaf: certs[leaf].1.clone(),
        chain: path.iter().map(|&i| certs[i].1.clone()).collect(),
        key,
    };
    // 6. Validity, then the name.
    check_against(&bundle, opts)?;
    Ok(bundle)
}

/// The checks of a parsed bundle that depend on the time and the target:
/// the validity of the leaf and of each chain certificate, and that the
/// leaf covers `opts.server_name`. A drop's bundle is parsed once and
/// checked here once per target.
pub fn check_against(bundle: &Bundle, opts: &CheckOptions<'_>) -> Result<(), BundleError> {
    check_validity(&bundle.leaf, CertRole::Leaf, opts)?;
    for cert in &bundle.chain {
        check_validity(cert, CertRole::Chain, opts)?;
    }
    if let Some(server_name) = opts.server_name
        && !bundle.leaf.covers(server_name)
    {
        return Err(BundleError::NameNotCovered {
            leaf: bundle.leaf.display_name(),
            server_name: printable(server_name.as_bytes()),
            covers: bundle.leaf.covered_names(),
        });
    }
    Ok(())
}

/// Parse one certificate's facts from DER (e.g. to describe what is on disk).
pub fn cert_from_der(der: Vec<u8>) -> Result<Cert, BundleError> {
    let (_, cert) = parse_cert("input", 1, &der)?;
    Ok(cert)
}

/// The first certificate in a PEM text; `Ok(None)` when it holds none.
/// Other blocks (a key in a combined file, say) are skipped, not decoded.
pub fn first_cert_in_pem(pem: &[u8]) -> Result<Option<Cert>, BundleError> {
    let source = Source { name: "input", pem };
    let blocks = split_pem(&source)?;
    match blocks.iter().find(|b| b.label == b"CERTIFICATE") {
        None => Ok(None),
        Some(block) => {
            let der = decode_block(source.name, block, SectionKind::Certificate)?;
            let (_, cert) = parse_cert(source.name, 1, &der)?;
            Ok(Some(cert))
        }
    }
}

/// Every certificate in a PEM text, in file order (other blocks skipped).
pub fn certs_in_pem(pem: &[u8]) -> Result<Vec<Cert>, BundleError> {
    let source = Source { name: "input", pem };
    let mut certs = Vec::new();
    for (i, block) in split_pem(&source)?
        .iter()
        .filter(|b| b.label == b"CERTIFICATE")
        .enumerate()
    {
        let der = decode_block(source.name, block, SectionKind::Certificate)?;
        certs.push(parse_cert(source.name, i + 1, &der)?.1);
    }
    Ok(certs)
}

pub use crate::model::fmt::rfc3339;

// === PEM ===

/// One `-----BEGIN label-----` … `-----END label-----` block, borrowed.
struct Block<'a> {
    label: &'a [u8],
    /// Body lines, trimmed.
    body: Vec<&'a [u8]>,
}

/// Split a source into PEM blocks. Text outside blocks is ignored (openssl
/// writes `subject=` and `Bag Attributes` lines there); a non-empty source
/// with no block at all is an error. Lines may end in CRLF, LF or CR and
/// carry surrounding whitespace.
fn split_pem<'a>(source: &Source<'a>) -> Result<Vec<Block<'a>>, BundleError> {
    let bad = |detail: String| BundleError::BadPem {
        input: sanitize(source.name),
        detail,
    };
    let mut blocks = Vec::new();
    let mut open: Option<Block<'a>> = None;
    for line in source.pem.split(|b| *b == b'\n' || *b == b'\r') {
        let line = line.trim_ascii();
        if let Some(rest) = line.strip_prefix(b"-----BEGIN ") {
            let label = rest
                .strip_suffix(b"-----")
                .ok_or_else(|| bad("malformed \"-----BEGIN\" line".to_owned()))?;
            if let Some(outer) = &open {
                return Err(bad(format!(
                    "\"{}\" block starts inside the unterminated \"{}\" block",
                    printable(label),
                    printable(outer.label)
                )));
            }
            open = Some(Block {
                label: label.trim_ascii(),
                body: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix(b"-----END ") {
            let label = rest.strip_suffix(b"-----").unwrap_or(rest).trim_ascii();
            match open.take() {
                Some(block) if block.label == label => blocks.push(block),
                Some(block) => {
                    return Err(bad(format!(
                        "\"{}\" block ends with an END line for \"{}\"",
                        printable(block.label),
                        printable(label)
                    )));
                }
                None => {
                    return Err(bad(format!(
                        "END line for \"{}\" without a BEGIN line",
                        printable(label)
                    )));
                }
            }
        } else if let Some(block) = &mut open
            && !line.is_empty()
        {
            block.body.push(line);
        }
    }
    if let Some(block) = open {
        return Err(bad(format!(
            "the \"{}\" block has no END line (truncated file?)",
            printable(block.label)
        )));
    }
    if blocks.is_empty() && !source.pem.trim_ascii().is_empty() {
        return Err(bad(
            "no PEM block found (DER, PKCS#12 and other binary formats must be converted to PEM)"
                .to_owned(),
        ));
    }
    Ok(blocks)
}

/// Decode a block's base64 with rustls-pki-types (constant-time for keys),
/// going through a normalized, zeroized copy of the block.
fn decode_block(
    input: &str,
    block: &Block<'_>,
    kind: SectionKind,
) -> Result<Zeroizing<Vec<u8>>, BundleError> {
    let label = printable(block.label);
    let bad = |detail: String| BundleError::BadPem {
        input: sanitize(input),
        detail,
    };
    if block.body.iter().any(|l| l.contains(&b':')) {
        if block.body.iter().any(|l| l.starts_with(b"Proc-Type:")) {
            return Err(BundleError::EncryptedKey {
                input: sanitize(input),
            });
        }
        return Err(bad(format!(
            "PEM headers in the \"{label}\" block are not supported"
        )));
    }
    let body_len: usize = block.body.iter().map(|l| l.len() + 1).sum();
    let mut text = Zeroizing::new(Vec::with_capacity(2 * block.label.len() + 32 + body_len));
    text.extend_from_slice(b"-----BEGIN ");
    text.extend_from_slice(block.label);
    text.extend_from_slice(b"-----\n");
    for line in &block.body {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    text.extend_from_slice(b"-----END ");
    text.extend_from_slice(block.label);
    text.extend_from_slice(b"-----\n");
    match <(SectionKind, Vec<u8>)>::from_pem_slice(&text) {
        Ok((found, der)) => {
            let der = Zeroizing::new(der);
            if found != kind || der.is_empty() {
                return Err(bad(format!("the \"{label}\" block is empty or unreadable")));
            }
            Ok(der)
        }
        // pki-types' error text can quote input lines: describe it ourselves.
        Err(_) => Err(bad(format!("invalid base64 in the \"{label}\" block"))),
    }
}

/// Normalized PEM length, to reserve exactly.
fn pem_len(label: &str, der_len: usize) -> usize {
    let b64 = BASE64.encode_len(der_len);
    2 * label.len() + 32 + b64 + b64.div_ceil(64)
}

/// Append normalized PEM; base64 goes through a stack line that is zeroized.
fn write_pem(out: &mut String, label: &str, der: &[u8]) {
    out.reserve(pem_len(label, der.len()));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    let mut line = [0u8; 64];
    for chunk in der.chunks(48) {
        let n = BASE64.encode_len(chunk.len());
        BASE64.encode_mut(chunk, &mut line[..n]);
        out.extend(line[..n].iter().map(|&b| char::from(b)));
        out.push('\n');
    }
    line.zeroize();
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// Text from the input (a label, a name) made safe to put in a one-line message.
fn printable(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let mut out: String = text.chars().flat_map(char::escape_default).collect();
    if bytes.len() > MAX {
        out.push('…');
    }
    out
}

/// Escape control characters in a string from the input (a certificate
/// name, a drop file name), so a message stays on one line.
fn sanitize(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

// === Keys and certificates ===

/// The key's SubjectPublicKeyInfo DER, computed by rustls/ring; also sets
/// `key.algorithm`. `None` when ring cannot use the key.
fn key_spki(key: &mut PrivateKey) -> Option<Vec<u8>> {
    let signing = any_supported_type(&key.as_der()).ok()?;
    key.algorithm = match signing.algorithm() {
        SignatureAlgorithm::RSA => KeyAlgorithm::Rsa,
        SignatureAlgorithm::ED25519 => KeyAlgorithm::Ed25519,
        SignatureAlgorithm::ECDSA => {
            if signing
                .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
                .is_some()
            {
                KeyAlgorithm::EcdsaP256
            } else if signing
                .choose_scheme(&[SignatureScheme::ECDSA_NISTP384_SHA384])
                .is_some()
            {
                KeyAlgorithm::EcdsaP384
            } else {
                return None;
            }
        }
        _ => return None,
    };
    Some(signing.public_key()?.as_ref().to_vec())
}

/// Does a certificate's SPKI equal the key's? Byte equality first; then the
/// algorithm OID and key bits, which tolerates an RSA AlgorithmIdentifier
/// written without its NULL parameters.
fn spki_matches(cert: &x509_parser::x509::SubjectPublicKeyInfo<'_>, key_spki: &[u8]) -> bool {
    if cert.raw == key_spki {
        return true;
    }
    match x509_parser::x509::SubjectPublicKeyInfo::from_der(key_spki) {
        Ok((_, key)) => {
            key.algorithm.algorithm == cert.algorithm.algorithm
                && key.subject_public_key.data == cert.subject_public_key.data
        }
        Err(_) => false,
    }
}

/// Parse a certificate and extract its facts; `input`/`index` name it in errors.
fn parse_cert<'d>(
    input: &str,
    index: usize,
    der: &'d [u8],
) -> Result<(X509Certificate<'d>, Cert), BundleError> {
    let bad = |detail: String| BundleError::BadCertificate {
        input: sanitize(input),
        index,
        detail,
    };
    let (rest, x509) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the certificate", rest.len())));
    }
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let san = x509
        .subject_alternative_name()
        .map_err(|e| bad(format!("subject alternative names: {e}")))?;
    for name in san.iter().flat_map(|san| &san.value.general_names) {
        match name {
            GeneralName::DNSName(dns) => dns_names.push(sanitize(dns)),
            GeneralName::IPAddress(bytes) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                    ip_addresses.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                    ip_addresses.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    let serial = x509.raw_serial();
    let first_nonzero = serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    let cert = Cert {
        der: der.to_vec(),
        sha256: Sha256::digest(der).into(),
        subject: sanitize(&x509.subject().to_string()),
        issuer: sanitize(&x509.issuer().to_string()),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        dns_names,
        ip_addresses,
        common_name: x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(sanitize),
        serial_hex: hex::encode(&serial[first_nonzero..]),
    };
    Ok((x509, cert))
}

/// Follow issuer links from the leaf: at each step, the unused certificate
/// whose subject equals the current issuer and whose key verifies the
/// current signature. Stops at a self-signed certificate or when no
/// candidate is supplied. Returns indices, issuer of the leaf first.
fn order_chain(
    certs: &[(X509Certificate<'_>, Cert)],
    leaf: usize,
) -> Result<Vec<usize>, BundleError> {
    let mut path = Vec::new();
    let mut current = leaf;
    loop {
        let cur = &certs[current].0;
        let self_issued = cur.subject().as_raw() == cur.issuer().as_raw();
        if self_issued && cur.verify_signature(None).is_ok() {
            return Ok(path);
        }
        let mut name_only = None;
        let mut next = None;
        for (i, (candidate, _)) in certs.iter().enumerate() {
            if i == leaf
                || path.contains(&i)
                || candidate.subject().as_raw() != cur.issuer().as_raw()
            {
                continue;
            }
            if cur.verify_signature(Some(candidate.public_key())).is_ok() {
                next = Some(i);
                break;
            }
            name_only.get_or_insert(i);
        }
        match (next, name_only) {
            (Some(i), _) => {
                path.push(i);
                current = i;
            }
            (None, Some(i)) => {
                return Err(BundleError::ChainSignature {
                    issuer: certs[i].1.display_name(),
                    subject: certs[current].1.display_name(),
                });
            }
            (None, None) => return Ok(path),
        }
    }
}

fn check_validity(cert: &Cert, role: CertRole, opts: &CheckOptions<'_>) -> Result<(), BundleError> {
    if cert.not_after <= opts.now_unix {
        return Err(BundleError::Expired {
            role,
            subject: cert.display_name(),
            at: rfc3339(cert.not_after),
        });
    }
    let grace = i64::try_from(opts.clock_skew_grace.as_secs()).unwrap_or(i64::MAX);
    if cert.not_before > opts.now_unix.saturating_add(grace) {
        return Err(BundleError::NotYetValid {
            role,
            subject: cert.display_name(),
            at: rfc3339(cert.not_before),
            grace: humantime::format_duration(opts.clock_skew_grace).to_string(),
        });
    }
    Ok(())
}

/// `pattern` (a SAN or CN) matches `name`: ASCII case-insensitive, a
/// leading `*.` matches exactly one non-empty label.
fn dns_name_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    match pattern.strip_prefix("*.") {
        Some(suffix) => match name.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
            None => false,
        },
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// "the certificate" or "any of the 3 certificates".
fn any_of(count: usize) -> String {
    match count {
        1 => "the certificate".to_owned(),
        n => format!("any of the {n} certificates"),
    }
}

/// `CN=a.test 9f3ab2c4…7de1, CN=Intermediate 0c1d2e3f…a1b2`
fn list_certs<'c>(certs: impl Iterator<Item = &'c Cert>) -> String {
    certs
        .map(|c| format!("{} {}", c.display_name(), c.short_fingerprint()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    const NOW: i64 = 1_750_000_000; // 2025-06-15T15:06:40Z
    const DAY: i64 = 86_400;
    const NOW_RFC3339: &str = "2025-06-15T15:06:40Z";

    // Keys made with OpenSSL 3.0 for these tests only (ring cannot generate RSA,
    // and writes neither SEC1 nor PKCS#8 v1). `*_PKCS8` is the same key as the
    // fixture above it, converted with `openssl pkey`, for rcgen to sign with.
    pub(crate) const RSA_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEArXDNpyI9P+6GZSWuFMsbc7Z60VQjFhdIuCoz0PD3EY65IYFC
O1Y59M7DeShu10Ql12FZs3ROFCtJBR42Adk+jmyzs2Ang9ctiwlnI9Lks7dAmifE
YNmakXNwupUle2lBgY+UpzQK9CzcG+7k2xvnVKXOW97yfjRAku838wvOxchi5+3Z
ACbUSJR4ffOwJ9B8DRftguJl7itWpL+A6THPbO6ChdSFSOUF/TCuU+rzLZ96XGog
hebkZ+N4aAjmG3g3MpJTgoBttVFb58LtoezZH8RjPHEBrsaHGguu6pslXL9nGntd
ZM5q93ynQKFW9JqHtedfKb/hPPZFnBCATeFDbQIDAQABAoIBADfimhFZgfzgoaNj
0cTXcSAG02oxvyB2HjNhPdL8Yc/hehump62w6fnMycV3Vse8KKlOr/WX6zSqgdvJ
UUOlOXfw5LJOsEzV/9HGFNrBMHoL+R/y4l8GnrxxQwiL2Ej8sGPL3O1HYqQs9Dt3
7XwAcLiguG531xD9SzVNKW0CB/1IPO/76KDpCRZIRhxnK5w1Oee2onjiVMEDJuPi
22rQwPq0Kuw895vKzuxv7wfs6MmpYa9xB5EWdKsQ5J+RGhLFImyLN4c2JcHDxitM
l7ZMy0lvi5FKhq3VjDDbba2aij+CUWczZ/T4WOKyycnKGGGafsWZ5soFBgHGnqE4
sMZXh80CgYEA5dglrrHr8g9w417yvhfTHtAh0iLVs15T/KC6+w21qwf3ZnL89/We
cY53UNSkRGGaU95JePfHB3cWFGVAMPYaOco73rfBlBVl/P1gPBvQY05+luyFT/2v
LrynF8NeE8bt2rWZavbUombMa3FblNMZtFyTHOhAUI2tYngfx6ep/fcCgYEAwS1/
QCEKL5aBZanqv5DbxSs08zGJSg7atfrU4EYwXTu4pQuz8ugBxgMotW0wfTtCE3Y6
E4IrxU6ElYcJU8OUvy84A8Cmqkw9kKezPPN3TWiwrIDrokRbm+7ih3Qkz//jKgKa
stcaJC16cDKulVDnx/be4Typ3JzyfovUeZLBQLsCgYAU/zj6C5D1bQmwC8V7LiwA
PZ1JWBtTpoNfqcNLGgaFmFW2izym3k5aK1ylCrfy80Oo876ciW4qNWvT8yf5ERJ2
Qw5TG1BY2deWVANNmnDgEZSo7vSCyTcOuvc8yYE3p02lVD+usNvd9iwoiJOINfy8
KFTcKC9v7HFxdG3azGtQIwKBgBCTDcL70rroh+uoG4saK7EMFvvyuRvQkHVisxcX
DplBQYNvsJ3byCMsLDb8yldEWVQAJdV8qrLAHOITdvpn4oBQ1daElggwiGu758YI
AalznQz/9reyc8W6Rldm4K2z/9Kf7JQBnq2R9VphDtei3HAsv0zF/rD+ClRPPQi9
TbV3AoGBAMW6PQcd46o35C0zslkOzHwDKTpxtV90bLX/jclHToQmvedaLLqWSPzG
a5pYggM+qB3bJPQxgCYkV6CSPXQlbUQRSWpaXrbeiNfAM8ToGLAQedW1SRWt7J0B
+puMFQ5xokj+diSf4dctj40Dk+97by9EoZ/VuI9tfAHbGJqLuql+
-----END RSA PRIVATE KEY-----
";
    /// Also the RSA key of the verification tests (ring cannot generate one).
    pub(crate) const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCtcM2nIj0/7oZl
Ja4UyxtztnrRVCMWF0i4KjPQ8PcRjrkhgUI7Vjn0zsN5KG7XRCXXYVmzdE4UK0kF
HjYB2T6ObLOzYCeD1y2LCWcj0uSzt0CaJ8Rg2ZqRc3C6lSV7aUGBj5SnNAr0LNwb
7uTbG+dUpc5b3vJ+NECS7zfzC87FyGLn7dkAJtRIlHh987An0HwNF+2C4mXuK1ak
v4DpMc9s7oKF1IVI5QX9MK5T6vMtn3pcaiCF5uRn43hoCOYbeDcyklOCgG21UVvn
wu2h7NkfxGM8cQGuxocaC67qmyVcv2cae11kzmr3fKdAoVb0moe1518pv+E89kWc
EIBN4UNtAgMBAAECggEAN+KaEVmB/OCho2PRxNdxIAbTajG/IHYeM2E90vxhz+F6
G6anrbDp+czJxXdWx7woqU6v9ZfrNKqB28lRQ6U5d/Dksk6wTNX/0cYU2sEwegv5
H/LiXwaevHFDCIvYSPywY8vc7UdipCz0O3ftfABwuKC4bnfXEP1LNU0pbQIH/Ug8
7/vooOkJFkhGHGcrnDU557aieOJUwQMm4+LbatDA+rQq7Dz3m8rO7G/vB+zoyalh
r3EHkRZ0qxDkn5EaEsUibIs3hzYlwcPGK0yXtkzLSW+LkUqGrdWMMNttrZqKP4JR
ZzNn9PhY4rLJycoYYZp+xZnmygUGAcaeoTiwxleHzQKBgQDl2CWusevyD3DjXvK+
F9Me0CHSItWzXlP8oLr7DbWrB/dmcvz39Z5xjndQ1KREYZpT3kl498cHdxYUZUAw
9ho5yjvet8GUFWX8/WA8G9BjTn6W7IVP/a8uvKcXw14Txu3atZlq9tSiZsxrcVuU
0xm0XJMc6EBQja1ieB/Hp6n99wKBgQDBLX9AIQovloFlqeq/kNvFKzTzMYlKDtq1
+tTgRjBdO7ilC7Py6AHGAyi1bTB9O0ITdjoTgivFToSVhwlTw5S/LzgDwKaqTD2Q
p7M883dNaLCsgOuiRFub7uKHdCTP/+MqApqy1xokLXpwMq6VUOfH9t7hPKncnPJ+
i9R5ksFAuwKBgBT/OPoLkPVtCbALxXsuLAA9nUlYG1Omg1+pw0saBoWYVbaLPKbe
TlorXKUKt/LzQ6jzvpyJbio1a9PzJ/kREnZDDlMbUFjZ15ZUA02acOARlKju9ILJ
Nw669zzJgTenTaVUP66w2932LCiIk4g1/LwoVNwoL2/scXF0bdrMa1AjAoGAEJMN
wvvSuuiH66gbixorsQwW+/K5G9CQdWKzFxcOmUFBg2+wndvIIywsNvzKV0RZVAAl
1XyqssAc4hN2+mfigFDV1oSWCDCIa7vnxggBqXOdDP/2t7JzxbpGV2bgrbP/0p/s
lAGerZH1WmEO16LccCy/TMX+sP4KVE89CL1NtXcCgYEAxbo9Bx3jqjfkLTOyWQ7M
fAMpOnG1X3Rstf+NyUdOhCa951osupZI/MZrmliCAz6oHdsk9DGAJiRXoJI9dCVt
RBFJalpett6I18AzxOgYsBB51bVJFa3snQH6m4wVDnGiSP52JJ/h1y2PjQOT73tv
L0Shn9W4j218AdsYmou6qX4=
-----END PRIVATE KEY-----
";
    /// `openssl ecparam -genkey` output: an EC PARAMETERS block, then SEC1.
    pub(crate) const P256_SEC1: &str = "-----BEGIN EC PARAMETERS-----
BggqhkjOPQMBBw==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIMvE3H5ISuufWeqk/pQWw8gfH7lJuYGHC0+hb+3MLXkfoAoGCCqGSM49
AwEHoUQDQgAEI+c3wTavfUgOvBxFAqlx/dBWEG0TObmfzy4hTiwwZ0aq6zvlrgTN
bEAxfepuqgPeUmIExqgXF1B46ouFXTlbrg==
-----END EC PRIVATE KEY-----
";
    pub(crate) const P256_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgy8TcfkhK659Z6qT+
lBbDyB8fuUm5gYcLT6Fv7cwteR+hRANCAAQj5zfBNq99SA68HEUCqXH90FYQbRM5
uZ/PLiFOLDBnRqrrO+WuBM1sQDF96m6qA95SYgTGqBcXUHjqi4VdOVuu
-----END PRIVATE KEY-----
";
    pub(crate) const P384_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MIGkAgEBBDB3yYzDC58uaTkPJ2QmQMRaHMi+u829Oy1kNHRDs90PD2WSpnCEtxaW
8ngtmWtBy/SgBwYFK4EEACKhZANiAASB2PRNHFCuHKT8Vsl/ozAW7CEj7BGhlyWK
Jpw6OAUc07gGy+Y4YEa+IDgBSU1T93USDGRNVy//+ZgWez1b2gSmm/ZU1zDL1s65
uk/RR9lGRxkNuYxV0dfoj5DlpZvTKvs=
-----END EC PRIVATE KEY-----
";
    pub(crate) const P384_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDB3yYzDC58uaTkPJ2Qm
QMRaHMi+u829Oy1kNHRDs90PD2WSpnCEtxaW8ngtmWtBy/ShZANiAASB2PRNHFCu
HKT8Vsl/ozAW7CEj7BGhlyWKJpw6OAUc07gGy+Y4YEa+IDgBSU1T93USDGRNVy//
+ZgWez1b2gSmm/ZU1zDL1s65uk/RR9lGRxkNuYxV0dfoj5DlpZvTKvs=
-----END PRIVATE KEY-----
";
    /// PKCS#8 v1 (no public key), as OpenSSL writes Ed25519 keys.
    const ED25519_V1: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIBmPX2mFBKCMe/DtoUeq2AngFj/2uOYiY2J6esvwAFtC
-----END PRIVATE KEY-----
";
    const ED448: &str = "-----BEGIN PRIVATE KEY-----
MEcCAQAwBQYDK2VxBDsEOSD1pHiE3jqgD+KuByzUkk9dMGfSdirQr2rW0O6pMDZC
z1sDQVNpjnKBBZlxzTQ0OHIl3fbU0n9ROw==
-----END PRIVATE KEY-----
";
    const RSA_1024: &str = "-----BEGIN PRIVATE KEY-----
MIICdwIBADANBgkqhkiG9w0BAQEFAASCAmEwggJdAgEAAoGBANG63RvhYYX2xHBA
y6uCNkBES4j3j/tGYZoGLSBIprQDtrS804JfO+v3ryjhft9fvGMKmoUc7iUvj64X
oTkfGsjFCvsMDt1mrYUON/mPXX3adQ7Kc0NKPYEZhy8spZ37VctPe/qZjTNMyMzT
bRMu3x0h4Ft+2fXSatGRkKkuGVHDAgMBAAECgYAt+7t43myEc7tUJVDCdNUyOAcb
q7O80wyZOZtxRZyPQXUwoWn6XqkDrpWP8AjiLtpeGLgSUWqBarEk6Xdmz8QONN84
SaNnKEda83cgrKGEyI22sgZoEMhoRvqmZiLU+hIAe2e68V1/hxF96PPaGOqgjN1q
MK1oedmV3n+M3U/M4QJBAP6HUL8PMghV9EMgXbeM6rkmd+VBbdH6bIPpg1kBtq/T
u84lpnZ9KkikasvphU6/RuSEZK5o5MmdawX06kKx3/ECQQDS8T/aFxVcw92jM1QD
Pz28cOYcR8OPqfw9n5IfMcDnJnCvWj30RQW1yVM3WryO0QKOtVQv2q2G1SNFJ+qp
HcDzAkEAr9sODvOQvfGlMjvKhGb4RbQuYlcyaUF8eCd+eKCWeCTyPRwGRxdzf30Z
zIkrcZz2fix644XVjPcWWqc8s5fyAQJBALHZ5lQjEkfcfIqVREhYkdzH87v0ZdZD
JAFxAOp8MICz0F6IX6QMbfwPerI5NrHTV6yrBggzAAumuM4eEaP1CjECQDfIkDY3
VFLoCl2jWUxPSP2oUb/0kPY4wgF8pgQwGhWjmsOW/W8KsLCb6dleSrkszUMqZWJW
PLR1NGTitwEHbwA=
-----END PRIVATE KEY-----
";

    // --- helpers ---

    fn opts() -> CheckOptions<'static> {
        CheckOptions {
            now_unix: NOW,
            clock_skew_grace: Duration::from_secs(300),
            server_name: None,
        }
    }

    fn params(cn: &str, sans: &[&str], from: i64, to: i64) -> CertificateParams {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = time::OffsetDateTime::from_unix_timestamp(from).expect("time");
        p.not_after = time::OffsetDateTime::from_unix_timestamp(to).expect("time");
        p
    }

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca_valid(cn: &str, parent: Option<&Ca>, from: i64, to: i64) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = params(cn, &[], from, to);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = match parent {
            Some(parent) => p.signed_by(&key, &parent.issuer),
            None => p.self_signed(&key),
        }
        .expect("sign");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
        ca_valid(cn, parent, NOW - 365 * DAY, NOW + 3650 * DAY)
    }

    fn leaf_valid(cn: &str, sans: &[&str], key: &KeyPair, ca: &Ca, from: i64, to: i64) -> String {
        params(cn, sans, from, to)
            .signed_by(key, &ca.issuer)
            .expect("sign")
            .pem()
    }

    fn leaf(key: &KeyPair, ca: &Ca) -> String {
        leaf_valid(
            "a.test",
            &["a.test", "*.a.test"],
            key,
            ca,
            NOW - DAY,
            NOW + 90 * DAY,
        )
    }

    /// Root → intermediate → leaf `CN=a.test` for a P-256 key.
    struct Pki {
        root: Ca,
        inter: Ca,
        key: String,
        leaf: String,
    }

    fn pki() -> Pki {
        let root = ca("Test Root", None);
        let inter = ca("Test Intermediate", Some(&root));
        let key = KeyPair::generate().expect("key");
        let leaf = leaf(&key, &inter);
        Pki {
            root,
            inter,
            key: key.serialize_pem(),
            leaf,
        }
    }

    /// A checked bundle of root → intermediate → leaf `a.test` whose key is
    /// `key_pem` (any format), signed with the same key as `signer`: for
    /// tests of code that lays a bundle out (keystores).
    pub(crate) fn bundle_for_key(key_pem: &str, signer: &KeyPair) -> Bundle {
        let root = ca("Test Root", None);
        let inter = ca("Test Intermediate", Some(&root));
        let leaf = leaf(signer, &inter);
        check(&[
            ("key", key_pem.as_bytes()),
            ("leaf", leaf.as_bytes()),
            ("chain", inter.pem.as_bytes()),
        ])
        .expect("fixture bundle")
    }

    /// The DER inside a PEM block.
    pub(crate) fn pem_der(pem: &str) -> Vec<u8> {
        pem_body_der(pem)
    }

    fn fp(pem: &str) -> String {
        first_cert_in_pem(pem.as_bytes())
            .expect("pem")
            .expect("a certificate")
            .sha256_hex()
    }

    /// Run the check; on error, assert that nothing of any key in the input
    /// leaks into the message or the `Debug` of the error.
    fn check_with(
        sources: &[(&str, &[u8])],
        opts: &CheckOptions<'_>,
    ) -> Result<Bundle, BundleError> {
        let srcs: Vec<Source<'_>> = sources
            .iter()
            .map(|(name, pem)| Source { name, pem })
            .collect();
        let result = parse_and_check(&srcs, opts);
        if let Err(err) = &result {
            let text = format!("{err} / {err:?}");
            assert_no_key_material(&text, sources);
            assert!(!err.reason().is_empty());
        }
        result
    }

    fn check(sources: &[(&str, &[u8])]) -> Result<Bundle, BundleError> {
        check_with(sources, &opts())
    }

    fn expect_err(sources: &[(&str, &[u8])], opts: &CheckOptions<'_>, reason: &str, needle: &str) {
        match check_with(sources, opts) {
            Ok(b) => panic!("expected {reason}, got a bundle for {}", b.leaf.subject),
            Err(err) => {
                assert_eq!(err.reason(), reason, "{err}");
                assert!(err.to_string().contains(needle), "{err:?} lacks {needle:?}");
            }
        }
    }

    /// No 12-character run of any key block's base64, nor 16 hex digits of
    /// its DER, appears in `text`.
    fn assert_no_key_material(text: &str, sources: &[(&str, &[u8])]) {
        for (_, pem) in sources {
            let pem = String::from_utf8_lossy(pem);
            let mut in_key = false;
            let mut body = String::new();
            for line in pem.lines().map(str::trim) {
                if line.starts_with("-----BEGIN") {
                    in_key = line.contains("PRIVATE KEY");
                } else if line.starts_with("-----END") {
                    in_key = false;
                } else if in_key && !line.contains(':') {
                    body.push_str(line);
                }
            }
            assert!(!text.contains("PRIVATE KEY-----"), "{text}");
            let chars: Vec<char> = body.chars().collect();
            for w in chars.windows(12) {
                let w: String = w.iter().collect();
                assert!(!text.contains(&w), "key base64 {w} leaked into: {text}");
            }
            if let Ok(der) = BASE64.decode(body.as_bytes()) {
                let hex = hex::encode(der);
                for i in 0..hex.len().saturating_sub(16) {
                    assert!(
                        !text.contains(&hex[i..i + 16]),
                        "key hex leaked into: {text}"
                    );
                }
            }
        }
    }

    type Sources<'a> = Vec<(&'a str, &'a str)>;

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for at in 0..=p.len() {
                let mut q = p.clone();
                q.insert(at, n - 1);
                out.push(q);
            }
        }
        out
    }

    // --- tests ---

    #[test]
    fn every_key_algorithm_and_format_matches_its_leaf() {
        let generated = |alg| {
            let key = KeyPair::generate_for(alg).expect("generate");
            (key.serialize_pem(), key)
        };
        let from_pem = |pem: &str| KeyPair::from_pem(pem).expect("fixture");
        let (p256, p256_key) = generated(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (p384, p384_key) = generated(&rcgen::PKCS_ECDSA_P384_SHA384);
        let (ed, ed_key) = generated(&rcgen::PKCS_ED25519);
        let cases: Vec<(&str, &str, KeyPair, KeyAlgorithm, KeyFormat)> = vec![
            (
                "rsa pkcs#8",
                RSA_PKCS8,
                from_pem(RSA_PKCS8),
                KeyAlgorithm::Rsa,
                KeyFormat::Pkcs8,
            ),
            (
                "rsa pkcs#1",
                RSA_PKCS1,
                from_pem(RSA_PKCS8),
                KeyAlgorithm::Rsa,
                KeyFormat::Pkcs1,
            ),
            (
                "p-256 pkcs#8",
                &p256,
                p256_key,
                KeyAlgorithm::EcdsaP256,
                KeyFormat::Pkcs8,
            ),
            (
                "p-256 sec1",
                P256_SEC1,
                from_pem(P256_PKCS8),
                KeyAlgorithm::EcdsaP256,
                KeyFormat::Sec1,
            ),
            (
                "p-384 pkcs#8",
                &p384,
                p384_key,
                KeyAlgorithm::EcdsaP384,
                KeyFormat::Pkcs8,
            ),
            (
                "p-384 sec1",
                P384_SEC1,
                from_pem(P384_PKCS8),
                KeyAlgorithm::EcdsaP384,
                KeyFormat::Sec1,
            ),
            (
                "ed25519 pkcs#8 v2",
                &ed,
                ed_key,
                KeyAlgorithm::Ed25519,
                KeyFormat::Pkcs8,
            ),
            (
                "ed25519 pkcs#8 v1",
                ED25519_V1,
                from_pem(ED25519_V1),
                KeyAlgorithm::Ed25519,
                KeyFormat::Pkcs8,
            ),
        ];
        let root = ca("Test Root", None);
        for (name, key_pem, signer, algorithm, format) in cases {
            let leaf = leaf(&signer, &root);
            // A decoy leaf for another key: the right one must be picked.
            let other = leaf_valid(
                "b.test",
                &["b.test"],
                &KeyPair::generate().expect("key"),
                &root,
                NOW - DAY,
                NOW + DAY,
            );
            let b = check(&[("--cert", leaf.as_bytes()), ("--key", key_pem.as_bytes())])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(b.key.algorithm(), algorithm, "{name}");
            assert_eq!(b.key.format(), format, "{name}");
            assert_eq!(b.leaf.sha256_hex(), fp(&leaf), "{name}");
            // key_pem keeps the label and re-parses to the same key.
            let again = b.key_pem();
            assert!(
                again.starts_with(&format!("-----BEGIN {}-----\n", format.pem_label())),
                "{name}"
            );
            let b2 =
                check(&[("--cert", leaf.as_bytes()), ("--key", again.as_bytes())]).expect(name);
            assert_eq!(
                b2.key.as_der().secret_der(),
                b.key.as_der().secret_der(),
                "{name}"
            );
            // The decoy is not part of the chain.
            let with_decoy = [leaf.as_str(), other.as_str(), key_pem].concat();
            expect_err(
                &[("bundle.pem", with_decoy.as_bytes())],
                &opts(),
                "chain_unrelated",
                "CN=b.test (sha256 ",
            );
        }
        assert_eq!(KeyAlgorithm::EcdsaP384.to_string(), "ECDSA P-384");
    }

    #[test]
    fn openssl_keys_come_back_byte_identical() {
        // EC PARAMETERS is dropped: the SEC1 key names its curve.
        let p256_key = P256_SEC1
            .split_once("-----END EC PARAMETERS-----\n")
            .expect("fixture")
            .1;
        for (key, signer) in [
            (RSA_PKCS1, RSA_PKCS8),
            (RSA_PKCS8, RSA_PKCS8),
            (P256_SEC1, P256_PKCS8),
            (P384_SEC1, P384_PKCS8),
            (ED25519_V1, ED25519_V1),
        ] {
            let root = ca("Test Root", None);
            let leaf = leaf(&KeyPair::from_pem(signer).expect("fixture"), &root);
            let b =
                check(&[("--cert", leaf.as_bytes()), ("--key", key.as_bytes())]).expect("bundle");
            let expected = if key == P256_SEC1 { p256_key } else { key };
            assert_eq!(b.key_pem().as_str(), expected);
        }
    }

    #[test]
    fn unsupported_keys_are_rejected() {
        let root = ca("Test Root", None);
        let leaf = leaf(&KeyPair::generate().expect("key"), &root);
        let junk_key = "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n";
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAgFPrgTx7rsggICCAAw\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let legacy_encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0123456789ABCDEF0123456789ABCDEF\n\nMIIEowIBAAKCAQEArXDNpyI9P+6GZSWuFMsbc7Z60VQjFhdIuCoz0PD3EY65IYFC\n-----END RSA PRIVATE KEY-----\n";
        let cases = [
            (
                ED448,
                "unsupported private key in --key (\"PRIVATE KEY\" block)",
            ),
            (RSA_1024, "use an RSA (2048 bits or more)"),
            (junk_key, "unsupported private key in --key"),
            (
                encrypted,
                "--key: the private key is encrypted: decrypt it first",
            ),
            (legacy_encrypted, "--key: the private key is encrypted"),
        ];
        for (key, needle) in cases {
            expect_err(
                &[("--cert", leaf.as_bytes()), ("--key", key.as_bytes())],
                &opts(),
                "unsupported_key",
                needle,
            );
        }
    }

    #[test]
    fn one_bundle_in_any_order() {
        let p = pki();
        let parts = [
            p.key.as_str(),
            p.leaf.as_str(),
            p.inter.pem.as_str(),
            p.root.pem.as_str(),
        ];
        for n in [3, 4] {
            for order in permutations(n) {
                let text: String = order.iter().map(|&i| parts[i]).collect();
                let b = check(&[("web.pem", text.as_bytes())])
                    .unwrap_or_else(|e| panic!("{order:?}: {e}"));
                assert_eq!(b.leaf.sha256_hex(), fp(&p.leaf), "{order:?}");
                let chain: Vec<String> = b.chain.iter().map(Cert::sha256_hex).collect();
                let mut expected = vec![fp(&p.inter.pem)];
                if n == 4 {
                    expected.push(fp(&p.root.pem));
                }
                assert_eq!(chain, expected, "{order:?}");
            }
        }
    }

    #[test]
    fn separate_sources_in_any_split() {
        let p = pki();
        let (leaf, key, inter, root) = (
            p.leaf.as_str(),
            p.key.as_str(),
            p.inter.pem.as_str(),
            p.root.pem.as_str(),
        );
        let fullchain = [leaf, inter].concat();
        let ca_bundle = [root, inter].concat();
        let cases: Vec<(Vec<(&str, &str)>, usize)> = vec![
            (vec![("--cert", leaf), ("--key", key)], 0),
            (
                vec![("--cert", leaf), ("--key", key), ("--chain", inter)],
                1,
            ),
            (vec![("--cert", &fullchain), ("--key", key)], 1),
            // fullchain and chain together: the duplicate intermediate is merged
            (
                vec![("--cert", &fullchain), ("--key", key), ("--chain", inter)],
                1,
            ),
            (
                vec![
                    ("chain.pem", &ca_bundle),
                    ("cert.pem", leaf),
                    ("key.pem", key),
                ],
                2,
            ),
            (vec![("--cert", leaf), ("--key", key), ("--chain", "\n")], 0),
        ];
        for (sources, chain_len) in cases {
            let sources: Vec<(&str, &[u8])> =
                sources.iter().map(|(n, t)| (*n, t.as_bytes())).collect();
            let b = check(&sources).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(b.leaf.sha256_hex(), fp(leaf));
            assert_eq!(b.chain.len(), chain_len);
            if chain_len > 0 {
                assert_eq!(b.chain[0].sha256_hex(), fp(inter));
            }
        }
    }

    #[test]
    fn chain_is_ordered_by_linkage() {
        let root = ca("Test Root", None);
        let i1 = ca("Intermediate 1", Some(&root));
        let i2 = ca("Intermediate 2", Some(&i1));
        let key = KeyPair::generate().expect("key");
        let leaf = leaf(&key, &i2);
        let key = key.serialize_pem();
        let expected = vec![fp(&i2.pem), fp(&i1.pem), fp(&root.pem)];
        for chain in [
            [root.pem.as_str(), &i1.pem, &i2.pem].concat(),
            [i1.pem.as_str(), &root.pem, &i2.pem].concat(),
            [i2.pem.as_str(), &i1.pem, &root.pem].concat(),
        ] {
            let b = check(&[
                ("--cert", leaf.as_bytes()),
                ("--key", key.as_bytes()),
                ("--chain", chain.as_bytes()),
            ])
            .expect("bundle");
            let got: Vec<String> = b.chain.iter().map(Cert::sha256_hex).collect();
            assert_eq!(got, expected);
            assert_eq!(b.chain[0].subject, "CN=Intermediate 2");
            assert_eq!(b.leaf.issuer, "CN=Intermediate 2");
        }
        // A self-signed leaf needs no chain.
        let key = KeyPair::generate().expect("key");
        let cert = params("self.test", &["self.test"], NOW - DAY, NOW + DAY)
            .self_signed(&key)
            .expect("sign")
            .pem();
        let b = check(&[
            ("--cert", cert.as_bytes()),
            ("--key", key.serialize_pem().as_bytes()),
        ])
        .expect("bundle");
        assert!(b.chain.is_empty());
    }

    #[test]
    fn key_problems() {
        let p = pki();
        let other_key = KeyPair::generate().expect("key").serialize_pem();
        let twin = leaf_valid(
            "twin.a.test",
            &["a.test"],
            &KeyPair::from_pem(&p.key).expect("key"),
            &p.inter,
            NOW - DAY,
            NOW + DAY,
        );
        let bundle = [p.key.as_str(), &p.leaf].concat();
        let cases: Vec<(Sources, &str, &str)> = vec![
            (
                vec![("--cert", &p.leaf), ("--chain", &p.inter.pem)],
                "no_key",
                "no private key found in --cert, --chain: pass the key with --key or include it in the bundle",
            ),
            (
                vec![("--cert", &bundle), ("--key", &other_key)],
                "multiple_keys",
                "2 private keys found (--cert, --key): a deploy takes exactly one",
            ),
            (
                vec![
                    ("--cert", &p.leaf),
                    ("--key", &other_key),
                    ("--chain", &p.inter.pem),
                ],
                "key_mismatch",
                "the private key does not match any of the 2 certificates (CN=a.test ",
            ),
            (
                vec![("--cert", &p.leaf), ("--key", &p.key), ("--chain", &twin)],
                "multiple_leaves",
                "2 certificates match the private key (CN=a.test ",
            ),
            (
                vec![("--cert", &p.leaf), ("--key", &other_key)],
                "key_mismatch",
                "the private key does not match the certificate (CN=a.test ",
            ),
            (
                vec![("--key", &p.key)],
                "no_certificate",
                "no certificate found in --key",
            ),
        ];
        for (sources, reason, needle) in cases {
            let sources: Vec<(&str, &[u8])> =
                sources.iter().map(|(n, t)| (*n, t.as_bytes())).collect();
            expect_err(&sources, &opts(), reason, needle);
        }
    }

    #[test]
    fn malformed_input_is_rejected() {
        let p = pki();
        let der = pem_body_der(&p.leaf);
        let junk_cert = "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n";
        let cases: Vec<(&str, &[u8], &str, &str)> = vec![
            (
                "unterminated",
                b"-----BEGIN CERTIFICATE-----\nMIIB\n",
                "bad_pem",
                "--chain: not valid PEM: the \"CERTIFICATE\" block has no END line",
            ),
            (
                "bad base64",
                b"-----BEGIN CERTIFICATE-----\nMII!!B\n-----END CERTIFICATE-----\n",
                "bad_pem",
                "invalid base64 in the \"CERTIFICATE\" block",
            ),
            (
                "mismatched end",
                b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END X509 CRL-----\n",
                "bad_pem",
                "ends with an END line for \"X509 CRL\"",
            ),
            (
                "nested",
                b"-----BEGIN CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n",
                "bad_pem",
                "starts inside the unterminated",
            ),
            (
                "orphan end",
                b"-----END CERTIFICATE-----\n",
                "bad_pem",
                "without a BEGIN line",
            ),
            (
                "bad begin",
                b"-----BEGIN CERTIFICATE\nMIIB\n",
                "bad_pem",
                "malformed \"-----BEGIN\" line",
            ),
            (
                "unknown label",
                b"-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n",
                "bad_pem",
                "--chain: \"FOO\" PEM block is not a certificate or private key",
            ),
            (
                "csr",
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "bad_pem",
                "\"CERTIFICATE REQUEST\" PEM block",
            ),
            (
                "binary der",
                &der,
                "bad_pem",
                "--chain: not valid PEM: no PEM block found",
            ),
            ("text", b"hello\n", "bad_pem", "no PEM block found"),
            (
                "header",
                b"-----BEGIN CERTIFICATE-----\nX-Foo: bar\nAAAA\n-----END CERTIFICATE-----\n",
                "bad_pem",
                "PEM headers",
            ),
            (
                "not x509",
                junk_cert.as_bytes(),
                "bad_certificate",
                "--chain: certificate block 1 is not a valid X.509 certificate",
            ),
        ];
        for (name, input, reason, needle) in cases {
            let sources = [
                ("--cert", p.leaf.as_bytes()),
                ("--key", p.key.as_bytes()),
                ("--chain", input),
            ];
            match check(&sources) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => {
                    assert_eq!(e.reason(), reason, "{name}: {e}");
                    assert!(e.to_string().contains(needle), "{name}: {e}");
                }
            }
        }
    }

    #[test]
    fn chain_must_be_the_leafs_issuer_path() {
        let p = pki();
        let other = ca("Other Root", None);
        let impostor = ca("Test Intermediate", Some(&p.root));
        let base = [("--cert", p.leaf.as_bytes()), ("--key", p.key.as_bytes())];
        let cases: Vec<(&str, String, &str, String)> = vec![
            (
                "unrelated",
                [p.inter.pem.as_str(), &other.pem].concat(),
                "chain_unrelated",
                format!(
                    "certificate CN=Other Root (sha256 {}…",
                    &fp(&other.pem)[..8]
                ),
            ),
            (
                "missing link",
                p.root.pem.clone(),
                "chain_unrelated",
                "CN=Test Root (sha256 ".to_owned(),
            ),
            (
                "same name, other key",
                impostor.pem.clone(),
                "chain_signature",
                "CN=Test Intermediate claims to issue CN=a.test but its signature does not verify"
                    .to_owned(),
            ),
        ];
        for (name, chain, reason, needle) in cases {
            let sources = [base[0], base[1], ("--chain", chain.as_bytes())];
            match check(&sources) {
                Ok(_) => panic!("{name}: accepted"),
                Err(e) => {
                    assert_eq!(e.reason(), reason, "{name}: {e}");
                    assert!(e.to_string().contains(&needle), "{name}: {e}");
                    assert!(e.to_string().contains("CN=a.test"), "{name}: {e}");
                }
            }
        }
    }

    #[test]
    fn validity_window() {
        struct Case {
            name: &'static str,
            leaf: (i64, i64),
            inter: (i64, i64),
            expect: Result<(), (&'static str, String)>,
        }
        let ok = (NOW - DAY, NOW + DAY);
        let cases = [
            Case { name: "valid", leaf: ok, inter: ok, expect: Ok(()) },
            Case { name: "leaf expired", leaf: (NOW - 2 * DAY, NOW - 1), inter: ok,
                   expect: Err(("expired", "the leaf certificate CN=a.test expired on 2025-06-15T15:06:39Z: renew the certificate".into())) },
            Case { name: "leaf expires now", leaf: (NOW - DAY, NOW), inter: ok,
                   expect: Err(("expired", format!("expired on {NOW_RFC3339}"))) },
            Case { name: "intermediate expired", leaf: ok, inter: (NOW - 2 * DAY, NOW - DAY),
                   expect: Err(("expired", "the chain certificate CN=Test Intermediate expired on 2025-06-14T15:06:40Z".into())) },
            Case { name: "inside grace", leaf: (NOW + 299, NOW + DAY), inter: ok, expect: Ok(()) },
            Case { name: "beyond grace", leaf: (NOW + 301, NOW + DAY), inter: ok,
                   expect: Err(("not_yet_valid", "the leaf certificate CN=a.test is not valid before 2025-06-15T15:11:41Z, more than 5m from now".into())) },
            Case { name: "intermediate beyond grace", leaf: ok, inter: (NOW + DAY, NOW + 2 * DAY),
                   expect: Err(("not_yet_valid", "the chain certificate CN=Test Intermediate is not valid before".into())) },
        ];
        let root = ca("Test Root", None);
        for case in cases {
            let inter = ca_valid("Test Intermediate", Some(&root), case.inter.0, case.inter.1);
            let key = KeyPair::generate().expect("key");
            let leaf = leaf_valid(
                "a.test",
                &["a.test"],
                &key,
                &inter,
                case.leaf.0,
                case.leaf.1,
            );
            let key = key.serialize_pem();
            let sources = [
                ("--cert", leaf.as_bytes()),
                ("--key", key.as_bytes()),
                ("--chain", inter.pem.as_bytes()),
            ];
            match (&case.expect, check(&sources)) {
                (Ok(()), Ok(_)) => {}
                (Err((reason, needle)), Err(e)) => {
                    assert_eq!(e.reason(), *reason, "{}: {e}", case.name);
                    assert!(
                        e.to_string().contains(needle.as_str()),
                        "{}: {e}",
                        case.name
                    );
                }
                (_, got) => panic!(
                    "{}: unexpected {:?}",
                    case.name,
                    got.map(|b| b.leaf.subject)
                ),
            }
        }
    }

    #[test]
    fn server_name_coverage() {
        let cases: &[(&str, &[&str], &str, bool)] = &[
            ("a.test", &["a.test", "*.a.test"], "a.test", true),
            ("a.test", &["a.test", "*.a.test"], "www.a.test", true),
            ("a.test", &["a.test", "*.a.test"], "WWW.A.Test.", true),
            ("a.test", &["a.test", "*.a.test"], "x.www.a.test", false),
            ("a.test", &["a.test", "*.a.test"], "b.test", false),
            ("a.test", &["*.a.test"], "a.test", false),
            ("ip", &["192.0.2.1", "2001:db8::1"], "192.0.2.1", true),
            ("ip", &["192.0.2.1", "2001:db8::1"], "2001:db8::1", true),
            ("ip", &["192.0.2.1"], "192.0.2.2", false),
            ("legacy.test", &[], "legacy.test", true),
            ("legacy.test", &["a.test"], "legacy.test", false),
        ];
        let root = ca("Test Root", None);
        for &(cn, sans, server_name, covered) in cases {
            let key = KeyPair::generate().expect("key");
            let leaf = leaf_valid(cn, sans, &key, &root, NOW - DAY, NOW + DAY);
            let key = key.serialize_pem();
            let o = CheckOptions {
                server_name: Some(server_name),
                ..opts()
            };
            let result = check_with(
                &[("--cert", leaf.as_bytes()), ("--key", key.as_bytes())],
                &o,
            );
            match (covered, result) {
                (true, Ok(b)) => assert!(b.leaf.covers(server_name)),
                (false, Err(e)) => {
                    assert_eq!(e.reason(), "name_not_covered", "{e}");
                    assert!(
                        e.to_string()
                            .contains(&format!("does not cover server name \"{server_name}\"")),
                        "{e}"
                    );
                }
                (_, r) => panic!(
                    "{cn} {sans:?} {server_name}: {:?}",
                    r.map(|b| b.leaf.subject)
                ),
            }
        }
        let p = pki();
        let o = CheckOptions {
            server_name: Some("www.example.com"),
            ..opts()
        };
        expect_err(
            &[("--cert", p.leaf.as_bytes()), ("--key", p.key.as_bytes())],
            &o,
            "name_not_covered",
            "the leaf CN=a.test does not cover server name \"www.example.com\" (it covers: a.test, *.a.test)",
        );
    }

    #[test]
    fn output_pem_is_normalized_whatever_the_input_formatting() {
        let p = pki();
        let clean = [p.key.as_str(), &p.leaf, &p.inter.pem].concat();
        let crlf = clean.replace('\n', "\r\n");
        let messy: String = clean
            .lines()
            .map(|l| {
                if l.starts_with("-----END") {
                    format!("  {l}  \n\n# a comment\nsubject=CN=x\n")
                } else {
                    format!("\t{l} \n")
                }
            })
            .collect();
        let rewrapped = rewrap(&clean, 76);
        let mut outputs = Vec::new();
        for text in [&clean, &crlf, &messy, &rewrapped] {
            let b = check(&[("web.pem", text.as_bytes())]).expect("bundle");
            outputs.push((
                b.leaf_pem(),
                b.chain_pem(),
                b.fullchain_pem(),
                b.key_pem().to_string(),
            ));
        }
        for o in &outputs[1..] {
            assert_eq!(o, &outputs[0]);
        }
        let (leaf, chain, full, key) = &outputs[0];
        assert_eq!(full, &format!("{leaf}{chain}"));
        for pem in [leaf, chain, full, key] {
            assert!(pem.ends_with("-----\n") && !pem.contains('\r'));
            assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        }
        // Round trip: the output parses to the same certificates.
        let again =
            check(&[("--cert", full.as_bytes()), ("--key", key.as_bytes())]).expect("bundle");
        assert_eq!(again.leaf.sha256_hex(), fp(&p.leaf));
        assert_eq!(again.chain[0].sha256_hex(), fp(&p.inter.pem));
        assert_eq!(again.fullchain_pem(), *full);
        // An empty chain is "".
        let b =
            check(&[("--cert", p.leaf.as_bytes()), ("--key", p.key.as_bytes())]).expect("bundle");
        assert_eq!(b.chain_pem(), "");
    }

    fn rewrap(pem: &str, width: usize) -> String {
        let mut out = String::new();
        let mut body = String::new();
        for line in pem.lines() {
            if line.starts_with("-----END") {
                let chars: Vec<char> = body.chars().collect();
                for chunk in chars.chunks(width) {
                    out.extend(chunk);
                    out.push('\n');
                }
                body.clear();
            }
            if line.starts_with("-----") {
                out.push_str(line);
                out.push('\n');
            } else {
                body.push_str(line);
            }
        }
        out
    }

    fn pem_body_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        BASE64.decode(body.as_bytes()).expect("base64")
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let p = pki();
        let b =
            check(&[("--cert", p.leaf.as_bytes()), ("--key", p.key.as_bytes())]).expect("bundle");
        let debug = format!(
            "{b:?} {:?} {:?}",
            b.key,
            Source {
                name: "--key",
                pem: p.key.as_bytes()
            }
        );
        assert!(
            debug.contains("PrivateKey { algorithm: EcdsaP256"),
            "{debug}"
        );
        assert_no_key_material(&debug, &[("--key", p.key.as_bytes())]);
    }

    #[test]
    fn cert_facts_from_der_and_pem() {
        let root = ca("Test Root", None);
        let key = KeyPair::generate().expect("key");
        let mut params = params("a.test", &["a.test", "192.0.2.7"], NOW - DAY, NOW + DAY);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0xab]));
        let leaf = params.signed_by(&key, &root.issuer).expect("sign").pem();
        let combined = [key.serialize_pem(), leaf.clone(), root.pem.clone()].concat();
        let cert = first_cert_in_pem(combined.as_bytes())
            .expect("pem")
            .expect("a cert");
        assert_eq!(cert.subject, "CN=a.test");
        assert_eq!(cert.issuer, "CN=Test Root");
        assert_eq!(cert.dns_names, ["a.test"]);
        assert_eq!(cert.ip_addresses, [IpAddr::from([192, 0, 2, 7])]);
        assert_eq!(cert.common_name.as_deref(), Some("a.test"));
        assert_eq!((cert.not_before, cert.not_after), (NOW - DAY, NOW + DAY));
        assert_eq!(cert.serial_hex, "01ab");
        assert_eq!(cert.to_pem(), leaf);
        let from_der = cert_from_der(cert.der.clone()).expect("der");
        assert_eq!(from_der, cert);
        assert_eq!(from_der.sha256_hex().len(), 64);

        assert!(
            first_cert_in_pem(key.serialize_pem().as_bytes())
                .expect("pem")
                .is_none()
        );
        assert!(first_cert_in_pem(b"").expect("empty").is_none());
        assert_eq!(
            first_cert_in_pem(b"\x30\x82garbage")
                .map(|_| ())
                .expect_err("rejected")
                .reason(),
            "bad_pem"
        );
        assert_eq!(
            cert_from_der(b"\x30\x03\x02\x01\x00".to_vec())
                .expect_err("rejected")
                .reason(),
            "bad_certificate"
        );
        let mut trailing = cert.der.clone();
        trailing.push(0);
        assert_eq!(
            cert_from_der(trailing).expect_err("rejected").reason(),
            "bad_certificate"
        );
    }

    #[test]
    fn too_many_certificates() {
        let p = pki();
        let key = KeyPair::generate().expect("key");
        let extra: String = (0..MAX_CERTIFICATES)
            .map(|i| {
                params(&format!("c{i}.test"), &[], NOW - DAY, NOW + DAY)
                    .self_signed(&key)
                    .expect("sign")
                    .pem()
            })
            .collect();
        expect_err(
            &[
                ("--cert", p.leaf.as_bytes()),
                ("--key", p.key.as_bytes()),
                ("--chain", extra.as_bytes()),
            ],
            &opts(),
            "too_many_certificates",
            "more than 32 certificates supplied",
        );
    }

    #[test]
    fn leak_detector_catches_a_leak() {
        // The hygiene check every error goes through must itself work.
        let key = KeyPair::generate().expect("key").serialize_pem();
        let line = key.lines().nth(2).expect("a body line");
        let text = format!("bad key near {}", &line[20..40]);
        let caught = std::panic::catch_unwind(|| {
            assert_no_key_material(&text, &[("--key", key.as_bytes())]);
        });
        assert!(caught.is_err());
    }

    #[test]
    fn rfc3339_is_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(NOW), NOW_RFC3339);
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    /// Property tests with a fixed case budget: any input is an error with
    /// a reason (never a panic, never key material in the message), and a
    /// valid set is found whatever the order and split of its blocks.
    mod fuzz {
        use std::sync::OnceLock;

        use proptest::prelude::*;

        use super::*;

        fn config() -> ProptestConfig {
            crate::fuzzing::config(64)
        }

        /// Key, leaf, intermediate and root PEM, made once.
        fn blocks() -> &'static [String; 4] {
            static BLOCKS: OnceLock<[String; 4]> = OnceLock::new();
            BLOCKS.get_or_init(|| {
                let p = pki();
                [p.key, p.leaf, p.inter.pem, p.root.pem]
            })
        }

        fn expected() -> &'static (String, Vec<String>) {
            static EXPECTED: OnceLock<(String, Vec<String>)> = OnceLock::new();
            EXPECTED.get_or_init(|| {
                let b = blocks();
                let bundle = check(&[("all", b.concat().as_bytes())]).expect("the set checks");
                let chain = bundle.chain.iter().map(Cert::sha256_hex).collect();
                (bundle.leaf.sha256_hex(), chain)
            })
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_input_is_an_error_with_a_reason(
                raw in proptest::collection::vec(any::<u8>(), 0..4096),
                armor in any::<bool>(),
            ) {
                let mut input = raw.clone();
                if armor {
                    // Inside PEM armor, so that the base64 and DER parsers see it.
                    input = format!(
                        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                        String::from_utf8_lossy(&raw)
                    )
                    .into_bytes();
                }
                prop_assert!(check(&[("drop", &input)]).is_err());
            }

            #[test]
            fn a_valid_set_is_found_in_any_order_and_split(
                order in Just([0usize, 1, 2, 3]).prop_shuffle(),
                cuts in proptest::collection::vec(any::<bool>(), 3),
                with_root in any::<bool>(),
            ) {
                let b = blocks();
                let mut sources: Vec<String> = vec![String::new()];
                for (i, &k) in order.iter().enumerate() {
                    if k == 3 && !with_root {
                        continue;
                    }
                    if i > 0 && cuts[i - 1] {
                        sources.push(String::new());
                    }
                    sources.last_mut().expect("one").push_str(&b[k]);
                }
                let names: Vec<String> = (0..sources.len()).map(|i| format!("f{i}.pem")).collect();
                let inputs: Vec<(&str, &[u8])> = names
                    .iter()
                    .zip(&sources)
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(n, s)| (n.as_str(), s.as_bytes()))
                    .collect();
                let bundle = check(&inputs).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (leaf, chain) = expected();
                prop_assert_eq!(&bundle.leaf.sha256_hex(), leaf);
                let got: Vec<String> = bundle.chain.iter().map(Cert::sha256_hex).collect();
                prop_assert_eq!(&got[..], &chain[..got.len()]);
            }

            #[test]
            fn a_truncated_set_never_panics(cut in 0usize..4096) {
                let all = blocks()[..3].concat();
                let cut = cut.min(all.len());
                // Either an error with a reason (checked by `check`), or the
                // cut fell after the last block's end.
                if let Ok(b) = check(&[("drop", &all.as_bytes()[..cut])]) {
                    prop_assert_eq!(&b.leaf.sha256_hex(), &expected().0);
                }
            }
        }
    }
}
