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
//! writes the queue to the client as fast as the client takes it. A stream is
//! reset (channel closed, client socket closed), and only that stream, when
//! - its client has taken nothing for [`STALL_TIMEOUT`] while more than
//!   [`STALL_FLOOR`] waits for it: a consumer that stopped reading; or
//! - more than [`STREAM_BUFFER_LIMIT`] waits, even though the client is
//!   reading: a consumer persistently slower than its producer.
//!
//! A client that reads a little slower than the node sends (a busy
//! apiserver, a 2-core box) thus keeps its stream up to 64 MiB behind. This
//! is the price of russh's missing per-channel flow control: it re-opens
//! the window on arrival, so the only alternatives are blocking the whole
//! session (head-of-line for every neighbour) or unbounded memory.
//!
//! All streams together are further bounded by [`GLOBAL_BUFFER_LIMIT`], so
//! memory stays bounded however many streams stall at once.
//!
//! The client→node side needs no such care: a channel whose remote window is
//! exhausted only blocks its own writer.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::tunnel::Counters;

/// Bytes a stream may hold for its client, however it reads. Past it the
/// stream is reset.
pub const STREAM_BUFFER_LIMIT: usize = 64 * 1024 * 1024;

/// A stream whose client took no byte for this long, with more than
/// [`STALL_FLOOR`] waiting, is reset: its reader has stopped.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Queued bytes below which a quiet client is never considered stalled.
pub const STALL_FLOOR: usize = 4 * 1024 * 1024;

/// Bytes all streams together may hold for slow clients. Past it, a
/// stream holding more than [`GLOBAL_SHARE_FLOOR`] that wants to grow is
/// reset, so thousands of stalled streams cannot exhaust memory while
/// streams that keep up (with little queued) are never touched.
pub const GLOBAL_BUFFER_LIMIT: usize = 512 * 1024 * 1024;

/// A stream holding less than this is never reset for the global limit.
pub const GLOBAL_SHARE_FLOOR: usize = 1024 * 1024;

/// Bytes queued for clients right now, over all streams.
static BUFFERED: AtomicUsize = AtomicUsize::new(0);

/// Bytes queued for slow clients over all streams (for status and tests).
pub fn buffered_bytes() -> usize {
    BUFFERED.load(Ordering::Relaxed)
}

/// Keeps [`BUFFERED`] in step with one stream's queue, also when the relay
/// future is dropped mid-way. Shared by the two halves of one relay.
struct QueueAccount(AtomicUsize);

impl QueueAccount {
    fn new() -> QueueAccount {
        QueueAccount(AtomicUsize::new(0))
    }
    /// Adds `n`; returns this stream's and all streams' queued bytes.
    fn add(&self, n: usize) -> (usize, usize) {
        let mine = self.0.fetch_add(n, Ordering::Relaxed) + n;
        (mine, BUFFERED.fetch_add(n, Ordering::Relaxed) + n)
    }
    fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
        BUFFERED.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for QueueAccount {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(*self.0.get_mut(), Ordering::Relaxed);
    }
}

/// When the client last made progress; shared by both halves of a relay.
#[derive(Clone, Copy)]
struct StallClock<'a>(&'a std::sync::Mutex<tokio::time::Instant>);

impl StallClock<'_> {
    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
    }
    fn elapsed(&self) -> std::time::Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
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
    /// The client fell more than [`STREAM_BUFFER_LIMIT`] behind; reset.
    ClientTooSlow,
    /// Cancelled by shutdown or node removal.
    Cancelled,
}

/// Relays `client` ⇄ `channel` until both sides are done. `first` holds bytes
/// the client sent right after its CONNECT headers (forwarded first).
pub async fn relay<S>(
    client: S,
    first: Bytes,
    channel: Channel<Msg>,
    counters: &Counters,
    cancel: CancellationToken,
) -> RelayEnd
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut read_half, write_half) = channel.split();
    let (mut cr, mut cw) = tokio::io::split(client);
    let stop = cancel.child_token();

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
    let queued = QueueAccount::new();
    // When the client last took bytes, or the queue was last empty.
    let progress = std::sync::Mutex::new(tokio::time::Instant::now());
    let stalled_since = StallClock(&progress);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let drain = async {
        // Owned here: dropping it when draining ends tells `deliver` to
        // finish the queue and stop.
        let tx = tx;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return None,
                m = read_half.wait() => m,
            };
            match msg {
                Some(ChannelMsg::Data { data }) => {
                    let (mine, total) = queued.add(data.len());
                    if mine == data.len() {
                        // The queue was empty: nothing was owed to the
                        // client until now, so it cannot have stalled.
                        stalled_since.mark();
                    }
                    if mine > STREAM_BUFFER_LIMIT {
                        warn!(
                            buffered = mine,
                            "client is far slower than the node; resetting this stream only"
                        );
                        stop.cancel();
                        return Some(RelayEnd::ClientTooSlow);
                    }
                    if mine > STALL_FLOOR && stalled_since.elapsed() > STALL_TIMEOUT {
                        warn!(
                            buffered = mine,
                            idle = ?stalled_since.elapsed(),
                            "client stopped reading; resetting this stream only"
                        );
                        stop.cancel();
                        return Some(RelayEnd::ClientTooSlow);
                    }
                    if total > GLOBAL_BUFFER_LIMIT && mine > GLOBAL_SHARE_FLOOR {
                        warn!(
                            buffered = mine,
                            all_streams = total,
                            "buffer budget of all streams exhausted; resetting this slow stream"
                        );
                        stop.cancel();
                        return Some(RelayEnd::ClientTooSlow);
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
                queued.sub(n);
                stalled_since.mark();
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
            Some(end) => end,
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
    if cancel.is_cancelled() {
        RelayEnd::Cancelled
    } else {
        end
    }
}
