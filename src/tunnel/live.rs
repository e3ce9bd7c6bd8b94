//! A live session's own tasks: installing it in its slot with its
//! keepalive ping and hold watchdog, retiring and closing it, and the
//! extra sessions opened on demand while every other one is congested.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::Disconnect;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::ssh::context::SshContext;
use crate::ssh::session::{self, Session};
use crate::tunnel::{Conn, NodeTunnel, SessionLoad, SESSION_IDS};

/// Disconnects a replaced session once its streams are done (or the drain
/// timeout passes, or the session dies on its own).
pub(super) async fn retire(
    conn: Arc<Conn>,
    ended: CancellationToken,
    limit: Duration,
    why: &'static str,
) {
    let drained = tokio::select! {
        d = conn.wait_idle(limit) => d,
        _ = ended.cancelled() => return,
    };
    if !drained {
        warn!(
            streams = conn.streams.load(Ordering::Relaxed),
            ?limit,
            "drain timeout: closing the old session with streams still open"
        );
    }
    close_session(&conn, why).await;
    debug!(drained, "old session closed");
}

/// Stops the session's relays (one may be parking its loop), then
/// disconnects, bounded: russh has no timeout of its own.
pub(super) async fn close_session(conn: &Conn, why: &str) {
    conn.load.closing.cancel();
    let bye = conn.handle.disconnect(Disconnect::ByApplication, why, "");
    if tokio::time::timeout(Duration::from_secs(5), bye)
        .await
        .is_err()
    {
        warn!("disconnect did not complete within 5s; dropping the session");
    }
}

/// An extra session: opened once on demand (never retried; a failure
/// cools the node down for a while), it serves until it has carried no
/// stream and no congestion for `ssh.extra_session_idle`, the session ends,
/// or the node stops. It stays out of the node's state: the supervised
/// sessions say whether the node is up.
pub(super) async fn extra_session(tunnel: Arc<NodeTunnel>, slot: usize) {
    let ctx = tunnel.ctx.load_full();
    // The drain timeout in force when the session opens, as with `ctx`.
    let drain_timeout = tunnel.settings.load().drain_timeout;
    let cancel = tunnel.cancel.clone();
    let attempt = tokio::select! {
        _ = cancel.cancelled() => None,
        r = session::connect(&tunnel.node, &ctx, tunnel.known_rtt()) => Some(r),
    };
    let session = match attempt {
        Some(Ok(s)) => {
            tunnel.counters.opens.fetch_add(1, Ordering::Relaxed);
            s
        }
        other => {
            if let Some(Err(e)) = other {
                tunnel.counters.count_attempt(&Err::<Session, _>(e.clone()));
                info!(error = %e, "extra session failed; new streams share the congested ones for 10s");
                *tunnel
                    .extra_cooldown
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + EXTRA_COOLDOWN);
            }
            tunnel.opening_extra.store(false, Ordering::Release);
            tunnel.extra_ready.notify_waiters();
            return;
        }
    };
    let (conn, ended, end_reason) = install(&tunnel, slot, session, &ctx, &tunnel.tracker);
    tunnel.opening_extra.store(false, Ordering::Release);
    tunnel.extra_ready.notify_waiters();
    info!("extra session open: every other session of the node is congested");
    let idle_for = ctx.ssh.extra_session_idle;
    let every = (idle_for / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                tunnel.conns[slot].store(None);
                close_session(&conn, "tunneler shutting down").await;
                return;
            }
            _ = ended.cancelled() => {
                tunnel.conns[slot].store(None);
                info!(reason = %Session::reason(&end_reason), "extra session ended");
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
        if conn.streams.load(Ordering::Acquire) == 0 && !conn.load.congested() {
            if idle_since.get_or_insert_with(Instant::now).elapsed() >= idle_for {
                break;
            }
        } else {
            idle_since = None;
        }
    }
    tunnel.conns[slot].store(None);
    info!(?idle_for, "extra session idle: closing it");
    retire(conn, ended, drain_timeout, "extra session idle").await;
}

/// How long a failed extra session keeps the node from trying another.
const EXTRA_COOLDOWN: Duration = Duration::from_secs(10);

/// How long after a ping's answer the next ping goes out: a quarter
/// earlier than russh's own keepalive would.
///
/// russh sends `keepalive@openssh.com` once the session has been quiet for
/// `keepalive_interval`, and any packet from the node (the answer to our
/// ping, too) restarts that wait. With both on the same period, on an idle
/// link the two requests left together, and sshd answered them with two
/// small writes. sshd sets no `TCP_NODELAY` on a connection without an
/// interactive session, so Nagle held the second answer until our side
/// acknowledged the first, and Linux delays that acknowledgement by 40 ms:
/// `rtt_ms` read 40 to 50 ms on a link whose round trip is 0.05 ms. Pinging
/// first keeps the link from ever being quiet for `keepalive_interval`, so
/// on an idle link our ping is the only request and russh's keepalive only
/// fires when the node stopped answering (its liveness verdict is
/// unchanged), and the link carries one request per period instead of two.
pub(crate) fn ping_period(every: Duration) -> Duration {
    every.mul_f64(0.75)
}

/// How long the first ping waits for the node's host key announcement.
const FIRST_PING_WAIT: Duration = Duration::from_millis(500);

/// Measures the keepalive round trip while a session is up.
async fn ping_loop(
    tunnel: Arc<NodeTunnel>,
    conn: Arc<Conn>,
    every: Duration,
    stop: CancellationToken,
    announced: CancellationToken,
) {
    // The first ping waits for the node's post-authentication host key
    // announcement (bounded: a server may send none). Sent before it, the
    // ping's answer queued behind the announcement in sshd's Nagle until
    // our delayed ACK of the announcement (40 ms on Linux): the first
    // `rtt_ms` read 41 to 48 ms on a 0.3 ms link.
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = announced.cancelled() => {}
        _ = tokio::time::sleep(FIRST_PING_WAIT) => {}
    }
    loop {
        if conn.load.is_held() {
            // Our own backpressure parks the session loop: a ping now
            // would only time out and show a healthy node as unreachable.
            // Keep the last round trip and look again later.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            continue;
        }
        let t0 = Instant::now();
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(every.max(Duration::from_secs(1)) * 3, conn.handle.send_ping()) => matches!(r, Ok(Ok(()))),
        };
        let rtt = ok.then(|| t0.elapsed());
        if let Some(r) = rtt {
            let ns = u64::try_from(r.as_nanos()).unwrap_or(u64::MAX - 1);
            tunnel.min_rtt_ns.fetch_min(ns, Ordering::Relaxed);
        }
        tunnel.state.send_modify(|s| s.rtt = rtt);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ping_period(every)) => {}
        }
    }
}

/// Makes `handle` the live session: new streams go to it from now on, and
/// its keepalive round trip is measured (and, while a slow reader holds
/// it, the kernel's liveness verdict watched) until the session ends.
/// Hands back the session's end token and end reason, for the caller's
/// wait.
pub(super) fn install(
    tunnel: &Arc<NodeTunnel>,
    slot: usize,
    session: Session,
    ctx: &SshContext,
    tracker: &TaskTracker,
) -> (Arc<Conn>, CancellationToken, EndReason) {
    let Session {
        handle,
        ended,
        end_reason,
        watch,
        window,
        announced,
    } = session;
    let conn = Arc::new(Conn {
        id: SESSION_IDS.fetch_add(1, Ordering::Relaxed),
        handle,
        ended: ended.clone(),
        streams: AtomicU64::new(0),
        idle: Notify::new(),
        load: Arc::new(SessionLoad::default()),
        window,
    });
    let out = (conn.clone(), ended.clone(), end_reason);
    tunnel.conns[slot].store(Some(conn.clone()));
    let stop = ended.clone();
    let cancel = tunnel.cancel.clone();
    let t = tunnel.clone();
    let c = conn.clone();
    let every = ctx.ssh.keepalive_interval;
    let shard = tunnel.shard();
    shard.spawn(
        tracker,
        async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = ping_loop(t, c, every, stop, announced) => {}
            }
        }
        .in_current_span(),
    );
    if let Some(watch) = watch {
        let c = conn.clone();
        let cancel = tunnel.cancel.clone();
        shard.spawn(
            tracker,
            async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = hold_watchdog(c, watch, every, ended) => {}
                }
            }
            .in_current_span(),
        );
    }
    out
}

/// Why a session ended, filled in by its handler.
pub(super) type EndReason = Arc<Mutex<Option<String>>>;

/// While a slow reader holds the session (russh's loop parked, so its
/// keepalive verdict paused), reads the kernel's verdict on the socket
/// every `every`: TCP keepalive probes and the user timeout keep running
/// whether we read or not. On an error the node is gone: stop the
/// session's relays (that unparks the loop, which then reads the error and
/// ends) and shut the socket. Owns the second handle on the socket and
/// drops it when the session ends, so the socket closes with russh's.
/// A session that is not held costs no wake-up here: with thousands of
/// idle nodes, a timer per session would double the keepalive's.
async fn hold_watchdog(
    conn: Arc<Conn>,
    watch: std::net::TcpStream,
    every: Duration,
    ended: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = ended.cancelled() => return,
            _ = conn.load.hold_started.notified() => {}
        }
        // A permit left from a hold that has already ended finds nothing.
        while conn.load.is_held() {
            tokio::select! {
                _ = ended.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !conn.load.is_held() {
                break;
            }
            let err = match watch.take_error() {
                Ok(None) => continue,
                Ok(Some(e)) | Err(e) => e,
            };
            warn!(error = %err, "the node stopped answering while a slow reader held the session; closing it");
            conn.load.closing.cancel();
            let _ = watch.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
