//! `[runtime]`: threads and runtimes.

use serde::Serialize;

use super::raw::RawRuntime;
use super::{invalid, ConfigError};

/// The most shards `runtime.shards` may ask for: more threads than that
/// only cost memory and wake-ups on any machine we run on.
pub const MAX_SHARDS: usize = 256;

/// Threads and runtimes (see `shard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuntimeConfig {
    /// Shard threads, each owning the nodes placed on it. Defaults to the
    /// available cores. Restart.
    pub shards: usize,
}

/// `[runtime]`.
pub(super) fn validate_runtime(raw: RawRuntime) -> Result<RuntimeConfig, ConfigError> {
    let shards = match raw.shards {
        Some(n) if (1..=MAX_SHARDS).contains(&n) => n,
        Some(n) => {
            return Err(invalid(
                "runtime.shards",
                format!("{n}: must be between 1 and {MAX_SHARDS} (default: the available cores)"),
            ))
        }
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_SHARDS),
    };
    Ok(RuntimeConfig { shards })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn runtime_shards_default_to_the_cores_and_are_bounded() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(parse("").unwrap().runtime.shards, cores.min(MAX_SHARDS));
        assert_eq!(parse("[runtime]\nshards = 3\n").unwrap().runtime.shards, 3);
        assert_eq!(
            parse(&format!("[runtime]\nshards = {MAX_SHARDS}\n"))
                .unwrap()
                .runtime
                .shards,
            MAX_SHARDS
        );
        for bad in ["0", "257"] {
            let e = parse(&format!("[runtime]\nshards = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("runtime.shards") && e.contains("between 1 and 256"),
                "{e}"
            );
        }
        let e = parse("[runtime]\nshards = -1\n").unwrap_err().to_string();
        assert!(e.contains("shards"), "{e}");
        let e = parse("[runtime]\nthreads = 2\n").unwrap_err().to_string();
        assert!(e.contains("threads"), "{e}");
    }
}
