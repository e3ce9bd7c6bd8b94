//! A small client for the admin API, used by `tunneler status`.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::status::StatusDocument;

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

/// `GET path` on the admin socket; returns status code and body.
pub async fn get(socket: &Path, path: &str) -> Result<(u16, Bytes), ClientError> {
    request(socket, hyper::Method::GET, path, None).await
}

/// Any request on the admin socket, with an optional JSON body.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, Bytes), ClientError> {
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
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
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
        Ok((code, body))
    };
    // Generous: a reconnect or a reload may wait for a handshake.
    match tokio::time::timeout(Duration::from_secs(120), fut).await {
        Ok(r) => r,
        Err(_) => Err(unreachable("no answer within 120s".into())),
    }
}

/// Fetches and decodes the status document.
pub async fn status(socket: &Path) -> Result<(StatusDocument, Bytes), ClientError> {
    let (code, body) = get(socket, "/v1/status").await?;
    let bad = |reason: String| ClientError::BadAnswer {
        path: socket.display().to_string(),
        reason,
    };
    if code != 200 {
        return Err(bad(format!(
            "HTTP {code}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let doc = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    Ok((doc, body))
}
