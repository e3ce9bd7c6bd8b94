//! Opening a stream's channel in a task that outlives its dial, and
//! closing what the node confirms after the dial gave up.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::info;

use crate::tunnel::{Conn, NodeTunnel, OpenStream, StreamGuard};

/// Opens a channel on `conn` in a task of its own, so that the open
/// outlives a dial that gives up on it: russh cannot cancel an open
/// (dropping its future leaves the request queued, and a later
/// confirmation would leave a channel open on the node that nobody reads
/// or closes). The answer goes to `reply`; when nobody waits for it any
/// more, a confirmed channel is closed at once and counted. The stream's
/// guard stays held until then, and an abandoned open counts against the
/// node's stream cap (in `abandoned_opens`, no longer in `active_streams`),
/// so a slow-confirming node cannot pile them up. Ends early only when the session
/// ends or the node stops (the channel dies with the session then).
pub(super) async fn open_owned(
    tunnel: Arc<NodeTunnel>,
    conn: Arc<Conn>,
    guard: StreamGuard,
    host: String,
    port: u16,
    originator: SocketAddr,
    mut reply: oneshot::Sender<Result<OpenStream, russh::Error>>,
) {
    let open = conn.handle.channel_open_direct_tcpip(
        host,
        port as u32,
        originator.ip().to_string(),
        originator.port() as u32,
    );
    tokio::pin!(open);
    let mut abandoned = false;
    let result = loop {
        tokio::select! {
            r = &mut open => break r,
            _ = reply.closed(), if !abandoned => {
                // No longer a stream of the node (nobody will use it), but
                // still one against its cap until the node answers.
                abandoned = true;
                tunnel.counters.abandoned_opens.fetch_add(1, Ordering::AcqRel);
                tunnel.counters.active_streams.fetch_sub(1, Ordering::AcqRel);
            }
            _ = conn.ended.cancelled() => break Err(russh::Error::Disconnect),
            _ = tunnel.cancel.cancelled() => break Err(russh::Error::Disconnect),
        }
    };
    if abandoned {
        // Back in the stream count for as long as the guard lives (the
        // late channel's close), which takes it out again.
        tunnel
            .counters
            .active_streams
            .fetch_add(1, Ordering::AcqRel);
        tunnel
            .counters
            .abandoned_opens
            .fetch_sub(1, Ordering::AcqRel);
    }
    let answer = result.map(|channel| OpenStream { channel, guard });
    if let Err(Ok(late)) = reply.send(answer) {
        close_late(&tunnel, late).await;
    }
}

/// Closes a channel the node confirmed after its dial gave up. Nobody
/// reads it: its read half goes first, so the session loop can never park
/// on it, and the close waits for the session's queue as long as the
/// session lives (a session held by a slow reader delays it, never loses
/// it). The stream's guard is released once the close is sent.
pub(super) async fn close_late(tunnel: &NodeTunnel, late: OpenStream) {
    let OpenStream { channel, guard } = late;
    tunnel
        .counters
        .late_opens_closed
        .fetch_add(1, Ordering::Relaxed);
    info!(
        node = %tunnel.node.name,
        "the node confirmed a channel after its dial gave up; closing it"
    );
    let (read_half, write_half) = channel.split();
    drop(read_half);
    tokio::select! {
        _ = write_half.close() => {}
        _ = guard.conn.ended.cancelled() => {}
        _ = tunnel.cancel.cancelled() => {}
    }
    drop(guard);
}
