//! The admin API's client: `tunneler status`, `tunneler streams`,
//! `tunneler nodes ...` and `tunneler reload`. It speaks the typed protocol of
//! [`admin_api`](crate::admin::api) over the admin Unix socket.
//!
//! Exit codes, for scripts: 0 success (for `status`: every node healthy),
//! 1 an error answer (or, for `status`, a node not healthy), 2 the daemon
//! cannot be reached or answered something unreadable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::admin::api::{ErrorBody, NodeSpec, Request};
use crate::admin::status::StatusDocument;
use crate::cli::NodesAction;
use crate::config::{Config, DEFAULT_ADMIN_SOCKET};

/// Why the admin API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach the tunneler daemon at {path}: {reason}")]
    Unreachable {
        /// The socket path tried.
        path: String,
        /// Why.
        reason: String,
    },
    /// The daemon answered with something unexpected.
    #[error("bad answer from the daemon at {path}: {reason}")]
    BadAnswer {
        /// The socket path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// An answer: the HTTP status code and the body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status code.
    pub code: u16,
    /// The body as sent.
    pub body: Bytes,
}

impl Answer {
    /// True for a 2xx answer.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The error message of an error answer: the `error` of its
    /// [`ErrorBody`], or the body's text when it is not one.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// Sends one request on the admin socket.
pub async fn call(socket: &Path, request: &Request) -> Result<Answer, ClientError> {
    let sp = socket.display().to_string();
    let unreachable = |reason: String| ClientError::Unreachable {
        path: sp.clone(),
        reason,
    };
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(request.method().as_str())
            .uri(request.path())
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(request.body().unwrap_or_default())))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok(Answer { code, body })
    };
    // Generous: a reconnect or a reload may wait for a handshake.
    match tokio::time::timeout(Duration::from_secs(120), fut).await {
        Ok(r) => r,
        Err(_) => Err(unreachable("no answer within 120s".into())),
    }
}

/// Fetches and decodes the status document; also returns the raw body.
pub async fn status(socket: &Path) -> Result<(StatusDocument, Bytes), ClientError> {
    let answer = call(socket, &Request::Status).await?;
    let bad = |reason: String| ClientError::BadAnswer {
        path: socket.display().to_string(),
        reason,
    };
    if answer.code != 200 {
        return Err(bad(format!(
            "HTTP {}: {}",
            answer.code,
            String::from_utf8_lossy(&answer.body)
        )));
    }
    let doc = serde_json::from_slice(&answer.body).map_err(|e| bad(e.to_string()))?;
    Ok((doc, answer.body))
}

/// The admin socket from `--socket`, else from `--config`'s `[admin]`
/// socket, else the default. A config that does not load exits 2.
pub fn admin_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, u8> {
    match (socket, config) {
        (Some(s), _) => Ok(s),
        (None, Some(c)) => match Config::load(&c) {
            Ok(cfg) => Ok(cfg.admin.socket),
            Err(e) => {
                eprintln!("{}: {e}", c.display());
                Err(2)
            }
        },
        (None, None) => Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
    }
}

/// The request a `tunneler nodes` action sends.
pub fn nodes_request(action: NodesAction) -> Request {
    match action {
        NodesAction::Add {
            name,
            address,
            port,
            internal_ips,
            pod_cidrs,
            hostnames,
            dns_names,
            host_addresses,
        } => Request::AddNode(NodeSpec {
            name,
            address,
            port,
            internal_ips: (!internal_ips.is_empty()).then_some(internal_ips),
            pod_cidrs,
            hostnames,
            dns_names,
            host_addresses,
            kubelet_port: None,
        }),
        NodesAction::Remove { name } => Request::RemoveNode(name),
        NodesAction::Drain { name } => Request::Drain(name),
        NodesAction::Undrain { name } => Request::Undrain(name),
        NodesAction::Reconnect { name } => Request::Reconnect(name),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the async runtime: {e}");
            2
        })
}

/// Sends one change request and prints the answer: the JSON body on
/// stdout and exit 0 on success, the error on stderr and exit 1 on an
/// error answer, exit 2 when the daemon cannot be reached.
pub fn run_request(socket: &Path, request: Request) -> u8 {
    if let Err(e) = request.check() {
        eprintln!("tunneler: {e}");
        return 1;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(call(socket, &request)) {
        Ok(answer) if answer.is_success() => {
            print!("{}", String::from_utf8_lossy(&answer.body));
            0
        }
        Ok(answer) => {
            eprintln!(
                "tunneler: {} (HTTP {})",
                answer.error_message(),
                answer.code
            );
            1
        }
        Err(e) => {
            eprintln!("tunneler: {e}");
            2
        }
    }
}

/// `tunneler status`: the table (or `--json`, the document as served);
/// exit 0 when every node is healthy, 1 when not, 2 when unreachable.
/// `--watch` redraws the table every second until interrupted.
pub fn run_status(socket: &Path, json: bool, watch: bool) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if watch {
        return rt.block_on(watch_status(socket));
    }
    match rt.block_on(status(socket)) {
        Ok((doc, raw)) => {
            if json {
                print!("{}", String::from_utf8_lossy(&raw));
            } else {
                print!("{}", doc.table());
            }
            if doc.all_healthy() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("tunneler status: {e}");
            2
        }
    }
}

async fn watch_status(socket: &Path) -> u8 {
    loop {
        let frame = match status(socket).await {
            Ok((doc, _)) => doc.table(),
            Err(e) => format!("tunneler status: {e}\n"),
        };
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{frame}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return 0,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// `tunneler streams`: the table (or `--json`, the document as served);
/// exit 0 when answered, 1 on an error answer, 2 when unreachable.
pub fn run_streams(socket: &Path, query: crate::admin::api::StreamsQuery, json: bool) -> u8 {
    let request = Request::Streams(query);
    if let Err(e) = request.check() {
        eprintln!("tunneler streams: {e}");
        return 1;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let answer = match rt.block_on(call(socket, &request)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tunneler streams: {e}");
            return 2;
        }
    };
    if !answer.is_success() {
        eprintln!(
            "tunneler streams: {} (HTTP {})",
            answer.error_message(),
            answer.code
        );
        return 1;
    }
    if json {
        print!("{}", String::from_utf8_lossy(&answer.body));
        return 0;
    }
    match serde_json::from_slice::<crate::admin::streams::StreamsDocument>(&answer.body) {
        Ok(doc) => {
            print!("{}", doc.table());
            0
        }
        Err(e) => {
            eprintln!(
                "tunneler streams: bad answer from the daemon at {}: {e}",
                socket.display()
            );
            2
        }
    }
}

impl From<crate::cli::StreamOrder> for crate::admin::streams::StreamSort {
    fn from(o: crate::cli::StreamOrder) -> Self {
        match o {
            crate::cli::StreamOrder::Age => crate::admin::streams::StreamSort::Age,
            crate::cli::StreamOrder::Buffered => crate::admin::streams::StreamSort::Buffered,
        }
    }
}
