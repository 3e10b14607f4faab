//! Exponential backoff with full jitter: the wait before retry `n` (from 1)
//! is `min(max, base × multiplier^(n-1))`, and with jitter a uniformly random
//! duration between zero and that (AWS's "full jitter", which spreads
//! synchronised clients best).
//!
//! tower's `ExponentialBackoff` is not used: it computes the same cap but
//! its jitter adds a random amount *on top* of the exponential value
//! (`base + rand(0..base)`), which is not full jitter, and it has no
//! multiplier other than 2.

use std::time::Duration;

use rand::Rng;
use trellis_policy::Backoff as Policy;

/// The backoff of one dependency.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    multiplier: f64,
    jitter: bool,
}

impl From<&Policy> for Backoff {
    fn from(p: &Policy) -> Self {
        Self {
            base: p.base.get(),
            max: p.max.get(),
            multiplier: p.multiplier.max(1.0),
            jitter: p.jitter,
        }
    }
}

impl Backoff {
    /// The ceiling for retry `n` (1 = the first retry), before jitter.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The wait before retry `n`.
    pub fn delay(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(n);
        if self.jitter && !ceiling.is_zero() {
            ceiling.mul_f64(rng.random::<f64>())
        } else {
            ceiling
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_policy::Duration as D;

    fn backoff(jitter: bool) -> Backoff {
        Backoff::from(&Policy {
            base: D::from_millis(50),
            max: D::from_secs(1),
            multiplier: 2.0,
            jitter,
        })
    }

    #[test]
    fn grows_by_the_multiplier_up_to_max() {
        let b = backoff(false);
        let got: Vec<u128> = (1..=7).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, [50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
        assert_eq!(b.delay(3, &mut rand::rng()), Duration::from_millis(200));
    }

    #[test]
    fn full_jitter_spreads_between_zero_and_the_ceiling() {
        let b = backoff(true);
        let mut rng = rand::rng();
        let waits: Vec<Duration> = (0..2000).map(|_| b.delay(3, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(200)));
        let low = waits
            .iter()
            .filter(|w| **w < Duration::from_millis(50))
            .count();
        let high = waits
            .iter()
            .filter(|w| **w > Duration::from_millis(150))
            .count();
        // Uniform: about a quarter in each end; not clustered at the top as
        // "ceiling plus jitter" would be.
        assert!((300..700).contains(&low), "{low}");
        assert!((300..700).contains(&high), "{high}");
    }
}
