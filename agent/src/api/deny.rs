//! The answer to a connection whose caller may make no call at all: one
//! gRPC `PERMISSION_DENIED` with the refusal `api::auth` words, then the
//! connection is closed. Cheap by construction: a bare hyper HTTP/2
//! connection with tiny flow-control windows (so the peer can push at most
//! [`CONN_WINDOW`] bytes the agent never reads), one stream at a time, a
//! small header list, no request body read, closed after the first
//! response or after [`DENY_TIMEOUT`], whichever comes first.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::auth::{Access, AuthError, Caller, Policy, access_of};

/// How long a refused connection may stay open.
pub const DENY_TIMEOUT: Duration = Duration::from_secs(5);
/// Flow-control window of the one stream a refused peer may open.
pub const STREAM_WINDOW: u32 = 4 * 1024;
/// Flow-control window of a refused connection.
pub const CONN_WINDOW: u32 = 16 * 1024;
/// Largest header list a refused peer may send.
pub const MAX_HEADER_LIST: u32 = 8 * 1024;

/// Serves one refused connection to its end.
pub async fn serve<IO>(io: IO, policy: Policy, caller: Arc<Caller>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (answered_tx, answered_rx) = oneshot::channel::<()>();
    let answered = Arc::new(Mutex::new(Some(answered_tx)));
    let service = service_fn(move |request: Request<Incoming>| {
        let access = access_of(request.uri().path());
        drop(request);
        let message = refusal(&policy, &caller, access);
        if let Some(tx) = crate::sync::lock(&answered).take() {
            let _ = tx.send(());
        }
        async move { Ok::<_, Infallible>(permission_denied::<String>(&message)) }
    });
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .adaptive_window(false)
        .max_concurrent_streams(1)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let run = async {
        let mut answered_rx = answered_rx;
        tokio::select! {
            r = connection.as_mut() => return r,
            _ = &mut answered_rx => connection.as_mut().graceful_shutdown(),
        }
        connection.as_mut().await
    };
    match tokio::time::timeout(DENY_TIMEOUT, run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("refused connection: {e}"),
        Err(_) => tracing::debug!("refused connection closed after {DENY_TIMEOUT:?}"),
    }
}

/// The refusal text for `access`, as a handler would return it.
pub fn refusal(policy: &Policy, caller: &Caller, access: Access) -> String {
    match policy.authorize(caller, access) {
        Err(e @ AuthError::Denied { .. }) => e.to_string(),
        // Not reached for a refused caller; still a refusal.
        _ => format!("permission denied through {}", policy.socket.display()),
    }
}

/// A trailers-only gRPC response: `grpc-status: 7` and `message`.
pub fn permission_denied<B: Default>(message: &str) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static("7"));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    response
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as
/// is, every other byte of the UTF-8 as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%c\n`é`"), "a b%25c%0A`%C3%A9`");
    }

    #[test]
    fn response_is_trailers_only_permission_denied() {
        let r: Response<String> = permission_denied("no: join group x");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-message"], "no: join group x");
        assert!(r.body().is_empty());
    }
}
