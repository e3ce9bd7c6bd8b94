//! The shared relay budget across nodes.

use super::*;

/// The fair budget: a download from node-3, whose session carries
/// nothing else, alone and then while eight stalled readers (four on
/// node-1, four on node-2) fill a 1 MiB budget (`relay_stream_buffer_limit
/// = 256KiB`, one session per node). `ssh -L`, one per node, does the
/// same on the same nodes.
pub(crate) fn fair_budget(sz: &Sizes) -> Table {
    progress("slow: fair budget, building 3 node namespaces");
    let cluster = Cluster::with_options(
        3,
        ClusterOptions {
            servers: false,
            ..ClusterOptions::default()
        },
    );
    let _servers: Vec<ChildGuard> = cluster.nodes.iter().map(|n| start_servers(&n.ns)).collect();
    let spec = ConfigSpec {
        ssh_extra: "connections_per_node = 4\nmax_connections_per_node = 4".into(),
        ..ConfigSpec::default()
    };
    let toml = bench_toml(&cluster, &spec).replacen(
        "[proxy]\n",
        // One stalled stream on each of eight sessions, each asking for its
        // 512 KiB stream limit: its session's 256 KiB floor (the smallest)
        // plus 256 KiB of the budget, 2 MiB of the 1 MiB budget in all,
        // whatever order their data comes in. With several on one
        // session, the first to reach its own limit held the session
        // while the others were short, and the budget filled or not by
        // chance.
        "[proxy]\nrelay_buffer_budget = \"1MiB\"\nrelay_stream_buffer_limit = \"512KiB\"\nrelay_session_floor = \"256KiB\"\n",
        1,
    );
    let mut daemon = Daemon::start_toml(&cluster, &toml, &[]);
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
    let bulk = (sz.bulk_bytes / 4).max(32 << 20);
    let mut t = Table::new(
        format!("Fair budget: a {} download from node-3 alone, and while 8 stalled readers on node-1 and node-2 fill the budget (daemon: relay_buffer_budget 1MiB, relay_stream_buffer_limit 512KiB, relay_session_floor 256KiB, 4 sessions a node)", mib(bulk)),
        &["path", "alone MB/s", "beside stalled MB/s", "ratio", "held by the budget"],
    );
    let download = |p: PathKind| -> io::Result<f64> {
        let mut s = eps[2].dial(p, SOURCE_PORT)?;
        let g = read_source(&mut s, bulk, None, &AtomicU64::new(0))?;
        Ok(bulk as f64 / g.elapsed.as_secs_f64() / 1e6)
    };
    for p in [PathKind::DaemonUnix, PathKind::SshL] {
        let run = || -> io::Result<Vec<String>> {
            let alone = download(p)?;
            // Stalled: each asks for 1 TiB and never reads.
            let mut stalled = Vec::new();
            for ep in &eps[..2] {
                for _ in 0..4 {
                    let mut s = ep.dial(p, SOURCE_PORT)?;
                    let mut req = [0u8; 16];
                    req[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                    req[8..].copy_from_slice(&next_seed().to_le_bytes());
                    s.write_all(&req)?;
                    stalled.push(s);
                }
            }
            let held = || {
                common::metric_value(&daemon.metrics(), "tunneler_relay_budget_held_streams", &[])
                    .unwrap_or(0.0)
            };
            let full = p == PathKind::SshL || common::poll(HOLD_WAIT, || held() > 0.0);
            if !full {
                fail("fair budget: the stalled readers never filled the budget".into());
            }
            let beside = download(p)?;
            let h = if p == PathKind::SshL {
                NA.to_string()
            } else {
                format!("{}", held())
            };
            drop(stalled);
            Ok(vec![
                p.label().into(),
                format!("{alone:.0}"),
                format!("{beside:.0}"),
                format!("{:.2}", beside / alone),
                h,
            ])
        };
        match run() {
            Ok(r) => t.row(r),
            Err(e) => {
                fail(format!("fair budget, {}: {e}", p.label()));
                let mut r = vec![p.label().to_string()];
                r.resize(5, NA.into());
                t.row(r);
            }
        }
    }
    t.notes.push("target: the download beside the stalled readers at >= 50% of its speed alone (before the fair budget: 0.001 Gbit/s). `held by the budget`: tunneler_relay_budget_held_streams during the download".into());
    daemon.stop();
    t
}
