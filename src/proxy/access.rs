//! The access log: one record per dial, on the tracing target
//! [`ACCESS_TARGET`], at info level.
//!
//! A stream's record is written when it ends, a refusal's at once. Operators
//! and their log pipelines parse these lines, so the field names are
//! stable and documented in docs/operations.md (tests/docs.rs checks that
//! every name in [`FIELDS`] is there). A record never carries payload
//! bytes, keys or certificates: only the names, addresses, counts and times
//! below. `proxy.access_log = false` turns the records off.
//!
//! The record is emitted outside any span (`parent: None`), so a JSON line
//! holds the record's own fields and no span (see `logging`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::proxy::Target;
use crate::tunnel::relay::StreamEnd;
use crate::tunnel::stream_stats::StreamStats;

/// The tracing target of access records.
pub const ACCESS_TARGET: &str = "tunneler::access";

/// Every field an access record may carry, in the order written. The
/// CONNECT target is `dst` (as in the stream's log span): a field named
/// `target` would read as the log line's own `target`. Fields
/// that do not apply (a refusal has no `end`, a Unix client no
/// `client_addr`) are left out of the line, never written empty.
pub const FIELDS: [&str; 19] = [
    "time",
    "stream",
    "listener",
    "client_uid",
    "client_cert",
    "client_addr",
    "dst",
    "route",
    "node",
    "session",
    "status",
    "reason",
    "bytes_to_client",
    "bytes_to_node",
    "connect_ms",
    "duration_ms",
    "end",
    "held_ms",
    "message",
];

/// Who connected, as each listener knows its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// The Unix socket: the peer's uid (SO_PEERCRED), when the kernel
    /// gave one.
    Unix {
        /// Effective uid of the connecting process.
        uid: Option<u32>,
    },
    /// Plain TCP: the peer's address.
    Tcp {
        /// Address and port.
        addr: SocketAddr,
    },
    /// mTLS: the peer's address and the first name its certificate
    /// presents (subject CN, else the first DNS SAN).
    Tls {
        /// Address and port.
        addr: SocketAddr,
        /// The certificate's name.
        name: Option<String>,
    },
}

impl Client {
    /// One short text for tables: `uid:0`, `cert:apiserver`, or the address.
    pub fn label(&self) -> String {
        match self {
            Client::Unix { uid: Some(u) } => format!("uid:{u}"),
            Client::Unix { uid: None } => "uid:?".into(),
            Client::Tcp { addr } => addr.to_string(),
            Client::Tls { name: Some(n), .. } => {
                format!("cert:{}", crate::text::escape_control(n))
            }
            Client::Tls { addr, name: None } => addr.to_string(),
        }
    }
}

/// The listener a connection came in on, and its client.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The listener's URL (`unix:///run/tunneler/egress.sock`, `tcp://…`,
    /// `tls://…`).
    pub listener: Arc<str>,
    /// The client.
    pub client: Client,
}

/// What a route sends a dial to: the `route` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// A node's own address (name, host name, internal IP).
    Node,
    /// An address in one node's pod CIDR.
    Pod,
    /// A service CIDR address, through the pool of healthy nodes.
    Service,
    /// A `proxy.pod_network_cidrs` address, through the pool.
    Pool,
}

impl RouteKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Node => "node",
            RouteKind::Pod => "pod",
            RouteKind::Service => "service",
            RouteKind::Pool => "pool",
        }
    }
}

/// One dial's record, filled in as the dial goes.
#[derive(Debug, Clone)]
pub struct DialRecord {
    /// The stream id (also the `stream` of the log span).
    pub id: u64,
    /// Where the connection came from.
    pub origin: Arc<Origin>,
    /// When the dial began (the request head was read), wall clock.
    pub at: SystemTime,
    /// The same moment on the monotonic clock, for durations.
    pub started: tokio::time::Instant,
    /// The CONNECT target, once parsed.
    pub target: Option<Target>,
    /// How it was routed, once routed.
    pub route: Option<RouteKind>,
    /// The node it went to (the last tried, for a pool dial).
    pub node: Option<String>,
}

/// How a relayed stream went, for its record.
pub struct Carried<'a> {
    /// The SSH session that carried it.
    pub session: u64,
    /// Time from the dial's start to the 200 having been written.
    pub connect: Duration,
    /// How it ended.
    pub end: StreamEnd,
    /// Its bytes and held time.
    pub stats: &'a StreamStats,
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// RFC 3339 in UTC with milliseconds.
fn time_ms(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

impl DialRecord {
    /// Writes the record of a refused dial: `code` and its reason phrase.
    pub fn refused(&self, code: u16, reason: &str) {
        self.write(code, Some(reason), None);
    }

    /// Writes the record of a stream that got its 200 and has ended.
    pub fn carried(&self, c: &Carried<'_>) {
        self.write(200, None, Some(c));
    }

    fn write(&self, status: u16, reason: Option<&str>, c: Option<&Carried<'_>>) {
        use std::sync::atomic::Ordering::Relaxed;
        let (uid, cert, addr) = match &self.origin.client {
            Client::Unix { uid } => (*uid, None, None),
            Client::Tcp { addr } => (None, None, Some(addr.to_string())),
            Client::Tls { addr, name } => (None, name.as_deref(), Some(addr.to_string())),
        };
        let target = self.target.as_ref().map(|t| t.to_string());
        tracing::info!(
            target: ACCESS_TARGET,
            parent: None,
            time = %time_ms(self.at),
            stream = self.id,
            listener = &*self.origin.listener,
            client_uid = uid,
            client_cert = cert,
            client_addr = addr.as_deref(),
            dst = target.as_deref(),
            route = self.route.map(RouteKind::as_str),
            node = self.node.as_deref(),
            session = c.map(|c| c.session),
            status,
            reason,
            bytes_to_client = c.map_or(0, |c| c.stats.to_client.load(Relaxed)),
            bytes_to_node = c.map_or(0, |c| c.stats.to_node.load(Relaxed)),
            connect_ms = c.map(|c| ms(c.connect)),
            duration_ms = ms(self.started.elapsed()),
            end = c.map(|c| c.end.as_str()),
            held_ms = c.map_or(0.0, |c| ms(c.stats.held_for())),
            "access"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_carry_milliseconds_and_durations_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        assert_eq!(time_ms(t), "2025-12-06T05:46:40.123Z");
        assert_eq!(ms(Duration::from_micros(1234)), 1.234);
        assert_eq!(ms(Duration::from_nanos(1_234_567)), 1.235);
    }

    #[test]
    fn clients_label_as_the_listener_knows_them() {
        let addr: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        assert_eq!(Client::Unix { uid: Some(0) }.label(), "uid:0");
        assert_eq!(Client::Tcp { addr }.label(), "10.0.0.1:4000");
        let name = Some("kube-apiserver".to_string());
        assert_eq!(Client::Tls { addr, name }.label(), "cert:kube-apiserver");
    }
}
