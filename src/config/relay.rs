//! The relay's buffer limits (`proxy.relay_*`): how much it may hold for
//! clients slower than their node, and when a stopped reader is cut.

use std::time::Duration;

use serde::Serialize;

use super::parse::{parse_duration, parse_size};
use super::ssh::MAX_MAXIMUM_PACKET_SIZE;
use super::{invalid, ConfigError};

/// Bounds on the bytes the relay holds for clients that read slower than
/// their node sends. Past them the relay stops draining the channel, which
/// slows the node down (see `relay`); nothing is reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RelayLimits {
    /// Bytes all streams together may hold, at every moment. Near it the
    /// sessions with the largest backlog are held first.
    pub buffer_budget: usize,
    /// Bytes one stream may hold before its drain waits for its client.
    pub stream_buffer_limit: usize,
    /// Bytes each SSH session may hold outside the budget, whatever the
    /// budget holds: the allowance that keeps a session flowing while
    /// stalled streams elsewhere fill the budget.
    pub session_floor: usize,
    /// A stream whose client has taken nothing for this long while its
    /// drain holds a session other streams ride on is reset: it would
    /// freeze them for as long as its client stays connected.
    pub stopped_reader_timeout: Duration,
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits {
            buffer_budget: 512 << 20,
            stream_buffer_limit: 8 << 20,
            session_floor: 1 << 20,
            stopped_reader_timeout: Duration::from_secs(60),
        }
    }
}

/// `proxy.relay_*`.
pub(super) fn validate_relay(
    budget: Option<String>,
    stream_limit: Option<String>,
    session_floor: Option<String>,
    stopped_reader_timeout: Option<String>,
) -> Result<RelayLimits, ConfigError> {
    let d = RelayLimits::default();
    let r = RelayLimits {
        buffer_budget: parse_size(
            "proxy.relay_buffer_budget",
            budget.as_ref(),
            d.buffer_budget,
        )?,
        stream_buffer_limit: parse_size(
            "proxy.relay_stream_buffer_limit",
            stream_limit.as_ref(),
            d.stream_buffer_limit,
        )?,
        session_floor: parse_size(
            "proxy.relay_session_floor",
            session_floor.as_ref(),
            d.session_floor,
        )?,
        stopped_reader_timeout: parse_duration(
            "proxy.relay_stopped_reader_timeout",
            stopped_reader_timeout.as_ref(),
            d.stopped_reader_timeout,
        )?,
    };

    // One SSH packet (at most 64 KiB here) must always fit, or a stream
    // could never make progress; 1 MiB leaves room for several streams.
    if r.buffer_budget < 1 << 20 {
        return Err(invalid(
            "proxy.relay_buffer_budget",
            "must be at least 1MiB",
        ));
    }
    if r.stream_buffer_limit < 256 << 10 {
        return Err(invalid(
            "proxy.relay_stream_buffer_limit",
            "must be at least 256KiB",
        ));
    }
    if r.stream_buffer_limit > r.buffer_budget {
        return Err(invalid(
            "proxy.relay_stream_buffer_limit",
            "must not be greater than proxy.relay_buffer_budget",
        ));
    } // One packet of the largest size must fit in the floor, or a session
      // could need the budget for a single packet.
    if r.session_floor < MAX_MAXIMUM_PACKET_SIZE as usize {
        return Err(invalid(
            "proxy.relay_session_floor",
            "must be at least 256KiB (one SSH packet of the largest size)",
        ));
    }
    if r.session_floor > r.buffer_budget {
        return Err(invalid(
            "proxy.relay_session_floor",
            "must not be greater than proxy.relay_buffer_budget",
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn relay_limits_take_sizes_with_units() {
        let c = parse(
            "[proxy]\nrelay_buffer_budget = \"8MiB\"\nrelay_stream_buffer_limit = \"4MiB\"\nrelay_session_floor = \"512KiB\"\nrelay_stopped_reader_timeout = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(
            c.proxy.relay,
            RelayLimits {
                buffer_budget: 8 << 20,
                stream_buffer_limit: 4 << 20,
                session_floor: 512 << 10,
                stopped_reader_timeout: Duration::from_secs(120),
            }
        );
        assert_eq!(parse("").unwrap().proxy.relay, RelayLimits::default());
        for (extra, key, why) in [
            (
                "relay_buffer_budget = \"512\"",
                "proxy.relay_buffer_budget",
                "with a unit",
            ),
            (
                "relay_buffer_budget = \"1MB\"",
                "proxy.relay_buffer_budget",
                "with a unit",
            ),
            (
                "relay_buffer_budget = \"512KiB\"",
                "proxy.relay_buffer_budget",
                "at least 1MiB",
            ),
            (
                "relay_buffer_budget = \"99999999999999GiB\"",
                "proxy.relay_buffer_budget",
                "can hold",
            ),
            (
                "relay_buffer_budget = \"2MiB\"\nrelay_stream_buffer_limit = \"4MiB\"",
                "proxy.relay_stream_buffer_limit",
                "not be greater",
            ),
            (
                "relay_stream_buffer_limit = \"128KiB\"",
                "proxy.relay_stream_buffer_limit",
                "at least 256KiB",
            ),
            (
                "relay_session_floor = \"128KiB\"",
                "proxy.relay_session_floor",
                "at least 256KiB",
            ),
            (
                "relay_buffer_budget = \"2MiB\"\nrelay_stream_buffer_limit = \"1MiB\"\nrelay_session_floor = \"4MiB\"",
                "proxy.relay_session_floor",
                "not be greater",
            ),
            (
                "relay_session_floor = \"1\"",
                "proxy.relay_session_floor",
                "with a unit",
            ),
            (
                "relay_stopped_reader_timeout = \"0s\"",
                "proxy.relay_stopped_reader_timeout",
                "greater than zero",
            ),
            (
                "relay_stopped_reader_timeout = \"60\"",
                "proxy.relay_stopped_reader_timeout",
                "with a unit",
            ),
        ] {
            match parse(&format!("[proxy]\n{extra}\n")) {
                Err(ConfigError::Invalid { key: k, reason }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(reason.contains(why), "{extra}: {reason}");
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
    }
}
