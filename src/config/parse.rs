//! Value parsers the section validators share: durations and sizes with
//! units, CIDRs, paths relative to the config file, group names. Each
//! error names the key it was given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::{invalid, ConfigError};

pub(super) fn parse_duration(
    key: &str,
    value: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        invalid(
            key,
            format!("{v:?} is not a duration with a unit (like \"5s\" or \"250ms\"): {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

/// Parses a byte size with a binary unit: `"512MiB"`, `"900KiB"`, `"1GiB"`
/// or `"65536B"`. A unit is required, as for durations, so that a bare
/// number is never read in the wrong unit.
pub(super) fn parse_size(
    key: &str,
    value: Option<&String>,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    let t = v.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => {
            return Err(invalid(
                key,
                format!("{v:?} is not a size with a unit (B, KiB, MiB or GiB, like \"64MiB\")"),
            ))
        }
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| invalid(key, format!("{v:?} is not a size this machine can hold")))
}

pub(super) fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(super) fn parse_cidr(key: &str, s: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| invalid(key, format!("{s:?} is not a CIDR like 10.244.1.0/24")))?;
    if net.trunc() != net {
        return Err(invalid(
            key,
            format!("{s:?} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

pub(super) fn validate_group(key: &str, g: Option<String>) -> Result<Option<String>, ConfigError> {
    match g {
        Some(g) if g.trim().is_empty() => Err(invalid(key, "must not be empty")),
        Some(g) if g.contains(|c: char| c.is_whitespace() || c == ':' || c == '/') => {
            Err(invalid(key, format!("{g:?} is not a group name")))
        }
        other => Ok(other),
    }
}
