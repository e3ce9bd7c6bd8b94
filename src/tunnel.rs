//! One supervised SSH tunnel per node.
//!
//! [`NodeTunnel`] is the cheap shared handle the proxy and the admin API use;
//! [`NodeTunnel::spawn`] starts the actor that owns the connection's whole
//! life: connect → verify host key → authenticate → serve → back off → again.
//! It never gives up on a node that is still configured. Cancelling the
//! node's token stops it and disconnects the session.
//!
//! Session end is detected through the russh handler being dropped (it is
//! owned by the session task), not through stream EOFs: a dead connection
//! looks like a clean EOF on each channel, so only the session can tell.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwapOption;
use russh::client::{self, AuthResult, DisconnectReason, Handle};
use russh::keys::ssh_key::HashAlg;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, Disconnect};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{NodeConfig, ReconnectConfig, SshConfig};
use crate::error::{channel_open_reason, TunnelError};
use crate::known_hosts::{KnownHostsStore, Verdict};

/// The state a node's tunnel is in, as shown by `tunneler status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    /// Connecting or handshaking.
    Connecting,
    /// Connected and authenticated.
    Healthy,
    /// Waiting to retry after a failure.
    Backoff,
    /// Host key mismatch or authentication refused; retried at max_backoff.
    Rejected,
}

impl TunnelState {
    /// The lowercase name used in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            TunnelState::Connecting => "connecting",
            TunnelState::Healthy => "healthy",
            TunnelState::Backoff => "backoff",
            TunnelState::Rejected => "rejected",
        }
    }
}

/// State plus when it was entered and why the last failure happened.
#[derive(Debug, Clone)]
pub struct StateInfo {
    /// Current state.
    pub state: TunnelState,
    /// When this state was entered.
    pub since: SystemTime,
    /// The most recent failure, kept across a later success for diagnosis.
    pub last_error: Option<TunnelError>,
}

/// Everything the actors share that does not depend on the node.
#[derive(Debug)]
pub struct SshContext {
    /// SSH settings.
    pub ssh: SshConfig,
    /// Backoff settings.
    pub reconnect: ReconnectConfig,
    /// The loaded client key. Never logged.
    pub identity: Arc<PrivateKey>,
    /// Host keys.
    pub known_hosts: Arc<KnownHostsStore>,
    /// russh client settings, built once.
    pub client_config: Arc<client::Config>,
}

impl SshContext {
    /// Builds the shared context and russh settings from validated config.
    pub fn new(
        ssh: SshConfig,
        reconnect: ReconnectConfig,
        identity: Arc<PrivateKey>,
        known_hosts: Arc<KnownHostsStore>,
    ) -> SshContext {
        let preferred = russh::Preferred {
            // AES-GCM first: with AES-NI it is the fastest AEAD in ring and
            // it is what `ssh -L` negotiates against OpenSSH by default.
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_128_CTR,
            ]),
            ..russh::Preferred::default()
        };
        let client_config = client::Config {
            keepalive_interval: Some(ssh.keepalive_interval),
            keepalive_max: ssh.keepalive_max,
            nodelay: true,
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: 65535,
            channel_buffer_size: 256,
            preferred,
            ..client::Config::default()
        };
        SshContext {
            ssh,
            reconnect,
            identity,
            known_hosts,
            client_config: Arc::new(client_config),
        }
    }
}

/// A connected, authenticated session.
struct Conn {
    handle: Handle<ClientHandler>,
}

/// Per-node counters, updated lock-free by streams.
#[derive(Debug, Default)]
pub struct Counters {
    /// Streams open right now.
    pub active_streams: AtomicU64,
    /// Streams opened since start.
    pub total_streams: AtomicU64,
    /// Bytes from the node to clients.
    pub bytes_in: AtomicU64,
    /// Bytes from clients to the node.
    pub bytes_out: AtomicU64,
    /// Sessions that ended after being established.
    pub reconnects: AtomicU64,
}

/// The shared handle to one node's tunnel.
pub struct NodeTunnel {
    /// The node's settings.
    pub node: NodeConfig,
    state: watch::Sender<StateInfo>,
    conn: ArcSwapOption<Conn>,
    /// Stream and byte counters.
    pub counters: Counters,
    cancel: CancellationToken,
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
    /// Creates the handle and starts the supervising actor on `tracker`.
    /// The actor stops when `cancel` is cancelled.
    pub fn spawn(
        node: NodeConfig,
        ctx: Arc<SshContext>,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<NodeTunnel> {
        let (state, _) = watch::channel(StateInfo {
            state: TunnelState::Connecting,
            since: SystemTime::now(),
            last_error: None,
        });
        let tunnel = Arc::new(NodeTunnel {
            node,
            state,
            conn: ArcSwapOption::empty(),
            counters: Counters::default(),
            cancel,
        });
        let span = info_span!("node", node = %tunnel.node.name);
        tracker.spawn(supervise(tunnel.clone(), ctx).instrument(span));
        tunnel
    }

    /// A snapshot of the current state.
    pub fn state(&self) -> StateInfo {
        self.state.borrow().clone()
    }

    /// Stops the actor (and with it the session).
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn set_state(&self, state: TunnelState, err: Option<TunnelError>) {
        self.state.send_modify(|s| {
            if s.state != state {
                s.state = state;
                s.since = SystemTime::now();
            }
            if err.is_some() {
                s.last_error = err;
            }
        });
    }

    /// Opens a direct-tcpip channel to `host:port` on the node's side.
    ///
    /// Waits for a `connecting` tunnel until `deadline`; fails at once when
    /// the tunnel is in backoff or rejected. The channel open itself is bounded
    /// by the same deadline because russh has no open timeout (russh #329).
    pub async fn open_channel(
        &self,
        host: &str,
        port: u16,
        originator: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<Channel<client::Msg>, TunnelError> {
        let conn = self.wait_connected(deadline).await?;
        let open = conn.handle.channel_open_direct_tcpip(
            host,
            port as u32,
            originator.ip().to_string(),
            originator.port() as u32,
        );
        match tokio::time::timeout_at(deadline, open).await {
            Err(_) => Err(TunnelError::ChannelOpenTimeout(
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            )),
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(russh::Error::ChannelOpenFailure(f))) => {
                Err(TunnelError::ChannelRefused(channel_open_reason(&f)))
            }
            Ok(Err(e)) => Err(TunnelError::Session(e.to_string())),
        }
    }

    async fn wait_connected(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Conn>, TunnelError> {
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match state.state {
                TunnelState::Healthy => {
                    if let Some(c) = self.conn.load_full() {
                        return Ok(c);
                    }
                }
                TunnelState::Connecting => {}
                TunnelState::Backoff | TunnelState::Rejected => {
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

/// The russh callbacks for one session. It lives inside russh's session
/// task, so its drop marks the session's end.
struct ClientHandler {
    node: NodeConfig,
    known_hosts: Arc<KnownHostsStore>,
    /// Filled when the host key is refused, so the caller can say why.
    host_key_error: Arc<Mutex<Option<TunnelError>>>,
    /// Filled with the disconnect reason when the session ends.
    end_reason: Arc<Mutex<Option<String>>>,
    _ended: DropGuard,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                *self
                    .host_key_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(TunnelError::HostKey(
                    "host certificates are not supported yet".into(),
                ));
                return Ok(false);
            }
        };
        let file = self.known_hosts.current();
        let mut names: Vec<String> = vec![self.node.address.clone()];
        names.push(self.node.name.clone());
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let presented = key.fingerprint(HashAlg::Sha256).to_string();
        let verdict = file.check(&refs, self.node.port, key);
        let err = match verdict {
            Verdict::Trusted => return Ok(true),
            Verdict::Mismatch { expected } => {
                warn!(presented = %presented, expected = ?expected, "HOST KEY MISMATCH: the node presented a key that known_hosts does not list for it");
                TunnelError::HostKey(format!(
                    "host key mismatch: node presented {presented}, known_hosts has {}",
                    expected.join(", ")
                ))
            }
            Verdict::Unknown => {
                warn!(presented = %presented, "host key unknown: no known_hosts entry for this node");
                TunnelError::HostKey(format!(
                    "host key {presented} is not in known_hosts (no entry for {})",
                    self.node.address
                ))
            }
            Verdict::Revoked => TunnelError::HostKey(format!("host key {presented} is revoked")),
        };
        *self
            .host_key_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(err);
        Ok(false)
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!(
                    "node sent disconnect: {:?} {}",
                    info.reason_code, info.message
                )
            }
            DisconnectReason::Error(e) => match e {
                russh::Error::KeepaliveTimeout => {
                    "keepalive timeout: no answer from the node".into()
                }
                other => format!("session error: {other}"),
            },
        };
        *self.end_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// Connects, verifies and authenticates once. Returns the session and a
/// token that is cancelled when the session ends.
async fn connect_once(
    node: &NodeConfig,
    ctx: &SshContext,
) -> Result<
    (
        Handle<ClientHandler>,
        CancellationToken,
        Arc<Mutex<Option<String>>>,
    ),
    TunnelError,
> {
    let timeout = ctx.ssh.connect_timeout;
    let endpoint = (node.address.as_str(), node.port);
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
        Err(_) => return Err(TunnelError::ConnectTimeout(timeout)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(TunnelError::ConnectRefused(e.to_string()))
        }
        Ok(Err(e)) => return Err(TunnelError::Connect(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);

    let ended = CancellationToken::new();
    let host_key_error = Arc::new(Mutex::new(None));
    let end_reason = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        node: node.clone(),
        known_hosts: ctx.known_hosts.clone(),
        host_key_error: host_key_error.clone(),
        end_reason: end_reason.clone(),
        _ended: ended.clone().drop_guard(),
    };

    let handshake = async {
        let mut handle = client::connect_stream(ctx.client_config.clone(), tcp, handler)
            .await
            .map_err(|e| {
                if let Some(hk) = host_key_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    return hk;
                }
                match e {
                    russh::Error::UnknownKey => {
                        TunnelError::HostKey("host key not accepted".into())
                    }
                    other => TunnelError::Session(format!("handshake failed: {other}")),
                }
            })?;
        let hash = if ctx.identity.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| TunnelError::Session(e.to_string()))?
                .flatten()
        } else {
            None
        };
        let auth = handle
            .authenticate_publickey(
                ctx.ssh.user.clone(),
                PrivateKeyWithHashAlg::new(ctx.identity.clone(), hash),
            )
            .await
            .map_err(|e| TunnelError::Session(format!("authentication failed: {e}")))?;
        match auth {
            AuthResult::Success => Ok(handle),
            AuthResult::Failure {
                remaining_methods, ..
            } => {
                let methods: Vec<&str> = remaining_methods.iter().map(|m| m.into()).collect();
                let _ = handle
                    .disconnect(Disconnect::ByApplication, "authentication refused", "")
                    .await;
                Err(TunnelError::AuthRejected {
                    user: ctx.ssh.user.clone(),
                    methods: methods.join(","),
                })
            }
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => Err(TunnelError::HandshakeTimeout(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(handle)) => Ok((handle, ended, end_reason)),
    }
}

/// The actor loop. Runs until the node's token is cancelled.
async fn supervise(tunnel: Arc<NodeTunnel>, ctx: Arc<SshContext>) {
    let mut backoff = Backoff::new(ctx.reconnect.initial_backoff, ctx.reconnect.max_backoff);
    let cancel = tunnel.cancel.clone();
    loop {
        tunnel.set_state(TunnelState::Connecting, None);
        debug!(endpoint = %tunnel.node.endpoint(), "connecting");
        let attempt = tokio::select! {
            _ = cancel.cancelled() => break,
            r = connect_once(&tunnel.node, &ctx) => r,
        };
        let delay = match attempt {
            Ok((handle, ended, end_reason)) => {
                let conn = Arc::new(Conn { handle });
                tunnel.conn.store(Some(conn.clone()));
                tunnel.set_state(TunnelState::Healthy, None);
                info!(endpoint = %tunnel.node.endpoint(), "tunnel healthy");
                let up_at = Instant::now();
                let stopping = tokio::select! {
                    _ = cancel.cancelled() => true,
                    _ = ended.cancelled() => false,
                };
                tunnel.conn.store(None);
                if stopping {
                    let _ = conn
                        .handle
                        .disconnect(Disconnect::ByApplication, "tunneler shutting down", "")
                        .await;
                    break;
                }
                let why = end_reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| "session ended".into());
                warn!(reason = %why, "tunnel lost");
                tunnel.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                if up_at.elapsed() >= ctx.reconnect.stable_after {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tunnel.set_state(TunnelState::Backoff, Some(TunnelError::Session(why)));
                delay
            }
            Err(e) if e.is_rejection() => {
                warn!(error = %e, retry_in = ?backoff.max(), "tunnel rejected");
                tunnel.set_state(TunnelState::Rejected, Some(e));
                backoff.max()
            }
            Err(e) => {
                let delay = backoff.next_delay();
                info!(error = %e, retry_in = ?delay, "connect failed");
                tunnel.set_state(TunnelState::Backoff, Some(e));
                delay
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tunnel.conn.store(None);
    debug!("supervisor stopped");
}
