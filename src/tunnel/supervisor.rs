//! The actor that owns one connection slot of a node: connect → serve →
//! back off → again, until the node's token is cancelled.
//!
//! It drives the world through [`Connect`], the way the probe drives a
//! node through its `Probed` trait: [`Node`] is the daemon's side (the real
//! `ssh::session::connect`, the node's session slots), and the tests' fake
//! lets backoff, rejection and make-before-break run under paused time
//! with no sshd.
//!
//! - A failed connect waits a full-jitter backoff ([`Backoff`]), reset once
//!   a session has stayed up for `reconnect.stable_after`.
//! - A rejection (a changed host key, authentication refused) waits
//!   `max_backoff` every time: never a hot loop against a node that will
//!   say the same again.
//! - A planned reconnect is make-before-break: the new session is made
//!   while the old one serves, new streams switch to it, and the old one
//!   drains (bounded by the drain timeout) before it is disconnected. If
//!   the new one cannot be made, the old one keeps serving.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::error::TunnelError;
use crate::ssh::context::{SharedContext, SshContext};
use crate::ssh::session::{self, Session};
use crate::tunnel::backoff::Backoff;
use crate::tunnel::live::{close_session, install, retire, EndReason};
use crate::tunnel::settings::{SharedSettings, TunnelSettings};
use crate::tunnel::state::Link;
use crate::tunnel::{Command, Conn, Counters, NodeTunnel};

/// The settings the supervisor reads from each loaded snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// The first backoff's ceiling.
    pub(crate) initial_backoff: Duration,
    /// The largest backoff, and the wait after a rejection.
    pub(crate) max_backoff: Duration,
    /// A session up this long resets the backoff.
    pub(crate) stable_after: Duration,
    /// How long a replaced session may keep serving its streams.
    pub(crate) drain_timeout: Duration,
}

impl Settings {
    /// The supervisor's part of the tunnel settings.
    pub(crate) fn of(tunnel: &TunnelSettings) -> Settings {
        Settings {
            initial_backoff: tunnel.reconnect.initial_backoff,
            max_backoff: tunnel.reconnect.max_backoff,
            stable_after: tunnel.reconnect.stable_after,
            drain_timeout: tunnel.drain_timeout,
        }
    }
}

/// What the supervisor needs of the world to run one connection slot.
pub(crate) trait Connect: Send + Sync + 'static {
    /// The settings in force, loaded anew for each attempt (a reload
    /// applies at the next one).
    type Ctx: Send + Sync + 'static;
    /// A session made and authenticated, not serving yet.
    type Fresh: Send + 'static;
    /// The serving session.
    type Live: Send + 'static;

    /// The settings now.
    fn load(&self) -> Self::Ctx;

    /// The supervisor's settings in `ctx`.
    fn settings(&self, ctx: &Self::Ctx) -> Settings;

    /// Fires when the node stops; the supervisor stops with it.
    fn cancelled(&self) -> &CancellationToken;

    /// Where the node is reached, for the log.
    fn endpoint(&self) -> String;

    /// Makes a session (connect, verify the host key, authenticate).
    fn connect<'a>(
        &'a self,
        ctx: &'a Self::Ctx,
    ) -> impl Future<Output = Result<Self::Fresh, TunnelError>> + Send + 'a;

    /// Makes `fresh` slot `slot`'s live session; hands back the token that
    /// fires when it ends.
    fn install(
        &self,
        slot: usize,
        fresh: Self::Fresh,
        ctx: &Self::Ctx,
    ) -> (Self::Live, CancellationToken);

    /// Why `live` ended (asked once, after its token fired).
    fn end_reason(&self, live: &Self::Live) -> String;

    /// Takes slot `slot`'s session out of service: no new stream goes to it.
    fn vacate(&self, slot: usize);

    /// Disconnects `live` now (the node stops).
    fn close<'a>(&'a self, live: &'a Self::Live) -> impl Future<Output = ()> + Send + 'a;

    /// Lets `old`, replaced, drain for at most `limit`, then disconnects it
    /// (on a task of its own).
    fn retire(&self, old: Self::Live, ended: CancellationToken, limit: Duration);

    /// Records the slot's link (see `StateInfo::set_link`).
    fn set_link(
        &self,
        slot: usize,
        link: Link,
        err: Option<TunnelError>,
        next_retry: Option<Duration>,
    );

    /// The node's counters.
    fn counters(&self) -> &Counters;
}

/// The daemon's side of [`Connect`]: the real `ssh::session::connect`, and
/// the node's session slots.
pub(crate) struct Node {
    pub(crate) tunnel: Arc<NodeTunnel>,
    pub(crate) shared: SharedContext,
    pub(crate) settings: SharedSettings,
    pub(crate) tracker: TaskTracker,
}

/// What one attempt of a [`Node`] is made with: the sessions' shared
/// context and the tunnel's own settings, as they were at its start.
pub(crate) struct Snapshot {
    ssh: Arc<SshContext>,
    tunnel: Arc<TunnelSettings>,
}

/// A serving session and where its handler leaves why it ended.
pub(crate) struct Installed {
    conn: Arc<Conn>,
    end_reason: EndReason,
}

impl Connect for Node {
    type Ctx = Snapshot;
    type Fresh = Session;
    type Live = Installed;

    fn load(&self) -> Snapshot {
        Snapshot {
            ssh: self.shared.load_full(),
            tunnel: self.settings.load_full(),
        }
    }

    fn settings(&self, ctx: &Snapshot) -> Settings {
        Settings::of(&ctx.tunnel)
    }

    fn cancelled(&self) -> &CancellationToken {
        &self.tunnel.cancel
    }

    fn endpoint(&self) -> String {
        self.tunnel.node.endpoint()
    }

    fn connect<'a>(
        &'a self,
        ctx: &'a Snapshot,
    ) -> impl Future<Output = Result<Session, TunnelError>> + Send + 'a {
        session::connect(&self.tunnel.node, &ctx.ssh, self.tunnel.known_rtt())
    }

    fn install(
        &self,
        slot: usize,
        fresh: Session,
        ctx: &Snapshot,
    ) -> (Installed, CancellationToken) {
        let (conn, ended, end_reason) = install(&self.tunnel, slot, fresh, &ctx.ssh, &self.tracker);
        (Installed { conn, end_reason }, ended)
    }

    fn end_reason(&self, live: &Installed) -> String {
        Session::reason(&live.end_reason)
    }

    fn vacate(&self, slot: usize) {
        self.tunnel.conns[slot].store(None);
    }

    fn close<'a>(&'a self, live: &'a Installed) -> impl Future<Output = ()> + Send + 'a {
        close_session(&live.conn, "tunneler shutting down")
    }

    fn retire(&self, old: Installed, ended: CancellationToken, limit: Duration) {
        self.tunnel.shard().spawn(
            &self.tracker,
            retire(old.conn, ended, limit, "replaced by a new session").in_current_span(),
        );
    }

    fn set_link(
        &self,
        slot: usize,
        link: Link,
        err: Option<TunnelError>,
        next_retry: Option<Duration>,
    ) {
        self.tunnel.set_link(slot, link, err, next_retry);
    }

    fn counters(&self) -> &Counters {
        &self.tunnel.counters
    }
}

/// A reconnect's reply, answered with the outcome of the attempt it asked
/// for.
type Reply = oneshot::Sender<Result<(), TunnelError>>;

/// How serving a session ended.
enum Served {
    /// The session ended, for `why`; the session that ended came up at
    /// `up_at`.
    Lost { why: String, up_at: Instant },
    /// The node stops; the session is closed.
    Stopped,
}

/// How waiting out a delay ended.
enum Waited {
    /// Time to try again, answering this reconnect (if one cut it short)
    /// with the outcome.
    Retry(Option<Reply>),
    /// The node stops.
    Stopped,
}

/// The actor loop. Runs until the node's token is cancelled.
pub(crate) async fn supervise<C: Connect>(
    c: C,
    slot: usize,
    mut commands: mpsc::Receiver<Command>,
) {
    let first = c.settings(&c.load());
    let mut backoff = Backoff::new(first.initial_backoff, first.max_backoff);
    let cancel = c.cancelled().clone();
    // A reconnect asked for while not connected is answered after the next
    // attempt, with its real outcome.
    let mut pending: Option<Reply> = None;
    loop {
        let ctx = c.load();
        let settings = c.settings(&ctx);
        if (settings.initial_backoff, settings.max_backoff) != (backoff.initial(), backoff.max()) {
            // A reload changed the backoff settings.
            backoff = Backoff::new(settings.initial_backoff, settings.max_backoff);
        }
        c.set_link(slot, Link::Connecting, None, None);
        debug!(endpoint = %c.endpoint(), "connecting");
        let attempt = tokio::select! {
            _ = cancel.cancelled() => break,
            // Boxed: the handshake's state machine is large and only lives
            // while connecting; inline, every idle node's task would keep
            // room for it for the node's whole life.
            r = Box::pin(c.connect(&ctx)) => r,
        };
        c.counters().count_attempt(&attempt);
        if let Some(reply) = pending.take() {
            let _ = reply.send(attempt.as_ref().map(|_| ()).map_err(Clone::clone));
        }
        let delay = match attempt {
            Ok(fresh) => match serve(&c, slot, fresh, &ctx, &mut commands).await {
                Served::Lost { why, up_at } => {
                    after_loss(&c, slot, why, up_at, &settings, &mut backoff)
                }
                Served::Stopped => break,
            },
            Err(e) => after_failure(&c, slot, e, &mut backoff),
        };
        match wait_out(delay, &cancel, &mut commands).await {
            Waited::Retry(reply) => pending = reply,
            Waited::Stopped => break,
        }
    }
    c.vacate(slot);
    debug!("supervisor stopped");
}

/// Serves `fresh` until the session ends or the node stops, replacing it
/// on the way whenever a reconnect is asked for.
async fn serve<C: Connect>(
    c: &C,
    slot: usize,
    fresh: C::Fresh,
    ctx: &C::Ctx,
    commands: &mut mpsc::Receiver<Command>,
) -> Served {
    let cancel = c.cancelled();
    let mut up_at = Instant::now();
    let (mut live, mut ended) = c.install(slot, fresh, ctx);
    c.set_link(slot, Link::Up, None, None);
    info!(endpoint = %c.endpoint(), "tunnel healthy");
    // Serve until the session ends, a reconnect is asked for, or the node
    // is stopped.
    let why = loop {
        let cmd = tokio::select! {
            _ = cancel.cancelled() => {
                c.vacate(slot);
                c.close(&live).await;
                return Served::Stopped;
            }
            _ = ended.cancelled() => break c.end_reason(&live),
            cmd = commands.recv() => cmd,
        };
        let Some(Command::Reconnect(reply)) = cmd else {
            continue;
        };
        let Some((new, new_ended, reply)) = make_new(c, slot, ctx, reply).await else {
            continue;
        };
        let old = std::mem::replace(&mut live, new);
        let old_ended = std::mem::replace(&mut ended, new_ended);
        up_at = Instant::now();
        c.retire(old, old_ended, c.settings(ctx).drain_timeout);
        info!("switched to the new session; the old one drains");
        let _ = reply.send(Ok(()));
    };
    c.vacate(slot);
    Served::Lost { why, up_at }
}

/// A planned reconnect, make-before-break: makes and installs the new
/// session while the current one serves (new streams go to the new one
/// from then on), handing `reply` back for the caller to answer once the
/// old one is retired. None when it could not be made (`reply` answered):
/// the current session keeps serving.
async fn make_new<C: Connect>(
    c: &C,
    slot: usize,
    ctx: &C::Ctx,
    reply: Reply,
) -> Option<(C::Live, CancellationToken, Reply)> {
    info!("planned reconnect: opening the new session first");
    let fresh = c.load();
    let next = tokio::select! {
        _ = c.cancelled().cancelled() => {
            let _ = reply.send(Err(TunnelError::NotConnected("node is shutting down".into())));
            return None;
        }
        r = Box::pin(c.connect(&fresh)) => r,
    };
    c.counters().count_attempt(&next);
    match next {
        Ok(new) => {
            let (live, ended) = c.install(slot, new, ctx);
            Some((live, ended, reply))
        }
        Err(e) => {
            warn!(error = %e, "planned reconnect failed; keeping the current session");
            let _ = reply.send(Err(e));
            None
        }
    }
}

/// After a session was lost: counted, and the next attempt's delay (the
/// backoff starts over when the session had been stable).
fn after_loss<C: Connect>(
    c: &C,
    slot: usize,
    why: String,
    up_at: Instant,
    settings: &Settings,
    backoff: &mut Backoff,
) -> Duration {
    warn!(reason = %why, "tunnel lost");
    c.counters().reconnects.fetch_add(1, Ordering::Relaxed);
    if up_at.elapsed() >= settings.stable_after {
        backoff.reset();
    }
    let delay = backoff.next_delay();
    c.set_link(
        slot,
        Link::Backoff,
        Some(TunnelError::Session(why)),
        Some(delay),
    );
    delay
}

/// After a failed connect, the next attempt's delay: a rejection waits
/// `max_backoff` every time, any other failure the next backoff.
fn after_failure<C: Connect>(
    c: &C,
    slot: usize,
    e: TunnelError,
    backoff: &mut Backoff,
) -> Duration {
    if e.is_rejection() {
        if matches!(e, TunnelError::HostKeyChanged(_)) {
            c.counters()
                .host_key_mismatches
                .fetch_add(1, Ordering::Relaxed);
        }
        warn!(error = %e, retry_in = ?backoff.max(), "tunnel rejected");
        c.set_link(slot, Link::Rejected, Some(e), Some(backoff.max()));
        backoff.max()
    } else {
        let delay = backoff.next_delay();
        info!(error = %e, retry_in = ?delay, "connect failed");
        c.set_link(slot, Link::Backoff, Some(e), Some(delay));
        delay
    }
}

/// Waits out `delay`; a reconnect command cuts it short.
async fn wait_out(
    delay: Duration,
    cancel: &CancellationToken,
    commands: &mut mpsc::Receiver<Command>,
) -> Waited {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Waited::Stopped,
            _ = &mut sleep => return Waited::Retry(None),
            c = commands.recv() => if let Some(Command::Reconnect(reply)) = c {
                info!("reconnect requested: retrying now");
                return Waited::Retry(Some(reply));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// What the fake saw, in order, with the (paused) time it happened.
    #[derive(Debug, Clone, PartialEq)]
    enum Event {
        Connect,
        Install(u32),
        Retire(u32),
        Close(u32),
        Link(Link, Option<Duration>),
    }

    /// A node without sshd: each connect takes the next scripted result
    /// (`Ok` makes session 1, 2, ...), after `connect_takes`.
    struct Fake {
        cancel: CancellationToken,
        settings: Settings,
        script: Mutex<VecDeque<Result<(), TunnelError>>>,
        connect_takes: Duration,
        next_id: Mutex<u32>,
        /// The live sessions' end tokens, by id.
        sessions: Mutex<Vec<(u32, CancellationToken)>>,
        log: Mutex<Vec<(Instant, Event)>>,
        counters: Counters,
    }

    impl Fake {
        fn new(script: Vec<Result<(), TunnelError>>) -> Arc<Fake> {
            Arc::new(Fake {
                cancel: CancellationToken::new(),
                settings: Settings {
                    initial_backoff: Duration::from_secs(1),
                    max_backoff: Duration::from_secs(60),
                    stable_after: Duration::from_secs(30),
                    drain_timeout: Duration::from_secs(5),
                },
                script: Mutex::new(script.into()),
                connect_takes: Duration::from_millis(10),
                next_id: Mutex::new(0),
                sessions: Mutex::new(Vec::new()),
                log: Mutex::new(Vec::new()),
                counters: Counters::default(),
            })
        }

        fn note(&self, e: Event) {
            self.log.lock().unwrap().push((Instant::now(), e));
        }

        fn events(&self) -> Vec<Event> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .map(|(_, e)| e.clone())
                .collect()
        }

        /// When each connect attempt began.
        fn connects(&self) -> Vec<Instant> {
            let log = self.log.lock().unwrap();
            log.iter()
                .filter(|(_, e)| *e == Event::Connect)
                .map(|(t, _)| *t)
                .collect()
        }

        /// Ends session `id` as a dead link would.
        fn lose(&self, id: u32) {
            let s = self.sessions.lock().unwrap();
            let (_, t) = s.iter().find(|(i, _)| *i == id).unwrap();
            t.cancel();
        }
    }

    impl Connect for Arc<Fake> {
        type Ctx = ();
        type Fresh = u32;
        type Live = u32;

        fn load(&self) {}

        fn settings(&self, _: &()) -> Settings {
            self.settings
        }

        fn cancelled(&self) -> &CancellationToken {
            &self.cancel
        }

        fn endpoint(&self) -> String {
            "node-1:22".into()
        }

        async fn connect(&self, _: &()) -> Result<u32, TunnelError> {
            self.note(Event::Connect);
            tokio::time::sleep(self.connect_takes).await;
            let next = self.script.lock().unwrap().pop_front();
            match next {
                Some(Ok(())) => {
                    let mut id = self.next_id.lock().unwrap();
                    *id += 1;
                    Ok(*id)
                }
                Some(Err(e)) => Err(e),
                // Past the script: a node that never answers.
                None => std::future::pending().await,
            }
        }

        fn install(&self, _: usize, fresh: u32, _: &()) -> (u32, CancellationToken) {
            self.note(Event::Install(fresh));
            let t = CancellationToken::new();
            self.sessions.lock().unwrap().push((fresh, t.clone()));
            (fresh, t)
        }

        fn end_reason(&self, _: &u32) -> String {
            "keepalive timeout".into()
        }

        fn vacate(&self, _: usize) {}

        async fn close(&self, live: &u32) {
            self.note(Event::Close(*live))
        }

        fn retire(&self, old: u32, _: CancellationToken, limit: Duration) {
            assert_eq!(limit, self.settings.drain_timeout);
            self.note(Event::Retire(old));
        }

        fn set_link(
            &self,
            _: usize,
            link: Link,
            _: Option<TunnelError>,
            next_retry: Option<Duration>,
        ) {
            self.note(Event::Link(link, next_retry));
        }

        fn counters(&self) -> &Counters {
            &self.counters
        }
    }

    fn refused() -> TunnelError {
        TunnelError::ConnectRefused("connection refused".into())
    }

    fn host_key_changed() -> TunnelError {
        TunnelError::HostKeyChanged("node-1".into())
    }

    /// Starts the supervisor on `fake`; returns its command sender.
    fn start(fake: &Arc<Fake>) -> (mpsc::Sender<Command>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(supervise(fake.clone(), 0, rx));
        (tx, task)
    }

    /// Failed connects back off with full jitter under a doubling ceiling
    /// (1 s, 2 s, 4 s, ... up to 60 s), every delay shown as the next retry.
    #[tokio::test(start_paused = true)]
    async fn failed_connects_back_off_under_a_doubling_ceiling() {
        let fake = Fake::new((0..8).map(|_| Err(refused())).collect());
        let (_tx, task) = start(&fake);
        tokio::time::sleep(Duration::from_secs(600)).await;
        let at = fake.connects();
        assert_eq!(at.len(), 9, "8 failures, then the 9th attempt hangs");
        for (n, w) in at.windows(2).enumerate() {
            let gap = w[1] - w[0] - fake.connect_takes;
            let ceiling = Duration::from_secs(1 << n).min(fake.settings.max_backoff);
            assert!(gap <= ceiling, "delay {n}: {gap:?} over {ceiling:?}");
        }
        let backoffs: Vec<_> = fake
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Link(Link::Backoff, r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(backoffs.len(), 8);
        assert!(backoffs.iter().all(Option::is_some));
        let failures: u64 = fake
            .counters
            .open_failures
            .iter()
            .map(|(_, _, n)| n.load(Ordering::Relaxed))
            .sum();
        assert_eq!(failures, 8);
        fake.cancel.cancel();
        task.await.unwrap();
    }

    /// A rejected node (its host key changed) is retried at `max_backoff`,
    /// every time, never sooner: no hot loop against a node that will say
    /// the same again. The mismatch is counted and the state shows it.
    #[tokio::test(start_paused = true)]
    async fn a_rejected_node_is_retried_at_the_max_backoff_only() {
        let fake = Fake::new((0..4).map(|_| Err(host_key_changed())).collect());
        let (_tx, task) = start(&fake);
        tokio::time::sleep(Duration::from_secs(3 * 60 + 30)).await;
        let at = fake.connects();
        assert_eq!(at.len(), 4, "{at:?}");
        for w in at.windows(2) {
            assert_eq!(w[1] - w[0], fake.settings.max_backoff + fake.connect_takes);
        }
        assert_eq!(fake.counters.host_key_mismatches.load(Ordering::Relaxed), 4);
        let rejected = fake
            .events()
            .into_iter()
            .filter(|e| *e == Event::Link(Link::Rejected, Some(fake.settings.max_backoff)))
            .count();
        assert_eq!(rejected, 4);
        fake.cancel.cancel();
        task.await.unwrap();
    }

    /// A session that stayed up for `stable_after` resets the backoff: the
    /// delay after it is under the first ceiling again, although seven
    /// failures before had raised the ceiling to `max_backoff`.
    #[tokio::test(start_paused = true)]
    async fn a_stable_session_resets_the_backoff() {
        let mut script: Vec<_> = (0..7).map(|_| Err(refused())).collect();
        script.extend([Ok(()), Ok(())]);
        let fake = Fake::new(script);
        let (_tx, task) = start(&fake);
        // Seven failures (ceilings 1+2+4+8+16+32+60 s), then session 1.
        tokio::time::sleep(Duration::from_secs(130)).await;
        assert!(fake.events().contains(&Event::Install(1)));
        for id in [1, 2] {
            tokio::time::sleep(fake.settings.stable_after).await;
            let lost_at = Instant::now();
            fake.lose(id);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let retry = *fake.connects().last().unwrap();
            assert!(
                retry > lost_at && retry - lost_at <= fake.settings.initial_backoff,
                "after stable session {id}: {:?}",
                retry - lost_at
            );
        }
        assert!(fake.events().contains(&Event::Install(2)));
        assert_eq!(fake.counters.reconnects.load(Ordering::Relaxed), 2);
        fake.cancel.cancel();
        task.await.unwrap();
    }

    /// A planned reconnect makes the new session while the old one serves,
    /// switches to it, then retires the old one; the link never leaves Up
    /// and the caller hears Ok.
    #[tokio::test(start_paused = true)]
    async fn a_planned_reconnect_makes_before_it_breaks() {
        let fake = Fake::new(vec![Ok(()), Ok(())]);
        let (tx, task) = start(&fake);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Reconnect(reply)).await.unwrap();
        assert!(answer.await.unwrap().is_ok());
        assert_eq!(
            fake.events(),
            [
                Event::Link(Link::Connecting, None),
                Event::Connect,
                Event::Install(1),
                Event::Link(Link::Up, None),
                Event::Connect,
                Event::Install(2),
                Event::Retire(1),
            ]
        );
        fake.cancel.cancel();
        task.await.unwrap();
        assert_eq!(fake.events().last(), Some(&Event::Close(2)));
    }

    /// A planned reconnect that cannot make its new session keeps the old
    /// one serving (nothing retired, no backoff) and tells the caller why.
    #[tokio::test(start_paused = true)]
    async fn a_failed_planned_reconnect_keeps_the_session() {
        let fake = Fake::new(vec![Ok(()), Err(refused())]);
        let (tx, task) = start(&fake);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Reconnect(reply)).await.unwrap();
        assert!(matches!(
            answer.await.unwrap(),
            Err(TunnelError::ConnectRefused(_))
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ev = fake.events();
        assert_eq!(ev.last(), Some(&Event::Connect), "{ev:?}");
        assert!(!ev
            .iter()
            .any(|e| matches!(e, Event::Retire(_) | Event::Link(Link::Backoff, _))));
        // Still serving session 1: losing it now is what backs off.
        fake.lose(1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(matches!(
            fake.events().last(),
            Some(Event::Link(Link::Backoff, Some(_)))
        ));
        fake.cancel.cancel();
        task.await.unwrap();
    }

    /// A reconnect asked for during a backoff cuts it short, and is
    /// answered with the outcome of the attempt it caused.
    #[tokio::test(start_paused = true)]
    async fn a_reconnect_during_backoff_retries_at_once() {
        let fake = Fake::new(vec![Err(host_key_changed()), Ok(())]);
        let (tx, task) = start(&fake);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = Instant::now();
        let (reply, answer) = oneshot::channel();
        tx.send(Command::Reconnect(reply)).await.unwrap();
        assert!(answer.await.unwrap().is_ok());
        assert!(Instant::now() - asked < Duration::from_secs(1));
        assert_eq!(fake.connects().len(), 2);
        fake.cancel.cancel();
        task.await.unwrap();
    }
}
