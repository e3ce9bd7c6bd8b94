//! The optional active health probe, run through each node's own tunnel.
//!
//! The probe dials its target from the node's side of the tunnel, so
//! `http://127.0.0.1:10248/healthz` reaches the kubelet's loopback-only
//! health endpoint. Each node starts at a random offset inside the interval
//! so a thousand nodes are not probed in the same second. After
//! `unhealthy_after` consecutive failures the node shows `unhealthy`: still
//! connected and still used for dials addressed to it, but left out of the
//! service pool. One success makes it healthy again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::config::{HealthConfig, ProbeTarget};
use crate::tunnel::{NodeTunnel, SharedContext};

/// Runs probes for one node until its token is cancelled.
///
/// The probe settings are re-read from the shared context at every tick, so
/// a reload that adds, changes or removes `[health]` applies without a restart.
pub async fn run(tunnel: Arc<NodeTunnel>, ctx: SharedContext) {
    let cancel = tunnel.cancel_token().clone();
    let mut failures = 0u32;
    let mut states = tunnel.subscribe();
    let mut next: Option<tokio::time::Instant> = None;
    loop {
        let Some(cfg) = ctx.load().health.clone() else {
            // No probe configured: the node is never marked unhealthy.
            failures = 0;
            tunnel.set_probe_failing(None);
            next = None;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        // Spread the first probe of each node over the interval.
        let due = *next.get_or_insert_with(|| {
            tokio::time::Instant::now() + rand::rng().random_range(Duration::ZERO..cfg.interval)
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        next = Some(due + cfg.interval);
        // A fresh session starts with a clean slate.
        if states.has_changed().unwrap_or(false) {
            let s = states.borrow_and_update().clone();
            if !s.state.is_connected() {
                failures = 0;
            }
        }
        if !tunnel.state().state.is_connected() {
            failures = 0;
            continue;
        }
        match tokio::time::timeout(cfg.timeout, probe_once(&tunnel, &cfg)).await {
            Ok(Ok(())) => {
                if failures >= cfg.unhealthy_after {
                    info!("health probe passes again");
                }
                failures = 0;
                tunnel.set_probe_failing(None);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("timed out after {:?}", cfg.timeout),
                };
                failures = failures.saturating_add(1);
                debug!(failures, error = %why, "health probe failed");
                if failures == cfg.unhealthy_after {
                    warn!(failures, error = %why, "health probe failing: node leaves the service pool");
                }
                if failures >= cfg.unhealthy_after {
                    tunnel.set_probe_failing(Some(format!("{why} ({failures} failures in a row)")));
                }
            }
        }
    }
}

async fn probe_once(tunnel: &Arc<NodeTunnel>, cfg: &HealthConfig) -> Result<(), String> {
    let (host, port) = match &cfg.probe {
        ProbeTarget::Http { host, port, .. } | ProbeTarget::Tcp { host, port } => (host, *port),
    };
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let origin = SocketAddr::from(([127, 0, 0, 1], 0));
    let open = tunnel
        .open_channel(host, port, origin, deadline, u64::MAX)
        .await
        .map_err(|e| e.to_string())?;
    let path = match &cfg.probe {
        ProbeTarget::Tcp { .. } => {
            let _ = open.channel.close().await;
            return Ok(());
        }
        ProbeTarget::Http { path, .. } => path,
    };
    let _guard = open.guard;
    let mut stream = open.channel.into_stream();
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tunneler-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 512];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = resp.code.unwrap_or(0);
                return if (200..300).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP {code}"))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad HTTP response: {e}")),
        }
    }
}
