//! One slow reader, many, a new stream beside them and a `kubectl cp`-like reader.

use super::*;

/// Case 1: one 2 MB/s reader of a pushing source on each path at once.
pub(crate) fn one_reader(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
    let bytes = (SLOW_RATE * sz.slow_secs as f64) as u64;
    progress(&format!(
        "slow: one 2 MB/s reader for {} s, daemon and ssh -L at once",
        sz.slow_secs
    ));
    let w = watch(&[daemon, ssh], None);
    let rss0 = w.rss0.clone();
    let res: Vec<io::Result<Got>> = std::thread::scope(|sc| {
        let hs: Vec<_> = SLOW_PATHS
            .iter()
            .map(|&p| {
                sc.spawn(move || {
                    let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
                    paced(ep, p, bytes, SLOW_RATE, &got, &done)
                })
            })
            .collect();
        hs.into_iter().map(join).collect()
    });
    let (peak, _) = w.finish();
    let mut t = Table::new(
        format!(
            "Slow reader: 2 MB/s from a node-side source that pushes as fast as it can, {} s ({}), daemon and ssh -L at once",
            sz.slow_secs,
            mib(bytes)
        ),
        &[
            "path",
            "every byte",
            "time",
            "MB/s",
            "RSS before",
            "RSS growth (peak)",
            "bound",
            "within",
        ],
    );
    let bound = STREAM_LIMIT + SLACK;
    for (i, (p, r)) in SLOW_PATHS.iter().zip(res).enumerate() {
        let mut row = vec![p.label().to_string()];
        match r {
            Ok(g) => row.extend([
                "yes".to_string(),
                format!("{:.1} s", g.elapsed.as_secs_f64()),
                format!("{:.2}", bytes as f64 / g.elapsed.as_secs_f64() / 1e6),
            ]),
            Err(e) => {
                fail(format!("slow reader, {}: {e}", p.label()));
                row.extend(["NO".into(), NA.into(), NA.into()]);
            }
        }
        row.extend(rss_cells(rss0[i], peak[i], bound));
        t.row(row);
    }
    t.notes.push(format!(
        "bound: the per-stream limit ({}) + 16 MiB. RSS growth: peak VmRSS during the run (sampled every 100 ms) minus VmRSS just before; for ssh -L, ssh's own process against the same figure",
        mib(STREAM_LIMIT)
    ));
    t.notes.push("every byte checked against the seeded pattern on arrival, EOF right after the last: a reset or a short stream is an error (exit 1)".into());
    t
}

/// Case 2: ten slow readers at once on each path (all twenty at once).
pub(crate) fn many_readers(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
    let bytes = (SLOW_RATE * sz.slow_many_secs as f64) as u64;
    progress(&format!(
        "slow: {MANY} 2 MB/s readers for {} s on each path, all at once",
        sz.slow_many_secs
    ));
    let w = watch(&[daemon, ssh], None);
    let rss0 = w.rss0.clone();
    let res: Vec<Vec<io::Result<Got>>> = std::thread::scope(|sc| {
        let hs: Vec<Vec<_>> = SLOW_PATHS
            .iter()
            .map(|&p| {
                (0..MANY)
                    .map(|_| {
                        sc.spawn(move || {
                            let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
                            paced(ep, p, bytes, SLOW_RATE, &got, &done)
                        })
                    })
                    .collect()
            })
            .collect();
        hs.into_iter()
            .map(|v| v.into_iter().map(join).collect())
            .collect()
    });
    let (peak, _) = w.finish();
    let mut t = Table::new(
        format!(
            "{MANY} slow readers at once on one node: 2 MB/s each, {} s ({} each)",
            sz.slow_many_secs,
            mib(bytes)
        ),
        &[
            "path",
            "complete",
            "slowest",
            "RSS before",
            "RSS growth (peak)",
            "bound",
            "within",
        ],
    );
    let bound = MANY as u64 * (STREAM_LIMIT + RUSSH_QUEUE + PACKET) + SLACK;
    for (i, (p, rs)) in SLOW_PATHS.iter().zip(res).enumerate() {
        let mut ok = 0;
        let mut slowest = Duration::ZERO;
        for r in rs {
            match r {
                Ok(g) => {
                    ok += 1;
                    slowest = slowest.max(g.elapsed);
                }
                Err(e) => fail(format!("{MANY} slow readers, {}: {e}", p.label())),
            }
        }
        let mut row = vec![
            p.label().to_string(),
            format!("{ok}/{MANY}"),
            if ok > 0 {
                format!("{:.1} s", slowest.as_secs_f64())
            } else {
                NA.into()
            },
        ];
        row.extend(rss_cells(rss0[i], peak[i], bound));
        t.row(row);
    }
    t.notes.push(format!(
        "complete: every byte checked, EOF right after the last. bound: per held stream the limit ({}) + russh's queue ({}) + one packet (docs/flow-control.md), times {MANY}, + 16 MiB; the daemon-wide bound is proxy.relay_buffer_budget (512 MiB)",
        mib(STREAM_LIMIT),
        mib(RUSSH_QUEUE)
    ));
    t
}

/// Case 3: a stream opened after a slow reader started on the node.
pub(crate) fn new_stream_beside(ep: &Endpoints, sz: &Sizes, admin: &Path) -> Table {
    let count = (sz.rtt_count / 5).clamp(20, 2000);
    let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
    progress("slow: a stream opened after a slow reader started");
    let mut t = Table::new(
        format!(
            "A new stream opened after a 2 MB/s reader started on the same node: {MSG}-byte round trips ({count}), idle vs beside it"
        ),
        &[
            "path",
            "idle p50",
            "idle p99",
            "beside p50",
            "beside p99",
            "p50 vs idle",
            "p99 vs idle",
            "held seen",
            "slow reader",
        ],
    );
    for p in SLOW_PATHS {
        let idle = rtts(ep, p, count, Duration::ZERO, None).unwrap_or_else(|e| {
            fail(format!(
                "new stream beside a slow reader, {} idle: {e}",
                p.label()
            ));
            Vec::new()
        });
        let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
        let (beside, held, slow, during) = std::thread::scope(|sc| {
            let h = sc.spawn(|| paced(ep, p, bytes, SLOW_RATE, &got, &done));
            let admin = (p != PathKind::SshL).then_some(admin);
            let held = wait_held(&got, 2 << 20, admin, false);
            let beside = rtts(ep, p, count, Duration::ZERO, None);
            let during = !done.load(Ordering::Relaxed);
            (beside, held, join(h), during)
        });
        let beside = beside.unwrap_or_else(|e| {
            fail(format!(
                "new stream beside a slow reader, {}: {e}",
                p.label()
            ));
            Vec::new()
        });
        let slow_ok = match slow {
            Ok(_) => "every byte".to_string(),
            Err(e) => {
                fail(format!(
                    "slow reader beside a new stream, {}: {e}",
                    p.label()
                ));
                "FAILED".into()
            }
        };
        if !during {
            t.notes.push(format!(
                "{}: the slow reader ended before the measurement did",
                p.label()
            ));
        }
        let rel = |q: f64| match (percentile(&beside, q), percentile(&idle, q)) {
            (Some(a), Some(i)) if !i.is_zero() => {
                format!("{:.2}×", a.as_secs_f64() / i.as_secs_f64())
            }
            _ => NA.into(),
        };
        t.row(vec![
            p.label().into(),
            pct(&idle, 50.0),
            pct(&idle, 99.0),
            pct(&beside, 50.0),
            pct(&beside, 99.0),
            rel(50.0),
            rel(99.0),
            if p == PathKind::SshL {
                "-".into()
            } else if held {
                "yes".into()
            } else {
                "no".into()
            },
            slow_ok,
        ]);
    }
    t.notes.push("target: daemon p50 beside ≤ 1.5× idle. The new stream is dialed once the slow reader has 2 MiB and (daemon) the node shows a congested or held session; the slow reader runs on through the measurement".into());
    t
}

/// Case 5: a `kubectl cp`-like copy at 20 MB/s and an interactive echo
/// stream opened once the copy is under way.
pub(crate) fn kubectl_cp(ep: &Endpoints, sz: &Sizes, admin: &Path) -> Table {
    let bytes = sz.cp_bytes;
    progress(&format!(
        "slow: kubectl cp-like, {} at 20 MB/s beside an interactive echo",
        mib(bytes)
    ));
    let mut t = Table::new(
        format!(
            "kubectl cp-like: {} from a node-side source to a 20 MB/s reader, with an echo stream opened afterwards (one {MSG}-byte round trip every 10 ms)",
            mib(bytes)
        ),
        &[
            "path", "copy", "time", "MB/s", "checksum", "echoes", "echo p50", "echo p99",
        ],
    );
    for p in SLOW_PATHS {
        let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
        let (cp, echo) = std::thread::scope(|sc| {
            let h = sc.spawn(|| paced(ep, p, bytes, CP_RATE, &got, &done));
            let admin = (p != PathKind::SshL).then_some(admin);
            wait_held(&got, (4 << 20).min(bytes / 4), admin, false);
            let echo = rtts(ep, p, 1_000_000, Duration::from_millis(10), Some(&done));
            (join(h), echo)
        });
        let echo = echo.unwrap_or_else(|e| {
            fail(format!("kubectl cp-like, echo on {}: {e}", p.label()));
            Vec::new()
        });
        let mut row = vec![p.label().to_string()];
        match cp {
            Ok(g) => {
                let want = expected_fnv(g.seed, bytes);
                if g.fnv != want {
                    fail(format!(
                        "kubectl cp-like, {}: checksum {:016x}, expected {want:016x}",
                        p.label(),
                        g.fnv
                    ));
                }
                row.extend([
                    "every byte".to_string(),
                    format!("{:.1} s", g.elapsed.as_secs_f64()),
                    format!("{:.1}", bytes as f64 / g.elapsed.as_secs_f64() / 1e6),
                    format!(
                        "{:016x} {}",
                        g.fnv,
                        if g.fnv == want {
                            "= source"
                        } else {
                            "≠ SOURCE"
                        }
                    ),
                ]);
            }
            Err(e) => {
                fail(format!("kubectl cp-like, {}: {e}", p.label()));
                row.extend(["FAILED".into(), NA.into(), NA.into(), NA.into()]);
            }
        }
        row.extend([echo.len().to_string(), pct(&echo, 50.0), pct(&echo, 99.0)]);
        t.row(row);
    }
    t.notes.push("checksum: FNV-1a 64 of the bytes received, against the same over the source's pattern; every byte is also checked on arrival".into());
    t
}
