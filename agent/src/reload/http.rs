//! A minimal HTTP/1.1 client for local admin endpoints (caddy's admin API):
//! one request per connection, over TCP or a Unix socket.
//!
//! Guarantees: the request is sent with `Connection: close` and the whole
//! response is read into memory up to [`MAX_RESPONSE`] bytes (a longer one
//! is an error, never a partial success); `Content-Length` and chunked
//! bodies are decoded; a server that answers and closes before reading the
//! whole request still has its answer read. The caller bounds the whole
//! exchange in time. Request bytes (which may carry a private key) are only
//! ever in zeroizing buffers and on the socket.
//!
//! Why not hyper's client (compiled in through tonic): a request body goes
//! through its `Bytes` buffers, which are freed without being wiped, and
//! the key sent to caddy must never sit in memory the agent cannot zero.
//! One request on a local socket is a few dozen lines, kept here.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use zeroize::Zeroizing;

pub use crate::config::hook::Endpoint;

/// Responses larger than this are refused: an admin endpoint answers with a
/// short status or a small JSON error.
pub const MAX_RESPONSE: usize = 256 * 1024;

/// A response: status code and body (lossily decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Why an exchange failed before a complete response was read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint}: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{endpoint} sent a response over {MAX_RESPONSE} bytes")]
    TooLarge { endpoint: String },
    #[error("{endpoint} sent something that is not an HTTP/1.x response: {why}")]
    Malformed { endpoint: String, why: String },
}

/// Sends one request (`body` as JSON when non-empty, `headers` added as
/// given) and reads the response.
pub async fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HttpError> {
    let name = endpoint.to_string();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: certctl-agent\r\nAccept: application/json\r\nConnection: close\r\n",
        endpoint.host_header()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // One buffer, one write: the request is in the socket before the server
    // can answer early (an unknown path is refused before the body is read).
    let mut request = Zeroizing::new(Vec::with_capacity(head.len() + body.len()));
    request.extend_from_slice(head.as_bytes());
    request.extend_from_slice(body);
    let raw = match endpoint {
        Endpoint::Tcp { host, port } => {
            let stream = TcpStream::connect((host.trim_matches(['[', ']']), *port))
                .await
                .map_err(|source| HttpError::Connect {
                    endpoint: name.clone(),
                    source,
                })?;
            exchange(stream, &request, &name).await?
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|source| HttpError::Connect {
                    endpoint: name.clone(),
                    source,
                })?;
            exchange(stream, &request, &name).await?
        }
    };
    parse(&raw).map_err(|why| HttpError::Malformed {
        endpoint: name,
        why,
    })
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
    name: &str,
) -> Result<Vec<u8>, HttpError> {
    let written = match stream.write_all(request).await {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => read_bounded(&mut stream, name).await,
        // A server that answered before reading everything (and closed)
        // still left its answer to read.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            match read_bounded(&mut stream, name).await {
                Ok(answer) if !answer.is_empty() => Ok(answer),
                _ => Err(HttpError::Io {
                    endpoint: name.to_owned(),
                    source: e,
                }),
            }
        }
        Err(source) => Err(HttpError::Io {
            endpoint: name.to_owned(),
            source,
        }),
    }
}

/// Everything until EOF, at most [`MAX_RESPONSE`] bytes. A reset after
/// some bytes ends the answer (a server that closed with part of our
/// request unread resets the connection after its answer).
async fn read_bounded<S: AsyncRead + Unpin>(
    stream: &mut S,
    name: &str,
) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > MAX_RESPONSE {
                    return Err(HttpError::TooLarge {
                        endpoint: name.to_owned(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => {
                return Ok(out);
            }
            Err(source) => {
                return Err(HttpError::Io {
                    endpoint: name.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Parses a complete response read until the server closed the connection.
fn parse(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_owned())?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body shorter than its Content-Length {n}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Decodes a chunked body (trailers are ignored).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| "truncated chunk size".to_owned())?;
        let line = String::from_utf8_lossy(&rest[..end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| "truncated chunk".to_owned())?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"err\r\n6;x=y\r\nor\":1}\r\n0\r\nETag: \"a\"\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{\"error\":1}"));
        let r = parse(b"HTTP/1.0 500 Internal Server Error\r\n\r\nboom").unwrap();
        assert_eq!((r.status, r.body.as_str()), (500, "boom"));
    }

    #[test]
    fn refuses_what_is_not_http() {
        for (raw, why) in [
            (&b"SSH-2.0-OpenSSH\r\n"[..], "no end of headers"),
            (b"FOO 200 OK\r\n\r\n", "status line"),
            (b"HTTP/1.1 abc OK\r\n\r\n", "status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                "shorter",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let err = parse(raw).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[tokio::test]
    async fn talks_over_a_unix_socket_and_bounds_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            // First connection: a normal answer, after checking the request.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(6).any(|w| w == b"\r\n\r\n{}") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8(got).unwrap();
            assert!(
                text.starts_with("PATCH /id/x HTTP/1.1\r\nHost: \r\n"),
                "{text}"
            );
            assert!(
                text.contains("Cache-Control: must-revalidate\r\n"),
                "{text}"
            );
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            drop(s);
            // Second: an endless answer.
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.read(&mut buf).await;
            let junk = vec![b'x'; 64 * 1024];
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            for _ in 0..8 {
                if s.write_all(&junk).await.is_err() {
                    break;
                }
            }
        });
        let ep = Endpoint::Unix(path.clone());
        let r = request(
            &ep,
            "PATCH",
            "/id/x",
            &[("Cache-Control", "must-revalidate")],
            b"{}",
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let err = request(&ep, "GET", "/config/", &[], b"").await.unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err}");
        server.await.unwrap();

        // A server that refuses before reading a large body, then closes.
        let path2 = dir.path().join("early.sock");
        let listener = tokio::net::UnixListener::bind(&path2).unwrap();
        let early = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}")
                .await
                .unwrap();
            drop(s);
        });
        let big = vec![b' '; 4 * 1024 * 1024];
        let r = request(&Endpoint::Unix(path2), "PATCH", "/id/x", &[], &big)
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{\"error\":\"x\"}"));
        early.await.unwrap();

        let gone = request(
            &Endpoint::Unix(dir.path().join("nope.sock")),
            "GET",
            "/",
            &[],
            b"",
        )
        .await
        .unwrap_err();
        assert!(
            gone.to_string().starts_with("cannot connect to unix/"),
            "{gone}"
        );
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzzing the response parser: any bytes give a response or a reason,
    //! never a panic; a response encoded any valid way parses back to its
    //! status and body.

    use proptest::prelude::*;

    use super::*;

    /// A body and one valid way to frame it.
    #[derive(Debug, Clone)]
    enum Framing {
        Length,
        Chunked(Vec<usize>),
        Close,
    }

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![
            Just(Framing::Length),
            proptest::collection::vec(1usize..64, 0..8).prop_map(Framing::Chunked),
            Just(Framing::Close),
        ]
    }

    fn encode(status: u16, body: &str, framing: &Framing, noise: &[(String, String)]) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {status} Whatever\r\n");
        for (k, v) in noise {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut out = Vec::new();
        match framing {
            Framing::Length => {
                head.push_str(&format!("content-LENGTH: {}\r\n\r\n", body.len()));
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(body.as_bytes());
                out.extend_from_slice(b"trailing bytes past the length");
            }
            Framing::Chunked(sizes) => {
                head.push_str("Transfer-Encoding: Chunked\r\n\r\n");
                out.extend_from_slice(head.as_bytes());
                let mut rest = body.as_bytes();
                let mut sizes = sizes.iter().cycle();
                while !rest.is_empty() {
                    let n = (*sizes.next().unwrap_or(&7)).min(rest.len());
                    out.extend_from_slice(format!("{n:X};ext=1\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                out.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
            }
            Framing::Close => {
                head.push_str("\r\n");
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(body.as_bytes());
            }
        }
        out
    }

    /// Header lines that mean nothing to the parser.
    fn noise() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(("X-[A-Za-z-]{1,10}", "[ -~]{0,20}"), 0..4)
    }

    /// Bytes shaped like a response, broken in many ways.
    fn hostile() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"HTTP/1.1 ".to_vec()),
            Just(b"HTTP/1.0 200 OK".to_vec()),
            Just(b"200".to_vec()),
            Just(b"99999".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\r\n\r\n".to_vec()),
            Just(b"Content-Length: ".to_vec()),
            Just(b"Content-Length: 18446744073709551615".to_vec()),
            Just(b"Content-Length: -1".to_vec()),
            Just(b"Transfer-Encoding: chunked".to_vec()),
            Just(b"ffffffffffffffff".to_vec()),
            Just(b"+5".to_vec()),
            Just(b"0".to_vec()),
            Just(b";".to_vec()),
            Just(b":".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..1024),
            proptest::collection::vec(piece, 0..48).prop_map(|p| p.concat()),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config(256))]

        #[test]
        fn any_bytes_parse_or_say_why(raw in hostile()) {
            match parse(&raw) {
                Ok(r) => prop_assert!(r.body.len() <= 3 * raw.len()),
                Err(why) => prop_assert!(!why.is_empty() && !why.contains('\n'), "{why:?}"),
            }
        }

        #[test]
        fn every_framing_parses_back(
            status in 100u16..600,
            body in "[ -~\\n\\t\u{a0}-\u{2ff}]{0,300}",
            framing in framing(),
            noise in noise(),
        ) {
            let raw = encode(status, &body, &framing, &noise);
            let r = parse(&raw).map_err(TestCaseError::fail)?;
            prop_assert_eq!(r.status, status);
            prop_assert_eq!(r.body, body);
        }
    }
}
