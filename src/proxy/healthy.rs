//! Waiting, bounded, for a tunnel that is not up yet.
//!
//! Right after a restart every tunnel is connecting, and after a lost
//! session a node is in backoff for a moment. A dial in that window would
//! get 503 although the tunnel is a second away; instead it waits (up to
//! `proxy.wait_for_healthy`, inside the dial timeout) on the tunnel's state
//! watch, so it goes on the moment the state changes, without polling.
//!
//! It does not wait where waiting cannot help, and answers at once:
//! - a node whose host key or key was refused (`rejected`, or connecting
//!   again after such a refusal): only an operator fixes that, and the
//!   retry at `max_backoff` exists to notice the fix, not in hope;
//! - a node in backoff whose next attempt is due after the bound;
//! - for a service dial, nodes that are up but drained or failing their
//!   probe: both are decisions (the operator's, the probe's) that a few
//!   seconds do not change.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::TunnelError;
use crate::tunnel::{NodeTunnel, StateInfo, TunnelState};

/// What waiting until `until` could bring a tunnel in state `s`.
#[derive(Debug, PartialEq, Eq)]
enum Outlook {
    /// It can take the dial now.
    Ready,
    /// It may be ready before the bound: worth waiting for.
    Soon,
    /// Waiting will not help; why.
    Hopeless,
}

fn outlook(s: &StateInfo, ready: fn(TunnelState) -> bool, until: SystemTime) -> Outlook {
    outlook_of(s.state, s.last_error.as_ref(), s.next_retry, ready, until)
}

fn outlook_of(
    state: TunnelState,
    last_error: Option<&TunnelError>,
    next_retry: Option<SystemTime>,
    ready: fn(TunnelState) -> bool,
    until: SystemTime,
) -> Outlook {
    if ready(state) {
        return Outlook::Ready;
    }
    let refused = last_error.is_some_and(TunnelError::is_rejection);
    match state {
        TunnelState::Connecting if refused => Outlook::Hopeless,
        TunnelState::Connecting => Outlook::Soon,
        TunnelState::Backoff => match next_retry {
            Some(t) if t > until => Outlook::Hopeless,
            _ => Outlook::Soon,
        },
        TunnelState::Rejected
        | TunnelState::Healthy
        | TunnelState::Unhealthy
        | TunnelState::Draining => Outlook::Hopeless,
    }
}

/// `until` as wall-clock time, to compare with `next_retry`.
fn wall(until: Instant) -> SystemTime {
    SystemTime::now() + until.saturating_duration_since(Instant::now())
}

fn connected(s: TunnelState) -> bool {
    s.is_connected()
}

fn pool_ready(s: TunnelState) -> bool {
    s == TunnelState::Healthy
}

/// Waits until `node` has a session up (healthy, or up but drained or
/// failing its probe: node-addressed dials still use those), at most until
/// `until`. The error says the state it was left in and why.
pub async fn wait_for_node(node: &NodeTunnel, until: Instant) -> Result<(), TunnelError> {
    let mut rx = node.subscribe();
    let started = Instant::now();
    loop {
        let s = rx.borrow_and_update().clone();
        let not_up = |what: String| {
            let why = s
                .last_error
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "not connected".into());
            TunnelError::NotConnected(format!(
                "node {} is {}{what}: {why}",
                node.node.name,
                s.state.as_str()
            ))
        };
        match outlook(&s, connected, wall(until)) {
            Outlook::Ready => return Ok(()),
            Outlook::Hopeless => return Err(not_up(String::new())),
            Outlook::Soon if until <= started => return Err(not_up(String::new())),
            Outlook::Soon => {}
        }
        let gone =
            || TunnelError::NotConnected(format!("node {} is shutting down", node.node.name));
        tokio::select! {
            r = tokio::time::timeout_at(until, rx.changed()) => match r {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(gone()),
                Err(_) => {
                    return Err(not_up(format!(" after waiting {:?} for it", started.elapsed())))
                }
            },
            _ = node.cancel_token().cancelled() => return Err(gone()),
        }
    }
}

/// Waits until any of `nodes` can take a service dial (healthy), at most
/// until `until`. Returns at once when none could be healthy by then; the
/// caller's pool dial then reports every node's state.
pub async fn wait_for_pool(nodes: &[Arc<NodeTunnel>], until: Instant) {
    let mut rxs: Vec<watch::Receiver<StateInfo>> = nodes.iter().map(|n| n.subscribe()).collect();
    loop {
        let at = wall(until);
        let mut soon = false;
        for rx in rxs.iter_mut() {
            match outlook(&rx.borrow_and_update(), pool_ready, at) {
                Outlook::Ready => return,
                Outlook::Soon => soon = true,
                Outlook::Hopeless => {}
            }
        }
        if !soon {
            return;
        }
        let any_change =
            futures_util::future::select_all(rxs.iter_mut().map(|rx| Box::pin(rx.changed())));
        match tokio::time::timeout_at(until, any_change).await {
            Ok((Ok(()), _, _)) => continue,
            // A tunnel gone (its node removed): its sender is never dropped
            // while we hold the handle, so this is shutdown; stop waiting.
            Ok((Err(_), _, _)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct S(TunnelState, Option<TunnelError>, Option<SystemTime>);

    fn state(state: TunnelState, err: Option<TunnelError>, retry: Option<Duration>) -> S {
        S(state, err, retry.map(|d| SystemTime::now() + d))
    }

    #[test]
    fn waiting_helps_only_where_the_tunnel_can_come_up_in_time() {
        let until = SystemTime::now() + Duration::from_secs(3);
        let o = |s: &S, f| outlook_of(s.0, s.1.as_ref(), s.2, f, until);
        let connecting = state(TunnelState::Connecting, None, None);
        assert_eq!(o(&connecting, connected), Outlook::Soon);
        assert_eq!(o(&connecting, pool_ready), Outlook::Soon);
        // Connecting again after the host key was refused: no hope.
        let key = TunnelError::HostKeyChanged("node-1".into());
        let recheck = state(TunnelState::Connecting, Some(key.clone()), None);
        assert_eq!(o(&recheck, connected), Outlook::Hopeless);
        let rejected = state(
            TunnelState::Rejected,
            Some(key),
            Some(Duration::from_secs(1)),
        );
        assert_eq!(o(&rejected, connected), Outlook::Hopeless);
        // Backoff: worth it when the retry is due inside the bound.
        let lost = TunnelError::ConnectRefused("x".into());
        let soon = state(
            TunnelState::Backoff,
            Some(lost.clone()),
            Some(Duration::from_secs(1)),
        );
        assert_eq!(o(&soon, connected), Outlook::Soon);
        let late = state(
            TunnelState::Backoff,
            Some(lost),
            Some(Duration::from_secs(10)),
        );
        assert_eq!(o(&late, connected), Outlook::Hopeless);
        // Up: ready for a node dial; drained or probe-failing nodes are
        // not for the pool, and waiting does not change that.
        for s in [
            TunnelState::Healthy,
            TunnelState::Unhealthy,
            TunnelState::Draining,
        ] {
            assert_eq!(o(&state(s, None, None), connected), Outlook::Ready, "{s:?}");
        }
        assert_eq!(
            o(&state(TunnelState::Healthy, None, None), pool_ready),
            Outlook::Ready
        );
        for s in [TunnelState::Unhealthy, TunnelState::Draining] {
            assert_eq!(
                o(&state(s, None, None), pool_ready),
                Outlook::Hopeless,
                "{s:?}"
            );
        }
    }
}
