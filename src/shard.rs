//! Shards: one OS thread per shard, each driving its own current-thread
//! tokio runtime, and each node owned by exactly one shard.
//!
//! # Why
//!
//! On a work-stealing runtime every packet of a stream crosses threads:
//! russh's session task, the stream's relay task and the accept loop each
//! wake the others, and the scheduler spreads them over the cores, so each
//! hand-over is a cross-thread wake-up (and some a timer-sized stall). A
//! single `ssh -L` avoids that by being one thread; fast proxies (Envoy's
//! workers, Pingora's no-steal runtime) give each worker thread its own
//! connections. We do the same with the node as the unit of ownership.
//!
//! # The model
//!
//! - [`Shards::start`] starts N threads named `shard-<i>`, each
//!   blocking on a current-thread runtime until [`Shards::stop`]. Tasks
//!   spawned on a shard's [`Handle`] only make progress while that thread
//!   sits in `block_on`, so the shard threads outlive the daemon's graceful
//!   drain: the daemon's own cancellation tree (root token, a child per node
//!   and per stream) ends every task, and only then are the shard threads
//!   told to stop. Their stop token is theirs alone: it is not a node's or
//!   a stream's business when the threads go.
//! - Everything of a node runs on its shard: the supervisor (so the TCP
//!   socket of each session is created, and registered, there), russh's
//!   session task (`connect_stream` spawns it with `tokio::spawn`, i.e. on
//!   the current runtime), the ping loop, the probe, extra sessions, the
//!   hold watchdog, channel opens and every relay of its streams. The
//!   per-packet path (socket → russh → channel → relay → client socket)
//!   thereby never leaves one thread.
//! - The control runtime (admin API, discovery, metrics, reload) is
//!   another thread. It reaches shards by message (spawning a task on a
//!   shard's handle, cancelling a token, a command channel) or through
//!   shared atomics, never by holding a lock a shard's hot path takes.
//! - Every shard accepts on every listener (a clone of the socket each)
//!   and reads and routes the CONNECT heads it accepted. A stream whose
//!   node lives on the accepting shard never leaves it.
//! - Any other client connection moves to its node's shard once, after its
//!   head is parsed and routed: [`Movable::detach`] deregisters it from the
//!   accepting shard's reactor, a task on the shard re-registers it there
//!   ([`Movable::attach`]). One hand-off per stream, none per packet. A TLS
//!   client moves with its whole TLS state: its IO is a [`MovableTcp`],
//!   swapped from a registered socket to a plain one and back underneath
//!   the unchanged `TlsStream`.
//!
//! # Placement
//!
//! A new node goes to the shard with the fewest nodes (the lowest index on
//! a tie) and keeps it for its whole life: reconnects, extra sessions and
//! its drain all stay there. Removing a node frees its place when its last
//! handle goes (its drain is over); no live node is ever moved, since
//! moving would cut its streams. New nodes fill the gaps, so after churn
//! the spread evens out again as nodes come and go.
//!
//! # Checking it
//!
//! Each shard thread carries a thread-local "current shard". Work that
//! must run on a node's shard (every task of the node, every relay, russh's
//! callbacks) checks it, and any that finds itself elsewhere is counted in
//! [`misplaced_total`] (`tunneler_shard_misplaced_total`), which must stay
//! 0. Streams are counted on the shard whose thread relays them, so the
//! per-shard stream counters show where the relays really ran.

use std::cell::OnceCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Figures of one shard, shared with metrics and status.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Nodes placed on this shard now.
    nodes: AtomicUsize,
    /// Client streams relayed by this shard's thread now.
    active_streams: AtomicU64,
    /// Client streams relayed by this shard's thread since start.
    total_streams: AtomicU64,
    /// Client connections accepted on another shard and moved here.
    moved_in: AtomicU64,
}

/// A snapshot of one shard's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLoad {
    /// The shard's index.
    pub shard: usize,
    /// Nodes placed on it now.
    pub nodes: usize,
    /// Client streams its thread relays now.
    pub active_streams: u64,
    /// Client streams its thread relayed since start.
    pub total_streams: u64,
    /// Client connections accepted on another shard and moved here since
    /// start (the rest of its streams were accepted on it).
    pub moved_in: u64,
}

struct Current {
    id: usize,
    stats: Arc<ShardStats>,
}

thread_local! {
    static CURRENT: OnceCell<Current> = const { OnceCell::new() };
}

static MISPLACED: AtomicU64 = AtomicU64::new(0);
static MISPLACED_LOGGED: AtomicBool = AtomicBool::new(false);

/// The shard whose thread this is; `None` on the control thread (and in
/// anything that is not a shard thread).
pub fn current() -> Option<usize> {
    CURRENT.with(|c| c.get().map(|c| c.id))
}

/// Work that belongs on `expected` found itself on this thread: counted
/// unless they match. Returns whether they do.
pub fn check(expected: Option<usize>) -> bool {
    let here = current();
    if here == expected {
        return true;
    }
    MISPLACED.fetch_add(1, Ordering::Relaxed);
    if !MISPLACED_LOGGED.swap(true, Ordering::Relaxed) {
        warn!(
            ?expected,
            ?here,
            "work of a node ran outside its shard (counted in tunneler_shard_misplaced_total; logged once)"
        );
    }
    false
}

/// How often work found itself outside its node's shard since start.
pub fn misplaced_total() -> u64 {
    MISPLACED.load(Ordering::Relaxed)
}

/// Counts one client stream on the shard whose thread relays it, until
/// dropped. On a thread that is no shard nothing is counted (and
/// [`check`] has counted the misplacement already).
pub fn stream_started() -> StreamCount {
    let stats = CURRENT.with(|c| c.get().map(|c| c.stats.clone()));
    if let Some(s) = &stats {
        s.active_streams.fetch_add(1, Ordering::Relaxed);
        s.total_streams.fetch_add(1, Ordering::Relaxed);
    }
    StreamCount(stats)
}

/// See [`stream_started`].
#[derive(Debug)]
pub struct StreamCount(Option<Arc<ShardStats>>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.active_streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A cheap handle on one shard: spawn work there.
#[derive(Clone)]
pub struct ShardHandle {
    id: usize,
    handle: Handle,
    stats: Arc<ShardStats>,
}

impl std::fmt::Debug for ShardHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {}", self.id)
    }
}

impl ShardHandle {
    /// The shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Whether this is the calling thread's shard.
    pub fn is_current(&self) -> bool {
        current() == Some(self.id)
    }

    /// Counts a client connection moved here from the shard that
    /// accepted it.
    pub fn count_moved_in(&self) {
        self.stats.moved_in.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `task` on this shard, tracked by `tracker`. Every poll checks
    /// that it runs on this shard's thread (see [`check`]).
    pub fn spawn<F>(&self, tracker: &TaskTracker, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        tracker.spawn_on(
            Placed {
                shard: Some(self.id),
                task: Box::pin(task),
            },
            &self.handle,
        )
    }

    fn load(&self) -> ShardLoad {
        ShardLoad {
            shard: self.id,
            nodes: self.stats.nodes.load(Ordering::Relaxed),
            active_streams: self.stats.active_streams.load(Ordering::Relaxed),
            total_streams: self.stats.total_streams.load(Ordering::Relaxed),
            moved_in: self.stats.moved_in.load(Ordering::Relaxed),
        }
    }
}

/// A future that checks, on every poll, that it runs on its shard.
struct Placed<F: Future> {
    shard: Option<usize>,
    task: Pin<Box<F>>,
}

impl<F: Future> Future for Placed<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        check(self.shard);
        self.task.as_mut().poll(cx)
    }
}

/// A node's place on a shard, held by the node for its whole life. Dropping
/// it (the node's last handle is gone) frees the place for a new node.
#[derive(Debug)]
pub struct NodePlacement {
    shard: ShardHandle,
}

impl NodePlacement {
    /// The node's shard.
    pub fn shard(&self) -> &ShardHandle {
        &self.shard
    }
}

impl Drop for NodePlacement {
    fn drop(&mut self) {
        self.shard.stats.nodes.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Index of the entry with the fewest nodes; the lowest index on a tie.
fn least_loaded(nodes: impl Iterator<Item = usize>) -> Option<usize> {
    nodes
        .enumerate()
        .min_by_key(|&(i, n)| (n, i))
        .map(|(i, _)| i)
}

/// The shard threads and where nodes go.
pub struct Shards {
    shards: Vec<ShardHandle>,
    /// Serialises placements so two new nodes never both see the same gap.
    placing: Mutex<()>,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Each thread sends once its runtime is gone.
    finished: Mutex<std::sync::mpsc::Receiver<usize>>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} shard(s)", self.shards.len())
    }
}

/// How long a stopping shard lets its runtime's leftover tasks and
/// blocking jobs finish before the thread gives up on them.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

impl Shards {
    /// Starts `n` (at least 1) shard threads, each with a current-thread
    /// runtime. Fails when a thread or a runtime cannot be created; the
    /// threads started so far are stopped again.
    pub fn start(n: usize) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut shards = Shards {
            shards: Vec::new(),
            placing: Mutex::new(()),
            stop: stop.clone(),
            threads: Mutex::new(Vec::new()),
            finished: Mutex::new(done_rx),
        };
        for id in 0..n.max(1) {
            let stats = Arc::new(ShardStats::default());
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Handle>>(1);
            let thread_stats = stats.clone();
            let thread_stop = stop.clone();
            let done = done_tx.clone();
            let thread = std::thread::Builder::new()
                // Short: the kernel keeps 15 bytes of a thread name, and
                // "tunneler-shard-0" showed as "tunneler-shard-" for all.
                .name(format!("shard-{id}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            let _ = done.send(id);
                            return;
                        }
                    };
                    CURRENT.with(|c| {
                        let _ = c.set(Current {
                            id,
                            stats: thread_stats,
                        });
                    });
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(thread_stop.cancelled());
                    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
                    let _ = done.send(id);
                })?;
            shards
                .threads
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .push(thread);
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("shard thread ended before its runtime started"))??;
            shards.shards.push(ShardHandle { id, handle, stats });
        }
        Ok(shards)
    }

    /// The shards' runtime handles (for the task count).
    pub fn handles(&self) -> Vec<Handle> {
        self.shards.iter().map(|s| s.handle.clone()).collect()
    }

    /// Every shard, by index.
    pub fn all(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Places a new node on the least loaded shard (fewest nodes).
    pub fn place(&self) -> NodePlacement {
        let _one_at_a_time = self.placing.lock().unwrap_or_else(|e| e.into_inner());
        let i = least_loaded(
            self.shards
                .iter()
                .map(|s| s.stats.nodes.load(Ordering::Relaxed)),
        )
        .unwrap_or(0);
        let shard = self.shards[i].clone();
        shard.stats.nodes.fetch_add(1, Ordering::Relaxed);
        NodePlacement { shard }
    }

    /// Every shard's figures, by index.
    pub fn loads(&self) -> Vec<ShardLoad> {
        self.shards.iter().map(ShardHandle::load).collect()
    }

    /// True when every shard runs a no-op task within `limit`: no shard
    /// thread is wedged (for the systemd watchdog).
    pub async fn responsive(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        for s in &self.shards {
            let ping = s.handle.spawn(async {});
            if !matches!(tokio::time::timeout_at(deadline, ping).await, Ok(Ok(()))) {
                return false;
            }
        }
        true
    }

    /// Stops every shard thread: their runtimes drop whatever is left on
    /// them. Call it after the daemon's graceful drain. Waits at most
    /// `limit` for the threads (a thread still stuck then is left to the
    /// process exit); calling it again does nothing.
    pub fn stop(&self, limit: Duration) {
        self.stop.cancel();
        let mut threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if threads.is_empty() {
            return;
        }
        let deadline = Instant::now() + limit;
        let finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        while done < threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match finished.recv_timeout(left) {
                Ok(_) => done += 1,
                Err(_) => {
                    warn!(
                        stuck = threads.len() - done,
                        "shard threads did not stop in time; exiting without them"
                    );
                    return;
                }
            }
        }
        for t in threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop(RUNTIME_SHUTDOWN * 2);
    }
}

/// A client connection that can move from one runtime to another: taken
/// off its reactor on the sending side, registered again on the receiving
/// one. Everything in it (bytes buffered, TLS state) moves intact.
pub trait Movable: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The connection while it belongs to no runtime.
    type Detached: Send + 'static;
    /// Deregisters the connection from the current runtime's reactor.
    fn detach(self) -> io::Result<Self::Detached>;
    /// Registers it with the current runtime's reactor; must run inside
    /// the runtime that will drive it.
    fn attach(d: Self::Detached) -> io::Result<Self>;
    /// Ends the connection so that the client reads a failure, not an end
    /// of data: a stream cut short must never look complete. On TCP that
    /// is a reset (`SO_LINGER` 0, then close), which also discards what
    /// the client had not received yet. On TLS the same, and no
    /// `close_notify`. A Unix stream socket has no reset: the client reads
    /// `ECONNRESET` only if bytes it sent are still unread here, else EOF
    /// (docs/operations.md says what each listener shows).
    fn cut(self);
}

/// Resets a TCP connection on close. Zero linger never blocks the close.
fn reset_on_close(s: &tokio::net::TcpStream) {
    if let Err(e) = s.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set SO_LINGER 0; the client gets a FIN instead of a reset");
    }
}

impl Movable for tokio::net::TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> io::Result<std::net::TcpStream> {
        // Stays non-blocking, as from_std needs it.
        self.into_std()
    }
    fn attach(d: std::net::TcpStream) -> io::Result<Self> {
        tokio::net::TcpStream::from_std(d)
    }
    fn cut(self) {
        reset_on_close(&self);
    }
}

impl Movable for tokio::net::UnixStream {
    type Detached = std::os::unix::net::UnixStream;
    fn detach(self) -> io::Result<std::os::unix::net::UnixStream> {
        self.into_std()
    }
    fn attach(d: std::os::unix::net::UnixStream) -> io::Result<Self> {
        tokio::net::UnixStream::from_std(d)
    }
    fn cut(self) {
        // Closed without shutting down and without reading what the client
        // sent since the relay stopped: unread bytes make the kernel report
        // ECONNRESET, the only failure a Unix stream socket can carry.
    }
}

/// The TCP socket under a TLS client connection, swappable between a
/// registered socket and a plain one while the `TlsStream` above it (and
/// its TLS state) stays untouched.
#[derive(Debug)]
pub enum MovableTcp {
    /// Registered with the runtime that drives it.
    Attached(tokio::net::TcpStream),
    /// Between runtimes.
    Detached(std::net::TcpStream),
    /// Only during a swap.
    Swapping,
}

impl MovableTcp {
    fn attached(&mut self) -> io::Result<&mut tokio::net::TcpStream> {
        match self {
            MovableTcp::Attached(s) => Ok(s),
            _ => Err(io::Error::other("the connection is between shards")),
        }
    }

    fn swap(&mut self, f: impl FnOnce(MovableTcp) -> io::Result<MovableTcp>) -> io::Result<()> {
        let old = std::mem::replace(self, MovableTcp::Swapping);
        *self = f(old)?;
        Ok(())
    }
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().attached() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().attached() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().attached() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().attached() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().attached() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// A TLS client connection between shards.
pub struct DetachedTls(Box<tokio_rustls::server::TlsStream<MovableTcp>>);

impl Movable for tokio_rustls::server::TlsStream<MovableTcp> {
    type Detached = DetachedTls;
    fn detach(mut self) -> io::Result<DetachedTls> {
        self.get_mut().0.swap(|io| match io {
            MovableTcp::Attached(s) => Ok(MovableTcp::Detached(s.into_std()?)),
            _ => Err(io::Error::other("TLS connection detached twice")),
        })?;
        Ok(DetachedTls(Box::new(self)))
    }
    fn attach(d: DetachedTls) -> io::Result<Self> {
        let mut tls = *d.0;
        tls.get_mut().0.swap(|io| match io {
            MovableTcp::Detached(s) => {
                Ok(MovableTcp::Attached(tokio::net::TcpStream::from_std(s)?))
            }
            _ => Err(io::Error::other("TLS connection attached twice")),
        })?;
        Ok(tls)
    }
    fn cut(self) {
        // Dropped without `shutdown`, so rustls never sends close_notify.
        if let MovableTcp::Attached(s) = &self.get_ref().0 {
            reset_on_close(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_takes_the_fewest_and_the_lowest_index_on_a_tie() {
        assert_eq!(least_loaded([].into_iter()), None);
        assert_eq!(least_loaded([0, 0].into_iter()), Some(0));
        assert_eq!(least_loaded([1, 0].into_iter()), Some(1));
        assert_eq!(least_loaded([2, 1, 1].into_iter()), Some(1));
        assert_eq!(least_loaded([3, 3, 2, 5].into_iter()), Some(2));
    }

    #[test]
    fn nodes_fill_the_least_loaded_shard_and_gaps_are_refilled() {
        let shards = Shards::start(3).expect("shards");
        let ids = |p: &[NodePlacement]| p.iter().map(|p| p.shard().id()).collect::<Vec<_>>();
        let mut placed: Vec<NodePlacement> = (0..7).map(|_| shards.place()).collect();
        assert_eq!(ids(&placed), [0, 1, 2, 0, 1, 2, 0]);
        let nodes = |s: &Shards| s.loads().iter().map(|l| l.nodes).collect::<Vec<_>>();
        assert_eq!(nodes(&shards), [3, 2, 2]);
        // Removing nodes moves nobody; the next new nodes fill the gaps.
        let gone = placed.remove(1); // shard 1
        drop(gone);
        let gone = placed.remove(1); // shard 2
        drop(gone);
        assert_eq!(nodes(&shards), [3, 1, 1]);
        assert_eq!(ids(&placed), [0, 0, 1, 2, 0]);
        let a = shards.place();
        let b = shards.place();
        assert_eq!((a.shard().id(), b.shard().id()), (1, 2));
        assert_eq!(nodes(&shards), [3, 2, 2]);
        shards.stop(Duration::from_secs(5));
    }

    #[test]
    fn tasks_run_on_their_shard_thread_and_counts_follow_the_thread() {
        let shards = Shards::start(2).expect("shards");
        let tracker = TaskTracker::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let before = misplaced_total();
        let p = shards.place();
        let q = shards.place();
        rt.block_on(async {
            for pl in [&p, &q] {
                let want = pl.shard().id();
                let (here, name) = pl
                    .shard()
                    .spawn(&tracker, async move {
                        let _s = stream_started();
                        (current(), std::thread::current().name().map(str::to_string))
                    })
                    .await
                    .expect("task");
                assert_eq!(here, Some(want));
                assert_eq!(name, Some(format!("shard-{want}")));
            }
            assert!(shards.responsive(Duration::from_secs(5)).await);
        });
        // The test thread is no shard.
        assert_eq!(current(), None);
        let loads = shards.loads();
        assert_eq!(
            loads.iter().map(|l| l.total_streams).collect::<Vec<_>>(),
            [1, 1]
        );
        assert_eq!(
            loads.iter().map(|l| l.active_streams).collect::<Vec<_>>(),
            [0, 0]
        );
        // Other tests in this binary may run concurrently but none runs
        // work off its shard.
        assert_eq!(misplaced_total(), before);
        assert!(!check(Some(0)));
        assert!(misplaced_total() > before);
        shards.stop(Duration::from_secs(5));
    }
}
