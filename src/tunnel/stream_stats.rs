//! What one stream's relay shows about itself while it runs: bytes each
//! way, bytes queued for its client, and whether (and since when) its drain
//! waits, which parks the stream's whole SSH session (see `relay`).
//!
//! The relay and the proxy write it with relaxed atomics (one per event
//! they already count); the live-stream list and the access record read
//! it. A lower layer than both, so neither names the other.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// One stream's figures. `Default` is a stream that has moved nothing.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Bytes written to the client (node → client).
    pub to_client: AtomicU64,
    /// Bytes sent to the node (client → node), the bytes the client sent
    /// past its request head included.
    pub to_node: AtomicU64,
    /// Bytes queued for the client now.
    queued: AtomicUsize,
    /// The hold in progress (since when, on both clocks) and the time
    /// spent in finished holds.
    held: Mutex<HeldTime>,
}

#[derive(Debug, Default)]
struct HeldTime {
    since: Option<(Instant, SystemTime)>,
    done: Duration,
}

/// A hold of one stream's drain, ended on drop.
pub struct StreamHold<'a>(&'a StreamStats);

impl Drop for StreamHold<'_> {
    fn drop(&mut self) {
        let mut h = self.0.lock();
        if let Some((t, _)) = h.since.take() {
            h.done += t.elapsed();
        }
    }
}

impl StreamStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldTime> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` more bytes queued for the client.
    pub fn queue(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` queued bytes taken by the client (or dropped with the stream).
    pub fn dequeue(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes queued for the client now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The stream's drain starts to wait: it holds its session until the
    /// returned guard is dropped. A hold already in progress is kept.
    pub fn hold(&self) -> StreamHold<'_> {
        let mut h = self.lock();
        if h.since.is_none() {
            h.since = Some((Instant::now(), SystemTime::now()));
        }
        StreamHold(self)
    }

    /// When the hold in progress began; `None` while the stream flows.
    pub fn held_since(&self) -> Option<SystemTime> {
        self.lock().since.map(|(_, s)| s)
    }

    /// The time the stream spent held so far, the hold in progress included.
    pub fn held_for(&self) -> Duration {
        let h = self.lock();
        h.done + h.since.map(|(t, _)| t.elapsed()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_is_shown_while_it_lasts_and_counted_after() {
        let s = StreamStats::default();
        assert_eq!(s.held_since(), None);
        {
            let _h = s.hold();
            assert!(s.held_since().is_some());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.held_since(), None);
        let after = s.held_for();
        assert!(after >= Duration::from_millis(20), "{after:?}");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.held_for(), after, "a finished hold does not grow");
        s.queue(100);
        s.dequeue(40);
        assert_eq!(s.queued(), 60);
    }
}
