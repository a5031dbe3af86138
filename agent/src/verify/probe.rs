//! One verification attempt: connect to a target's endpoint, speak its
//! plaintext preamble if any, complete a TLS handshake with SNI, and report
//! the certificate chain the server served.
//!
//! Guarantees:
//! - **The server proved possession of the key.** The handshake signature
//!   (TLS 1.2 `ServerKeyExchange`, TLS 1.3 `CertificateVerify`) is checked
//!   against the served leaf, with or without a CA. A server that sends a
//!   certificate it has no key for never yields a [`Served`].
//! - **Without `ca_file` any chain is accepted**, because internal and
//!   self-signed certificates are common; what the caller compares is the
//!   served leaf's fingerprint. With `ca_file` the chain and the name are
//!   validated as a browser would (`ca_validated` says which happened).
//! - **A full handshake every time.** Each probe uses a fresh client with
//!   resumption disabled, so what is reported is what the server serves now,
//!   never a certificate remembered from an earlier session.
//! - **One deadline.** Resolving, connecting, the preamble and the handshake
//!   all share [`Probe::timeout`]; a timeout says which phase it hit.
//! - **One-line errors** naming the endpoint, what happened and what to
//!   check, with a short [`ProbeError::reason`] code for events and metrics.
//! - The crypto provider is ring, passed explicitly: nothing depends on a
//!   process-wide default provider.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, PeerIncompatible,
    ProtocolVersion, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

pub use super::phase::Phase;
use super::starttls::{self, Speaker, StarttlsError};
use crate::bundle;
use crate::kind::VerifyProtocol;

/// How many of the server's first bytes are kept to recognise a server that
/// does not speak TLS.
const FIRST_BYTES: usize = 64;

/// What to probe and how.
#[derive(Clone, Copy, Debug)]
pub struct Probe<'a> {
    /// `host:port` or `[v6]:port`.
    pub endpoint: &'a str,
    /// SNI to send; an IP address literal means no SNI (as TLS requires).
    pub server_name: &'a str,
    pub protocol: VerifyProtocol,
    /// The whole attempt: resolve, connect, preamble and handshake.
    pub timeout: Duration,
    /// From `ca_file`: validate the served chain and name against these.
    pub roots: Option<&'a Roots>,
}

/// What the server served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// SHA-256 of the leaf's DER, lowercase hex.
    pub leaf_sha256: String,
    /// SHA-256 of each further certificate the server sent, in served order.
    pub chain_sha256: Vec<String>,
    pub leaf_der: Vec<u8>,
    /// The leaf's subject, RFC 4514 style (`CN=www.example.com`).
    pub subject: String,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// `TLSv1.3` or `TLSv1.2`.
    pub tls_version: String,
    /// The chain and name were validated against [`Probe::roots`].
    pub ca_validated: bool,
}

/// Why an attempt did not yield a [`Served`]. Every message is one line that
/// starts with the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `verify.endpoint` is not `host:port` (the configuration checks this
    /// too; a probe built by hand may not have been).
    #[error("{endpoint}: not a valid endpoint: {why}")]
    BadEndpoint { endpoint: String, why: String },
    #[error(
        "{endpoint}: {server_name:?} is not a valid server name for SNI: \
         set verify.server_name to a DNS name or an IP address"
    )]
    BadServerName {
        endpoint: String,
        server_name: String,
    },
    #[error("{endpoint}: cannot resolve {host}: {source}: check verify.endpoint and DNS")]
    Resolve {
        endpoint: String,
        host: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{endpoint}: connection refused: nothing listens there; \
         check verify.endpoint and that the server is running"
    )]
    Refused { endpoint: String },
    #[error("{endpoint}: cannot connect: {source}: check verify.endpoint, routes and firewalls")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// The attempt's deadline passed; `detail` says in which phase and what
    /// that suggests.
    #[error("{endpoint}: {detail}")]
    Timeout {
        endpoint: String,
        phase: Phase,
        timeout: Duration,
        detail: String,
    },
    /// The plaintext preamble failed (no STARTTLS offered, refused, ...).
    #[error("{endpoint}: {source}")]
    Starttls {
        endpoint: String,
        #[source]
        source: StarttlsError,
    },
    /// The server answered with bytes that are not TLS.
    #[error("{endpoint}: not a TLS server: its first bytes were {first}; {advice}")]
    NotTls {
        endpoint: String,
        first: String,
        advice: &'static str,
    },
    /// The server hung up during the handshake without saying why.
    #[error(
        "{endpoint}: the server closed the connection during the TLS handshake without an alert: \
         check that a certificate is configured for {server_name} and the server's error log"
    )]
    Closed {
        endpoint: String,
        server_name: String,
    },
    /// The server ended the handshake with a TLS alert.
    #[error("{endpoint}: the server sent TLS alert {alert}: {meaning}")]
    Alert {
        endpoint: String,
        alert: String,
        meaning: String,
    },
    /// With `ca_file`: the served chain does not validate.
    #[error(
        "{endpoint}: the served certificate is not trusted by verify.ca_file {ca_file}: {detail}; \
         check ca_file and the chain the server sends"
    )]
    Untrusted {
        endpoint: String,
        ca_file: PathBuf,
        detail: String,
    },
    /// With `ca_file`: the served leaf does not cover the server name.
    #[error(
        "{endpoint}: the served certificate is not valid for {server_name} (it names {presented}): \
         check verify.server_name and which certificate the server picks for that name"
    )]
    NameMismatch {
        endpoint: String,
        server_name: String,
        presented: String,
    },
    /// The handshake signature does not verify with the served leaf's key.
    #[error(
        "{endpoint}: the server's handshake signature does not verify with the certificate it \
         served ({detail}), so it did not prove it holds that certificate's key: \
         check that the server's key and certificate files belong together"
    )]
    KeyProof { endpoint: String, detail: String },
    #[error(
        "{endpoint}: TLS handshake failed: {detail}: check the server's TLS configuration and error log"
    )]
    Handshake { endpoint: String, detail: String },
    #[error("{endpoint}: the connection failed during the {phase}: {source}")]
    Io {
        endpoint: String,
        phase: Phase,
        #[source]
        source: io::Error,
    },
    /// The served leaf cannot be parsed.
    #[error("{endpoint}: the served certificate cannot be parsed: {detail}")]
    BadCertificate { endpoint: String, detail: String },
    /// The TLS client could not be set up (a bug, not a server problem).
    #[error("{endpoint}: cannot set up the TLS client: {detail}")]
    Setup { endpoint: String, detail: String },
}

impl ProbeError {
    /// A short, stable code for events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::BadEndpoint { .. } => "bad-endpoint",
            ProbeError::BadServerName { .. } => "bad-server-name",
            ProbeError::Resolve { .. } => "resolve",
            ProbeError::Refused { .. } => "refused",
            ProbeError::Connect { .. } => "connect",
            ProbeError::Timeout { .. } => "timeout",
            ProbeError::Starttls { source, .. } => source.reason(),
            ProbeError::NotTls { .. } => "not-tls",
            ProbeError::Closed { .. } => "closed",
            ProbeError::Alert { .. } => "alert",
            ProbeError::Untrusted { .. } => "untrusted",
            ProbeError::NameMismatch { .. } => "name-mismatch",
            ProbeError::KeyProof { .. } => "key-proof",
            ProbeError::Handshake { .. } => "handshake",
            ProbeError::Io { .. } => "io",
            ProbeError::BadCertificate { .. } => "bad-cert",
            ProbeError::Setup { .. } => "internal",
        }
    }

    /// The phase the attempt was in when it failed.
    pub fn phase(&self) -> Phase {
        match self {
            ProbeError::BadEndpoint { .. }
            | ProbeError::BadServerName { .. }
            | ProbeError::Resolve { .. } => Phase::Resolve,
            ProbeError::Refused { .. } | ProbeError::Connect { .. } => Phase::Connect,
            ProbeError::Timeout { phase, .. } | ProbeError::Io { phase, .. } => *phase,
            ProbeError::Starttls { source, .. } => match source {
                StarttlsError::Timeout { phase, .. } => *phase,
                StarttlsError::Greeting { .. } => Phase::Greeting,
                _ => Phase::Starttls,
            },
            _ => Phase::Handshake,
        }
    }
}

/// Why `ca_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error(
        "cannot read verify.ca_file {path}: {source}: check the path and that the agent may read it"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("verify.ca_file {path} holds no PEM certificate{hint}")]
    Empty { path: PathBuf, hint: &'static str },
    #[error("verify.ca_file {path} is not valid PEM: {detail}")]
    BadPem { path: PathBuf, detail: String },
    #[error("certificate {index} in verify.ca_file {path} cannot be a trust anchor: {detail}")]
    BadCertificate {
        path: PathBuf,
        index: usize,
        detail: String,
    },
}

/// The CA certificates of a `ca_file`, ready to validate served chains.
#[derive(Clone, Debug)]
pub struct Roots {
    path: PathBuf,
    count: usize,
    verifier: Arc<WebPkiServerVerifier>,
}

// === impl Roots ===

impl Roots {
    /// Reads a PEM bundle of CA certificates.
    pub fn load(path: &Path) -> Result<Roots, RootsError> {
        let pem = std::fs::read(path).map_err(|source| RootsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Roots::from_pem(path, &pem)
    }

    /// Parses a PEM bundle; `path` names it in messages.
    pub fn from_pem(path: &Path, pem: &[u8]) -> Result<Roots, RootsError> {
        let mut store = RootCertStore::empty();
        for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let cert = cert.map_err(|e| RootsError::BadPem {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
            store.add(cert).map_err(|e| RootsError::BadCertificate {
                path: path.to_owned(),
                index: i + 1,
                detail: e.to_string(),
            })?;
        }
        if store.is_empty() {
            let hint = if pem.windows(11).any(|w| w == b"-----BEGIN ") {
                ": it must hold -----BEGIN CERTIFICATE----- blocks"
            } else {
                ": it must hold -----BEGIN CERTIFICATE----- blocks \
                 (for a DER file: openssl x509 -inform der -in FILE -out FILE.pem)"
            };
            return Err(RootsError::Empty {
                path: path.to_owned(),
                hint,
            });
        }
        let count = store.len();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| RootsError::BadCertificate {
                path: path.to_owned(),
                index: 1,
                detail: e.to_string(),
            })?;
        Ok(Roots {
            path: path.to_owned(),
            count,
            verifier,
        })
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many CA certificates it holds (at least one).
    pub fn count(&self) -> usize {
        self.count
    }
}

// === probe ===

/// Runs one attempt. See the module documentation for what success proves.
pub async fn probe(p: &Probe<'_>) -> Result<Served, ProbeError> {
    let now = Instant::now();
    // A timeout too large to add is as good as none (a year is far enough).
    let deadline = now
        .checked_add(p.timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let endpoint = p.endpoint;
    let (host, port) = split_endpoint(endpoint).map_err(|why| ProbeError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        why,
    })?;
    let name = server_name(p.server_name).ok_or_else(|| ProbeError::BadServerName {
        endpoint: endpoint.to_owned(),
        server_name: p.server_name.to_owned(),
    })?;
    let timeout = |phase: Phase| ProbeError::Timeout {
        endpoint: endpoint.to_owned(),
        phase,
        timeout: p.timeout,
        detail: timeout_detail(phase, p.protocol, p.timeout),
    };

    // Resolve and connect.
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| timeout(Phase::Resolve))?
            .map_err(|source| ProbeError::Resolve {
                endpoint: endpoint.to_owned(),
                host: host.to_owned(),
                source,
            })?
            .collect(),
    };
    let mut tcp = connect(endpoint, host, &addrs, deadline)
        .await?
        .ok_or_else(|| timeout(Phase::Connect))?;
    // Small writes (preamble lines, ClientHello) should leave at once.
    let _ = tcp.set_nodelay(true);

    // The plaintext preamble.
    let client_name = tcp.local_addr().map_or_else(
        |_| "certctl.invalid".to_owned(),
        |a| address_literal(a.ip()),
    );
    starttls::negotiate(p.protocol, &mut tcp, &client_name, deadline)
        .await
        .map_err(|source| match source {
            StarttlsError::Timeout { phase, .. } => timeout(phase),
            source => ProbeError::Starttls {
                endpoint: endpoint.to_owned(),
                source,
            },
        })?;

    // The handshake.
    let key_proof_failed = Arc::new(AtomicBool::new(false));
    let verifier = Arc::new(Verifier {
        chain: p.roots.map(|r| Arc::clone(&r.verifier)),
        algorithms: provider().signature_verification_algorithms,
        key_proof_failed: Arc::clone(&key_proof_failed),
    });
    let config = client_config(verifier).map_err(|detail| ProbeError::Setup {
        endpoint: endpoint.to_owned(),
        detail,
    })?;
    let mut recorder = Recorder {
        inner: tcp,
        first: Vec::with_capacity(FIRST_BYTES),
    };
    let connect = TlsConnector::from(Arc::new(config)).connect(name, &mut recorder);
    let outcome = timeout_at(deadline, connect).await;
    let mut tls = match outcome {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let failure = Failure {
                endpoint,
                server_name: p.server_name,
                roots: p.roots,
                key_proof_failed: key_proof_failed.load(Ordering::SeqCst),
            };
            return Err(failure.classify(err, &recorder.first));
        }
        Err(_) => {
            return Err(match not_tls(endpoint, &recorder.first) {
                Some(err) => err,
                None => timeout(Phase::Handshake),
            });
        }
    };

    let (_, conn) = tls.get_ref();
    let tls_version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let certs = conn.peer_certificates().unwrap_or_default();
    let Some((leaf, chain)) = certs.split_first() else {
        return Err(ProbeError::Handshake {
            endpoint: endpoint.to_owned(),
            detail: "the server presented no certificate".to_owned(),
        });
    };
    let leaf = bundle::cert_from_der(leaf.to_vec()).map_err(|e| ProbeError::BadCertificate {
        endpoint: endpoint.to_owned(),
        detail: e.to_string(),
    })?;
    let served = Served {
        leaf_sha256: leaf.sha256_hex(),
        chain_sha256: chain.iter().map(|c| sha256_hex(c)).collect(),
        subject: leaf.subject,
        not_after_unix: leaf.not_after,
        leaf_der: leaf.der,
        tls_version,
        ca_validated: p.roots.is_some(),
    };
    // Say goodbye (close_notify) so the server logs a clean close; failing to
    // does not change what was served.
    let _ = timeout_at(deadline, tls.shutdown()).await;
    Ok(served)
}

/// Tries each address in turn; `Ok(None)` when the deadline passed.
async fn connect(
    endpoint: &str,
    host: &str,
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<Option<TcpStream>, ProbeError> {
    let mut last: Option<io::Error> = None;
    for addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Ok(None),
            Ok(Ok(tcp)) => return Ok(Some(tcp)),
            // Another address may work (localhost: ::1 then 127.0.0.1).
            Ok(Err(e)) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => ProbeError::Refused {
            endpoint: endpoint.to_owned(),
        },
        Some(source) => ProbeError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        },
        None => ProbeError::Resolve {
            endpoint: endpoint.to_owned(),
            host: host.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        },
    })
}

fn client_config(verifier: Arc<Verifier>) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Splits `host:port` or `[v6]:port`.
fn split_endpoint(endpoint: &str) -> Result<(&str, u16), String> {
    const FORM: &str = "write host:port or [v6]:port, e.g. 127.0.0.1:443 or [::1]:443";
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        rest.split_once("]:")
            .ok_or_else(|| format!("no port: {FORM}"))?
    } else {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| format!("no port: {FORM}"))?;
        if host.contains(':') {
            return Err(format!("an IPv6 address needs brackets: {FORM}"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(format!("no host: {FORM}"));
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok((host, port)),
        _ => Err(format!("invalid port {port:?}: use 1 to 65535")),
    }
}

/// The SNI to send: a DNS name, or an IP address (sent as no SNI).
fn server_name(name: &str) -> Option<ServerName<'static>> {
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(name).ok().map(|n| n.to_owned())
}

/// Our address as an SMTP address literal (RFC 5321 §4.1.3) for `EHLO`.
fn address_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{v6}]"),
        },
    }
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(der))
}

fn timeout_detail(phase: Phase, protocol: VerifyProtocol, timeout: Duration) -> String {
    let t = humantime::format_duration(timeout);
    let proto = match protocol {
        VerifyProtocol::Tls => "TLS",
        VerifyProtocol::SmtpStarttls => "SMTP",
        VerifyProtocol::ImapStarttls => "IMAP",
        VerifyProtocol::Pop3Starttls => "POP3",
    };
    match phase {
        Phase::Resolve => format!("the host name did not resolve within {t}: check DNS"),
        Phase::Connect => format!(
            "no TCP connection within {t}: check verify.endpoint, firewalls and that the host is up"
        ),
        Phase::Greeting => format!(
            "accepted TCP but sent no {proto} greeting within {t}: is this an implicit-TLS port? \
             (use verify.protocol = tls for ports such as 465, 993 and 995)"
        ),
        Phase::Starttls => format!(
            "the server stopped answering during the {proto} STARTTLS exchange \
             (the attempt timed out after {t}): check the server's log"
        ),
        Phase::Handshake if protocol == VerifyProtocol::Tls => format!(
            "accepted TCP but no TLS handshake within {t}: is this a TLS port? \
             (verify.protocol = tls; use smtp-starttls/imap-starttls/pop3-starttls for plaintext ports)"
        ),
        Phase::Handshake => format!(
            "the server accepted {proto} STARTTLS but the TLS handshake did not complete \
             within {t}: check the server's TLS configuration and log"
        ),
    }
}

/// [`ProbeError::NotTls`] when the server's first bytes cannot start a TLS
/// record (handshake or alert).
fn not_tls(endpoint: &str, first: &[u8]) -> Option<ProbeError> {
    match first.first() {
        None | Some(0x15 | 0x16) => None,
        Some(_) => {
            let advice = starttls::identify(first)
                .map_or("check verify.endpoint and verify.protocol", Speaker::advice);
            Some(ProbeError::NotTls {
                endpoint: endpoint.to_owned(),
                first: starttls::quote(&String::from_utf8_lossy(first)),
                advice,
            })
        }
    }
}

/// What is needed to explain a failed handshake.
struct Failure<'a> {
    endpoint: &'a str,
    server_name: &'a str,
    roots: Option<&'a Roots>,
    key_proof_failed: bool,
}

impl Failure<'_> {
    fn classify(&self, err: io::Error, first: &[u8]) -> ProbeError {
        let endpoint = self.endpoint.to_owned();
        if let Some(e) = not_tls(self.endpoint, first) {
            return e;
        }
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return if err.kind() == io::ErrorKind::UnexpectedEof {
                ProbeError::Closed {
                    endpoint,
                    server_name: self.server_name.to_owned(),
                }
            } else {
                ProbeError::Io {
                    endpoint,
                    phase: Phase::Handshake,
                    source: err,
                }
            };
        };
        if self.key_proof_failed {
            let detail = match tls {
                rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
                    "bad signature".to_owned()
                }
                other => other.to_string(),
            };
            return ProbeError::KeyProof { endpoint, detail };
        }
        match tls {
            rustls::Error::AlertReceived(alert) => {
                let (alert, meaning) = alert_meaning(*alert, self.server_name);
                ProbeError::Alert {
                    endpoint,
                    alert,
                    meaning,
                }
            }
            rustls::Error::InvalidCertificate(cert) => self.invalid_certificate(cert),
            rustls::Error::PeerIncompatible(PeerIncompatible::ServerDoesNotSupportTls12Or13) => {
                ProbeError::Handshake {
                    endpoint,
                    detail: "the server speaks neither TLS 1.2 nor TLS 1.3".to_owned(),
                }
            }
            other => ProbeError::Handshake {
                endpoint,
                detail: other.to_string(),
            },
        }
    }

    fn invalid_certificate(&self, cert: &CertificateError) -> ProbeError {
        let endpoint = self.endpoint.to_owned();
        let ca_file = self
            .roots
            .map_or_else(PathBuf::new, |r| r.path().to_owned());
        let untrusted = |detail: String| ProbeError::Untrusted {
            endpoint: endpoint.clone(),
            ca_file: ca_file.clone(),
            detail,
        };
        match cert {
            CertificateError::NotValidForName => ProbeError::NameMismatch {
                endpoint: endpoint.clone(),
                server_name: self.server_name.to_owned(),
                presented: "other names".to_owned(),
            },
            CertificateError::NotValidForNameContext { presented, .. } => {
                ProbeError::NameMismatch {
                    endpoint: endpoint.clone(),
                    server_name: self.server_name.to_owned(),
                    presented: if presented.is_empty() {
                        "no names".to_owned()
                    } else {
                        presented
                            .iter()
                            .map(|n| presented_name(n))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                }
            }
            CertificateError::UnknownIssuer => {
                untrusted("it is not issued by a certificate in that file".to_owned())
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                untrusted("it, or a certificate of its chain, has expired".to_owned())
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                untrusted(
                    "it, or a certificate of its chain, is not valid yet (check this host's clock)"
                        .to_owned(),
                )
            }
            other => untrusted(rustls::Error::InvalidCertificate(other.clone()).to_string()),
        }
    }
}

/// A name as webpki presents it (`DnsName("a.test")`, `IpAddress(192.0.2.1)`)
/// as an operator writes it.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(name)
}

/// The TLS name of an alert and what it usually means for a verification.
fn alert_meaning(alert: AlertDescription, server_name: &str) -> (String, String) {
    let (name, meaning): (&str, String) = match alert {
        AlertDescription::UnrecognisedName => (
            "unrecognized_name",
            format!(
                "no certificate configured for SNI {server_name}: \
                 check verify.server_name and the server's virtual hosts"
            ),
        ),
        AlertDescription::AccessDenied => (
            "access_denied",
            format!(
                "the server refused the handshake (rustls-based servers say this when no \
                 certificate is configured for SNI {server_name}): check verify.server_name"
            ),
        ),
        AlertDescription::HandshakeFailure => (
            "handshake_failure",
            format!(
                "no TLS version, cipher suite or certificate in common, or no certificate for \
                 SNI {server_name}: check the server's TLS settings and verify.server_name \
                 (TLS 1.2 and 1.3 with ECDSA, RSA and Ed25519 are offered)"
            ),
        ),
        AlertDescription::ProtocolVersion => (
            "protocol_version",
            "the server accepts neither TLS 1.2 nor TLS 1.3: enable one of them".to_owned(),
        ),
        AlertDescription::InsufficientSecurity => (
            "insufficient_security",
            "the server requires cipher suites this client does not offer: \
             check the server's cipher settings"
                .to_owned(),
        ),
        AlertDescription::InternalError => (
            "internal_error",
            "the server failed during the handshake: check its error log \
             (can it read its key and certificate?)"
                .to_owned(),
        ),
        AlertDescription::CertificateRequired => (
            "certificate_required",
            "the server requires a client certificate, which verification does not present: \
             allow handshakes without one on this endpoint"
                .to_owned(),
        ),
        other => {
            return (
                snake_case(&format!("{other:?}")),
                "the server rejected the handshake: check its error log".to_owned(),
            );
        }
    };
    (name.to_owned(), meaning)
}

/// `UnexpectedMessage` → `unexpected_message`, as alerts are named in the RFCs.
fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

// === impl Verifier ===

/// Accepts any chain when there are no roots (and validates it against them
/// when there are), and always checks the handshake signatures.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Set when a handshake signature did not verify, to tell that apart
    /// from a chain that did not validate.
    key_proof_failed: Arc<AtomicBool>,
}

impl Verifier {
    fn key_proof(
        &self,
        checked: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if checked.is_err() {
            self.key_proof_failed.store(true, Ordering::SeqCst);
        }
        checked
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.chain {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            // Any chain: the caller compares the served leaf with the deployed
            // one, and the signature checks below prove the key.
            None => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.key_proof(verify_tls12_signature(message, cert, dss, &self.algorithms))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.key_proof(verify_tls13_signature(message, cert, dss, &self.algorithms))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl Recorder ===

/// A stream that keeps the first [`FIRST_BYTES`] bytes read through it, to
/// recognise a server that answers a ClientHello with something else.
struct Recorder<S> {
    inner: S,
    first: Vec<u8>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let room = FIRST_BYTES - this.first.len();
        if room > 0 {
            let new = &buf.filled()[before..];
            this.first.extend_from_slice(&new[..new.len().min(room)]);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;
