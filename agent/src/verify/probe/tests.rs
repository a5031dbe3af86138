//! Probes against real TLS servers on loopback (rustls, rcgen certificates),
//! and the pure helpers.

use std::sync::Mutex;
use std::time::Instant as StdInstant;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

// === Fixtures ===

const TLS12_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// A CA that can sign.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = match parent {
        Some(parent) => params.signed_by(&key, &parent.issuer),
        None => params.self_signed(&key),
    }
    .expect("sign");
    Ca {
        pem: cert.pem(),
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

/// A server's certificate material: root → intermediate → leaf.
struct Site {
    root: Ca,
    /// Leaf, then the intermediate: what the server sends.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn site_with(key: KeyPair, names: &[&str]) -> Site {
    let root = ca("Test Root", None);
    let inter = ca("Test Intermediate", Some(&root));
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let leaf = params.signed_by(&key, &inter.issuer).expect("sign");
    Site {
        chain: vec![leaf.der().clone(), inter.der.clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        root,
    }
}

/// An ECDSA P-256 site for `a.test` (and 127.0.0.1).
fn site() -> Site {
    site_with(KeyPair::generate().expect("key"), &["a.test", "127.0.0.1"])
}

fn rsa_site() -> Site {
    let key = KeyPair::from_pem(crate::bundle::tests::RSA_PKCS8).expect("fixture");
    site_with(key, &["a.test"])
}

/// Picks the certificate, records the SNI of each ClientHello, and serves
/// nothing for names other than `only` when set.
#[derive(Debug)]
struct Resolver {
    key: Arc<CertifiedKey>,
    only: Option<&'static str>,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_owned);
        self.seen.lock().expect("lock").push(sni.clone());
        match self.only {
            Some(only) if sni.as_deref() != Some(only) => None,
            _ => Some(Arc::clone(&self.key)),
        }
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'static>) -> CertifiedKey {
    let signer = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .expect("signing key");
    CertifiedKey::new(chain, signer)
}

/// A TLS server's settings.
struct Server {
    key: CertifiedKey,
    versions: &'static [&'static SupportedProtocolVersion],
    only: Option<&'static str>,
    /// Plaintext lines before TLS (a STARTTLS conversation).
    preamble: Vec<Step>,
}

impl Server {
    fn new(site: &Site) -> Server {
        Server {
            key: certified(site.chain.clone(), &site.key),
            versions: rustls::ALL_VERSIONS,
            only: None,
            preamble: Vec::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum Step {
    Send(&'static str),
    /// Read a line and require it to start with this.
    Expect(&'static str),
}

/// A running test server: its endpoint and the SNI of every handshake.
struct Running {
    endpoint: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

async fn serve(server: Server) -> Running {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let resolver = Resolver {
        key: Arc::new(server.key),
        only: server.only,
        seen: Arc::clone(&seen),
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(server.versions)
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let preamble = Arc::new(server.preamble);
    let endpoint = listen(move |mut tcp| {
        let acceptor = acceptor.clone();
        let preamble = Arc::clone(&preamble);
        async move {
            for step in preamble.iter() {
                match *step {
                    Step::Send(text) => tcp.write_all(text.as_bytes()).await.expect("send"),
                    Step::Expect(want) => {
                        let line = read_line(&mut tcp).await;
                        assert!(line.starts_with(want), "{line:?} is not {want:?}");
                    }
                }
            }
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut sink = Vec::new();
                let _ = tls.read_to_end(&mut sink).await;
            }
        }
    })
    .await;
    Running { endpoint, seen }
}

/// Accepts connections on a loopback port and runs `handle` on each.
async fn listen<F, Fut>(handle: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handle(tcp));
        }
    });
    endpoint
}

async fn read_line(tcp: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while tcp.read(&mut byte).await.expect("read") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_owned()
}

fn probe_of<'a>(endpoint: &'a str, server_name: &'a str) -> Probe<'a> {
    Probe {
        endpoint,
        server_name,
        protocol: VerifyProtocol::Tls,
        timeout: Duration::from_secs(10),
        roots: None,
    }
}

fn roots_of(ca: &Ca) -> Roots {
    Roots::from_pem(Path::new("/etc/ssl/test-ca.pem"), ca.pem.as_bytes()).expect("roots")
}

/// What a successful probe of `site` must report.
fn assert_serves(served: &Served, site: &Site, tls_version: &str) {
    assert_eq!(served.leaf_sha256, sha256_hex(&site.chain[0]));
    assert_eq!(served.leaf_der, site.chain[0].as_ref());
    assert_eq!(served.chain_sha256, [sha256_hex(&site.chain[1])]);
    assert_eq!(served.subject, "CN=a.test");
    let leaf = bundle::cert_from_der(site.chain[0].to_vec()).expect("leaf");
    assert_eq!(served.not_after_unix, leaf.not_after);
    assert_eq!(served.tls_version, tls_version);
    assert_eq!(served.leaf_sha256.len(), 64);
    assert!(
        served
            .leaf_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
}

async fn fails(p: &Probe<'_>) -> (ProbeError, String) {
    let err = probe(p).await.expect_err("the probe should fail");
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(text.starts_with(p.endpoint), "names the endpoint: {text}");
    (err, text)
}

// === Serving ===

#[tokio::test]
async fn reports_the_served_leaf_and_chain() {
    let site = site();
    let server = serve(Server::new(&site)).await;
    let served = probe(&probe_of(&server.endpoint, "a.test"))
        .await
        .expect("probe");
    assert_serves(&served, &site, "TLSv1.3");
    assert!(!served.ca_validated);
    assert_eq!(
        *server.seen.lock().expect("lock"),
        [Some("a.test".to_owned())]
    );
}

#[tokio::test]
async fn rsa_keys_and_tls_1_2() {
    for (site, versions, want) in [
        (rsa_site(), rustls::ALL_VERSIONS, "TLSv1.3"),
        (rsa_site(), TLS12_ONLY, "TLSv1.2"),
        (site(), TLS12_ONLY, "TLSv1.2"),
    ] {
        let server = serve(Server {
            versions,
            ..Server::new(&site)
        })
        .await;
        let served = probe(&probe_of(&server.endpoint, "a.test"))
            .await
            .expect("probe");
        assert_serves(&served, &site, want);
    }
}

#[tokio::test]
async fn an_ip_server_name_sends_no_sni_and_localhost_resolves() {
    let site = site();
    let server = serve(Server::new(&site)).await;
    probe(&probe_of(&server.endpoint, "127.0.0.1"))
        .await
        .expect("probe by address");
    let port = server.endpoint.rsplit_once(':').expect("port").1;
    // localhost may resolve to ::1 first, where nothing listens: the next
    // address is tried.
    let by_name = format!("localhost:{port}");
    probe(&probe_of(&by_name, "a.test"))
        .await
        .expect("probe by name");
    assert_eq!(
        *server.seen.lock().expect("lock"),
        [None, Some("a.test".to_owned())]
    );
}

#[tokio::test]
async fn a_server_without_the_key_of_its_certificate_is_caught() {
    // The server presents the site's certificate but signs with another key,
    // as a server would whose key and certificate files do not belong
    // together: the handshake signature must not verify.
    let site = site();
    let impostor = self::site();
    let server = serve(Server {
        key: certified(site.chain.clone(), &impostor.key),
        ..Server::new(&site)
    })
    .await;
    let (err, text) = fails(&probe_of(&server.endpoint, "a.test")).await;
    assert_eq!(err.reason(), "key-proof", "TLS 1.3: {text}");
    assert_eq!(
        text,
        format!(
            "{}: the server's handshake signature does not verify with the certificate it \
             served (bad signature), so it did not prove it holds that certificate's key: \
             check that the server's key and certificate files belong together",
            server.endpoint
        )
    );

    let server = serve(Server {
        key: certified(site.chain.clone(), &impostor.key),
        versions: TLS12_ONLY,
        ..Server::new(&site)
    })
    .await;
    let (err, text) = fails(&probe_of(&server.endpoint, "a.test")).await;
    assert_eq!(err.reason(), "key-proof", "TLS 1.2: {text}");
}

// === ca_file ===

#[tokio::test]
async fn ca_file_validates_chain_and_name() {
    let site = site();
    let server = serve(Server::new(&site)).await;
    let roots = roots_of(&site.root);
    assert_eq!(roots.count(), 1);

    let served = probe(&Probe {
        roots: Some(&roots),
        ..probe_of(&server.endpoint, "a.test")
    })
    .await
    .expect("validated");
    assert!(served.ca_validated);
    assert_serves(&served, &site, "TLSv1.3");

    let other = roots_of(&ca("Other Root", None));
    let (err, text) = fails(&Probe {
        roots: Some(&other),
        ..probe_of(&server.endpoint, "a.test")
    })
    .await;
    assert_eq!(err.reason(), "untrusted");
    assert_eq!(
        text,
        format!(
            "{}: the served certificate is not trusted by verify.ca_file /etc/ssl/test-ca.pem: \
             it is not issued by a certificate in that file; \
             check ca_file and the chain the server sends",
            server.endpoint
        )
    );

    let (err, text) = fails(&Probe {
        roots: Some(&roots),
        ..probe_of(&server.endpoint, "b.test")
    })
    .await;
    assert_eq!(err.reason(), "name-mismatch");
    assert_eq!(
        text,
        format!(
            "{}: the served certificate is not valid for b.test (it names a.test, 127.0.0.1): \
             check verify.server_name and which certificate the server picks for that name",
            server.endpoint
        )
    );

    // Without ca_file the name is not checked: the caller compares leaves.
    probe(&probe_of(&server.endpoint, "b.test"))
        .await
        .expect("any name");
}

#[test]
fn ca_file_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let err = Roots::load(&missing).expect_err("missing");
    assert!(
        err.to_string().starts_with(&format!(
            "cannot read verify.ca_file {}: No such file",
            missing.display()
        )),
        "{err}"
    );

    let path = Path::new("/etc/ssl/ca.pem");
    for (pem, want) in [
        (
            &b""[..],
            "verify.ca_file /etc/ssl/ca.pem holds no PEM certificate: it must hold \
             -----BEGIN CERTIFICATE----- blocks (for a DER file",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "verify.ca_file /etc/ssl/ca.pem holds no PEM certificate: it must hold \
             -----BEGIN CERTIFICATE----- blocks",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            "verify.ca_file /etc/ssl/ca.pem is not valid PEM: ",
        ),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "certificate 1 in verify.ca_file /etc/ssl/ca.pem cannot be a trust anchor: ",
        ),
    ] {
        let err = Roots::from_pem(path, pem).expect_err("bad");
        assert!(err.to_string().starts_with(want), "{err}");
    }

    let good = dir.path().join("ca.pem");
    let both = format!("{}{}", ca("A", None).pem, ca("B", None).pem);
    std::fs::write(&good, both).expect("write");
    let roots = Roots::load(&good).expect("load");
    assert_eq!((roots.count(), roots.path()), (2, good.as_path()));
}

// === STARTTLS ===

#[tokio::test]
async fn starttls_then_tls_for_each_mail_protocol() {
    use Step::{Expect, Send};
    let cases = [
        (
            VerifyProtocol::SmtpStarttls,
            vec![
                Send("220 mx.test ESMTP\r\n"),
                Expect("EHLO [127.0.0.1]"),
                Send("250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
                Expect("STARTTLS"),
                Send("220 2.0.0 Ready to start TLS\r\n"),
            ],
        ),
        (
            VerifyProtocol::ImapStarttls,
            vec![
                Send("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"),
                Expect("a002 STARTTLS"),
                Send("a002 OK Begin TLS negotiation now\r\n"),
            ],
        ),
        (
            VerifyProtocol::Pop3Starttls,
            vec![
                Send("+OK ready\r\n"),
                Expect("CAPA"),
                Send("+OK\r\nUSER\r\nSTLS\r\n.\r\n"),
                Expect("STLS"),
                Send("+OK Begin TLS\r\n"),
            ],
        ),
    ];
    let site = site();
    for (protocol, preamble) in cases {
        let server = serve(Server {
            preamble,
            ..Server::new(&site)
        })
        .await;
        let served = probe(&Probe {
            protocol,
            ..probe_of(&server.endpoint, "a.test")
        })
        .await
        .unwrap_or_else(|e| panic!("{protocol:?}: {e}"));
        assert_serves(&served, &site, "TLSv1.3");
    }
}

#[tokio::test]
async fn starttls_errors_carry_the_endpoint() {
    use Step::{Expect, Send};
    let site = site();
    let server = serve(Server {
        preamble: vec![
            Send("220 mx.test ESMTP\r\n"),
            Expect("EHLO"),
            Send("250-mx.test\r\n250 PIPELINING\r\n"),
        ],
        ..Server::new(&site)
    })
    .await;
    let (err, text) = fails(&Probe {
        protocol: VerifyProtocol::SmtpStarttls,
        ..probe_of(&server.endpoint, "a.test")
    })
    .await;
    assert_eq!(err.reason(), "no-starttls");
    assert_eq!(err.phase(), Phase::Starttls);
    assert!(
        text.starts_with(&format!(
            "{}: the server did not offer STARTTLS in its EHLO reply",
            server.endpoint
        )),
        "{text}"
    );
    assert!(text.contains("smtpd_tls_security_level = may"), "{text}");
}

// === Failures ===

#[tokio::test]
async fn refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let (err, text) = fails(&probe_of(&endpoint, "a.test")).await;
    assert_eq!(err.reason(), "refused");
    assert_eq!(err.phase(), Phase::Connect);
    assert_eq!(
        text,
        format!(
            "{endpoint}: connection refused: nothing listens there; \
             check verify.endpoint and that the server is running"
        )
    );
}

/// A server that accepts TCP and then says nothing.
async fn silent() -> String {
    listen(|mut tcp| async move {
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    })
    .await
}

#[tokio::test]
async fn silence_times_out_within_the_attempt_timeout() {
    let endpoint = silent().await;
    let timeout = Duration::from_millis(300);
    let started = StdInstant::now();
    let (err, text) = fails(&Probe {
        timeout,
        ..probe_of(&endpoint, "a.test")
    })
    .await;
    let took = started.elapsed();
    assert!(took >= timeout && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(err.reason(), "timeout");
    assert_eq!(err.phase(), Phase::Handshake);
    assert_eq!(
        text,
        format!(
            "{endpoint}: accepted TCP but no TLS handshake within 300ms: is this a TLS port? \
             (verify.protocol = tls; use smtp-starttls/imap-starttls/pop3-starttls for plaintext ports)"
        )
    );

    // With STARTTLS the silence is in the greeting.
    let (err, text) = fails(&Probe {
        timeout,
        protocol: VerifyProtocol::ImapStarttls,
        ..probe_of(&endpoint, "a.test")
    })
    .await;
    assert_eq!(err.phase(), Phase::Greeting);
    assert!(
        text.contains(
            "accepted TCP but sent no IMAP greeting within 300ms: is this an implicit-TLS port?"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_plaintext_server_is_named() {
    let smtp = listen(|mut tcp| async move {
        let _ = tcp.write_all(b"220 mx.test ESMTP Postfix\r\n").await;
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    })
    .await;
    let (err, text) = fails(&probe_of(&smtp, "a.test")).await;
    assert_eq!(err.reason(), "not-tls");
    assert_eq!(
        text,
        format!(
            "{smtp}: not a TLS server: its first bytes were \"220 mx.test ESMTP Postfix\\r\\n\"; \
             this looks like an SMTP server greeting: use verify.protocol = smtp-starttls"
        )
    );

    let http = listen(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let _ = tcp
            .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            .await;
    })
    .await;
    let (err, text) = fails(&probe_of(&http, "a.test")).await;
    assert_eq!(err.reason(), "not-tls");
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    assert!(text.ends_with("this looks like a plain HTTP server: check verify.endpoint"));
}

#[tokio::test]
async fn a_server_hanging_up_mid_handshake() {
    let endpoint = listen(|mut tcp| async move {
        let mut buf = [0u8; 16 * 1024];
        let _ = tcp.read(&mut buf).await;
    })
    .await;
    let (err, text) = fails(&probe_of(&endpoint, "a.test")).await;
    assert_eq!(err.reason(), "closed", "{text}");
    assert!(
        text.contains(
            "closed the connection during the TLS handshake without an alert: \
             check that a certificate is configured for a.test"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn no_certificate_for_the_name_is_an_alert() {
    let site = site();
    let server = serve(Server {
        only: Some("a.test"),
        ..Server::new(&site)
    })
    .await;
    let (err, text) = fails(&probe_of(&server.endpoint, "www.b.test")).await;
    assert_eq!(err.reason(), "alert");
    assert_eq!(
        text,
        format!(
            "{}: the server sent TLS alert access_denied: the server refused the handshake \
             (rustls-based servers say this when no certificate is configured for SNI \
             www.b.test): check verify.server_name",
            server.endpoint
        )
    );
}

#[tokio::test]
async fn a_huge_timeout_does_not_overflow() {
    let site = site();
    let server = serve(Server::new(&site)).await;
    probe(&Probe {
        timeout: Duration::MAX,
        ..probe_of(&server.endpoint, "a.test")
    })
    .await
    .expect("probe");
}

#[tokio::test]
async fn bad_settings_are_caught_before_connecting() {
    for (endpoint, reason) in [
        ("127.0.0.1", "bad-endpoint"),
        ("::1:443", "bad-endpoint"),
        ("[::1]", "bad-endpoint"),
        (":443", "bad-endpoint"),
        ("127.0.0.1:0", "bad-endpoint"),
        ("127.0.0.1:https", "bad-endpoint"),
    ] {
        let (err, text) = fails(&probe_of(endpoint, "a.test")).await;
        assert_eq!(err.reason(), reason, "{text}");
    }
    let (err, text) = fails(&probe_of("127.0.0.1:443", "a b")).await;
    assert_eq!(err.reason(), "bad-server-name");
    assert_eq!(
        text,
        "127.0.0.1:443: \"a b\" is not a valid server name for SNI: \
         set verify.server_name to a DNS name or an IP address"
    );
}

// === Helpers ===

#[test]
fn endpoints_split() {
    assert_eq!(split_endpoint("127.0.0.1:443"), Ok(("127.0.0.1", 443)));
    assert_eq!(split_endpoint("[::1]:8443"), Ok(("::1", 8443)));
    assert_eq!(
        split_endpoint("mail.example.com:25"),
        Ok(("mail.example.com", 25))
    );
}

#[test]
fn server_names() {
    assert!(matches!(
        server_name("a.test"),
        Some(ServerName::DnsName(_))
    ));
    assert!(matches!(
        server_name("192.0.2.1"),
        Some(ServerName::IpAddress(_))
    ));
    assert!(matches!(
        server_name("[::1]"),
        Some(ServerName::IpAddress(_))
    ));
    assert!(matches!(server_name("::1"), Some(ServerName::IpAddress(_))));
    assert_eq!(server_name(""), None);
}

#[test]
fn ehlo_address_literals() {
    assert_eq!(
        address_literal("192.0.2.1".parse().expect("ip")),
        "[192.0.2.1]"
    );
    assert_eq!(address_literal("::1".parse().expect("ip")), "[IPv6:::1]");
    assert_eq!(
        address_literal("::ffff:192.0.2.1".parse().expect("ip")),
        "[192.0.2.1]"
    );
}

#[test]
fn alerts_are_named_as_in_the_rfcs() {
    let (name, meaning) = alert_meaning(AlertDescription::UnrecognisedName, "www.example.com");
    assert_eq!(name, "unrecognized_name");
    assert!(meaning.starts_with("no certificate configured for SNI www.example.com"));
    let (name, _) = alert_meaning(AlertDescription::DecodeError, "x");
    assert_eq!(name, "decode_error");
    assert_eq!(
        snake_case("BadCertificateStatusResponse"),
        "bad_certificate_status_response"
    );
    assert_eq!(presented_name("DnsName(\"a.test\")"), "a.test");
    assert_eq!(presented_name("IpAddress(::1)"), "::1");
    assert_eq!(presented_name("URI"), "URI");
}

#[test]
fn timeouts_name_their_phase() {
    let t = Duration::from_secs(2);
    for (phase, protocol, want) in [
        (
            Phase::Connect,
            VerifyProtocol::Tls,
            "no TCP connection within 2s",
        ),
        (
            Phase::Greeting,
            VerifyProtocol::SmtpStarttls,
            "no SMTP greeting within 2s",
        ),
        (
            Phase::Starttls,
            VerifyProtocol::Pop3Starttls,
            "during the POP3 STARTTLS exchange",
        ),
        (
            Phase::Handshake,
            VerifyProtocol::Tls,
            "no TLS handshake within 2s: is this a TLS port?",
        ),
        (
            Phase::Handshake,
            VerifyProtocol::ImapStarttls,
            "accepted IMAP STARTTLS but the TLS handshake did not complete within 2s",
        ),
    ] {
        let detail = timeout_detail(phase, protocol, t);
        assert!(detail.contains(want), "{phase}: {detail}");
    }
}
