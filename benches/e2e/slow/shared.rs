//! Neighbours of a slow reader on a shared SSH session.

use super::*;

/// What the neighbours of a 2 MB/s reader saw on its session.
pub(crate) struct Beside {
    pub(crate) idle: Vec<Duration>,
    pub(crate) held: Vec<Duration>,
    pub(crate) download: Duration,
    pub(crate) slow_ok: bool,
    pub(crate) seen: bool,
}

/// On `p`: an echo and a download stream opened first, then a 2 MB/s
/// reader of a pushing source on the same session; once it holds the
/// session, round trips on the echo for `window` and a `bulk` download
/// read as fast as it comes. Every byte is checked.
pub(crate) fn beside_slow(
    ep: &Endpoints,
    p: PathKind,
    admin: &Path,
    count: usize,
    bytes: u64,
    bulk: u64,
    window: Duration,
) -> io::Result<Beside> {
    let seed = next_seed();
    let mut echo = ep.dial(p, ECHO_PORT)?;
    let mut dl = ep.dial(p, SOURCE_PORT)?;
    let idle = rtts_on(&mut echo, seed, 0, count, None, Duration::ZERO, None)?;
    let (got, done) = (AtomicU64::new(0), AtomicBool::new(false));
    let (held, dl_r, slow, seen) = std::thread::scope(|sc| {
        let h = sc.spawn(|| paced(ep, p, bytes, SLOW_RATE, &got, &done));
        let admin = (p != PathKind::SshL).then_some(admin);
        let seen = wait_held(&got, 2 << 20, admin, true);
        let until = Instant::now() + window;
        let d =
            sc.spawn(|| read_source(&mut dl, bulk, None, &AtomicU64::new(0)).map(|g| g.elapsed));
        let held = rtts_on(
            &mut echo,
            seed,
            count as u64,
            1_000_000,
            Some(until),
            Duration::ZERO,
            None,
        );
        (held, join(d), join(h), seen)
    });
    let held = held?;
    finish_echo(&mut echo)?;
    let slow_ok = match slow {
        Ok(_) => true,
        Err(e) => {
            fail(format!(
                "slow reader beside its session's neighbours, {}: {e}",
                p.label()
            ));
            false
        }
    };
    let download = dl_r?;
    if p != PathKind::SshL && !seen {
        fail(format!(
            "neighbours on a held session, {}: the session was never held within {HOLD_WAIT:?}",
            p.label()
        ));
    }
    Ok(Beside {
        idle,
        held,
        download,
        slow_ok,
        seen,
    })
}

/// Case 4: streams that already shared the session when it became
/// held. A daemon of its own with one session per node, so they must.
pub(crate) fn shared_session(cluster: &Cluster, ep: &Endpoints, sz: &Sizes) -> Vec<Table> {
    progress("slow: neighbours on the held session (max_connections_per_node = 1)");
    let spec = ConfigSpec {
        ssh_extra: "max_connections_per_node = 1".into(),
        ..ConfigSpec::default()
    };
    let daemon = Daemon::start_toml(cluster, &bench_toml(cluster, &spec), &[]);
    daemon.wait_all_healthy(Duration::from_secs(30));
    let w = watch(&[], Some(&daemon.admin));
    let count = (sz.rtt_count / 5).clamp(20, 2000);
    let bytes = (SLOW_RATE * sz.slow_neigh_secs as f64) as u64;
    let bulk = (sz.bulk_bytes / 64).max(1 << 20);
    let window = Duration::from_secs_f64(sz.slow_neigh_secs as f64 / 3.0);
    let win = node_status(&daemon.admin)
        .map(|n| n.window_bytes)
        .unwrap_or(0);
    let mut t = Table::new(
        format!(
            "Streams that already shared the session when a 2 MB/s reader made it held (daemon: max_connections_per_node = 1, SSH window {}): {MSG}-byte round trips for {:.1} s, and a {} download",
            mib(win),
            window.as_secs_f64(),
            mib(bulk)
        ),
        &[
            "path",
            "idle p50",
            "held p50",
            "held p99",
            "round trips",
            "download",
            "MB/s",
            "slow reader",
        ],
    );
    for p in SLOW_PATHS {
        match beside_slow(ep, p, &daemon.admin, count, bytes, bulk, window) {
            Ok(b) => t.row(vec![
                p.label().into(),
                pct(&b.idle, 50.0),
                pct(&b.held, 50.0),
                pct(&b.held, 99.0),
                b.held.len().to_string(),
                format!("{:.1} s", b.download.as_secs_f64()),
                format!("{:.2}", bulk as f64 / b.download.as_secs_f64() / 1e6),
                if b.slow_ok { "every byte" } else { "FAILED" }.into(),
            ]),
            Err(e) => {
                fail(format!("neighbours on a held session, {}: {e}", p.label()));
                let mut row = vec![p.label().to_string()];
                row.resize(8, NA.into());
                t.row(row);
            }
        }
    }
    t.notes.push("the echo and download streams are opened before the slow reader, on the same (only) session; the download is requested once the session is held and read as fast as it comes, every byte checked".into());
    t.notes.push("daemon: russh re-opens a channel's window as data arrives, so the held session carries the neighbours' node→client data behind up to one SSH window of the slow stream's, drained at 2 MB/s; the window is sized to the link (see the `window` table). ssh -L has per-channel windows and is not held".into());
    let (_, seen) = w.finish();
    let mut d = daemon;
    d.stop();
    vec![
        t,
        status_table("max_connections_per_node = 1: over the case above", seen),
    ]
}
