//! The optional active health probe, run through each node's own tunnel.
//!
//! The probe dials its target from the node's side of the tunnel, so
//! `http://127.0.0.1:10248/healthz` reaches the kubelet's loopback-only
//! health endpoint. Each node starts at a random offset inside the interval
//! so a thousand nodes are not probed in the same second. After
//! `unhealthy_after` consecutive failures the node shows `unhealthy`: still
//! connected and still used for dials addressed to it, but left out of the
//! service pool. One success makes it healthy again.
//!
//! The probe sits below the node tunnel: it drives a node through the
//! [`Probed`] trait, which the tunnel implements, so it never names the
//! tunnel. The HTTP exchange is hyper's client connection over the
//! tunnelled stream.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{HealthConfig, ProbeTarget};
use crate::error::TunnelError;
use crate::tunnel::settings::SharedSettings;

/// What the probe needs from one node.
pub trait Probed: Send + Sync + 'static {
    /// A stream to the probe target on the node's side.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Held while the stream is open (the node's stream accounting).
    type Guard: Send + 'static;

    /// Fires when the node stops; the probe stops with it.
    fn cancelled(&self) -> &CancellationToken;

    /// True while the node has a session up (whatever the probe says).
    fn connected(&self) -> bool;

    /// Opens a stream to `host:port` from the node's side, by `deadline`.
    fn dial(
        &self,
        host: &str,
        port: u16,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<(Self::Stream, Self::Guard), TunnelError>> + Send;

    /// Records the verdict: failing with why (after `unhealthy_after`
    /// failures in a row), or passing.
    fn set_probe_failing(&self, failing: Option<String>);
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The stream through the tunnel could not be opened.
    #[error("{0}")]
    Dial(#[from] TunnelError),
    /// The configured path is not a valid request target.
    #[error("bad probe request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The HTTP exchange failed (closed early, malformed response...).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The connection ended before a response head arrived.
    #[error("connection closed before a status line")]
    Closed,
    /// The target answered with a status outside 2xx.
    #[error("HTTP {0}")]
    Status(u16),
    /// No answer within the probe timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Runs probes for one node until its token is cancelled.
///
/// The probe settings are re-read whenever the tunnel settings change, so
/// a reload that adds, changes or removes `[health]` applies without a
/// restart. Without a `[health]` section the task sleeps until a reload.
pub async fn run<N: Probed>(node: N, settings: SharedSettings) {
    let cancel = node.cancelled().clone();
    let mut changes = settings.subscribe();
    let mut failures = 0u32;
    let mut next: Option<tokio::time::Instant> = None;
    loop {
        let Some(cfg) = settings.load().health.clone() else {
            // No probe configured: the node is never marked unhealthy.
            failures = 0;
            node.set_probe_failing(None);
            next = None;
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            continue;
        };
        // Spread the first probe of each node over the interval.
        let due = *next.get_or_insert_with(|| {
            tokio::time::Instant::now() + rand::rng().random_range(Duration::ZERO..cfg.interval)
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
            r = changes.changed() => {
                // A reload: look at the settings again (same due time).
                if r.is_err() { return }
                continue;
            }
        }
        next = Some(due + cfg.interval);
        if !node.connected() {
            // A fresh session starts with a clean slate.
            failures = 0;
            continue;
        }
        // Boxed: the HTTP client's state is needed only while probing, not
        // in every idle node's task between probes.
        let outcome =
            match tokio::time::timeout(cfg.timeout, Box::pin(probe_once(&node, &cfg))).await {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(cfg.timeout)),
            };
        match outcome {
            Ok(()) => {
                if failures >= cfg.unhealthy_after {
                    info!("health probe passes again");
                }
                failures = 0;
                node.set_probe_failing(None);
            }
            Err(why) => {
                failures = failures.saturating_add(1);
                debug!(failures, error = %why, "health probe failed");
                if failures == cfg.unhealthy_after {
                    warn!(failures, error = %why, "health probe failing: node leaves the service pool");
                }
                if failures >= cfg.unhealthy_after {
                    node.set_probe_failing(Some(format!("{why} ({failures} failures in a row)")));
                }
            }
        }
    }
}

/// One probe: a TCP connect, or one HTTP/1.1 GET whose status must be 2xx.
async fn probe_once<N: Probed>(node: &N, cfg: &HealthConfig) -> Result<(), ProbeError> {
    let (host, port) = match &cfg.probe {
        ProbeTarget::Http { host, port, .. } | ProbeTarget::Tcp { host, port } => (host, *port),
    };
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let (stream, _guard) = node.dial(host, port, deadline).await?;
    let path = match &cfg.probe {
        // The channel opened: the port answers. Dropping the stream closes it.
        ProbeTarget::Tcp { .. } => return Ok(()),
        ProbeTarget::Http { path, .. } => path,
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = hyper::Request::get(path.as_str())
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "tunneler-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task is driven here, beside the request: it ends with
    // this probe, and the stream (and its guard) with it.
    let response = sender.send_request(request);
    tokio::pin!(response);
    let status = tokio::select! {
        r = &mut response => r?.status(),
        r = conn => {
            r?;
            // A server that answers and closes at once can have its
            // response and its EOF read in one poll: the connection then
            // ends in the very poll that handed the response over, and the
            // response is already waiting. Only without one is it closed.
            match response.as_mut().now_or_never() {
                Some(r) => r?.status(),
                None => return Err(ProbeError::Closed),
            }
        }
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProbeTarget;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A node whose probe target is an in-memory server that reads the
    /// request, then writes `answer` and closes in one go, so the client
    /// reads the response and the EOF together. No real node can make
    /// that order certain; this fake can.
    struct AnswersAndCloses {
        answer: &'static [u8],
        cancel: CancellationToken,
    }

    impl Probed for AnswersAndCloses {
        type Stream = DuplexStream;
        type Guard = ();
        fn cancelled(&self) -> &CancellationToken {
            &self.cancel
        }
        fn connected(&self) -> bool {
            true
        }
        async fn dial(
            &self,
            _host: &str,
            _port: u16,
            _deadline: tokio::time::Instant,
        ) -> Result<(DuplexStream, ()), TunnelError> {
            let (client, mut server) = tokio::io::duplex(64 * 1024);
            let answer = self.answer;
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match server.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = server.write_all(answer).await;
                // Dropping `server` is the EOF, behind the answer.
            });
            Ok((client, ()))
        }
        fn set_probe_failing(&self, _: Option<String>) {}
    }

    fn http_probe() -> HealthConfig {
        HealthConfig {
            probe: ProbeTarget::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into(),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            unhealthy_after: 1,
        }
    }

    async fn probe(answer: &'static [u8]) -> Result<(), ProbeError> {
        let node = AnswersAndCloses {
            answer,
            cancel: CancellationToken::new(),
        };
        tokio::time::timeout(Duration::from_secs(5), probe_once(&node, &http_probe()))
            .await
            .expect("probe hung")
    }

    /// A 200 followed at once by the server's close passes, every time:
    /// the close must not win over the response read with it.
    #[tokio::test]
    async fn a_response_read_together_with_the_close_passes() {
        for _ in 0..50 {
            let r =
                probe(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            assert!(r.is_ok(), "{r:?}");
        }
    }

    /// The other answers keep their verdicts: a 503 is a failing status,
    /// and a close with no response at all fails (hyper reports it as an
    /// incomplete message, or the connection ends first: `Closed`).
    #[tokio::test]
    async fn a_bad_status_fails_and_a_bare_close_is_closed() {
        let r = probe(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        assert!(matches!(r, Err(ProbeError::Status(503))), "{r:?}");
        let r = probe(b"").await;
        assert!(
            matches!(r, Err(ProbeError::Closed | ProbeError::Http(_))),
            "{r:?}"
        );
    }
}
