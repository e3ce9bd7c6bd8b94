//! The admin API: HTTP/JSON on a local Unix socket (mode 0600).
//!
//! Endpoints:
//! - `GET /v1/status`: the [`StatusDocument`](crate::status::StatusDocument).
//! - `GET /healthz`: 200 while the process serves.
//! - `POST /v1/nodes` (JSON body `{"name", "address", "port"?,
//!   "internal_ips"?, "pod_cidrs"?}`): add a node.
//! - `DELETE /v1/nodes/{name}`: remove a node (drained, then closed).
//! - `POST /v1/nodes/{name}/drain`, `/undrain`: pool membership.
//! - `POST /v1/nodes/{name}/reconnect`: make-before-break reconnect.
//! - `POST /v1/reload`: re-read the config file and apply the difference.
//!
//! Errors are `{"error": "..."}` with a 4xx code; a refused change changes
//! nothing. `curl --unix-socket /run/tunneler/admin.sock
//! http://localhost/v1/status` works, and `tunneler status` is a client of
//! the same endpoint.

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

use crate::daemon::{ChangeError, Daemon};
use crate::metrics::Metrics;

/// Admin connections served at once; more wait in the accept queue.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Largest request body accepted (a node definition is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The admin API server.
pub struct AdminApi {
    daemon: Arc<Daemon>,
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
    json(code, serde_json::json!({ "error": msg }).to_string() + "\n")
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

fn metrics_response(m: &Metrics) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(m.encode())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
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
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accept = || {
            let l = &listener;
            async move { l.accept().await.map(|(s, _)| s) }
        };
        let Some((permit, stream)) = next_conn(&slots, &cancel, "metrics", accept).await else {
            return;
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    metrics_response(&metrics)
                } else {
                    error(StatusCode::NOT_FOUND, "only GET /metrics is served here")
                };
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            serve_conn(stream, svc, cancel).await;
        });
    }
}

/// Waits for a connection slot, then for a connection. Accept errors
/// (EMFILE...) are logged and retried after a pause, never ending the
/// listener. `None` once `cancel` fires.
async fn next_conn<S, Fut>(
    slots: &Arc<tokio::sync::Semaphore>,
    cancel: &CancellationToken,
    what: &str,
    accept: impl Fn() -> Fut,
) -> Option<(tokio::sync::OwnedSemaphorePermit, S)>
where
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return None,
            p = slots.clone().acquire_owned() => p.ok()?,
        };
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = accept() => match r {
                Ok(s) => return Some((permit, s)),
                Err(e) => {
                    warn!(error = %e, "{what} accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Serves one HTTP/1 connection until it ends or shutdown (then gracefully,
/// for at most a second). Slow clients get 10 s to send their headers.
async fn serve_conn<IO, Svc>(stream: IO, svc: Svc, cancel: CancellationToken)
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
        .header_read_timeout(Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

fn ok(value: serde_json::Value) -> Resp {
    json(StatusCode::OK, value.to_string() + "\n")
}

fn change_error(e: &ChangeError) -> Resp {
    let code = match e {
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Exists(_) | ChangeError::Conflict { .. } | ChangeError::Discovered { .. } => {
            StatusCode::CONFLICT
        }
        ChangeError::Invalid(_) | ChangeError::Start(_) => StatusCode::BAD_REQUEST,
        ChangeError::NoConfigFile => StatusCode::CONFLICT,
        ChangeError::Tunnel(_) => StatusCode::BAD_GATEWAY,
    };
    error(code, &e.to_string())
}

/// Routes one admin request.
pub async fn route(daemon: &Daemon, method: &Method, path: &str, body: Bytes) -> Resp {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => match serde_json::to_string_pretty(&daemon.status()) {
            Ok(s) => json(StatusCode::OK, s + "\n"),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET, ["readyz"]) => match daemon.ready().await {
            Ok(msg) => text(StatusCode::OK, format!("ready: {msg}\n")),
            Err(msg) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {msg}\n"),
            ),
        },
        (&Method::GET, ["metrics"]) => metrics_response(daemon.metrics()),
        (&Method::POST, ["v1", "nodes"]) => {
            let value: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")),
            };
            let node = match crate::config::node_from_json(value, daemon.default_ssh_port().await) {
                Ok(n) => n,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let name = node.name.clone();
            match daemon.add_node(node).await {
                Ok(()) => ok(serde_json::json!({ "added": name })),
                Err(e) => change_error(&e),
            }
        }
        (&Method::DELETE, ["v1", "nodes", name]) => match daemon.remove_node(name).await {
            Ok(()) => ok(serde_json::json!({ "removed": name })),
            Err(e) => change_error(&e),
        },
        (&Method::POST, ["v1", "nodes", name, action @ ("drain" | "undrain")]) => {
            match daemon.set_draining(name, *action == "drain") {
                Ok(state) => ok(serde_json::json!({ "node": name, "state": state.as_str() })),
                Err(e) => change_error(&e),
            }
        }
        (&Method::POST, ["v1", "nodes", name, "reconnect"]) => match daemon.reconnect(name).await {
            Ok(()) => ok(serde_json::json!({ "node": name, "reconnected": true })),
            Err(e) => change_error(&e),
        },
        (&Method::POST, ["v1", "reload"]) => match daemon.reload().await {
            Ok(report) => ok(serde_json::to_value(&report).unwrap_or_default()),
            Err(e) => change_error(&e),
        },
        (_, ["v1", "status"])
        | (_, ["healthz"])
        | (_, ["v1", "reload"])
        | (_, ["v1", "nodes", ..]) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

/// The connecting process, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Effective uid of the peer.
    pub uid: u32,
    /// Its pid, when the kernel reports one.
    pub pid: Option<i32>,
}

async fn handle(daemon: Arc<Daemon>, peer: Option<Peer>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Only root, the daemon's own uid and the configured admin_uids may use
    // the API; the socket mode is the first fence, this is the second.
    let Some(peer) = peer else {
        warn!(%method, %path, "admin request without peer credentials refused");
        return error(StatusCode::FORBIDDEN, "peer credentials unavailable");
    };
    if !daemon.admin_allowed(peer.uid).await {
        warn!(audit = true, uid = peer.uid, pid = ?peer.pid, %method, %path, "admin request refused: uid not allowed");
        return error(
            StatusCode::FORBIDDEN,
            &format!("uid {} may not use the admin API (allowed: root, the daemon's uid, admin.admin_uids)", peer.uid),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body over {MAX_BODY_BYTES} bytes"),
            )
        }
    };
    let resp = route(&daemon, &method, &path, body).await;
    if method != Method::GET {
        info!(
            audit = true, uid = peer.uid, pid = ?peer.pid, %method, %path,
            status = resp.status().as_u16(), "admin change"
        );
    }
    resp
}

impl AdminApi {
    /// An admin API over `daemon`.
    pub fn new(daemon: Arc<Daemon>, tracker: TaskTracker, cancel: CancellationToken) -> AdminApi {
        AdminApi {
            daemon,
            tracker,
            cancel,
        }
    }

    /// Serves until cancelled. The caller removes the socket file if it
    /// bound it (a socket passed in by the service manager stays).
    pub async fn serve(self, listener: UnixListener, path: PathBuf) {
        info!(socket = %path.display(), "admin API listening");
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        loop {
            let accept = || {
                let l = &listener;
                async move { l.accept().await.map(|(s, _)| s) }
            };
            let Some((permit, stream)) = next_conn(&slots, &self.cancel, "admin", accept).await
            else {
                break;
            };
            let daemon = self.daemon.clone();
            let cancel = self.cancel.clone();
            let peer = stream.peer_cred().ok().map(|c| Peer {
                uid: c.uid(),
                pid: c.pid(),
            });
            self.tracker.spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let daemon = daemon.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(daemon, peer, req).await) }
                });
                serve_conn(stream, svc, cancel).await;
            });
        }
    }
}
