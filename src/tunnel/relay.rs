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
//! Every byte is counted *before* it is queued, in its session's floor or
//! against the shared [`RelayBudget`]; `flow` holds that accounting and
//! the bounds it keeps.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::config::RelayLimits;
use crate::tunnel::flow::{Account, Admit, Riding};
pub use crate::tunnel::flow::{BudgetStats, RelayBudget};
use crate::tunnel::stream_stats::StreamStats;
use crate::tunnel::{Counters, SessionLoad};

/// How long closing the channel may wait for the session loop.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let up = upstream(first, &mut cr, &write_half, &stop, counters, stats, &flags);

    // node → client, in two halves: `drain` takes what russh hands over
    // while the account admits it (and stops taking, on purpose, while it
    // does not), and `deliver` writes the queue to the client as fast as
    // the client takes it, several chunks per syscall. They run
    // concurrently, so delivery never waits for the channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let drain = drain(read_half, tx, &account, session, &stop);
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

/// client → node: forwards `first`, then every client read, until the
/// client's EOF (sent on as the channel's EOF), a failed read (the client
/// is gone: the relay stops) or a failed channel write (this direction
/// stops; the drain learns why from the channel).
async fn upstream<R: AsyncRead + Unpin>(
    first: Bytes,
    cr: &mut R,
    write_half: &ChannelWriteHalf<Msg>,
    stop: &CancellationToken,
    counters: &Counters,
    stats: &StreamStats,
    flags: &Flags,
) {
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
}

/// node → client, the channel's half: takes what russh hands over while
/// `account` admits it (and stops taking, on purpose, while it does not),
/// queueing it for `deliver`; an empty chunk marks the node's EOF.
///
/// Owns the read half and the queue's sender: dropping them when draining
/// ends tells `deliver` to finish the queue, and russh that nobody reads
/// this channel any more (so its session loop can never park on it again).
async fn drain(
    mut read_half: ChannelReadHalf,
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    account: &Account<'_>,
    session: &SessionLoad,
    stop: &CancellationToken,
) -> Drained {
    let mut eof = false;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Drained::Stopped,
            m = read_half.wait() => m,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                match account.admit(data.len(), stop).await {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let a = Account::new(&b, &s, &c, &crate::tunnel::flow::test_limits(8 * MIB, MIB));
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
}
