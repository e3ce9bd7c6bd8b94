//! Keepalive round trip in the status (`rtt_ms`)

use crate::*;

/// The keepalive interval [`bench_toml`] sets: the production default.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(10);

/// The daemon's first node in its status document (`GET /v1/status`,
/// parsed into the server's own `StatusDocument`), if the admin API
/// answers with one.
pub(crate) fn first_node(admin: &std::path::Path) -> Option<common::NodeStatus> {
    let (code, body) = common::admin_get(admin, "/v1/status").ok()?;
    if code != 200 {
        return None;
    }
    let doc: common::StatusDocument = serde_json::from_str(&body).ok()?;
    doc.nodes.into_iter().next()
}

/// `rtt_ms` of the daemon's first node in `status --json`.
pub(crate) fn first_node_rtt_ms(admin: &std::path::Path) -> Option<f64> {
    first_node(admin)?.rtt_ms
}

/// What an operator reads as the node's round trip on an idle link, against
/// what the same link really takes after the same idle gap: a direct TCP
/// echo to the node, one round trip every keepalive interval, run at the
/// same time. Runs first, while nothing else has used the tunnel.
///
/// Each new `rtt_ms` value is one keepalive ping; the value already there
/// when the section starts is not counted.
pub(crate) fn status_rtt(ep: &Endpoints, sz: &Sizes, admin: &std::path::Path) -> Table {
    let n = sz.status_rtt_samples;
    progress(&format!(
        "status rtt_ms on an idle link: {n} keepalive round trips, {}s apart",
        KEEPALIVE.as_secs()
    ));
    let (pings, direct) = std::thread::scope(|sc| {
        let direct = sc.spawn(|| -> io::Result<Vec<Duration>> {
            let seed = next_seed();
            let mut s = ep.dial(PathKind::Direct, ECHO_PORT)?;
            round_trip(&mut s, seed, 0)?;
            let mut v = Vec::with_capacity(n);
            for i in 0..n as u64 {
                std::thread::sleep(KEEPALIVE);
                let t0 = Instant::now();
                round_trip(&mut s, seed, 1 + i)?;
                v.push(t0.elapsed());
            }
            finish_echo(&mut s)?;
            Ok(v)
        });
        let deadline = Instant::now() + KEEPALIVE * (n as u32 + 2) + Duration::from_secs(5);
        let mut last = first_node_rtt_ms(admin);
        let mut pings = Vec::with_capacity(n);
        while pings.len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(v) = first_node_rtt_ms(admin) {
                // A ping the section saw happen, not the one before it.
                if last.is_some_and(|l| l != v) {
                    pings.push(Duration::from_secs_f64(v / 1e3));
                }
                last = Some(v);
            }
        }
        let direct = direct
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")));
        (pings, direct)
    });
    if pings.len() < n {
        fail(format!(
            "rtt_ms: {} of {n} keepalive round trips showed in the status within {} intervals",
            pings.len(),
            n + 2
        ));
    }
    let direct = direct.unwrap_or_else(|e| {
        fail(format!("rtt_ms, direct TCP echo: {e}"));
        Vec::new()
    });
    let (mut pings, mut direct) = (pings, direct);
    pings.sort();
    direct.sort();
    let mut t = Table::new(
        format!(
            "Round trip after {} s idle: the status's rtt_ms (keepalive {} s, one node, no streams) against a direct TCP echo to the node after the same gap",
            KEEPALIVE.as_secs(),
            KEEPALIVE.as_secs()
        ),
        &["what", "samples", "p50", "min", "max", "p50 vs direct"],
    );
    let d50 = percentile(&direct, 50.0);
    for (what, v) in [("status rtt_ms", &pings), ("direct TCP echo", &direct)] {
        let cell = |d: Option<Duration>| d.map(us).unwrap_or_else(|| NA.into());
        t.row(vec![
            what.into(),
            v.len().to_string(),
            cell(percentile(v, 50.0)),
            cell(v.first().copied()),
            cell(v.last().copied()),
            match percentile(v, 50.0) {
                Some(p) => ratio(p.as_secs_f64(), d50.map(|d| d.as_secs_f64())),
                None => NA.into(),
            },
        ]);
    }
    match (percentile(&pings, 50.0), d50) {
        (Some(p), Some(d)) => {
            let gap = p.as_secs_f64() - d.as_secs_f64();
            record(
                "rtt_ms",
                format!(
                    "p50 {} vs direct {} ({:+.2} ms, {} samples)",
                    us(p),
                    us(d),
                    gap * 1e3,
                    pings.len()
                ),
                Some(gap <= 1e-3),
            );
        }
        _ => record("rtt_ms", "n/a: no samples (see errors)".into(), None),
    }
    t.notes.push("both include this machine's cost of waking from idle; the target is rtt_ms within 1 ms of the direct echo".into());
    t
}
