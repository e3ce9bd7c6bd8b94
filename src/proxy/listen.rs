//! Listeners and admission: the bound sockets, each listener's budget of
//! connections that have not yet sent their head, the accept loops, the
//! TLS handshake and the head read.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::proxy::access::{Client, DialRecord, Origin};
use crate::proxy::refusal::{reply, Refusal, LINGER};
use crate::proxy::{parse_head, tls, EgressProxy, HeadError, Parsed, MAX_HEADER_BYTES};
use crate::shard::{Movable, MovableTcp};

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

impl EgressProxy {
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
            let Some(accepted) = self.accept(&listener).await else {
                break;
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
                self.turn_away(conn, matches!(listener, ProxyListener::Tls(..)));
                continue;
            };
            let tls = match &listener {
                ProxyListener::Tls(_, acceptor) => Some(acceptor.clone()),
                _ => None,
            };
            let this = self.clone();
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            let origin = Accepted {
                listener: listener_url.clone(),
                peer,
                client,
                id,
                permit,
            };
            self.tracker
                .spawn(async move { this.admit(conn, tls, origin).await });
        }
    }

    /// The next connection on `listener`; `None` once the listeners stop
    /// accepting.
    async fn accept(
        &self,
        listener: &ProxyListener,
    ) -> Option<std::io::Result<(Conn, SocketAddr, Client)>> {
        Some(match listener {
            ProxyListener::Unix(l, _) => tokio::select! {
                _ = self.accepting.cancelled() => return None,
                r = l.accept() => r.map(|(s, _)| {
                    let peer = SocketAddr::from(([127, 0, 0, 1], 0));
                    let uid = s.peer_cred().ok().map(|c| c.uid());
                    (Conn::Unix(s), peer, Client::Unix { uid })
                }),
            },
            ProxyListener::Tcp(l) | ProxyListener::Tls(l, _) => tokio::select! {
                _ = self.accepting.cancelled() => return None,
                r = l.accept() => r.map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Conn::Tcp(s), a, Client::Tcp { addr: a })
                }),
            },
        })
    }

    /// Turns a connection away at once: the listener's budget of pending
    /// heads is spent.
    fn turn_away(&self, mut conn: Conn, tls: bool) {
        if tls {
            // A TLS client cannot read a plain-text reply.
            drop(conn);
            return;
        }
        self.tracker.spawn(async move {
            let text = "Service Unavailable: too many connections waiting to send their request";
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
    }

    /// An admitted connection: on the mTLS listener, its TLS handshake
    /// (bounded by `handshake_timeout`) first; then [`EgressProxy::handle`].
    async fn admit(self, conn: Conn, tls: Option<TlsAcceptor>, a: Accepted) {
        let Accepted {
            listener,
            peer,
            client,
            id,
            permit,
        } = a;
        let origin = |client| Arc::new(Origin { listener, client });
        let (s, acceptor) = match (conn, tls) {
            (Conn::Unix(s), _) => return self.handle(s, peer, origin(client), id, permit).await,
            (Conn::Tcp(s), None) => return self.handle(s, peer, origin(client), id, permit).await,
            (Conn::Tcp(s), Some(acceptor)) => (s, acceptor),
        };
        let limit = self.settings.load().handshake_timeout;
        // The span names the peer in the verifier's log line
        // about a refused client certificate.
        let handshake = tokio::time::timeout(limit, acceptor.accept(MovableTcp::Attached(s)))
            .instrument(info_span!("tls_client", %peer));
        let tls = tokio::select! {
            _ = self.cancel.cancelled() => return,
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
                self.handle(tls, peer, origin(client), id, permit).await
            }
            Ok(Err(e)) => info!(%peer, error = %e, "TLS handshake refused"),
            Err(_) => info!(%peer, "TLS handshake timed out"),
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
        let head = tokio::time::timeout(limit, read_head(&mut s, &mut buf));
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
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// Reads into `buf` until it holds a complete head (or one that cannot
/// become one), never past [`MAX_HEADER_BYTES`].
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Parsed, HeadError> {
    loop {
        match parse_head(buf) {
            Ok(Parsed::Partial) => {}
            other => return other,
        }
        let want = MAX_HEADER_BYTES.saturating_sub(buf.len()).max(1);
        let mut limited = (&mut *s).take(want as u64);
        match limited.read_buf(buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(HeadError::Closed),
            Ok(0) | Err(_) => return Err(HeadError::Truncated),
            Ok(_) => {}
        }
    }
}

/// What an accepted connection carries to its handler: where it came in,
/// from whom, its stream id and its pending-head permit.
struct Accepted {
    listener: Arc<str>,
    peer: SocketAddr,
    client: Client,
    id: u64,
    permit: OwnedSemaphorePermit,
}
