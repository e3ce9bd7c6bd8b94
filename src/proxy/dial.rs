//! Dialling: route a stream, move it to its node's shard, open the
//! channel, reply 200 and relay.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::metrics::DialResult;
use crate::proxy::access::{Carried, DialRecord, RouteKind};
use crate::proxy::live::LiveStream;
use crate::proxy::pool::Pool;
use crate::proxy::refusal::Refusal;
use crate::proxy::route::{pod_host_address, PoolKind, Route, RouteTable};
use crate::proxy::{EgressProxy, ProxySettings, Target};
use crate::shard::Movable;
use crate::tunnel::relay::{relay, RelayBudget, Relayed, StreamEnd};
use crate::tunnel::stream_stats::StreamStats;
use crate::tunnel::{NodeTunnel, OpenStream};

type Routes = Arc<RouteTable<Arc<NodeTunnel>>>;

impl EgressProxy {
    /// Routes the stream (on the shard that accepted it and read its head)
    /// and, unless that is already the shard of the node that will carry
    /// it, moves it there; refusals that need no node are answered here.
    pub(super) async fn dial_and_relay<S: Movable>(
        &self,
        mut s: S,
        peer: SocketAddr,
        target: Target,
        first: Bytes,
        mut rec: DialRecord,
    ) {
        let settings = self.settings.load_full();
        let deadline = Instant::now() + settings.dial_timeout;
        let routes = self.routes.load_full();
        let route = routes.lookup(&target.host);
        rec.route = route_kind(&route, &routes);
        if let Route::Node { node, .. } = &route {
            rec.node = Some(node.node.name.clone());
        }
        let dial = match choose(route, &routes, &target, &settings, deadline).await {
            Ok(dial) => dial,
            Err(why) => {
                self.refuse(&rec, &mut s, why).await;
                return;
            }
        };
        let pending = Pending {
            dial,
            port: target.port,
            peer,
            first,
            rec,
            deadline,
            settings,
        };
        // Accepted on the node's own shard: no hand-off at all.
        if pending.dial.node.shard().is_current() {
            self.on_shard(s, pending).await
        } else {
            self.move_to_shard(s, pending)
        }
    }

    /// Hands the client connection to the shard of the node it is routed
    /// to: taken off this runtime's reactor here, registered there. The
    /// dial, the reply and the relay all run on that shard.
    fn move_to_shard<S: Movable>(&self, s: S, pending: Pending) {
        let shard = pending.dial.node.shard().clone();
        let detached = match s.detach() {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot move the connection to its node's shard; closing it");
                return;
            }
        };
        shard.count_moved_in();
        let this = self.clone();
        shard.spawn(
            &self.tracker,
            async move {
                match S::attach(detached) {
                    Ok(s) => this.on_shard(s, pending).await,
                    Err(e) => {
                        warn!(error = %e, "cannot take the connection over on the node's shard; closing it")
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// On the node's shard: open the channel, reply 200, relay. A pool
    /// dial that fails on its tunnel tries another node once, moving again
    /// when that node lives on another shard.
    async fn on_shard<S: Movable>(&self, mut s: S, mut p: Pending) {
        loop {
            let node = p.dial.node.clone();
            let opened = node
                .open_channel(
                    &p.dial.host,
                    p.port,
                    p.peer,
                    p.deadline,
                    p.settings.max_streams_per_node,
                )
                .await;
            p.rec.node = Some(node.node.name.clone());
            let e = match opened {
                Ok(open) => return self.relay_stream(s, open, &p).await,
                Err(e) => e,
            };
            let retry = match &mut p.dial.pool {
                Some(pool) => pool.failed_on(&node, e, &p.dial.host),
                None => Err(e),
            };
            match retry {
                Ok(next) => {
                    let here = next.shard().is_current();
                    p.dial.node = next;
                    if !here {
                        return self.move_to_shard(s, p);
                    }
                }
                Err(e) => {
                    if p.dial.pool.is_some() {
                        info!(error = %e, "pool dial failed");
                    } else {
                        info!(node = %node.node.name, error = %e, "dial failed");
                    }
                    self.refuse(&p.rec, &mut s, Refusal::Dial(e)).await;
                    return;
                }
            }
        }
    }

    /// The 200 reply and the relay, on the stream's shard; the stream is
    /// in the live list from its 200 to its end, and its access record and
    /// histograms are written at the end.
    async fn relay_stream<S: Movable>(&self, mut s: S, open: OpenStream, p: &Pending) {
        let _counted = crate::shard::stream_started();
        self.metrics
            .record(DialResult::Ok, p.rec.started.elapsed().as_secs_f64());
        let OpenStream { channel, guard } = open;
        let tunnel = guard.tunnel().clone();
        let session = guard.session_id();
        let ok = async {
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            // A TLS writer may hold the record until flushed.
            s.flush().await
        };
        if ok.await.is_err() {
            // Drop the read half first: the session loop may be parked on
            // this channel's queue, and the close goes through that loop.
            let (read_half, write_half) = channel.split();
            drop(read_half);
            let _ = tokio::time::timeout(Duration::from_secs(5), write_half.close()).await;
            let stats = StreamStats::default();
            self.stream_done(
                p,
                session,
                p.rec.started.elapsed(),
                StreamEnd::ClientClosed,
                &stats,
            );
            return;
        }
        let connect = p.rec.started.elapsed();
        let listed = self.live.insert(LiveStream {
            id: p.rec.id,
            target: p
                .rec
                .target
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            node: tunnel.node.name.clone(),
            session,
            listener: p.rec.origin.listener.clone(),
            client: p.rec.origin.client.label(),
            started_at: p.rec.at,
            started: p.rec.started.into_std(),
            stats: StreamStats::default(),
        });
        debug!(node = %tunnel.node.name, session, "stream open");
        let Relayed { end, client } = relay(
            s,
            p.first.clone(),
            channel,
            &tunnel.counters,
            guard.session(),
            self.cancel.child_token(),
            RelayBudget::global(),
            &p.settings.relay,
            &listed.stream().stats,
        )
        .await;
        drop(guard);
        if end.is_cut() {
            client.cut();
            info!(node = %tunnel.node.name, how = %end, "stream cut before the node side ended it; the client's connection was reset");
        } else {
            drop(client);
            debug!(node = %tunnel.node.name, how = %end, "stream closed");
        }
        self.stream_done(p, session, connect, end, &listed.stream().stats);
    }

    /// A carried stream's access record and histograms.
    fn stream_done(
        &self,
        p: &Pending,
        session: u64,
        connect: Duration,
        end: StreamEnd,
        stats: &StreamStats,
    ) {
        let node = p.dial.node.node.name.as_str();
        self.metrics.stream_ended(
            node,
            p.rec.started.elapsed().as_secs_f64(),
            stats.to_client.load(Ordering::Relaxed),
            stats.to_node.load(Ordering::Relaxed),
        );
        if p.settings.access_log {
            p.rec.carried(&Carried {
                session,
                connect,
                end,
                stats,
            });
        }
    }
}

/// A routed stream on its way to (or on) its node's shard.
struct Pending {
    dial: Dial,
    port: u16,
    peer: SocketAddr,
    /// Bytes the client sent past its request head.
    first: Bytes,
    /// The dial's access record, so far.
    rec: DialRecord,
    deadline: tokio::time::Instant,
    settings: Arc<ProxySettings>,
}

/// Where a stream is dialled: the node, the host on its side, and for a
/// service-CIDR dial the pool it may retry in.
struct Dial {
    node: Arc<NodeTunnel>,
    host: String,
    pool: Option<Pool>,
}

/// What the access record calls this route.
fn route_kind(route: &Route<Arc<NodeTunnel>>, routes: &Routes) -> Option<RouteKind> {
    match route {
        Route::Node { node_local, .. } => Some(if *node_local {
            RouteKind::Node
        } else {
            RouteKind::Pod
        }),
        Route::Pool { host } => Some(if routes.pool_kind(host) == PoolKind::Service {
            RouteKind::Service
        } else {
            RouteKind::Pool
        }),
        Route::Forbidden => None,
    }
}

/// Where `target` is dialled, or why it is refused: the destination and
/// port policy, then the wait for a tunnel that can carry it.
async fn choose(
    route: Route<Arc<NodeTunnel>>,
    routes: &Routes,
    target: &Target,
    settings: &ProxySettings,
    deadline: Instant,
) -> Result<Dial, Refusal> {
    // A node's host address inside the pod range keeps the node port
    // policy, whichever node the route picks.
    if !matches!(route, Route::Forbidden) {
        if let Err(why) = routes.check_host_address(&target.host, target.port, &settings.node_ports)
        {
            info!(reason = %why, "destination port not allowed on a node's host address");
            return Err(Refusal::forbidden(target, &why));
        }
    }
    match route {
        Route::Forbidden => {
            let why = routes.not_routed(&target.host);
            debug!(reason = %why, "destination not allowed");
            Err(Refusal::forbidden(target, &why))
        }
        Route::Node {
            node,
            host,
            node_local,
        } => dial_node(node, host, node_local, target, settings, deadline).await,
        Route::Pool { host } => dial_pool(routes, host, settings, deadline).await,
    }
}

/// A dial routed to one node: its host network's port policy, the host on
/// its side, and the wait for its tunnel.
async fn dial_node(
    node: Arc<NodeTunnel>,
    host: String,
    node_local: bool,
    target: &Target,
    settings: &ProxySettings,
    deadline: Instant,
) -> Result<Dial, Refusal> {
    // A node's own address is its host network: only the kubelet and the
    // listed ports, whatever host it becomes. So is a pod CIDR address its
    // CNI gives the node itself.
    let host_network = node_local
        || host
            .parse()
            .is_ok_and(|ip| pod_host_address(&node.node, ip, &settings.pod_host_offsets));
    if host_network {
        if let Err(why) = settings.node_ports.check(&node.node, target.port) {
            info!(node = %node.node.name, reason = %why, "destination port not allowed");
            return Err(Refusal::forbidden(target, &why));
        }
    }
    // Kubelets may listen on loopback only: the old SSH tunnels gave that
    // property, and so do we when asked.
    let host = if node_local && settings.node_local_via_loopback {
        if host.contains(':') {
            "::1".to_string()
        } else {
            "127.0.0.1".to_string()
        }
    } else {
        host
    };
    // A node still connecting (at start, or after a lost session) is waited
    // for, up to wait_for_healthy, before the connection moves to its shard.
    let wait_until = (Instant::now() + settings.wait_for_healthy).min(deadline);
    if let Err(e) = crate::proxy::healthy::wait_for_node(&node, wait_until).await {
        info!(node = %node.node.name, error = %e, "dial failed");
        return Err(Refusal::Dial(e));
    }
    Ok(Dial {
        node,
        host,
        pool: None,
    })
}

/// A pool dial: the wait for some tunnel to come up, then the first pick.
async fn dial_pool(
    routes: &Routes,
    host: String,
    settings: &ProxySettings,
    deadline: Instant,
) -> Result<Dial, Refusal> {
    let wait_until = (Instant::now() + settings.wait_for_healthy).min(deadline);
    crate::proxy::healthy::wait_for_pool(routes.nodes(), wait_until).await;
    let mut pool = Pool::new(routes.clone());
    match pool.next() {
        Some(node) => Ok(Dial {
            node,
            host,
            pool: Some(pool),
        }),
        None => {
            let e = pool.exhausted(&host);
            info!(error = %e, "pool dial failed");
            Err(Refusal::Dial(e))
        }
    }
}
