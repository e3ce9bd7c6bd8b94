//! The stream list served at `GET /v1/streams` and printed by `tunneler
//! streams`: every open stream with its target, node, session, age, bytes
//! each way, bytes queued for its client, and whether its drain holds its
//! SSH session (and since when). A held stream parks every other stream
//! of its session (see docs/flow-control.md), so this is where an operator
//! finds the client that holds a node.
//!
//! The answer is bounded (`limit`, at most [`MAX_LIMIT`]) and sorted, so a
//! daemon with a hundred thousand streams answers with the ones that
//! matter first: the oldest (`sort=age`, the default) or the ones with the
//! most bytes queued (`sort=buffered`, held streams first). `total` says
//! how many matched before the limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::proxy::live::{LiveStream, LiveStreams};
use crate::timestamp::rfc3339;

/// Streams listed when the request sets no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// The most streams one answer lists.
pub const MAX_LIMIT: usize = 10_000;

/// The order of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamSort {
    /// Oldest first.
    #[default]
    Age,
    /// Held streams first, then by bytes queued for the client, most first.
    Buffered,
}

impl StreamSort {
    /// The wire name (`sort=` in the query).
    pub fn as_str(self) -> &'static str {
        match self {
            StreamSort::Age => "age",
            StreamSort::Buffered => "buffered",
        }
    }

    /// Parses a wire name.
    pub fn from_name(s: &str) -> Option<StreamSort> {
        match s {
            "age" => Some(StreamSort::Age),
            "buffered" => Some(StreamSort::Buffered),
            _ => None,
        }
    }
}

/// What `GET /v1/streams` is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamsQuery {
    /// Only this node's streams.
    pub node: Option<String>,
    /// The order.
    pub sort: StreamSort,
    /// At most this many (clamped to 1..=[`MAX_LIMIT`]); `None` is
    /// [`DEFAULT_LIMIT`].
    pub limit: Option<usize>,
}

/// The answer of `GET /v1/streams`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamsDocument {
    /// Streams that matched (before the limit).
    pub total: usize,
    /// The order of `streams`.
    pub sort: StreamSort,
    /// The limit that applied.
    pub limit: usize,
    /// The streams, at most `limit`.
    pub streams: Vec<StreamStatus>,
}

/// One open stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamStatus {
    /// The stream id (the access record's `stream`).
    pub id: u64,
    /// The CONNECT target.
    pub target: String,
    /// The node carrying it.
    pub node: String,
    /// The SSH session carrying it (the access record's `session`).
    pub session: u64,
    /// The listener it came in on.
    pub listener: String,
    /// Its client: `uid:N` (Unix socket), `cert:NAME` (mTLS) or an address.
    pub client: String,
    /// When its dial began (RFC 3339, UTC).
    pub started: String,
    /// Seconds since then.
    pub age_seconds: f64,
    /// Bytes node → client so far.
    pub bytes_to_client: u64,
    /// Bytes client → node so far.
    pub bytes_to_node: u64,
    /// Bytes queued for the client now (read from the node, not yet
    /// taken by the client).
    pub buffered_bytes: u64,
    /// True while the stream's drain waits for its client: it holds its
    /// SSH session, and every other stream of that session waits too.
    pub holds_session: bool,
    /// When the current hold began (RFC 3339); null while not held.
    pub held_since: Option<String>,
    /// Seconds held in all, the current hold included.
    pub held_seconds: f64,
}

fn status(s: &LiveStream) -> StreamStatus {
    let held_since = s.stats.held_since();
    let esc = |t: &str| crate::text::escape_control(t).into_owned();
    StreamStatus {
        id: s.id,
        target: esc(&s.target),
        node: esc(&s.node),
        session: s.session,
        listener: esc(&s.listener),
        client: esc(&s.client),
        started: rfc3339(s.started_at),
        age_seconds: s.started.elapsed().as_secs_f64(),
        bytes_to_client: s.stats.to_client.load(Ordering::Relaxed),
        bytes_to_node: s.stats.to_node.load(Ordering::Relaxed),
        buffered_bytes: s.stats.queued() as u64,
        holds_session: held_since.is_some(),
        held_since: held_since.map(rfc3339),
        held_seconds: s.stats.held_for().as_secs_f64(),
    }
}

/// The document for `query` over the live list.
pub fn document(list: &LiveStreams, query: &StreamsQuery) -> StreamsDocument {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut streams: Vec<Arc<LiveStream>> = list.snapshot(query.node.as_deref());
    let total = streams.len();
    let mut rows: Vec<StreamStatus> = match query.sort {
        StreamSort::Age => {
            streams.sort_by_key(|s| (s.started, s.id));
            streams.iter().take(limit).map(|s| status(s)).collect()
        }
        StreamSort::Buffered => {
            let mut rows: Vec<StreamStatus> = streams.iter().map(|s| status(s)).collect();
            rows.sort_by(|a, b| {
                (b.holds_session, b.buffered_bytes)
                    .cmp(&(a.holds_session, a.buffered_bytes))
                    .then(a.id.cmp(&b.id))
            });
            rows.truncate(limit);
            rows
        }
    };
    rows.shrink_to_fit();
    StreamsDocument {
        total,
        sort: query.sort,
        limit,
        streams: rows,
    }
}

/// Bytes for a table: `512`, `1.5K`, `3.2M`, `1.1G`.
fn size(n: u64) -> String {
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, d) in units {
        if n >= d {
            return format!("{:.1}{u}", n as f64 / d as f64);
        }
    }
    n.to_string()
}

/// Seconds for a table: `0.4s`, `75s`, `12m`, `3h`.
fn age(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 600.0 {
        format!("{s:.0}s")
    } else if s < 36_000.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.0}h", s / 3600.0)
    }
}

impl StreamsDocument {
    /// The table `tunneler streams` prints.
    pub fn table(&self) -> String {
        let headers = [
            "ID",
            "NODE",
            "SESSION",
            "TARGET",
            "CLIENT",
            "AGE",
            "TO CLIENT",
            "TO NODE",
            "BUFFERED",
            "HELD",
        ];
        let esc = |s: &str| crate::text::escape_control(s).into_owned();
        let rows: Vec<[String; 10]> = self
            .streams
            .iter()
            .map(|s| {
                [
                    s.id.to_string(),
                    esc(&s.node),
                    s.session.to_string(),
                    esc(&s.target),
                    esc(&s.client),
                    age(s.age_seconds),
                    size(s.bytes_to_client),
                    size(s.bytes_to_node),
                    size(s.buffered_bytes),
                    match &s.held_since {
                        Some(since) => format!("HELD since {}", esc(since)),
                        None if s.held_seconds > 0.0 => format!("no ({:.1}s)", s.held_seconds),
                        None => "no".into(),
                    },
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: Vec<&str>| {
            let last = cells.len() - 1;
            for (i, c) in cells.iter().enumerate() {
                if i < last {
                    out.push_str(&format!("{c:<w$}  ", w = widths[i]));
                } else {
                    out.push_str(c);
                }
            }
            out.push('\n');
        };
        line(headers.to_vec());
        for r in &rows {
            line(r.iter().map(String::as_str).collect());
        }
        if self.total > self.streams.len() {
            out.push_str(&format!(
                "({} of {} streams shown, by {}; --limit N shows more)\n",
                self.streams.len(),
                self.total,
                self.sort.as_str()
            ));
        } else if self.total == 0 {
            out.push_str("(no open streams)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::live::LiveStream;
    use crate::tunnel::stream_stats::StreamStats;
    use std::time::{Duration, Instant, SystemTime};

    fn stream(id: u64, node: &str, age: u64) -> LiveStream {
        LiveStream {
            id,
            target: format!("10.0.0.{id}:10250"),
            node: node.into(),
            session: 7,
            listener: Arc::from("unix:///run/tunneler/egress.sock"),
            client: "uid:0".into(),
            started_at: SystemTime::now() - Duration::from_secs(age),
            started: Instant::now() - Duration::from_secs(age),
            stats: StreamStats::default(),
        }
    }

    #[test]
    fn the_list_is_sorted_bounded_and_filtered() {
        let list = Arc::new(LiveStreams::default());
        let _a = list.insert(stream(1, "n1", 5));
        let b = list.insert(stream(2, "n1", 50));
        let c = list.insert(stream(3, "n2", 20));
        b.stream().stats.queue(10);
        c.stream().stats.queue(1000);
        let _hold = b.stream().stats.hold();
        let ids = |d: &StreamsDocument| d.streams.iter().map(|s| s.id).collect::<Vec<_>>();
        let all = document(&list, &StreamsQuery::default());
        assert_eq!(ids(&all), [2, 3, 1], "oldest first");
        assert_eq!(all.total, 3);
        let by_buf = document(
            &list,
            &StreamsQuery {
                sort: StreamSort::Buffered,
                ..Default::default()
            },
        );
        assert_eq!(ids(&by_buf), [2, 3, 1], "held first, then most queued");
        assert!(by_buf.streams[0].holds_session);
        assert!(by_buf.streams[0].held_since.is_some());
        assert!(!by_buf.streams[1].holds_session);
        let one = document(
            &list,
            &StreamsQuery {
                node: Some("n1".into()),
                limit: Some(1),
                ..Default::default()
            },
        );
        assert_eq!((ids(&one), one.total), (vec![2], 2));
        let table = one.table();
        assert!(table.contains("HELD since"), "{table}");
        assert!(table.contains("(1 of 2 streams shown"), "{table}");
    }

    #[test]
    fn sizes_and_ages_read_short() {
        assert_eq!(size(512), "512");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(3 << 20), "3.0M");
        assert_eq!(age(0.44), "0.4s");
        assert_eq!(age(75.0), "75s");
        assert_eq!(age(720.0), "12m");
    }
}
