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
//! writes the queue to the client as fast as the client takes it. The queue is
//! bounded by [`STREAM_BUFFER_LIMIT`]: a client that falls that far behind has
//! its stream reset (channel closed, client socket closed), and only that
//! stream is affected. The limit is the price of russh's missing per-channel
//! flow control: a consumer slower than its producer for longer than the
//! buffer lasts loses its stream instead of stalling its neighbours.
//!
//! All streams together are further bounded by [`GLOBAL_BUFFER_LIMIT`], so
//! memory stays bounded however many streams stall at once.
//!
//! The client→node side needs no such care: a channel whose remote window is
//! exhausted only blocks its own writer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::tunnel::Counters;

/// Bytes a stream may hold for a client that is not reading before the
/// stream is reset. Large enough for bursts of kubectl logs/exec output.
pub const STREAM_BUFFER_LIMIT: usize = 8 * 1024 * 1024;

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
/// future is dropped mid-way.
struct QueueAccount(usize);

impl QueueAccount {
    fn add(&mut self, n: usize) -> usize {
        self.0 += n;
        BUFFERED.fetch_add(n, Ordering::Relaxed) + n
    }
    fn sub(&mut self, n: usize) {
        self.0 -= n;
        BUFFERED.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for QueueAccount {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.0, Ordering::Relaxed);
    }
}

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

    let down = async {
        // node → client, with the channel always drained promptly.
        let mut queue: VecDeque<Bytes> = VecDeque::new();
        let mut queued = QueueAccount(0);
        let mut eof = false;
        let mut closed = false;
        let mut client_shut = false;
        loop {
            if queue.is_empty() {
                if (eof || closed) && !client_shut {
                    let _ = cw.shutdown().await;
                    client_shut = true;
                }
                if closed {
                    // The node closed the channel: nothing more can flow
                    // either way, so stop the client→node side too.
                    stop.cancel();
                    return RelayEnd::Closed;
                }
            }
            let front = queue.front().cloned();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return RelayEnd::Cancelled,
                msg = read_half.wait(), if !closed => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        let total = queued.add(data.len());
                        queue.push_back(data);
                        if queued.0 > STREAM_BUFFER_LIMIT {
                            warn!(buffered = queued.0, "client is not reading; resetting this stream only");
                            stop.cancel();
                            return RelayEnd::ClientTooSlow;
                        }
                        if total > GLOBAL_BUFFER_LIMIT && queued.0 > GLOBAL_SHARE_FLOOR {
                            warn!(buffered = queued.0, all_streams = total, "buffer budget of all streams exhausted; resetting this slow stream");
                            stop.cancel();
                            return RelayEnd::ClientTooSlow;
                        }
                    }
                    Some(ChannelMsg::Eof) => eof = true,
                    Some(ChannelMsg::Close) | None => closed = true,
                    Some(_) => {}
                },
                w = async { cw.write(front.as_deref().unwrap_or_default()).await }, if front.is_some() => match w {
                    Ok(0) | Err(_) => {
                        stop.cancel();
                        return RelayEnd::Cancelled;
                    }
                    Ok(n) => {
                        counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        queued.sub(n);
                        if let Some(f) = queue.front_mut() {
                            if n >= f.len() {
                                queue.pop_front();
                            } else {
                                f.advance(n);
                            }
                        }
                    }
                },
            }
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
