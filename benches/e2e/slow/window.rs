//! The SSH window size against a slow reader (`window`).

use super::*;

/// The SSH window's trade-off, one daemon per window (`window_min =
/// window_max`, one session per node): one stream's download speed
/// alone, against what a 2 MB/s reader's neighbours on its session pay.
/// `ssh -L`, with per-channel windows, is the reference row.
pub(crate) fn window_tradeoff(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Table {
    const WINDOWS: [u64; 7] = [
        64 << 10,
        128 << 10,
        256 << 10,
        512 << 10,
        1 << 20,
        2 << 20,
        8 << 20,
    ];
    progress("window: download speed against neighbour delay, per SSH window");
    let alone = (sz.bulk_bytes / 4).max(8 << 20);
    let count = (sz.rtt_count / 10).clamp(20, 1000);
    let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
    let bulk = (sz.bulk_bytes / 64).max(1 << 20);
    let window = Duration::from_secs_f64(sz.slow_neigh_secs as f64 / 3.0);
    let mut t = Table::new(
        format!(
            "SSH window trade-off (max_connections_per_node = 1): a {} download alone, and beside a 2 MB/s reader on the same session {MSG}-byte round trips for {:.1} s and a {} download",
            mib(alone),
            window.as_secs_f64(),
            mib(bulk)
        ),
        &[
            "window",
            "alone MB/s",
            "beside: p50",
            "p99",
            "download MB/s",
            "slow reader",
        ],
    );
    let row = |label: String, p: PathKind, admin: &Path| -> Vec<String> {
        let speed = ep
            .dial(p, SOURCE_PORT)
            .and_then(|mut s| read_source(&mut s, alone, None, &AtomicU64::new(0)))
            .map(|g| format!("{:.0}", alone as f64 / g.elapsed.as_secs_f64() / 1e6))
            .unwrap_or_else(|e| {
                fail(format!("window {label}, download alone: {e}"));
                "FAILED".into()
            });
        match beside_slow(ep, p, admin, count, bytes, bulk, window) {
            Ok(b) => vec![
                label,
                speed,
                pct(&b.held, 50.0),
                pct(&b.held, 99.0),
                format!("{:.1}", bulk as f64 / b.download.as_secs_f64() / 1e6),
                if b.slow_ok && (b.seen || p == PathKind::SshL) {
                    "every byte"
                } else {
                    "FAILED"
                }
                .into(),
            ],
            Err(e) => {
                fail(format!("window {label}, beside a slow reader: {e}"));
                let mut r = vec![label, speed];
                r.resize(6, NA.into());
                r
            }
        }
    };
    for w in WINDOWS {
        let spec = ConfigSpec {
            ssh_extra: format!(
                "max_connections_per_node = 1\nwindow_min = \"{w}B\"\nwindow_max = \"{w}B\""
            ),
            ..ConfigSpec::default()
        };
        let mut daemon = Daemon::start_toml(cluster, &bench_toml(cluster, &spec), &[]);
        daemon.wait_all_healthy(Duration::from_secs(30));
        let shown = node_status(&daemon.admin)
            .map(|n| n.window_bytes)
            .unwrap_or(0);
        if shown != w {
            fail(format!("window {w}: the status shows window_bytes {shown}"));
        }
        t.row(row(
            format!("{} KiB", w >> 10),
            PathKind::DaemonUnix,
            &daemon.admin,
        ));
        daemon.stop();
    }
    t.row(row(
        "ssh -L".into(),
        PathKind::SshL,
        Path::new("/nonexistent"),
    ));
    t.notes.push("one daemon per window, window_min = window_max; the neighbours' delay is about the window over the slow reader's rate (russh re-opens windows on arrival), and the download alone needs about one bandwidth-delay product plus the processing delay of a window update".into());
    t
}
