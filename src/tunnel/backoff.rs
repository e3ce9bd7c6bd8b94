//! Exponential backoff with full jitter.
//!
//! Full jitter (a uniform delay in `[0, min(max, initial * 2^n)]`) spreads
//! reconnect storms after a control-plane restart or a network blip, so a
//! thousand tunnels do not hit their sshds in lock step. The attempt counter
//! resets after a connection has been stable for a while, so one flap a day
//! does not leave a node on the maximum delay forever.

use std::time::Duration;

use rand::Rng;

/// Backoff state for one node.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A fresh backoff from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `[0, ceiling]`, then the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// The maximum delay, used for rejected nodes: no jitter downwards, so a
    /// changed host key is never retried in a hot loop.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The first delay's ceiling.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// Forget past failures (after a stable connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last reset (the tests' view of the state).
    #[cfg(test)]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_max() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = b.ceiling();
            ceilings.push(ceiling.as_secs());
            let d = b.next_delay();
            assert!(
                d <= ceiling,
                "delay {d:?} over this attempt's ceiling {ceiling:?}"
            );
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            b.next_delay();
        }
        // ceiling is now 3.2s; sample many delays, all in range, not all equal
        let samples: Vec<Duration> = (0..200)
            .map(|_| {
                let mut c = b.clone();
                c.next_delay()
            })
            .collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(3200)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "full jitter should spread delays");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
    }

    #[test]
    fn each_delay_stays_within_its_own_attempts_ceiling() {
        // 10 failures with 1s..4s: each delay lies within its own attempt's
        // ceiling (1, 2, then 4 s), not just under the maximum; attempts
        // count the failures, and a reset starts over.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
        for (attempt, ceiling) in [1, 2, 4, 4, 4, 4, 4, 4, 4, 4].into_iter().enumerate() {
            assert_eq!(b.attempts(), attempt as u32);
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(ceiling),
                "attempt {attempt}: {d:?} over {ceiling}s"
            );
        }
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
