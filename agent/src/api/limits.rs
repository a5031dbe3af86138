//! The bounds of the gRPC server on the control socket, in one place
//! (`docs/security.md` lists them with the connection budgets of
//! `api::accept`, the refusal server's of `api::deny` and `api::gate`'s).

use std::time::Duration;

use super::server::MAX_PEM_BYTES;

/// Streams (calls) open at once on one connection.
pub const MAX_STREAMS: u32 = 16;
/// Bytes a peer may send on one stream before the agent reads them.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// Bytes a peer may send on one connection before the agent reads them.
pub const CONNECTION_WINDOW: u32 = 128 * 1024;
/// Largest request header list.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Largest request message: a deploy's three PEM fields at their limit
/// plus room for the rest of the request.
pub const MAX_MESSAGE: usize = 3 * MAX_PEM_BYTES + 512 * 1024;
/// HTTP/2 pings on a connection, so a dead peer goes away.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// After `SIGTERM` and the drain of running deploys: how long connections
/// may stay open before they are cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
