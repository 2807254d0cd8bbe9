//! The wait between retries of anything that talks to a KRE or a store (the parent daemon's
//! tasks, `audit pull --follow`, `keygate fetch --retries`): exponential from a base to a
//! maximum, each wait moved by a random share so that peers restarted together do not retry in
//! step. It decides only the pacing.

use std::time::Duration;

/// The wait after failed attempts: `base`, doubled after each failure up to `max`, each wait
/// moved by up to ±`jitter_pct` % at random so that restarted peers do not retry in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    jitter_pct: u32,
    failures: u32,
}

impl Backoff {
    pub(crate) const fn new(base: Duration, max: Duration, jitter_pct: u32) -> Self {
        Self { base, max, jitter_pct, failures: 0 }
    }

    /// The wait before the next attempt (counts a failure).
    pub(crate) fn next_wait(&mut self) -> Duration {
        let doubled = 1u32.checked_shl(self.failures).map_or(self.max, |f| self.base.saturating_mul(f));
        self.failures = self.failures.saturating_add(1).min(16);
        jittered(doubled.min(self.max), self.jitter_pct, rand_core::RngCore::next_u32(&mut rand_core::OsRng))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `d` scaled by a factor in [100 − pct, 100 + pct] %, chosen by `random`.
fn jittered(d: Duration, pct: u32, random: u32) -> Duration {
    let pct = pct.min(100);
    let percent = 100 - pct + random % (2 * pct + 1);
    d.saturating_mul(percent) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn jitter_stays_within_its_percentage() {
        let d = MS(1000);
        assert_eq!(jittered(d, 20, 0), MS(800));
        assert_eq!(jittered(d, 20, 40), MS(1200));
        assert_eq!(jittered(d, 20, 41), MS(800));
        assert_eq!(jittered(d, 0, 12345), d);
        for r in [1, 7, 999, u32::MAX] {
            let j = jittered(d, 20, r);
            assert!(MS(800) <= j && j <= MS(1200), "{j:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_maximum_within_the_jitter_and_resets() {
        let mut b = Backoff::new(MS(200), MS(5000), 20);
        let nominal = [200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for n in nominal {
            let w = b.next_wait();
            assert!(MS(n * 8 / 10) <= w && w <= MS(n * 12 / 10), "{w:?} for {n} ms");
        }
        b.reset();
        assert!(b.next_wait() <= MS(240));
    }
}
