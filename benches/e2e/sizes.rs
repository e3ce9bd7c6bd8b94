//! Sizes: how much each section does, from the environment.
//! Sizes

/// Every section, in the order they run (`TUNNELER_BENCH_ONLY` names).
pub(crate) const SECTIONS: [&str; 9] = [
    "rtt_ms",
    "throughput",
    "rtt",
    "dial",
    "streams",
    "slow",
    "window",
    "aggregate",
    "nodes",
];

/// How much each measurement does; `smoke` makes everything tiny.
pub(crate) struct Sizes {
    /// Sections to run (`TUNNELER_BENCH_ONLY`); all when empty.
    pub(crate) only: Vec<String>,
    pub(crate) bulk_bytes: u64,
    pub(crate) bulk_runs: usize,
    pub(crate) rtt_count: usize,
    pub(crate) dial_seq: usize,
    pub(crate) dial_total: usize,
    pub(crate) dial_in_flight: usize,
    pub(crate) streams: Vec<usize>,
    pub(crate) open_concurrency: usize,
    pub(crate) real_nodes: usize,
    /// Simulated node counts, one daemon run each (`TUNNELER_BENCH_NODES`).
    pub(crate) sim_nodes: Vec<usize>,
    /// Simulated nodes served by one sshd (one namespace each).
    pub(crate) sim_per_sshd: usize,
    /// Seconds over which the daemon's idle CPU is read at each count.
    pub(crate) idle_cpu_secs: u64,
    /// Runs of the aggregate (4 nodes at once) throughput.
    pub(crate) agg_runs: usize,
    /// Rounds of "echo on all at once" per concurrent-stream count.
    pub(crate) echo_rounds: usize,
    /// Keepalive round trips read from `status` (`rtt_ms` section).
    pub(crate) status_rtt_samples: usize,
    /// Seconds of the single 2 MB/s slow reader (`slow`).
    pub(crate) slow_secs: u64,
    /// Seconds of each of the ten slow readers at once.
    pub(crate) slow_many_secs: u64,
    /// Seconds of the slow reader that neighbour streams run beside.
    pub(crate) slow_neigh_secs: u64,
    /// Bytes of the `kubectl cp`-like copy at 20 MB/s.
    pub(crate) cp_bytes: u64,
}

/// A comma-separated list of positive counts from the environment, if set
/// and not empty.
pub(crate) fn counts_from_env(var: &str) -> Option<Vec<usize>> {
    let v = std::env::var(var).ok()?;
    let counts: Vec<usize> = v
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    (!counts.is_empty()).then_some(counts)
}

impl Sizes {
    pub(crate) fn new(smoke: bool) -> Sizes {
        let mut sz = Sizes::preset(smoke);
        sz.only = std::env::var("TUNNELER_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(b) = std::env::var("TUNNELER_BENCH_BYTES")
            .ok()
            .and_then(|b| b.parse().ok())
        {
            sz.bulk_bytes = b;
        }
        if let Some(counts) = counts_from_env("TUNNELER_BENCH_NODES") {
            sz.sim_nodes = counts;
        }
        if let Some(counts) = counts_from_env("TUNNELER_BENCH_STREAMS") {
            sz.streams = counts;
        }
        sz
    }

    /// Rounds of "echo on all at once" for `n` streams: a round of 50
    /// streams takes about 2 ms, so five of them made a median that moved
    /// by half between runs; small counts get more rounds, up to 101, for
    /// about 5000 stream round trips in all.
    pub(crate) fn echo_rounds_for(&self, n: usize) -> usize {
        let more = (5000 / n.max(1)) | 1;
        self.echo_rounds.max(more.min(101))
    }

    /// Whether section `name` runs.
    pub(crate) fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    pub(crate) fn preset(smoke: bool) -> Sizes {
        if smoke {
            Sizes {
                only: Vec::new(),
                bulk_bytes: 8 << 20,
                bulk_runs: 1,
                rtt_count: 20,
                dial_seq: 20,
                dial_total: 50,
                dial_in_flight: 10,
                streams: vec![50],
                open_concurrency: 10,
                real_nodes: 3,
                sim_nodes: vec![5],
                // Two sshd namespaces even here, so that path runs in CI.
                sim_per_sshd: 3,
                idle_cpu_secs: 3,
                agg_runs: 1,
                echo_rounds: 2,
                status_rtt_samples: 1,
                slow_secs: 2,
                slow_many_secs: 2,
                // Enough bytes to pass the per-stream limit and be held.
                slow_neigh_secs: 8,
                cp_bytes: 16 << 20,
            }
        } else {
            Sizes {
                only: Vec::new(),
                bulk_bytes: 1 << 30,
                bulk_runs: 3,
                rtt_count: 10_000,
                dial_seq: 500,
                dial_total: 2000,
                dial_in_flight: 100,
                streams: vec![50, 1000, 10_000],
                open_concurrency: 100,
                real_nodes: 40,
                sim_nodes: vec![1000, 5000],
                sim_per_sshd: 1000,
                idle_cpu_secs: 30,
                agg_runs: 3,
                echo_rounds: 5,
                status_rtt_samples: 6,
                slow_secs: 60,
                slow_many_secs: 20,
                slow_neigh_secs: 30,
                cp_bytes: 512 << 20,
            }
        }
    }
}
