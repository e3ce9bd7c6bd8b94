//! Relaying one CONNECT stream over one SSH channel.
//!
//! # Why the node→client side is a buffer with a limit
//!
//! russh's session loop hands each channel its data with a bounded
//! `send(..).await`, and re-opens the SSH window when data *arrives*, not
//! when we read it. If a relay stopped reading its channel because its client
//! stopped reading, the session loop would block on that one send and freeze
//! every other stream on the connection, keepalives included.
//!
//! So the relay always drains its channel at once into a per-stream queue and
//! writes the queue to the client as fast as the client takes it. Every byte
//! is counted against the [`RelayBudget`] *before* it is queued, so the sum
//! of bytes queued for clients never exceeds the budget, at any moment. A
//! stream is reset (channel closed, client socket closed), and only that
//! stream, when
//! - its client has taken nothing for `stall_timeout` while more than
//!   `stall_floor` waits for it ([`ResetReason::Stalled`]); checked on every
//!   arrival and by a timer, so also when the node has gone quiet;
//! - more than `stream_buffer_limit` would wait, even though the client is
//!   reading: a consumer persistently slower than its producer
//!   ([`ResetReason::TooSlow`]);
//! - the budget is full and it is the stream whose client went longest
//!   without reading ([`ResetReason::Budget`]).
//!
//! # Who goes first when the budget is full
//!
//! A stream's *last progress* is the last moment its client took bytes (the
//! client socket accepted a write) or its queue went from empty to
//! non-empty (nothing was owed before, so it cannot have been behind). A
//! stream is *actively draining* when its last progress lies within
//! `stall_timeout`. That window is the one the stall rule already uses to
//! call a client stopped, so "stopped" means one thing in both rules; it is
//! measured on the client side, so a fast producer never makes a slow but
//! reading client look idle; and any client that reads at all, even in
//! bursts a second apart, stays inside it.
//!
//! When a byte would not fit, the streams holding bytes are reset in order
//! of last progress, oldest first, until it fits, whatever their size. A
//! parked client that holds just under `stall_floor` thus keeps its bytes
//! only while nobody else needs the room: it costs nothing then, and under
//! pressure it is the first to go. Streams that are not draining always
//! come before any stream that is, so a client reading steadily is never
//! reset while a parked one holds memory. Only when every holder is
//! draining (the budget is smaller than what reading clients need at once)
//! are draining streams reset, in the same order; the log says so, and the
//! budget should be raised.
//!
//! A reset stream's bytes leave the account at once, and its buffers are
//! freed as soon as its task next runs (its stop token is cancelled).
//!
//! A client that reads a little slower than the node sends (a busy
//! apiserver, a 2-core box) thus keeps its stream up to
//! `stream_buffer_limit` behind. This is the price of russh's missing
//! per-channel flow control: it re-opens the window on arrival, so the only
//! alternatives are blocking the whole session (head-of-line for every
//! neighbour) or unbounded memory.
//!
//! The client→node side needs no such care: a channel whose remote window is
//! exhausted only blocks its own writer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::config::RelayLimits;
use crate::tunnel::Counters;

/// Why the relay reset a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Its client took nothing for `stall_timeout` with more than
    /// `stall_floor` waiting.
    Stalled,
    /// More than `stream_buffer_limit` would wait for its client.
    TooSlow,
    /// The global budget was full and its client had gone longest without
    /// reading.
    Budget,
}

impl ResetReason {
    /// Every reason, in the order of [`BudgetStats::resets`].
    pub const ALL: [ResetReason; 3] = [
        ResetReason::Stalled,
        ResetReason::TooSlow,
        ResetReason::Budget,
    ];

    /// The name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Stalled => "stalled",
            ResetReason::TooSlow => "too_slow",
            ResetReason::Budget => "budget",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResetReason::Stalled => "client stopped reading",
            ResetReason::TooSlow => "client is far slower than the node",
            ResetReason::Budget => {
                "relay buffer budget full; this client went longest without reading"
            }
        })
    }
}

/// The bytes queued for clients over all streams, bounded at every moment
/// by a limit, and the registry of streams that may be reset to keep it.
///
/// One process-wide instance serves the daemon ([`RelayBudget::global`]);
/// tests build their own.
#[derive(Debug)]
pub struct RelayBudget {
    limit: AtomicUsize,
    total: AtomicUsize,
    peak: AtomicUsize,
    dropped: AtomicU64,
    resets: [AtomicU64; 3],
    next_id: AtomicU64,
    /// Lock order: this map first, then a stream's state; never the other
    /// way round.
    streams: Mutex<BTreeMap<u64, Arc<Share>>>,
}

/// A snapshot of a [`RelayBudget`], for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    /// The limit in force.
    pub limit: usize,
    /// Bytes queued for clients now.
    pub buffered: usize,
    /// The most ever queued at once since start.
    pub peak: usize,
    /// Queued bytes thrown away because their stream was reset.
    pub dropped: u64,
    /// Streams reset, indexed like [`ResetReason::ALL`].
    pub resets: [u64; 3],
}

static GLOBAL: RelayBudget = RelayBudget::new(512 << 20);

impl RelayBudget {
    /// An empty budget of `limit` bytes.
    pub const fn new(limit: usize) -> RelayBudget {
        RelayBudget {
            limit: AtomicUsize::new(limit),
            total: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            resets: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            next_id: AtomicU64::new(0),
            streams: Mutex::new(BTreeMap::new()),
        }
    }

    /// The daemon's budget, shared by every stream of every node.
    pub fn global() -> &'static RelayBudget {
        &GLOBAL
    }

    /// Sets the limit (a reload may change it). When it drops below what
    /// is queued, the next arrival makes room as for any full budget.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Current figures.
    pub fn stats(&self) -> BudgetStats {
        BudgetStats {
            limit: self.limit.load(Ordering::Relaxed),
            buffered: self.total.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            resets: std::array::from_fn(|i| self.resets[i].load(Ordering::Relaxed)),
        }
    }

    /// Enters a stream; `stop` is cancelled when the budget resets it.
    fn register(&self, stop: CancellationToken) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let share = Arc::new(Share {
            id,
            state: Mutex::new(ShareState {
                queued: 0,
                progress: Instant::now(),
                reset: None,
            }),
            stop,
        });
        lock(&self.streams).insert(id, share.clone());
        Registration {
            budget: self,
            share,
        }
    }

    /// Takes `n` bytes from the budget if they fit under the limit.
    fn try_take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.total.load(Ordering::Relaxed);
        loop {
            let Some(new) = cur.checked_add(n).filter(|&t| t <= limit) else {
                return false;
            };
            match self
                .total
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::Relaxed);
                    return true;
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Resets a stream: its bytes leave the account now, its relay stops.
    fn reset_locked(&self, share: &Share, st: &mut ShareState, why: ResetReason) {
        st.reset = Some(why);
        let held = std::mem::take(&mut st.queued);
        self.total.fetch_sub(held, Ordering::AcqRel);
        self.dropped.fetch_add(held as u64, Ordering::Relaxed);
        self.resets[why.index()].fetch_add(1, Ordering::Relaxed);
        share.stop.cancel();
    }

    /// Counts `n` bytes about to be queued on `share`, or says why the
    /// stream must be reset instead.
    fn reserve(&self, share: &Share, n: usize, limits: &RelayLimits) -> Result<(), ResetReason> {
        {
            let mut st = lock(&share.state);
            if let Some(why) = st.reset {
                return Err(why);
            }
            let now = Instant::now();
            if st.queued == 0 {
                // Nothing was owed to the client until now, so it cannot
                // have fallen behind.
                st.progress = now;
            }
            let mine = st.queued + n;
            if mine > limits.stream_buffer_limit {
                self.reset_locked(share, &mut st, ResetReason::TooSlow);
                return Err(ResetReason::TooSlow);
            }
            if mine > limits.stall_floor && now - st.progress > limits.stall_timeout {
                self.reset_locked(share, &mut st, ResetReason::Stalled);
                return Err(ResetReason::Stalled);
            }
            if self.try_take(n) {
                st.queued = mine;
                return Ok(());
            }
        }
        // The budget is full: make room, oldest progress first. Each turn
        // resets at least one stream or ends, so this loop is bounded by
        // the number of streams.
        loop {
            let evicted = self.make_room(n, limits);
            let mut st = lock(&share.state);
            if let Some(why) = st.reset {
                return Err(why);
            }
            if self.try_take(n) {
                st.queued += n;
                return Ok(());
            }
            if evicted == 0 {
                // Nobody else holds anything we could take back: this
                // stream's own share is what does not fit.
                self.reset_locked(share, &mut st, ResetReason::Budget);
                return Err(ResetReason::Budget);
            }
        }
    }

    /// Resets streams, the one with the oldest progress first, until `n`
    /// more bytes would fit; returns how many it reset.
    fn make_room(&self, n: usize, limits: &RelayLimits) -> usize {
        let streams = lock(&self.streams);
        let now = Instant::now();
        let mut holders: Vec<(Instant, &Arc<Share>)> = streams
            .values()
            .filter_map(|s| {
                let st = lock(&s.state);
                (st.reset.is_none() && st.queued > 0).then_some((st.progress, s))
            })
            .collect();
        holders.sort_by_key(|(progress, s)| (*progress, s.id));
        let mut evicted = 0;
        for (_, s) in holders {
            let limit = self.limit.load(Ordering::Relaxed);
            if self.total.load(Ordering::Acquire).saturating_add(n) <= limit {
                break;
            }
            let mut st = lock(&s.state);
            if st.reset.is_some() || st.queued == 0 {
                continue;
            }
            let idle = now.saturating_duration_since(st.progress);
            let held = st.queued;
            if idle < limits.stall_timeout {
                warn!(
                    held,
                    ?idle,
                    "relay buffer budget full and every stream holding bytes is draining; \
                     resetting the one that read least recently (raise proxy.relay_buffer_budget)"
                );
            } else {
                info!(
                    held,
                    ?idle,
                    "relay buffer budget full; resetting the stream whose client went longest \
                     without reading (it logs `stream reset`)"
                );
            }
            self.reset_locked(s, &mut st, ResetReason::Budget);
            evicted += 1;
        }
        evicted
    }

    /// The client took `n` queued bytes. False once the stream was reset.
    fn release(&self, share: &Share, n: usize) -> bool {
        let mut st = lock(&share.state);
        if st.reset.is_some() {
            return false;
        }
        let n = n.min(st.queued);
        st.queued -= n;
        st.progress = Instant::now();
        self.total.fetch_sub(n, Ordering::AcqRel);
        true
    }

    /// When the stall rule would next reset `share` if its client took
    /// nothing until then; `None` while it holds no more than the floor.
    fn stall_deadline(&self, share: &Share, limits: &RelayLimits) -> Option<Instant> {
        let st = lock(&share.state);
        (st.reset.is_none() && st.queued > limits.stall_floor)
            .then(|| st.progress + limits.stall_timeout)
    }

    /// Applies the stall rule without an arrival (the node went quiet).
    fn check_stall(&self, share: &Share, limits: &RelayLimits) -> Result<(), ResetReason> {
        let mut st = lock(&share.state);
        if let Some(why) = st.reset {
            return Err(why);
        }
        if st.queued > limits.stall_floor && st.progress.elapsed() > limits.stall_timeout {
            self.reset_locked(share, &mut st, ResetReason::Stalled);
            return Err(ResetReason::Stalled);
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stream's part of the budget.
#[derive(Debug)]
struct Share {
    id: u64,
    state: Mutex<ShareState>,
    /// The relay's stop token: cancelled when the budget resets it.
    stop: CancellationToken,
}

#[derive(Debug)]
struct ShareState {
    /// Bytes counted against the budget and not yet taken by the client.
    queued: usize,
    /// The last moment the client took bytes or the queue became non-empty.
    progress: Instant,
    /// Set once, when the stream is reset.
    reset: Option<ResetReason>,
}

/// A stream's membership in the budget; leaving (also when the relay
/// future is dropped mid-way) returns what it still holds.
struct Registration<'a> {
    budget: &'a RelayBudget,
    share: Arc<Share>,
}

impl Registration<'_> {
    fn reserve(&self, n: usize, limits: &RelayLimits) -> Result<(), ResetReason> {
        self.budget.reserve(&self.share, n, limits)
    }
    fn release(&self, n: usize) -> bool {
        self.budget.release(&self.share, n)
    }
    fn reset_reason(&self) -> Option<ResetReason> {
        lock(&self.share.state).reset
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.budget.streams).remove(&self.share.id);
        let mut st = lock(&self.share.state);
        if st.reset.is_none() {
            let held = std::mem::take(&mut st.queued);
            self.budget.total.fetch_sub(held, Ordering::AcqRel);
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Chunks written to the client per syscall, at most.
const MAX_BATCH: usize = 64;

/// Read size from the client; one SSH packet's worth or so.
const CLIENT_READ_SIZE: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished.
    Closed,
    /// The relay reset the stream to keep memory bounded.
    Reset(ResetReason),
    /// Cancelled by shutdown or node removal.
    Cancelled,
}

/// Relays `client` ⇄ `channel` until both sides are done. `first` holds bytes
/// the client sent right after its CONNECT headers (forwarded first). Bytes
/// waiting for the client count against `budget` within `limits`.
pub async fn relay<S>(
    client: S,
    first: Bytes,
    channel: Channel<Msg>,
    counters: &Counters,
    cancel: CancellationToken,
    budget: &RelayBudget,
    limits: &RelayLimits,
) -> RelayEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut read_half, write_half) = channel.split();
    let (mut cr, mut cw) = tokio::io::split(client);
    let stop = cancel.child_token();
    budget.set_limit(limits.buffer_budget);
    let account = budget.register(stop.clone());

    let up = async {
        // client → node
        if !first.is_empty() {
            let n = first.len() as u64;
            if write_half.data_bytes(first).await.is_err() {
                stop.cancel();
                return;
            }
            counters.bytes_out.fetch_add(n, Ordering::Relaxed);
        }
        let mut buf = BytesMut::with_capacity(CLIENT_READ_SIZE);
        loop {
            buf.reserve(CLIENT_READ_SIZE);
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = cr.read_buf(&mut buf) => r,
            };
            match r {
                Ok(0) => {
                    let _ = write_half.eof().await;
                    return;
                }
                Ok(n) => {
                    let chunk = buf.split_to(n).freeze();
                    let sent = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = write_half.data_bytes(chunk) => r,
                    };
                    if sent.is_err() {
                        stop.cancel();
                        return;
                    }
                    counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    debug!(error = %e, "client read failed; closing stream");
                    stop.cancel();
                    return;
                }
            }
        }
    };

    // node → client, in two halves: `drain` always takes what russh hands
    // over at once (so the session loop never blocks on this stream), and
    // `deliver` writes it to the client as fast as the client takes it,
    // several chunks per syscall. They run concurrently, so a busy channel
    // can never starve the client writes (the queue stays near empty for
    // any client that keeps up).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let drain = async {
        // Owned here: dropping it when draining ends tells `deliver` to
        // finish the queue and stop.
        let tx = tx;
        loop {
            let wake = budget.stall_deadline(&account.share, limits);
            let msg = tokio::select! {
                _ = stop.cancelled() => return None,
                _ = sleep_until_opt(wake) => {
                    if let Err(why) = budget.check_stall(&account.share, limits) {
                        return Some(why);
                    }
                    continue;
                }
                m = read_half.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Err(why) = account.reserve(data.len(), limits) {
                        return Some(why);
                    }
                    if tx.send(data).is_err() {
                        return None;
                    }
                }
                // EOF: the client gets a half-close once the queue is out;
                // keep reading for the Close that follows.
                Some(ChannelMsg::Eof) => {
                    let _ = tx.send(Bytes::new());
                }
                Some(ChannelMsg::Close) | None => return None,
                Some(_) => {}
            }
        }
    };
    let deliver = async {
        let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return false,
                m = rx.recv() => m,
            };
            let Some(first) = first else {
                // Channel closed and everything delivered.
                let _ = cw.shutdown().await;
                return true;
            };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(b) => batch.push(b),
                    Err(_) => break,
                }
            }
            let mut eof = false;
            batch.retain(|b| {
                if b.is_empty() {
                    eof = true;
                }
                !b.is_empty()
            });
            let mut i = 0;
            while i < batch.len() {
                let slices: Vec<std::io::IoSlice<'_>> = batch[i..]
                    .iter()
                    .map(|b| std::io::IoSlice::new(b))
                    .collect();
                let w = tokio::select! {
                    _ = stop.cancelled() => return false,
                    w = cw.write_vectored(&slices) => w,
                };
                let mut n = match w {
                    Ok(0) | Err(_) => {
                        stop.cancel();
                        return false;
                    }
                    Ok(n) => n,
                };
                counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if !account.release(n) {
                    // Reset by the budget meanwhile.
                    return false;
                }
                while n > 0 {
                    let f = &mut batch[i];
                    if n >= f.len() {
                        n -= f.len();
                        i += 1;
                    } else {
                        f.advance(n);
                        n = 0;
                    }
                }
            }
            batch.clear();
            if eof {
                let _ = cw.shutdown().await;
            }
        }
    };
    let down = async {
        let (drained, delivered) = tokio::join!(drain, deliver);
        match drained {
            Some(why) => {
                debug!(reason = why.as_str(), "resetting this stream only");
                stop.cancel();
                RelayEnd::Reset(why)
            }
            None if delivered => {
                // The node closed the channel and the client has it all:
                // nothing more can flow either way.
                stop.cancel();
                RelayEnd::Closed
            }
            None => RelayEnd::Cancelled,
        }
    };

    let ((), end) = tokio::join!(up, down);
    let _ = write_half.close().await;
    if let Some(why) = account.reset_reason() {
        // Reset from another stream's arrival (the budget) shows up here
        // as a cancelled stop token.
        return RelayEnd::Reset(why);
    }
    if cancel.is_cancelled() {
        RelayEnd::Cancelled
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const KIB: usize = 1024;

    fn limits() -> RelayLimits {
        RelayLimits {
            buffer_budget: 1024 * KIB,
            stream_buffer_limit: 1024 * KIB,
            stall_timeout: Duration::from_secs(1),
            stall_floor: 512 * KIB,
        }
    }

    fn reset(r: &Registration<'_>) -> Option<ResetReason> {
        r.reset_reason()
    }

    /// Parked streams under the stall floor are reset oldest-idle first
    /// once the budget is full; a client that keeps reading is not, even
    /// when it holds more than each of them.
    #[tokio::test(start_paused = true)]
    async fn a_full_budget_resets_the_longest_idle_streams_first() {
        let l = limits();
        let b = RelayBudget::new(l.buffer_budget);
        let parked: Vec<_> = (0..3)
            .map(|_| b.register(CancellationToken::new()))
            .collect();
        for p in &parked {
            p.reserve(250 * KIB, &l).unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        // Below the floor: the stall rule leaves them alone.
        for p in &parked {
            assert_eq!(b.check_stall(&p.share, &l), Ok(()));
        }
        let busy = b.register(CancellationToken::new());
        busy.reserve(200 * KIB, &l).unwrap();
        assert_eq!(b.stats().buffered, 950 * KIB);
        // 100 KiB more does not fit: the oldest parked stream goes, alone.
        busy.reserve(100 * KIB, &l).unwrap();
        assert_eq!(reset(&parked[0]), Some(ResetReason::Budget));
        assert!(parked[0].share.stop.is_cancelled());
        assert_eq!((reset(&parked[1]), reset(&parked[2])), (None, None));
        assert_eq!(b.stats().buffered, 800 * KIB);
        // The busy client reads; a new stream's arrival then evicts the
        // next parked one, never the reader with more queued than it.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(busy.release(10 * KIB));
        let fresh = b.register(CancellationToken::new());
        fresh.reserve(250 * KIB, &l).unwrap();
        assert_eq!(reset(&parked[1]), Some(ResetReason::Budget));
        assert_eq!((reset(&parked[2]), reset(&busy)), (None, None));
        let s = b.stats();
        assert_eq!(s.buffered, (250 + 290 + 250) * KIB);
        assert!(s.peak <= l.buffer_budget, "{s:?}");
        assert_eq!(s.resets, [0, 0, 2]);
        assert_eq!(s.dropped, 2 * 250 * KIB as u64);
        // A reset stream's later release is refused and changes nothing.
        assert!(!parked[0].release(KIB));
        drop(parked);
        drop((busy, fresh));
        assert_eq!(b.stats().buffered, 0);
        assert!(lock(&b.streams).is_empty());
    }

    /// When every holder is draining, the budget still holds: the one that
    /// read least recently goes.
    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_even_when_every_stream_is_draining() {
        let l = limits();
        let b = RelayBudget::new(l.buffer_budget);
        let a = b.register(CancellationToken::new());
        let c = b.register(CancellationToken::new());
        a.reserve(600 * KIB, &l).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        c.reserve(400 * KIB, &l).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        c.reserve(64 * KIB, &l).unwrap();
        assert_eq!(reset(&a), Some(ResetReason::Budget));
        assert_eq!(reset(&c), None);
        assert_eq!(b.stats().buffered, 464 * KIB);
    }

    /// The per-stream rules: a stopped client above the floor is reset by
    /// the timer too, and nobody may hold more than the stream limit.
    #[tokio::test(start_paused = true)]
    async fn per_stream_rules() {
        let l = limits();
        let b = RelayBudget::new(l.buffer_budget);
        let s = b.register(CancellationToken::new());
        s.reserve(600 * KIB, &l).unwrap();
        let at = b.stall_deadline(&s.share, &l).expect("above the floor");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.check_stall(&s.share, &l), Ok(()));
        tokio::time::sleep_until(at + Duration::from_millis(1)).await;
        assert_eq!(b.check_stall(&s.share, &l), Err(ResetReason::Stalled));
        assert_eq!(b.stats().buffered, 0);

        let big = b.register(CancellationToken::new());
        big.reserve(1000 * KIB, &l).unwrap();
        assert!(big.release(1000 * KIB));
        big.reserve(1000 * KIB, &l).unwrap();
        assert_eq!(big.reserve(30 * KIB, &l), Err(ResetReason::TooSlow));
        assert_eq!(b.stats().resets, [1, 1, 0]);
    }
}
