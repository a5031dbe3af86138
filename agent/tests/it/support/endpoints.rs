//! Verify endpoints that misbehave on purpose, on 127.0.0.1 ports of their
//! own: one that refuses connections, one that accepts TCP and never says a
//! word, and a TLS server that serves a certificate of the test's choosing
//! (e.g. a self-signed one nobody deployed).
//!
//! Each server runs on a thread of the test and stops when dropped (also
//! when the test panics): the listener is woken by a connection to itself
//! and the thread is joined.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::pki::Leaf;

/// A port on which nothing listens (bound, noted and released).
pub fn refused_port() -> u16 {
    super::free_port()
}

/// A loopback server running `serve` on each accepted connection, on its
/// own thread, until dropped.
pub struct Endpoint {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    fn start(serve: impl Fn(TcpStream) + Send + 'static) -> Endpoint {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            // Connections are kept open until the endpoint stops.
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    if let Ok(keep) = conn.try_clone() {
                        held.push(keep);
                    }
                    serve(conn);
                }
            }
            for c in held {
                let _ = c.shutdown(Shutdown::Both);
            }
        });
        Endpoint {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Accepts TCP connections and never sends or reads a byte.
    pub fn silent() -> Endpoint {
        Endpoint::start(|_conn| {})
    }

    /// Completes TLS handshakes serving `leaf` (and its chain), then closes.
    pub fn tls(leaf: &Leaf) -> Endpoint {
        let mut chain = vec![CertificateDer::from(leaf.der.clone())];
        chain.extend(leaf.chain_der.iter().cloned().map(CertificateDer::from));
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("leaf key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let config = Arc::new(config);
        Endpoint::start(move |conn| {
            let Ok(server) = ServerConnection::new(config.clone()) else {
                return;
            };
            let mut tls = StreamOwned::new(server, conn);
            // Drive the handshake to its end; the client hangs up after it.
            let mut buf = [0u8; 1];
            let _ = tls.read(&mut buf);
            let _ = tls.flush();
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
