//! Readiness, in two senses:
//!
//! - *started*: a latch (a `watch` of `bool`) that turns true once every
//!   node listed at start has finished its first connection attempt,
//!   success or not, or a bound has passed. systemd's `READY=1` waits on
//!   it. It is driven by the tunnels' own state channels: each finished
//!   attempt changes its node's state, which wakes the waiter; nothing
//!   polls.
//! - *ready* (`/readyz`): at least `admin.ready_min_healthy` nodes are
//!   healthy now.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::config_store::ConfigStore;
use crate::control::registry::NodeRegistry;
use crate::tunnel::{NodeTunnel, TunnelState};

/// Readiness of the daemon; cheap to share.
pub struct Readiness {
    config: Arc<ConfigStore>,
    registry: Arc<NodeRegistry>,
    started: watch::Sender<bool>,
}

impl Readiness {
    /// Readiness over the live nodes; `config` gives `ready_min_healthy`.
    pub fn new(config: Arc<ConfigStore>, registry: Arc<NodeRegistry>) -> Readiness {
        Readiness {
            config,
            registry,
            started: watch::channel(false).0,
        }
    }

    /// `/readyz`: `Ok` when at least `admin.ready_min_healthy` nodes are
    /// healthy. Either way the message says how many are.
    pub fn check(&self) -> Result<String, String> {
        let min = self.config.load().admin.ready_min_healthy;
        let nodes = self.registry.tunnels();
        let healthy = nodes
            .iter()
            .filter(|t| t.state().state == TunnelState::Healthy)
            .count();
        let msg = format!("{healthy} of {} node(s) healthy (need {min})", nodes.len());
        if healthy >= min {
            Ok(msg)
        } else {
            Err(msg)
        }
    }

    /// A receiver of the start latch: `true` once the first connection
    /// attempts are done (see the module doc).
    pub fn started(&self) -> watch::Receiver<bool> {
        self.started.subscribe()
    }

    /// Waits until every node live now has finished one connection
    /// attempt, or `bound` passes, then sets the start latch. Returns
    /// early (latch unset) when `cancel` fires.
    pub async fn latch_after_first_attempts(&self, bound: Duration, cancel: CancellationToken) {
        let nodes = self.registry.tunnels();
        let all = futures_util::future::join_all(nodes.iter().map(|t| first_attempt(t)));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::timeout(bound, all) => {}
        }
        self.started.send_replace(true);
    }
}

/// Resolves once `tunnel` has finished a connection attempt. An attempt is
/// counted before the state change that ends it, so checking after each
/// change cannot miss it.
async fn first_attempt(tunnel: &NodeTunnel) {
    let mut changes = tunnel.subscribe();
    while tunnel.attempts() == 0 {
        if changes.changed().await.is_err() {
            return;
        }
    }
}
