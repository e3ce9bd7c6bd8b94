//! One SSH session to a node: TCP connect, handshake, host key check and
//! authentication, each under a timeout (russh has none of its own).
//!
//! The russh [`client::Handler`] lives inside russh's session task, so its
//! drop marks the session's end. That is how the supervisor tells a dead
//! session from a stream that merely ended: a dead connection looks like a
//! clean EOF on each channel.

use std::sync::{Arc, Mutex};

use russh::client::{self, AuthResult, DisconnectReason, Handle};
use russh::keys::ssh_key::HashAlg;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::Disconnect;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::warn;

use crate::config::NodeConfig;
use crate::error::TunnelError;
use crate::known_hosts::{KnownHostsStore, Verdict};
use crate::tunnel::SshContext;

/// An established, authenticated session.
pub struct Session {
    /// The russh handle: opens channels, sends pings, disconnects.
    pub handle: Handle<ClientHandler>,
    /// Cancelled when the session task ends, for any reason.
    pub ended: CancellationToken,
    /// Why it ended, when russh told us.
    pub end_reason: Arc<Mutex<Option<String>>>,
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

/// Connects, verifies and authenticates once.
pub async fn connect(node: &NodeConfig, ctx: &SshContext) -> Result<Session, TunnelError> {
    // Wait for a handshake slot first; the timeouts below start once we
    // hold one, so a queue of a thousand nodes does not time itself out.
    let _slot = ctx
        .handshakes
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| TunnelError::NotConnected("shutting down".into()))?;
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
        Ok(Ok(handle)) => Ok(Session {
            handle,
            ended,
            end_reason,
        }),
    }
}
