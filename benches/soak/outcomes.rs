//! Outcomes

use crate::*;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum StreamKind {
    /// A long-lived echo stream.
    Long,
    /// A short dial's stream, after its 200.
    Short,
    /// A stalled reader.
    Stalled,
}

/// One stream that died before it was closed.
pub(crate) struct Death {
    pub(crate) at: Duration,
    pub(crate) node: usize,
    pub(crate) kind: StreamKind,
    /// The fault that explains it; `None`: unexpected.
    pub(crate) expected: Option<FaultKind>,
    /// A fault it overlapped that does not explain a death (for reports).
    pub(crate) overlapped: Option<FaultKind>,
    pub(crate) error: String,
}

/// A dial to a node outside any window that explains it.
pub(crate) struct DialFailure {
    pub(crate) at: Duration,
    pub(crate) node: usize,
    pub(crate) error: String,
    /// A fault it overlapped that does not explain it (for reports).
    pub(crate) overlapped: Option<FaultKind>,
}

#[derive(Default)]
pub(crate) struct Stats {
    /// Bytes written by clients (echo streams and short dials).
    pub(crate) sent: AtomicU64,
    /// Bytes that came back and matched the pattern (echoes, and every
    /// byte of the stalled readers' sources).
    pub(crate) verified: AtomicU64,
    /// Bytes sent on streams that died of a fault before their echo came
    /// back (lost with the session, expected).
    pub(crate) lost_in_expected_deaths: AtomicU64,
    /// Bytes sent on streams that died with no fault to explain it before
    /// their echo came back.
    pub(crate) lost_outside_faults: AtomicU64,
    pub(crate) mismatches: AtomicU64,
    pub(crate) dials_ok: AtomicU64,
    pub(crate) long_opened: AtomicU64,
    pub(crate) long_closed: AtomicU64,
    pub(crate) long_open: AtomicI64,
    pub(crate) short_ok: AtomicU64,
    pub(crate) short_skipped: AtomicU64,
    pub(crate) stalls: AtomicU64,
    pub(crate) stall_bytes: AtomicU64,
    pub(crate) reloads_ok: AtomicU64,
    /// Expected dial failures by fault and reply.
    pub(crate) dial_expected: Mutex<BTreeMap<(FaultKind, String), u64>>,
    /// Unexpected dial failures.
    pub(crate) dial_unexpected: Mutex<Vec<DialFailure>>,
    pub(crate) deaths: Mutex<Vec<Death>>,
    /// Failures of the harness's own actions (fault steps, reloads) and any
    /// other correctness error.
    pub(crate) errors: Mutex<Vec<String>>,
    /// Completed fault events: (start, end, node, kind).
    pub(crate) events: Mutex<Vec<(Duration, Duration, usize, FaultKind)>>,
}

impl Stats {
    pub(crate) fn error(&self, t0: Instant, what: String) {
        eprintln!("[{:7.1}s] ERROR: {what}", t0.elapsed().as_secs_f64());
        self.errors.lock().unwrap().push(what);
    }
}

/// Everything a load task needs.
pub(crate) struct Ctx {
    pub(crate) t0: Instant,
    pub(crate) egress: PathBuf,
    pub(crate) ips: Vec<Ipv4Addr>,
    pub(crate) faults: Faults,
    pub(crate) stats: Stats,
    pub(crate) plan: Plan,
}

impl Ctx {
    pub(crate) fn ip(&self, node: usize) -> Ipv4Addr {
        self.ips[node - 1]
    }

    /// Classifies and records a failed dial to `node` over `from..now`.
    pub(crate) fn dial_failed(&self, node: usize, from: Instant, error: String) {
        let now = Instant::now();
        match self
            .faults
            .explains(node, from, now, FaultKind::refuses_dials)
        {
            Some(kind) => {
                let reply = error.split(':').next().unwrap_or("").trim().to_string();
                *self
                    .stats
                    .dial_expected
                    .lock()
                    .unwrap()
                    .entry((kind, reply))
                    .or_default() += 1;
            }
            None => {
                let over = self.faults.any_over(node, from, now);
                eprintln!(
                    "[{:7.1}s] UNEXPECTED dial failure to node-{node}: {error}",
                    self.t0.elapsed().as_secs_f64()
                );
                self.stats
                    .dial_unexpected
                    .lock()
                    .unwrap()
                    .push(DialFailure {
                        at: self.t0.elapsed(),
                        node,
                        error,
                        overlapped: over,
                    });
            }
        }
    }

    /// Classifies and records the death of a stream on `node` whose last
    /// good exchange was at `last_ok`; returns whether a fault explains it.
    /// A mismatch is never explained by a fault.
    pub(crate) fn died(
        &self,
        node: usize,
        kind: StreamKind,
        last_ok: Instant,
        error: String,
    ) -> bool {
        let now = Instant::now();
        let expected = if error.starts_with("MISMATCH") {
            None
        } else {
            self.faults
                .explains(node, last_ok, now, FaultKind::kills_streams)
        };
        let overlapped = self.faults.any_over(node, last_ok, now);
        if expected.is_none() {
            eprintln!(
                "[{:7.1}s] UNEXPECTED death of a {kind:?} stream on node-{node}: {error}",
                self.t0.elapsed().as_secs_f64()
            );
        }
        self.stats.deaths.lock().unwrap().push(Death {
            at: self.t0.elapsed(),
            node,
            kind,
            expected,
            overlapped,
            error,
        });
        expected.is_some()
    }
}

/// A small xorshift for jitter and sizes (no need for quality here).
pub(crate) struct Jitter(pub(crate) u64);

impl Jitter {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// `d` scaled by a factor in [0.5, 1.5).
    pub(crate) fn around(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.5 + (self.next() % 1000) as f64 / 1000.0)
    }
}

pub(crate) fn next_seed() -> u64 {
    static SEEDS: pattern::Seeds = pattern::Seeds::new(0x736f_616b_7365_6564);
    SEEDS.next()
}
