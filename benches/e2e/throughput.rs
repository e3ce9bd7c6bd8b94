//! Stream measurements (one node)

use crate::*;

/// The process whose CPU and memory a path costs, if any.
pub(crate) fn path_pid(path: PathKind, daemon: u32, ssh: u32) -> Option<u32> {
    match path {
        PathKind::Direct => None,
        PathKind::SshL => Some(ssh),
        PathKind::DaemonTcp | PathKind::DaemonUnix => Some(daemon),
    }
}

/// Asks the source for `bytes` bytes of a fresh seed's pattern and checks
/// every one on arrival, then that EOF comes right after the last.
pub(crate) fn bulk_once(ep: &Endpoints, path: PathKind, bytes: u64) -> io::Result<Duration> {
    let seed = next_seed();
    let t0 = Instant::now();
    let mut s = ep.dial(path, SOURCE_PORT)?;
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&bytes.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        pattern::check_read(seed, bytes, got, &buf[..n])?;
        got += n as u64;
    }
    if got != bytes {
        return Err(io::Error::other(format!(
            "EOF after {got} of {bytes} bytes"
        )));
    }
    Ok(t0.elapsed())
}

pub(crate) fn throughput(ep: &Endpoints, sz: &Sizes, daemon: u32, ssh: u32) -> Table {
    progress("single-stream throughput");
    let mut rates: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut cpu: HashMap<PathKind, Vec<f64>> = HashMap::new();
    // Paths interleaved per run so that noise from other load spreads out.
    for run in 1..=sz.bulk_runs {
        for path in PATHS {
            progress(&format!(
                "single-stream throughput, run {run}: {}",
                path.label()
            ));
            let pid = path_pid(path, daemon, ssh);
            let c0 = pid.map(cpu_seconds);
            match bulk_once(ep, path, sz.bulk_bytes) {
                Ok(d) => {
                    rates
                        .entry(path)
                        .or_default()
                        .push(sz.bulk_bytes as f64 / d.as_secs_f64());
                    if let (Some(pid), Some(c0)) = (pid, c0) {
                        let gb = sz.bulk_bytes as f64 / 1e9;
                        cpu.entry(path)
                            .or_default()
                            .push((cpu_seconds(pid) - c0) / gb);
                    }
                }
                Err(e) => fail(format!("throughput, {}: {e}", path.label())),
            }
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let mut med: HashMap<PathKind, f64> = HashMap::new();
    let mut cmed: HashMap<PathKind, f64> = HashMap::new();
    for (p, v) in &mut rates {
        med.extend(median(v).map(|m| (*p, m)));
    }
    for (p, v) in &mut cpu {
        cmed.extend(median(v).map(|m| (*p, m)));
    }
    for (key, path) in [
        ("throughput tcp", PathKind::DaemonTcp),
        ("throughput unix", PathKind::DaemonUnix),
    ] {
        record_ratio(
            key,
            |v| format!("{:.0} MiB/s", mib(v)),
            med.get(&path).copied(),
            med.get(&PathKind::SshL).copied(),
            "ssh -L",
            1.2,
            false,
        );
    }
    let mut t = Table::new(
        format!(
            "Single-stream throughput: {} MiB per run, {} run(s), median [min-max]",
            sz.bulk_bytes >> 20,
            sz.bulk_runs
        ),
        &[
            "path",
            "runs ok",
            "MiB/s",
            "[min-max]",
            "Gbit/s",
            "vs ssh -L",
            "CPU s/GB",
            "vs ssh -L",
        ],
    );
    for path in PATHS {
        let (Some(v), Some(&m)) = (rates.get(&path), med.get(&path)) else {
            let mut row = vec![path.label().into(), format!("0/{}", sz.bulk_runs)];
            row.resize(8, NA.into());
            t.row(row);
            continue;
        };
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        let c = cmed.get(&path).copied();
        t.row(vec![
            path.label().into(),
            format!("{}/{}", v.len(), sz.bulk_runs),
            format!("{:.0}", mib(m)),
            format!("[{:.0}-{:.0}]", mib(lo), mib(hi)),
            format!("{:.2}", m * 8.0 / 1e9),
            ratio(m, med.get(&PathKind::SshL).copied()),
            c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            c.map(|c| ratio(c, cmed.get(&PathKind::SshL).copied()))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    t.notes.push(
        "CPU s/GB: utime+stime of the daemon process or of ssh -L's ssh process per 10^9 bytes relayed (client side only; sshd not counted)".into(),
    );
    t.notes.push(format!(
        "every byte checked against a seeded pattern on arrival, and EOF right after the last (the check alone runs at {:.0} MiB/s on one core here)",
        pattern::check_rate() / (1u64 << 20) as f64
    ));
    t
}
