//! Prometheus metrics, served at `GET /metrics` on the admin socket and on
//! the optional `[admin] metrics_listen` TCP address.
//!
//! Per-node figures are read from the tunnels' own counters at scrape time
//! by a [`Collector`], so a removed node's series disappear with it and the
//! hot path pays nothing beyond the atomic counters it keeps anyway. Dial
//! outcomes are recorded by the proxy as they happen.
//!
//! `collector` holds the families read at scrape time, one `table` row
//! per family; `classic` turns the OpenMetrics text into the classic format.

mod classic;
mod collector;
mod table;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::tunnel::NodeTunnel;

use classic::openmetrics_to_classic;
use collector::NodeCollector;

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
