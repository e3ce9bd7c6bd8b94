//! Prometheus metrics, served at `GET /metrics` on the admin socket and on
//! the optional `[admin] metrics_listen` TCP address.
//!
//! Per-node figures are read from the tunnels' own counters at scrape time
//! by a [`Collector`], so a removed node's series disappear with it and the
//! hot path pays nothing beyond the atomic counters it keeps anyway. Dial
//! outcomes are recorded by the proxy as they happen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::tunnel::relay::StreamEnd;
use crate::tunnel::{NodeTunnel, TunnelState};

/// Dial results, as the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialResult {
    /// 200.
    Ok,
    /// 403.
    Forbidden,
    /// 503.
    NoTunnel,
    /// 502.
    Refused,
    /// 504.
    Timeout,
    /// 400, 405, 431.
    BadRequest,
}

impl DialResult {
    fn label(self) -> &'static str {
        match self {
            DialResult::Ok => "ok",
            DialResult::Forbidden => "forbidden",
            DialResult::NoTunnel => "no_tunnel",
            DialResult::Refused => "refused",
            DialResult::Timeout => "timeout",
            DialResult::BadRequest => "bad_request",
        }
    }
}

type ResultLabels = Vec<(&'static str, &'static str)>;

/// Metrics the proxy records directly.
#[derive(Debug)]
pub struct DialMetrics {
    dials: Family<ResultLabels, Counter>,
    durations: Family<ResultLabels, Histogram>,
    /// Per node: the histograms of its ended streams. Encoded by the
    /// collector for the nodes that exist at scrape time, so a removed
    /// node's series go with it (and its entry is dropped then).
    streams: Mutex<BTreeMap<String, StreamHistograms>>,
}

/// One node's stream histograms.
#[derive(Debug)]
struct StreamHistograms {
    duration: Histogram,
    to_client: Histogram,
    to_node: Histogram,
}

impl StreamHistograms {
    fn new() -> StreamHistograms {
        use prometheus_client::metrics::histogram::exponential_buckets;
        StreamHistograms {
            // 1 ms .. ~2.3 h: a kubelet call takes milliseconds, an
            // exec, attach or port-forward session hours.
            duration: Histogram::new(exponential_buckets(0.001, 4.0, 12)),
            // 64 B .. 64 GiB: a health check to a `kubectl cp` of an image.
            to_client: Histogram::new(exponential_buckets(64.0, 4.0, 16)),
            to_node: Histogram::new(exponential_buckets(64.0, 4.0, 16)),
        }
    }
}

impl DialMetrics {
    /// Records one dial outcome and how long it took.
    pub fn record(&self, result: DialResult, seconds: f64) {
        let labels = vec![("result", result.label())];
        self.dials.get_or_create(&labels).inc();
        self.durations.get_or_create(&labels).observe(seconds);
    }

    /// Records one ended stream of `node`: how long it lived (from its
    /// CONNECT) and the bytes it carried each way.
    pub fn stream_ended(&self, node: &str, seconds: f64, to_client: u64, to_node: u64) {
        let mut m = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(node) {
            m.insert(node.to_string(), StreamHistograms::new());
        }
        if let Some(h) = m.get(node) {
            h.duration.observe(seconds);
            h.to_client.observe(to_client as f64);
            h.to_node.observe(to_node as f64);
        }
    }
}

/// The daemon's whole metric set.
pub struct Metrics {
    registry: Registry,
    /// Dial outcomes.
    pub dial: Arc<DialMetrics>,
    /// Unix time of the last successful discovery sync (0 = never).
    pub discovery_last_success: Arc<AtomicI64>,
    /// Failed discovery syncs.
    pub discovery_errors: Arc<AtomicU64>,
    /// Nodes each discovery source lists that are rejected now.
    pub discovery_rejected: DiscoveryRejected,
    /// 1 for a discovery source whose last attempt failed, 0 once it
    /// succeeds again: the error counter alone cannot tell an alert that a
    /// source is still failing when it fails only on change (a file).
    pub discovery_failing: DiscoveryRejected,
    /// Internal IPs claimed by more than one node now (not routed by IP).
    pub ambiguous_addresses: Arc<AtomicU64>,
}

/// Rejected Nodes now, by discovery source name.
pub type DiscoveryRejected = Arc<Mutex<BTreeMap<&'static str, u64>>>;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Where the collector finds the current tunnels.
pub type TunnelSource = Arc<dyn Fn() -> Vec<Arc<NodeTunnel>> + Send + Sync>;

struct NodeCollector {
    tunnels: TunnelSource,
    dial: Arc<DialMetrics>,
    shards: Option<Arc<crate::shard::Shards>>,
    runtimes: Vec<tokio::runtime::Handle>,
    discovery_last_success: Arc<AtomicI64>,
    discovery_errors: Arc<AtomicU64>,
    discovery_rejected: DiscoveryRejected,
    discovery_failing: DiscoveryRejected,
    ambiguous_addresses: Arc<AtomicU64>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn gauge_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            ConstGauge::new(*v).encode(m)?;
            return Ok(());
        }
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tunnels = (self.tunnels)();
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let node = |t: &NodeTunnel| vec![("node", t.node.name.clone())];
        let mut up = Vec::new();
        let mut opens = Vec::new();
        let mut reconnects = Vec::new();
        let mut fails = Vec::new();
        let mut mismatches = Vec::new();
        let mut active = Vec::new();
        let mut bytes = Vec::new();
        let mut rtt = Vec::new();
        let mut sessions = Vec::new();
        let mut congested = Vec::new();
        let mut blocked: Vec<(Vec<(&str, String)>, f64)> = Vec::new();
        let mut slowed = Vec::new();
        let mut window = Vec::new();
        let mut ended = Vec::new();
        let mut late = Vec::new();
        let mut abandoned = Vec::new();
        let mut shard = Vec::new();
        let mut states = TunnelState::ALL.map(|(s, _)| (s, 0u64));
        for t in &tunnels {
            let s = t.state();
            let c = &t.counters;
            up.push((node(t), if s.state.is_connected() { 1.0 } else { 0.0 }));
            opens.push((node(t), ld(&c.opens)));
            reconnects.push((node(t), ld(&c.reconnects)));
            for (_, reason, n) in c.open_failures.iter() {
                let mut l = node(t);
                l.push(("reason", reason.to_string()));
                fails.push((l, ld(n)));
            }
            mismatches.push((node(t), ld(&c.host_key_mismatches)));
            active.push((node(t), ld(&c.active_streams) as f64));
            for (dir, v) in [("in", ld(&c.bytes_in)), ("out", ld(&c.bytes_out))] {
                let mut l = node(t);
                l.push(("direction", dir.to_string()));
                bytes.push((l, v));
            }
            if let Some(r) = s.rtt {
                rtt.push((node(t), r.as_secs_f64()));
            }
            let g = t.congestion();
            sessions.push((node(t), g.sessions as f64));
            congested.push((node(t), g.congested_sessions as f64));
            blocked.push((node(t), g.blocked_seconds));
            slowed.push((node(t), g.streams_slowed));
            if g.sessions > 0 {
                window.push((node(t), g.window_bytes as f64));
            }
            for (how, name) in StreamEnd::ALL {
                let mut l = node(t);
                l.push(("how", name.to_string()));
                ended.push((l, ld(&c.ended[how.index()])));
            }
            late.push((node(t), ld(&c.late_opens_closed)));
            abandoned.push((node(t), ld(&c.abandoned_opens) as f64));
            shard.push((node(t), t.shard().id() as f64));
            if let Some(e) = states.iter_mut().find(|(st, _)| *st == s.state) {
                e.1 += 1;
            }
        }
        gauge_family(
            &mut enc,
            "tunneler_tunnel_up",
            "1 when the node's SSH session is established",
            &up,
        )?;
        counter_family(
            &mut enc,
            "tunneler_ssh_tunnel_open",
            "SSH sessions established (Kubernetes' ssh_tunnel_open_count)",
            &opens,
        )?;
        counter_family(
            &mut enc,
            "tunneler_reconnects",
            "Established SSH sessions that were lost (status: reconnects); planned replacements are not counted",
            &reconnects,
        )?;
        counter_family(
            &mut enc,
            "tunneler_ssh_tunnel_open_fail",
            "SSH session attempts that failed, by reason",
            &fails,
        )?;
        counter_family(
            &mut enc,
            "tunneler_host_key_mismatch",
            "Connects refused because the node presented a host key other than the one known_hosts lists for it",
            &mismatches,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_active_streams",
            "Streams open now",
            &active,
        )?;
        counter_family(
            &mut enc,
            "tunneler_stream_bytes",
            "Bytes relayed; in = node to client, out = client to node",
            &bytes,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_keepalive_rtt_seconds",
            "Round trip of the last keepalive ping",
            &rtt,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_ssh_sessions",
            "SSH sessions up now, extra sessions opened for congestion included",
            &sessions,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_congested_sessions",
            "SSH sessions a slow reader holds (or is about to hold) now; new streams avoid them",
            &congested,
        )?;
        let mut m = enc.encode_descriptor(
            "tunneler_blocked_seconds",
            "Seconds SSH sessions spent held by a slow reader's backpressure, holds in progress included",
            None,
            MetricType::Counter,
        )?;
        for (labels, v) in &blocked {
            ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
        }
        counter_family(
            &mut enc,
            "tunneler_streams_slowed",
            "Streams whose client fell behind by half proxy.relay_stream_buffer_limit (slowed, never reset)",
            &slowed,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_ssh_window_bytes",
            "The SSH window of the node's sessions, one bandwidth-delay product of its link within ssh.window_min..ssh.window_max (the largest, with several up)",
            &window,
        )?;
        counter_family(
            &mut enc,
            "tunneler_streams_ended",
            "Streams ended, by how: node_closed and client_closed end cleanly; session_lost, drain_cut, shutdown_cut, error and reader_stopped are cut, and the client's connection is reset",
            &ended,
        )?;
        counter_family(
            &mut enc,
            "tunneler_late_channel_opens_closed",
            "Channels the node confirmed after their dial had given up (dial timeout, or the client left), closed on arrival",
            &late,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_abandoned_channel_opens",
            "Channel opens given up by their dial and not answered by the node yet; each counts against proxy.max_streams_per_node",
            &abandoned,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_node_shard",
            "The shard (thread) that runs the node's sessions and streams",
            &shard,
        )?;
        self.encode_stream_histograms(&mut enc, &tunnels)?;
        if let Some(shards) = &self.shards {
            encode_shards(&mut enc, &shards.loads())?;
        }
        let by_state: Vec<(Vec<(&str, String)>, f64)> = states
            .iter()
            .map(|(s, n)| (vec![("state", s.as_str().to_string())], *n as f64))
            .collect();
        gauge_family(&mut enc, "tunneler_nodes", "Nodes by state", &by_state)?;
        let last = self.discovery_last_success.load(Ordering::Relaxed);
        gauge_family(
            &mut enc,
            "tunneler_discovery_last_success_timestamp_seconds",
            "Unix time of the last successful node discovery sync (0: never)",
            &[(Vec::new(), last as f64)],
        )?;
        let m = enc.encode_descriptor(
            "tunneler_discovery_errors",
            "Failed node discovery syncs (the last good node set stays)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.discovery_errors.load(Ordering::Relaxed)).encode(m)?;
        let rejected = by_source(&self.discovery_rejected);
        gauge_family(
            &mut enc,
            "tunneler_discovery_rejected_nodes",
            "Discovered Nodes rejected now (left out, or kept at their last good config), by source",
            &rejected,
        )?;
        let failing = by_source(&self.discovery_failing);
        gauge_family(
            &mut enc,
            "tunneler_discovery_source_failing",
            "1 while a discovery source's last attempt failed (its last good node set stays), 0 once it succeeds",
            &failing,
        )?;
        gauge_family(
            &mut enc,
            "tunneler_ambiguous_addresses",
            "Internal IPs and node names that more than one node claims; they route to none of them",
            &[(
                Vec::new(),
                self.ambiguous_addresses.load(Ordering::Relaxed) as f64,
            )],
        )?;
        gauge_family(
            &mut enc,
            "tunneler_runtime_tasks",
            "Tokio tasks alive now, summed over the daemon's runtimes; under steady load it stays flat, a slow climb is a task leak",
            &[(Vec::new(), runtime_tasks(&self.runtimes) as f64)],
        )?;
        encode_relay(
            &mut enc,
            crate::tunnel::relay::RelayBudget::global().stats(),
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

/// Per shard: its nodes and the streams its thread relays; and how often
/// work of a node ran off its shard (must stay 0).
fn encode_shards(
    enc: &mut DescriptorEncoder,
    loads: &[crate::shard::ShardLoad],
) -> Result<(), std::fmt::Error> {
    let shard = |l: &crate::shard::ShardLoad| vec![("shard", l.shard.to_string())];
    let nodes: Vec<_> = loads.iter().map(|l| (shard(l), l.nodes as f64)).collect();
    gauge_family(
        enc,
        "tunneler_shard_nodes",
        "Nodes placed on the shard",
        &nodes,
    )?;
    let active: Vec<_> = loads
        .iter()
        .map(|l| (shard(l), l.active_streams as f64))
        .collect();
    gauge_family(
        enc,
        "tunneler_shard_active_streams",
        "Client streams the shard's thread relays now",
        &active,
    )?;
    let total: Vec<_> = loads.iter().map(|l| (shard(l), l.total_streams)).collect();
    counter_family(
        enc,
        "tunneler_shard_streams",
        "Client streams the shard's thread relayed since start",
        &total,
    )?;
    let moved: Vec<_> = loads.iter().map(|l| (shard(l), l.moved_in)).collect();
    counter_family(
        enc,
        "tunneler_shard_moved_in",
        "Client connections accepted on another shard and moved to this one, the node's (one hand-off each; the others never change thread)",
        &moved,
    )?;
    let m = enc.encode_descriptor(
        "tunneler_shard_misplaced",
        "Times work of a node (a task, a relay, a russh callback) ran outside its shard's thread; must stay 0",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(crate::shard::misplaced_total()).encode(m)
}

/// Tokio tasks alive now on all of `runtimes`, summed.
///
/// A list rather than one handle because the data plane may run as several
/// runtimes (one per thread), and a leaked task on any of them must show.
/// Read at scrape time from the runtime's own counter, so the hot path pays
/// nothing for it.
pub fn runtime_tasks(runtimes: &[tokio::runtime::Handle]) -> u64 {
    runtimes
        .iter()
        .map(|h| h.metrics().num_alive_tasks() as u64)
        .sum()
}

/// Rows of a gauge labelled by discovery source.
fn by_source(map: &DiscoveryRejected) -> Vec<(Vec<(&'static str, String)>, f64)> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(src, n)| (vec![("source", src.to_string())], *n as f64))
        .collect()
}

/// The relay's buffer budget: what is held for slow clients, the most ever
/// held at once, and the streams reset to keep it.
fn encode_relay(
    enc: &mut DescriptorEncoder,
    b: crate::tunnel::relay::BudgetStats,
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in [
        (
            "tunneler_relay_buffered_bytes",
            "Bytes queued for clients that read slower than their node sends, all streams: session floors and the shared budget",
            b.buffered,
        ),
        (
            "tunneler_relay_budget_used_bytes",
            "Of tunneler_relay_buffered_bytes, those held of the shared budget (past each session's proxy.relay_session_floor)",
            b.budget_used,
        ),
        (
            "tunneler_relay_buffered_bytes_peak",
            "The most bytes ever queued for clients at once since start",
            b.peak,
        ),
        (
            "tunneler_relay_buffer_budget_bytes",
            "proxy.relay_buffer_budget: the bound on tunneler_relay_budget_used_bytes",
            b.limit,
        ),
    ] {
        gauge_family(enc, name, help, &[(Vec::new(), v as f64)])?;
    }
    gauge_family(
        enc,
        "tunneler_relay_budget_held_streams",
        "Streams whose drain waits on proxy.relay_buffer_budget now (their sessions are held)",
        &[(Vec::new(), b.held as f64)],
    )
}

impl Metrics {
    /// Builds the registry. `tunnels` lists the current tunnels at scrape;
    /// `shards`, when given, adds the per-shard series.
    /// `tunneler_runtime_tasks` counts the tasks of the runtime this is
    /// called on (the control runtime) and of every shard's.
    pub fn new(tunnels: TunnelSource, shards: Option<Arc<crate::shard::Shards>>) -> Metrics {
        let mut runtimes: Vec<tokio::runtime::Handle> =
            tokio::runtime::Handle::try_current().into_iter().collect();
        if let Some(s) = &shards {
            runtimes.extend(s.handles());
        }
        Metrics::with_runtimes(tunnels, shards, runtimes)
    }

    /// [`Metrics::new`], with `tunneler_runtime_tasks` summed over
    /// `runtimes`: every runtime the daemon runs tasks on.
    pub fn with_runtimes(
        tunnels: TunnelSource,
        shards: Option<Arc<crate::shard::Shards>>,
        runtimes: Vec<tokio::runtime::Handle>,
    ) -> Metrics {
        let mut registry = Registry::default();
        let dials = Family::<ResultLabels, Counter>::default();
        let durations = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~26 s: a dial is a channel open on a live session
            // (sub-millisecond on a LAN) up to the dial timeout.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 19,
            ))
        });
        registry.register(
            "tunneler_dials",
            "CONNECT requests by result",
            dials.clone(),
        );
        registry.register(
            "tunneler_dial_duration_seconds",
            "CONNECT request to reply, by result",
            durations.clone(),
        );
        let discovery_last_success = Arc::new(AtomicI64::new(0));
        let discovery_errors = Arc::new(AtomicU64::new(0));
        let discovery_rejected = DiscoveryRejected::default();
        let discovery_failing = DiscoveryRejected::default();
        let ambiguous_addresses = Arc::new(AtomicU64::new(0));
        let dial = Arc::new(DialMetrics {
            dials,
            durations,
            streams: Mutex::new(BTreeMap::new()),
        });
        registry.register_collector(Box::new(NodeCollector {
            tunnels,
            dial: dial.clone(),
            shards,
            runtimes,
            discovery_last_success: discovery_last_success.clone(),
            discovery_errors: discovery_errors.clone(),
            discovery_rejected: discovery_rejected.clone(),
            discovery_failing: discovery_failing.clone(),
            ambiguous_addresses: ambiguous_addresses.clone(),
        }));
        Metrics {
            registry,
            dial,
            discovery_last_success,
            discovery_errors,
            discovery_rejected,
            discovery_failing,
            ambiguous_addresses,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The classic Prometheus text format (0.0.4) of the same samples.
    pub fn encode_classic(&self) -> String {
        openmetrics_to_classic(&self.encode())
    }
}

/// OpenMetrics text to the classic text format. They differ, for what we
/// export, only in that OpenMetrics names a counter family without its
/// `_total` suffix in `# HELP`/`# TYPE` (the classic format names the
/// sample), has `# UNIT` lines, and ends with `# EOF`.
fn openmetrics_to_classic(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod classic_tests {
    use super::openmetrics_to_classic;

    #[test]
    fn counters_are_named_by_their_sample_and_eof_goes() {
        let om = "# HELP a_dials Dials.\n# TYPE a_dials counter\na_dials_total{r=\"ok\"} 3\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# UNIT a_s seconds\n# EOF\n";
        assert_eq!(
            openmetrics_to_classic(om),
            "# HELP a_dials_total Dials.\n# TYPE a_dials_total counter\na_dials_total{r=\"ok\"} 3\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Polls `runtime_tasks` (a task is counted out once the runtime has
    /// released it, just after its join handle resolves) until it is `want`.
    async fn settles_at(handles: &[tokio::runtime::Handle], want: u64) -> u64 {
        let mut got = runtime_tasks(handles);
        for _ in 0..200 {
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            got = runtime_tasks(handles);
        }
        got
    }

    #[tokio::test]
    async fn runtime_tasks_counts_live_tasks_and_drops_finished_ones() {
        let here = vec![tokio::runtime::Handle::current()];
        let before = runtime_tasks(&here);
        let gate = Arc::new(tokio::sync::Notify::new());
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { g.notified().await })
            })
            .collect();
        assert_eq!(runtime_tasks(&here), before + 3);
        gate.notify_waiters();
        tokio::task::yield_now().await;
        gate.notify_waiters();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(settles_at(&here, before).await, before);
    }

    #[test]
    fn runtime_tasks_sums_every_runtime_and_reaches_the_exposition() {
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        };
        let (a, b) = (rt(), rt());
        // Spawned but never driven: alive until their runtime is dropped.
        for _ in 0..2 {
            a.spawn(std::future::pending::<()>());
        }
        for _ in 0..4 {
            b.spawn(std::future::pending::<()>());
        }
        let both = vec![a.handle().clone(), b.handle().clone()];
        assert_eq!(runtime_tasks(&both[..1]), 2);
        assert_eq!(runtime_tasks(&both), 6);

        let m = Metrics::with_runtimes(Arc::new(Vec::new), None, both);
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("tunneler_runtime_tasks "))
            .unwrap_or_else(|| panic!("no tunneler_runtime_tasks in {text}"));
        assert_eq!(line, "tunneler_runtime_tasks 6.0", "{text}");
    }
}
