//! Many concurrent streams on one node (`streams`).

use crate::*;

/// Result of holding `n` streams open at once on one path.
pub(crate) struct ManyResult {
    pub(crate) ok: usize,
    pub(crate) open_time: Duration,
    pub(crate) echo_time: Duration,
    pub(crate) rss_per_stream_kib: Option<f64>,
    /// Distinct errors, each with how often it happened.
    pub(crate) errors: Vec<(String, usize)>,
}

pub(crate) async fn many_streams(
    ep: &Endpoints,
    path: PathKind,
    n: usize,
    open_conc: usize,
    rounds: usize,
    pid: Option<u32>,
) -> ManyResult {
    let rss0 = pid.map(rss_kib);
    let sem = Arc::new(tokio::sync::Semaphore::new(open_conc));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let ep = ep.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok();
            let seed = next_seed();
            let mut s = tokio::time::timeout(IO_TIMEOUT, ep.dial_async(path, ECHO_PORT))
                .await
                .map_err(|_| io::Error::other("dial timed out"))??;
            tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 0))
                .await
                .map_err(|_| io::Error::other("round trip timed out"))??;
            Ok::<_, io::Error>((s, seed))
        });
    }
    let mut open = Vec::with_capacity(n);
    let mut errors: Vec<String> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => errors.push(format!("open: {e}")),
            Err(e) => errors.push(format!("open task: {e}")),
        }
    }
    let open_time = t0.elapsed();
    // Let the relay settle before reading memory with every stream idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = pid.map(rss_kib);
    // Rounds of one more round trip on every stream at once; the median
    // round is the figure.
    let mut echo_times = Vec::with_capacity(rounds);
    for round in 0..rounds.max(1) as u64 {
        let t1 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (mut s, seed) in open.drain(..) {
            set.spawn(async move {
                let r = tokio::time::timeout(IO_TIMEOUT, round_trip_async(&mut s, seed, 1 + round))
                    .await
                    .map_err(|_| io::Error::other("round trip timed out"))
                    .and_then(|r| r);
                (r, s, seed)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok((Ok(()), s, seed)) => open.push((s, seed)),
                Ok((Err(e), _, _)) => errors.push(format!("echo on all: {e}")),
                Err(e) => errors.push(format!("echo task: {e}")),
            }
        }
        echo_times.push(t1.elapsed());
    }
    echo_times.sort();
    let echo_time = echo_times[echo_times.len() / 2];
    // Every stream must then close cleanly, with nothing extra.
    let mut set = tokio::task::JoinSet::new();
    for (mut s, _) in open {
        set.spawn(async move { finish_echo_async(&mut s).await });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => errors.push(format!("close: {e}")),
            Err(e) => errors.push(format!("close task: {e}")),
        }
    }
    let rss_per_stream_kib = match (rss0, rss1) {
        (Some(a), Some(b)) if n > 0 => Some((b as f64 - a as f64) / n as f64),
        _ => None,
    };
    // Give the far side time to close everything before the next path.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ManyResult {
        ok,
        open_time,
        echo_time,
        rss_per_stream_kib,
        errors: count_distinct(errors),
    }
}

/// Distinct messages with their counts, most frequent first.
pub(crate) fn count_distinct(mut v: Vec<String>) -> Vec<(String, usize)> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in v.drain(..) {
        *counts.entry(e).or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

pub(crate) fn concurrency(
    ep: &Endpoints,
    sz: &Sizes,
    rt: &tokio::runtime::Runtime,
    daemon: u32,
    ssh: u32,
) -> (Vec<Table>, HashMap<PathKind, f64>) {
    let mut tables = Vec::new();
    let mut per_stream = HashMap::new();
    for &n in &sz.streams {
        progress(&format!("{n} concurrent streams"));
        let rounds = sz.echo_rounds_for(n);
        let mut t = Table::new(
            format!(
                "{n} concurrent streams over one tunnel (opened {} at a time, each echoes once, then all echo at once: median of {} rounds)",
                sz.open_concurrency, rounds
            ),
            &[
                "path",
                "ok",
                "open all",
                "vs ssh -L",
                "echo on all",
                "vs ssh -L",
                "RSS/stream",
            ],
        );
        let mut res = Vec::new();
        for path in PATHS {
            progress(&format!("{n} concurrent streams: {}", path.label()));
            let pid = path_pid(path, daemon, ssh);
            let r = rt.block_on(many_streams(ep, path, n, sz.open_concurrency, rounds, pid));
            if r.ok != n || !r.errors.is_empty() {
                let list: Vec<String> = r
                    .errors
                    .iter()
                    .take(5)
                    .map(|(e, k)| format!("{k}× {e}"))
                    .collect();
                fail(format!(
                    "{n} concurrent streams, {}: {} of {n} opened, echoed {} times and closed cleanly; {}",
                    path.label(),
                    r.ok,
                    1 + rounds,
                    list.join("; ")
                ));
            }
            if let Some(k) = r.rss_per_stream_kib {
                per_stream.insert(path, k);
            }
            res.push((path, r));
        }
        let ssh_r = res.iter().find(|r| r.0 == PathKind::SshL).map(|r| &r.1);
        for (p, r) in &res {
            t.row(vec![
                p.label().into(),
                format!("{}/{n}", r.ok),
                format!("{:.2} s", r.open_time.as_secs_f64()),
                ratio(
                    r.open_time.as_secs_f64(),
                    ssh_r.map(|s| s.open_time.as_secs_f64()),
                ),
                format!("{:.1} ms", r.echo_time.as_secs_f64() * 1e3),
                ratio(
                    r.echo_time.as_secs_f64(),
                    ssh_r.map(|s| s.echo_time.as_secs_f64()),
                ),
                r.rss_per_stream_kib
                    .map(|k| format!("{k:.1} KiB"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        if n == 50 {
            let echo = |p: PathKind| {
                res.iter()
                    .find(|r| r.0 == p)
                    .filter(|r| r.1.ok == n)
                    .map(|r| r.1.echo_time.as_secs_f64())
            };
            for (key, path) in [
                ("echo50 tcp", PathKind::DaemonTcp),
                ("echo50 unix", PathKind::DaemonUnix),
            ] {
                record_ratio(
                    key,
                    |v| format!("{:.1} ms", v * 1e3),
                    echo(path),
                    echo(PathKind::SshL),
                    "ssh -L",
                    1.0,
                    true,
                );
            }
        }
        t.notes.push(format!(
            "ok: streams that opened, echoed (checked) {} times and then closed cleanly",
            1 + rounds
        ));
        t.notes.push("RSS/stream: VmRSS of the daemon or of ssh -L's ssh with all streams open and idle, minus before, divided by the count".into());
        tables.push(t);
    }
    (tables, per_stream)
}
