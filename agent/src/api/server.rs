//! The gRPC service: authorizes each call, turns requests into engine calls
//! and engine events into the response stream.
//!
//! A deploy runs in its own task: a client that hangs up mid-deploy does not
//! abort it (the target must never be left between stages), and shutdown
//! waits for it (see `daemon`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use certctl_proto::agent::v1 as pb;
use certctl_proto::agent::v1::agent_server::Agent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::auth::{self, Access, Policy};
use super::{convert, status};
use crate::app::App;
use crate::config::Config;
use crate::deploy::Request as DeployRequest;
use crate::deploy::rollback::RollbackRequest;
use crate::verify::served::{self as verify, Expect};

/// Largest PEM input accepted in one field of a deploy request.
pub const MAX_PEM_BYTES: usize = 1024 * 1024;

/// Who may call, from the configuration in force.
trait Authorize {
    fn policy(&self, config: &Config) -> Policy;
    fn authorize<T>(
        &self,
        req: &Request<T>,
        access: Access,
    ) -> Result<(Arc<Config>, Arc<auth::Caller>), Status>;
}

impl Authorize for App {
    fn policy(&self, config: &Config) -> Policy {
        Policy::of(config, self.socket.clone())
    }

    fn authorize<T>(
        &self,
        req: &Request<T>,
        access: Access,
    ) -> Result<(Arc<Config>, Arc<auth::Caller>), Status> {
        let config = self.config();
        let caller = auth::caller(req, &self.socket)?;
        if let Err(e) = self.policy(&config).authorize(&caller, access) {
            tracing::warn!(caller = %caller.describe(), "{e}");
            return Err(e.into());
        }
        Ok((config, caller))
    }
}

/// The `certctl.agent.v1.Agent` service.
#[derive(Clone)]
pub struct Service {
    shared: Arc<App>,
    /// The parts of Status answers, kept between calls.
    status: Arc<status::Parts>,
}

impl Service {
    pub fn new(shared: Arc<App>) -> Self {
        Self {
            shared,
            status: Arc::default(),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::DeployEvent, Status>> + Send>>;

fn unknown_target(config: &Config, name: &str) -> Status {
    let names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
    Status::not_found(if names.is_empty() {
        format!(
            "unknown target \"{name}\": the agent has no targets configured ({})",
            config.path.display()
        )
    } else {
        format!(
            "unknown target \"{name}\" (configured: {})",
            names.join(", ")
        )
    })
}

/// One named PEM input of a deploy request.
type NamedPem = (String, Zeroizing<Vec<u8>>);

fn take_pem(field: &str, flag: &str, bytes: Vec<u8>) -> Result<Option<NamedPem>, Status> {
    let bytes = Zeroizing::new(bytes);
    if bytes.len() > MAX_PEM_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes, more than the {MAX_PEM_BYTES}-byte limit: a certificate set is a few KiB; check that {flag} names the right file",
            bytes.len()
        )));
    }
    Ok((!bytes.is_empty()).then(|| (flag.to_owned(), bytes)))
}

#[tonic::async_trait]
impl Agent for Service {
    type DeployStream = EventStream;
    type WatchStream = EventStream;
    type RollbackStream = EventStream;

    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (config, caller) = self.shared.authorize(&request, Access::Deploy)?;
        let req = request.into_inner();
        let target = config
            .target(&req.target)
            .ok_or_else(|| unknown_target(&config, &req.target))?
            .clone();
        let mut sources = Vec::with_capacity(3);
        let cert = take_pem("cert_pem", "--cert", req.cert_pem)?.ok_or_else(|| {
            Status::invalid_argument(
                "cert_pem is empty: pass the certificate (or a whole bundle) with --cert",
            )
        })?;
        sources.push(cert);
        sources.extend(take_pem("key_pem", "--key", req.key_pem)?);
        sources.extend(take_pem("chain_pem", "--chain", req.chain_pem)?);
        let guard = self.shared.deploy_guard().ok_or_else(|| {
            Status::unavailable("the agent is shutting down: retry when it is back")
        })?;
        let deploy = DeployRequest {
            target,
            input: crate::deploy::Input::Pem(sources),
            dry_run: req.dry_run,
            no_verify: req.no_verify,
            no_reload: req.no_reload,
            no_wait: req.no_wait,
            origin: format!("cli {}", caller.describe()),
            clock_skew_grace: config.agent.clock_skew_grace,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            shared.engine.deploy(deploy, tx).await;
        });
        let stream = UnboundedReceiverStream::new(rx).map(|e| Ok(convert::event(&e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (config, caller) = self.shared.authorize(&request, Access::Deploy)?;
        let req = request.into_inner();
        let target = config
            .target(&req.target)
            .ok_or_else(|| unknown_target(&config, &req.target))?
            .clone();
        let guard = self.shared.deploy_guard().ok_or_else(|| {
            Status::unavailable("the agent is shutting down: retry when it is back")
        })?;
        let rollback = RollbackRequest {
            target,
            no_verify: req.no_verify,
            no_wait: req.no_wait,
            origin: format!("cli {}", caller.describe()),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            shared.engine.rollback(rollback, tx).await;
        });
        let stream = UnboundedReceiverStream::new(rx).map(|e| Ok(convert::event(&e)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let (config, _) = self.shared.authorize(&request, Access::Read)?;
        let want = request.into_inner().target;
        let target = config
            .target(&want)
            .ok_or_else(|| unknown_target(&config, &want))?
            .clone();
        let Some(v) = target.verify.clone() else {
            return Err(Status::failed_precondition(format!(
                "target {} has no verify endpoint: add a [target.verify] table with \
                 endpoint = \"HOST:PORT\" to {} to probe it",
                target.name,
                config.path.display()
            )));
        };
        let t = target.clone();
        let disk = tokio::task::spawn_blocking(move || crate::disk::read(&t))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!("cannot tell what should be served: {e}"))
            })?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "target {} has no certificate on disk yet ({} is missing): deploy one first",
                    target.name,
                    target.cert_path.display()
                ))
            })?;
        let expect = Expect::of(&v, &disk.leaf, &disk.chain);
        let now = SystemTime::now();
        let checks = verify::Checks(
            verify::check_now(&v, &expect)
                .await
                .0
                .into_iter()
                .map(|c| verify::with_expiry(c, now))
                .collect(),
        );
        self.shared
            .engine
            .record_served(&target.name, checks.clone());
        Ok(Response::new(pb::VerifyResponse {
            target: target.name,
            check: checks.decisive().map(convert::served),
            checks: checks.0.iter().map(convert::served).collect(),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let (config, _) = self.shared.authorize(&request, Access::Read)?;
        let req = request.into_inner();
        if !req.target.is_empty() && config.target(&req.target).is_none() {
            // A target removed from the config still has history.
            let known = tokio::task::block_in_place(|| {
                self.shared.engine.journal().history(Some(&req.target), 1)
            })
            .map_err(|e| Status::internal(e.to_string()))?;
            if known.is_empty() {
                return Err(unknown_target(&config, &req.target));
            }
        }
        let limit = match req.limit {
            0 => 20,
            n => n.min(10_000),
        };
        let target = (!req.target.is_empty()).then_some(req.target.as_str());
        let records =
            tokio::task::block_in_place(|| self.shared.engine.journal().history(target, limit))
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::HistoryResponse {
            entries: records.iter().map(convert::history).collect(),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let (config, _) = self.shared.authorize(&request, Access::Read)?;
        let want = request.into_inner().target;
        let one = if want.is_empty() {
            None
        } else {
            Some(
                config
                    .target(&want)
                    .ok_or_else(|| unknown_target(&config, &want))?,
            )
        };
        // The drop counters first: a job records its final outcome before
        // it stops counting as in flight, so when these say nothing is in
        // progress, the per-target entries read below are at least as new.
        let drops_pending = self.shared.drops.pending();
        let drops_in_flight = self.shared.drops.in_flight();
        // What is on disk, as the engine holds it: a stat per target, a
        // read only of what changed since the last look (`deployed`); each
        // target's entry encoded again only when it changed, and one look
        // at every target shared by the calls that arrive while one runs
        // (`status`).
        let encoded_targets = match one {
            Some(t) => {
                let now = convert::unix_ms(SystemTime::now()) / 1000;
                tokio::task::block_in_place(|| self.status.answer(&self.shared, &config, &[t], now))
                    .into()
            }
            None => self.status.every(&self.shared, &config).await,
        };
        let dirs = self.shared.drops.dirs();
        Ok(Response::new(pb::StatusResponse {
            agent: Some(pb::AgentInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                started_unix: convert::unix_ms(self.shared.started) / 1000,
                config_path: config.path.display().to_string(),
                socket: self.shared.socket.display().to_string(),
                drop_dir: dirs.map(|d| d.0.display().to_string()).unwrap_or_default(),
                drops_pending: u32::try_from(drops_pending).unwrap_or(u32::MAX),
                drops_in_flight: u32::try_from(drops_in_flight).unwrap_or(u32::MAX),
                rejected_dir: dirs.map(|d| d.1.display().to_string()).unwrap_or_default(),
                drop_dir_watching: self.shared.drops.watching(),
                config_reload: self.shared.engine.metrics().last_config_reload().map(|r| {
                    pb::ConfigReload {
                        accepted: r.accepted,
                        unix_ms: convert::unix_ms(r.at),
                        error: r.error,
                    }
                }),
            }),
            targets: Vec::new(),
            encoded_targets,
        }))
    }

    async fn targets(
        &self,
        request: Request<pb::TargetsRequest>,
    ) -> Result<Response<pb::TargetsResponse>, Status> {
        let (config, _) = self.shared.authorize(&request, Access::Read)?;
        let targets = config
            .targets
            .iter()
            .map(|t| pb::TargetInfo {
                host: convert::remote_host(t),
                name: t.name.clone(),
                kind: t.kind.as_str().to_owned(),
                layout: t.layout.as_str().to_owned(),
                cert_path: t.cert_path.display().to_string(),
                key_path: t.key_path.display().to_string(),
                chain_path: t
                    .chain_path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                drop: t.drop.clone(),
                validate: t.validate.clone(),
                reload: t.reload.clone(),
                reload_hook: t
                    .reload_hook
                    .as_ref()
                    .map(crate::reload::ReloadHook::describe)
                    .unwrap_or_default(),
                verify_endpoint: t
                    .verify
                    .as_ref()
                    .map(|v| v.first().address.clone())
                    .unwrap_or_default(),
                verify_endpoints: t
                    .verify
                    .as_ref()
                    .map(|v| v.endpoints.iter().map(|e| e.address.clone()).collect())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::TargetsResponse { targets }))
    }

    async fn metrics(
        &self,
        request: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        self.shared.authorize(&request, Access::Read)?;
        let text = self.shared.exposition().await;
        Ok(Response::new(pb::MetricsResponse { text }))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let (_, caller) = self.shared.authorize(&request, Access::Read)?;
        tracing::debug!(caller = %caller.describe(), "watch stream opened");
        // A watcher too slow to keep up (the broadcast channel's bounded
        // backlog overflowed) is told so and its stream ends: nothing is
        // buffered for it beyond that backlog, and deploys never wait.
        let mut ended = false;
        let events = BroadcastStream::new(self.shared.engine.subscribe())
            .map(|e| match e {
                Ok(e) => Ok(convert::event(&e)),
                Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::resource_exhausted(
                    format!("watch fell {n} events behind and was ended: run certctl watch again"),
                )),
            })
            .map_while(move |e| {
                if ended {
                    return None;
                }
                ended = e.is_err();
                Some(e)
            });
        // The stream ends when the agent shuts down, so shutdown is not
        // held up by watchers.
        let down =
            WatchStream::new(self.shared.shutdown_signal()).filter_map(|down| down.then_some(None));
        let stream = events
            .map(Some)
            .merge(down)
            .take_while(Option::is_some)
            .filter_map(|e| e);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// How long shutdown waits for running deploys before giving up on them.
/// Each deploy is bounded by its command timeouts; this is a backstop.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_fields_are_bounded_and_empty_ones_dropped() {
        let err = take_pem("key_pem", "--key", vec![b'A'; MAX_PEM_BYTES + 1]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message()
                .contains("check that --key names the right file"),
            "{}",
            err.message()
        );
        assert!(
            take_pem("chain_pem", "--chain", Vec::new())
                .unwrap()
                .is_none()
        );
        let (name, bytes) = take_pem("cert_pem", "--cert", b"pem".to_vec())
            .unwrap()
            .unwrap();
        assert_eq!((name.as_str(), bytes.as_slice()), ("--cert", &b"pem"[..]));
    }
}
