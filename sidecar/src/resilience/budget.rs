//! A retry budget like Linkerd's: retries may add at most `ratio` of the
//! original requests of the last ten seconds, plus a floor of
//! `minPerSecond` so that a quiet client can still retry.
//!
//! Why not tower's [`TpsBudget`](tower::retry::budget::TpsBudget), which is
//! the same finagle design? Two reasons, both about the bound this budget
//! exists to guarantee:
//!
//! - it keeps whole tokens, so a retry costs `(1 / ratio) as isize`
//!   deposits, truncated: `ratio: 0.3` allows one retry per 3 requests
//!   (0.33), and `ratio: 0.6` one per request (1.0);
//! - its floor is a reserve of `minPerSecond × ttl` tokens that can all be
//!   spent in the first second, so over a short outage a failing upstream
//!   gets ten seconds' worth of floor at once.
//!
//! Here the ratio part is the same sliding window (ten one-second slots,
//! deposits and withdrawals both expire with their slot) kept in
//! thousandths, so any ratio is exact to 0.001; the floor is a token bucket
//! refilled at `minPerSecond` and holding one second's worth, so over `t`
//! seconds retries never exceed `ratio × requests + minPerSecond × (t + 1)`.
//! It implements tower's [`Budget`] trait.

use std::sync::Mutex;

use tokio::time::{Duration, Instant};
use tower::retry::budget::Budget;

/// Thousandths of a retry.
const UNIT: i64 = 1000;
const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);

struct Inner {
    /// Ratio balance per one-second slot, in thousandths of a retry.
    slots: [i64; SLOTS],
    index: usize,
    slot_start: Instant,
    /// Floor tokens, in thousandths.
    floor: i64,
    floor_at: Instant,
}

/// The budget of one dependency.
pub struct RetryBudget {
    /// Added per original request, in thousandths.
    deposit: i64,
    /// Floor refill per second and capacity, in thousandths.
    floor_rate: i64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ratio, floor) = self.balance();
        f.debug_struct("RetryBudget")
            .field("ratio_balance", &ratio)
            .field("floor_balance", &floor)
            .finish()
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request plus `min_per_second`.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        let now = Instant::now();
        let floor_rate = i64::from(min_per_second) * UNIT;
        Self {
            // Saturating float → int; the policy bounds ratio to [0, 1].
            deposit: (ratio.clamp(0.0, 1000.0) * UNIT as f64).round() as i64,
            floor_rate,
            inner: Mutex::new(Inner {
                slots: [0; SLOTS],
                index: 0,
                slot_start: now,
                floor: floor_rate,
                floor_at: now,
            }),
        }
    }

    fn advance(&self, s: &mut Inner, now: Instant) {
        // Slots: move to the slot `now` falls in, clearing the ones passed.
        let mut passed = now.saturating_duration_since(s.slot_start).as_secs();
        if passed > 0 {
            s.slot_start += SLOT * u32::try_from(passed.min(SLOTS as u64)).unwrap_or(1);
            if passed >= SLOTS as u64 {
                s.slots = [0; SLOTS];
                s.slot_start = now;
            } else {
                while passed > 0 {
                    s.index = (s.index + 1) % SLOTS;
                    s.slots[s.index] = 0;
                    passed -= 1;
                }
            }
        }
        // Floor: refill at floor_rate per second, up to one second's worth.
        let dt = now.saturating_duration_since(s.floor_at);
        let add = (dt.as_micros() as i64).saturating_mul(self.floor_rate) / 1_000_000;
        if add > 0 {
            s.floor = (s.floor + add).min(self.floor_rate);
            s.floor_at = now;
        }
    }

    /// The ratio balance and the floor balance, in retries.
    pub fn balance(&self) -> (f64, f64) {
        let mut s = self.inner.lock().expect("budget lock");
        self.advance(&mut s, Instant::now());
        let sum: i64 = s.slots.iter().sum();
        (sum as f64 / UNIT as f64, s.floor as f64 / UNIT as f64)
    }
}

impl Budget for RetryBudget {
    /// Records one original request.
    fn deposit(&self) {
        let mut s = self.inner.lock().expect("budget lock");
        self.advance(&mut s, Instant::now());
        let i = s.index;
        s.slots[i] += self.deposit;
    }

    /// Takes one retry from the ratio share, else from the floor.
    fn withdraw(&self) -> bool {
        let mut s = self.inner.lock().expect("budget lock");
        self.advance(&mut s, Instant::now());
        let sum: i64 = s.slots.iter().sum();
        if sum >= UNIT {
            let i = s.index;
            s.slots[i] -= UNIT;
            true
        } else if s.floor >= UNIT {
            s.floor -= UNIT;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n < 100_000, "budget never ran out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_is_one_second_worth_and_refills_at_its_rate() {
        let b = RetryBudget::new(0.0, 10);
        assert_eq!(drain(&b), 10, "a fresh budget holds one second of floor");
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(!b.withdraw(), "0.99 of a retry is not a retry");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.withdraw(), "100 ms at 10/s gives one");
        assert!(!b.withdraw());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(drain(&b), 10, "the floor never saves more than one second");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ratio_is_exact_even_when_its_inverse_is_not_whole() {
        for (ratio, requests, retries) in
            [(0.2, 100, 20), (0.3, 100, 30), (0.6, 10, 6), (1.0, 7, 7)]
        {
            let b = RetryBudget::new(ratio, 0);
            for _ in 0..requests {
                b.deposit();
            }
            assert_eq!(drain(&b), retries, "ratio {ratio}");
        }
        // Four requests at 0.3 are 1.2 retries: one, not two.
        let b = RetryBudget::new(0.3, 0);
        for _ in 0..4 {
            b.deposit();
        }
        assert_eq!(drain(&b), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_is_spent_before_the_floor() {
        let b = RetryBudget::new(0.5, 2);
        for _ in 0..4 {
            b.deposit();
        }
        assert_eq!(drain(&b), 4, "2 from the ratio, then 2 from the floor");
        assert_eq!(b.balance(), (0.0, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_withdrawals_expire_after_ten_seconds() {
        let b = RetryBudget::new(1.0, 0);
        for _ in 0..5 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(b.withdraw());
        assert!(b.withdraw());
        // The deposits were made in the slot that starts at 0 s: 9.999 s later
        // they still count, at 10 s they expire.
        tokio::time::advance(Duration::from_millis(6_999)).await;
        assert_eq!(b.balance().0, 3.0);
        tokio::time::advance(Duration::from_millis(1)).await;
        // The two withdrawals (made at 3 s) outlive the deposits: a debt
        // that expires in its turn, as in finagle's budget.
        assert_eq!(b.balance().0, -2.0);
        assert!(!b.withdraw());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(b.balance().0, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_pause_clears_everything() {
        let b = RetryBudget::new(1.0, 0);
        b.deposit();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!b.withdraw());
        b.deposit();
        assert!(b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn under_constant_failure_retries_stay_within_ratio_plus_floor() {
        // 100 requests/s for 5 s, each wanting 2 retries; ratio 0.2, floor 10/s.
        let b = RetryBudget::new(0.2, 10);
        let mut retries = 0;
        for _ in 0..500 {
            b.deposit();
            for _ in 0..2 {
                if b.withdraw() {
                    retries += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // 0.2 × 500 + 10 × (5 + 1) = 160.
        assert!(retries <= 160, "{retries}");
        assert!(retries >= 145, "the budget should be used, got {retries}");
    }
}
