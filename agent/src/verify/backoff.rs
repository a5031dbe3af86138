//! The retry schedule of a verification: how long to wait between attempts.
//!
//! Guarantees: the schedule is pure arithmetic on [`Duration`]s, so it is
//! tested without sleeping. The first wait is `backoff`, each next wait
//! doubles, no wait exceeds `max_backoff`, and nothing overflows: huge
//! settings saturate at the cap instead of panicking. Jitter spreads a wait
//! over ±20% so that many targets reloaded together do not probe in lockstep,
//! and it never pushes a wait above `max_backoff`. The only waiting done here
//! is [`sleep_or_cancel`], which gives up as soon as its token is cancelled
//! (shutdown, or a newer deploy of the same target).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often and how patiently to try: `[target.verify]` `attempts`,
/// `backoff` and `max_backoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Attempts in total, the first included; 0 behaves like 1.
    pub attempts: u32,
    /// The wait after the first failed attempt.
    pub backoff: Duration,
    /// No wait is longer than this, whatever the doubling gives.
    pub max_backoff: Duration,
}

impl Schedule {
    /// The wait after attempt number `after_attempt` (1-based) before the
    /// next one, without jitter; `None` when that attempt was the last (or
    /// for attempt 0, which does not exist). The wait after attempt `n` is
    /// `backoff × 2^(n-1)`, capped at `max_backoff`.
    pub fn base_delay(&self, after_attempt: u32) -> Option<Duration> {
        if after_attempt == 0 || after_attempt >= self.attempts {
            return None;
        }
        let doubled = 2u32
            .checked_pow(after_attempt - 1)
            .and_then(|factor| self.backoff.checked_mul(factor))
            .unwrap_or(Duration::MAX);
        Some(doubled.min(self.max_backoff))
    }

    /// Every wait of the schedule in order, without jitter: one fewer than
    /// there are attempts.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let schedule = *self;
        (1..schedule.attempts).filter_map(move |n| schedule.base_delay(n))
    }
}

/// `base` spread by ±20%: `base × (0.8 + 0.4·unit)`, then capped at `max`.
/// `unit` is a number in `[0, 1)`; anything outside is clamped into it (a NaN
/// counts as 0), so the result always lies in `[0.8·base, 1.2·base)` and never
/// above `max`. Integer arithmetic, so float rounding cannot reach 1.2×.
pub fn jittered(base: Duration, max: Duration, unit: f64) -> Duration {
    /// `unit` is quantized to `STEPS` steps: plenty for waits of seconds.
    const STEPS: u128 = 1 << 20;
    // The float-to-int cast saturates and maps NaN to 0.
    let step = ((unit * STEPS as f64) as u128).min(STEPS - 1);
    // base × (4/5 + 2/5 · step/STEPS), without overflow: base is below
    // 2^94 ns, the factor below 2^23.
    let nanos = base.as_nanos() * (4 * STEPS + 2 * step) / (5 * STEPS);
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    let spread = if secs == u64::MAX {
        Duration::MAX
    } else {
        Duration::new(secs, subsec)
    };
    spread.min(max)
}

/// [`jittered`] with a random `unit`.
pub fn jitter(base: Duration, max: Duration) -> Duration {
    jittered(base, max, rand::random::<f64>())
}

/// Waits `d`, or less when `cancel` fires first. Returns `true` when the
/// whole wait elapsed, `false` when it was cancelled (also when the token was
/// already cancelled: then it returns at once).
pub async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn schedule(attempts: u32, backoff: Duration, max_backoff: Duration) -> Schedule {
        Schedule {
            attempts,
            backoff,
            max_backoff,
        }
    }

    #[test]
    fn doubles_from_backoff_up_to_the_cap() {
        let s = schedule(7, S, 16 * S);
        let got: Vec<Duration> = s.delays().collect();
        assert_eq!(got, [S, 2 * S, 4 * S, 8 * S, 16 * S, 16 * S]);
        assert_eq!(s.base_delay(1), Some(S));
        assert_eq!(s.base_delay(5), Some(16 * S));
        assert_eq!(s.base_delay(6), Some(16 * S));
        assert_eq!(s.base_delay(7), None, "no wait after the last attempt");
        assert_eq!(s.base_delay(8), None);
        assert_eq!(s.base_delay(0), None, "attempts are numbered from 1");
    }

    #[test]
    fn the_contract_defaults() {
        // attempts = 3, backoff = "1s", max_backoff = "16s"
        let got: Vec<Duration> = schedule(3, S, 16 * S).delays().collect();
        assert_eq!(got, [S, 2 * S]);
    }

    #[test]
    fn one_attempt_or_none_never_waits() {
        for attempts in [0, 1] {
            let s = schedule(attempts, S, 16 * S);
            assert_eq!(s.delays().count(), 0, "attempts = {attempts}");
            assert_eq!(s.base_delay(1), None);
        }
    }

    #[test]
    fn the_cap_wins_over_a_larger_backoff() {
        let got: Vec<Duration> = schedule(3, 10 * S, 4 * S).delays().collect();
        assert_eq!(got, [4 * S, 4 * S]);
    }

    #[test]
    fn zero_backoff_means_no_waiting() {
        let got: Vec<Duration> = schedule(4, Duration::ZERO, 16 * S).delays().collect();
        assert_eq!(got, [Duration::ZERO; 3]);
    }

    #[test]
    fn huge_values_saturate_at_the_cap() {
        let s = schedule(u32::MAX, Duration::MAX, Duration::MAX);
        assert_eq!(s.base_delay(1), Some(Duration::MAX));
        assert_eq!(s.base_delay(2), Some(Duration::MAX));
        assert_eq!(s.base_delay(40), Some(Duration::MAX));
        assert_eq!(s.base_delay(u32::MAX - 1), Some(Duration::MAX));
        assert_eq!(s.base_delay(u32::MAX), None);

        let s = schedule(u32::MAX, S, 3600 * S);
        assert_eq!(s.base_delay(33), Some(3600 * S), "2^32 overflows u32");
        assert_eq!(s.base_delay(200), Some(3600 * S));
        assert_eq!(s.delays().take(1000).last(), Some(3600 * S));
    }

    #[test]
    fn jitter_spreads_by_twenty_percent() {
        let base = 10 * S;
        let max = 60 * S;
        assert_eq!(jittered(base, max, 0.0), 8 * S);
        assert_eq!(jittered(base, max, 0.25), 9 * S);
        assert_eq!(jittered(base, max, 0.5), base);
        for unit in [-1.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(jittered(base, max, unit), 8 * S, "{unit}");
        }
        for unit in [1.0 - f64::EPSILON, 1.0, 7.0, f64::INFINITY] {
            let top = jittered(base, max, unit);
            assert!(top < 12 * S && top > 11_999 * S / 1000, "{unit}: {top:?}");
        }
        let ns = Duration::from_nanos(1);
        assert_eq!(jittered(ns, max, 0.99), ns, "rounds down, never up");
    }

    #[test]
    fn jitter_never_exceeds_the_cap() {
        let max = 16 * S;
        assert_eq!(jittered(16 * S, max, 0.99), max);
        assert_eq!(jittered(15 * S, max, 0.99), max);
        assert_eq!(jittered(Duration::MAX, max, 0.99), max);
        let huge = jittered(Duration::MAX, Duration::MAX, 0.99);
        assert!(
            huge > Duration::MAX / 2,
            "saturates or scales, never panics: {huge:?}"
        );
        assert_eq!(jittered(Duration::ZERO, max, 0.99), Duration::ZERO);
    }

    #[test]
    fn random_jitter_stays_in_bounds() {
        let base = 4 * S;
        for _ in 0..1000 {
            let d = jitter(base, 16 * S);
            assert!(d >= base * 4 / 5 && d < base * 6 / 5, "{d:?}");
            assert!(jitter(16 * S, 16 * S) <= 16 * S);
        }
    }

    #[tokio::test]
    async fn a_cancelled_wait_returns_false_promptly() {
        let cancel = CancellationToken::new();
        let waiter = {
            let cancel = cancel.clone();
            tokio::spawn(async move { sleep_or_cancel(Duration::from_secs(3600), &cancel).await })
        };
        tokio::task::yield_now().await;
        cancel.cancel();
        let finished = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(!finished.expect("returns promptly").expect("task"));
    }

    #[tokio::test]
    async fn an_already_cancelled_token_does_not_wait() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let started = std::time::Instant::now();
        assert!(!sleep_or_cancel(Duration::from_secs(3600), &cancel).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn an_uncancelled_wait_completes() {
        let cancel = CancellationToken::new();
        assert!(sleep_or_cancel(Duration::from_millis(1), &cancel).await);
        assert!(sleep_or_cancel(Duration::ZERO, &cancel).await);
    }
}
