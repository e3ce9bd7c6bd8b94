//! Typed tunnel errors.
//!
//! The proxy maps these to HTTP statuses and the status page shows them, so
//! they are an enum a caller can match on rather than strings: a timeout is a
//! 504, a channel the node refused is a 502 with the SSH reason, a tunnel that
//! is down is a 503, and a host key mismatch puts the node in `rejected`.

use std::time::Duration;

/// Why a connection to a node, or a channel through it, failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TunnelError {
    /// TCP connect did not finish in time.
    #[error("TCP connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The node actively refused the TCP connection.
    #[error("TCP connect refused: {0}")]
    ConnectRefused(String),
    /// Any other TCP-level connect failure (unreachable, reset...).
    #[error("TCP connect failed: {0}")]
    Connect(String),
    /// The SSH address, or an address its DNS name resolved to, is one
    /// that never names a node (loopback, link-local, a service CIDR...),
    /// or the name did not resolve. Nothing was dialed.
    #[error("SSH address refused: {0}")]
    ForbiddenAddress(String),
    /// SSH handshake or authentication did not finish in time.
    #[error("SSH handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The node presented a host key that known_hosts does not accept.
    #[error("host key verification failed: {0}")]
    HostKey(String),
    /// The node presented a key other than the one(s) known_hosts lists for
    /// it: possibly an attack. Counted per node (`host_key_mismatches`).
    #[error("host key verification failed: {0}")]
    HostKeyChanged(String),
    /// The node refused our public key.
    #[error("authentication refused for user {user:?} (remaining methods: {methods})")]
    AuthRejected {
        /// The user we tried.
        user: String,
        /// What the server said it would still accept.
        methods: String,
    },
    /// The local identity could not be loaded.
    #[error("identity file: {0}")]
    Identity(String),
    /// The SSH session failed or ended.
    #[error("SSH session: {0}")]
    Session(String),
    /// The node refused to open the channel (RFC 4254 reason).
    #[error("channel open refused by node: {0}")]
    ChannelRefused(String),
    /// The node did not answer a channel open in time.
    #[error("channel open timed out after {0:?}")]
    ChannelOpenTimeout(Duration),
    /// The node carries `max_streams_per_node` streams already.
    #[error("node is at its limit of {0} streams")]
    TooManyStreams(u64),
    /// The active health probe fails on this node.
    #[error("health probe failing: {0}")]
    Probe(String),
    /// There is no usable tunnel (backoff, rejected, shutting down).
    #[error("no healthy tunnel: {0}")]
    NotConnected(String),
}

impl TunnelError {
    /// True for failures that retrying soon will not fix without an operator
    /// (a changed host key, a refused key). The supervisor slows down to
    /// `max_backoff` for these and shows the node as `rejected`.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            TunnelError::HostKey(_)
                | TunnelError::HostKeyChanged(_)
                | TunnelError::ForbiddenAddress(_)
                | TunnelError::AuthRejected { .. }
                | TunnelError::Identity(_)
        )
    }

    /// True when the failure is on the tunnel side (not the destination):
    /// a pool dial may retry such a failure on another node.
    pub fn is_tunnel_side(&self) -> bool {
        !matches!(
            self,
            TunnelError::ChannelRefused(_) | TunnelError::TooManyStreams(_)
        )
    }

    /// Which class of failure this is, for the open-failure counters.
    pub fn class(&self) -> FailClass {
        match self {
            TunnelError::ConnectTimeout(_)
            | TunnelError::HandshakeTimeout(_)
            | TunnelError::ChannelOpenTimeout(_) => FailClass::Timeout,
            TunnelError::ConnectRefused(_) => FailClass::Refused,
            TunnelError::HostKey(_) | TunnelError::HostKeyChanged(_) => FailClass::HostKey,
            TunnelError::AuthRejected { .. } | TunnelError::Identity(_) => FailClass::Auth,
            _ => FailClass::Other,
        }
    }
}

/// The class of a failed session attempt: the `reason` label of
/// `tunneler_ssh_tunnel_open_fail`. The names live in [`FailClass::ALL`]
/// only, and counters are kept in a [`ByFailClass`] indexed by the class,
/// so a name and its counter cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailClass {
    /// A connect, handshake or channel open that timed out.
    Timeout,
    /// The node refused the TCP connection.
    Refused,
    /// The host key was not accepted.
    HostKey,
    /// Our key was refused, or could not be loaded.
    Auth,
    /// Anything else.
    Other,
}

impl FailClass {
    /// Every class with its label, in label order.
    pub const ALL: [(FailClass, &'static str); 5] = [
        (FailClass::Timeout, "timeout"),
        (FailClass::Refused, "refused"),
        (FailClass::HostKey, "host_key"),
        (FailClass::Auth, "auth"),
        (FailClass::Other, "other"),
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One `T` per [`FailClass`], indexed by the class.
#[derive(Debug, Default)]
pub struct ByFailClass<T>([T; 5]);

impl<T> std::ops::Index<FailClass> for ByFailClass<T> {
    type Output = T;
    fn index(&self, c: FailClass) -> &T {
        &self.0[c.index()]
    }
}

impl<T> ByFailClass<T> {
    /// Every class, its label and its value, in label order.
    pub fn iter(&self) -> impl Iterator<Item = (FailClass, &'static str, &T)> {
        FailClass::ALL
            .iter()
            .map(move |&(c, name)| (c, name, &self[c]))
    }
}

/// Text for an SSH channel-open failure code, as OpenSSH would phrase it.
pub fn channel_open_reason(f: &russh::ChannelOpenFailure) -> String {
    match f {
        russh::ChannelOpenFailure::AdministrativelyProhibited => {
            "administratively prohibited".to_string()
        }
        russh::ChannelOpenFailure::ConnectFailed => "connect failed".to_string(),
        russh::ChannelOpenFailure::UnknownChannelType => "unknown channel type".to_string(),
        russh::ChannelOpenFailure::ResourceShortage => "resource shortage".to_string(),
        russh::ChannelOpenFailure::Other { code, reason } => {
            format!("code {code}: {}", crate::text::escape_control(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fail_class_has_its_own_label_and_counter() {
        let counters = ByFailClass::<std::sync::atomic::AtomicU64>::default();
        for (i, (class, name)) in FailClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), i, "{name} sits at its own index");
            assert_eq!(FailClass::ALL[class.index()].1, *name);
            counters[*class].fetch_add(i as u64 + 1, std::sync::atomic::Ordering::Relaxed);
        }
        let seen: Vec<(&str, u64)> = counters
            .iter()
            .map(|(_, n, v)| (n, v.load(std::sync::atomic::Ordering::Relaxed)))
            .collect();
        assert_eq!(
            seen,
            [
                ("timeout", 1),
                ("refused", 2),
                ("host_key", 3),
                ("auth", 4),
                ("other", 5)
            ]
        );
        assert_eq!(
            TunnelError::ConnectRefused("x".into()).class(),
            FailClass::Refused
        );
    }
}
