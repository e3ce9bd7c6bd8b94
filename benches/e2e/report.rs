//! The targets table

use crate::*;

/// The performance targets, in the order the closing table lists them:
/// (key, section that measures it, figure, target). Sections fill in their
/// rows with [`record`]; a row no section filled says why.
pub(crate) const TARGETS: &[(&str, &str, &str, &str)] = &[
    (
        "throughput tcp",
        "throughput",
        "single-stream throughput, TCP listener",
        "≥ 1.2× ssh -L",
    ),
    (
        "throughput unix",
        "throughput",
        "single-stream throughput, Unix listener",
        "≥ 1.2× ssh -L",
    ),
    (
        "aggregate tcp",
        "aggregate",
        "aggregate throughput, 4 nodes × 1 stream, TCP",
        "≥ 1.0× 4 ssh -L",
    ),
    (
        "aggregate unix",
        "aggregate",
        "aggregate throughput, 4 nodes × 1 stream, Unix",
        "≥ 1.0× 4 ssh -L",
    ),
    (
        "rtt tcp",
        "rtt",
        "64 B round-trip p50, TCP",
        "≤ 0.9× ssh -L",
    ),
    (
        "rtt unix",
        "rtt",
        "64 B round-trip p50, Unix",
        "≤ 0.9× ssh -L",
    ),
    ("dial p50 tcp", "dial", "dial p50, TCP", "≤ 1.0× ssh -L"),
    ("dial p50 unix", "dial", "dial p50, Unix", "≤ 1.0× ssh -L"),
    (
        "dial seq tcp",
        "dial",
        "dial p99, sequential dials, TCP",
        "≤ 2 ms",
    ),
    (
        "dial seq unix",
        "dial",
        "dial p99, sequential dials, Unix",
        "≤ 2 ms",
    ),
    (
        "dial flight tcp",
        "dial",
        "dial p99, dials in flight, TCP",
        "≤ 1.5× direct TCP",
    ),
    (
        "dial flight unix",
        "dial",
        "dial p99, dials in flight, Unix",
        "≤ 1.5× direct TCP",
    ),
    (
        "echo50 tcp",
        "streams",
        "50 streams echoing at once, one tunnel, TCP",
        "≤ 1.0× ssh -L",
    ),
    (
        "echo50 unix",
        "streams",
        "50 streams echoing at once, one tunnel, Unix",
        "≤ 1.0× ssh -L",
    ),
    ("rss tunnel", "nodes", "RSS per idle tunnel", "≤ 64 KiB"),
    (
        "nodes healthy",
        "nodes",
        "5000 simulated nodes: all healthy after",
        "≤ 30 s",
    ),
    (
        "nodes rss",
        "nodes",
        "5000 simulated nodes: daemon RSS",
        "≤ 400 MiB",
    ),
    (
        "idle cpu",
        "nodes",
        "idle CPU at 1000 nodes, keepalive 10 s",
        "≤ 2 % of one core",
    ),
    (
        "rtt_ms",
        "rtt_ms",
        "status rtt_ms, idle link, keepalive 10 s",
        "≤ direct TCP echo + 1 ms",
    ),
];

/// What a section measured for one target, and whether it is met (`None`:
/// not measurable in this run; `measured` says why).
pub(crate) struct Outcome {
    pub(crate) measured: String,
    pub(crate) met: Option<bool>,
}

pub(crate) fn outcomes() -> &'static std::sync::Mutex<HashMap<&'static str, Outcome>> {
    static O: std::sync::OnceLock<std::sync::Mutex<HashMap<&'static str, Outcome>>> =
        std::sync::OnceLock::new();
    O.get_or_init(Default::default)
}

/// Fills in the targets-table row `key` (one of [`TARGETS`]).
pub(crate) fn record(key: &'static str, measured: String, met: Option<bool>) {
    assert!(TARGETS.iter().any(|t| t.0 == key), "no target row {key}");
    outcomes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, Outcome { measured, met });
}

/// Records `value / peer` against `limit`: met when the ratio is at most
/// `limit` (`at_most`) or at least `limit`. `shown` is the value as printed.
pub(crate) fn record_ratio(
    key: &'static str,
    shown: impl Fn(f64) -> String,
    value: Option<f64>,
    peer: Option<f64>,
    peer_label: &str,
    limit: f64,
    at_most: bool,
) {
    match (value, peer) {
        (Some(v), Some(p)) if p > 0.0 && v.is_finite() => {
            let r = v / p;
            record(
                key,
                format!("{} = {r:.2}× {peer_label} ({})", shown(v), shown(p)),
                Some(if at_most { r <= limit } else { r >= limit }),
            );
        }
        (Some(v), _) => record(
            key,
            format!("{}; n/a: no {peer_label} figure", shown(v)),
            None,
        ),
        _ => record(key, "n/a: no samples (see errors)".into(), None),
    }
}

/// The closing table: every target with what this run measured.
pub(crate) fn targets_table(sz: &Sizes, smoke: bool) -> Table {
    let mut t = Table::new(
        "Targets (every figure from this run; ratios against the peer measured in the same run)",
        &["figure", "target", "measured", "met"],
    );
    let got = outcomes().lock().unwrap_or_else(|e| e.into_inner());
    for (key, section, figure, target) in TARGETS {
        let (measured, met) = match got.get(key) {
            Some(o) => (
                o.measured.clone(),
                match o.met {
                    Some(true) => "met",
                    Some(false) => "NOT MET",
                    None => "n/a",
                },
            ),
            None if !sz.runs(section) => (
                format!("not run (TUNNELER_BENCH_ONLY lacks {section})"),
                "-",
            ),
            None => ("n/a: not measured (see errors)".to_string(), "n/a"),
        };
        t.row(vec![
            figure.to_string(),
            target.to_string(),
            measured,
            met.to_string(),
        ]);
    }
    if smoke {
        t.notes
            .push("SMOKE run: tiny sizes, so these verdicts mean nothing".into());
    }
    t
}

// ---------------------------------------------------------------------------
// Statistics and the report
// ---------------------------------------------------------------------------

/// The `p`th percentile; `None` for no samples (never a figure).
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

/// "n/a" where a path produced no samples.
pub(crate) const NA: &str = "n/a";

pub(crate) fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

pub(crate) fn ratio(v: f64, ssh: Option<f64>) -> String {
    match ssh {
        Some(s) if s > 0.0 && v.is_finite() => format!("{:.2}×", v / s),
        _ => "-".into(),
    }
}

pub(crate) fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// A titled table; printed at the end so that progress lines do not
/// interleave with results.
pub(crate) struct Table {
    pub(crate) title: String,
    pub(crate) head: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
    pub(crate) notes: Vec<String>,
}

impl Table {
    pub(crate) fn new(title: impl Into<String>, head: &[&str]) -> Table {
        Table {
            title: title.into(),
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let cols = self.head.len();
        let mut w = vec![0usize; cols];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::from("  ");
            for (i, c) in r.iter().enumerate().take(cols) {
                let pad = w[i] - c.chars().count();
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str(&" ".repeat(pad + 2));
                    s.push_str(c);
                }
            }
            s.push('\n');
            s
        };
        let mut out = format!("\n{}\n", self.title);
        out.push_str(&line(&self.head));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}

/// One progress line on stderr. It also carries the system uptime, the
/// clock of `perf record` and `perf sched` (close to CLOCK_MONOTONIC), so a
/// profile of a whole run can be cut into the sections and paths these
/// lines mark.
pub(crate) fn progress(msg: &str) {
    let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let up = up.split_whitespace().next().unwrap_or("?");
    eprintln!(
        "[e2e {:>7.1}s up {up}] {msg}",
        started().elapsed().as_secs_f64()
    );
}

pub(crate) fn started() -> &'static Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T.get_or_init(Instant::now)
}

/// Per idle tunnel and per idle stream, daemon against ssh -L.
/// `idle_tunnel_rss` is (daemon, ssh) VmRSS with one idle tunnel each.
pub(crate) fn memory_table(
    sz: &Sizes,
    per_tunnel: Option<f64>,
    idle_tunnel_rss: Option<(u64, u64)>,
    per_stream: &HashMap<PathKind, f64>,
) -> Table {
    let mut mem = Table::new("Memory summary", &["what", "daemon", "ssh -L", "vs ssh -L"]);
    let ssh_tunnel = idle_tunnel_rss.map(|r| r.1 as f64);
    let cell = |v: Option<f64>| v.map(|k| format!("{k:.1}")).unwrap_or_else(|| "-".into());
    mem.row(vec![
        "per idle tunnel (KiB)".into(),
        cell(per_tunnel),
        cell(ssh_tunnel),
        per_tunnel
            .map(|k| ratio(k, ssh_tunnel))
            .unwrap_or_else(|| "-".into()),
    ]);
    let ds = per_stream
        .get(&PathKind::DaemonUnix)
        .or(per_stream.get(&PathKind::DaemonTcp))
        .copied();
    let ss = per_stream.get(&PathKind::SshL).copied();
    mem.row(vec![
        "per idle stream (KiB)".into(),
        cell(ds),
        cell(ss),
        ds.map(|k| ratio(k, ss)).unwrap_or_else(|| "-".into()),
    ]);
    mem.notes.push(format!(
        "per idle tunnel: daemon from the largest simulated-node run; ssh -L is one whole `ssh -N -L` process per node (its VmRSS when idle; the daemon with 1 tunnel had {} KiB)",
        idle_tunnel_rss.map_or_else(|| NA.to_string(), |r| r.0.to_string())
    ));
    mem.notes.push(format!(
        "per idle stream: from the largest concurrent-stream run ({}), daemon over the Unix listener",
        sz.streams.last().copied().unwrap_or(0)
    ));
    mem
}
