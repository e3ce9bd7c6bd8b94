//! The flow control's accounting: what a relay may queue for its client,
//! and when its drain must wait (see `relay` for why waiting is the lever).
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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::RelayLimits;
use crate::tunnel::stream_stats::StreamStats;
use crate::tunnel::{Counters, SessionLoad};

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
pub(crate) enum Admit {
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
pub(crate) struct Account<'a> {
    budget: &'a RelayBudget,
    session: &'a SessionLoad,
    counters: &'a Counters,
    limit: usize,
    floor: usize,
    stopped_after: Duration,
    pub(crate) queued: AtomicUsize,
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
    pub(crate) stats: Option<&'a StreamStats>,
}

impl<'a> Account<'a> {
    pub(crate) fn new(
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
    pub(crate) fn idle_for(&self) -> Duration {
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
    pub(crate) async fn admit(&self, n: usize, stop: &CancellationToken) -> Admit {
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
    pub(crate) fn release(&self, n: usize) {
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

/// One relay counted in its session's `relays` while it runs.
pub(crate) struct Riding<'a>(&'a SessionLoad);

impl<'a> Riding<'a> {
    pub(crate) fn on(session: &'a SessionLoad) -> Riding<'a> {
        session.relays.fetch_add(1, Ordering::Relaxed);
        Riding(session)
    }
}

impl Drop for Riding<'_> {
    fn drop(&mut self) {
        self.0.relays.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Limits for a test account: `limit` per stream, `floor` per session,
/// and a stopped reader after 60 s (the relay's tests use it too).
#[cfg(test)]
pub(crate) fn test_limits(limit: usize, floor: usize) -> RelayLimits {
    RelayLimits {
        buffer_budget: 512 << 20,
        stream_buffer_limit: limit,
        session_floor: floor,
        stopped_reader_timeout: Duration::from_secs(60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;

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
        let a = Account::new(&b, &s, &c, &test_limits(MIB, MIB));
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
        let a = Account::new(&b, &s, &c, &test_limits(MIB, MIB));
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
            .map(|s| Account::new(&b, s, &c, &test_limits(64 * MIB, floor)))
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
        let a = Account::new(&b, &fresh, &c, &test_limits(64 * MIB, floor));
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
        let l = Account::new(&b, &s2, &c, &test_limits(64 * MIB, 256 * KIB));
        let a = Account::new(&b, &s1, &c, &test_limits(64 * MIB, 256 * KIB));
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
        let h = Account::new(&b, &heavy, &c, &test_limits(g, MIB));
        let taken = fill(&h, &stop, 2 * g).await;
        assert_eq!(taken, MIB + g / 2, "its floor, then half the budget");
        let l = Account::new(&b, &light, &c, &test_limits(g, MIB));
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
        let a = Account::new(&b, &s, &c, &test_limits(256 * KIB, MIB));
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
        let other = Account::new(&b, &s, &c, &test_limits(256 * KIB, 256 * KIB));
        let a = Account::new(&b, &s, &c, &test_limits(256 * KIB, 256 * KIB));
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
