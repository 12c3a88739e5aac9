//! Retry schedules: the per-item backoff and the destination backoff.
//!
//! This is the only module that uses the backoff crate (0.4, marked
//! unmaintained by RUSTSEC-2025-0012), so that it can be replaced here alone.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

/// Jitter: each delay is drawn from [d * (1 - f), d * (1 + f)].
const RANDOMIZATION_FACTOR: f64 = 0.3;

/// An exponential schedule with jitter and no limit on elapsed time, so that
/// transient failures are retried forever.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub initial: Duration,
    pub multiplier: f64,
    pub max: Duration,
}

impl Schedule {
    /// Returns the delay before attempt `failures + 1`, after `failures`
    /// consecutive failures (at least 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let interval = Duration::from_secs_f64(base.min(self.max.as_secs_f64()));
        let mut backoff = ExponentialBackoff {
            current_interval: interval,
            initial_interval: self.initial,
            randomization_factor: RANDOMIZATION_FACTOR,
            multiplier: self.multiplier,
            max_interval: self.max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        // With no elapsed-time limit, next_backoff always returns a delay.
        backoff.next_backoff().unwrap_or(interval).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule { initial: Duration::from_secs(2), multiplier: 2.0, max: Duration::from_secs(300) }
    }

    #[test]
    fn delay_grows_with_jitter() {
        for (failures, expected) in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0)] {
            let delay = schedule().delay(failures).as_secs_f64();
            assert!(
                delay >= expected * 0.7 - 1e-9 && delay <= expected * 1.3 + 1e-9,
                "failures={failures} delay={delay}"
            );
        }
    }

    #[test]
    fn delay_is_capped_forever() {
        for failures in [20, 100, 10_000, u32::MAX] {
            assert!(schedule().delay(failures) <= Duration::from_secs(300), "failures={failures}");
        }
    }

    #[test]
    fn delays_vary() {
        let delays: std::collections::HashSet<_> = (0..20).map(|_| schedule().delay(3)).collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }
}
