//! The `metrics_listen` endpoint: a minimal HTTP/1.1 server for Prometheus.
//!
//! It answers `GET /metrics` (and `HEAD`) with the exposition and nothing
//! else: any other path is `404`, any other method `405`, a request that is
//! not HTTP/1.x `400`. One request per connection (`Connection: close`).
//!
//! Guarantees, because the endpoint has no authentication and may face a
//! network: a request head is read up to [`MAX_HEAD`] bytes (`431` beyond)
//! within [`READ_TIMEOUT`]; a request body is never read; at most
//! [`MAX_CONNECTIONS`] connections are served at once and further ones are
//! closed at once; nothing a client sends reaches a log line unescaped.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::app::App;

/// Largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// What to answer to one request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The exposition; `head_only` for `HEAD`.
    Metrics { head_only: bool },
    /// An error status and its reason phrase.
    Error(u16, &'static str),
}

/// Routes a request head (the request line decides; headers are ignored).
pub fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::Error(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Error(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Error(400, "Bad Request");
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return Route::Error(404, "Not Found");
    }
    match method {
        "GET" => Route::Metrics { head_only: false },
        "HEAD" => Route::Metrics { head_only: true },
        _ => Route::Error(405, "Method Not Allowed"),
    }
}

/// Serves `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = handle(stream, &shared).await {
                tracing::debug!("metrics endpoint: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, shared: &App) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                b"",
                false,
            )
            .await;
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut stream, 408, "Request Timeout", b"", false).await,
    };
    match route(&head) {
        Route::Metrics { head_only } => {
            let text = shared.exposition().await;
            respond(&mut stream, 200, "OK", text.as_bytes(), head_only).await
        }
        Route::Error(code, reason) => {
            let body = format!("{code} {reason}: this endpoint serves GET /metrics only\n");
            respond(&mut stream, code, reason, body.as_bytes(), false).await
        }
    }
}

/// Reads until the blank line ending the head; `None` when it is longer
/// than [`MAX_HEAD`]. A client that closes early yields what it sent.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(Some(head));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let content_type = if code == 200 {
        super::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ok = |s: &str| route(s.as_bytes());
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            ok("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            ok("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(ok("GET / HTTP/1.1\r\n\r\n"), Route::Error(404, "Not Found"));
        assert_eq!(
            ok("GET /metrics/x HTTP/1.1\r\n\r\n"),
            Route::Error(404, "Not Found")
        );
        assert_eq!(
            ok("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::Error(405, "Method Not Allowed")
        );
        assert_eq!(ok("GET /metrics\r\n\r\n"), Route::Error(400, "Bad Request"));
        assert_eq!(
            ok("GET /metrics SPDY/3\r\n\r\n"),
            Route::Error(400, "Bad Request")
        );
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::Error(400, "Bad Request"));
        assert_eq!(ok(""), Route::Error(400, "Bad Request"));
    }
}
