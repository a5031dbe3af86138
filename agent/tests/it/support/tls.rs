//! What a TLS server on loopback actually serves, seen through a real handshake.
//!
//! Blocking rustls (ring provider, TLS 1.2 and 1.3) over a `std` TCP stream.
//! Any certificate is accepted — tests deploy throw-away PKIs and want to see
//! what is served, not whether it is trusted — but the handshake signatures
//! are still verified against the presented leaf, so a server holding a
//! certificate without its key cannot pass.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use super::pki::sha256_hex;

/// Per-probe bound on connect and on the whole handshake.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Certificates served on `127.0.0.1:port` for `sni`, leaf first, as DER.
pub fn probe(port: u16, sni: &str) -> Result<Vec<Vec<u8>>, String> {
    probe_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), sni)
}

/// Certificates served on `addr` (IPv4 or IPv6) for `sni`, leaf first, as
/// DER; a fresh connection and a full handshake (no resumption).
pub fn probe_at(addr: SocketAddr, sni: &str) -> Result<Vec<Vec<u8>>, String> {
    let server_name = ServerName::try_from(sni.to_owned())
        .map_err(|e| format!("bad server name {sni:?}: {e}"))?;
    let mut conn = ClientConnection::new(client_config(), server_name)
        .map_err(|e| format!("tls client for {sni}: {e}"))?;
    let mut sock = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_read_timeout(Some(PROBE_TIMEOUT))
        .and_then(|()| sock.set_write_timeout(Some(PROBE_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err(format!("tls handshake with {addr} ({sni}) timed out"));
        }
        match conn.complete_io(&mut sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(format!("{addr} closed the connection during the handshake"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("tls handshake with {addr} ({sni}): {e}")),
        }
    }
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| format!("{addr} sent no certificate"))?
        .iter()
        .map(|c| c.to_vec())
        .collect();
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    Ok(certs)
}

/// The served chain (leaf first, DER); panics when the handshake fails.
pub fn served_chain(port: u16, sni: &str) -> Vec<Vec<u8>> {
    probe(port, sni).unwrap_or_else(|e| panic!("probe 127.0.0.1:{port} ({sni}): {e}"))
}

/// SHA-256 hex of the leaf served on `addr` (IPv4 or IPv6).
pub fn served_leaf_sha256_at(addr: SocketAddr, sni: &str) -> Result<String, String> {
    let chain = probe_at(addr, sni)?;
    Ok(sha256_hex(&chain[0]))
}

/// SHA-256 hex of the served leaf's DER.
pub fn served_leaf_sha256(port: u16, sni: &str) -> Result<String, String> {
    let chain = probe(port, sni)?;
    Ok(sha256_hex(&chain[0]))
}

/// Polls (bounded by `timeout`) until three probes in a row serve this SHA-256
/// (right after a reload an old worker can still answer with the old leaf);
/// Err says what was served last.
pub fn wait_until_served(
    port: u16,
    sni: &str,
    sha256: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut in_a_row = 0;
    loop {
        let last = served_leaf_sha256(port, sni);
        if last.as_deref() == Ok(sha256) {
            in_a_row += 1;
            if in_a_row == 3 {
                return Ok(());
            }
            continue;
        }
        in_a_row = 0;
        if Instant::now() >= deadline {
            return Err(format!(
                "127.0.0.1:{port} ({sni}) still serves {last:?} after {timeout:?}, want {sha256}"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The probes' client config: any certificate, handshake signatures checked
/// (shared with [`super::mailtls`]).
pub fn client_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AcceptAnyCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // Every probe is a full handshake: what is served now, never a session
    // remembered from an earlier probe.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Trusts any certificate, but checks that the server signed the handshake with its key.
#[derive(Debug)]
struct AcceptAnyCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
