//! The streams open right now, for `GET /v1/streams` and `tunneler
//! streams`: the answer to "who is holding node-7's session".
//!
//! A stream enters the list once its 200 is written and leaves it when its
//! relay ends (dropping its [`Listed`] entry). The list is striped by
//! stream id so that shard threads starting and ending streams seldom meet
//! on one lock; a reader takes each stripe once, briefly, and copies out
//! `Arc`s. The figures themselves are the relay's own atomics
//! ([`StreamStats`]), read without any lock of the relay's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::tunnel::stream_stats::StreamStats;

const STRIPES: usize = 16;

/// One open stream.
#[derive(Debug)]
pub struct LiveStream {
    /// The stream id (the access record's `stream`).
    pub id: u64,
    /// The CONNECT target.
    pub target: String,
    /// The node carrying it.
    pub node: String,
    /// The SSH session carrying it.
    pub session: u64,
    /// The listener it came in on.
    pub listener: Arc<str>,
    /// Its client, as [`Client::label`](crate::proxy::access::Client::label).
    pub client: String,
    /// When its dial began, wall clock.
    pub started_at: SystemTime,
    /// The same on the monotonic clock, for its age.
    pub started: Instant,
    /// Bytes each way, bytes queued for its client, its holds.
    pub stats: StreamStats,
}

/// Every open stream.
#[derive(Debug)]
pub struct LiveStreams {
    stripes: [Mutex<HashMap<u64, Arc<LiveStream>>>; STRIPES],
}

impl Default for LiveStreams {
    fn default() -> Self {
        LiveStreams {
            stripes: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// A stream's place in the list; dropping it takes the stream out.
pub struct Listed {
    list: Arc<LiveStreams>,
    stream: Arc<LiveStream>,
}

impl Listed {
    /// The listed stream.
    pub fn stream(&self) -> &Arc<LiveStream> {
        &self.stream
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.list.stripe(self.stream.id).remove(&self.stream.id);
    }
}

impl LiveStreams {
    fn stripe(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveStream>>> {
        self.stripes[(id as usize) % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `stream` until the returned entry is dropped.
    pub fn insert(self: &Arc<Self>, stream: LiveStream) -> Listed {
        let stream = Arc::new(stream);
        self.stripe(stream.id).insert(stream.id, stream.clone());
        Listed {
            list: self.clone(),
            stream,
        }
    }

    /// The open streams, of `node` only when given, in no order.
    pub fn snapshot(&self, node: Option<&str>) -> Vec<Arc<LiveStream>> {
        let mut out = Vec::new();
        for s in &self.stripes {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                s.values()
                    .filter(|l| node.is_none_or(|n| l.node == n))
                    .cloned(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(id: u64, node: &str) -> LiveStream {
        LiveStream {
            id,
            target: "10.0.0.1:10250".into(),
            node: node.into(),
            session: 1,
            listener: Arc::from("unix:///x"),
            client: "uid:0".into(),
            started_at: SystemTime::now(),
            started: Instant::now(),
            stats: StreamStats::default(),
        }
    }

    #[test]
    fn a_stream_is_listed_until_its_entry_drops() {
        let list = Arc::new(LiveStreams::default());
        let a = list.insert(stream(1, "n1"));
        let b = list.insert(stream(17, "n2"));
        let c = list.insert(stream(2, "n1"));
        assert_eq!(list.snapshot(None).len(), 3);
        let mut n1: Vec<u64> = list.snapshot(Some("n1")).iter().map(|s| s.id).collect();
        n1.sort();
        assert_eq!(n1, [1, 2]);
        drop(a);
        let ids: Vec<u64> = list.snapshot(Some("n1")).iter().map(|s| s.id).collect();
        assert_eq!(ids, [2]);
        drop((b, c));
        assert!(list.snapshot(None).is_empty());
    }
}
