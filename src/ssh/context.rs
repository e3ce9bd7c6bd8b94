//! What every node's SSH sessions share: settings, the client identity,
//! host keys and the russh client configuration, built once per config.
//!
//! It sits with the session, below the node tunnel: the session reads it
//! to connect. The tunnel's own settings (backoff, probe, drain) are not
//! here but in `tunnel::settings`, whose cell is the one that wakes the
//! probe on a reload. A reload swaps this context in its [`SharedContext`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use russh::client;

use crate::config::SshConfig;
use crate::ssh::identity::Identity;
use crate::ssh::known_hosts::KnownHostsStore;

/// Everything the actors share that does not depend on the node.
#[derive(Debug)]
pub struct SshContext {
    /// SSH settings.
    pub ssh: SshConfig,
    /// The service CIDRs: no SSH connect goes to an address inside them.
    pub service_cidrs: Vec<IpNet>,
    /// The loaded client identity. Its `Debug` shows the fingerprint only.
    pub identity: Arc<Identity>,
    /// Host keys.
    pub known_hosts: Arc<KnownHostsStore>,
    /// Caps handshakes in flight over all nodes; kept across reloads.
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

impl SshContext {
    /// Builds the shared context and russh settings from validated config.
    pub fn new(
        ssh: SshConfig,
        identity: Arc<Identity>,
        known_hosts: Arc<KnownHostsStore>,
        handshakes: Arc<tokio::sync::Semaphore>,
    ) -> SshContext {
        SshContext {
            ssh,
            service_cidrs: Vec::new(),
            identity,
            known_hosts,
            handshakes,
        }
    }
}

impl SshContext {
    /// russh's settings for one session with SSH window `window` (russh
    /// fixes it per session, so each connect builds its own; see
    /// `config::WindowBounds`). `certificates` also advertises
    /// certificate host key algorithms, for nodes an `@cert-authority`
    /// line covers.
    pub fn client_config(&self, certificates: bool, window: u32) -> Arc<client::Config> {
        let ssh = &self.ssh;
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
            key: std::borrow::Cow::Owned(host_key_algorithms()),
            ..russh::Preferred::default()
        };
        let preferred = if certificates {
            russh::Preferred {
                host_key_certificates: preferred.key.clone(),
                ..preferred
            }
        } else {
            preferred
        };
        Arc::new(client::Config {
            keepalive_interval: Some(ssh.keepalive_interval),
            keepalive_max: ssh.keepalive_max,
            nodelay: true,
            window_size: window,
            maximum_packet_size: ssh.maximum_packet_size,
            channel_buffer_size: channel_queue_packets(ssh.maximum_packet_size),
            preferred,
            ..client::Config::default()
        })
    }

    /// The same context, refusing SSH connects into `service_cidrs`.
    pub fn with_service_cidrs(mut self, service_cidrs: Vec<IpNet>) -> SshContext {
        self.service_cidrs = service_cidrs;
        self
    }
}

/// russh's host key algorithms without `ssh-rsa`, whose signatures hash
/// with SHA-1 (OpenSSH dropped it in 8.8). RSA host keys still work
/// through rsa-sha2-512 and rsa-sha2-256; russh 0.65.4 also checks that a
/// signature's hash is one of those the client allowed, so a node cannot
/// slip a SHA-1 signature under a negotiated rsa-sha2 name.
pub fn host_key_algorithms() -> Vec<russh::keys::Algorithm> {
    russh::Preferred::default()
        .key
        .iter()
        .filter(|a| !matches!(a, russh::keys::Algorithm::Rsa { hash: None }))
        .cloned()
        .collect()
}

/// The context as currently configured. A reload stores a new one, and
/// each connect attempt loads the newest (so a rotated key or a changed
/// known_hosts path applies at the next connect without touching live
/// sessions). A plain `ArcSwap`: loads are lock-free and nothing else is
/// needed of it.
pub type SharedContext = Arc<ArcSwap<SshContext>>;

/// Bytes russh may queue per channel before its session loop waits for
/// the relay, on top of the relay's own per-stream limit.
pub const CHANNEL_QUEUE_BYTES: usize = 2 << 20;

/// russh's per-channel queue counts packets, not bytes: as many packets of
/// the largest size we accept as fit in [`CHANNEL_QUEUE_BYTES`] (32 of
/// 64 KiB, 8 of 256 KiB), at least 4 and at most 32. A fixed 32 would let
/// 256 KiB packets queue 8 MiB per held stream.
pub fn channel_queue_packets(maximum_packet_size: u32) -> usize {
    (CHANNEL_QUEUE_BYTES / (maximum_packet_size.max(1) as usize)).clamp(4, 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_rsa_is_never_offered_and_rsa_sha2_stays() {
        use russh::keys::ssh_key::HashAlg;
        use russh::keys::Algorithm;
        let algs = host_key_algorithms();
        assert!(!algs.contains(&Algorithm::Rsa { hash: None }), "{algs:?}");
        for hash in [HashAlg::Sha256, HashAlg::Sha512] {
            assert!(
                algs.contains(&Algorithm::Rsa { hash: Some(hash) }),
                "{algs:?}"
            );
        }
        assert!(algs.contains(&Algorithm::Ed25519));
    }

    #[test]
    fn the_per_channel_queue_holds_at_most_2_mib() {
        assert_eq!(channel_queue_packets(65_536), 32);
        assert_eq!(channel_queue_packets(262_144), 8);
        assert_eq!(channel_queue_packets(32_768), 32);
        assert_eq!(channel_queue_packets(1 << 20), 4);
        for size in [32_768u32, 65_536, 100_000, 262_144] {
            assert!(channel_queue_packets(size) * size as usize <= CHANNEL_QUEUE_BYTES);
        }
    }
}
