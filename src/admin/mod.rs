//! The admin API: HTTP/JSON on a local Unix socket (mode 0600).
//!
//! Endpoints:
//! - `GET /v1/status`: the [`StatusDocument`](crate::admin::status::StatusDocument).
//! - `GET /v1/streams` (query `node`, `sort=age|buffered`, `limit`): the
//!   open streams, bounded and sorted
//!   ([`StreamsDocument`](crate::admin::streams::StreamsDocument)).
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once `admin.ready_min_healthy` nodes are healthy,
//!   else 503; the body says how many are.
//! - `GET /metrics`: the Prometheus metrics (OpenMetrics text).
//! - `POST /v1/nodes` (JSON body: the `[[node]]` keys, `{"name",
//!   "address", "port"?, "internal_ips"?, "pod_cidrs"?, "hostnames"?,
//!   "dns_names"?, "host_addresses"?, "kubelet_port"?}`; unknown fields
//!   are refused): add a node.
//! - `DELETE /v1/nodes/{name}`: remove a node (drained, then closed).
//! - `POST /v1/nodes/{name}/drain`, `/undrain`: pool membership.
//! - `POST /v1/nodes/{name}/reconnect`: make-before-break reconnect.
//! - `POST /v1/reload`: re-read the config file and apply the difference.
//!
//! Errors are `{"error": "..."}` with a 4xx code; a refused change changes
//! nothing. The paths and bodies are typed in [`admin_api`](crate::admin::api),
//! which the client shares.
//!
//! Neither the admin socket nor the metrics listener can be held by idle
//! or refused clients: each has its own connection budget, an idle
//! connection is closed after a few seconds and gives way to a new one when
//! the budget is full (see [`slots`]), a request body must arrive within
//! the same time, and a refused peer's connection is closed with its 403.
//!
//! The server holds narrow handles, not the daemon: the node-set changer
//! ([`Control`]), the status builder, readiness, the metrics, the config
//! store (for the uid check) and a shutdown token. `curl --unix-socket /run/tunneler/admin.sock
//! http://localhost/v1/status` works, and `tunneler status` is a client of
//! the same endpoint.

pub mod api;
pub mod client;
pub(crate) mod slots;
pub mod status;
pub mod streams;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::api::{
    Added, DrainChanged, ErrorBody, Reconnected, Removed, Request as ApiRequest, RequestError,
};
use crate::admin::slots::{Slot, Slots};
use crate::admin::status::StatusView;
use crate::control::config_store::ConfigStore;
use crate::control::readiness::Readiness;
use crate::control::{ChangeError, Control};
use crate::metrics::Metrics;

/// Connections held at once, on the admin socket and (separately) on the
/// metrics listener. When all are taken, the one idle longest is closed
/// for a new one.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request body must arrive within this time of its head.
pub const BODY_TIMEOUT: Duration = slots::IDLE_TIMEOUT;
/// Largest request body accepted (a node definition is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the admin API works with: each a narrow handle on one concern.
#[derive(Clone)]
pub struct AdminHandles {
    /// Node-set changes and reload.
    pub control: Arc<Control>,
    /// The status document.
    pub status: Arc<StatusView>,
    /// `/readyz`.
    pub readiness: Arc<Readiness>,
    /// `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The running config, for the admin uid check.
    pub config: Arc<ConfigStore>,
    /// The open streams, for `GET /v1/streams`.
    pub streams: Arc<crate::proxy::live::LiveStreams>,
}

/// The admin API server.
pub struct AdminApi {
    handles: AdminHandles,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

type Resp = Response<Full<Bytes>>;

fn json(code: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(code: StatusCode, msg: &str) -> Resp {
    reply(
        code,
        &ErrorBody {
            error: msg.to_string(),
        },
    )
}

/// A typed body as a JSON answer.
fn reply<T: serde::Serialize>(code: StatusCode, body: &T) -> Resp {
    match serde_json::to_string_pretty(body) {
        Ok(s) => json(code, s + "\n"),
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\": {:?}}}\n", e.to_string()),
        ),
    }
}

fn text(code: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `GET /metrics` in the format the scraper asks for: OpenMetrics when its
/// Accept header names it (Prometheus does), else the classic text format
/// 0.0.4 that curl pipelines, `promtool check metrics` and older scrapers
/// read. Both carry the same samples.
fn metrics_response(m: &Metrics, headers: &hyper::HeaderMap) -> Resp {
    let openmetrics = headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, kind) = if openmetrics {
        (
            m.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            m.encode_classic(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

/// Serves `GET /metrics` (and nothing else) on a TCP listener, for
/// Prometheus to scrape without access to the admin socket.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    info!(listen = ?listener.local_addr().ok(), "metrics listening");
    let slots = Slots::new(MAX_ADMIN_CONNECTIONS);
    loop {
        let accept = || {
            let l = &listener;
            async move { l.accept().await.map(|(s, _)| s) }
        };
        let Some((slot, stream)) = next_conn(&slots, &cancel, "metrics", accept).await else {
            return;
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let slot = Arc::new(slot);
            let svc_slot = slot.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                svc_slot.busy();
                let r = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    metrics_response(&metrics, req.headers())
                } else {
                    closing(error(
                        StatusCode::NOT_FOUND,
                        "only GET /metrics is served here",
                    ))
                };
                svc_slot.idle();
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            serve_conn(stream, svc, cancel, &slot).await;
        });
    }
}

/// Waits for a connection, then gives it a slot (see [`Slots::admit`]).
/// Accept errors (EMFILE...) are logged and retried after a pause, never
/// ending the listener. `None` once `cancel` fires.
async fn next_conn<S, Fut>(
    slots: &Slots,
    cancel: &CancellationToken,
    what: &str,
    accept: impl Fn() -> Fut,
) -> Option<(Slot, S)>
where
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "{what} accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        return tokio::select! {
            _ = cancel.cancelled() => None,
            slot = slots.admit() => slot.map(|s| (s, stream)),
        };
    }
}

/// Serves one HTTP/1 connection until it ends, its slot says to close
/// (idle too long, or evicted for a newer connection), or shutdown (then
/// gracefully, for at most a second). A request head must arrive within
/// the idle timeout too.
async fn serve_conn<IO, Svc>(stream: IO, svc: Svc, cancel: CancellationToken, slot: &Slot)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::Service<
        Request<Incoming>,
        Response = Resp,
        Error = std::convert::Infallible,
    >,
    Svc::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(slots::IDLE_TIMEOUT)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = slot.must_close() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// `r` with `Connection: close`: the connection ends once it is written.
fn closing(mut r: Resp) -> Resp {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

fn change_error(e: &ChangeError) -> Resp {
    let code = match e {
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Exists(_) | ChangeError::Conflict { .. } | ChangeError::Discovered { .. } => {
            StatusCode::CONFLICT
        }
        ChangeError::Invalid(_) | ChangeError::Keys(_) => StatusCode::BAD_REQUEST,
        ChangeError::NoConfigFile => StatusCode::CONFLICT,
        ChangeError::Tunnel(_) => StatusCode::BAD_GATEWAY,
    };
    error(code, &e.to_string())
}

fn request_error(e: &RequestError) -> Resp {
    let code = match e {
        RequestError::NotFound(_) => StatusCode::NOT_FOUND,
        RequestError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        RequestError::BadBody(_) | RequestError::BadQuery(_) | RequestError::BadName(_) => {
            StatusCode::BAD_REQUEST
        }
    };
    error(code, &e.to_string())
}

/// Answers one admin request.
pub async fn route(h: &AdminHandles, method: &Method, path: &str, body: Bytes) -> Resp {
    let request = match ApiRequest::parse(method.as_str(), path, &body) {
        Ok(r) => r,
        Err(e) => return request_error(&e),
    };
    let ok = StatusCode::OK;
    match request {
        ApiRequest::Status => reply(ok, &h.status.document()),
        ApiRequest::Streams(q) => reply(ok, &streams::document(&h.streams, &q)),
        ApiRequest::Health => text(ok, "ok\n".into()),
        ApiRequest::Ready => match h.readiness.check() {
            Ok(msg) => text(ok, format!("ready: {msg}\n")),
            Err(msg) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {msg}\n"),
            ),
        },
        // GET /metrics with its Accept header is answered in `handle`.
        ApiRequest::Metrics => metrics_response(&h.metrics, &hyper::HeaderMap::new()),
        ApiRequest::AddNode(spec) => {
            let node = match crate::config::node_from_spec(
                spec,
                h.control.default_ssh_port(),
                crate::config::address::AddressOrigin::Operator,
            ) {
                Ok(n) => n,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let added = node.name.clone();
            match h.control.add_node(node).await {
                Ok(()) => reply(ok, &Added { added }),
                Err(e) => change_error(&e),
            }
        }
        ApiRequest::RemoveNode(name) => match h.control.remove_node(&name).await {
            Ok(()) => reply(ok, &Removed { removed: name }),
            Err(e) => change_error(&e),
        },
        ApiRequest::Drain(name) => drain(h, name, true),
        ApiRequest::Undrain(name) => drain(h, name, false),
        ApiRequest::Reconnect(name) => match h.control.reconnect(&name).await {
            Ok(()) => reply(
                ok,
                &Reconnected {
                    node: name,
                    reconnected: true,
                },
            ),
            Err(e) => change_error(&e),
        },
        ApiRequest::Reload => match h.control.reload().await {
            Ok(report) => reply(ok, &report),
            Err(e) => change_error(&e),
        },
    }
}

fn drain(h: &AdminHandles, node: String, on: bool) -> Resp {
    match h.control.set_draining(&node, on) {
        Ok(state) => reply(
            StatusCode::OK,
            &DrainChanged {
                node,
                state: state.as_str().to_string(),
            },
        ),
        Err(e) => change_error(&e),
    }
}

/// Whether `uid` may use the admin API: root, our own uid, or listed in
/// `admin.admin_uids` (re-read on reload; read without waiting for one).
pub fn uid_allowed(uid: u32, config: &ConfigStore) -> bool {
    uid == 0
        || uid == nix::unistd::geteuid().as_raw()
        || config.load().admin.admin_uids.contains(&uid)
}

/// The connecting process, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Effective uid of the peer.
    pub uid: u32,
    /// Its pid, when the kernel reports one.
    pub pid: Option<i32>,
}

async fn handle(h: AdminHandles, peer: Option<Peer>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    // Only root, the daemon's own uid and the configured admin_uids may use
    // the API; the socket mode is the first fence, this is the second.
    let Some(peer) = peer else {
        warn!(%method, %path, "admin request without peer credentials refused");
        return closing(error(StatusCode::FORBIDDEN, "peer credentials unavailable"));
    };
    if !uid_allowed(peer.uid, &h.config) {
        warn!(audit = true, uid = peer.uid, pid = ?peer.pid, %method, %path, "admin request refused: uid not allowed");
        // Closed with the answer: a refused peer holds no slot.
        return closing(error(
            StatusCode::FORBIDDEN,
            &format!("uid {} may not use the admin API (allowed: root, the daemon's uid, admin.admin_uids)", peer.uid),
        ));
    }
    if method == Method::GET && path == "/metrics" {
        return metrics_response(&h.metrics, req.headers());
    }
    let collect = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_BODY_BYTES} bytes"),
            ))
        }
        Err(_) => {
            return closing(error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("request body not received within {BODY_TIMEOUT:?}"),
            ))
        }
    };
    let resp = route(&h, &method, &path_and_query, body).await;
    if method != Method::GET {
        info!(
            audit = true, uid = peer.uid, pid = ?peer.pid, %method, %path,
            status = resp.status().as_u16(), "admin change"
        );
    }
    resp
}

impl AdminApi {
    /// An admin API over `handles`; connections run on `tracker` and end
    /// (gracefully) when `cancel` fires.
    pub fn new(handles: AdminHandles, tracker: TaskTracker, cancel: CancellationToken) -> AdminApi {
        AdminApi {
            handles,
            tracker,
            cancel,
        }
    }

    /// Serves until cancelled. The caller removes the socket file if it
    /// bound it (a socket passed in by the service manager stays).
    pub async fn serve(self, listener: UnixListener, path: PathBuf) {
        info!(socket = %path.display(), "admin API listening");
        let slots = Slots::new(MAX_ADMIN_CONNECTIONS);
        loop {
            let accept = || {
                let l = &listener;
                async move { l.accept().await.map(|(s, _)| s) }
            };
            let Some((slot, stream)) = next_conn(&slots, &self.cancel, "admin", accept).await
            else {
                break;
            };
            let handles = self.handles.clone();
            let cancel = self.cancel.clone();
            let peer = stream.peer_cred().ok().map(|c| Peer {
                uid: c.uid(),
                pid: c.pid(),
            });
            self.tracker.spawn(async move {
                let slot = Arc::new(slot);
                let svc_slot = slot.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handles = handles.clone();
                    let slot = svc_slot.clone();
                    slot.busy();
                    async move {
                        let r = handle(handles, peer, req).await;
                        slot.idle();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                serve_conn(stream, svc, cancel, &slot).await;
            });
        }
    }
}
