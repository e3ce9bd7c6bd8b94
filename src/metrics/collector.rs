//! The scrape-time collector: the tables of families (see `table`) read
//! from the tunnels, the shards, the node states, the discovery sources and
//! the relay budget. Each node's state and congestion are read once per
//! scrape, so all its families agree with each other.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;

use super::table::{encode_scalars, Family, Read, Table, Value};
use super::{runtime_tasks, DialMetrics, DiscoveryRejected, StreamHistograms, TunnelSource};
use crate::shard::ShardLoad;
use crate::tunnel::relay::{BudgetStats, StreamEnd};
use crate::tunnel::{Congestion, NodeTunnel, StateInfo, TunnelState};

/// What the registry scrapes: the tunnels and every figure read at scrape
/// time.
pub(super) struct NodeCollector {
    pub(super) tunnels: TunnelSource,
    pub(super) dial: Arc<DialMetrics>,
    pub(super) shards: Option<Arc<crate::shard::Shards>>,
    pub(super) runtimes: Vec<tokio::runtime::Handle>,
    pub(super) discovery_last_success: Arc<AtomicI64>,
    pub(super) discovery_errors: Arc<AtomicU64>,
    pub(super) discovery_rejected: DiscoveryRejected,
    pub(super) discovery_failing: DiscoveryRejected,
    pub(super) ambiguous_addresses: Arc<AtomicU64>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

/// One node as a scrape sees it: its state and congestion read once.
struct NodeView {
    tunnel: Arc<NodeTunnel>,
    state: StateInfo,
    congestion: Congestion,
}

impl NodeView {
    fn new(tunnel: &Arc<NodeTunnel>) -> NodeView {
        NodeView {
            tunnel: tunnel.clone(),
            state: tunnel.state(),
            congestion: tunnel.congestion(),
        }
    }

    fn ld(&self, pick: fn(&crate::tunnel::Counters) -> &AtomicU64) -> u64 {
        pick(&self.tunnel.counters).load(Ordering::Relaxed)
    }
}

/// The per-node families, by `node`.
static NODES: Table<NodeView> = Table {
    label: "node",
    key: |v| v.tunnel.node.name.clone(),
    families: &[
        Family {
            name: "tunneler_tunnel_up",
            help: "1 when the node's SSH session is established",
            read: Read::Gauge(|v| if v.state.state.is_connected() { 1.0 } else { 0.0 }),
        },
        Family {
            name: "tunneler_ssh_tunnel_open",
            help: "SSH sessions established (Kubernetes' ssh_tunnel_open_count)",
            read: Read::Counter(|v| v.ld(|c| &c.opens)),
        },
        Family {
            name: "tunneler_reconnects",
            help: "Established SSH sessions that were lost (status: reconnects); planned replacements are not counted",
            read: Read::Counter(|v| v.ld(|c| &c.reconnects)),
        },
        Family {
            name: "tunneler_ssh_tunnel_open_fail",
            help: "SSH session attempts that failed, by reason",
            read: Read::CountersBy("reason", |v| {
                v.tunnel
                    .counters
                    .open_failures
                    .iter()
                    .map(|(_, reason, n)| (reason, n.load(Ordering::Relaxed)))
                    .collect()
            }),
        },
        Family {
            name: "tunneler_host_key_mismatch",
            help: "Connects refused because the node presented a host key other than the one known_hosts lists for it",
            read: Read::Counter(|v| v.ld(|c| &c.host_key_mismatches)),
        },
        Family {
            name: "tunneler_active_streams",
            help: "Streams open now",
            read: Read::Gauge(|v| v.ld(|c| &c.active_streams) as f64),
        },
        Family {
            name: "tunneler_stream_bytes",
            help: "Bytes relayed; in = node to client, out = client to node",
            read: Read::CountersBy("direction", |v| {
                vec![
                    ("in", v.ld(|c| &c.bytes_in)),
                    ("out", v.ld(|c| &c.bytes_out)),
                ]
            }),
        },
        Family {
            name: "tunneler_keepalive_rtt_seconds",
            help: "Round trip of the last keepalive ping",
            read: Read::GaugeIf(|v| v.state.rtt.map(|r| r.as_secs_f64())),
        },
        Family {
            name: "tunneler_ssh_sessions",
            help: "SSH sessions up now, extra sessions opened for congestion included",
            read: Read::Gauge(|v| v.congestion.sessions as f64),
        },
        Family {
            name: "tunneler_congested_sessions",
            help: "SSH sessions a slow reader holds (or is about to hold) now; new streams avoid them",
            read: Read::Gauge(|v| v.congestion.congested_sessions as f64),
        },
        Family {
            name: "tunneler_blocked_seconds",
            help: "Seconds SSH sessions spent held by a slow reader's backpressure, holds in progress included",
            read: Read::Seconds(|v| v.congestion.blocked_seconds),
        },
        Family {
            name: "tunneler_streams_slowed",
            help: "Streams whose client fell behind by half proxy.relay_stream_buffer_limit (slowed, never reset)",
            read: Read::Counter(|v| v.congestion.streams_slowed),
        },
        Family {
            name: "tunneler_ssh_window_bytes",
            help: "The SSH window of the node's sessions, one bandwidth-delay product of its link within ssh.window_min..ssh.window_max (the largest, with several up)",
            read: Read::GaugeIf(|v| {
                (v.congestion.sessions > 0).then_some(v.congestion.window_bytes as f64)
            }),
        },
        Family {
            name: "tunneler_streams_ended",
            help: "Streams ended, by how: node_closed and client_closed end cleanly; session_lost, drain_cut, shutdown_cut, error and reader_stopped are cut, and the client's connection is reset",
            read: Read::CountersBy("how", |v| {
                StreamEnd::ALL
                    .iter()
                    .map(|(how, name)| {
                        (*name, v.tunnel.counters.ended[how.index()].load(Ordering::Relaxed))
                    })
                    .collect()
            }),
        },
        Family {
            name: "tunneler_late_channel_opens_closed",
            help: "Channels the node confirmed after their dial had given up (dial timeout, or the client left), closed on arrival",
            read: Read::Counter(|v| v.ld(|c| &c.late_opens_closed)),
        },
        Family {
            name: "tunneler_abandoned_channel_opens",
            help: "Channel opens given up by their dial and not answered by the node yet; each counts against proxy.max_streams_per_node",
            read: Read::Gauge(|v| v.ld(|c| &c.abandoned_opens) as f64),
        },
        Family {
            name: "tunneler_node_shard",
            help: "The shard (thread) that runs the node's sessions and streams",
            read: Read::Gauge(|v| v.tunnel.shard().id() as f64),
        },
    ],
};

/// Per shard: its nodes and the streams its thread relays.
static SHARDS: Table<ShardLoad> = Table {
    label: "shard",
    key: |l| l.shard.to_string(),
    families: &[
        Family {
            name: "tunneler_shard_nodes",
            help: "Nodes placed on the shard",
            read: Read::Gauge(|l| l.nodes as f64),
        },
        Family {
            name: "tunneler_shard_active_streams",
            help: "Client streams the shard's thread relays now",
            read: Read::Gauge(|l| l.active_streams as f64),
        },
        Family {
            name: "tunneler_shard_streams",
            help: "Client streams the shard's thread relayed since start",
            read: Read::Counter(|l| l.total_streams),
        },
        Family {
            name: "tunneler_shard_moved_in",
            help: "Client connections accepted on another shard and moved to this one, the node's (one hand-off each; the others never change thread)",
            read: Read::Counter(|l| l.moved_in),
        },
    ],
};

/// Nodes by state.
static STATES: Table<(TunnelState, u64)> = Table {
    label: "state",
    key: |(s, _)| s.as_str().to_string(),
    families: &[Family {
        name: "tunneler_nodes",
        help: "Nodes by state",
        read: Read::Gauge(|(_, n)| *n as f64),
    }],
};

/// Rejected Nodes by discovery source.
static REJECTED: Table<(&'static str, u64)> = Table {
    label: "source",
    key: |(src, _)| src.to_string(),
    families: &[Family {
        name: "tunneler_discovery_rejected_nodes",
        help:
            "Discovered Nodes rejected now (left out, or kept at their last good config), by source",
        read: Read::Gauge(|(_, n)| *n as f64),
    }],
};

/// Failing discovery sources.
static FAILING: Table<(&'static str, u64)> = Table {
    label: "source",
    key: |(src, _)| src.to_string(),
    families: &[Family {
        name: "tunneler_discovery_source_failing",
        help: "1 while a discovery source's last attempt failed (its last good node set stays), 0 once it succeeds",
        read: Read::Gauge(|(_, n)| *n as f64),
    }],
};

/// The items of a table labelled by discovery source.
fn by_source(map: &DiscoveryRejected) -> Vec<(&'static str, u64)> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(src, n)| (*src, *n))
        .collect()
}

/// The relay's buffer budget: what is held for slow clients, the most ever
/// held at once, and the streams reset to keep it.
fn relay_rows(b: BudgetStats) -> [(&'static str, &'static str, Value); 5] {
    [
        (
            "tunneler_relay_buffered_bytes",
            "Bytes queued for clients that read slower than their node sends, all streams: session floors and the shared budget",
            Value::Gauge(b.buffered as f64),
        ),
        (
            "tunneler_relay_budget_used_bytes",
            "Of tunneler_relay_buffered_bytes, those held of the shared budget (past each session's proxy.relay_session_floor)",
            Value::Gauge(b.budget_used as f64),
        ),
        (
            "tunneler_relay_buffered_bytes_peak",
            "The most bytes ever queued for clients at once since start",
            Value::Gauge(b.peak as f64),
        ),
        (
            "tunneler_relay_buffer_budget_bytes",
            "proxy.relay_buffer_budget: the bound on tunneler_relay_budget_used_bytes",
            Value::Gauge(b.limit as f64),
        ),
        (
            "tunneler_relay_budget_held_streams",
            "Streams whose drain waits on proxy.relay_buffer_budget now (their sessions are held)",
            Value::Gauge(b.held as f64),
        ),
    ]
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tunnels = (self.tunnels)();
        let nodes: Vec<NodeView> = tunnels.iter().map(NodeView::new).collect();
        NODES.encode(&mut enc, &nodes)?;
        self.encode_stream_histograms(&mut enc, &tunnels)?;
        if let Some(shards) = &self.shards {
            SHARDS.encode(&mut enc, &shards.loads())?;
            // How often work of a node ran off its shard (must stay 0).
            encode_scalars(
                &mut enc,
                &[(
                    "tunneler_shard_misplaced",
                    "Times work of a node (a task, a relay, a russh callback) ran outside its shard's thread; must stay 0",
                    Value::Counter(crate::shard::misplaced_total()),
                )],
            )?;
        }
        let mut states = TunnelState::ALL.map(|(s, _)| (s, 0u64));
        for v in &nodes {
            if let Some(e) = states.iter_mut().find(|(st, _)| *st == v.state.state) {
                e.1 += 1;
            }
        }
        STATES.encode(&mut enc, &states)?;
        let last = self.discovery_last_success.load(Ordering::Relaxed);
        encode_scalars(
            &mut enc,
            &[
                (
                    "tunneler_discovery_last_success_timestamp_seconds",
                    "Unix time of the last successful node discovery sync (0: never)",
                    Value::Gauge(last as f64),
                ),
                (
                    "tunneler_discovery_errors",
                    "Failed node discovery syncs (the last good node set stays)",
                    Value::Counter(self.discovery_errors.load(Ordering::Relaxed)),
                ),
            ],
        )?;
        REJECTED.encode(&mut enc, &by_source(&self.discovery_rejected))?;
        FAILING.encode(&mut enc, &by_source(&self.discovery_failing))?;
        encode_scalars(
            &mut enc,
            &[
                (
                    "tunneler_ambiguous_addresses",
                    "Internal IPs and node names that more than one node claims; they route to none of them",
                    Value::Gauge(self.ambiguous_addresses.load(Ordering::Relaxed) as f64),
                ),
                (
                    "tunneler_runtime_tasks",
                    "Tokio tasks alive now, summed over the daemon's runtimes; under steady load it stays flat, a slow climb is a task leak",
                    Value::Gauge(runtime_tasks(&self.runtimes) as f64),
                ),
            ],
        )?;
        encode_scalars(
            &mut enc,
            &relay_rows(crate::tunnel::relay::RelayBudget::global().stats()),
        )
    }
}

impl NodeCollector {
    /// The stream histograms of the nodes in `tunnels`; entries of nodes
    /// no longer there are dropped.
    fn encode_stream_histograms(
        &self,
        enc: &mut DescriptorEncoder,
        tunnels: &[Arc<NodeTunnel>],
    ) -> Result<(), std::fmt::Error> {
        let mut m = self.dial.streams.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|name, _| tunnels.iter().any(|t| &t.node.name == name));
        type Pick = fn(&StreamHistograms) -> &Histogram;
        let families: [(&str, &str, Option<&prometheus_client::registry::Unit>, Pick); 3] = [
            (
                "tunneler_stream_duration_seconds",
                "How long ended streams lived, from their CONNECT to their end",
                None,
                |h| &h.duration,
            ),
            (
                "tunneler_stream_to_client_bytes",
                "Bytes each ended stream carried from the node to its client",
                None,
                |h| &h.to_client,
            ),
            (
                "tunneler_stream_to_node_bytes",
                "Bytes each ended stream carried from its client to the node",
                None,
                |h| &h.to_node,
            ),
        ];
        for (name, help, unit, pick) in families {
            let mut f = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
            for (node, h) in m.iter() {
                let labels = [("node", node.as_str())];
                pick(h).encode(f.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
