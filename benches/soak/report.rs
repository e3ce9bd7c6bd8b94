//! The end-of-run report: every check, its verdict, and the CSV and plot it writes.

use crate::*;

/// Prints and writes the summary, deaths, samples and plot; the exit code.
#[allow(clippy::too_many_arguments)]
pub(crate) fn report(
    plan: &Plan,
    ctx: &Ctx,
    pid: u32,
    base: &Sample,
    samples: &[Sample],
    load_end: f64,
    relay: Option<[f64; 3]>,
    after: (bool, String),
) -> i32 {
    let st = &ctx.stats;
    let mut failures: Vec<String> = st.errors.lock().unwrap().clone();
    let mut out = String::new();
    let deaths = st.deaths.lock().unwrap();
    let events = st.events.lock().unwrap().clone();
    let warm = plan.warmup.as_secs_f64();
    let _ = writeln!(
        out,
        "soak: {:.1} min of load, {} nodes ({} from nodes_file), {} long-lived streams, {} short dials/s, {} stalled readers (stall {:?} every {:?})",
        load_end / 60.0,
        plan.nodes,
        FILE_NODES,
        plan.streams,
        plan.dials_per_sec,
        STALLED,
        plan.stall_for,
        plan.stall_every
    );
    let mib_of = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
    let _ = writeln!(out, "\nbytes");
    let _ = writeln!(
        out,
        "  sent by clients           {:10.1} MiB",
        mib_of(&st.sent)
    );
    let _ = writeln!(out, "  verified on arrival       {:10.1} MiB (echoes, and {:.1} MiB from the stalled readers' sources)", mib_of(&st.verified), mib_of(&st.stall_bytes));
    let _ = writeln!(
        out,
        "  pattern mismatches        {:10}",
        st.mismatches.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "  lost outside any fault    {:10} B (sent, and the stream died before the echo was back)",
        st.lost_outside_faults.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "  in flight at an expected death {:5} B (sent, then the session died with sshd or the link)", st.lost_in_expected_deaths.load(Ordering::Relaxed));
    let _ = writeln!(out, "\ndials");
    let _ = writeln!(
        out,
        "  succeeded                 {:10}",
        st.dials_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "  short dials completed     {:10} (CONNECT, checked echo, half-close, EOF)",
        st.short_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "  short dials not started   {:10} (harness backlog over 1000)",
        st.short_skipped.load(Ordering::Relaxed)
    );
    let expected = st.dial_expected.lock().unwrap();
    let _ = writeln!(
        out,
        "  failed, node under a fault (expected): {}",
        expected.values().sum::<u64>()
    );
    for ((kind, reply), n) in expected.iter() {
        let _ = writeln!(out, "    {n:6}  {} -> {reply}", kind.label());
    }
    let unexpected = st.dial_unexpected.lock().unwrap();
    let _ = writeln!(
        out,
        "  failed, node healthy (must be 0): {}",
        unexpected.len()
    );
    for f in unexpected.iter().take(20) {
        let _ = writeln!(
            out,
            "    at {:.1}s node-{}: {} (overlapping: {})",
            f.at.as_secs_f64(),
            f.node,
            f.error,
            f.overlapped.map(|k| k.label()).unwrap_or("no fault")
        );
    }
    if !unexpected.is_empty() {
        failures.push(format!(
            "{} dial(s) to healthy nodes failed",
            unexpected.len()
        ));
    }
    let _ = writeln!(out, "\nstreams");
    let _ = writeln!(
        out,
        "  long-lived opened {} / closed cleanly {}",
        st.long_opened.load(Ordering::Relaxed),
        st.long_closed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "  stalled readers: {} stalls, none may die",
        st.stalls.load(Ordering::Relaxed)
    );
    let mut by_cause: BTreeMap<(bool, StreamKind, String, String), u64> = BTreeMap::new();
    for d in deaths.iter() {
        let cause = match (d.expected, d.overlapped) {
            (Some(k), _) => k.label().to_string(),
            (None, Some(k)) => format!("UNEXPECTED (during {})", k.label()),
            (None, None) => "UNEXPECTED (no fault)".to_string(),
        };
        let what = d.error.split(':').next().unwrap_or("").to_string();
        *by_cause
            .entry((d.expected.is_some(), d.kind, cause, what))
            .or_default() += 1;
    }
    let _ = writeln!(
        out,
        "  died: {} ({} expected, {} unexpected)",
        deaths.len(),
        deaths.iter().filter(|d| d.expected.is_some()).count(),
        deaths.iter().filter(|d| d.expected.is_none()).count()
    );
    for ((_, kind, cause, what), n) in by_cause.iter().rev() {
        let _ = writeln!(out, "    {n:6}  {kind:?} stream, {cause}: {what}");
    }
    let bad_deaths: Vec<&Death> = deaths.iter().filter(|d| d.expected.is_none()).collect();
    if !bad_deaths.is_empty() {
        failures.push(format!(
            "{} stream(s) died with no fault to explain it",
            bad_deaths.len()
        ));
    }
    let stalled_deaths = deaths
        .iter()
        .filter(|d| d.kind == StreamKind::Stalled)
        .count();
    if stalled_deaths > 0 {
        failures.push(format!("{stalled_deaths} stalled reader(s) were cut"));
    }
    match relay {
        Some([slowed, blocked, peak]) => {
            let _ = writeln!(
                out,
                "  daemon: {slowed} streams slowed, sessions held {blocked:.1} s in all, relay buffer peak {:.1} MiB",
                peak / (1 << 20) as f64
            );
            if slowed.is_nan() || slowed <= 0.0 {
                failures.push(
                    "no stream was slowed: the stalls never pushed back through the daemon".into(),
                );
            }
        }
        None => failures.push("no metrics at the end of the load".into()),
    }
    if st.stalls.load(Ordering::Relaxed) < STALLED as u64 {
        failures.push("the stalled readers never stalled (run too short?)".into());
    }
    let mism = st.mismatches.load(Ordering::Relaxed);
    if mism > 0 {
        failures.push(format!("{mism} pattern mismatch(es)"));
    }
    let lost = st.lost_outside_faults.load(Ordering::Relaxed);
    if lost > 0 {
        failures.push(format!("{lost} byte(s) lost outside any fault"));
    }
    if st.verified.load(Ordering::Relaxed) == 0 {
        failures.push("no byte verified at all".into());
    }

    let _ = writeln!(
        out,
        "\nfaults ({} events, {} reloads ok)",
        events.len(),
        st.reloads_ok.load(Ordering::Relaxed)
    );
    let mut per_kind: BTreeMap<FaultKind, (u32, f64)> = BTreeMap::new();
    for (s, e, _, k) in &events {
        let v = per_kind.entry(*k).or_default();
        v.0 += 1;
        v.1 = v.1.max((*e - *s).as_secs_f64());
    }
    for k in FAULT_ORDER {
        let (n, worst) = per_kind.get(&k).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:26} x{n:3}  (slowest back to healthy: {worst:.1} s)",
            k.label()
        );
        if n == 0 {
            failures.push(format!("fault {} never ran (run too short?)", k.label()));
        }
    }

    // Resources.
    let during: Vec<&Sample> = samples.iter().filter(|s| s.t <= load_end).collect();
    let warm_max = during
        .iter()
        .filter(|s| s.t <= warm)
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0);
    let late_max = during
        .iter()
        .filter(|s| s.t > warm)
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0);
    let growth = if warm_max > 0 {
        late_max as f64 / warm_max as f64 - 1.0
    } else {
        f64::NAN
    };
    let max_of = |f: fn(&Sample) -> u64| during.iter().map(|s| f(s)).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nresources (daemon pid {pid}; {} samples every {:?})",
        samples.len(),
        plan.sample_every
    );
    let _ = writeln!(
        out,
        "  baseline before load: RSS {:.1} MiB, {} fds, {} tasks",
        mib(base.rss_kib),
        base.fds,
        base.tasks
    );
    let _ = writeln!(
        out,
        "  during load, max: RSS {:.1} MiB, {} fds, {} tasks, {} active streams",
        mib(max_of(|s| s.rss_kib)),
        max_of(|s| s.fds),
        max_of(|s| s.tasks),
        max_of(|s| s.active)
    );
    let _ = writeln!(out, "  RSS: max in the warm-up (first {:.1} min) {:.1} MiB, max after it {:.1} MiB: growth {:+.2} % (limit +5 %)", warm / 60.0, mib(warm_max), mib(late_max), growth * 100.0);
    if growth.is_nan() || growth > 0.05 {
        failures.push(format!(
            "RSS grew {:+.2} % after the warm-up (limit 5 %)",
            growth * 100.0
        ));
    }
    let _ = writeln!(out, "  {}", after.1);
    if !after.0 {
        failures.push(format!(
            "resources did not return to baseline (+{BASELINE_SLACK}) within {SETTLE:?}: {}",
            after.1
        ));
    }

    let _ = writeln!(
        out,
        "\nverdict: {}",
        if failures.is_empty() {
            "PASS".to_string()
        } else {
            format!("FAIL ({} problems)", failures.len())
        }
    );
    for f in &failures {
        let _ = writeln!(out, "  - {f}");
    }

    let mut dl =
        String::from("# every stream that died: seconds, node, kind, class, cause, error\n");
    for d in deaths.iter() {
        let _ = writeln!(
            dl,
            "{:.1}\tnode-{}\t{:?}\t{}\t{}\t{}",
            d.at.as_secs_f64(),
            d.node,
            d.kind,
            if d.expected.is_some() {
                "expected"
            } else {
                "UNEXPECTED"
            },
            d.expected
                .or(d.overlapped)
                .map(|k| k.label())
                .unwrap_or("no fault"),
            d.error
        );
    }
    let mut csv = String::from("seconds,rss_kib,fds,tasks,active_streams,client_long_streams\n");
    for s in samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{},{},{}",
            s.t, s.rss_kib, s.fds, s.tasks, s.active, s.client_open
        );
    }
    let title = format!(
        "tunneler soak: {:.0} min, {} nodes, {} streams, {} dials/s, faults shaded",
        load_end / 60.0,
        plan.nodes,
        plan.streams,
        plan.dials_per_sec
    );
    let svg = plot(samples, &events, warm, load_end, &title);
    for (name, text) in [
        ("summary.txt", &out),
        ("deaths.txt", &dl),
        ("samples.csv", &csv),
        ("soak.svg", &svg),
    ] {
        if let Err(e) = fs::write(plan.out.join(name), text) {
            eprintln!("soak: writing {name}: {e}");
        }
    }
    println!("{out}");
    let _ = io::stdout().flush();
    i32::from(!failures.is_empty())
}
