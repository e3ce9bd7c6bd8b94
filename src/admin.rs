//! The admin API: HTTP/JSON on a local Unix socket (mode 0600).
//!
//! Endpoints:
//! - `GET /v1/status`: the [`StatusDocument`](crate::status::StatusDocument).
//! - `GET /healthz`: 200 while the process serves.
//!
//! `curl --unix-socket /run/tunneler/admin.sock http://localhost/v1/status`
//! works, and `tunneler status` is a client of the same endpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::daemon::Daemon;

/// Admin connections served at once; more wait in the accept queue.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// The admin API server.
pub struct AdminApi {
    daemon: Arc<Daemon>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

fn json(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(code, serde_json::json!({ "error": msg }).to_string() + "\n")
}

/// Routes one admin request. Pure apart from reading the daemon's state.
pub fn route(daemon: &Daemon, method: &Method, path: &str) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/v1/status") => match serde_json::to_string_pretty(&daemon.status()) {
            Ok(s) => json(StatusCode::OK, s + "\n"),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        (&Method::GET, "/healthz") => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            *r.status_mut() = StatusCode::OK;
            r
        }
        (_, "/v1/status") | (_, "/healthz") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
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

    /// Serves until cancelled, then removes the socket file.
    pub async fn serve(self, listener: UnixListener, path: PathBuf) {
        info!(socket = %path.display(), "admin API listening");
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                _ = self.cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let stream = tokio::select! {
                _ = self.cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!(error = %e, "admin accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let daemon = self.daemon.clone();
            let cancel = self.cancel.clone();
            self.tracker.spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = route(&daemon, req.method(), req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
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
            });
        }
        let _ = std::fs::remove_file(&path);
    }
}
