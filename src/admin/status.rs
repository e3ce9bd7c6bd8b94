//! The status document served at `GET /v1/status` and read by
//! `tunneler status` and the tests. One type for every end keeps them in
//! step: a renamed field is a compile error, not a silent `null`.
//!
//! [`StatusView`] builds it from the registry, the source book and the
//! route table, without the lock that orders node-set changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::control::registry::NodeRegistry;
use crate::control::sources::{Source, SourceBook, SourceStatus};
use crate::proxy::SharedRoutes;
use crate::timestamp::rfc3339;
/// A node's state, as the document carries it (the tunnel module itself is
/// private to the crate; clients name the state through here).
pub use crate::tunnel::TunnelState;

/// The whole status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDocument {
    /// Daemon version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The proxy listeners as bound (a `:0` port shows the real port).
    #[serde(default)]
    pub listeners: Vec<String>,
    /// One entry per node, sorted by name.
    pub nodes: Vec<NodeStatus>,
    /// Discovery sources and their health (empty without discovery).
    #[serde(default)]
    pub sources: Vec<SourceStatus>,
    /// Internal IPs that more than one node claims. They are not routed
    /// by IP; their nodes still route by name and pod CIDR. Names (DNS names
    /// two Nodes share) are listed here too, and route to none of them.
    #[serde(default)]
    pub ambiguous_addresses: Vec<AmbiguousAddress>,
}

/// One address claimed by several nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AmbiguousAddress {
    /// The address, in canonical form (IPv4-mapped IPv6 as IPv4), or a
    /// name (lowercase, no trailing dot).
    pub address: String,
    /// The nodes that claim it, sorted.
    pub nodes: Vec<String>,
}

/// One node's tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Where the node came from: config, api, file or kubernetes.
    #[serde(default)]
    pub source: Option<Source>,
    /// Node name.
    pub name: String,
    /// SSH endpoint, `host:port`.
    pub address: String,
    /// connecting, healthy, unhealthy, draining, backoff or rejected.
    pub state: TunnelState,
    /// When the current state was entered (RFC 3339, UTC).
    pub since: String,
    /// The most recent failure, if any.
    pub last_error: Option<String>,
    /// Established sessions that were lost since start.
    pub reconnects: u64,
    /// Streams open now.
    pub active_streams: u64,
    /// Streams opened since start.
    pub total_streams: u64,
    /// Bytes node → clients.
    pub bytes_in: u64,
    /// Bytes clients → node.
    pub bytes_out: u64,
    /// Round trip of the last keepalive ping, in milliseconds (null when
    /// unknown, e.g. while not connected).
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// When the next connect attempt is due (RFC 3339; null unless in
    /// backoff or rejected).
    #[serde(default)]
    pub next_retry: Option<String>,
    /// Connects refused since start because the node presented a host key
    /// other than the one known_hosts lists for it.
    #[serde(default)]
    pub host_key_mismatches: u64,
    /// SSH sessions up now, extra sessions included.
    #[serde(default)]
    pub sessions: u64,
    /// Sessions held now by a slow reader's backpressure (or with a
    /// stream over its slow watermark); new streams avoid them.
    #[serde(default)]
    pub congested_sessions: u64,
    /// Seconds sessions of this node spent held by backpressure since
    /// start, holds in progress included.
    #[serde(default)]
    pub blocked_seconds: f64,
    /// Streams whose client fell behind by half the per-stream limit,
    /// since start (they were slowed, not reset).
    #[serde(default)]
    pub streams_slowed: u64,
    /// The SSH window of the node's sessions, sized to its link at
    /// connect (the largest, with several up; 0 while none is).
    #[serde(default)]
    pub window_bytes: u64,
    /// The shard (thread) that runs the node's sessions and streams; it
    /// keeps it for its whole life.
    #[serde(default)]
    pub shard: Option<usize>,
}

impl StatusDocument {
    /// True when every node is healthy (vacuously true with no nodes).
    pub fn all_healthy(&self) -> bool {
        self.nodes.iter().all(|n| n.state == TunnelState::Healthy)
    }

    /// The human table printed by `tunneler status`.
    pub fn table(&self) -> String {
        let headers = [
            "NAME",
            "ADDRESS",
            "STATE",
            "SINCE",
            "SHARD",
            "STREAMS",
            "RTT",
            "LAST ERROR",
        ];
        // Every text that a node may have written goes through
        // escape_control again here: the document may come from a daemon
        // of another version.
        let esc = |s: &str| crate::text::escape_control(s).into_owned();
        let rows: Vec<[String; 8]> = self
            .nodes
            .iter()
            .map(|n| {
                [
                    esc(&n.name),
                    esc(&n.address),
                    n.state.to_string(),
                    esc(&n.since),
                    n.shard.map_or_else(|| "-".into(), |s| s.to_string()),
                    format!("{}/{}", n.active_streams, n.total_streams),
                    n.rtt_ms.map_or_else(|| "-".into(), rtt),
                    n.last_error.as_deref().map_or_else(|| "-".into(), esc),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for r in &rows {
            for (i, c) in r.iter().enumerate().take(7) {
                widths[i] = widths[i].max(c.len());
            }
        }
        let mut out = String::new();
        let line = |cells: [&str; 8], out: &mut String| {
            for (i, c) in cells.iter().enumerate() {
                if i < 7 {
                    out.push_str(&format!("{c:<w$}  ", w = widths[i]));
                } else {
                    out.push_str(c);
                }
            }
            out.push('\n');
        };
        line(headers, &mut out);
        for r in &rows {
            line(
                [&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7]].map(|s| s.as_str()),
                &mut out,
            );
        }
        if self.nodes.is_empty() {
            out.push_str("(no nodes configured)\n");
        }
        for src in &self.sources {
            if let Some(e) = &src.last_error {
                out.push_str(&format!(
                    "discovery {}: FAILING ({}); keeping the last good set of {} node(s)\n",
                    src.source,
                    esc(e),
                    src.nodes
                ));
            }
            for r in &src.rejected {
                let what = if r.kept {
                    "REJECTED, keeping its last good config"
                } else {
                    "REJECTED, not routed"
                };
                out.push_str(&format!(
                    "discovery {}: node \"{}\" {what}: {}\n",
                    src.source,
                    esc(&r.name),
                    esc(&r.reason)
                ));
            }
        }
        for a in &self.ambiguous_addresses {
            out.push_str(&format!(
                "address {} is AMBIGUOUS (claimed by {}): not routed by IP\n",
                esc(&a.address),
                esc(&a.nodes.join(", "))
            ));
        }
        out
    }
}

/// A round trip for the table: `0.31ms`, `42ms`, `1.2s`.
fn rtt(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

/// What the status document is built from: narrow, read-only handles.
pub struct StatusView {
    started: Instant,
    listeners: Vec<String>,
    registry: Arc<NodeRegistry>,
    sources: Arc<SourceBook>,
    routes: SharedRoutes,
}

impl StatusView {
    /// A view over the live state; `listeners` as bound.
    pub fn new(
        listeners: Vec<String>,
        registry: Arc<NodeRegistry>,
        sources: Arc<SourceBook>,
        routes: SharedRoutes,
    ) -> StatusView {
        StatusView {
            started: Instant::now(),
            listeners,
            registry,
            sources,
            routes,
        }
    }

    /// The status document for `GET /v1/status`.
    pub fn document(&self) -> StatusDocument {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let nodes = self
            .registry
            .snapshot()
            .values()
            .map(|e| {
                let t = &e.tunnel;
                let s = t.state();
                let c = &t.counters;
                let g = t.congestion();
                NodeStatus {
                    source: Some(e.source),
                    name: t.node.name.clone(),
                    address: t.node.endpoint(),
                    state: s.state,
                    since: rfc3339(s.since),
                    last_error: s
                        .last_error
                        .map(|e| crate::text::escape_control(&e.to_string()).into_owned()),
                    reconnects: ld(&c.reconnects),
                    active_streams: ld(&c.active_streams),
                    total_streams: ld(&c.total_streams),
                    bytes_in: ld(&c.bytes_in),
                    bytes_out: ld(&c.bytes_out),
                    rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    next_retry: s.next_retry.map(rfc3339),
                    host_key_mismatches: ld(&c.host_key_mismatches),
                    sessions: g.sessions as u64,
                    congested_sessions: g.congested_sessions as u64,
                    blocked_seconds: g.blocked_seconds,
                    streams_slowed: g.streams_slowed,
                    window_bytes: g.window_bytes,
                    shard: Some(t.shard().id()),
                }
            })
            .collect();
        StatusDocument {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            listeners: self.listeners.clone(),
            nodes,
            sources: self
                .sources
                .snapshot()
                .into_iter()
                .map(|mut src| {
                    src.last_error = src
                        .last_error
                        .map(|e| crate::text::escape_control(&e).into_owned());
                    src
                })
                .collect(),
            ambiguous_addresses: {
                // Shared names are listed beside shared IPs: both answer
                // forbidden for the same reason.
                let routes = self.routes.load();
                routes
                    .ambiguous()
                    .iter()
                    .map(|(ip, nodes)| AmbiguousAddress {
                        address: ip.to_string(),
                        nodes: nodes.clone(),
                    })
                    .chain(
                        routes
                            .ambiguous_names()
                            .iter()
                            .map(|(name, nodes)| AmbiguousAddress {
                                address: name.clone(),
                                nodes: nodes.clone(),
                            }),
                    )
                    .collect()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's disconnect text, a Node's name and a rejection reason with
    /// terminal escapes print as visible escapes, never as raw bytes.
    #[test]
    fn the_table_escapes_control_characters_from_nodes() {
        let doc: StatusDocument = serde_json::from_value(serde_json::json!({
            "version": "x", "uptime_seconds": 1.0,
            "nodes": [{
                "name": "node-1", "address": "10.0.0.1:22", "state": "backoff",
                "since": "2026-01-01T00:00:00Z",
                "last_error": "SSH session: node sent disconnect: ByApplication bye\u{1b}[2J\u{1b}]0;owned\u{7}\r",
                "reconnects": 0, "active_streams": 0, "total_streams": 0,
                "bytes_in": 0, "bytes_out": 0, "rtt_ms": null, "next_retry": null,
                "host_key_mismatches": 0
            }],
            "sources": [{
                "source": "file", "last_success": null,
                "last_error": "nodes.json: bad\u{1b}[31m", "nodes": 0,
                "rejected": [{"name": "evil\u{1b}[1m", "reason": "name: \u{9b}x", "kept": false}]
            }]
        }))
        .unwrap();
        let table = doc.table();
        assert!(
            !table.contains('\u{1b}') && !table.contains('\u{9b}') && !table.contains('\r'),
            "{table:?}"
        );
        assert!(
            table.contains("bye\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\r"),
            "{table}"
        );
        assert!(
            table.contains("node \"evil\\u{1b}[1m\" REJECTED, not routed: name: \\u{9b}x"),
            "{table}"
        );
        assert!(
            table.contains("FAILING (nodes.json: bad\\u{1b}[31m)"),
            "{table}"
        );
        assert!(table.lines().next().unwrap().contains("  RTT  "), "{table}");
    }

    #[test]
    fn round_trips_print_short() {
        assert_eq!(rtt(0.3141), "0.31ms");
        assert_eq!(rtt(41.6), "42ms");
        assert_eq!(rtt(1234.0), "1.2s");
    }
}
