//! Connection slots for the admin socket and the metrics listener, which
//! idle or hostile clients must not be able to fill.
//!
//! Each listener has its own [`Slots`] (its own budget: a flood on the
//! metrics port leaves the admin socket alone, and the reverse). A
//! connection is *idle* while no request of it is being handled: from its
//! accept until its first request head is read, and between keep-alive
//! requests. Three rules keep idle connections from holding the slots:
//! - an idle connection is closed after [`IDLE_TIMEOUT`] (this also bounds
//!   a head sent byte by byte: the head is read while idle);
//! - when every slot is taken, a new connection closes the connection that
//!   has been idle longest and takes its slot, so a flood of idle
//!   connections always gives way to the newest, which is a real client's
//!   within moments of its connect;
//! - only when every slot is busy handling a request does a new connection
//!   wait, and handlers end (a body read is bounded too, see `admin`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection may sit without a request in progress: from its
/// accept to its first request head, and between keep-alive requests.
/// Short, as every client of these listeners (`tunneler`, curl, a
/// Prometheus scrape) sends its request at once after connecting.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Entry {
    /// `Some(since)` while idle, `None` while a request is handled.
    idle_since: Option<Instant>,
    /// Cancelled to close the connection (evicted).
    close: CancellationToken,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    conns: BTreeMap<u64, Entry>,
}

/// The connection slots of one listener.
#[derive(Debug)]
pub struct Slots {
    permits: Arc<Semaphore>,
    table: Arc<Mutex<Table>>,
}

/// One admitted connection's hold on a slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    table: Arc<Mutex<Table>>,
    close: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// `capacity` connections at once.
    pub fn new(capacity: usize) -> Slots {
        Slots {
            permits: Arc::new(Semaphore::new(capacity)),
            table: Arc::new(Mutex::new(Table::default())),
        }
    }

    fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
        table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection just accepted: a free one, else the slot
    /// of the connection idle longest (which is closed), else the first
    /// to free up once every busy connection's handler runs. `None` when
    /// the semaphore is closed.
    pub async fn admit(&self) -> Option<Slot> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.evict_oldest_idle();
                self.permits.clone().acquire_owned().await.ok()?
            }
        };
        let close = CancellationToken::new();
        let mut t = Self::lock(&self.table);
        let id = t.next_id;
        t.next_id += 1;
        t.conns.insert(
            id,
            Entry {
                idle_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        Some(Slot {
            id,
            table: self.table.clone(),
            close,
            _permit: permit,
        })
    }

    /// Closes the connection idle longest, if any is idle. Returns whether
    /// one was.
    fn evict_oldest_idle(&self) -> bool {
        let t = Self::lock(&self.table);
        let oldest = t
            .conns
            .values()
            .filter(|e| !e.close.is_cancelled())
            .filter_map(|e| e.idle_since.map(|s| (s, e)))
            .min_by_key(|(s, _)| *s);
        match oldest {
            Some((_, e)) => {
                e.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        Self::lock(&self.table).conns.len()
    }
}

impl Slot {
    fn set_idle(&self, idle: bool) {
        let mut t = Slots::lock(&self.table);
        if let Some(e) = t.conns.get_mut(&self.id) {
            e.idle_since = idle.then(Instant::now);
        }
    }

    /// A request is being handled: the connection is not idle.
    pub fn busy(&self) {
        self.set_idle(false);
    }

    /// The response is out: idle again, from now.
    pub fn idle(&self) {
        self.set_idle(true);
    }

    /// Resolves when the connection must close: evicted for a newer one,
    /// or idle for [`IDLE_TIMEOUT`].
    pub async fn must_close(&self) {
        loop {
            let since = Slots::lock(&self.table)
                .conns
                .get(&self.id)
                .and_then(|e| e.idle_since);
            let wake = match since {
                Some(s) if s.elapsed() >= IDLE_TIMEOUT => return,
                Some(s) => s + IDLE_TIMEOUT,
                // Busy: look again after a while (a handler is bounded).
                None => Instant::now() + IDLE_TIMEOUT,
            };
            tokio::select! {
                _ = self.close.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        Slots::lock(&self.table).conns.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_closes_the_oldest_idle_connection() {
        let slots = Slots::new(2);
        let a = slots.admit().await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let b = slots.admit().await.unwrap();
        b.busy();
        // Full: the third takes a's slot (a is idle, b is busy); a is told
        // to close, and its slot frees when its task drops it.
        let third = tokio::spawn({
            let slots = Arc::new(slots);
            let s2 = slots.clone();
            async move { (s2.admit().await.map(|_| ()), slots) }
        });
        tokio::select! {
            _ = a.must_close() => {}
            _ = tokio::time::sleep(Duration::from_millis(1)) => panic!("a was not told to close"),
        }
        drop(a);
        let (got, slots) = third.await.unwrap();
        assert!(got.is_some());
        // b, busy, is never evicted or timed out.
        tokio::select! {
            _ = b.must_close() => panic!("a busy connection was closed"),
            _ = tokio::time::sleep(IDLE_TIMEOUT * 3) => {}
        }
        assert_eq!(slots.in_use(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_idle_timeout() {
        let slots = Slots::new(4);
        let s = slots.admit().await.unwrap();
        let started = Instant::now();
        s.must_close().await;
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
        // A request restarts the clock once it is answered.
        s.busy();
        tokio::time::advance(IDLE_TIMEOUT * 2).await;
        s.idle();
        let again = Instant::now();
        s.must_close().await;
        assert_eq!(again.elapsed(), IDLE_TIMEOUT);
    }
}
