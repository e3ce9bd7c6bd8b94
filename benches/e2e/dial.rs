//! Dial times (`dial`): CONNECT to first byte, one at a time and in flight.

use crate::*;

/// A dial plus one checked round trip (timed), then a checked close (not).
pub(crate) fn dial_once(ep: &Endpoints, path: PathKind) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = ep.dial(path, ECHO_PORT)?;
    round_trip(&mut s, seed, 0)?;
    let d = t0.elapsed();
    finish_echo(&mut s)?;
    Ok(d)
}

pub(crate) async fn dial_once_async(ep: &Endpoints, path: PathKind) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = tokio::time::timeout(IO_TIMEOUT, ep.dial_async(path, ECHO_PORT))
        .await
        .map_err(|_| io::Error::other("dial timed out"))??;
    tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 0))
        .await
        .map_err(|_| io::Error::other("round trip timed out"))??;
    let d = t0.elapsed();
    finish_echo_async(&mut s).await?;
    Ok(d)
}

/// Dial failures a path may have before the rest of its dials are skipped
/// (each can cost a full timeout); all of them are errors either way.
pub(crate) const DIAL_GIVE_UP: usize = 3;

pub(crate) fn dials(ep: &Endpoints, sz: &Sizes, rt: &tokio::runtime::Runtime) -> Vec<Table> {
    progress("dial latency, sequential");
    let mut seq = Table::new(
        format!(
            "Dial: connect (+CONNECT → 200) + one {MSG}-byte round trip, sequential ({} dials)",
            sz.dial_seq
        ),
        &["path", "p50", "p99", "p50 vs ssh -L", "p99 vs ssh -L"],
    );
    let mut res = Vec::new();
    for path in PATHS {
        progress(&format!("dial latency, sequential: {}", path.label()));
        let mut v = Vec::with_capacity(sz.dial_seq);
        let mut failed = 0;
        for _ in 0..sz.dial_seq {
            match dial_once(ep, path) {
                Ok(d) => v.push(d),
                Err(e) => {
                    failed += 1;
                    fail(format!("sequential dial, {}: {e}", path.label()));
                    if failed >= DIAL_GIVE_UP {
                        fail(format!(
                            "sequential dial, {}: gave up after {failed} failures",
                            path.label()
                        ));
                        break;
                    }
                }
            }
        }
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut seq, &res);
    record_latency(
        &res,
        ["dial p50 tcp", "dial p50 unix"],
        false,
        PathKind::SshL,
        1.0,
    );
    record_dial_p99(&res, sz.dial_seq, Duration::from_millis(2));

    progress("dial latency, in flight");
    let mut par = Table::new(
        format!(
            "Dial as above with {} dials in flight ({} dials)",
            sz.dial_in_flight, sz.dial_total
        ),
        &[
            "path",
            "p50",
            "p99",
            "p50 vs ssh -L",
            "p99 vs ssh -L",
            "p99 vs direct",
        ],
    );
    let mut res = Vec::new();
    for path in PATHS {
        progress(&format!("dial latency, in flight: {}", path.label()));
        let per_task = sz.dial_total / sz.dial_in_flight;
        let (v, failed, last) = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..sz.dial_in_flight {
                let ep = ep.clone();
                set.spawn(async move {
                    let mut v = Vec::with_capacity(per_task);
                    let mut errs = Vec::new();
                    for _ in 0..per_task {
                        match dial_once_async(&ep, path).await {
                            Ok(d) => v.push(d),
                            Err(e) => errs.push(e.to_string()),
                        }
                        if errs.len() >= DIAL_GIVE_UP {
                            break;
                        }
                    }
                    (v, errs)
                });
            }
            let (mut all, mut errs) = (Vec::new(), Vec::new());
            while let Some(r) = set.join_next().await {
                match r {
                    Ok((v, e)) => {
                        all.extend(v);
                        errs.extend(e);
                    }
                    Err(e) => errs.push(format!("dial task failed: {e}")),
                }
            }
            (all, errs.len(), errs)
        });
        if failed > 0 {
            let mut distinct = last.clone();
            distinct.sort();
            distinct.dedup();
            fail(format!(
                "dials in flight, {}: {failed} failed, {} of {} succeeded: {}",
                path.label(),
                v.len(),
                sz.dial_total,
                distinct.join("; ")
            ));
        }
        let mut v = v;
        v.sort();
        res.push((path, percentile(&v, 50.0), percentile(&v, 99.0)));
    }
    latency_rows(&mut par, &res);
    let direct = res
        .iter()
        .find(|r| r.0 == PathKind::Direct)
        .and_then(|r| r.2)
        .map(|d| d.as_secs_f64());
    for (row, r) in par.rows.iter_mut().zip(&res) {
        row.push(match r.2 {
            Some(d) => ratio(d.as_secs_f64(), direct),
            None => NA.into(),
        });
    }
    record_latency(
        &res,
        ["dial flight tcp", "dial flight unix"],
        true,
        PathKind::Direct,
        1.5,
    );
    vec![seq, par]
}
