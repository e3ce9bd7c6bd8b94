//! Relaying one CONNECT stream over one SSH channel.
//!
//! # A slow reader is slowed down, never cut
//!
//! A client that reads slower than its node sends (a `kubectl cp` to a
//! laptop, a port-forward download) must get every byte, at its own pace,
//! as with `ssh -L`. No stream is ever reset because its reader is slow.
//!
//! # An end tells the truth
//!
//! The client gets a clean close only when the node side closed its half
//! ([`StreamEnd::NodeClosed`]): every byte, then FIN (or TLS
//! `close_notify`), half-close kept both ways. A stream cut by anything
//! else (its session dying, a drain or shutdown cut, the node side failing)
//! is handed back untouched for the caller to reset: kube-apiserver sees
//! only our socket, and a FIN there reads as "complete". How each stream
//! ended is decided once ([`classify`]), by its first cause.
//!
//! russh 0.65 gives us one lever for that. It re-opens a channel's SSH
//! window when data *arrives*, not when we consume it (upstream #770), and
//! hands each channel its data with a bounded `send(..).await` in the
//! session loop. So the relay:
//! 1. drains its channel into a per-stream queue while that queue holds
//!    less than `stream_buffer_limit` (and the global rule below allows),
//!    and writes the queue to the client as fast as the client takes it;
//! 2. past that, *stops draining*: russh's per-channel queue
//!    (`channel_buffer_size` packets) fills, the session loop parks on it,
//!    TCP pushes back on sshd, and sshd on the node-side socket. The node is
//!    slowed to the reader's pace, end to end;
//! 3. resumes as soon as the client has taken room for the next packet.
//!    No hysteresis margin: while a drain waits its whole session is
//!    parked, so it waits no longer than one packet of its client's pace.
//!
//! # What it costs, and whom
//!
//! Backpressure in russh works per *session*, not per channel. While a
//! drain waits, its whole SSH session is parked: every other stream on it
//! waits too (its replies queue behind up to one SSH window of the slow
//! stream's data, drained at the slow reader's pace), and so do keepalives
//! and rekeying. Two things keep that small:
//! - the tunnel places *new* streams on a session that is not congested,
//!   opening extra sessions on demand (see `tunnel`), so only streams that
//!   already shared the session pay;
//! - russh's keepalive verdict is a branch of the same parked loop, so it is
//!   paused too: a hold we cause never looks like a dead node.
//!
//! - each session's SSH window is one bandwidth-delay product of its link
//!   (see `config::WindowBounds`), so what a neighbour waits behind is one
//!   small window, not the largest any link could need.
//!
//! A client that *stops* reading would freeze the neighbours of its session
//! for as long as it stays connected. So a stream whose client has taken
//! nothing for `stopped_reader_timeout` while its drain holds a session
//! that other streams ride on is reset ([`StreamEnd::ReaderStopped`]); a
//! stream alone on its session, or a client that reads at all, never is.
//! Per-channel windows in russh (opened as the application consumes)
//! would remove this cost entirely; then this module would only need to
//! stop reading the channel.
//!
//! # Memory
//!
//! Every byte is counted *before* it is queued: in its session's floor
//! while that has room, else against the shared [`RelayBudget`]. Per
//! stream: at most `stream_buffer_limit` queued here, plus russh's queue.
//! Over all streams: never more than `buffer_budget` plus one
//! `session_floor` per session, at any moment. As the budget fills, the
//! session with the *largest* share is held first (see [`RelayBudget`]),
//! while every session keeps its floor; nothing is reset for slowness.
//!
//! # Deadlocks avoided
//!
//! Nothing on the client-delivery path awaits the SSH handle or a channel
//! send: `deliver` only writes the client socket, and the drain's resume
//! condition depends only on `deliver`'s progress. The channel's read half
//! lives inside `drain`, so it is dropped (unparking the session loop) as
//! soon as the drain ends, before the write half's close, which is itself
//! bounded by a timeout. The session's teardown token stops every relay
//! on it, so a disconnect never waits for a parked loop.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::config::RelayLimits;
use crate::tunnel::stream_stats::StreamStats;
use crate::tunnel::{Counters, SessionLoad};

/// How long closing the channel may wait for the session loop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bytes queued for clients over all streams, in two parts.
///
/// **Each session's floor.** Every SSH session may hold up to
/// `session_floor` bytes (1 MiB by default) whatever anyone else holds:
/// that is the allowance with which a session that keeps up always flows,
/// however many stalled streams elsewhere fill the rest. Floors are outside
/// the budget: memory is bounded by the budget plus one floor per session
/// (`ssh.max_connections_per_node` sessions per node at most).
///
/// **The shared budget.** Past its floor, a drain may take `n` more bytes
/// for a session that already holds `P` of the budget only when
/// `T + P + n ≤ G`, with `T` what all sessions hold of the budget and `G`
/// the budget. Far from the budget that is no bound; as `T` rises, the
/// session with the largest share is held first (one session alone can
/// hold at most `G/2`), and as clients drain, the smallest held shares are
/// released first. A stalled stream past its share therefore holds its
/// own session, and no other: every other session still has its floor.
///
/// One process-wide instance serves the daemon ([`RelayBudget::global`]);
/// tests build their own.
#[derive(Debug)]
pub struct RelayBudget {
    limit: AtomicUsize,
    /// Bytes held of the shared budget.
    total: AtomicUsize,
    /// Bytes held in session floors.
    floors: AtomicUsize,
    peak: AtomicUsize,
    /// Drains waiting on the shared budget (or a floor) right now.
    waiters: AtomicUsize,
    freed: Notify,
}

/// A snapshot of a [`RelayBudget`], for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    /// The limit in force.
    pub limit: usize,
    /// Bytes queued for clients now, floors and budget together.
    pub buffered: usize,
    /// Of those, the bytes held of the shared budget (never above `limit`).
    pub budget_used: usize,
    /// The most ever queued at once (floors and budget) since start.
    pub peak: usize,
    /// Drains waiting on the budget right now.
    pub held: usize,
}

static GLOBAL: RelayBudget = RelayBudget::new(512 << 20);

impl RelayBudget {
    /// An empty budget of `limit` bytes.
    pub const fn new(limit: usize) -> RelayBudget {
        RelayBudget {
            limit: AtomicUsize::new(limit),
            total: AtomicUsize::new(0),
            floors: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            freed: Notify::const_new(),
        }
    }

    /// The daemon's budget, shared by every stream of every node.
    pub fn global() -> &'static RelayBudget {
        &GLOBAL
    }

    /// Sets the limit (a reload may change it). When it drops below what
    /// is queued, drains wait until clients have taken enough.
    pub fn set_limit(&self, limit: usize) {
        let old = self.limit.swap(limit, Ordering::Relaxed);
        if limit > old {
            self.wake();
        }
    }

    /// Current figures.
    pub fn stats(&self) -> BudgetStats {
        let total = self.total.load(Ordering::Relaxed);
        BudgetStats {
            limit: self.limit.load(Ordering::Relaxed),
            buffered: total + self.floors.load(Ordering::Relaxed),
            budget_used: total,
            peak: self.peak.load(Ordering::Relaxed),
            held: self.waiters.load(Ordering::Relaxed),
        }
    }

    /// Takes `n` bytes of the shared budget for a session holding `share`
    /// of it, if the rule allows.
    fn try_take(&self, n: usize, share: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.total.load(Ordering::Relaxed);
        loop {
            let fits = cur
                .checked_add(n)
                .and_then(|t| t.checked_add(share))
                .is_some_and(|t| t <= limit);
            if !fits {
                return false;
            }
            match self.total.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.note_peak();
                    return true;
                }
                Err(c) => cur = c,
            }
        }
    }

    fn note_peak(&self) {
        let now = self.total.load(Ordering::Relaxed) + self.floors.load(Ordering::Relaxed);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Returns `n` bytes of the shared budget and `f` of a floor, and wakes
    /// the drains that wait.
    fn give_back(&self, n: usize, f: usize) {
        if n > 0 {
            self.total.fetch_sub(n, Ordering::AcqRel);
        }
        if f > 0 {
            self.floors.fetch_sub(f, Ordering::AcqRel);
        }
        self.wake();
    }

    fn wake(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// Takes `n` bytes of a session's floor of `floor` bytes if they fit.
fn take_floor(used: &AtomicUsize, n: usize, floor: usize) -> bool {
    used.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| {
        u.checked_add(n).filter(|&t| t <= floor)
    })
    .is_ok()
}

/// What a drain's wait for room ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// The bytes are counted; queue them.
    Taken,
    /// The relay is stopping.
    Stopped,
    /// The client has taken nothing for `stopped_reader_timeout` while
    /// this drain held a session that other streams ride on: cut it.
    ReaderStopped,
}

/// One stream's account: what it has queued for its client, shared by its
/// drain (which adds) and its delivery (which takes away). Dropping it
/// returns what is still queued to the budget and the session.
struct Account<'a> {
    budget: &'a RelayBudget,
    session: &'a SessionLoad,
    counters: &'a Counters,
    limit: usize,
    floor: usize,
    stopped_after: Duration,
    queued: AtomicUsize,
    /// Of `queued`, the bytes counted in the session's floor, and those
    /// of the shared budget.
    in_floor: AtomicUsize,
    in_pool: AtomicUsize,
    /// Over the slow watermark now (counted in the session's `slow`).
    slow: AtomicBool,
    /// Was ever slow (counted once in the node's `streams_slowed`).
    slowed: AtomicBool,
    /// When the account was opened, the origin of `took_at_ms`.
    born: Instant,
    /// When the client last took bytes, in ms since `born`.
    took_at_ms: AtomicU64,
    /// `deliver` took bytes.
    drained: Notify,
    /// The stream's own figures (queued bytes, held time), when observed.
    stats: Option<&'a StreamStats>,
}

impl<'a> Account<'a> {
    fn new(
        budget: &'a RelayBudget,
        session: &'a SessionLoad,
        counters: &'a Counters,
        limits: &RelayLimits,
    ) -> Account<'a> {
        Account {
            budget,
            session,
            counters,
            limit: limits.stream_buffer_limit,
            floor: limits.session_floor,
            stopped_after: limits.stopped_reader_timeout,
            queued: AtomicUsize::new(0),
            in_floor: AtomicUsize::new(0),
            in_pool: AtomicUsize::new(0),
            slow: AtomicBool::new(false),
            slowed: AtomicBool::new(false),
            born: Instant::now(),
            took_at_ms: AtomicU64::new(0),
            drained: Notify::new(),
            stats: None,
        }
    }

    /// Counts `n` bytes in the session's floor, else in the shared budget.
    fn take(&self, n: usize) -> bool {
        if take_floor(&self.session.floor_used, n, self.floor) {
            self.budget.floors.fetch_add(n, Ordering::AcqRel);
            self.budget.note_peak();
            self.in_floor.fetch_add(n, Ordering::AcqRel);
            return true;
        }
        let share = self.session.pooled.load(Ordering::Relaxed);
        if self.budget.try_take(n, share) {
            self.session.pooled.fetch_add(n, Ordering::Relaxed);
            self.in_pool.fetch_add(n, Ordering::AcqRel);
            return true;
        }
        false
    }

    /// True when the client has bytes waiting, has taken none of them for
    /// `stopped_after`, and other streams ride on this session: holding
    /// on would freeze them for as long as the client stays connected.
    fn reader_stopped(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
            && self.idle_for() >= self.stopped_after
            && self.session.relays.load(Ordering::Relaxed) > 1
    }

    /// How long since the client last took bytes (or the stream began).
    fn idle_for(&self) -> Duration {
        let took = Duration::from_millis(self.took_at_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(took)
    }

    /// When to look again whether the reader stopped.
    fn next_check(&self) -> tokio::time::Instant {
        let left = self.stopped_after.saturating_sub(self.idle_for());
        let again =
            (self.stopped_after / 8).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::time::Instant::now() + if left.is_zero() { again } else { left }
    }

    /// Counts `n` bytes about to be queued, waiting while the stream has
    /// no room for them or the budget holds its session. Nothing is
    /// counted unless [`Admit::Taken`] comes back.
    ///
    /// A stream waits only until its chunk fits under its limit, not until
    /// its client has drained a margin: while it waits its whole session is
    /// parked, and every packet of a neighbour waits with it.
    async fn admit(&self, n: usize, stop: &CancellationToken) -> Admit {
        let mut hold: Option<Hold<'_>> = None;
        let mut _stream_hold = None;
        loop {
            let mine = self.drained.notified();
            let global = self.budget.freed.notified();
            tokio::pin!(mine, global);
            mine.as_mut().enable();
            global.as_mut().enable();
            let q = self.queued.load(Ordering::Acquire);
            let fits = q == 0 || q + n <= self.limit;
            if fits && self.take(n) {
                self.session.backlog.fetch_add(n, Ordering::Relaxed);
                let q = self.queued.fetch_add(n, Ordering::AcqRel) + n;
                if let Some(s) = self.stats {
                    s.queue(n);
                }
                if q >= self.limit / 2 && !self.slow.swap(true, Ordering::AcqRel) {
                    self.session.slow.fetch_add(1, Ordering::Relaxed);
                    if !self.slowed.swap(true, Ordering::Relaxed) {
                        self.counters.streams_slowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return Admit::Taken;
            }
            if self.reader_stopped() {
                return Admit::ReaderStopped;
            }
            if hold.is_none() {
                hold = Some(Hold::begin(self.session, self.counters));
                _stream_hold = self.stats.map(StreamStats::hold);
            }
            let check = tokio::time::sleep_until(self.next_check());
            if fits {
                // Held by the budget (or the session's floor): any
                // stream's delivery may free it.
                self.budget.waiters.fetch_add(1, Ordering::AcqRel);
                let _w = Waiter(self.budget);
                tokio::select! {
                    _ = stop.cancelled() => return Admit::Stopped,
                    _ = &mut global => {}
                    _ = &mut mine => {}
                    _ = check => {}
                }
            } else {
                tokio::select! {
                    _ = stop.cancelled() => return Admit::Stopped,
                    _ = &mut mine => {}
                    _ = check => {}
                }
            }
        }
    }

    /// Returns `n` queued bytes, the shared budget's first (another
    /// session may be waiting for them), then the floor's.
    fn give_back(&self, n: usize) {
        let pooled = n.min(self.in_pool.load(Ordering::Acquire));
        let floor = n - pooled;
        if floor > 0 {
            self.in_floor.fetch_sub(floor, Ordering::AcqRel);
            self.session.floor_used.fetch_sub(floor, Ordering::AcqRel);
        }
        if pooled > 0 {
            self.in_pool.fetch_sub(pooled, Ordering::AcqRel);
            self.session.pooled.fetch_sub(pooled, Ordering::Relaxed);
        }
        self.session.backlog.fetch_sub(n, Ordering::Relaxed);
        self.budget.give_back(pooled, floor);
    }

    /// The client took `n` queued bytes.
    fn release(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        let q = before - n;
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.took_at_ms.store(ms, Ordering::Relaxed);
        if let Some(s) = self.stats {
            s.dequeue(n);
        }
        if q <= self.limit / 8 && self.slow.swap(false, Ordering::AcqRel) {
            self.session.slow.fetch_sub(1, Ordering::Relaxed);
        }
        self.drained.notify_one();
        self.give_back(n);
    }
}

impl Drop for Account<'_> {
    fn drop(&mut self) {
        let q = self.queued.swap(0, Ordering::AcqRel);
        if self.slow.swap(false, Ordering::AcqRel) {
            self.session.slow.fetch_sub(1, Ordering::Relaxed);
        }
        if q > 0 {
            self.give_back(q);
            if let Some(s) = self.stats {
                s.dequeue(q);
            }
        }
    }
}

/// A drain waiting: counted in its session's held time while it lasts.
struct Hold<'a>(&'a SessionLoad, &'a Counters);

impl<'a> Hold<'a> {
    fn begin(session: &'a SessionLoad, counters: &'a Counters) -> Hold<'a> {
        session.hold_begin();
        Hold(session, counters)
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.hold_end(self.1);
    }
}

/// One drain counted in [`RelayBudget::waiters`] while it waits.
struct Waiter<'a>(&'a RelayBudget);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Chunks written to the client per syscall, at most.
const MAX_BATCH: usize = 64;

/// Read size from the client; one SSH packet's worth or so.
const CLIENT_READ_SIZE: usize = 64 * 1024;

/// Client reads smaller than this are copied into their own buffer
/// rather than split off the read buffer (see [`take_read`]).
const COPY_BELOW: usize = 16 * 1024;

/// Takes the `n` bytes just read into `buf` as one chunk for the channel.
///
/// A big read leaves as its own buffer, no copy. A small one is copied out
/// so `buf` stays whole: split, its tail is shared with the chunk russh
/// still holds, and the next `reserve` would allocate a fresh 64 KiB for
/// every small message; and the small chunk, while queued, would keep that
/// whole allocation alive.
fn take_read(buf: &mut BytesMut, n: usize) -> Bytes {
    if n < COPY_BELOW {
        let c = Bytes::copy_from_slice(&buf[..n]);
        buf.clear();
        c
    } else {
        buf.split_to(n).freeze()
    }
}

/// What the halves of a relay tell each other about how it is ending.
#[derive(Default)]
struct Flags {
    /// The client went away (its socket closed or failed).
    gone: AtomicBool,
    /// The client has every byte up to the node's EOF, and its half-close.
    eof_delivered: AtomicBool,
}

/// Writes the queue to the client as fast as the client takes it, several
/// chunks per syscall, until the queue ends (true: everything delivered)
/// or `stop` fires or the client fails (false). An empty chunk is the
/// node's EOF: the client gets a half-close there.
///
/// Whenever the queue runs dry the client is flushed: a TLS writer takes
/// bytes into records it may not be able to send yet (the socket was
/// full) and reports them written; only a flush, or a later write, pushes
/// them. Without it, a reply's tail would wait for the node's next bytes.
async fn deliver<W: AsyncWrite + Unpin>(
    cw: &mut W,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    stop: &CancellationToken,
    account: &Account<'_>,
    counters: &Counters,
    flags: &Flags,
) -> bool {
    let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return false,
            m = rx.recv() => m,
        };
        // Channel done and everything delivered; how the client is
        // closed depends on how the channel ended (decided below).
        let Some(first) = first else {
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
                    // The client is gone: the one reason to reset.
                    flags.gone.store(true, Ordering::Relaxed);
                    stop.cancel();
                    return false;
                }
                Ok(n) => n,
            };
            counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(s) = account.stats {
                s.to_client.fetch_add(n as u64, Ordering::Relaxed);
            }
            account.release(n);
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
            let shut = tokio::select! {
                _ = stop.cancelled() => return false,
                r = cw.shutdown() => r,
            };
            if shut.is_ok() {
                flags.eof_delivered.store(true, Ordering::Relaxed);
            }
        } else if rx.is_empty() {
            let flushed = tokio::select! {
                _ = stop.cancelled() => return false,
                r = cw.flush() => r,
            };
            if flushed.is_err() {
                flags.gone.store(true, Ordering::Relaxed);
                stop.cancel();
                return false;
            }
        }
    }
}

/// How a stream ended: one vocabulary for the stream's log line and the
/// `tunneler_streams_ended_total{how}` metric.
///
/// Only [`StreamEnd::NodeClosed`] is a true end of the node's data; every
/// other end but [`StreamEnd::ClientClosed`] is a cut, and the client must
/// not read it as "complete" (see [`StreamEnd::is_cut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The node side sent EOF and closed the channel, and the client has
    /// every byte: a clean close, half-close kept.
    NodeClosed,
    /// The client went away (its socket closed or failed) before the node
    /// had finished; the channel was closed.
    ClientClosed,
    /// The SSH session died under the stream.
    SessionLost,
    /// The stream's session was torn down by us after its drain timeout:
    /// replaced by a reconnect, removed with its node, or an idle extra.
    DrainCut,
    /// The daemon shut down (after its drain timeout, or a second signal)
    /// while the stream was open.
    ShutdownCut,
    /// The node side closed the channel without EOF (its connection failed
    /// there), or the relay itself failed.
    Error,
    /// The client read nothing for `proxy.relay_stopped_reader_timeout`
    /// while its stream held an SSH session that other streams ride on;
    /// the stream was reset so that they move again.
    ReaderStopped,
}

impl StreamEnd {
    /// Every end with its wire name (log field, metric label), the one
    /// place those names are written.
    pub const ALL: [(StreamEnd, &'static str); 7] = [
        (StreamEnd::NodeClosed, "node_closed"),
        (StreamEnd::ClientClosed, "client_closed"),
        (StreamEnd::SessionLost, "session_lost"),
        (StreamEnd::DrainCut, "drain_cut"),
        (StreamEnd::ShutdownCut, "shutdown_cut"),
        (StreamEnd::Error, "error"),
        (StreamEnd::ReaderStopped, "reader_stopped"),
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        Self::ALL[self.index()].1
    }

    /// The position in [`StreamEnd::ALL`], for per-end counters.
    pub fn index(self) -> usize {
        match self {
            StreamEnd::NodeClosed => 0,
            StreamEnd::ClientClosed => 1,
            StreamEnd::SessionLost => 2,
            StreamEnd::DrainCut => 3,
            StreamEnd::ShutdownCut => 4,
            StreamEnd::Error => 5,
            StreamEnd::ReaderStopped => 6,
        }
    }

    /// True when the client must see a failure rather than an end: the
    /// node side did not close its half, and the client is still there to
    /// be told. A FIN would read as "complete" to kube-apiserver.
    pub fn is_cut(self) -> bool {
        !matches!(self, StreamEnd::NodeClosed | StreamEnd::ClientClosed)
    }
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the channel's read side ended, as the drain saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// `Close` arrived; `eof` tells whether an `Eof` came before it.
    Closed { eof: bool },
    /// The channel's queue ended without a `Close`: russh forwards `Close`
    /// before it drops a channel, so this is the session dying.
    Lost,
    /// The relay stopped draining (client gone, cut, or a failed queue).
    Stopped,
    /// The client took nothing for `stopped_reader_timeout` while the
    /// drain held a session other streams ride on.
    ReaderStopped,
}

/// One relay counted in its session's `relays` while it runs.
struct Riding<'a>(&'a SessionLoad);

impl<'a> Riding<'a> {
    fn on(session: &'a SessionLoad) -> Riding<'a> {
        session.relays.fetch_add(1, Ordering::Relaxed);
        Riding(session)
    }
}

impl Drop for Riding<'_> {
    fn drop(&mut self) {
        self.0.relays.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a relay hands back: how it ended, and the client connection,
/// which the caller cuts (see [`StreamEnd::is_cut`]) or drops. On a normal
/// end the client has already been shut down cleanly.
pub struct Relayed<S> {
    /// How the stream ended.
    pub end: StreamEnd,
    /// The client connection, whole again.
    pub client: S,
}

/// The one decision of how a stream ended, from what each half saw.
/// The node side's own word wins (it happened first, and it is the truth
/// about the data); a stop we caused is named by its cause.
///
/// `eof_delivered` says the client has every byte up to the node's EOF and
/// its half-close: a client that leaves after that (before the channel's
/// `Close` arrives) saw a normal end.
fn classify(
    drained: Drained,
    delivered: bool,
    eof_delivered: bool,
    client_gone: bool,
    shutdown: bool,
    torn_down: bool,
) -> StreamEnd {
    match drained {
        Drained::Closed { eof: true } if delivered => StreamEnd::NodeClosed,
        Drained::Lost => StreamEnd::SessionLost,
        Drained::ReaderStopped => StreamEnd::ReaderStopped,
        Drained::Closed { eof: false } => StreamEnd::Error,
        Drained::Closed { eof: true } | Drained::Stopped => {
            if client_gone && eof_delivered {
                StreamEnd::NodeClosed
            } else if client_gone {
                StreamEnd::ClientClosed
            } else if shutdown {
                StreamEnd::ShutdownCut
            } else if torn_down {
                StreamEnd::DrainCut
            } else {
                StreamEnd::Error
            }
        }
    }
}

/// Relays `client` ⇄ `channel` until both sides are done. `first` holds bytes
/// the client sent right after its CONNECT headers (forwarded first). Bytes
/// waiting for the client count against `budget` within `limits` and
/// against `session`, the SSH session the channel rides on. `cancel` is the
/// daemon's shutdown: a stream it stops ends as [`StreamEnd::ShutdownCut`].
///
/// The client is shut down (FIN, or TLS `close_notify`) only where the
/// node's EOF reaches it, which a normal end ([`StreamEnd::NodeClosed`])
/// always has. On any other end the client comes back as it is, for the
/// caller to cut: a clean close there would tell the client that the node
/// side finished.
///
/// `stats` receives the stream's own queued bytes and held time, for the
/// live-stream list and the access record.
#[allow(clippy::too_many_arguments)]
pub async fn relay<S>(
    client: S,
    first: Bytes,
    channel: Channel<Msg>,
    counters: &Counters,
    session: &SessionLoad,
    cancel: CancellationToken,
    budget: &RelayBudget,
    limits: &RelayLimits,
    stats: &StreamStats,
) -> Relayed<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read_half, write_half) = channel.split();
    let (mut cr, mut cw) = tokio::io::split(client);
    let stop = cancel.child_token();
    let flags = Flags::default();
    budget.set_limit(limits.buffer_budget);
    let mut account = Account::new(budget, session, counters, limits);
    account.stats = Some(stats);
    let _riding = Riding::on(session);
    let closing = session.closing().clone();

    // The session's teardown stops this relay too: its drain may be the
    // very thing parking the session loop a disconnect waits for.
    let teardown = async {
        tokio::select! {
            _ = closing.cancelled() => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    };

    // A failed write to the channel stops only this direction: the channel
    // is closed or its session gone, and the drain learns which from the
    // channel itself, so the end is named by its cause.
    let up = async {
        // client → node
        if !first.is_empty() {
            let n = first.len() as u64;
            let sent = tokio::select! {
                _ = stop.cancelled() => return,
                r = write_half.data_bytes(first) => r,
            };
            if sent.is_err() {
                return;
            }
            counters.bytes_out.fetch_add(n, Ordering::Relaxed);
            stats.to_node.fetch_add(n, Ordering::Relaxed);
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
                    let _ = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = write_half.eof() => r,
                    };
                    return;
                }
                Ok(n) => {
                    let chunk = take_read(&mut buf, n);
                    let sent = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = write_half.data_bytes(chunk) => r,
                    };
                    if sent.is_err() {
                        return;
                    }
                    counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    stats.to_node.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    debug!(error = %e, "client read failed; closing stream");
                    flags.gone.store(true, Ordering::Relaxed);
                    stop.cancel();
                    return;
                }
            }
        }
    };

    // node → client, in two halves: `drain` takes what russh hands over
    // while the account admits it (and stops taking, on purpose, while it
    // does not), and `deliver` writes the queue to the client as fast as
    // the client takes it, several chunks per syscall. They run
    // concurrently, so delivery never waits for the channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let drain = async {
        // Owned here: dropping them when draining ends tells `deliver` to
        // finish the queue, and russh that nobody reads this channel any
        // more (so its session loop can never park on it again).
        let tx = tx;
        let mut read_half = read_half;
        let mut eof = false;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Drained::Stopped,
                m = read_half.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    match account.admit(data.len(), &stop).await {
                        Admit::Taken => {}
                        Admit::Stopped => return Drained::Stopped,
                        Admit::ReaderStopped => {
                            info!(
                                idle = ?account.idle_for(),
                                queued = account.queued.load(Ordering::Relaxed),
                                beside = session.relays.load(Ordering::Relaxed).saturating_sub(1),
                                "the client read nothing while its stream held a session other streams ride on: resetting this stream"
                            );
                            // Delivery too: it waits on that very client.
                            stop.cancel();
                            return Drained::ReaderStopped;
                        }
                    }
                    if tx.send(data).is_err() {
                        return Drained::Stopped;
                    }
                }
                // EOF: the client gets a half-close once the queue is out;
                // keep reading for the Close that follows.
                Some(ChannelMsg::Eof) => {
                    eof = true;
                    let _ = tx.send(Bytes::new());
                }
                Some(ChannelMsg::Close) => return Drained::Closed { eof },
                None => return Drained::Lost,
                Some(_) => {}
            }
        }
    };
    let deliver = deliver(&mut cw, &mut rx, &stop, &account, counters, &flags);
    let down = async {
        let (drained, delivered) = tokio::join!(drain, deliver);
        // However the channel ended, nothing more can flow either way.
        stop.cancel();
        (drained, delivered)
    };

    let ((), (drained, delivered), ()) = tokio::join!(up, down, teardown);
    // The read half is gone with the drain, so this close cannot wait on
    // our own unread data; it may still wait on a session parked by a
    // neighbour, hence the bound.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, write_half.close()).await;
    let end = classify(
        drained,
        delivered,
        flags.eof_delivered.load(Ordering::Relaxed),
        flags.gone.load(Ordering::Relaxed),
        cancel.is_cancelled(),
        closing.is_cancelled(),
    );
    counters.ended[end.index()].fetch_add(1, Ordering::Relaxed);
    Relayed {
        end,
        client: cr.unsplit(cw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;

    /// Fills `buf` (capacity `CLIENT_READ_SIZE`) with `n` bytes of a
    /// pattern, as a client read would, and takes them.
    fn read_and_take(buf: &mut BytesMut, n: usize) -> Bytes {
        buf.reserve(CLIENT_READ_SIZE);
        buf.extend((0..n).map(|i| (i % 251) as u8));
        take_read(buf, n)
    }

    /// A small read is copied out and the read buffer stays whole, so the
    /// next read reuses its allocation; a read of `COPY_BELOW` or more
    /// leaves as the buffer itself, without a copy. Bytes are the same
    /// either way; what differs is memory: a split small chunk would pin
    /// the whole 64 KiB buffer while it waits in russh's queue.
    #[test]
    fn small_reads_are_copied_and_big_reads_leave_without_a_copy() {
        for n in [1, 100, COPY_BELOW - 1] {
            let mut buf = BytesMut::with_capacity(CLIENT_READ_SIZE);
            let cap = buf.capacity();
            let start = buf.as_ptr();
            let chunk = read_and_take(&mut buf, n);
            assert_eq!(chunk.len(), n);
            assert!(chunk.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            assert_ne!(chunk.as_ptr(), start, "{n} bytes: not copied");
            assert!(buf.is_empty());
            assert_eq!(buf.as_ptr(), start, "{n} bytes: the read buffer moved");
            assert_eq!(buf.capacity(), cap, "{n} bytes: the read buffer shrank");
        }
        for n in [COPY_BELOW, COPY_BELOW + 1, CLIENT_READ_SIZE] {
            let mut buf = BytesMut::with_capacity(CLIENT_READ_SIZE);
            let start = buf.as_ptr();
            let chunk = read_and_take(&mut buf, n);
            assert_eq!(chunk.len(), n);
            assert!(chunk.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            assert_eq!(chunk.as_ptr(), start, "{n} bytes: copied");
            assert!(buf.is_empty());
        }
    }

    /// Each end is named by its first cause: the node side's word (EOF
    /// and Close, Close alone, the session gone) before a stop we caused,
    /// and of those the client leaving before shutdown before a teardown.
    #[test]
    fn a_stream_end_is_named_by_its_first_cause() {
        use Drained::*;
        use StreamEnd::*;
        let eof = Closed { eof: true };
        let abrupt = Closed { eof: false };
        // (drained, delivered, eof_delivered, gone, shutdown, torn_down)
        let cases = [
            ((eof, true, true, false, false, false), NodeClosed),
            ((eof, true, true, false, true, true), NodeClosed),
            ((eof, false, true, true, false, false), NodeClosed),
            ((Stopped, false, true, true, false, false), NodeClosed),
            ((eof, false, false, true, false, false), ClientClosed),
            ((Stopped, false, false, true, true, true), ClientClosed),
            ((Stopped, false, false, false, true, true), ShutdownCut),
            ((eof, false, true, false, true, false), ShutdownCut),
            ((Stopped, false, false, false, false, true), DrainCut),
            ((Stopped, false, false, false, false, false), Error),
            ((Lost, true, true, false, false, false), SessionLost),
            ((Lost, false, false, true, true, true), SessionLost),
            ((abrupt, true, false, false, false, false), Error),
            ((abrupt, false, false, true, true, true), Error),
            (
                (Drained::ReaderStopped, false, false, false, false, false),
                StreamEnd::ReaderStopped,
            ),
            (
                (Drained::ReaderStopped, false, false, false, true, true),
                StreamEnd::ReaderStopped,
            ),
        ];
        for ((d, del, eofd, gone, sd, td), want) in cases {
            assert_eq!(
                classify(d, del, eofd, gone, sd, td),
                want,
                "{d:?} delivered={del} eof_delivered={eofd} gone={gone} shutdown={sd} torn_down={td}"
            );
        }
        let cut: Vec<_> = StreamEnd::ALL
            .iter()
            .filter(|(e, _)| e.is_cut())
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            cut,
            [
                "session_lost",
                "drain_cut",
                "shutdown_cut",
                "error",
                "reader_stopped"
            ]
        );
        for (i, (e, n)) in StreamEnd::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert_eq!(e.as_str(), *n);
            assert_eq!(e.to_string(), *n);
        }
    }

    /// A client writer that behaves as tokio-rustls does with a full
    /// socket: a write takes all it is given into pending records and
    /// reports it written, but only `room` bytes reach the wire per write;
    /// a flush sends the rest. (A fake: a real TLS stream on loopback sits
    /// on a socket Linux grows to megabytes, so its tail is stuck only by
    /// chance; this makes the case certain.)
    struct RecordWriter {
        pending: Vec<u8>,
        wire: Vec<u8>,
        room: usize,
    }

    impl RecordWriter {
        fn push(&mut self, max: usize) {
            let n = self.pending.len().min(max);
            self.wire.extend(self.pending.drain(..n));
        }
    }

    impl AsyncWrite for RecordWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.pending.extend_from_slice(buf);
            let room = self.room;
            self.push(room);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.push(usize::MAX);
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    /// Once the queue runs dry, everything written reaches the wire,
    /// although the node sends nothing more and the stream stays open: the
    /// writer is flushed. Without the flush the wire held 1000 of the
    /// 10 000 bytes here, for as long as the stream lived.
    #[tokio::test]
    async fn a_drained_queue_is_flushed_to_the_client() {
        let b = RelayBudget::new(64 * MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let a = Account::new(&b, &s, &c, &lim(8 * MIB, MIB));
        let stop = CancellationToken::new();
        let flags = Flags::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = RecordWriter {
            pending: Vec::new(),
            wire: Vec::new(),
            room: 1000,
        };
        let data: Vec<u8> = (0..10_000).map(|i| (i % 251) as u8).collect();
        assert_eq!(a.admit(data.len(), &stop).await, Admit::Taken);
        tx.send(Bytes::from(data.clone())).unwrap();
        let delivered = {
            let run = deliver(&mut w, &mut rx, &stop, &a, &c, &flags);
            // The queue stays open (the node idles): deliver runs until
            // the timeout stops it.
            tokio::time::timeout(Duration::from_millis(300), run).await
        };
        assert!(
            delivered.is_err(),
            "deliver ended although the queue is open"
        );
        assert_eq!(w.wire.len(), data.len(), "the tail stayed in the writer");
        assert_eq!(w.wire, data);
        assert!(!flags.gone.load(Ordering::Relaxed));
        drop(tx);
    }

    /// Limits for a test account: `limit` per stream, `floor` per session,
    /// and a stopped reader after 60 s.
    fn lim(limit: usize, floor: usize) -> RelayLimits {
        RelayLimits {
            buffer_budget: 512 * MIB,
            stream_buffer_limit: limit,
            session_floor: floor,
            stopped_reader_timeout: Duration::from_secs(60),
        }
    }

    /// Admits `n`, failing the test rather than hanging it if that waits.
    async fn admitted(a: &Account<'_>, n: usize, stop: &CancellationToken) -> Admit {
        tokio::time::timeout(Duration::from_secs(2), a.admit(n, stop))
            .await
            .expect("admit waited where it should not")
    }

    /// Admits `n` chunks of 64 KiB until one waits 20 ms; returns the bytes
    /// admitted.
    async fn fill(a: &Account<'_>, stop: &CancellationToken, most: usize) -> usize {
        let mut taken = 0;
        while taken <= most
            && tokio::time::timeout(Duration::from_millis(20), a.admit(64 * KIB, stop))
                .await
                .is_ok()
        {
            taken += 64 * KIB;
        }
        taken
    }

    /// Over its limit, a stream waits (it is not reset), and resumes as
    /// soon as its client took room for the next chunk: while it waits its
    /// whole session is parked, so it waits no longer than that.
    #[tokio::test]
    async fn a_stream_over_its_limit_waits_until_its_next_chunk_fits() {
        let b = RelayBudget::new(64 * MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let a = Account::new(&b, &s, &c, &lim(MIB, MIB));
        let stop = CancellationToken::new();
        for _ in 0..16 {
            assert_eq!(admitted(&a, 64 * KIB, &stop).await, Admit::Taken);
        }
        assert_eq!(s.slow.load(Ordering::Relaxed), 1);
        assert_eq!(c.streams_slowed.load(Ordering::Relaxed), 1);
        let mut more = Box::pin(a.admit(64 * KIB, &stop));
        // Held: it does not complete while nothing is delivered.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        assert!(s.is_held());
        // Less than the chunk is not enough ...
        a.release(32 * KIB);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        // ... the chunk is.
        a.release(32 * KIB);
        assert_eq!(more.await, Admit::Taken);
        assert!(!s.is_held());
        assert_eq!(b.stats().buffered, MIB);
        drop(a);
        assert_eq!(b.stats().buffered, 0);
        assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
        assert_eq!(s.floor_used.load(Ordering::Relaxed), 0);
        assert_eq!(s.slow.load(Ordering::Relaxed), 0);
        assert!(c.blocked_ns.load(Ordering::Relaxed) > 0);
    }

    /// The slow mark is exactly half the limit and clears at an eighth; a
    /// stream that turns slow again counts in its session again but in the
    /// node's `streams_slowed` once. A chunk larger than the limit is
    /// admitted on an empty queue (else it could never pass).
    #[tokio::test]
    async fn the_slow_mark_is_half_the_limit_and_clears_at_an_eighth() {
        let b = RelayBudget::new(64 * MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let a = Account::new(&b, &s, &c, &lim(MIB, MIB));
        let stop = CancellationToken::new();
        for _ in 0..7 {
            assert_eq!(admitted(&a, 64 * KIB, &stop).await, Admit::Taken);
        }
        assert_eq!(s.slow.load(Ordering::Relaxed), 0, "448 KiB is under half");
        assert_eq!(admitted(&a, 64 * KIB, &stop).await, Admit::Taken);
        assert_eq!(s.slow.load(Ordering::Relaxed), 1, "512 KiB is half");
        assert_eq!(c.streams_slowed.load(Ordering::Relaxed), 1);
        a.release(320 * KIB);
        assert_eq!(
            s.slow.load(Ordering::Relaxed),
            1,
            "192 KiB is over an eighth"
        );
        a.release(64 * KIB);
        assert_eq!(s.slow.load(Ordering::Relaxed), 0, "128 KiB is an eighth");
        assert_eq!(admitted(&a, 384 * KIB, &stop).await, Admit::Taken);
        assert_eq!(s.slow.load(Ordering::Relaxed), 1);
        assert_eq!(c.streams_slowed.load(Ordering::Relaxed), 1);
        a.release(512 * KIB);
        assert_eq!(
            admitted(&a, 2 * MIB, &stop).await,
            Admit::Taken,
            "an empty queue takes any chunk"
        );
        assert_eq!(s.backlog.load(Ordering::Relaxed), 2 * MIB);
        assert_eq!(
            s.floor_used.load(Ordering::Relaxed),
            0,
            "2 MiB is over the floor"
        );
        assert_eq!(b.stats().budget_used, 2 * MIB);
    }

    /// The shared rule `T + P + n ≤ G` is inclusive, and counts nothing
    /// when it refuses.
    #[test]
    fn the_shared_budget_is_reached_exactly() {
        let g = 16 * MIB;
        let b = RelayBudget::new(g);
        assert!(!b.try_take(64 * KIB, g - 64 * KIB + 1));
        assert_eq!(b.stats().buffered, 0);
        assert!(b.try_take(64 * KIB, g - 64 * KIB));
        assert_eq!(b.stats().budget_used, 64 * KIB);
        let b = RelayBudget::new(MIB);
        assert!(!b.try_take(MIB + 1, 0));
        assert!(b.try_take(MIB, 0));
        assert_eq!(b.stats().peak, MIB);
        assert!(!b.try_take(1, 0));
        assert!(!b.try_take(usize::MAX, usize::MAX), "no overflow");
    }

    /// Every session gets its floor whatever the shared budget holds: with
    /// the budget exhausted by stalled streams of other sessions, a fresh
    /// session still takes up to its floor at once, and memory stays within
    /// the budget plus one floor per session.
    #[tokio::test]
    async fn a_session_keeps_its_floor_while_stalled_streams_fill_the_budget() {
        let g = 4 * MIB;
        let floor = 512 * KIB;
        let b = RelayBudget::new(g);
        let c = Counters::default();
        let stop = CancellationToken::new();
        let stalled: Vec<SessionLoad> = (0..4).map(|_| SessionLoad::default()).collect();
        let accounts: Vec<Account<'_>> = stalled
            .iter()
            .map(|s| Account::new(&b, s, &c, &lim(64 * MIB, floor)))
            .collect();
        for a in &accounts {
            fill(a, &stop, g).await;
        }
        let st = b.stats();
        assert!(st.budget_used <= g, "{st:?}");
        assert!(st.buffered <= g + 4 * floor, "{st:?}");
        assert_eq!(st.buffered - st.budget_used, 4 * floor, "{st:?}");
        // A reload lowers the budget under what they hold: nothing more
        // can come from it, for anyone.
        b.set_limit(st.budget_used);
        assert!(!b.try_take(64 * KIB, 0));
        let fresh = SessionLoad::default();
        let a = Account::new(&b, &fresh, &c, &lim(64 * MIB, floor));
        for _ in 0..floor / (64 * KIB) {
            assert_eq!(admitted(&a, 64 * KIB, &stop).await, Admit::Taken);
        }
        assert_eq!(fresh.floor_used.load(Ordering::Relaxed), floor);
        // Its client keeps up: what it takes comes back to its floor.
        a.release(floor);
        assert_eq!(admitted(&a, 64 * KIB, &stop).await, Admit::Taken);
        assert!(b.stats().peak <= g + 5 * floor);
    }

    /// A drain held by the shared budget resumes when *another* stream's
    /// client takes bytes (its own delivery never signals it), and when a
    /// reload raises the budget. What a client takes goes back to the
    /// shared budget first.
    #[tokio::test]
    async fn a_drain_held_by_the_budget_resumes_on_any_delivery_or_a_raise() {
        let b = RelayBudget::new(MIB);
        let (s1, s2) = (SessionLoad::default(), SessionLoad::default());
        let c = Counters::default();
        let stop = CancellationToken::new();
        let l = Account::new(&b, &s2, &c, &lim(64 * MIB, 256 * KIB));
        let a = Account::new(&b, &s1, &c, &lim(64 * MIB, 256 * KIB));
        // l alone: its floor, then half the budget (T = P, 2P ≤ G).
        assert_eq!(fill(&l, &stop, 4 * MIB).await, 256 * KIB + 512 * KIB);
        // a: its floor, then until T + P_a + n > G with T = 512K + P_a.
        assert_eq!(fill(&a, &stop, 4 * MIB).await, 256 * KIB + 256 * KIB);
        let more = a.admit(64 * KIB, &stop);
        tokio::pin!(more);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        assert_eq!(b.stats().held, 1);
        l.release(64 * KIB);
        assert_eq!(s2.floor_used.load(Ordering::Relaxed), 256 * KIB);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), more)
                .await
                .expect("another stream's delivery resumed it"),
            Admit::Taken
        );
        assert_eq!(b.stats().budget_used, 768 * KIB);
        // Full again: only raising the limit can let this one through.
        let more = a.admit(64 * KIB, &stop);
        tokio::pin!(more);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        b.set_limit(2 * MIB);
        assert_eq!(b.stats().limit, 2 * MIB);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), more)
                .await
                .expect("raising the budget resumed it"),
            Admit::Taken
        );
        assert_eq!(b.stats().held, 0);
    }

    /// Near the budget the session with the largest share is held first
    /// (alone, it stops at half the budget), a light session keeps
    /// flowing, and the shared part never passes the budget; a held drain
    /// resumes when a client takes bytes; a stop counts nothing.
    #[tokio::test]
    async fn the_shared_rule_holds_the_largest_share_first() {
        let g = 16 * MIB;
        let b = Arc::new(RelayBudget::new(g));
        let (heavy, light) = (SessionLoad::default(), SessionLoad::default());
        let c = Counters::default();
        let stop = CancellationToken::new();
        let h = Account::new(&b, &heavy, &c, &lim(g, MIB));
        let taken = fill(&h, &stop, 2 * g).await;
        assert_eq!(taken, MIB + g / 2, "its floor, then half the budget");
        let l = Account::new(&b, &light, &c, &lim(g, MIB));
        let got = fill(&l, &stop, 2 * g).await;
        // Its floor, then while 8 MiB + P + P ≤ 16 MiB: 4 MiB more.
        assert_eq!(got, MIB + 4 * MIB);
        assert!(b.stats().budget_used <= g);
        assert!(b.stats().peak <= g + 2 * MIB);
        let heavy_more = h.admit(64 * KIB, &stop);
        let light_more = l.admit(64 * KIB, &stop);
        tokio::pin!(heavy_more, light_more);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut heavy_more)
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut light_more)
                .await
                .is_err()
        );
        assert_eq!(b.stats().held, 2);
        // A client frees 1 MiB: the smaller share is released first.
        h.release(MIB);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), &mut light_more)
                .await
                .expect("the light session resumed"),
            Admit::Taken
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut heavy_more)
                .await
                .is_err()
        );
        // The heavy one resumes once its share fits what is left.
        h.release(3 * MIB);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), heavy_more)
                .await
                .expect("resumed after its client read"),
            Admit::Taken
        );
        assert_eq!(b.stats().held, 0);
        let before = b.stats().buffered;
        stop.cancel();
        assert_eq!(admitted(&h, 8 * MIB, &stop).await, Admit::Stopped);
        assert_eq!(b.stats().buffered, before);
    }

    /// A stream whose client has taken nothing for the timeout is cut only
    /// while other streams ride on its session (alone, it holds nobody but
    /// itself); a client that takes something now and then never is.
    #[tokio::test(start_paused = true)]
    async fn only_a_reader_that_stopped_beside_neighbours_is_cut() {
        let b = RelayBudget::new(64 * MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let stop = CancellationToken::new();
        let a = Account::new(&b, &s, &c, &lim(256 * KIB, MIB));
        let _me = Riding::on(&s);
        for _ in 0..4 {
            assert_eq!(a.admit(64 * KIB, &stop).await, Admit::Taken);
        }
        // Alone on its session: held, never cut, however long.
        let alone = tokio::time::timeout(Duration::from_secs(600), a.admit(64 * KIB, &stop)).await;
        assert!(alone.is_err(), "cut with nobody beside it");
        // Slow but reading, with a neighbour: a byte every 30 s is enough.
        let beside = Riding::on(&s);
        a.release(1);
        let mut more = Box::pin(a.admit(64 * KIB, &stop));
        for _ in 0..10 {
            assert!(tokio::time::timeout(Duration::from_secs(30), &mut more)
                .await
                .is_err());
            a.release(1);
        }
        // Stopped: cut once the timeout has passed since its last read.
        let t0 = Instant::now();
        assert_eq!(more.await, Admit::ReaderStopped);
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(61),
            "{waited:?}"
        );
        drop(beside);
        // Its neighbour left: no longer cut.
        let alone = tokio::time::timeout(Duration::from_secs(600), a.admit(64 * KIB, &stop)).await;
        assert!(alone.is_err());
    }

    /// A drain that waits with nothing queued for its client (the budget
    /// and its session's floor are full) is never cut as a stopped reader,
    /// neighbours or not: its client has nothing to read.
    #[tokio::test(start_paused = true)]
    async fn a_stream_with_nothing_queued_is_never_cut() {
        let b = RelayBudget::new(MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let stop = CancellationToken::new();
        let other = Account::new(&b, &s, &c, &lim(256 * KIB, 256 * KIB));
        let a = Account::new(&b, &s, &c, &lim(256 * KIB, 256 * KIB));
        let (_o, _a) = (Riding::on(&s), Riding::on(&s));
        for _ in 0..4 {
            assert_eq!(other.admit(64 * KIB, &stop).await, Admit::Taken);
        }
        assert_eq!(s.floor_used.load(Ordering::Relaxed), 256 * KIB);
        b.set_limit(0);
        let mut wait = Box::pin(a.admit(64 * KIB, &stop));
        let waited = tokio::time::timeout(Duration::from_secs(600), &mut wait).await;
        assert!(waited.is_err(), "cut with nothing queued: {waited:?}");
        assert_eq!(b.stats().held, 1, "held by the budget all along");
    }
}
