//! Throw-away certificates for the benchmarks: one root, one intermediate,
//! and as many leaves (ECDSA P-256, each with its own key) as a figure
//! needs. Every leaf is a complete set: key, leaf, chain.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// A root and the intermediate that issues every leaf.
pub struct Pki {
    pub root_pem: String,
    int_pem: String,
    int_params: CertificateParams,
    int_key: KeyPair,
}

/// One certificate set, PEM.
#[derive(Clone)]
pub struct Set {
    pub cert: String,
    pub key: String,
    /// The intermediate (the root is not sent).
    pub chain: String,
}

impl Set {
    /// Key, leaf and chain in one file: the drop-directory bundle.
    pub fn bundle(&self) -> String {
        format!("{}{}{}", self.key, self.cert, self.chain)
    }

    /// Leaf then chain, as nginx's `ssl_certificate` wants it.
    pub fn fullchain(&self) -> String {
        format!("{}{}", self.cert, self.chain)
    }
}

fn ca_params(cn: &str, constraints: BasicConstraints) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(3650);
    Ok(p)
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let root_key = KeyPair::generate().context("root key")?;
        let root_params = ca_params("certctl bench root", BasicConstraints::Unconstrained)?;
        let root = root_params.self_signed(&root_key).context("root cert")?;
        let int_key = KeyPair::generate().context("intermediate key")?;
        let mut int_params = ca_params(
            "certctl bench intermediate",
            BasicConstraints::Constrained(0),
        )?;
        int_params.use_authority_key_identifier_extension = true;
        let int = int_params
            .signed_by(&int_key, &Issuer::from_params(&root_params, &root_key))
            .context("intermediate cert")?;
        Ok(Pki {
            root_pem: root.pem(),
            int_pem: int.pem(),
            int_params,
            int_key,
        })
    }

    /// A fresh leaf for `name` (also its only DNS name), valid 90 days.
    pub fn leaf(&self, name: &str) -> Result<Set> {
        let key = KeyPair::generate().context("leaf key")?;
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(90);
        let cert = p
            .signed_by(&key, &Issuer::from_params(&self.int_params, &self.int_key))
            .context("leaf cert")?;
        Ok(Set {
            cert: cert.pem(),
            key: key.serialize_pem(),
            chain: self.int_pem.clone(),
        })
    }
}
