//! `[ssh]` and `[reconnect]`: the SSH client settings every node shares,
//! the session window sizing, and the reconnect backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::parse::{parse_duration, parse_size, resolve};
use super::raw::{RawReconnect, RawSsh};
use super::{invalid, ConfigError};

/// `[ssh] maximum_packet_size` by default: the most russh accepts. sshd
/// then sends channel data in 256 KiB packets instead of 32 KiB ones.
pub const DEFAULT_MAXIMUM_PACKET_SIZE: u32 = 256 * 1024;
/// The smallest packet size every SSH implementation must accept (RFC 4253).
pub const MIN_MAXIMUM_PACKET_SIZE: u32 = 32 * 1024;
/// russh refuses to read packets bigger than this.
pub const MAX_MAXIMUM_PACKET_SIZE: u32 = 256 * 1024;

/// SSH client settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SshConfig {
    /// Remote user.
    pub user: String,
    /// Private key, absolute.
    pub identity_file: PathBuf,
    /// known_hosts file, absolute.
    pub known_hosts_file: PathBuf,
    /// Default SSH port for nodes that do not set one.
    pub port: u16,
    /// Bound on the TCP connect, and separately on handshake + auth.
    pub connect_timeout: Duration,
    /// Interval between keepalives.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the session is declared dead.
    pub keepalive_max: usize,
    /// Largest SSH packet we let the node send on a channel. Bigger packets
    /// mean fewer packets, reads and decrypt calls per byte relayed.
    pub maximum_packet_size: u32,
    /// The SSH window of each session, from the link's round trip.
    pub window: WindowBounds,
    /// SSH connections per node; streams are spread across them.
    pub connections_per_node: usize,
    /// Sessions per node at most, counting extra sessions opened on demand
    /// while every session is congested by a slow reader.
    pub max_connections_per_node: usize,
    /// An extra session that carried no stream for this long is closed.
    pub extra_session_idle: Duration,
    /// Handshakes in flight at once, over all nodes: a thousand nodes
    /// starting together must not swamp us or a shared sshd's MaxStartups.
    pub max_concurrent_handshakes: usize,
    /// What to do with a host that known_hosts does not know.
    pub host_key_policy: HostKeyPolicy,
    /// File holding the passphrase of an encrypted identity file.
    pub passphrase_file: Option<PathBuf>,
    /// ssh-agent socket that holds the identity; `identity_file` then names
    /// its public key (or a private key with a `.pub` beside it).
    pub identity_agent: Option<PathBuf>,
    /// OpenSSH user certificate for the identity.
    pub certificate_file: Option<PathBuf>,
}

/// How a session's SSH window is sized: one bandwidth-delay product of
/// the node's link at `rate`, kept within `min..=max`.
///
/// russh re-opens a channel's window as data *arrives*, so when one of a
/// session's streams is held for a slow reader, up to one window of its
/// data sits in the TCP stream ahead of every other stream's packets, and
/// each of those waits for the slow reader to drain it. A window of one
/// bandwidth-delay product keeps a stream at full speed and makes that
/// wait as short as the link allows. russh fixes the window per session at
/// connect, so it is chosen then, from the round trip of the TCP
/// handshake (and the lowest keepalive round trip the node has shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowBounds {
    /// The smallest window (also the window of a link too short to
    /// measure). Below about this, one stream no longer fills a LAN link.
    pub min: u32,
    /// The largest window: what a long link gets.
    pub max: u32,
    /// The per-stream rate, bytes per second, the window must sustain.
    pub rate: u64,
}

/// `ssh.window_min` by default: measured (1 GiB single-stream runs
/// against `ssh -L`, windows interleaved) as the smallest window at which
/// one stream moves within the run's noise of the 8 MiB window's speed on
/// a LAN link; 128 KiB cost a quarter of it, and CPU per byte.
pub const DEFAULT_WINDOW_MIN: u32 = 1 << 20;
/// `ssh.window_max` by default: the fixed window every session had before
/// windows were sized, enough for 500 MB/s over 16 ms.
pub const DEFAULT_WINDOW_MAX: u32 = 8 << 20;
/// `ssh.window_rate` by default: about OpenSSH sshd's ceiling for one
/// stream on this class of machine.
pub const DEFAULT_WINDOW_RATE: u64 = 512 << 20;
/// Bounds on what `ssh.window_min` and `ssh.window_max` may be: one
/// packet of the smallest size, and half of the 32-bit window field.
const WINDOW_FLOOR: u32 = 32 << 10;
const WINDOW_CEILING: u32 = 1 << 30;

impl WindowBounds {
    /// The window for a link with round trip `rtt` (`None`: not measured,
    /// which takes the smallest).
    pub fn for_rtt(&self, rtt: Option<Duration>) -> u32 {
        let Some(rtt) = rtt else { return self.min };
        let bdp = (self.rate as f64 * rtt.as_secs_f64()).min(self.max as f64);
        (bdp as u32).clamp(self.min, self.max)
    }
}

impl Default for WindowBounds {
    fn default() -> WindowBounds {
        WindowBounds {
            min: DEFAULT_WINDOW_MIN,
            max: DEFAULT_WINDOW_MAX,
            rate: DEFAULT_WINDOW_RATE,
        }
    }
}

fn validate_window(
    min: Option<String>,
    max: Option<String>,
    rate: Option<String>,
) -> Result<WindowBounds, ConfigError> {
    let d = WindowBounds::default();
    let bound = |key: &str, v: Option<String>, default: u32| -> Result<u32, ConfigError> {
        let n = parse_size(key, v.as_ref(), default as usize)?;
        if !(WINDOW_FLOOR as usize..=WINDOW_CEILING as usize).contains(&n) {
            return Err(invalid(key, "must be between 32KiB and 1GiB"));
        }
        Ok(n as u32)
    };
    let w = WindowBounds {
        min: bound("ssh.window_min", min, d.min)?,
        max: bound("ssh.window_max", max, d.max)?,
        rate: parse_size("ssh.window_rate", rate.as_ref(), d.rate as usize)? as u64,
    };
    if w.min > w.max {
        return Err(invalid(
            "ssh.window_min",
            "must not be greater than ssh.window_max",
        ));
    }
    if w.rate == 0 {
        return Err(invalid("ssh.window_rate", "must be greater than zero"));
    }
    Ok(w)
}

/// `[ssh] host_key_policy`. There is deliberately no value that turns host
/// key verification off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum HostKeyPolicy {
    /// Only hosts known_hosts trusts are accepted (the default).
    #[default]
    Strict,
    /// A host with no known_hosts entry at all has its key recorded and is
    /// accepted; a host whose key changed is still refused.
    AcceptNew,
}

/// Reconnect backoff settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconnectConfig {
    /// First retry delay (upper bound of the jittered delay).
    pub initial_backoff: Duration,
    /// Cap on the retry delay; also the retry interval for rejected nodes.
    pub max_backoff: Duration,
    /// A session that lived this long resets the backoff.
    pub stable_after: Duration,
}

/// `ssh.port` by default.
const DEFAULT_PORT: u16 = 22;
/// `ssh.connect_timeout` by default.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// `ssh.keepalive_interval` by default.
const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// `ssh.keepalive_max` by default.
const DEFAULT_KEEPALIVE_MAX: usize = 3;
/// `ssh.connections_per_node` by default.
const DEFAULT_CONNECTIONS_PER_NODE: usize = 1;
/// `ssh.max_connections_per_node` by default (or `connections_per_node`,
/// if that is more). Extra sessions are opened only while every session is
/// congested by a slow reader; 8 keeps a few spare without swamping sshd.
const DEFAULT_MAX_CONNECTIONS_PER_NODE: usize = 8;
/// `ssh.extra_session_idle` by default.
const DEFAULT_EXTRA_SESSION_IDLE: Duration = Duration::from_secs(60);
/// `ssh.max_concurrent_handshakes` by default.
const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// `reconnect.initial_backoff` by default.
const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// `reconnect.max_backoff` by default.
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// `reconnect.stable_after` by default.
const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(30);

/// `[ssh]`; relative paths resolve against `base`.
pub(super) fn validate_ssh(s: RawSsh, base: &Path) -> Result<SshConfig, ConfigError> {
    if s.user.trim().is_empty() {
        return Err(invalid("ssh.user", "must not be empty"));
    }
    if s.port == Some(0) {
        return Err(invalid("ssh.port", "must not be 0"));
    }
    let keepalive_max = s.keepalive_max.unwrap_or(DEFAULT_KEEPALIVE_MAX);
    if keepalive_max == 0 {
        return Err(invalid("ssh.keepalive_max", "must be at least 1"));
    }
    let host_key_policy = validate_host_key_policy(s.host_key_policy.as_deref())?;
    if s.identity_agent.is_some() && s.passphrase_file.is_some() {
        return Err(invalid(
            "ssh.passphrase_file",
            "cannot be used with ssh.identity_agent: the agent holds the decrypted key",
        ));
    }
    let (connections_per_node, max_connections_per_node) =
        validate_connections(s.connections_per_node, s.max_connections_per_node)?;
    Ok(SshConfig {
        user: s.user,
        identity_file: resolve(base, &s.identity_file),
        known_hosts_file: resolve(base, &s.known_hosts_file),
        port: s.port.unwrap_or(DEFAULT_PORT),
        connect_timeout: parse_duration(
            "ssh.connect_timeout",
            s.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        keepalive_interval: parse_duration(
            "ssh.keepalive_interval",
            s.keepalive_interval.as_ref(),
            DEFAULT_KEEPALIVE_INTERVAL,
        )?,
        keepalive_max,
        maximum_packet_size: validate_packet_size(s.maximum_packet_size)?,
        window: validate_window(s.window_min, s.window_max, s.window_rate)?,
        connections_per_node,
        max_connections_per_node,
        extra_session_idle: parse_duration(
            "ssh.extra_session_idle",
            s.extra_session_idle.as_ref(),
            DEFAULT_EXTRA_SESSION_IDLE,
        )?,
        max_concurrent_handshakes: match s.max_concurrent_handshakes {
            None => DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            Some(0) => {
                return Err(invalid(
                    "ssh.max_concurrent_handshakes",
                    "must be at least 1",
                ))
            }
            Some(n) => n,
        },
        host_key_policy,
        passphrase_file: s.passphrase_file.map(|p| resolve(base, &p)),
        identity_agent: s.identity_agent.map(|p| resolve(base, &p)),
        certificate_file: s.certificate_file.map(|p| resolve(base, &p)),
    })
}

fn validate_host_key_policy(policy: Option<&str>) -> Result<HostKeyPolicy, ConfigError> {
    match policy {
        None | Some("strict") => Ok(HostKeyPolicy::Strict),
        Some("accept-new") => Ok(HostKeyPolicy::AcceptNew),
        Some(other) => Err(invalid(
            "ssh.host_key_policy",
            format!("{other:?}: expected \"strict\" or \"accept-new\" (host key verification cannot be turned off)"),
        )),
    }
}

/// `ssh.connections_per_node` and `ssh.max_connections_per_node`.
fn validate_connections(
    per_node: Option<usize>,
    max_per_node: Option<usize>,
) -> Result<(usize, usize), ConfigError> {
    let connections_per_node = match per_node {
        None => DEFAULT_CONNECTIONS_PER_NODE,
        Some(n @ 1..=16) => n,
        Some(_) => {
            return Err(invalid(
                "ssh.connections_per_node",
                "must be between 1 and 16",
            ))
        }
    };
    let max_connections_per_node = match max_per_node {
        None => connections_per_node.max(DEFAULT_MAX_CONNECTIONS_PER_NODE),
        Some(n) if (connections_per_node..=64).contains(&n) => n,
        Some(_) => {
            return Err(invalid(
                "ssh.max_connections_per_node",
                "must be between ssh.connections_per_node and 64",
            ))
        }
    };
    Ok((connections_per_node, max_connections_per_node))
}

fn validate_packet_size(size: Option<u32>) -> Result<u32, ConfigError> {
    match size {
        None => Ok(DEFAULT_MAXIMUM_PACKET_SIZE),
        Some(n) if (MIN_MAXIMUM_PACKET_SIZE..=MAX_MAXIMUM_PACKET_SIZE).contains(&n) => Ok(n),
        Some(_) => Err(invalid(
            "ssh.maximum_packet_size",
            format!(
                "must be between {MIN_MAXIMUM_PACKET_SIZE} and {MAX_MAXIMUM_PACKET_SIZE} bytes"
            ),
        )),
    }
}

/// `[reconnect]`.
pub(super) fn validate_reconnect(r: RawReconnect) -> Result<ReconnectConfig, ConfigError> {
    let reconnect = ReconnectConfig {
        initial_backoff: parse_duration(
            "reconnect.initial_backoff",
            r.initial_backoff.as_ref(),
            DEFAULT_INITIAL_BACKOFF,
        )?,
        max_backoff: parse_duration(
            "reconnect.max_backoff",
            r.max_backoff.as_ref(),
            DEFAULT_MAX_BACKOFF,
        )?,
        stable_after: parse_duration(
            "reconnect.stable_after",
            r.stable_after.as_ref(),
            DEFAULT_STABLE_AFTER,
        )?,
    };
    if reconnect.initial_backoff > reconnect.max_backoff {
        return Err(invalid(
            "reconnect.initial_backoff",
            "must not be greater than reconnect.max_backoff",
        ));
    }
    Ok(reconnect)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::config::tests::parse;
    use crate::config::Config;

    #[test]
    fn the_ssh_window_is_bounded_and_sized_to_the_link() {
        let w = parse("").unwrap().ssh.window;
        assert_eq!(w, WindowBounds::default());
        assert_eq!(
            w.for_rtt(None),
            DEFAULT_WINDOW_MIN,
            "unmeasured: the smallest"
        );
        // A LAN round trip asks for less than the floor.
        assert_eq!(
            w.for_rtt(Some(Duration::from_micros(100))),
            DEFAULT_WINDOW_MIN
        );
        // 4 ms at 512 MiB/s is 2.1 MB.
        assert_eq!(w.for_rtt(Some(Duration::from_millis(4))), 2_147_483);
        // A long link gets the ceiling, never more.
        assert_eq!(
            w.for_rtt(Some(Duration::from_secs(3600))),
            DEFAULT_WINDOW_MAX
        );
        let c = parse("window_min = \"64KiB\"\nwindow_max = \"64MiB\"\nwindow_rate = \"1GiB\"\n")
            .unwrap();
        assert_eq!(
            c.ssh.window,
            WindowBounds {
                min: 64 << 10,
                max: 64 << 20,
                rate: 1 << 30
            }
        );
        for (extra, key, why) in [
            (
                "window_min = \"16KiB\"",
                "ssh.window_min",
                "between 32KiB and 1GiB",
            ),
            (
                "window_max = \"2GiB\"",
                "ssh.window_max",
                "between 32KiB and 1GiB",
            ),
            (
                "window_min = \"1MiB\"\nwindow_max = \"512KiB\"",
                "ssh.window_min",
                "not be greater",
            ),
            (
                "window_rate = \"0B\"",
                "ssh.window_rate",
                "greater than zero",
            ),
            ("window_rate = \"fast\"", "ssh.window_rate", "with a unit"),
        ] {
            match parse(&format!("{extra}\n")) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(reason.contains(why), "{extra}: {reason}");
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn maximum_packet_size_defaults_to_256k_and_is_range_checked() {
        assert_eq!(parse("").unwrap().ssh.maximum_packet_size, 262_144);
        let c = parse("maximum_packet_size = 65535\n").unwrap();
        assert_eq!(c.ssh.maximum_packet_size, 65535);
        for bad in ["32767", "262145", "0"] {
            match parse(&format!("maximum_packet_size = {bad}\n")) {
                Err(ConfigError::Invalid { key, reason }) => {
                    assert_eq!(key, "ssh.maximum_packet_size");
                    assert_eq!(reason, "must be between 32768 and 262144 bytes");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_user_is_named() {
        let e = Config::from_toml(
            "[ssh]\nidentity_file = \"a\"\nknown_hosts_file = \"b\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("user"), "{e}");
    }

    #[test]
    fn ssh_identity_and_trust_keys() {
        let c = parse("").unwrap();
        assert_eq!(c.ssh.host_key_policy, HostKeyPolicy::Strict);
        assert_eq!(c.ssh.passphrase_file, None);
        let c = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nhost_key_policy = \"accept-new\"\npassphrase_file = \"pass\"\ncertificate_file = \"k-cert.pub\"\n",
            Path::new("/etc/t"),
        )
        .unwrap();
        assert_eq!(c.ssh.host_key_policy, HostKeyPolicy::AcceptNew);
        assert_eq!(c.ssh.passphrase_file, Some(PathBuf::from("/etc/t/pass")));
        assert_eq!(
            c.ssh.certificate_file,
            Some(PathBuf::from("/etc/t/k-cert.pub"))
        );
        let e = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nhost_key_policy = \"no\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ssh.host_key_policy"), "{e}");
        let e = Config::from_toml(
            "[ssh]\nuser = \"u\"\nidentity_file = \"k\"\nknown_hosts_file = \"kh\"\nidentity_agent = \"/a.sock\"\npassphrase_file = \"p\"\n",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ssh.passphrase_file"), "{e}");
    }
}
