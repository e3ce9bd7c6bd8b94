//! The plan

use crate::*;

/// How long and how hard the run is.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) load: Duration,
    pub(crate) nodes: usize,
    pub(crate) streams: usize,
    pub(crate) dials_per_sec: f64,
    pub(crate) stream_life: Duration,
    pub(crate) fault_every: Duration,
    pub(crate) reload_every: Duration,
    pub(crate) stall_first: Duration,
    pub(crate) stall_every: Duration,
    pub(crate) stall_for: Duration,
    pub(crate) sample_every: Duration,
    pub(crate) warmup: Duration,
    pub(crate) out: PathBuf,
}

impl Plan {
    pub(crate) fn from_env() -> Plan {
        let args: Vec<String> = std::env::args().collect();
        let arg = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let num = |env: &str, flag: &str, default: f64| -> f64 {
            let v = arg(flag).or_else(|| std::env::var(env).ok());
            match v {
                None => default,
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 => x,
                    _ => {
                        eprintln!("soak: {env}/{flag}={v:?}: want a positive number");
                        std::process::exit(2);
                    }
                },
            }
        };
        let minutes = num("TUNNELER_SOAK_MINUTES", "--minutes", 10.0);
        let load = Duration::from_secs_f64(minutes * 60.0);
        let clamp = |d: Duration, lo: u64, hi: u64| {
            d.clamp(Duration::from_secs(lo), Duration::from_secs(hi))
        };
        let fault_every = clamp(load / 12, 8, 60);
        let out = std::env::var_os("TUNNELER_SOAK_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soak"));
        Plan {
            load,
            nodes: 20,
            streams: num("TUNNELER_SOAK_STREAMS", "--streams", 1000.0) as usize,
            dials_per_sec: num("TUNNELER_SOAK_DIALS", "--dials", 50.0),
            stream_life: clamp(load / 4, 20, 300),
            fault_every,
            reload_every: clamp(load / 4, 20, 60),
            stall_first: clamp(load / 20, 5, 60),
            stall_every: clamp(load / 3, 30, 120),
            stall_for: clamp(load / 12, 10, 20),
            sample_every: clamp(load / 200, 1, 10),
            // The first 5 minutes; in a shorter run the first sixth, but at
            // least one full round of the six faults (each adds sessions
            // and buffers the first time it runs).
            warmup: clamp(
                (load / 6).max(fault_every * FAULT_ORDER.len() as u32),
                1,
                300,
            ),
            out,
        }
    }

    /// Nodes listed in the config (the file lists the rest).
    pub(crate) fn config_nodes(&self) -> usize {
        self.nodes - FILE_NODES
    }
}
