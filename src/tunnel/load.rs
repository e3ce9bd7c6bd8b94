//! What a node's sessions and streams count, lock-free: each session's
//! load (the bytes its relays hold, whether our backpressure holds the
//! session itself), the node's congestion figures and its counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{ByFailClass, TunnelError};
use crate::tunnel::relay;

/// What the relays of one SSH session hold, and whether they hold the
/// session itself: russh's only backpressure parks the whole session loop
/// while one of its streams is not drained (see `relay`). Placement reads
/// it to keep new streams off a congested session.
#[derive(Debug, Default)]
pub struct SessionLoad {
    /// Bytes queued for this session's clients.
    pub backlog: AtomicUsize,
    /// Of those, the bytes counted in the session's floor (see
    /// `relay::RelayBudget`) ...
    pub floor_used: AtomicUsize,
    /// ... and those held of the shared budget.
    pub pooled: AtomicUsize,
    /// Relays running on the session now.
    pub relays: AtomicUsize,
    /// Streams over their slow watermark now.
    pub slow: AtomicUsize,
    /// Drains waiting now, and since when at least one has.
    pub(super) held: Mutex<(usize, Option<Instant>)>,
    /// Notified when a hold begins, so that the session's watchdog sleeps
    /// until then instead of waking on a timer for every idle session.
    pub(super) hold_started: Notify,
    /// Cancelled when the session is torn down: its relays stop, so a
    /// disconnect never waits on a loop one of them parks.
    pub(super) closing: CancellationToken,
}

impl SessionLoad {
    /// True while a stream is slow or a drain holds the session: new
    /// streams go elsewhere if they can.
    pub fn congested(&self) -> bool {
        self.slow.load(Ordering::Relaxed) > 0 || self.is_held()
    }

    /// True while at least one drain waits, i.e. the session loop is (or
    /// is about to be) parked by our own backpressure.
    pub fn is_held(&self) -> bool {
        self.lock().0 > 0
    }

    /// A drain starts waiting.
    pub fn hold_begin(&self) {
        let mut h = self.lock();
        h.0 += 1;
        if h.0 == 1 {
            h.1 = Some(Instant::now());
            // Stores a permit if the watchdog is not waiting yet.
            self.hold_started.notify_one();
        }
    }

    /// A drain stops waiting; the held time goes to the node's counters.
    pub fn hold_end(&self, counters: &Counters) {
        let mut h = self.lock();
        h.0 = h.0.saturating_sub(1);
        if h.0 == 0 {
            if let Some(since) = h.1.take() {
                counters
                    .blocked_ns
                    .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    /// How long the current hold has lasted (none while not held).
    pub(super) fn held_for(&self) -> Duration {
        self.lock().1.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The session's teardown token.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<Instant>)> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A node's congestion, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Congestion {
    /// SSH sessions up now (supervised and extra).
    pub sessions: usize,
    /// Of those, congested now.
    pub congested_sessions: usize,
    /// Total time sessions spent held by our backpressure, ongoing holds
    /// included.
    pub blocked_seconds: f64,
    /// Streams that ever went over their slow watermark.
    pub streams_slowed: u64,
    /// The largest SSH window of the node's live sessions (0: none up).
    pub window_bytes: u64,
}

/// Per-node counters, updated lock-free by streams.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams open right now.
    pub active_streams: AtomicU64,
    /// Streams opened since start.
    pub total_streams: AtomicU64,
    /// Bytes from the node to clients.
    pub bytes_in: AtomicU64,
    /// Bytes from clients to the node.
    pub bytes_out: AtomicU64,
    /// Sessions that ended after being established.
    pub reconnects: AtomicU64,
    /// Connects refused because the node presented a key other than the
    /// one known_hosts lists for it (`tunneler_host_key_mismatch_total`).
    pub host_key_mismatches: AtomicU64,
    /// Sessions established (including make-before-break replacements).
    pub opens: AtomicU64,
    /// Failed session attempts, by class.
    pub open_failures: ByFailClass<AtomicU64>,
    /// Nanoseconds sessions spent held by a slow reader's backpressure
    /// (finished holds).
    pub blocked_ns: AtomicU64,
    /// Streams whose client fell behind by half the per-stream limit.
    pub streams_slowed: AtomicU64,
    /// Streams ended, by how (indexed as [`relay::StreamEnd::ALL`]).
    pub ended: [AtomicU64; relay::StreamEnd::ALL.len()],
    /// Channels whose open the node confirmed after its dial had given up
    /// (timed out, or its waiter went away), closed on arrival.
    pub late_opens_closed: AtomicU64,
    /// Channel opens abandoned by their dial and not answered yet. They
    /// are not in `active_streams`, but count against the stream cap.
    pub abandoned_opens: AtomicU64,
}

impl Counters {
    pub(super) fn count_attempt<T>(&self, r: &Result<T, TunnelError>) {
        match r {
            Ok(_) => {
                self.opens.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.open_failures[e.class()].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
