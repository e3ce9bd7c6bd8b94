//! Client side: dial, echo, source

use crate::*;

/// CONNECT through the Unix egress listener; the error names the reply.
pub(crate) async fn dial(ctx: &Ctx, node: usize, port: u16) -> Result<UnixStream, String> {
    let ip = ctx.ip(node);
    let go = async {
        let mut s = UnixStream::connect(&ctx.egress)
            .await
            .map_err(|e| format!("egress socket: {e}"))?;
        s.write_all(
            format!("CONNECT {ip}:{port} HTTP/1.1\r\nHost: {ip}:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
        // The servers speak only after the client does: nothing follows the
        // head yet, so reading it in chunks is safe.
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("read reply: {e}"))?;
            if n == 0 || head.len() > 8192 {
                return Err(format!(
                    "no complete reply: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if line.starts_with("HTTP/1.1 200") {
            Ok(s)
        } else {
            Err(format!("{}: {line}", line.get(9..12).unwrap_or("reply")))
        }
    };
    match tokio::time::timeout(DIAL_TIMEOUT, go).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout: no reply within {DIAL_TIMEOUT:?}")),
    }
}

/// Reads `len` echoed bytes of `seed` from offset `off`, checking each
/// read as it arrives; counts what matched.
pub(crate) async fn read_echo(
    ctx: &Ctx,
    s: &mut UnixStream,
    seed: u64,
    off: u64,
    len: usize,
) -> Result<(), String> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = match tokio::time::timeout(OP_TIMEOUT, s.read(&mut buf[got..])).await {
            Err(_) => return Err(format!("timeout: no echo for {OP_TIMEOUT:?}")),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Ok(Ok(0)) => return Err("EOF: closed before the echo was back".into()),
            Ok(Ok(n)) => n,
        };
        if let Some(at) = pattern::check(seed, off + got as u64, &buf[got..got + n]) {
            ctx.stats.mismatches.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "MISMATCH: echoed byte {at} is not the pattern (seed {seed:#x})"
            ));
        }
        ctx.stats.verified.fetch_add(n as u64, Ordering::Relaxed);
        got += n;
    }
    Ok(())
}

/// Half-closes and waits for the far side's EOF with nothing extra.
pub(crate) async fn finish(s: &mut UnixStream) -> Result<(), String> {
    s.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
    let mut extra = [0u8; 256];
    match tokio::time::timeout(OP_TIMEOUT, s.read(&mut extra)).await {
        Err(_) => Err("timeout: no EOF after half-close".into()),
        Ok(Err(e)) => Err(format!("read after half-close: {e}")),
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(n)) => Err(format!("MISMATCH: {n} byte(s) after the last echo")),
    }
}

/// One long-lived echo stream slot: dials, exchanges until its life ends
/// or the load stops, closes, and starts over.
pub(crate) async fn long_stream(ctx: Arc<Ctx>, id: usize, stop: CancellationToken) {
    let nodes = ctx.plan.config_nodes();
    let node = id % nodes + 1;
    let mut j = Jitter(0x9e37_79b9 ^ (id as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1));
    // Spread the first dials over a few seconds.
    let spread = Duration::from_secs(10).min(ctx.plan.warmup / 2);
    tokio::select! {
        _ = tokio::time::sleep(spread.mul_f64((j.next() % 1000) as f64 / 1000.0)) => {}
        _ = stop.cancelled() => return,
    }
    while !stop.is_cancelled() {
        if ctx.faults.refusing(node) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        let t = Instant::now();
        let mut s = match dial(&ctx, node, ECHO_PORT).await {
            Ok(s) => s,
            Err(e) => {
                ctx.dial_failed(node, t, e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        ctx.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
        ctx.stats.long_opened.fetch_add(1, Ordering::Relaxed);
        ctx.stats.long_open.fetch_add(1, Ordering::Relaxed);
        let seed = next_seed();
        let end = Instant::now() + j.around(ctx.plan.stream_life);
        let mut off = 0u64;
        let mut last_ok = Instant::now();
        let result: Result<(), (String, u64)> = loop {
            if stop.is_cancelled() || Instant::now() >= end {
                break finish(&mut s).await.map_err(|e| (e, 0));
            }
            let len = 256 + (j.next() % 1793) as usize;
            let mut msg = vec![0u8; len];
            pattern::fill(seed, off, &mut msg);
            match tokio::time::timeout(OP_TIMEOUT, s.write_all(&msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Err((format!("write: {e}"), 0)),
                Err(_) => break Err((format!("timeout: write blocked {OP_TIMEOUT:?}"), 0)),
            }
            ctx.stats.sent.fetch_add(len as u64, Ordering::Relaxed);
            if let Err(e) = read_echo(&ctx, &mut s, seed, off, len).await {
                break Err((e, len as u64));
            }
            off += len as u64;
            last_ok = Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(j.around(Duration::from_secs(1))) => {}
                _ = stop.cancelled() => {}
            }
        };
        ctx.stats.long_open.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                ctx.stats.long_closed.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, unechoed)) => {
                let lost = if ctx.died(node, StreamKind::Long, last_ok, e) {
                    &ctx.stats.lost_in_expected_deaths
                } else {
                    &ctx.stats.lost_outside_faults
                };
                lost.fetch_add(unechoed, Ordering::Relaxed);
            }
        }
    }
}

/// One short dial: CONNECT, one checked echo, half-close, EOF.
pub(crate) async fn short_dial(ctx: Arc<Ctx>, node: usize, size: usize) {
    let t = Instant::now();
    let mut s = match dial(&ctx, node, ECHO_PORT).await {
        Ok(s) => s,
        Err(e) => return ctx.dial_failed(node, t, e),
    };
    ctx.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
    let seed = next_seed();
    let mut msg = vec![0u8; size];
    pattern::fill(seed, 0, &mut msg);
    let r = async {
        s.write_all(&msg).await.map_err(|e| format!("write: {e}"))?;
        ctx.stats.sent.fetch_add(size as u64, Ordering::Relaxed);
        read_echo(&ctx, &mut s, seed, 0, size).await?;
        finish(&mut s).await
    }
    .await;
    match r {
        Ok(()) => {
            ctx.stats.short_ok.fetch_add(1, Ordering::Relaxed);
        }
        // A dial that got 200 and then failed is a stream that died.
        Err(e) => {
            ctx.died(node, StreamKind::Short, t, e);
        }
    }
}

/// The short-dial clock: `dials_per_sec` dials, round robin over all nodes.
pub(crate) async fn dialer(ctx: Arc<Ctx>, stop: CancellationToken) {
    let period = Duration::from_secs_f64(1.0 / ctx.plan.dials_per_sec);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = Arc::new(tokio::sync::Semaphore::new(1000));
    let mut tasks = tokio::task::JoinSet::new();
    let mut j = Jitter(0x005e_ed0f_d1a1);
    let mut k = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let node = k % ctx.plan.nodes + 1;
        k += 1;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.stats.short_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let size = 64 + (j.next() % 960) as usize;
        let c = ctx.clone();
        tasks.spawn(async move {
            short_dial(c, node, size).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// A stalled reader on `node`: reads a paced source and checks every byte,
/// but stops reading for `stall_for` on the schedule, then resumes.
pub(crate) async fn stalled_reader(ctx: Arc<Ctx>, node: usize, stop: CancellationToken) {
    let t = Instant::now();
    let s = match dial(&ctx, node, SOURCE_PORT).await {
        Ok(s) => s,
        Err(e) => return ctx.dial_failed(node, t, e),
    };
    ctx.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
    let mut last_ok = Instant::now();
    if let Err(e) = stalled_reads(&ctx, s, node, &stop, &mut last_ok).await {
        ctx.died(node, StreamKind::Stalled, last_ok, e);
    }
}

pub(crate) async fn stalled_reads(
    ctx: &Ctx,
    mut s: UnixStream,
    node: usize,
    stop: &CancellationToken,
    last_ok: &mut Instant,
) -> Result<(), String> {
    let plan = &ctx.plan;
    let seed = next_seed();
    let mut req = [0u8; 16];
    req[..8].copy_from_slice(&STALL_RATE.to_le_bytes());
    req[8..].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)
        .await
        .map_err(|e| format!("write request: {e}"))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    // Stalls start at stall_first (in the warm-up) and repeat.
    let mut next_stall = ctx.t0 + plan.stall_first + Duration::from_millis(700 * node as u64);
    loop {
        if Instant::now() >= next_stall {
            ctx.stats.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(plan.stall_for) => {}
                _ = stop.cancelled() => return Ok(()),
            }
            next_stall += plan.stall_every;
            *last_ok = Instant::now();
        }
        let wake = tokio::time::Instant::from_std(next_stall);
        let n = tokio::select! {
            r = tokio::time::timeout(OP_TIMEOUT, s.read(&mut buf)) => r,
            _ = tokio::time::sleep_until(wake) => continue,
            _ = stop.cancelled() => return Ok(()),
        };
        let n = match n {
            Err(_) => return Err(format!("timeout: no byte for {OP_TIMEOUT:?}")),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Ok(Ok(0)) => return Err("EOF: source closed".into()),
            Ok(Ok(n)) => n,
        };
        if let Some(at) = pattern::check(seed, off, &buf[..n]) {
            ctx.stats.mismatches.fetch_add(1, Ordering::Relaxed);
            return Err(format!("MISMATCH: source byte {at} is not the pattern"));
        }
        off += n as u64;
        ctx.stats.verified.fetch_add(n as u64, Ordering::Relaxed);
        ctx.stats.stall_bytes.fetch_add(n as u64, Ordering::Relaxed);
        *last_ok = Instant::now();
    }
}

/// The whole client load until `stop`; returns once every stream closed.
pub(crate) async fn load(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..ctx.plan.streams {
        tasks.spawn(long_stream(ctx.clone(), id, stop.clone()));
    }
    for node in 1..=STALLED {
        tasks.spawn(stalled_reader(ctx.clone(), node, stop.clone()));
    }
    tasks.spawn(dialer(ctx.clone(), stop.clone()));
    stop.cancelled().await;
    // Every stream closes itself (half-close, EOF) once stopped; a bound
    // in case one hangs, which is then reported.
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(120), all_done)
        .await
        .is_err()
    {
        ctx.stats.error(
            ctx.t0,
            format!(
                "{} load tasks still running 120 s after the stop",
                tasks.len()
            ),
        );
        tasks.abort_all();
    }
}
