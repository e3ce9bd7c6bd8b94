//! Pool dials (service CIDRs and pod networks): which node carries a
//! stream that any healthy node may carry.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;
use tracing::info;

use crate::error::TunnelError;
use crate::proxy::route::RouteTable;
use crate::tunnel::NodeTunnel;

/// Pool dials (service CIDRs and pod networks): the less loaded of two
/// random tunnels among those that are healthy (not draining, not failing
/// their probe); a tunnel-side failure is retried once on another. When
/// every candidate fails, the error lists why.
pub(super) struct Pool {
    routes: Arc<RouteTable<Arc<NodeTunnel>>>,
    tried: Vec<usize>,
    reasons: Vec<String>,
}

impl Pool {
    /// A pool dial over the nodes of `routes`, none tried yet.
    pub(super) fn new(routes: Arc<RouteTable<Arc<NodeTunnel>>>) -> Pool {
        Pool {
            routes,
            tried: Vec::new(),
            reasons: Vec::new(),
        }
    }

    /// The next candidate, at most two in all.
    pub(super) fn next(&mut self) -> Option<Arc<NodeTunnel>> {
        if self.tried.len() >= 2 {
            return None;
        }
        let nodes = self.routes.nodes();
        let healthy: Vec<usize> = (0..nodes.len())
            .filter(|i| !self.tried.contains(i) && nodes[*i].pool_eligible())
            .collect();
        let pick = pick_two(&healthy, |i| {
            nodes[i].counters.active_streams.load(Ordering::Relaxed)
        })?;
        self.tried.push(pick);
        Some(nodes[pick].clone())
    }

    /// After `node` failed with `e`: the next node to try, or the error to
    /// answer with.
    pub(super) fn failed_on(
        &mut self,
        node: &NodeTunnel,
        e: TunnelError,
        host: &str,
    ) -> Result<Arc<NodeTunnel>, TunnelError> {
        match e {
            e @ TunnelError::ChannelOpenTimeout(_) => Err(e),
            e if e.is_tunnel_side() => {
                info!(node = %node.node.name, error = %e, "pool dial failed on this tunnel; trying another");
                self.reasons.push(format!("{}: {e}", node.node.name));
                self.next().ok_or_else(|| self.exhausted(host))
            }
            e => Err(e),
        }
    }

    /// Why no candidate is left.
    pub(super) fn exhausted(&self, host: &str) -> TunnelError {
        if !self.reasons.is_empty() {
            return TunnelError::NotConnected(format!(
                "every candidate tunnel failed: {}",
                self.reasons.join("; ")
            ));
        }
        let nodes = self.routes.nodes();
        let mut states: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} {}", n.node.name, n.state().state.as_str()))
            .collect();
        states.truncate(10);
        TunnelError::NotConnected(format!(
            "none of {} node(s) can take {} {host}{}{}",
            nodes.len(),
            self.routes.pool_kind(host),
            if states.is_empty() { "" } else { ": " },
            states.join(", ")
        ))
    }
}

/// Power of two choices: two distinct random candidates, the less loaded wins.
fn pick_two(cands: &[usize], load: impl Fn(usize) -> u64) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(cands[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (cands[a], cands[b]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_two_prefers_less_loaded() {
        assert_eq!(pick_two(&[], |_| 0), None);
        assert_eq!(pick_two(&[4], |_| 0), Some(4));
        for _ in 0..100 {
            // node 1 has no load, 0 has lots: whenever 1 is drawn it wins,
            // and with two candidates both are always drawn.
            assert_eq!(pick_two(&[0, 1], |i| if i == 0 { 100 } else { 0 }), Some(1));
        }
    }

    #[test]
    fn pick_two_draws_two_distinct_candidates() {
        // With three candidates and one unloaded, the unloaded one is picked
        // whenever it is drawn (2 in 3); the loaded ones never beat it. Both
        // loaded ones also get picked: a draw that ignored them would not.
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            let p = pick_two(&[0, 1, 2], |i| if i == 2 { 0 } else { 10 + i as u64 })
                .expect("a candidate");
            seen[p] += 1;
        }
        assert_eq!(seen[1], 0, "the most loaded candidate never wins: {seen:?}");
        assert!(seen[0] > 0 && seen[2] > seen[0], "{seen:?}");
    }
}
