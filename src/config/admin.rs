//! `[admin]` and `[health]`: the admin API's socket and who may use it,
//! the metrics listener, readiness, and the active health probe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::parse::{parse_duration, resolve, validate_group};
use super::raw::{RawAdmin, RawHealth};
use super::{invalid, ConfigError};

/// Where the admin socket lives unless the config or `--socket` says otherwise.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tunneler/admin.sock";
/// `admin.ready_min_healthy` by default.
const DEFAULT_READY_MIN_HEALTHY: usize = 1;
/// `health.interval` by default.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// `health.timeout` by default.
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// `health.unhealthy_after` by default.
const DEFAULT_UNHEALTHY_AFTER: u32 = 3;

/// What the health probe checks, from the node's side of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ProbeTarget {
    /// `http://host:port/path`: a GET that must answer 2xx.
    Http {
        /// Host as dialed on the node (usually 127.0.0.1).
        host: String,
        /// Port.
        port: u16,
        /// Path and query.
        path: String,
    },
    /// `tcp://host:port`: the channel open must succeed.
    Tcp {
        /// Host as dialed on the node.
        host: String,
        /// Port.
        port: u16,
    },
}

/// The active health probe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthConfig {
    /// What to check.
    pub probe: ProbeTarget,
    /// Time between probes of one node.
    pub interval: Duration,
    /// Bound on one probe.
    pub timeout: Duration,
    /// Consecutive failures before the node is `unhealthy`.
    pub unhealthy_after: u32,
}

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminConfig {
    /// The admin Unix socket.
    pub socket: PathBuf,
    /// Group that may use the admin socket (mode 0660 then).
    pub socket_group: Option<String>,
    /// Extra uids allowed on the admin socket besides root and our own.
    pub admin_uids: Vec<u32>,
    /// Optional TCP address serving `GET /metrics` only.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `/readyz` answers 200 when at least this many nodes are healthy.
    pub ready_min_healthy: usize,
}

/// `[health]`, when present.
pub(super) fn validate_health(h: RawHealth) -> Result<HealthConfig, ConfigError> {
    let uri: hyper::Uri = h.probe.parse().map_err(|_| {
        invalid(
            "health.probe",
            format!(
                "{:?} is not a URL like http://127.0.0.1:10248/healthz or tcp://127.0.0.1:10250",
                h.probe
            ),
        )
    })?;
    let host = uri
        .host()
        .map(|s| s.trim_start_matches('[').trim_end_matches(']').to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("health.probe", "needs a host"))?;
    let probe = match uri.scheme_str() {
        Some("http") => ProbeTarget::Http {
            host,
            port: uri.port_u16().unwrap_or(80),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
        },
        Some("tcp") => ProbeTarget::Tcp {
            host,
            port: uri
                .port_u16()
                .ok_or_else(|| invalid("health.probe", "tcp:// needs a port"))?,
        },
        _ => {
            return Err(invalid(
                "health.probe",
                "scheme must be http:// or tcp:// (https is not supported: kubelet's healthz is plain HTTP on loopback)",
            ))
        }
    };
    let interval = parse_duration(
        "health.interval",
        h.interval.as_ref(),
        DEFAULT_HEALTH_INTERVAL,
    )?;
    let timeout = parse_duration("health.timeout", h.timeout.as_ref(), DEFAULT_HEALTH_TIMEOUT)?;
    if timeout > interval {
        return Err(invalid(
            "health.timeout",
            "must not be longer than health.interval",
        ));
    }
    let unhealthy_after = h.unhealthy_after.unwrap_or(DEFAULT_UNHEALTHY_AFTER);
    if unhealthy_after == 0 {
        return Err(invalid("health.unhealthy_after", "must be at least 1"));
    }
    Ok(HealthConfig {
        probe,
        interval,
        timeout,
        unhealthy_after,
    })
}

/// `[admin]`; relative paths resolve against `base`.
pub(super) fn validate_admin(a: RawAdmin, base: &Path) -> Result<AdminConfig, ConfigError> {
    Ok(AdminConfig {
        socket: a
            .socket
            .map(|s| resolve(base, &s))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
        socket_group: validate_group("admin.socket_group", a.socket_group)?,
        admin_uids: a.admin_uids.unwrap_or_default(),
        metrics_listen: match a.metrics_listen {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                invalid(
                    "admin.metrics_listen",
                    format!("{a:?} is not IP:PORT, e.g. 127.0.0.1:9464"),
                )
            })?),
        },
        ready_min_healthy: a.ready_min_healthy.unwrap_or(DEFAULT_READY_MIN_HEALTHY),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err_of, parse};

    #[test]
    fn health_probe() {
        let c = parse("[health]\nprobe = \"http://127.0.0.1:10248/healthz\"\n").unwrap();
        let h = c.health.unwrap();
        assert_eq!(
            h.probe,
            ProbeTarget::Http {
                host: "127.0.0.1".into(),
                port: 10248,
                path: "/healthz".into()
            }
        );
        assert_eq!(h.unhealthy_after, 3);
        let t = parse(
            "[health]\nprobe = \"tcp://127.0.0.1:10250\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
        )
        .unwrap();
        assert!(matches!(
            t.health.unwrap().probe,
            ProbeTarget::Tcp { port: 10250, .. }
        ));
        assert!(err_of("[health]\nprobe = \"https://x:1/\"\n").contains("health.probe"));
        assert!(err_of("[health]\nprobe = \"tcp://x\"\n").contains("health.probe"));
        assert!(
            err_of("[health]\nprobe = \"tcp://x:1\"\ninterval = \"1s\"\ntimeout = \"2s\"\n")
                .contains("health.timeout")
        );
    }
}
