//! One SSH session to a node: TCP connect, handshake, host key check and
//! authentication, each under a timeout (russh has none of its own).
//!
//! The russh [`client::Handler`] lives inside russh's session task, so its
//! drop marks the session's end. That is how the supervisor tells a dead
//! session from a stream that merely ended: a dead connection looks like a
//! clean EOF on each channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult, DisconnectReason, Handle};
use russh::keys::ssh_key::{HashAlg, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::Disconnect;
use std::os::fd::AsFd;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use tracing::{debug, info, warn};

use crate::config::{HostKeyPolicy, NodeConfig, SshConfig};
use crate::error::TunnelError;
use crate::ssh::context::SshContext;
use crate::ssh::known_hosts::{KnownHostsStore, Learned, Verdict};

/// An established, authenticated session.
pub struct Session {
    /// The russh handle: opens channels, sends pings, disconnects.
    pub handle: Handle<ClientHandler>,
    /// Cancelled when the session task ends, for any reason.
    pub ended: CancellationToken,
    /// Why it ended, when russh told us.
    pub end_reason: Arc<Mutex<Option<String>>>,
    /// A second handle on the TCP socket, on which the kernel's keepalive
    /// verdict can be read while a slow reader parks the session loop
    /// (russh reads nothing then). None if the socket could not be cloned.
    pub watch: Option<std::net::TcpStream>,
    /// The SSH window russh opens on every channel of this session, sized
    /// to the link at connect.
    pub window: u32,
    /// Cancelled when the node has announced its host keys
    /// (`hostkeys-00@openssh.com`, which OpenSSH's sshd sends right after
    /// authentication). A ping sent before that meets the announcement on
    /// the wire and measures a stall, not the link (see `tunnel`).
    pub announced: CancellationToken,
}

impl Session {
    /// The recorded reason a session ended, or a generic one.
    pub fn reason(end_reason: &Mutex<Option<String>>) -> String {
        end_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| "session ended".into())
    }
}

/// The russh callbacks for one session. It lives inside russh's session
/// task, so its drop marks the session's end.
pub struct ClientHandler {
    node: NodeConfig,
    known_hosts: Arc<KnownHostsStore>,
    policy: HostKeyPolicy,
    /// Filled when the host key is refused, so the caller can say why.
    host_key_error: Arc<Mutex<Option<TunnelError>>>,
    /// Filled with the disconnect reason when the session ends.
    end_reason: Arc<Mutex<Option<String>>>,
    /// The shard the session was opened on: russh runs these callbacks in
    /// its session task, which must stay there (checked, see `shard`).
    shard: Option<usize>,
    /// See [`Session::announced`].
    announced: CancellationToken,
    _ended: DropGuard,
}

impl ClientHandler {
    /// The names known_hosts is searched for: the SSH address and the node
    /// name (the latter also as a certificate principal).
    fn names(&self) -> [&str; 2] {
        [self.node.address.as_str(), self.node.name.as_str()]
    }

    fn refuse(&self, err: TunnelError) -> Result<bool, russh::Error> {
        *self
            .host_key_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(err);
        Ok(false)
    }

    /// `accept-new`: record the key of a host known_hosts says nothing about.
    async fn learn(&self, key: &PublicKey) -> Result<Learned, TunnelError> {
        let store = self.known_hosts.clone();
        let node = self.node.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || {
            store.learn(
                &[node.address.as_str(), node.name.as_str()],
                node.port,
                &node.address,
                &key,
            )
        })
        .await
        .map_err(|e| TunnelError::HostKey(format!("accept-new: {e}")))?
        .map_err(|e| {
            TunnelError::HostKey(format!(
                "accept-new could not record the host key in {}: {e}",
                self.known_hosts.path().display()
            ))
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        crate::shard::check(self.shard);
        let file = self.known_hosts.current();
        let names = self.names();
        let port = self.node.port;
        // The plain key (inside the certificate, if one was presented) is
        // what accept-new records and what the log names.
        let (mut verdict, plain, presented) = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                file.check(&names, port, key),
                key.clone(),
                key.fingerprint(HashAlg::Sha256).to_string(),
            ),
            PublicKeyOrCertificate::Certificate(cert) => {
                let plain = PublicKey::new(cert.public_key().clone(), "");
                let presented = format!(
                    "{} (certificate {:?} signed by CA {})",
                    plain.fingerprint(HashAlg::Sha256),
                    cert.key_id(),
                    cert.signature_key().fingerprint(HashAlg::Sha256)
                );
                (
                    file.check_certificate(&names, port, cert, unix_now()),
                    plain,
                    presented,
                )
            }
        };
        if verdict == Verdict::Unknown && self.policy == HostKeyPolicy::AcceptNew {
            match self.learn(&plain).await {
                Ok(Learned::Added) => {
                    info!(presented = %presented, file = %self.known_hosts.path().display(), "accept-new: recorded the key of a host known_hosts did not know");
                    return Ok(true);
                }
                Ok(Learned::Existing(v)) => verdict = v,
                Err(e) => {
                    warn!(error = %e, "accept-new failed");
                    return self.refuse(e);
                }
            }
        }
        let err = match verdict {
            Verdict::Trusted => return Ok(true),
            Verdict::Mismatch { expected } => {
                warn!(presented = %presented, expected = ?expected, "HOST KEY MISMATCH: the node presented a key that known_hosts does not list for it");
                TunnelError::HostKeyChanged(format!(
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
            Verdict::CertificateRequired => {
                warn!(presented = %presented, "plain host key REFUSED: an @cert-authority line covers this node, so it must present a host certificate from that CA (possibly a man in the middle)");
                TunnelError::HostKey(format!(
                    "host key {presented} refused: an @cert-authority line in known_hosts covers {}, so the node must present a host certificate signed by that CA; a plain key is never learned there",
                    self.node.address
                ))
            }
            Verdict::Revoked => {
                warn!(presented = %presented, "host key REVOKED in known_hosts");
                TunnelError::HostKey(format!("host key {presented} is revoked"))
            }
            Verdict::CertificateRejected { reason } => {
                warn!(presented = %presented, reason = %reason, "host certificate refused");
                TunnelError::HostKey(format!("host certificate {presented} refused: {reason}"))
            }
        };
        self.refuse(err)
    }

    async fn openssh_ext_host_keys_announced(
        &mut self,
        keys: Vec<PublicKey>,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        crate::shard::check(self.shard);
        debug!(keys = keys.len(), "the node announced its host keys");
        self.announced.cancel();
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        crate::shard::check(self.shard);
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) => {
                format!(
                    "node sent disconnect: {:?} {}",
                    info.reason_code,
                    crate::text::escape_control(&info.message)
                )
            }
            DisconnectReason::Error(e) => match e {
                russh::Error::KeepaliveTimeout => {
                    "keepalive timeout: no answer from the node".into()
                }
                other => format!(
                    "session error: {}",
                    crate::text::escape_control(&other.to_string())
                ),
            },
        };
        *self.end_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// Connects, verifies and authenticates once. The session's SSH window is
/// one bandwidth-delay product of the link (`ssh.window_*`), from the
/// lower of the TCP handshake's round trip and `known_rtt`, the lowest
/// keepalive round trip the node has shown (none for a first connect).
pub async fn connect(
    node: &NodeConfig,
    ctx: &SshContext,
    known_rtt: Option<Duration>,
) -> Result<Session, TunnelError> {
    // Wait for a handshake slot first; the timeouts below start once we
    // hold one, so a queue of a thousand nodes does not time itself out.
    let _slot = ctx
        .handshakes
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| TunnelError::NotConnected("shutting down".into()))?;
    let timeout = ctx.ssh.connect_timeout;
    let endpoints = match tokio::time::timeout(timeout, resolve(node, &ctx.service_cidrs)).await {
        Err(_) => return Err(TunnelError::ConnectTimeout(timeout)),
        Ok(r) => r?,
    };
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(&endpoints[..])).await {
        Err(_) => return Err(TunnelError::ConnectTimeout(timeout)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(TunnelError::ConnectRefused(e.to_string()))
        }
        Ok(Err(e)) => return Err(TunnelError::Connect(e.to_string())),
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    kernel_liveness(&tcp, &ctx.ssh);
    let rtt = match (handshake_rtt(&tcp), known_rtt) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let window = ctx.ssh.window.for_rtt(rtt);
    debug!(?rtt, window, "SSH window sized to the link");
    let watch = tcp
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .ok();

    let ended = CancellationToken::new();
    let host_key_error = Arc::new(Mutex::new(None));
    let end_reason = Arc::new(Mutex::new(None));
    let announced = CancellationToken::new();
    let handler = ClientHandler {
        announced: announced.clone(),
        node: node.clone(),
        known_hosts: ctx.known_hosts.clone(),
        policy: ctx.ssh.host_key_policy,
        host_key_error: host_key_error.clone(),
        end_reason: end_reason.clone(),
        shard: crate::shard::current(),
        _ended: ended.clone().drop_guard(),
    };

    // Advertise certificate host key algorithms only when a CA could vouch
    // for this node, as OpenSSH orders its algorithms by what known_hosts
    // holds; otherwise a node with a certificate shows its plain key.
    let names = [node.address.as_str(), node.name.as_str()];
    let certificates = ctx
        .known_hosts
        .current()
        .has_cert_authority_for(&names, node.port);
    let client_config = ctx.client_config(certificates, window);

    let handshake = async {
        let stream = crate::ssh::readahead::ReadAhead::new(tcp);
        let mut handle = client::connect_stream(client_config, stream, handler)
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
        let auth = ctx
            .identity
            .authenticate(&mut handle, &ctx.ssh.user)
            .await?;
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
        Ok(Ok(handle)) => Ok(Session {
            handle,
            ended,
            end_reason,
            watch,
            window,
            announced,
        }),
    }
}

/// The socket addresses a connect to `node` may use. An IP literal is
/// used as it is, never handed to the system resolver (which would read
/// `127.1` as loopback). A DNS name (only an operator can write one) is
/// resolved here, and every answer is checked against the same bans as a
/// literal: one banned answer refuses the whole name, since a name that
/// can lead to this host's loopback is not one to try addresses of.
/// The bans are checked again for a literal, as the last word before any
/// dial, whichever path the address took to get here.
async fn resolve(
    node: &NodeConfig,
    service_cidrs: &[ipnet::IpNet],
) -> Result<Vec<std::net::SocketAddr>, TunnelError> {
    let refuse = |ip: std::net::IpAddr, why: String| {
        warn!(address = %node.address, resolved = %ip, reason = %why, "SSH address refused");
        TunnelError::ForbiddenAddress(format!(
            "node {:?}: {:?} gives {ip}, which is {why}",
            node.name, node.address
        ))
    };
    let addrs: Vec<std::net::SocketAddr> = match node.address.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![(ip, node.port).into()],
        Err(_) => tokio::net::lookup_host((node.address.as_str(), node.port))
            .await
            .map_err(|e| {
                TunnelError::Connect(format!(
                    "node {:?}: {:?} does not resolve: {e}",
                    node.name, node.address
                ))
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(TunnelError::Connect(format!(
            "node {:?}: {:?} resolves to no address",
            node.name, node.address
        )));
    }
    for a in &addrs {
        if let Some(why) = crate::config::address::connect_ban(a.ip(), service_cidrs) {
            return Err(refuse(a.ip(), why));
        }
    }
    Ok(addrs)
}

/// Whether a log event is russh's complaint about a `maximum_packet_size`
/// above 65535, so the subscriber can drop it.
///
/// russh 0.65 logs it at `error!` on every connect, from its `client`
/// module (target `russh::client`), though it reads packets up to 256 KiB
/// and we ask for that size on purpose. The event comes through `log`, so
/// only its target and level are known before it is recorded; nothing else
/// in that module logs at error level for what we use (the other errors
/// there are about port forwarding and global requests we never send).
/// russh's other modules (`russh::client::encrypted`, ...) are untouched.
pub fn is_russh_packet_size_complaint(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "russh::client" && *meta.level() == tracing::Level::ERROR
}

/// Kernel TCP keepalive with the SSH keepalive's figures, plus a user
/// timeout for unacknowledged data. russh's own keepalive cannot run while
/// our backpressure parks its session loop; the kernel's can, whether we
/// read or not, and its verdict shows on the socket's error (see
/// `tunnel`'s hold watchdog).
/// The kernel's round-trip estimate of a just-connected socket: the
/// SYN / SYN-ACK exchange, which no delayed ACK or busy peer inflates
/// (`tcpi_rtt`, microseconds). None where the kernel does not say.
#[allow(unsafe_code)]
fn handshake_rtt(tcp: &TcpStream) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain old data, zeroed is a valid value, and
    // the kernel writes at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the call's duration (borrowed from
    // `tcp`), and `info`/`len` point at live, correctly sized memory.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(info.tcpi_rtt.into()))
}

fn kernel_liveness(tcp: &TcpStream, ssh: &SshConfig) {
    let sock = socket2::SockRef::from(tcp);
    let every = ssh.keepalive_interval;
    let count = u32::try_from(ssh.keepalive_max).unwrap_or(u32::MAX);
    let ka = socket2::TcpKeepalive::new()
        .with_time(every)
        .with_interval(every)
        .with_retries(count);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        debug!(error = %e, "TCP keepalive not set");
    }
    let limit = every.saturating_mul(count.saturating_add(1));
    if let Err(e) = sock.set_tcp_user_timeout(Some(limit)) {
        debug!(error = %e, "TCP user timeout not set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name that resolves to loopback is refused after resolution, and
    /// nothing is dialed: validation keeps `localhost` out of any config,
    /// so this builds the node past it, as a DNS record pointing at
    /// 127.0.0.1 would arrive.
    #[tokio::test]
    async fn every_resolved_address_is_checked_before_a_dial() {
        let mut node = crate::config::test_node("n1", &["10.0.0.11"], &[]);
        node.address = "localhost".into();
        let e = resolve(&node, &[]).await.unwrap_err();
        assert!(matches!(e, TunnelError::ForbiddenAddress(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("\"n1\"") && text.contains("\"localhost\"") && text.contains("loopback"),
            "{text}"
        );
        node.address = "10.96.0.10".into();
        let svc = ["10.96.0.0/12".parse().unwrap()];
        let e = resolve(&node, &svc).await.unwrap_err();
        assert!(e.to_string().contains("service CIDR 10.96.0.0/12"), "{e}");
        node.address = "10.0.0.11".into();
        assert_eq!(
            resolve(&node, &svc).await.unwrap(),
            vec!["10.0.0.11:22".parse().unwrap()]
        );
    }
}
