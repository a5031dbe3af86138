//! The check in front of the gRPC service, before a request body is read:
//! a call that needs deploy access (`Deploy`, `Rollback`, known from the
//! path) from a caller without it is refused with the handler's refusal,
//! so a read-only caller cannot make the agent buffer a deploy-sized
//! message; and at most [`DECODING_DEPLOYS`] deploy requests per budget
//! (unprivileged callers, root and the agent's user) are being received at
//! once, each within [`DECODE_TIMEOUT`], so the memory messages in transit
//! take is bounded and root's budget is its own. It also counts each
//! call as open on its connection until the response ends
//! (`api::activity`), for the idle timeout of `api::accept`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};

use super::activity::StreamGuard;
use super::auth::{Access, ConnInfo, Policy, access_of};
use super::deny;
use crate::app::App;

/// Deploy requests being received at once, per budget.
pub const DECODING_DEPLOYS: usize = 4;
/// How long an unprivileged caller may take to send a deploy request.
pub const DECODE_TIMEOUT: Duration = Duration::from_secs(30);

/// The layer (`Server::builder().layer(..)`).
#[derive(Clone)]
pub struct Gate {
    app: Arc<App>,
    unprivileged: Arc<Semaphore>,
    privileged: Arc<Semaphore>,
}

impl Gate {
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            unprivileged: Arc::new(Semaphore::new(DECODING_DEPLOYS)),
            privileged: Arc::new(Semaphore::new(DECODING_DEPLOYS)),
        }
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

/// The gated service.
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Gate,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for Gated<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // The call counts as open until its response body ends.
        let guard = req
            .extensions()
            .get::<ConnInfo>()
            .map(|i| i.activity.begin());
        let future = self.admit(inner, req);
        Box::pin(async move {
            let response = future.await?;
            Ok(match guard {
                None => response,
                Some(guard) => response.map(|body| {
                    Body::new(Tracked {
                        body,
                        _guard: guard,
                    })
                }),
            })
        })
    }
}

impl<S> Gated<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    fn admit(
        &self,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, Infallible>> {
        if access_of(req.uri().path()) != Access::Deploy {
            return Box::pin(inner.call(req));
        }
        let policy = Policy::of(&self.gate.app.config(), self.gate.app.socket.clone());
        let Some(caller) = req.extensions().get::<ConnInfo>().map(|i| i.caller.clone()) else {
            // No caller: the handler refuses it without reading anything.
            return Box::pin(inner.call(req));
        };
        if policy.authorize(&caller, Access::Deploy).is_err() {
            let message = deny::refusal(&policy, &caller, Access::Deploy);
            tracing::warn!(caller = %caller.describe(), "{message}");
            return Box::pin(async move { Ok(deny::permission_denied(&message)) });
        }
        let privileged = policy.privileged(caller.uid);
        let budget = if privileged {
            self.gate.privileged.clone()
        } else {
            self.gate.unprivileged.clone()
        };
        Box::pin(async move {
            let Ok(_permit) = budget.acquire_owned().await else {
                return Ok(unavailable());
            };
            if privileged {
                return inner.call(req).await;
            }
            match tokio::time::timeout(DECODE_TIMEOUT, inner.call(req)).await {
                Ok(r) => r,
                Err(_) => Ok(unavailable()),
            }
        })
    }
}

/// A response body that holds its call open until it ends.
struct Tracked {
    body: Body,
    _guard: StreamGuard,
}

impl http_body::Body for Tracked {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `UNAVAILABLE` for a deploy request that did not arrive in time.
fn unavailable() -> Response<Body> {
    let mut r = deny::permission_denied::<Body>("");
    let headers = r.headers_mut();
    headers.insert(
        "grpc-status",
        tonic::codegen::http::HeaderValue::from_static("14"),
    );
    headers.insert(
        "grpc-message",
        tonic::codegen::http::HeaderValue::from_static(
            "the deploy request did not arrive in time: retry",
        ),
    );
    r
}
