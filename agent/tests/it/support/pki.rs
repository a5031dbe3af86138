//! Throw-away PKI for tests: a root [`Ca`], intermediates it issues, and
//! [`Leaf`] certificates with their key, chain and fingerprint.
//!
//! Everything is generated fresh with rcgen (ECDSA P-256 takes well under a
//! millisecond), nothing is cached across tests. RSA is not offered: rcgen's
//! `ring` backend cannot generate RSA keys, and the workspace does not pull
//! in `aws-lc-rs` for tests.
//!
//! ```ignore
//! let root = Ca::root("Test Root");
//! let int = root.intermediate("Test Intermediate");
//! let leaf = int.leaf(&["www.example.test"]).alg(KeyAlg::EcdsaP384).valid_days(30).issue();
//! // leaf.chain_pem == int.cert_pem; leaf.root_pem == root.cert_pem
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

/// Key algorithm of a generated certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyAlg {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlg {
    /// The rcgen signature algorithm for this key type.
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlg::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlg::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlg::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// A fresh key pair of this type, serialisable as PKCS#8 that OpenSSL reads.
    fn generate(self) -> KeyPair {
        let key = KeyPair::generate_for(self.rcgen()).expect("generate key pair");
        if self != KeyAlg::Ed25519 {
            return key;
        }
        // ring writes Ed25519 keys as PKCS#8 v2 (RFC 5958, with the public key),
        // which OpenSSL 3.0 (Debian 12: nginx, `openssl pkey`) rejects with
        // "Field=attributes". Re-encode as PKCS#8 v1 (RFC 8410): same seed.
        const SEED_TAG: [u8; 4] = [0x04, 0x22, 0x04, 0x20];
        const V1_PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let v2 = key.serialized_der();
        let at = v2
            .windows(SEED_TAG.len())
            .position(|w| w == SEED_TAG)
            .expect("Ed25519 PKCS#8 holds the seed")
            + SEED_TAG.len();
        let mut v1 = V1_PREFIX.to_vec();
        v1.extend_from_slice(&v2[at..at + 32]);
        let v1 = rustls_pki_types::PrivatePkcs8KeyDer::from(v1);
        KeyPair::from_pkcs8_der_and_sign_algo(&v1, self.rcgen()).expect("PKCS#8 v1 Ed25519 key")
    }
}

/// SHA-256 of `der` as lowercase hex (the fingerprint format used everywhere in certctl).
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A fresh root → intermediate → leaf for `dns_names` (P-256, valid 90 days).
pub fn issue_cert(dns_names: &[&str]) -> Leaf {
    Ca::root("certctl test root")
        .intermediate("certctl test intermediate")
        .leaf(dns_names)
        .issue()
}

// === impl Ca ===

/// A certificate authority (root or intermediate) that can issue intermediates and leaves.
pub struct Ca {
    /// This CA's certificate as PEM.
    pub cert_pem: String,
    /// This CA's certificate as DER.
    pub der: Vec<u8>,
    /// This CA's private key as PKCS#8 PEM.
    pub key_pem: String,
    /// The root at the top of this CA's chain as PEM (itself for a root).
    pub root_pem: String,
    params: CertificateParams,
    key: KeyPair,
    /// Certificates a leaf issued by this CA must send: this CA and its
    /// intermediates up to (excluding) the root, issuer first. Empty for a root.
    chain: Vec<(String, Vec<u8>)>,
}

impl Ca {
    /// A self-signed root CA (P-256, valid from yesterday for 10 years).
    pub fn root(common_name: &str) -> Ca {
        Self::root_with(common_name, KeyAlg::EcdsaP256)
    }

    /// A self-signed root CA with the given key algorithm.
    pub fn root_with(common_name: &str, alg: KeyAlg) -> Ca {
        let key = alg.generate();
        let params = ca_params(common_name, BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-sign root");
        let cert_pem = cert.pem();
        Ca {
            root_pem: cert_pem.clone(),
            cert_pem,
            der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            params,
            key,
            chain: Vec::new(),
        }
    }

    /// An intermediate CA issued by this CA (P-256, path length 0 below it).
    pub fn intermediate(&self, common_name: &str) -> Ca {
        let key = KeyAlg::EcdsaP256.generate();
        let mut params = ca_params(common_name, BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer())
            .expect("sign intermediate");
        let mut chain = vec![(cert.pem(), cert.der().to_vec())];
        chain.extend(self.chain.iter().cloned());
        Ca {
            cert_pem: cert.pem(),
            der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            params,
            key,
            chain,
        }
    }

    /// Starts a leaf for `dns_names` (first name is also the subject CN); finish with `.issue()`.
    pub fn leaf(&self, dns_names: &[&str]) -> LeafBuilder<'_> {
        assert!(!dns_names.is_empty(), "a leaf needs at least one DNS name");
        let now = OffsetDateTime::now_utc();
        LeafBuilder {
            ca: self,
            dns_names: dns_names.iter().map(|s| (*s).to_owned()).collect(),
            alg: KeyAlg::default(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(90),
        }
    }

    /// SHA-256 hex of this CA's certificate.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.der)
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(common_name: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(3650);
    params
}

// === impl LeafBuilder ===

/// Options for a leaf certificate; created by [`Ca::leaf`].
#[must_use = "call .issue() to get the certificate"]
pub struct LeafBuilder<'a> {
    ca: &'a Ca,
    dns_names: Vec<String>,
    alg: KeyAlg,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl LeafBuilder<'_> {
    /// Uses this key algorithm (default ECDSA P-256).
    pub fn alg(mut self, alg: KeyAlg) -> Self {
        self.alg = alg;
        self
    }

    /// Valid from an hour ago until `days` days from now.
    pub fn valid_days(mut self, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::hours(1);
        self.not_after = now + Duration::days(days);
        self
    }

    /// Expired yesterday (valid from 30 days ago until 1 day ago).
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(30);
        self.not_after = now - Duration::days(1);
        self
    }

    /// Valid only from tomorrow on, for 90 days.
    pub fn not_yet_valid(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now + Duration::days(1);
        self.not_after = now + Duration::days(91);
        self
    }

    /// Exactly this validity window.
    pub fn validity(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Generates the key and signs the certificate.
    pub fn issue(self) -> Leaf {
        let key = self.alg.generate();
        let mut params = CertificateParams::new(self.dns_names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, self.dns_names[0].as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        let cert = params
            .signed_by(&key, &self.ca.issuer())
            .expect("sign leaf");
        let der = cert.der().to_vec();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: self.ca.chain.iter().map(|(pem, _)| pem.as_str()).collect(),
            chain_der: self.ca.chain.iter().map(|(_, der)| der.clone()).collect(),
            root_pem: self.ca.root_pem.clone(),
            sha256_hex: sha256_hex(&der),
            dns_names: self.dns_names,
            alg: self.alg,
            not_after: self.not_after,
            der,
        }
    }
}

// === impl Leaf ===

/// An issued end-entity certificate with everything a deploy needs.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Intermediates, issuer first, PEM concatenated (empty when issued by a root).
    pub chain_pem: String,
    /// Intermediates, issuer first, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The root of the chain, PEM (for `ca_file`).
    pub root_pem: String,
    /// The leaf certificate, DER.
    pub der: Vec<u8>,
    /// SHA-256 of `der`, lowercase hex.
    pub sha256_hex: String,
    /// The DNS SANs, in order.
    pub dns_names: Vec<String>,
    /// The key algorithm.
    pub alg: KeyAlg,
    /// End of the validity window.
    pub not_after: OffsetDateTime,
}

/// Where [`Leaf::write_files`] put each file.
#[derive(Clone, Debug)]
pub struct LeafFiles {
    /// `<stem>.crt`: the leaf only.
    pub cert: PathBuf,
    /// `<stem>.key`: the private key (mode 0600).
    pub key: PathBuf,
    /// `<stem>.chain.pem`: intermediates only.
    pub chain: PathBuf,
    /// `<stem>.fullchain.pem`: leaf then intermediates (what nginx's `ssl_certificate` wants).
    pub fullchain: PathBuf,
    /// `<stem>.bundle.pem`: key, leaf, intermediates (a drop bundle).
    pub bundle: PathBuf,
}

impl Leaf {
    /// Key + leaf + chain concatenated: the drop-directory bundle format.
    pub fn bundle_pem(&self) -> String {
        format!("{}{}{}", self.key_pem, self.cert_pem, self.chain_pem)
    }

    /// Leaf then intermediates.
    pub fn fullchain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.chain_pem)
    }

    /// Served order: the leaf DER followed by the intermediates' DER.
    pub fn served_der(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.der.clone())
            .chain(self.chain_der.iter().cloned())
            .collect()
    }

    /// Writes every form of this leaf into `dir` as `<stem>.*` (see [`LeafFiles`]).
    pub fn write_files(&self, dir: &Path, stem: &str) -> LeafFiles {
        std::fs::create_dir_all(dir).expect("create leaf dir");
        let files = LeafFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            chain: dir.join(format!("{stem}.chain.pem")),
            fullchain: dir.join(format!("{stem}.fullchain.pem")),
            bundle: dir.join(format!("{stem}.bundle.pem")),
        };
        write_mode(&files.cert, &self.cert_pem, 0o644);
        write_mode(&files.key, &self.key_pem, 0o600);
        write_mode(&files.chain, &self.chain_pem, 0o644);
        write_mode(&files.fullchain, &self.fullchain_pem(), 0o644);
        write_mode(&files.bundle, &self.bundle_pem(), 0o600);
        files
    }
}

/// Writes `contents` to `path` (replacing it) and sets `mode`.
pub fn write_mode(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
