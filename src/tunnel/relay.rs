//! Relaying one CONNECT stream over one SSH channel.
//!
//! # A slow reader is slowed down, never cut
//!
//! A client that reads slower than its node sends (a `kubectl cp` to a
//! laptop, a port-forward download) must get every byte, at its own pace,
//! as with `ssh -L`. No stream is ever reset because its reader is slow;
//! the relay resets a stream only when its client is gone (its socket
//! closed or failed).
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
//! 3. resumes once the client has taken the queue below half the limit
//!    (hysteresis: not one park per packet).
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
//! A client that *stops* reading freezes the neighbours of its session until
//! it reads again or goes away. Per-channel windows in russh (#770) would
//! remove this cost entirely; then this module would only need to stop
//! reading the channel.
//!
//! # Memory
//!
//! Every byte is counted against the [`RelayBudget`] *before* it is queued.
//! Per stream: at most `stream_buffer_limit` queued here, plus russh's
//! queue. Over all streams: never more than `buffer_budget`, at any moment.
//! As the total nears the budget, the session with the *largest* backlog is
//! held first (its ceiling falls fastest, see [`RelayBudget`]), while light
//! streams keep flowing inside a reserve; nothing is reset.
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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use crate::config::RelayLimits;
use crate::tunnel::{Counters, SessionLoad};

/// A session whose backlog is under this keeps flowing while heavier ones
/// are held (interactive streams that keep up).
const LIGHT_FLOOR: usize = 1 << 20;

/// How long closing the channel may wait for the session loop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bytes queued for clients over all streams, bounded at every moment.
///
/// A drain may take `n` more bytes for a session with backlog `B` only when
/// `T + n ≤ G` and `B + n ≤ F + max(0, G − R − T)`, with `T` the total
/// queued, `G` the budget, `R = G/8` a reserve and `F` 1 MiB. Far from the
/// budget the ceiling is huge; as `T` rises it falls, so the session with
/// the largest backlog is held first, and as clients drain it rises again,
/// releasing the smallest held backlogs first. One session can thereby
/// hold at most about `(F + G − R) / 2`.
///
/// One process-wide instance serves the daemon ([`RelayBudget::global`]);
/// tests build their own.
#[derive(Debug)]
pub struct RelayBudget {
    limit: AtomicUsize,
    total: AtomicUsize,
    peak: AtomicUsize,
    /// Drains waiting on the global rule right now.
    waiters: AtomicUsize,
    freed: Notify,
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
    /// Drains held by the global rule right now.
    pub held: usize,
}

static GLOBAL: RelayBudget = RelayBudget::new(512 << 20);

impl RelayBudget {
    /// An empty budget of `limit` bytes.
    pub const fn new(limit: usize) -> RelayBudget {
        RelayBudget {
            limit: AtomicUsize::new(limit),
            total: AtomicUsize::new(0),
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
        BudgetStats {
            limit: self.limit.load(Ordering::Relaxed),
            buffered: self.total.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            held: self.waiters.load(Ordering::Relaxed),
        }
    }

    /// Takes `n` bytes for a session holding `backlog` if the rule allows.
    fn try_take(&self, n: usize, backlog: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let reserve = limit / 8;
        let mut cur = self.total.load(Ordering::Relaxed);
        loop {
            let Some(new) = cur.checked_add(n).filter(|&t| t <= limit) else {
                return false;
            };
            let ceiling = LIGHT_FLOOR + (limit - reserve).saturating_sub(cur);
            if backlog.saturating_add(n) > ceiling {
                return false;
            }
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

    /// Returns `n` bytes and wakes drains the global rule holds.
    fn give_back(&self, n: usize) {
        self.total.fetch_sub(n, Ordering::AcqRel);
        self.wake();
    }

    fn wake(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// One stream's account: what it has queued for its client, shared by its
/// drain (which adds) and its delivery (which takes away). Dropping it
/// returns what is still queued to the budget and the session.
struct Account<'a> {
    budget: &'a RelayBudget,
    session: &'a SessionLoad,
    counters: &'a Counters,
    limit: usize,
    queued: AtomicUsize,
    /// Over the slow watermark now (counted in the session's `slow`).
    slow: AtomicBool,
    /// Was ever slow (counted once in the node's `streams_slowed`).
    slowed: AtomicBool,
    /// `deliver` took bytes below the resume mark.
    drained: Notify,
}

impl<'a> Account<'a> {
    fn new(
        budget: &'a RelayBudget,
        session: &'a SessionLoad,
        counters: &'a Counters,
        limit: usize,
    ) -> Account<'a> {
        Account {
            budget,
            session,
            counters,
            limit,
            queued: AtomicUsize::new(0),
            slow: AtomicBool::new(false),
            slowed: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    /// Counts `n` bytes about to be queued, waiting while the stream is
    /// over its limit or the global rule holds its session. False when
    /// `stop` fired first (nothing was counted then).
    async fn admit(&self, n: usize, stop: &CancellationToken) -> bool {
        // Once over the limit, wait until the client took it below half.
        let mut resume_at: Option<usize> = None;
        let mut hold: Option<Hold<'_>> = None;
        loop {
            let mine = self.drained.notified();
            let global = self.budget.freed.notified();
            tokio::pin!(mine, global);
            mine.as_mut().enable();
            global.as_mut().enable();
            let q = self.queued.load(Ordering::Acquire);
            let under_limit = match resume_at {
                Some(mark) => q <= mark,
                None => q == 0 || q + n <= self.limit,
            };
            if under_limit {
                resume_at = None;
                let backlog = self.session.backlog.load(Ordering::Relaxed);
                if self.budget.try_take(n, backlog) {
                    self.session.backlog.fetch_add(n, Ordering::Relaxed);
                    let q = self.queued.fetch_add(n, Ordering::AcqRel) + n;
                    if q >= self.limit / 2 && !self.slow.swap(true, Ordering::AcqRel) {
                        self.session.slow.fetch_add(1, Ordering::Relaxed);
                        if !self.slowed.swap(true, Ordering::Relaxed) {
                            self.counters.streams_slowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    return true;
                }
            } else if resume_at.is_none() {
                resume_at = Some(self.limit / 2);
            }
            if hold.is_none() {
                hold = Some(Hold::begin(self.session, self.counters));
            }
            if under_limit {
                // Held by the global rule: any stream's delivery may free it.
                self.budget.waiters.fetch_add(1, Ordering::AcqRel);
                let _w = Waiter(self.budget);
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = &mut global => {}
                    _ = &mut mine => {}
                }
            } else {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = &mut mine => {}
                }
            }
        }
    }

    /// The client took `n` queued bytes.
    fn release(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        let q = before - n;
        self.session.backlog.fetch_sub(n, Ordering::Relaxed);
        if q <= self.limit / 8 && self.slow.swap(false, Ordering::AcqRel) {
            self.session.slow.fetch_sub(1, Ordering::Relaxed);
        }
        if q <= self.limit / 2 {
            self.drained.notify_one();
        }
        self.budget.give_back(n);
    }
}

impl Drop for Account<'_> {
    fn drop(&mut self) {
        let q = self.queued.swap(0, Ordering::AcqRel);
        if self.slow.swap(false, Ordering::AcqRel) {
            self.session.slow.fetch_sub(1, Ordering::Relaxed);
        }
        if q > 0 {
            self.session.backlog.fetch_sub(q, Ordering::Relaxed);
            self.budget.give_back(q);
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

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished.
    Closed,
    /// The client went away (its socket closed or failed) before the node
    /// had finished; the channel was closed. The only reset there is.
    ClientGone,
    /// Cancelled by shutdown, node removal or the session's teardown.
    Cancelled,
}

/// Relays `client` ⇄ `channel` until both sides are done. `first` holds bytes
/// the client sent right after its CONNECT headers (forwarded first). Bytes
/// waiting for the client count against `budget` within `limits` and
/// against `session`, the SSH session the channel rides on.
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
) -> RelayEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read_half, write_half) = channel.split();
    let (mut cr, mut cw) = tokio::io::split(client);
    let stop = cancel.child_token();
    let gone = AtomicBool::new(false);
    budget.set_limit(limits.buffer_budget);
    let account = Account::new(budget, session, counters, limits.stream_buffer_limit);
    let closing = session.closing().clone();

    // The session's teardown stops this relay too: its drain may be the
    // very thing parking the session loop a disconnect waits for.
    let teardown = async {
        tokio::select! {
            _ = closing.cancelled() => stop.cancel(),
            _ = stop.cancelled() => {}
        }
    };

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
                    let chunk = take_read(&mut buf, n);
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
                    gone.store(true, Ordering::Relaxed);
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
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = read_half.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    if !account.admit(data.len(), &stop).await {
                        return;
                    }
                    if tx.send(data).is_err() {
                        return;
                    }
                }
                // EOF: the client gets a half-close once the queue is out;
                // keep reading for the Close that follows.
                Some(ChannelMsg::Eof) => {
                    let _ = tx.send(Bytes::new());
                }
                Some(ChannelMsg::Close) | None => return,
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
                        // The client is gone: the one reason to reset.
                        gone.store(true, Ordering::Relaxed);
                        stop.cancel();
                        return false;
                    }
                    Ok(n) => n,
                };
                counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
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
                let _ = cw.shutdown().await;
            }
        }
    };
    let down = async {
        let ((), delivered) = tokio::join!(drain, deliver);
        if delivered {
            // The node closed the channel and the client has it all:
            // nothing more can flow either way.
            stop.cancel();
        }
        delivered
    };

    let ((), delivered, ()) = tokio::join!(up, down, teardown);
    // The read half is gone with the drain, so this close cannot wait on
    // our own unread data; it may still wait on a session parked by a
    // neighbour, hence the bound.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, write_half.close()).await;
    if delivered {
        RelayEnd::Closed
    } else if gone.load(Ordering::Relaxed) {
        RelayEnd::ClientGone
    } else {
        RelayEnd::Cancelled
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

    /// Admits `n`, failing the test rather than hanging it if that waits.
    async fn admitted(a: &Account<'_>, n: usize, stop: &CancellationToken) -> bool {
        tokio::time::timeout(Duration::from_secs(2), a.admit(n, stop))
            .await
            .expect("admit waited where it should not")
    }

    /// Over its limit, a stream waits (it is not reset) and resumes once
    /// its client took the queue below half the limit.
    #[tokio::test]
    async fn a_stream_over_its_limit_waits_then_resumes_below_half() {
        let b = RelayBudget::new(64 * MIB);
        let s = SessionLoad::default();
        let c = Counters::default();
        let a = Account::new(&b, &s, &c, MIB);
        let stop = CancellationToken::new();
        for _ in 0..16 {
            assert!(admitted(&a, 64 * KIB, &stop).await);
        }
        assert_eq!(s.slow.load(Ordering::Relaxed), 1);
        assert_eq!(c.streams_slowed.load(Ordering::Relaxed), 1);
        let mut more = Box::pin(a.admit(64 * KIB, &stop));
        // Held: it does not complete while nothing is delivered.
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        assert!(s.is_held());
        // Taking a little is not enough (hysteresis) ...
        a.release(64 * KIB);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        // ... below half is.
        a.release(448 * KIB);
        assert!(more.await);
        assert!(!s.is_held());
        assert_eq!(b.stats().buffered, 576 * KIB);
        drop(a);
        assert_eq!(b.stats().buffered, 0);
        assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
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
        let a = Account::new(&b, &s, &c, MIB);
        let stop = CancellationToken::new();
        for _ in 0..7 {
            assert!(admitted(&a, 64 * KIB, &stop).await);
        }
        assert_eq!(s.slow.load(Ordering::Relaxed), 0, "448 KiB is under half");
        assert!(admitted(&a, 64 * KIB, &stop).await);
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
        assert!(admitted(&a, 384 * KIB, &stop).await);
        assert_eq!(s.slow.load(Ordering::Relaxed), 1);
        assert_eq!(c.streams_slowed.load(Ordering::Relaxed), 1);
        a.release(512 * KIB);
        assert!(
            admitted(&a, 2 * MIB, &stop).await,
            "an empty queue takes any chunk"
        );
        assert_eq!(s.backlog.load(Ordering::Relaxed), 2 * MIB);
    }

    /// The global rule's two bounds are inclusive: the total may reach the
    /// budget exactly, and a backlog its ceiling `F + G - R - T` exactly.
    #[test]
    fn the_budget_and_the_ceiling_are_reached_exactly() {
        let g = 16 * MIB;
        let b = RelayBudget::new(g);
        let ceiling = LIGHT_FLOOR + g - g / 8;
        assert!(!b.try_take(64 * KIB, ceiling - 64 * KIB + 1));
        assert_eq!(b.stats().buffered, 0);
        assert!(b.try_take(64 * KIB, ceiling - 64 * KIB));
        assert_eq!(b.stats().buffered, 64 * KIB);
        let b = RelayBudget::new(MIB);
        assert!(!b.try_take(MIB + 1, 0));
        assert!(b.try_take(MIB, 0));
        assert_eq!(b.stats().peak, MIB);
        assert!(!b.try_take(1, 0));
    }

    /// A drain held by the global rule resumes when *another* stream's
    /// client takes bytes (its own delivery never signals it), and when a
    /// reload raises the budget.
    #[tokio::test]
    async fn a_drain_held_by_the_budget_resumes_on_any_delivery_or_a_raise() {
        let b = RelayBudget::new(MIB);
        let (s1, s2) = (SessionLoad::default(), SessionLoad::default());
        let c = Counters::default();
        let stop = CancellationToken::new();
        let a = Account::new(&b, &s1, &c, 64 * MIB);
        let l = Account::new(&b, &s2, &c, 64 * MIB);
        assert!(admitted(&l, 512 * KIB, &stop).await);
        assert!(admitted(&a, 512 * KIB, &stop).await);
        let more = a.admit(64 * KIB, &stop);
        tokio::pin!(more);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        assert_eq!(b.stats().held, 1);
        l.release(64 * KIB);
        assert!(tokio::time::timeout(Duration::from_secs(1), more)
            .await
            .expect("another stream's delivery resumed it"));
        assert_eq!(b.stats().buffered, MIB);
        // Full again: only raising the limit can let this one through.
        let more = a.admit(64 * KIB, &stop);
        tokio::pin!(more);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        b.set_limit(2 * MIB);
        assert_eq!(b.stats().limit, 2 * MIB);
        assert!(tokio::time::timeout(Duration::from_secs(1), more)
            .await
            .expect("raising the budget resumed it"));
        assert_eq!(b.stats().held, 0);
    }

    /// Near the global budget the session with the largest backlog is held
    /// first, a light session keeps flowing, and the total never passes
    /// the budget; a held drain resumes when another stream delivers.
    #[tokio::test]
    async fn the_global_rule_holds_the_largest_backlog_first() {
        let g = 16 * MIB;
        let b = Arc::new(RelayBudget::new(g));
        let (heavy, light) = (SessionLoad::default(), SessionLoad::default());
        let c = Counters::default();
        let stop = CancellationToken::new();
        let h = Account::new(&b, &heavy, &c, g);
        // The heavy session fills until its ceiling F + (G - R - T) meets
        // its backlog B: B = (F + G - R) / 2.
        let mut taken = 0;
        while taken <= g
            && tokio::time::timeout(Duration::from_millis(20), h.admit(64 * KIB, &stop))
                .await
                .is_ok()
        {
            taken += 64 * KIB;
        }
        let cap = (MIB + g - g / 8) / 2;
        assert!(taken <= cap && taken + 64 * KIB > cap, "{taken} vs {cap}");
        // A light session still gets its bytes.
        let l = Account::new(&b, &light, &c, g);
        for _ in 0..8 {
            assert!(
                tokio::time::timeout(Duration::from_millis(200), l.admit(64 * KIB, &stop))
                    .await
                    .expect("a light session is not held")
            );
        }
        assert!(b.stats().peak <= g);
        // The heavy drain waits until clients take bytes (here its own).
        let more = h.admit(64 * KIB, &stop);
        tokio::pin!(more);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut more)
            .await
            .is_err());
        assert_eq!(b.stats().held, 1);
        h.release(MIB);
        assert!(tokio::time::timeout(Duration::from_secs(1), more)
            .await
            .expect("resumed after its client read"));
        assert_eq!(b.stats().held, 0);
        // A stop ends a wait without counting anything.
        let before = b.stats().buffered;
        stop.cancel();
        assert!(!admitted(&h, 8 * MIB, &stop).await);
        assert_eq!(b.stats().buffered, before);
    }
}
