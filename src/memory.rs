//! Giving freed memory back to the system.
//!
//! The daemon uses glibc's malloc. Against mimalloc it holds idle tunnels
//! in far less memory: at 5000 idle nodes, 79 KiB of RSS per tunnel (397
//! MiB in all) against 120 KiB (601 MiB) for mimalloc without huge pages,
//! and 139 KiB with them. Each tunnel's long-lived state is a few dozen
//! small allocations, and glibc packs them densely.
//!
//! glibc's weakness is the other side: memory freed in the middle of a
//! per-thread arena stays with the process. Bursts of streams (relay
//! buffers, SSH packets) leave such holes, and over hours of churn RSS
//! crept up by 10 to 36 % with no leak (docs/soak.md). `malloc_trim(0)`
//! hands every whole free page of every arena back. [`trim_loop`] calls it
//! on a blocking thread now and then, and only after streams have come and
//! gone since the last call: an idle daemon does nothing.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often freed memory is handed back, at most.
///
/// A trim holds each arena's lock while it walks that arena, so a shard
/// allocating there waits for it. Under the soak's load a trim took p50
/// 0.32 ms and at most 1.8 ms (at ~65 MiB of RSS), so every 5 s costs
/// little; the one after 1000 streams closed at once took 10 ms. Every 30 s was not enough: over 30 minutes of churn the RSS
/// maxima jittered by ±5 % around a plateau of 71-73 MiB; at 5 s the
/// 5-minute means fell instead, from 66 to 62 MiB (docs/soak.md).
pub const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Hands freed memory back to the system; how long it took.
pub fn trim() -> Duration {
    let t0 = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no arguments to get wrong; it takes glibc's
    // own arena locks like any malloc call.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    t0.elapsed()
}

/// Every `every`, trims once if `churn` (a counter of streams, say) moved
/// since the last look. Runs until `cancel`.
pub async fn trim_loop(every: Duration, churn: impl Fn() -> u64, cancel: CancellationToken) {
    run(every, churn, trim, cancel).await
}

async fn run<T>(every: Duration, churn: impl Fn() -> u64, trim: T, cancel: CancellationToken)
where
    T: Fn() -> Duration + Clone + Send + 'static,
{
    let mut seen = churn();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = churn();
        if now == seen {
            continue;
        }
        seen = now;
        if let Ok(took) = tokio::task::spawn_blocking(trim.clone()).await {
            debug!(?took, "freed memory handed back to the system");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn trims_once_per_period_with_churn_never_when_idle() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let streams = Arc::new(AtomicU64::new(0));
        let trims = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (s, t) = (streams.clone(), trims.clone());
        let task = tokio::spawn(run(
            Duration::from_secs(10),
            move || s.load(Ordering::Relaxed),
            move || {
                t.fetch_add(1, Ordering::Relaxed);
                Duration::ZERO
            },
            cancel.clone(),
        ));
        let step = |secs| tokio::time::sleep(Duration::from_secs(secs));
        // Idle for three periods: nothing to give back.
        step(35).await;
        assert_eq!(trims.load(Ordering::Relaxed), 0);
        // Streams come and go several times within one period: one trim.
        for _ in 0..5 {
            streams.fetch_add(1, Ordering::Relaxed);
        }
        step(10).await;
        assert_eq!(trims.load(Ordering::Relaxed), 1);
        // Idle again.
        step(30).await;
        assert_eq!(trims.load(Ordering::Relaxed), 1);
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the loop ends when cancelled")
            .unwrap();
    }

    #[test]
    fn trim_returns_without_harm() {
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 << 10]).collect();
        drop(v);
        assert!(trim() < Duration::from_secs(5));
    }
}
