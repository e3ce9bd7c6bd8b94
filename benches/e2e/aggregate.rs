//! Aggregate throughput (`aggregate`): four nodes, one stream each, at once

use crate::*;

/// Nodes of the aggregate run, one stream each.
pub(crate) const AGG_NODES: usize = 4;

/// One stream from each of [`AGG_NODES`] nodes at once: the daemon's one
/// process against one `ssh -L` process per node (which may spread over
/// every core). Every byte of every stream is checked.
pub(crate) fn aggregate(sz: &Sizes) -> Table {
    progress(&format!("aggregate: building {AGG_NODES} node namespaces"));
    let cluster = Cluster::with_options(
        AGG_NODES,
        ClusterOptions {
            servers: false,
            ..ClusterOptions::default()
        },
    );
    let _servers: Vec<ChildGuard> = cluster.nodes.iter().map(|n| start_servers(&n.ns)).collect();
    let daemon = Daemon::start_toml(&cluster, &bench_toml(&cluster, &ConfigSpec::default()), &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    let mut ssh = Vec::new();
    let mut eps = Vec::new();
    for node in &cluster.nodes {
        let (g, forwards) = start_ssh_forward(&cluster, node.ip, &[SOURCE_PORT]);
        ssh.push(g);
        eps.push(Endpoints {
            node_ip: node.ip,
            forwards,
            daemon_tcp: daemon.tcp_listener(),
            daemon_unix: daemon.egress.clone(),
        });
    }
    let dpid = daemon.pid();
    let ssh_pids: Vec<u32> = ssh.iter().map(|g| g.id()).collect();
    let bytes = sz.bulk_bytes;
    let total = (AGG_NODES as u64 * bytes) as f64;
    progress(&format!(
        "aggregate throughput: {AGG_NODES} nodes × 1 stream of {} MiB at once",
        bytes >> 20
    ));
    let mut rates: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut slowest: HashMap<PathKind, Vec<f64>> = HashMap::new();
    let mut cpu: HashMap<PathKind, Vec<f64>> = HashMap::new();
    for _ in 0..sz.agg_runs {
        for path in PATHS {
            let pids = match path {
                PathKind::Direct => Vec::new(),
                PathKind::SshL => ssh_pids.clone(),
                PathKind::DaemonTcp | PathKind::DaemonUnix => vec![dpid],
            };
            let c0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let t0 = Instant::now();
            let res: Vec<io::Result<Duration>> = std::thread::scope(|sc| {
                let hs: Vec<_> = eps
                    .iter()
                    .map(|ep| sc.spawn(move || bulk_once(ep, path, bytes)))
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("bench thread panicked")))
                    })
                    .collect()
            });
            let wall = t0.elapsed().as_secs_f64();
            let c1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let mut ok = true;
            let mut slow = f64::INFINITY;
            for (i, r) in res.into_iter().enumerate() {
                match r {
                    Ok(d) => slow = slow.min(bytes as f64 / d.as_secs_f64()),
                    Err(e) => {
                        ok = false;
                        fail(format!(
                            "aggregate throughput, {}, node {}: {e}",
                            path.label(),
                            i + 1
                        ));
                    }
                }
            }
            if ok {
                rates.entry(path).or_default().push(total / wall);
                slowest.entry(path).or_default().push(slow);
                if !pids.is_empty() {
                    cpu.entry(path).or_default().push((c1 - c0) / (total / 1e9));
                }
            }
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let med =
        |m: &mut HashMap<PathKind, Vec<f64>>, p: PathKind| m.get_mut(&p).and_then(|v| median(v));
    let ssh_rate = med(&mut rates, PathKind::SshL);
    let ssh_cpu = med(&mut cpu, PathKind::SshL);
    let mut t = Table::new(
        format!(
            "Aggregate throughput: {AGG_NODES} nodes × 1 stream of {} MiB, all at once, {} run(s), median; ssh -L is one process per node",
            bytes >> 20,
            sz.agg_runs
        ),
        &[
            "path",
            "runs ok",
            "MiB/s (all)",
            "Gbit/s",
            "vs 4 ssh -L",
            "slowest stream MiB/s",
            "CPU s/GB",
            "vs 4 ssh -L",
        ],
    );
    for path in PATHS {
        let runs = rates.get(&path).map_or(0, Vec::len);
        let Some(r) = med(&mut rates, path) else {
            let mut row = vec![path.label().into(), format!("0/{}", sz.agg_runs)];
            row.resize(8, NA.into());
            t.row(row);
            continue;
        };
        let c = med(&mut cpu, path);
        t.row(vec![
            path.label().into(),
            format!("{runs}/{}", sz.agg_runs),
            format!("{:.0}", mib(r)),
            format!("{:.2}", r * 8.0 / 1e9),
            ratio(r, ssh_rate),
            med(&mut slowest, path)
                .map(|s| format!("{:.0}", mib(s)))
                .unwrap_or_else(|| NA.into()),
            c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            c.map(|c| ratio(c, ssh_cpu)).unwrap_or_else(|| "-".into()),
        ]);
    }
    for (key, path) in [
        ("aggregate tcp", PathKind::DaemonTcp),
        ("aggregate unix", PathKind::DaemonUnix),
    ] {
        record_ratio(
            key,
            |v| format!("{:.2} Gbit/s", v * 8.0 / 1e9),
            med(&mut rates, path),
            ssh_rate,
            "4 ssh -L",
            1.0,
            false,
        );
    }
    t.notes.push("MiB/s (all): the bytes of the four streams over the time from the first dial to the last stream's EOF; every byte checked on arrival, EOF right after the last".into());
    t.notes.push("CPU s/GB: utime+stime of the daemon, or of the four ssh processes together, per 10^9 bytes relayed".into());
    drop(ssh);
    let mut daemon = daemon;
    daemon.stop();
    t
}
