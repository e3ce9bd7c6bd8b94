//! One supervised SSH tunnel per node.
//!
//! [`NodeTunnel`] is the cheap shared handle the proxy and the admin API use;
//! [`NodeTunnel::spawn`] starts the actor that owns the connection's whole
//! life: connect → verify host key → authenticate → serve → back off → again.
//! It never gives up on a node that is still configured. Cancelling the
//! node's token stops it and disconnects the session.
//!
//! A planned reconnect is make-before-break: the actor opens the new session
//! while the old one serves, switches new streams to it, and lets the old one
//! drain (bounded by the drain timeout) before disconnecting it.
//!
//! # Files
//!
//! - here: the handle, its sessions and where a new stream goes;
//! - `state`: the state enum and its transitions, without I/O;
//! - `supervisor`: the actor loop, behind the `Connect` trait;
//! - `live`: a live session's tasks (keepalive ping, hold watchdog,
//!   retire, close) and the extra sessions opened on demand;
//! - `open`: a channel open that outlives its dial;
//! - `load`: what sessions and streams count (load, congestion, counters);
//! - `settings`: the tunnel's own settings (backoff, probe, drain), beside
//!   the SSH context its sessions share;
//! - `backoff`, `probe`; `relay` one stream over one channel, with `flow`
//!   its flow-control accounting, and `stream_stats` its own figures.

pub(crate) mod backoff;
mod flow;
mod live;
mod load;
mod open;
pub(crate) mod probe;
pub(crate) mod relay;
mod settings;
mod state;
pub(crate) mod stream_stats;
mod supervisor;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use russh::client::{self, Handle};
use russh::Channel;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, Instrument};

use crate::config::NodeConfig;
use crate::error::{channel_open_reason, TunnelError};
use crate::ssh::context::SharedContext;
use crate::ssh::session::ClientHandler;
pub use crate::tunnel::load::{Congestion, Counters, SessionLoad};
use crate::tunnel::probe::Probed;
pub use crate::tunnel::settings::{SettingsCell, SharedSettings, TunnelSettings};
use crate::tunnel::state::Link;
pub use crate::tunnel::state::{StateInfo, TunnelState};

/// A connected, authenticated session and the streams riding on it.
pub struct Conn {
    /// Unique in the process, so that an access record and the stream
    /// list can tell which of a node's sessions carried a stream.
    id: u64,
    handle: Handle<ClientHandler>,
    /// Fires when the session has ended, whoever ended it.
    ended: CancellationToken,
    streams: AtomicU64,
    idle: Notify,
    load: Arc<SessionLoad>,
    /// The SSH window of this session's channels (fixed at connect).
    window: u32,
}

impl Conn {
    async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.streams.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.streams.load(Ordering::Acquire) == 0;
            }
        }
    }
}

/// Commands to the actor.
pub(crate) enum Command {
    Reconnect(oneshot::Sender<Result<(), TunnelError>>),
}

/// An open channel plus the accounting that ends with it: dropping the
/// guard decrements the node's and the session's stream counts.
pub struct OpenStream {
    /// The channel.
    pub channel: Channel<client::Msg>,
    /// Decrements counts on drop.
    pub guard: StreamGuard,
}

/// See [`OpenStream`].
pub struct StreamGuard {
    tunnel: Arc<NodeTunnel>,
    conn: Arc<Conn>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.tunnel
            .counters
            .active_streams
            .fetch_sub(1, Ordering::Relaxed);
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.idle.notify_waiters();
        }
    }
}

impl StreamGuard {
    /// The tunnel this stream belongs to.
    pub fn tunnel(&self) -> &Arc<NodeTunnel> {
        &self.tunnel
    }

    /// The load of the SSH session this stream rides on.
    pub fn session(&self) -> &SessionLoad {
        &self.conn.load
    }

    /// The id of the SSH session this stream rides on.
    pub fn session_id(&self) -> u64 {
        self.conn.id
    }
}

/// Session ids, from 1; never reused while the process lives.
static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// The shared handle to one node's tunnel.
pub struct NodeTunnel {
    /// The node's settings.
    pub node: NodeConfig,
    state: watch::Sender<StateInfo>,
    /// One live session per connection slot. Streams are spread over them
    /// (least loaded first), so concurrent streams use several cores and a
    /// heavy stream shares its session's loop with fewer neighbours. Slots
    /// from `supervised` on hold extra sessions, opened on demand while
    /// every session is congested and closed when idle.
    conns: Vec<ArcSwapOption<Conn>>,
    supervised: usize,
    /// One extra session is being opened (no stampede).
    opening_extra: AtomicBool,
    /// A failed extra keeps new ones from being tried until then.
    extra_cooldown: Mutex<Option<Instant>>,
    /// Notified when an extra session opens or fails.
    extra_ready: Notify,
    ctx: SharedContext,
    /// The tunnel's own settings (backoff, probe, drain).
    settings: SharedSettings,
    tracker: TaskTracker,
    /// Stream and byte counters.
    pub counters: Counters,
    cancel: CancellationToken,
    commands: Vec<mpsc::Sender<Command>>,
    /// The shard that runs everything of this node, for its whole life.
    placement: crate::shard::NodePlacement,
    /// The lowest keepalive round trip the node has shown, in ns
    /// (`u64::MAX`: none yet). The next session's window is sized from it
    /// and the TCP handshake, whichever is lower: a stall inflates a
    /// sample, nothing deflates one.
    min_rtt_ns: AtomicU64,
}

impl std::fmt::Debug for NodeTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTunnel")
            .field("node", &self.node.name)
            .field("state", &self.state.borrow().state)
            .finish()
    }
}

impl NodeTunnel {
    /// Creates the handle and starts the supervising actor (and the health
    /// probe, when configured) on `tracker`, on the node's shard: every
    /// task of the node runs there (see `shard`). Both stop when `cancel`
    /// fires. `ctx` is what its SSH sessions share, `settings` the
    /// tunnel's own (backoff, probe, drain).
    pub fn spawn(
        node: NodeConfig,
        ctx: SharedContext,
        settings: SharedSettings,
        cancel: CancellationToken,
        tracker: &TaskTracker,
        placement: crate::shard::NodePlacement,
    ) -> Arc<NodeTunnel> {
        let n = ctx.load().ssh.connections_per_node.max(1);
        let max = ctx.load().ssh.max_connections_per_node.max(n);
        let (state, _) = watch::channel(StateInfo::connecting(n));
        let mut commands = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(4);
            commands.push(tx);
            receivers.push(rx);
        }
        let tunnel = Arc::new(NodeTunnel {
            node,
            state,
            conns: (0..max).map(|_| ArcSwapOption::empty()).collect(),
            supervised: n,
            opening_extra: AtomicBool::new(false),
            extra_cooldown: Mutex::new(None),
            extra_ready: Notify::new(),
            ctx: ctx.clone(),
            settings: settings.clone(),
            tracker: tracker.clone(),
            counters: Counters::default(),
            cancel,
            commands,
            placement,
            min_rtt_ns: AtomicU64::new(u64::MAX),
        });
        let shard = tunnel.shard().clone();
        let span = info_span!("node", node = %tunnel.node.name, shard = shard.id());
        for (slot, rx) in receivers.into_iter().enumerate() {
            let slot_span = if n > 1 {
                tracing::info_span!(parent: &span, "conn", slot)
            } else {
                span.clone()
            };
            shard.spawn(
                tracker,
                supervisor::supervise(
                    supervisor::Node {
                        tunnel: tunnel.clone(),
                        shared: ctx.clone(),
                        settings: settings.clone(),
                        tracker: tracker.clone(),
                    },
                    slot,
                    rx,
                )
                .instrument(slot_span),
            );
        }
        shard.spawn(
            tracker,
            crate::tunnel::probe::run(tunnel.clone(), settings).instrument(span),
        );
        tunnel
    }

    /// The shard that runs this node's sessions and streams.
    pub fn shard(&self) -> &crate::shard::ShardHandle {
        self.placement.shard()
    }

    /// A snapshot of the current state.
    pub fn state(&self) -> StateInfo {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change (tests, probes).
    pub fn subscribe(&self) -> watch::Receiver<StateInfo> {
        self.state.subscribe()
    }

    /// The token that stops this node's actor.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Stops the actor (and with it the session) at once.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Takes the node out of (or back into) the service pool.
    pub fn set_draining(&self, on: bool) {
        self.update(|s| s.draining = on);
    }

    /// Finished connection attempts, successful or not.
    pub fn attempts(&self) -> u64 {
        let c = &self.counters;
        c.opens.load(Ordering::Relaxed)
            + c.open_failures
                .iter()
                .map(|(_, _, a)| a.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// True when pool (service CIDR) dials may use this node.
    pub fn pool_eligible(&self) -> bool {
        self.state.borrow().shown() == TunnelState::Healthy
    }

    /// Marks the node's probe as failing (with the reason, shown as
    /// `last_error`) or passing (clearing a probe error).
    pub(crate) fn set_probe_failing(&self, failing: Option<String>) {
        self.update(|s| s.set_probe_failing(failing));
    }

    fn update(&self, f: impl FnOnce(&mut StateInfo)) {
        self.state.send_modify(|s| s.apply(f));
    }

    fn set_link(
        &self,
        slot: usize,
        link: Link,
        err: Option<TunnelError>,
        next_retry: Option<Duration>,
    ) {
        self.update(|s| s.set_link(slot, link, err, next_retry));
    }

    /// Asks the actor for a make-before-break reconnect and waits for the
    /// new session (or the reason it could not be made).
    pub async fn reconnect(&self) -> Result<(), TunnelError> {
        let mut replies = Vec::new();
        for c in &self.commands {
            let (tx, rx) = oneshot::channel();
            c.send(Command::Reconnect(tx))
                .await
                .map_err(|_| TunnelError::NotConnected("node is shutting down".into()))?;
            replies.push(rx);
        }
        // Every connection reconnects (each make-before-break); the first
        // failure is reported, the others still complete on their own.
        let mut result = Ok(());
        for rx in replies {
            let r = rx
                .await
                .unwrap_or_else(|_| Err(TunnelError::NotConnected("node is shutting down".into())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Waits until no stream is open on this node, or `limit` passes.
    /// Returns true when it drained fully.
    pub async fn wait_streams_done(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.counters.active_streams.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens a direct-tcpip channel to `host:port` on the node's side.
    ///
    /// Waits for a `connecting` tunnel until `deadline`; fails at once when
    /// the tunnel is in backoff or rejected. The channel open itself is bounded
    /// by the same deadline because russh has no open timeout (russh #329).
    pub async fn open_channel(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        originator: SocketAddr,
        deadline: tokio::time::Instant,
        max_streams: u64,
    ) -> Result<OpenStream, TunnelError> {
        let started = tokio::time::Instant::now();
        self.wait_connected(deadline).await?;
        let conn = self.pick_conn(deadline).await.ok_or_else(|| {
            TunnelError::NotConnected(format!("node {} lost its session", self.node.name))
        })?;
        // Reserve the stream before the open: the cap holds under concurrent
        // dials, and a retiring session never sees zero while an open is in
        // flight on it.
        // Opens abandoned by their dials and not answered yet count too:
        // a node that confirms slowly cannot pile them up past the cap.
        let abandoned = self.counters.abandoned_opens.load(Ordering::Acquire);
        if self.counters.active_streams.fetch_add(1, Ordering::AcqRel) + abandoned >= max_streams {
            self.counters.active_streams.fetch_sub(1, Ordering::AcqRel);
            return Err(TunnelError::TooManyStreams(max_streams));
        }
        conn.streams.fetch_add(1, Ordering::AcqRel);
        let guard = StreamGuard {
            tunnel: self.clone(),
            conn: conn.clone(),
        };
        let (tx, mut rx) = oneshot::channel();
        let opener = open::open_owned(
            self.clone(),
            conn,
            guard,
            host.to_string(),
            port,
            originator,
            tx,
        );
        self.shard().spawn(&self.tracker, opener.in_current_span());
        let answer = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(answer) => answer,
            Err(_) => {
                // The opener sees the closed receiver and closes whatever
                // the node confirms later; an answer that raced the
                // deadline is closed the same way.
                rx.close();
                if let Ok(Ok(late)) = rx.try_recv() {
                    let tunnel = self.clone();
                    self.shard().spawn(
                        &self.tracker,
                        async move { open::close_late(&tunnel, late).await }.in_current_span(),
                    );
                }
                return Err(TunnelError::ChannelOpenTimeout(deadline - started));
            }
        };
        match answer {
            Ok(Ok(open)) => {
                self.counters.total_streams.fetch_add(1, Ordering::Relaxed);
                Ok(open)
            }
            Ok(Err(russh::Error::ChannelOpenFailure(f))) => {
                Err(TunnelError::ChannelRefused(channel_open_reason(&f)))
            }
            Ok(Err(e)) => Err(TunnelError::Session(e.to_string())),
            Err(_) => Err(TunnelError::Session(
                "the session ended while the channel was opening".into(),
            )),
        }
    }

    /// The live session with the smallest `key` among those `ok` accepts.
    fn best_conn(
        &self,
        ok: impl Fn(&Conn) -> bool,
        key: impl Fn(&Conn) -> usize,
    ) -> Option<Arc<Conn>> {
        self.conns
            .iter()
            .filter_map(|slot| slot.load_full())
            .filter(|c| ok(c))
            .min_by_key(|c| key(c))
    }

    fn least_loaded_conn(&self) -> Option<Arc<Conn>> {
        self.best_conn(|_| true, |c| c.streams.load(Ordering::Relaxed) as usize)
    }

    /// Where a new stream goes: the least loaded session that is not
    /// congested; else an extra session, opened now when the node is under
    /// `ssh.max_connections_per_node` (waiting at most half the time left);
    /// else the congested session with the smallest backlog. A new stream
    /// on a held session would wait behind a slow reader's data.
    async fn pick_conn(self: &Arc<Self>, deadline: tokio::time::Instant) -> Option<Arc<Conn>> {
        let free = |c: &Conn| !c.load.congested();
        let streams = |c: &Conn| c.streams.load(Ordering::Relaxed) as usize;
        if let Some(c) = self.best_conn(free, streams) {
            return Some(c);
        }
        let now = tokio::time::Instant::now();
        let wait_until = now + deadline.saturating_duration_since(now) / 2;
        loop {
            let ready = self.extra_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(c) = self.best_conn(free, streams) {
                return Some(c);
            }
            if !self.start_extra() && !self.opening_extra.load(Ordering::Acquire) {
                break;
            }
            if tokio::time::timeout_at(wait_until, ready).await.is_err() {
                break;
            }
        }
        self.best_conn(|_| true, |c| c.load.backlog.load(Ordering::Relaxed))
    }

    /// Starts opening one extra session if a slot is free, none is being
    /// opened and no recent failure cools us down. True when started.
    fn start_extra(self: &Arc<Self>) -> bool {
        let cooling = self
            .extra_cooldown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| Instant::now() < t);
        if cooling || self.cancel.is_cancelled() {
            return false;
        }
        let Some(slot) =
            (self.supervised..self.conns.len()).find(|&i| self.conns[i].load().is_none())
        else {
            return false;
        };
        if self
            .opening_extra
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // Its own root: the extra outlives the dial that started it.
        let span =
            info_span!(parent: None, "node", node = %self.node.name, shard = self.shard().id());
        self.shard().spawn(
            &self.tracker,
            live::extra_session(self.clone(), slot)
                .instrument(tracing::info_span!(parent: &span, "extra", slot)),
        );
        true
    }

    /// The lowest keepalive round trip seen on any session of the node.
    pub fn known_rtt(&self) -> Option<Duration> {
        match self.min_rtt_ns.load(Ordering::Relaxed) {
            u64::MAX => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Sessions, congestion and held time, for metrics and status.
    pub fn congestion(&self) -> Congestion {
        let mut c = Congestion {
            sessions: 0,
            congested_sessions: 0,
            blocked_seconds: Duration::from_nanos(self.counters.blocked_ns.load(Ordering::Relaxed))
                .as_secs_f64(),
            streams_slowed: self.counters.streams_slowed.load(Ordering::Relaxed),
            window_bytes: 0,
        };
        for conn in self.conns.iter().filter_map(|s| s.load_full()) {
            c.sessions += 1;
            c.window_bytes = c.window_bytes.max(conn.window.into());
            if conn.load.congested() {
                c.congested_sessions += 1;
            }
            c.blocked_seconds += conn.load.held_for().as_secs_f64();
        }
        c
    }

    async fn wait_connected(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Conn>, TunnelError> {
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state.link {
                Link::Up => {
                    if let Some(c) = self.least_loaded_conn() {
                        return Ok(c);
                    }
                }
                Link::Connecting => {}
                Link::Backoff | Link::Rejected => {
                    let why = state
                        .last_error
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "not connected".into());
                    return Err(TunnelError::NotConnected(format!(
                        "node {} is {}: {why}",
                        self.node.name,
                        state.state.as_str()
                    )));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    return Err(TunnelError::NotConnected(format!(
                        "node {} is shutting down",
                        self.node.name
                    )))
                }
                Err(_) => {
                    return Err(TunnelError::NotConnected(format!(
                        "node {} still connecting when the dial timed out",
                        self.node.name
                    )))
                }
            }
        }
    }
}

/// The health probe drives a node through this: it dials through the
/// node's own sessions and reports its verdict back into the node's state.
impl Probed for Arc<NodeTunnel> {
    type Stream = russh::ChannelStream<client::Msg>;
    type Guard = StreamGuard;

    fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    fn connected(&self) -> bool {
        self.state.borrow().state.is_connected()
    }

    async fn dial(
        &self,
        host: &str,
        port: u16,
        deadline: tokio::time::Instant,
    ) -> Result<(Self::Stream, Self::Guard), TunnelError> {
        let origin = SocketAddr::from(([127, 0, 0, 1], 0));
        let open = self
            .open_channel(host, port, origin, deadline, u64::MAX)
            .await?;
        Ok((open.channel.into_stream(), open.guard))
    }

    fn set_probe_failing(&self, failing: Option<String>) {
        NodeTunnel::set_probe_failing(self, failing)
    }
}
