//! The egress proxy: HTTP CONNECT as kube-apiserver speaks it.
//!
//! kube-apiserver opens one connection per dial and writes exactly
//! `CONNECT host:port HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`. The target comes
//! from the request line (the Host header is always 127.0.0.1). We open a
//! direct-tcpip channel on the routed tunnel and reply `200` only once the
//! node confirmed it; no byte follows the reply's headers until one side
//! speaks. Errors map to statuses the apiserver shows its users:
//!
//! | reply | when |
//! |---|---|
//! | 400 | malformed request |
//! | 405 | a method other than CONNECT |
//! | 403 | destination not allowed (not a node, pod or service address, or a port a node address does not allow); the reason names the setting that decides it |
//! | 503 | no healthy tunnel for the destination (after waiting up to `wait_for_healthy` for one coming up, see [`crate::proxy::healthy`]) |
//! | 502 | the node refused the channel (SSH reason in the reason phrase) |
//! | 504 | `dial_timeout` passed |
//!
//! Admission: every listener has its own budget of connections that have
//! not yet sent a complete head (on the mTLS listener, the TLS handshake
//! counts too). Past it, that listener turns new connections away at once;
//! a flood on one listener never makes another answer 503.
//!
//! Threads: accept, the TLS handshake and the head run on the control
//! runtime. Once a stream is routed to a node, the client connection moves
//! to that node's shard (see `shard`), with any bytes read past the head;
//! the channel open, the reply and the relay run there, beside the node's
//! SSH session. A pool dial picks its node first, then moves; a retry on a
//! node of another shard moves again.

pub mod access;
pub mod activation;
pub(crate) mod healthy;
pub mod live;
pub mod route;
pub mod sockets;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::error::TunnelError;
use crate::metrics::{DialMetrics, DialResult};
use crate::proxy::access::{Carried, Client, DialRecord, Origin, RouteKind};
use crate::proxy::live::{LiveStream, LiveStreams};
use crate::proxy::route::{pod_host_address, NodePorts, Route, RouteTable};
use crate::shard::{Movable, MovableTcp};
use crate::tunnel::relay::{relay, RelayBudget, RelayLimits, Relayed, StreamEnd};
use crate::tunnel::stream_stats::StreamStats;
use crate::tunnel::{NodeTunnel, OpenStream};

/// The largest CONNECT request head we accept. kube-apiserver's is ~60 bytes.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// The live route table, swapped atomically when the node set changes.
pub type SharedRoutes = Arc<ArcSwap<RouteTable<Arc<NodeTunnel>>>>;

/// A bound proxy listener. Building (binding) is kept apart from serving so
/// that bind errors surface at start and tests can hand in their own.
pub enum ProxyListener {
    /// A Unix socket.
    Unix(UnixListener, std::path::PathBuf),
    /// A TCP socket.
    Tcp(TcpListener),
    /// A TCP socket that requires TLS with a client certificate (mTLS).
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
}

impl ProxyListener {
    /// The address as a URL, for status output.
    pub fn url(&self) -> String {
        match self {
            ProxyListener::Unix(_, p) => format!("unix://{}", p.display()),
            ProxyListener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp://{a}"),
                Err(_) => "tcp://?".into(),
            },
            ProxyListener::Tls(l, _) => match l.local_addr() {
                Ok(a) => format!("tls://{a}"),
                Err(_) => "tls://?".into(),
            },
        }
    }
}

/// A listener taken off its runtime, to be served from several threads:
/// each shard accepts on its own clone of the same socket.
pub enum DetachedListener {
    /// A Unix socket.
    Unix(std::os::unix::net::UnixListener, std::path::PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
    /// A TCP socket that requires TLS with a client certificate (mTLS).
    Tls(std::net::TcpListener, tokio_rustls::TlsAcceptor),
}

impl ProxyListener {
    /// Takes the listener off the current runtime's reactor.
    pub fn detach(self) -> std::io::Result<DetachedListener> {
        Ok(match self {
            ProxyListener::Unix(l, p) => DetachedListener::Unix(l.into_std()?, p),
            ProxyListener::Tcp(l) => DetachedListener::Tcp(l.into_std()?),
            ProxyListener::Tls(l, a) => DetachedListener::Tls(l.into_std()?, a),
        })
    }
}

impl DetachedListener {
    /// Another handle on the same listening socket.
    pub fn try_clone(&self) -> std::io::Result<DetachedListener> {
        Ok(match self {
            DetachedListener::Unix(l, p) => DetachedListener::Unix(l.try_clone()?, p.clone()),
            DetachedListener::Tcp(l) => DetachedListener::Tcp(l.try_clone()?),
            DetachedListener::Tls(l, a) => DetachedListener::Tls(l.try_clone()?, a.clone()),
        })
    }

    /// Registers it with the current runtime (the shard that will accept).
    pub fn attach(self) -> std::io::Result<ProxyListener> {
        Ok(match self {
            DetachedListener::Unix(l, p) => ProxyListener::Unix(UnixListener::from_std(l)?, p),
            DetachedListener::Tcp(l) => ProxyListener::Tcp(TcpListener::from_std(l)?),
            DetachedListener::Tls(l, a) => ProxyListener::Tls(TcpListener::from_std(l)?, a),
        })
    }
}

/// One listener's budget of connections still in their TLS handshake or
/// CONNECT head, shared by every thread that accepts on it.
#[derive(Debug, Clone)]
pub struct HeadBudget {
    permits: Arc<Semaphore>,
    max: usize,
}

impl HeadBudget {
    /// At most `max` (at least 1) connections before their head at once.
    pub fn new(max: usize) -> HeadBudget {
        let max = max.max(1);
        HeadBudget {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

/// Settings the proxy needs at serve time.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Bound on waiting for a connecting tunnel plus the channel open.
    pub dial_timeout: Duration,
    /// Bound on waiting for a known tunnel to come up (inside `dial_timeout`).
    pub wait_for_healthy: Duration,
    /// Bound on reading the CONNECT head (and on a TLS handshake).
    pub handshake_timeout: Duration,
    /// Streams per node; past it new dials to the node get 503 at once.
    pub max_streams_per_node: u64,
    /// Carry node-addressed dials to 127.0.0.1 on the node.
    pub node_local_via_loopback: bool,
    /// Bounds on bytes buffered for slow clients.
    pub relay: RelayLimits,
    /// Ports allowed on node addresses besides each node's kubelet port.
    pub node_ports: NodePorts,
    /// Offsets in each pod CIDR that are the node's own address.
    pub pod_host_offsets: Vec<u32>,
    /// Write an access record per dial (target `tunneler::access`).
    pub access_log: bool,
}

impl ProxySettings {
    /// The proxy settings from validated config.
    pub fn from_config(p: &crate::config::ProxyConfig) -> ProxySettings {
        ProxySettings {
            dial_timeout: p.dial_timeout,
            wait_for_healthy: p.wait_for_healthy,
            handshake_timeout: p.handshake_timeout,
            max_streams_per_node: p.max_streams_per_node,
            node_local_via_loopback: p.node_local_via_loopback,
            relay: p.relay,
            node_ports: NodePorts {
                extra: p.node_ports.clone(),
            },
            pod_host_offsets: p.pod_host_offsets.clone(),
            access_log: p.access_log,
        }
    }
}

/// The egress proxy front end.
#[derive(Clone)]
pub struct EgressProxy {
    routes: SharedRoutes,
    settings: Arc<ArcSwap<ProxySettings>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Stops the accept loops only; `cancel` also cuts connections.
    accepting: CancellationToken,
    next_stream: Arc<AtomicU64>,
    metrics: Arc<DialMetrics>,
    live: Arc<LiveStreams>,
}

/// A parsed CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host without brackets: an IP literal or a name.
    pub host: String,
    /// Port, never 0.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a request head was refused before any routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP, or a CONNECT without a valid `host:port`.
    BadRequest(String),
    /// A method other than CONNECT.
    NotConnect(String),
    /// The head is larger than [`MAX_HEADER_BYTES`].
    TooLarge,
    /// The client closed before sending anything: nothing to answer.
    Closed,
    /// The client closed in the middle of the head.
    Truncated,
}

/// Outcome of parsing a buffer that may hold a partial head.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A complete CONNECT head of `len` bytes for `target`.
    Connect {
        /// The target from the request line.
        target: Target,
        /// Length of the head, including the blank line.
        len: usize,
    },
}

/// Parses a CONNECT request head with httparse. Pure, for tests and fuzzing.
pub fn parse_head(buf: &[u8]) -> Result<Parsed, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEADER_BYTES {
                Err(HeadError::TooLarge)
            } else {
                Ok(Parsed::Partial)
            }
        }
        Ok(httparse::Status::Complete(len)) => {
            let method = req.method.unwrap_or_default();
            if method != "CONNECT" {
                return Err(HeadError::NotConnect(method.to_string()));
            }
            let path = req.path.unwrap_or_default();
            let target = parse_authority(path).ok_or_else(|| {
                HeadError::BadRequest(format!("CONNECT target {path:?} is not host:port"))
            })?;
            Ok(Parsed::Connect { target, len })
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::BadRequest(format!(
            "malformed HTTP request: {e}"
        ))),
    }
}

/// Parses `host:port`, `[v6]:port`. Hosts are IP literals or DNS-style names.
pub fn parse_authority(s: &str) -> Option<Target> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h.to_string(), p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None; // unbracketed IPv6 is ambiguous
        }
        (h.to_string(), p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 || host.is_empty() || host.len() > 253 {
        return None;
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':' || b == b'_');
    if !ok {
        return None;
    }
    Some(Target { host, port })
}

/// Keeps a reason phrase on one line and printable.
fn phrase(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(400)
        .collect()
}

/// How long a refused client gets to close its side after our reply.
const LINGER: Duration = Duration::from_secs(1);

/// How much a refused client may still send while we wait for its close.
const LINGER_BYTES: usize = 64 * 1024;

/// Writes a refusal and closes, lingering: TCP turns a close with the
/// client's bytes still unread into a reset, which discards a reply not
/// yet sent and can reach the client before the reply it could have read.
/// So after the reply and our FIN, what the client sends is read and
/// dropped until it closes, for at most [`LINGER`] and [`LINGER_BYTES`].
async fn reply<W: AsyncRead + AsyncWrite + Unpin>(w: &mut W, code: u16, text: &str) {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        phrase(text)
    );
    if w.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if w.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match w.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Why a CONNECT is refused. [`Refusal::answer`] is the one place that
/// turns it into both the HTTP reply and the dial metric's result.
#[derive(Debug)]
enum Refusal {
    /// The request head was refused before routing.
    Head(HeadError),
    /// The destination (or its port) is not allowed.
    Forbidden(String),
    /// The dial through a tunnel failed.
    Dial(TunnelError),
}

/// How a refusal is answered and counted.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    code: u16,
    result: DialResult,
    text: String,
}

impl Refusal {
    /// The reply and the metric for this refusal; `None` when the client
    /// left before asking anything (no reply, not a dial).
    fn answer(&self) -> Option<Answer> {
        let (code, result, text) = match self {
            Refusal::Head(HeadError::Closed) => return None,
            Refusal::Head(HeadError::Truncated) => (
                400,
                DialResult::BadRequest,
                "Bad Request: connection closed before the request head was complete".into(),
            ),
            Refusal::Head(HeadError::BadRequest(why)) => {
                (400, DialResult::BadRequest, format!("Bad Request: {why}"))
            }
            Refusal::Head(HeadError::NotConnect(m)) => (
                405,
                DialResult::BadRequest,
                format!("Method Not Allowed: {m}; only CONNECT is served"),
            ),
            Refusal::Head(HeadError::TooLarge) => (
                431,
                DialResult::BadRequest,
                "Request Header Fields Too Large".into(),
            ),
            Refusal::Forbidden(why) => (403, DialResult::Forbidden, format!("Forbidden: {why}")),
            Refusal::Dial(e @ TunnelError::ChannelRefused(_)) => {
                (502, DialResult::Refused, format!("Bad Gateway: {e}"))
            }
            Refusal::Dial(e @ TunnelError::ChannelOpenTimeout(_)) => {
                (504, DialResult::Timeout, format!("Gateway Timeout: {e}"))
            }
            Refusal::Dial(e) => (
                503,
                DialResult::NoTunnel,
                format!("Service Unavailable: {e}"),
            ),
        };
        Some(Answer { code, result, text })
    }
}

impl EgressProxy {
    /// A proxy over `routes`. Connections are tracked on `tracker` and end
    /// when `cancel` fires.
    pub fn new(
        routes: SharedRoutes,
        settings: Arc<ArcSwap<ProxySettings>>,
        metrics: Arc<DialMetrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> EgressProxy {
        // The budget gauge shows the configured limit from the start; each
        // new stream re-applies it, so a reload takes effect there.
        RelayBudget::global().set_limit(settings.load().relay.buffer_budget);
        EgressProxy {
            routes,
            settings,
            tracker,
            accepting: cancel.clone(),
            cancel,
            next_stream: Arc::new(AtomicU64::new(1)),
            metrics,
            live: Arc::new(LiveStreams::default()),
        }
    }

    /// The streams open now, for the admin API.
    pub fn live_streams(&self) -> Arc<LiveStreams> {
        self.live.clone()
    }

    /// Makes the listeners stop accepting when `accepting` fires, while
    /// connections already accepted go on until they end or `cancel` fires
    /// (a graceful stop). The caller removes a Unix socket it bound after
    /// [`EgressProxy::serve`] returns; a socket passed in by the service
    /// manager stays, and new connections queue on it for the next daemon.
    pub fn stop_accepting_on(mut self, accepting: CancellationToken) -> EgressProxy {
        self.accepting = accepting;
        self
    }

    /// Serves one listener until cancelled. Several threads may serve the
    /// same listening socket (one clone each), sharing `budget`: at most
    /// that many of its connections may be in their TLS handshake or
    /// CONNECT head at once. Accept errors (EMFILE...) are logged and
    /// retried after a short pause; they never end the listener.
    pub async fn serve(self, listener: ProxyListener, budget: HeadBudget) {
        let url = listener.url();
        let listener_url: Arc<str> = Arc::from(url.as_str());
        // Connections that have not yet sent a complete head hold a permit.
        let HeadBudget {
            permits: pending,
            max: max_pending,
        } = budget;
        debug!(listener = %url, max_pending, shard = ?crate::shard::current(), "accepting");
        loop {
            let accepted = match &listener {
                ProxyListener::Unix(l, _) => tokio::select! {
                    _ = self.accepting.cancelled() => break,
                    r = l.accept() => r.map(|(s, _)| {
                        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
                        let uid = s.peer_cred().ok().map(|c| c.uid());
                        (Conn::Unix(s), peer, Client::Unix { uid })
                    }),
                },
                ProxyListener::Tcp(l) | ProxyListener::Tls(l, _) => tokio::select! {
                    _ = self.accepting.cancelled() => break,
                    r = l.accept() => r.map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        (Conn::Tcp(s), a, Client::Tcp { addr: a })
                    }),
                },
            };
            let (conn, peer, client) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(listener = %url, error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // A client that has not finished its head holds a permit; past
            // the cap, new connections are turned away at once instead of
            // piling up (Konnectivity's pending-dial pile-up).
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                warn!(listener = %url, max_pending, "too many pending handshakes on this listener; refusing a connection");
                if matches!(listener, ProxyListener::Tls(..)) {
                    // A TLS client cannot read a plain-text reply.
                    drop(conn);
                    continue;
                }
                let mut conn = conn;
                self.tracker.spawn(async move {
                    let text =
                        "Service Unavailable: too many connections waiting to send their request";
                    // The reply lingers for the client's close (see
                    // `reply`): its request, unread, would reset it.
                    let _ = tokio::time::timeout(LINGER * 2, async {
                        match &mut conn {
                            Conn::Unix(s) => reply(s, 503, text).await,
                            Conn::Tcp(s) => reply(s, 503, text).await,
                        }
                    })
                    .await;
                });
                continue;
            };
            let this = self.clone();
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            let tls = match &listener {
                ProxyListener::Tls(_, acceptor) => Some(acceptor.clone()),
                _ => None,
            };
            let listener_url = listener_url.clone();
            self.tracker.spawn(async move {
                let origin = |client| {
                    Arc::new(Origin {
                        listener: listener_url,
                        client,
                    })
                };
                match (conn, tls) {
                    (Conn::Unix(s), _) => this.handle(s, peer, origin(client), id, permit).await,
                    (Conn::Tcp(s), None) => this.handle(s, peer, origin(client), id, permit).await,
                    (Conn::Tcp(s), Some(acceptor)) => {
                        let limit = this.settings.load().handshake_timeout;
                        // The span names the peer in the verifier's log line
                        // about a refused client certificate.
                        let handshake =
                            tokio::time::timeout(limit, acceptor.accept(MovableTcp::Attached(s)))
                                .instrument(info_span!("tls_client", %peer));
                        let tls = tokio::select! {
                            _ = this.cancel.cancelled() => return,
                            r = handshake => r,
                        };
                        match tls {
                            Ok(Ok(tls)) => {
                                let name = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| tls::certificate_names(c))
                                    .and_then(|n| n.into_iter().next());
                                let client = Client::Tls { addr: peer, name };
                                this.handle(tls, peer, origin(client), id, permit).await
                            }
                            Ok(Err(e)) => info!(%peer, error = %e, "TLS handshake refused"),
                            Err(_) => info!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }

    /// Handles one client connection: read the head, route, dial, relay.
    pub async fn handle<S: Movable>(
        &self,
        mut s: S,
        peer: SocketAddr,
        origin: Arc<Origin>,
        id: u64,
        permit: OwnedSemaphorePermit,
    ) {
        let mut buf = BytesMut::with_capacity(512);
        let limit = self.settings.load().handshake_timeout;
        let head = tokio::time::timeout(limit, async {
            loop {
                match parse_head(&buf) {
                    Ok(Parsed::Partial) => {}
                    other => return other,
                }
                let want = MAX_HEADER_BYTES.saturating_sub(buf.len()).max(1);
                let mut limited = (&mut s).take(want as u64);
                match limited.read_buf(&mut buf).await {
                    Ok(0) | Err(_) if buf.is_empty() => return Err(HeadError::Closed),
                    Ok(0) | Err(_) => return Err(HeadError::Truncated),
                    Ok(_) => {}
                }
            }
        });
        let parsed = tokio::select! {
            _ = self.cancel.cancelled() => return,
            r = head => r,
        };
        let mut rec = DialRecord {
            id,
            origin,
            at: std::time::SystemTime::now(),
            started: tokio::time::Instant::now(),
            target: None,
            route: None,
            node: None,
        };
        let (target, len) = match parsed {
            Err(_) => {
                debug!("client did not send a request head in time");
                return;
            }
            Ok(Err(e)) => {
                // The reply lingers for the client's close; that is no
                // longer a pending head.
                drop(permit);
                self.refuse(&rec, &mut s, Refusal::Head(e)).await;
                return;
            }
            Ok(Ok(Parsed::Partial)) => return,
            Ok(Ok(Parsed::Connect { target, len })) => (target, len),
        };
        drop(permit);
        rec.started = tokio::time::Instant::now();
        rec.target = Some(target.clone());
        let first = buf.split_off(len).freeze();
        let span = info_span!("stream", stream = id, dst = %target);
        self.dial_and_relay(s, peer, target, first, rec)
            .instrument(span)
            .await
    }

    /// Refuses `target` with 403, saying why (and what to change).
    async fn forbid<W: AsyncRead + AsyncWrite + Unpin>(
        &self,
        rec: &DialRecord,
        w: &mut W,
        target: &Target,
        why: &(dyn std::fmt::Display + Sync),
    ) {
        let why = Refusal::Forbidden(format!("{target}: {why}"));
        self.refuse(rec, w, why).await
    }

    /// Records a refused dial in the metrics and the access log, then
    /// sends the error reply.
    async fn refuse<W: AsyncRead + AsyncWrite + Unpin>(
        &self,
        rec: &DialRecord,
        w: &mut W,
        why: Refusal,
    ) {
        let Some(a) = why.answer() else {
            return;
        };
        self.metrics
            .record(a.result, rec.started.elapsed().as_secs_f64());
        if self.settings.load().access_log {
            rec.refused(a.code, &phrase(&a.text));
        }
        reply(w, a.code, &a.text).await;
    }

    /// Routes the stream (on the shard that accepted it and read its head)
    /// and, unless that is already the shard of the node that will carry
    /// it, moves it there; refusals that need no node are answered here.
    async fn dial_and_relay<S: Movable>(
        &self,
        mut s: S,
        peer: SocketAddr,
        target: Target,
        first: Bytes,
        mut rec: DialRecord,
    ) {
        let settings = self.settings.load_full();
        let deadline = tokio::time::Instant::now() + settings.dial_timeout;
        let routes = self.routes.load_full();
        let route = routes.lookup(&target.host);
        rec.route = match &route {
            Route::Node { node_local, .. } => Some(if *node_local {
                RouteKind::Node
            } else {
                RouteKind::Pod
            }),
            Route::Pool { host } => Some(if routes.pool_kind(host) == "service address" {
                RouteKind::Service
            } else {
                RouteKind::Pool
            }),
            Route::Forbidden => None,
        };
        if let Route::Node { node, .. } = &route {
            rec.node = Some(node.node.name.clone());
        }
        // A node's host address inside the pod range keeps the node port
        // policy, whichever node the route picks.
        if !matches!(route, Route::Forbidden) {
            if let Err(why) =
                routes.check_host_address(&target.host, target.port, &settings.node_ports)
            {
                info!(reason = %why, "destination port not allowed on a node's host address");
                self.forbid(&rec, &mut s, &target, &why).await;
                return;
            }
        }
        let dial = match route {
            Route::Forbidden => {
                let why = routes.not_routed(&target.host);
                debug!(reason = %why, "destination not allowed");
                self.forbid(&rec, &mut s, &target, &why).await;
                return;
            }
            Route::Node {
                node,
                host,
                node_local,
            } => {
                // A node's own address is its host network: only the
                // kubelet and the listed ports, whatever host it becomes.
                // So is a pod CIDR address its CNI gives the node itself.
                let host_network = node_local
                    || host.parse().is_ok_and(|ip| {
                        pod_host_address(&node.node, ip, &settings.pod_host_offsets)
                    });
                if host_network {
                    if let Err(why) = settings.node_ports.check(&node.node, target.port) {
                        info!(node = %node.node.name, reason = %why, "destination port not allowed");
                        self.forbid(&rec, &mut s, &target, &why).await;
                        return;
                    }
                }
                // Kubelets may listen on loopback only: the old SSH tunnels
                // gave that property, and so do we when asked.
                let host = if node_local && settings.node_local_via_loopback {
                    if host.contains(':') {
                        "::1".to_string()
                    } else {
                        "127.0.0.1".to_string()
                    }
                } else {
                    host
                };
                // A node still connecting (at start, or after a lost
                // session) is waited for, up to wait_for_healthy, before
                // the connection moves to its shard.
                let wait_until =
                    (tokio::time::Instant::now() + settings.wait_for_healthy).min(deadline);
                if let Err(e) = crate::proxy::healthy::wait_for_node(&node, wait_until).await {
                    info!(node = %node.node.name, error = %e, "dial failed");
                    self.refuse(&rec, &mut s, Refusal::Dial(e)).await;
                    return;
                }
                Dial {
                    node,
                    host,
                    pool: None,
                }
            }
            Route::Pool { host } => {
                let wait_until =
                    (tokio::time::Instant::now() + settings.wait_for_healthy).min(deadline);
                crate::proxy::healthy::wait_for_pool(routes.nodes(), wait_until).await;
                let mut pool = Pool {
                    routes: routes.clone(),
                    tried: Vec::new(),
                    reasons: Vec::new(),
                };
                match pool.next() {
                    Some(node) => Dial {
                        node,
                        host,
                        pool: Some(pool),
                    },
                    None => {
                        let e = pool.exhausted(&host);
                        info!(error = %e, "pool dial failed");
                        self.refuse(&rec, &mut s, Refusal::Dial(e)).await;
                        return;
                    }
                }
            }
        };
        let pending = Pending {
            dial,
            port: target.port,
            peer,
            first,
            rec,
            deadline,
            settings,
        };
        // Accepted on the node's own shard: no hand-off at all.
        if pending.dial.node.shard().is_current() {
            self.on_shard(s, pending).await
        } else {
            self.move_to_shard(s, pending)
        }
    }

    /// Hands the client connection to the shard of the node it is routed
    /// to: taken off this runtime's reactor here, registered there. The
    /// dial, the reply and the relay all run on that shard.
    fn move_to_shard<S: Movable>(&self, s: S, pending: Pending) {
        let shard = pending.dial.node.shard().clone();
        let detached = match s.detach() {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot move the connection to its node's shard; closing it");
                return;
            }
        };
        shard.count_moved_in();
        let this = self.clone();
        shard.spawn(
            &self.tracker,
            async move {
                match S::attach(detached) {
                    Ok(s) => this.on_shard(s, pending).await,
                    Err(e) => {
                        warn!(error = %e, "cannot take the connection over on the node's shard; closing it")
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// On the node's shard: open the channel, reply 200, relay. A pool
    /// dial that fails on its tunnel tries another node once, moving again
    /// when that node lives on another shard.
    async fn on_shard<S: Movable>(&self, mut s: S, mut p: Pending) {
        loop {
            let node = p.dial.node.clone();
            let opened = node
                .open_channel(
                    &p.dial.host,
                    p.port,
                    p.peer,
                    p.deadline,
                    p.settings.max_streams_per_node,
                )
                .await;
            p.rec.node = Some(node.node.name.clone());
            let e = match opened {
                Ok(open) => return self.relay_stream(s, open, &p).await,
                Err(e) => e,
            };
            let retry = match &mut p.dial.pool {
                Some(pool) => pool.failed_on(&node, e, &p.dial.host),
                None => Err(e),
            };
            match retry {
                Ok(next) => {
                    let here = next.shard().is_current();
                    p.dial.node = next;
                    if !here {
                        return self.move_to_shard(s, p);
                    }
                }
                Err(e) => {
                    if p.dial.pool.is_some() {
                        info!(error = %e, "pool dial failed");
                    } else {
                        info!(node = %node.node.name, error = %e, "dial failed");
                    }
                    self.refuse(&p.rec, &mut s, Refusal::Dial(e)).await;
                    return;
                }
            }
        }
    }

    /// The 200 reply and the relay, on the stream's shard; the stream is
    /// in the live list from its 200 to its end, and its access record and
    /// histograms are written at the end.
    async fn relay_stream<S: Movable>(&self, mut s: S, open: OpenStream, p: &Pending) {
        let _counted = crate::shard::stream_started();
        self.metrics
            .record(DialResult::Ok, p.rec.started.elapsed().as_secs_f64());
        let OpenStream { channel, guard } = open;
        let tunnel = guard.tunnel().clone();
        let session = guard.session_id();
        let ok = async {
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            // A TLS writer may hold the record until flushed.
            s.flush().await
        };
        if ok.await.is_err() {
            // Drop the read half first: the session loop may be parked on
            // this channel's queue, and the close goes through that loop.
            let (read_half, write_half) = channel.split();
            drop(read_half);
            let _ = tokio::time::timeout(Duration::from_secs(5), write_half.close()).await;
            let stats = StreamStats::default();
            self.stream_done(
                p,
                session,
                p.rec.started.elapsed(),
                StreamEnd::ClientClosed,
                &stats,
            );
            return;
        }
        let connect = p.rec.started.elapsed();
        let listed = self.live.insert(LiveStream {
            id: p.rec.id,
            target: p
                .rec
                .target
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            node: tunnel.node.name.clone(),
            session,
            listener: p.rec.origin.listener.clone(),
            client: p.rec.origin.client.label(),
            started_at: p.rec.at,
            started: p.rec.started.into_std(),
            stats: StreamStats::default(),
        });
        debug!(node = %tunnel.node.name, session, "stream open");
        let Relayed { end, client } = relay(
            s,
            p.first.clone(),
            channel,
            &tunnel.counters,
            guard.session(),
            self.cancel.child_token(),
            RelayBudget::global(),
            &p.settings.relay,
            &listed.stream().stats,
        )
        .await;
        drop(guard);
        if end.is_cut() {
            client.cut();
            info!(node = %tunnel.node.name, how = %end, "stream cut before the node side ended it; the client's connection was reset");
        } else {
            drop(client);
            debug!(node = %tunnel.node.name, how = %end, "stream closed");
        }
        self.stream_done(p, session, connect, end, &listed.stream().stats);
    }

    /// A carried stream's access record and histograms.
    fn stream_done(
        &self,
        p: &Pending,
        session: u64,
        connect: Duration,
        end: StreamEnd,
        stats: &StreamStats,
    ) {
        let node = p.dial.node.node.name.as_str();
        self.metrics.stream_ended(
            node,
            p.rec.started.elapsed().as_secs_f64(),
            stats.to_client.load(Ordering::Relaxed),
            stats.to_node.load(Ordering::Relaxed),
        );
        if p.settings.access_log {
            p.rec.carried(&Carried {
                session,
                connect,
                end,
                stats,
            });
        }
    }
}

/// A routed stream on its way to (or on) its node's shard.
struct Pending {
    dial: Dial,
    port: u16,
    peer: SocketAddr,
    /// Bytes the client sent past its request head.
    first: Bytes,
    /// The dial's access record, so far.
    rec: DialRecord,
    deadline: tokio::time::Instant,
    settings: Arc<ProxySettings>,
}

/// Where a stream is dialled: the node, the host on its side, and for a
/// service-CIDR dial the pool it may retry in.
struct Dial {
    node: Arc<NodeTunnel>,
    host: String,
    pool: Option<Pool>,
}

/// Pool dials (service CIDRs and pod networks): the less loaded of two
/// random tunnels among those that are healthy (not draining, not failing
/// their probe); a tunnel-side failure is retried once on another. When
/// every candidate fails, the error lists why.
struct Pool {
    routes: Arc<RouteTable<Arc<NodeTunnel>>>,
    tried: Vec<usize>,
    reasons: Vec<String>,
}

impl Pool {
    /// The next candidate, at most two in all.
    fn next(&mut self) -> Option<Arc<NodeTunnel>> {
        if self.tried.len() >= 2 {
            return None;
        }
        let nodes = self.routes.nodes();
        let healthy: Vec<usize> = (0..nodes.len())
            .filter(|i| !self.tried.contains(i) && nodes[*i].pool_eligible())
            .collect();
        let pick = pick_two(&healthy, |i| {
            nodes[i].counters.active_streams.load(Ordering::Relaxed)
        })?;
        self.tried.push(pick);
        Some(nodes[pick].clone())
    }

    /// After `node` failed with `e`: the next node to try, or the error to
    /// answer with.
    fn failed_on(
        &mut self,
        node: &NodeTunnel,
        e: TunnelError,
        host: &str,
    ) -> Result<Arc<NodeTunnel>, TunnelError> {
        match e {
            e @ TunnelError::ChannelOpenTimeout(_) => Err(e),
            e if e.is_tunnel_side() => {
                info!(node = %node.node.name, error = %e, "pool dial failed on this tunnel; trying another");
                self.reasons.push(format!("{}: {e}", node.node.name));
                self.next().ok_or_else(|| self.exhausted(host))
            }
            e => Err(e),
        }
    }

    /// Why no candidate is left.
    fn exhausted(&self, host: &str) -> TunnelError {
        if !self.reasons.is_empty() {
            return TunnelError::NotConnected(format!(
                "every candidate tunnel failed: {}",
                self.reasons.join("; ")
            ));
        }
        let nodes = self.routes.nodes();
        let mut states: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} {}", n.node.name, n.state().state.as_str()))
            .collect();
        states.truncate(10);
        TunnelError::NotConnected(format!(
            "none of {} node(s) can take {} {host}{}{}",
            nodes.len(),
            self.routes.pool_kind(host),
            if states.is_empty() { "" } else { ": " },
            states.join(", ")
        ))
    }
}

/// Power of two choices: two distinct random candidates, the less loaded wins.
fn pick_two(cands: &[usize], load: impl Fn(usize) -> u64) -> Option<usize> {
    match cands.len() {
        0 => None,
        1 => Some(cands[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (cands[a], cands[b]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn apiserver_request_parses() {
        let req = b"CONNECT 10.0.0.11:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nextra";
        assert_eq!(
            parse_head(req),
            Ok(Parsed::Connect {
                target: t("10.0.0.11", 10250),
                len: req.len() - 5
            })
        );
        assert_eq!(
            parse_head(b"CONNECT 10.0.0.11:10250 HTTP/1.1\r\nHo"),
            Ok(Parsed::Partial)
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("[fd00::1]:10250"),
            Some(t("fd00::1", 10250))
        );
        assert_eq!(parse_authority("node-1:10250"), Some(t("node-1", 10250)));
        assert_eq!(parse_authority("fd00::1:10250"), None);
        assert_eq!(parse_authority("[fd00::1]"), None);
        assert_eq!(parse_authority("[not-ip]:80"), None);
        assert_eq!(parse_authority("host:0"), None);
        assert_eq!(parse_authority("host:65536"), None);
        assert_eq!(parse_authority("host:+80"), None);
        assert_eq!(parse_authority(":80"), None);
        assert_eq!(parse_authority("a b:80"), None);
        assert_eq!(parse_authority("host"), None);
    }

    #[test]
    fn bad_heads() {
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotConnect(_))
        ));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse_head(b"CONNECT nope HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        let mut big = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEADER_BYTES + 10, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn pick_two_prefers_less_loaded() {
        assert_eq!(pick_two(&[], |_| 0), None);
        assert_eq!(pick_two(&[4], |_| 0), Some(4));
        for _ in 0..100 {
            // node 1 has no load, 0 has lots: whenever 1 is drawn it wins,
            // and with two candidates both are always drawn.
            assert_eq!(pick_two(&[0, 1], |i| if i == 0 { 100 } else { 0 }), Some(1));
        }
    }

    #[test]
    fn targets_print_as_authorities() {
        assert_eq!(t("10.0.0.11", 10250).to_string(), "10.0.0.11:10250");
        assert_eq!(t("node-1", 22).to_string(), "node-1:22");
        assert_eq!(t("fd00::1", 443).to_string(), "[fd00::1]:443");
    }

    #[test]
    fn host_length_limit_is_253() {
        let host = |n: usize| format!("{}:80", "a".repeat(n));
        assert_eq!(parse_authority(&host(253)), Some(t(&"a".repeat(253), 80)));
        assert_eq!(parse_authority(&host(254)), None);
        assert_eq!(parse_authority(&host(252)), Some(t(&"a".repeat(252), 80)));
        assert_eq!(parse_authority("a:65535"), Some(t("a", 65535)));
        assert_eq!(parse_authority("a:"), None);
        assert_eq!(parse_authority("my_node.a-b:1"), Some(t("my_node.a-b", 1)));
        assert_eq!(parse_authority("a/b:1"), None);
    }

    #[test]
    fn connect_heads_map_to_their_errors() {
        assert_eq!(
            parse_head(b"CONNECT [fd00::1]:10250 HTTP/1.1\r\n\r\n"),
            Ok(Parsed::Connect {
                target: t("fd00::1", 10250),
                len: 36
            })
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotConnect("POST".into()))
        );
        assert_eq!(
            parse_head(b"CONNECT a:0 HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadRequest(
                "CONNECT target \"a:0\" is not host:port".into()
            ))
        );
        // A partial head one byte short of the cap still waits for more.
        let mut near = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        near.resize(MAX_HEADER_BYTES - 1, b'a');
        assert_eq!(parse_head(&near), Ok(Parsed::Partial));
        near.push(b'a');
        assert_eq!(parse_head(&near), Err(HeadError::TooLarge));
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        let head = format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(head.as_bytes()), Err(HeadError::TooLarge));
    }

    #[test]
    fn reason_phrases_stay_on_one_printable_line() {
        assert_eq!(phrase("node said: no"), "node said: no");
        assert_eq!(phrase("a\r\nX-Evil: 1\tb\u{e9}"), "a??X-Evil: 1?b?");
        assert_eq!(phrase(&"x".repeat(500)).len(), 400);
    }

    #[test]
    fn tunnel_errors_map_to_gateway_statuses() {
        let refused = TunnelError::ChannelRefused("connect failed".into());
        assert_eq!(
            reply_to(refused),
            (
                502,
                "Bad Gateway: channel open refused by node: connect failed".into()
            )
        );
        let slow = TunnelError::ChannelOpenTimeout(Duration::from_secs(5));
        assert_eq!(
            reply_to(slow),
            (
                504,
                "Gateway Timeout: channel open timed out after 5s".into()
            )
        );
        let down = TunnelError::NotConnected("node-1 connecting".into());
        assert_eq!(
            reply_to(down),
            (
                503,
                "Service Unavailable: no healthy tunnel: node-1 connecting".into()
            )
        );
    }

    /// The reply a dial failure gets, and that its metric result agrees.
    fn reply_to(e: TunnelError) -> (u16, String) {
        let a = Refusal::Dial(e)
            .answer()
            .expect("a dial failure is answered");
        let result = match a.code {
            502 => DialResult::Refused,
            503 => DialResult::NoTunnel,
            504 => DialResult::Timeout,
            other => panic!("unexpected status {other}"),
        };
        assert_eq!(a.result, result, "{a:?}");
        (a.code, a.text)
    }

    #[test]
    fn refusals_before_routing_map_to_400s_and_a_closed_client_gets_nothing() {
        let code = |h: HeadError| Refusal::Head(h).answer().map(|a| (a.code, a.result));
        assert_eq!(code(HeadError::Closed), None);
        assert_eq!(
            code(HeadError::Truncated),
            Some((400, DialResult::BadRequest))
        );
        assert_eq!(
            code(HeadError::NotConnect("GET".into())),
            Some((405, DialResult::BadRequest))
        );
        assert_eq!(
            code(HeadError::TooLarge),
            Some((431, DialResult::BadRequest))
        );
        assert_eq!(
            Refusal::Forbidden("x".into())
                .answer()
                .map(|a| (a.code, a.result)),
            Some((403, DialResult::Forbidden))
        );
    }

    #[test]
    fn pick_two_draws_two_distinct_candidates() {
        // With three candidates and one unloaded, the unloaded one is picked
        // whenever it is drawn (2 in 3); the loaded ones never beat it. Both
        // loaded ones also get picked: a draw that ignored them would not.
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            let p = pick_two(&[0, 1, 2], |i| if i == 2 { 0 } else { 10 + i as u64 })
                .expect("a candidate");
            seen[p] += 1;
        }
        assert_eq!(seen[1], 0, "the most loaded candidate never wins: {seen:?}");
        assert!(seen[0] > 0 && seen[2] > seen[0], "{seen:?}");
    }
}
