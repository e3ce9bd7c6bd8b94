//! Round trips (`rtt`) and the latency rows and targets shared with `dial`.

use crate::*;

pub(crate) fn rtt(ep: &Endpoints, sz: &Sizes) -> Table {
    progress("round-trip latency");
    let mut t = Table::new(
        format!(
            "Round trip of {MSG}-byte messages on an open stream ({} round trips)",
            sz.rtt_count
        ),
        &["path", "p50", "p99", "p50 vs ssh -L", "p99 vs ssh -L"],
    );
    let mut res: Vec<Latency> = Vec::new();
    for path in PATHS {
        progress(&format!("round-trip latency: {}", path.label()));
        let mut v = Vec::with_capacity(sz.rtt_count);
        let mut run = || -> io::Result<()> {
            let seed = next_seed();
            let mut s = ep.dial(path, ECHO_PORT)?;
            let warm = (sz.rtt_count / 10).max(5) as u64;
            for i in 0..warm {
                round_trip(&mut s, seed, i)?;
            }
            for i in 0..sz.rtt_count as u64 {
                let t0 = Instant::now();
                round_trip(&mut s, seed, warm + i)?;
                v.push(t0.elapsed());
            }
            finish_echo(&mut s)
        };
        if let Err(e) = run() {
            fail(format!(
                "round trip, {}: after {} round trips: {e}",
                path.label(),
                v.len()
            ));
            v.clear();
        }
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut t, &res);
    record_latency(&res, ["rtt tcp", "rtt unix"], false, PathKind::SshL, 0.9);
    t
}

/// Records the daemon's rows of `res` (TCP, then Unix listener) for the
/// targets `keys`: their p50 (or p99) against `peer`'s, at most `limit`×.
pub(crate) fn record_latency(
    res: &[Latency],
    keys: [&'static str; 2],
    p99: bool,
    peer: PathKind,
    limit: f64,
) {
    let pick = |r: &Latency| if p99 { r.2 } else { r.1 };
    let of = |p: PathKind| {
        res.iter()
            .find(|r| r.0 == p)
            .and_then(pick)
            .map(|d| d.as_secs_f64())
    };
    for (key, path) in keys
        .into_iter()
        .zip([PathKind::DaemonTcp, PathKind::DaemonUnix])
    {
        record_ratio(
            key,
            |v| us(Duration::from_secs_f64(v)),
            of(path),
            of(peer),
            peer.label(),
            limit,
            true,
        );
    }
}

/// Records the daemon's sequential-dial p99 (TCP, then Unix listener)
/// against the absolute bound, with its ratio to `ssh -L` for reference.
pub(crate) fn record_dial_p99(res: &[Latency], dials: usize, bound: Duration) {
    let ssh = res.iter().find(|r| r.0 == PathKind::SshL).and_then(|r| r.2);
    for (key, path) in [
        ("dial seq tcp", PathKind::DaemonTcp),
        ("dial seq unix", PathKind::DaemonUnix),
    ] {
        match res.iter().find(|r| r.0 == path).and_then(|r| r.2) {
            Some(d) => record(
                key,
                format!(
                    "{} of {dials} dials ({} ssh -L)",
                    us(d),
                    match ssh {
                        Some(s) => ratio(d.as_secs_f64(), Some(s.as_secs_f64())),
                        None => NA.into(),
                    }
                ),
                Some(d <= bound),
            ),
            None => record(key, "n/a: no samples (see errors)".into(), None),
        }
    }
}

/// (path, p50, p99); `None` where the path produced no samples.
pub(crate) type Latency = (PathKind, Option<Duration>, Option<Duration>);

pub(crate) fn latency_rows(t: &mut Table, res: &[Latency]) {
    let ssh = res.iter().find(|r| r.0 == PathKind::SshL);
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let cell = |d: Option<Duration>| d.map(us).unwrap_or_else(|| NA.into());
    let rel = |d: Option<Duration>, s: Option<Duration>| match d {
        Some(d) => ratio(d.as_secs_f64(), secs(s)),
        None => NA.into(),
    };
    for (p, p50, p99) in res {
        t.row(vec![
            p.label().into(),
            cell(*p50),
            cell(*p99),
            rel(*p50, ssh.and_then(|s| s.1)),
            rel(*p99, ssh.and_then(|s| s.2)),
        ]);
    }
}
