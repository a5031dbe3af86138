//! The `metrics_listen` endpoint: Prometheus scrapes over HTTP/1.1.
//!
//! It answers `GET /metrics` (and `HEAD`; a query string is ignored) with
//! what an [`Exposition`] renders at that moment, as `Content-Type:
//! text/plain; version=0.0.4; charset=utf-8`. Any other path is `404`, any
//! other method `405`, each with a one-line body. One request per connection:
//! keep-alive is off and every response says `Connection: close`. An
//! HTTP/1.0 request gets an HTTP/1.0 answer.
//!
//! The connection is hyper's HTTP/1.1 server connection
//! (`hyper::server::conn::http1`), configured with a header-read timeout and
//! a buffer limit. Guarantees, because the endpoint has no authentication and
//! may face a network:
//! - a request head is read up to [`MAX_HEAD`] bytes; a longer one gets
//!   hyper's `431 Request Header Fields Too Large` and the connection closes;
//!   a head that does not parse gets hyper's `400` (an HTTP/2 preface is
//!   closed without an answer);
//! - a client has [`READ_TIMEOUT`] to send its head; after that hyper drops
//!   the connection without an answer;
//! - a request body is never read;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; further ones
//!   are closed at once, without an answer;
//! - a failing `accept` (such as `EMFILE`) is retried after 100 ms, not in a
//!   busy loop;
//! - nothing a client sends reaches a log line.
//!
//! The module knows nothing of the agent: what is served comes from the
//! [`Exposition`] given to [`serve`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Largest request head read (hyper's read buffer limit).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// `Content-Type` of the exposition (text format 0.0.4).
const EXPOSITION_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of the error answers.
const ERROR_TYPE: &str = "text/plain; charset=utf-8";
/// The only path served.
const PATH: &str = "/metrics";
/// Pause after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What renders the exposition at each scrape (`GET` and `HEAD`).
///
/// Implement it with `async fn render(&self) -> String`; the future must be
/// `Send` because every connection runs on its own task.
pub trait Exposition: Send + Sync + 'static {
    /// The whole exposition text.
    fn render(&self) -> impl Future<Output = String> + Send;
}

/// Serves `listener` until `shutdown` turns true (or its sender is gone).
/// Connections already accepted finish on their own.
pub async fn serve<E: Exposition>(
    listener: TcpListener,
    exposition: Arc<E>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| answer(request, exposition.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                // hyper's errors name the failure, never the client's bytes.
                tracing::debug!("metrics endpoint: {e}");
            }
        });
    }
}

/// Answers one request from its method and path; the body is never read.
async fn answer<E: Exposition>(
    request: Request<Incoming>,
    exposition: Arc<E>,
) -> Result<Response<String>, Infallible> {
    let status = if request.uri().path() != PATH {
        StatusCode::NOT_FOUND
    } else if matches!(*request.method(), Method::GET | Method::HEAD) {
        StatusCode::OK
    } else {
        StatusCode::METHOD_NOT_ALLOWED
    };
    drop(request);
    let (content_type, body) = if status == StatusCode::OK {
        // For `HEAD` too: hyper sends its length and leaves the body out.
        (EXPOSITION_TYPE, exposition.render().await)
    } else {
        let reason = status.canonical_reason().unwrap_or("");
        (
            ERROR_TYPE,
            format!(
                "{} {reason}: this endpoint serves GET {PATH} only\n",
                status.as_u16()
            ),
        )
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;

    /// Far longer than anything here should take; only a hang reaches it.
    const GENEROUS: Duration = Duration::from_secs(60);

    struct Fake(String);

    impl Exposition for Fake {
        async fn render(&self) -> String {
            self.0.clone()
        }
    }

    const TEXT: &str = "# TYPE fake_total counter\nfake_total 1\n";

    struct Endpoint {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    async fn start(text: &str) -> Endpoint {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::new(Fake(text.to_owned())), shutdown));
        Endpoint { addr, stop, task }
    }

    /// Everything the endpoint sends until it closes.
    async fn read_all(s: &mut TcpStream) -> String {
        let mut raw = Vec::new();
        tokio::time::timeout(GENEROUS, s.read_to_end(&mut raw))
            .await
            .expect("the endpoint closes the connection")
            .expect("read the answer");
        String::from_utf8(raw).unwrap()
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        read_all(&mut s).await
    }

    /// (status line, lower-cased header lines, body).
    fn split(raw: &str) -> (String, Vec<String>, String) {
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let mut lines = head.lines();
        let status = lines.next().unwrap_or("").to_owned();
        let headers = lines.map(str::to_ascii_lowercase).collect();
        (status, headers, body.to_owned())
    }

    fn has(headers: &[String], line: &str) -> bool {
        headers.iter().any(|h| h == line)
    }

    #[tokio::test]
    async fn get_and_head_serve_the_exposition() {
        let e = start(TEXT).await;
        // An HTTP/1.0 client gets an HTTP/1.0 answer.
        for (request, want) in [
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            ("GET /metrics?x=1 HTTP/1.0\r\n\r\n", "HTTP/1.0 200 OK"),
        ] {
            let (status, headers, body) = split(&exchange(e.addr, request.as_bytes()).await);
            assert_eq!(status, want, "{request}");
            assert!(
                has(
                    &headers,
                    "content-type: text/plain; version=0.0.4; charset=utf-8"
                ),
                "{headers:?}"
            );
            assert!(has(&headers, "connection: close"), "{headers:?}");
            assert!(
                has(&headers, &format!("content-length: {}", TEXT.len())),
                "{headers:?}"
            );
            assert_eq!(body, TEXT);
        }
        let (status, headers, body) =
            split(&exchange(e.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            has(&headers, &format!("content-length: {}", TEXT.len())),
            "{headers:?}"
        );
        assert_eq!(body, "");
    }

    #[tokio::test]
    async fn an_exposition_larger_than_the_buffer_is_sent_whole() {
        let text = "x 1\n".repeat(64 * 1024);
        let e = start(&text).await;
        let (status, _, body) = split(&exchange(e.addr, b"GET /metrics HTTP/1.1\r\n\r\n").await);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body.len(), text.len());
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let e = start(TEXT).await;
        for (request, status, body) in [
            (
                "GET / HTTP/1.1\r\n\r\n",
                "HTTP/1.1 404 Not Found",
                "404 Not Found: this endpoint serves GET /metrics only\n",
            ),
            (
                "GET /metrics/x HTTP/1.1\r\n\r\n",
                "HTTP/1.1 404 Not Found",
                "404 Not Found: this endpoint serves GET /metrics only\n",
            ),
            (
                "POST /other HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 404 Not Found",
                "404 Not Found: this endpoint serves GET /metrics only\n",
            ),
            (
                // The body is announced, never sent, and never waited for.
                "POST /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
                "405 Method Not Allowed: this endpoint serves GET /metrics only\n",
            ),
            (
                "DELETE /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
                "405 Method Not Allowed: this endpoint serves GET /metrics only\n",
            ),
        ] {
            let (got, headers, got_body) = split(&exchange(e.addr, request.as_bytes()).await);
            assert_eq!(
                (got.as_str(), got_body.as_str()),
                (status, body),
                "{request}"
            );
            assert!(
                has(&headers, "content-type: text/plain; charset=utf-8"),
                "{headers:?}"
            );
            assert!(has(&headers, "connection: close"), "{headers:?}");
        }
    }

    #[tokio::test]
    async fn garbage_gets_400() {
        let e = start(TEXT).await;
        let (status, _, _) = split(&exchange(e.addr, b"\xff\xfe nonsense\r\n\r\n").await);
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    #[tokio::test]
    async fn an_oversize_head_gets_431() {
        let e = start(TEXT).await;
        for request in [
            format!("GET /{} HTTP/1.1\r\n\r\n", "x".repeat(10_000)),
            format!(
                "GET /metrics HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
                "x".repeat(MAX_HEAD)
            ),
        ] {
            let (status, _, body) = split(&exchange(e.addr, request.as_bytes()).await);
            assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
            assert_eq!(body, "");
        }
    }

    #[tokio::test]
    async fn a_slow_head_is_dropped_without_an_answer() {
        let e = start(TEXT).await;
        let mut s = TcpStream::connect(e.addr).await.unwrap();
        // Part of a head, and then nothing: READ_TIMEOUT later hyper closes.
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert_eq!(read_all(&mut s).await, "");
        // Nothing at all: the same.
        let mut s = TcpStream::connect(e.addr).await.unwrap();
        assert_eq!(read_all(&mut s).await, "");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let e = start(TEXT).await;
        // Each holds a slot until READ_TIMEOUT, far longer than this test
        // needs to open one more.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = TcpStream::connect(e.addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
        let mut s = TcpStream::connect(e.addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(GENEROUS, s.read_to_end(&mut raw))
            .await
            .expect("the endpoint closes the connection");
        // Closed with the request unread: an end of stream or a reset.
        match read {
            Ok(_) => assert_eq!(raw, b"", "no answer beyond {MAX_CONNECTIONS}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        drop(held);
    }

    #[tokio::test]
    async fn serve_ends_when_shutdown_turns_true() {
        let e = start(TEXT).await;
        // A change that is not a shutdown keeps it serving.
        e.stop.send(false).unwrap();
        let (status, _, _) = split(&exchange(e.addr, b"GET /metrics HTTP/1.1\r\n\r\n").await);
        assert_eq!(status, "HTTP/1.1 200 OK");
        e.stop.send(true).unwrap();
        tokio::time::timeout(GENEROUS, e.task)
            .await
            .expect("serve returns")
            .unwrap();
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzzing the endpoint with requests of every shape over real
    //! connections: each gets a well-formed HTTP/1.x answer or a closed
    //! connection, only `GET`/`HEAD /metrics` gets the exposition, and the
    //! endpoint answers a plain scrape after every one of them.

    use std::net::{Ipv4Addr, SocketAddr};

    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Far longer than any answer takes; only a hang reaches it.
    const GENEROUS: Duration = Duration::from_secs(30);

    struct Fake;

    impl Exposition for Fake {
        async fn render(&self) -> String {
            "fake_total 1\n".to_owned()
        }
    }

    /// What the endpoint sent until it closed (a reset ends it too).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(GENEROUS, read)
            .await
            .expect("the endpoint answers or closes");
        out
    }

    /// A request line and head built from pieces that matter to a router
    /// and a parser, or plain bytes.
    fn request() -> impl Strategy<Value = (Vec<u8>, String, String)> {
        let method = prop_oneof![
            Just("GET"),
            Just("HEAD"),
            Just("POST"),
            Just("PUT"),
            Just("DELETE"),
            Just("OPTIONS"),
            Just("CONNECT"),
            Just("get"),
            Just("GET\0"),
            Just(""),
        ];
        let path = prop_oneof![
            Just("/metrics".to_owned()),
            Just("/metrics?x=1&y".to_owned()),
            Just("/metrics/".to_owned()),
            Just("/metrics#frag".to_owned()),
            Just("/".to_owned()),
            Just("//metrics".to_owned()),
            Just("/%6detrics".to_owned()),
            Just("/METRICS".to_owned()),
            Just("*".to_owned()),
            Just("http://localhost/metrics".to_owned()),
            Just("/metrics\r\nX-Forged: 1".to_owned()),
            "/[ -~]{0,40}",
            "[^\r\n]{0,20}",
        ];
        let version = prop_oneof![
            Just("HTTP/1.1"),
            Just("HTTP/1.0"),
            Just("HTTP/2.0"),
            Just("HTTP/0.9"),
            Just("HTTP/1.1\0"),
            Just(""),
        ];
        let header = prop_oneof![
            Just("Host: localhost".to_owned()),
            Just("Content-Length: 5".to_owned()),
            Just("Content-Length: 99999999999999999999".to_owned()),
            Just("Transfer-Encoding: chunked".to_owned()),
            Just("Expect: 100-continue".to_owned()),
            Just("Connection: keep-alive".to_owned()),
            Just("Upgrade: h2c".to_owned()),
            Just(": empty".to_owned()),
            Just("No-Colon".to_owned()),
            "[A-Za-z-]{1,12}: [ -~]{0,40}",
        ];
        let eol = prop_oneof![Just("\r\n"), Just("\n")];
        prop_oneof![
            4 => (method, path, version, proptest::collection::vec(header, 0..6), eol, "[ -~]{0,16}")
                .prop_map(|(m, p, v, h, eol, body)| {
                    let mut r = format!("{m} {p} {v}{eol}");
                    for line in &h {
                        r.push_str(&format!("{line}{eol}"));
                    }
                    r.push_str(eol);
                    r.push_str(&body);
                    (r.into_bytes(), m.to_owned(), p)
                }),
            1 => proptest::collection::vec(any::<u8>(), 0..512)
                .prop_map(|b| (b, String::new(), String::new())),
            1 => Just((b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), String::new(), String::new())),
        ]
    }

    #[test]
    fn any_request_gets_a_well_formed_answer_or_none() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime");
        let (addr, stop) = rt.block_on(async {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("its address");
            let (stop, shutdown) = watch::channel(false);
            tokio::spawn(serve(listener, Arc::new(Fake), shutdown));
            (addr, stop)
        });
        let mut runner = TestRunner::new(crate::fuzzing::config(128));
        let result = runner.run(&request(), |(raw, method, path)| {
            let (answer, scrape) = rt.block_on(async {
                let answer = exchange(addr, &raw).await;
                let scrape = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
                (answer, scrape)
            });
            prop_assert!(
                scrape.starts_with(b"HTTP/1.1 200 OK\r\n") && scrape.ends_with(b"fake_total 1\n"),
                "the endpoint stopped answering after {:?}: {:?}",
                String::from_utf8_lossy(&raw),
                String::from_utf8_lossy(&scrape)
            );
            if answer.is_empty() {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&answer);
            let status: u16 = text
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| text.strip_prefix("HTTP/1.0 "))
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
                .ok_or_else(|| TestCaseError::fail(format!("not an HTTP/1.x answer: {text:?}")))?;
            prop_assert!(text.contains("\r\n\r\n"), "{text:?}");
            if status == 200 {
                let route = path.split(['?', '#']).next().unwrap_or_default();
                prop_assert!(
                    matches!(method.as_str(), "GET" | "HEAD"),
                    "{method} {path}: {text:?}"
                );
                prop_assert!(
                    route == PATH || route.ends_with("//localhost/metrics"),
                    "{method} {path}: {text:?}"
                );
            } else {
                prop_assert!(
                    [400, 404, 405, 408, 413, 414, 417, 431, 501, 505].contains(&status),
                    "{status}: {text:?}"
                );
            }
            Ok(())
        });
        let _ = stop.send(true);
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
