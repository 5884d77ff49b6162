//! When to apply a change of plan: at once when it comes alone, batched when changes come
//! faster than HAProxy should be asked to change.
//!
//! Passes of runtime commands are rate-limited by a token bucket (the generic cell rate
//! algorithm): the bucket holds [`BURST`] passes and gains one every [`INTERVAL`]. A change that
//! finds a pass in the bucket is applied as soon as it arrives, so a lone change, or a few
//! changes in a row (a deregistration followed by a registration, a registration followed by a
//! route), each reach HAProxy in the time of one pass. Once the bucket is empty, a change waits
//! for the next pass to come in (at most [`INTERVAL`] after the last pass started), and every
//! change that arrives meanwhile joins it in one pass. So under churn HAProxy gets at most one
//! pass per [`INTERVAL`] on average (plus the initial burst), and no change waits longer than
//! [`INTERVAL`].

use std::time::Duration;

use tokio::time::Instant;

/// The average time between two passes under churn, and so the longest a change waits.
pub const INTERVAL: Duration = Duration::from_millis(20);
/// How many passes may follow each other without waiting, after a quiet period.
pub const BURST: u32 = 3;

/// The pass budget: when the bucket would be full again (the theoretical arrival time of the
/// generic cell rate algorithm).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    interval: Duration,
    burst: u32,
    /// `None`: full.
    full_at: Option<Instant>,
}

impl Budget {
    pub fn new(interval: Duration, burst: u32) -> Budget {
        Budget {
            interval,
            burst: burst.max(1),
            full_at: None,
        }
    }

    /// When changes pending since `first` may be applied.
    pub fn apply_at(&self, first: Instant) -> Instant {
        match self.full_at {
            None => first,
            Some(full) => {
                // A pass is in the bucket once it is no more than `burst - 1` passes from full.
                let slack = self.interval * (self.burst - 1);
                first.max(full.checked_sub(slack).unwrap_or(first))
            }
        }
    }

    /// Takes a pass out of the bucket at `now`.
    pub fn spend(&mut self, now: Instant) {
        let from = self.full_at.map_or(now, |full| full.max(now));
        self.full_at = Some(from + self.interval);
    }
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::new(INTERVAL, BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + MS * ms as u32
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_change_applies_at_once() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        assert_eq!(b.apply_at(at(t0, 100)), at(t0, 100));
        b.spend(at(t0, 100));
        // Long after, or right after: the bucket still holds passes.
        assert_eq!(b.apply_at(at(t0, 500)), at(t0, 500));
        assert_eq!(b.apply_at(at(t0, 101)), at(t0, 101));
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_changes_in_a_row_each_apply_at_once_then_they_wait() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        for ms in 0..u64::from(BURST) {
            assert_eq!(b.apply_at(at(t0, ms)), at(t0, ms), "change {ms}");
            b.spend(at(t0, ms));
        }
        // The bucket is empty: the next pass comes one interval after the first.
        assert_eq!(b.apply_at(at(t0, 3)), at(t0, 20));
        b.spend(at(t0, 20));
        assert_eq!(b.apply_at(at(t0, 21)), at(t0, 40));
    }

    /// Runs changes arriving at `arrivals` (ms) through the policy; returns the pass times.
    fn passes(t0: Instant, arrivals: &[u64]) -> Vec<Instant> {
        let mut budget = Budget::default();
        let mut last_pass: Option<Instant> = None;
        let mut pending: Option<Instant> = None;
        let mut passes = Vec::new();
        let end = arrivals.last().copied().unwrap_or(0) + 100;
        for ms in 0..=end {
            let now = at(t0, ms);
            if arrivals.contains(&ms) {
                pending.get_or_insert(now);
            }
            if let Some(first) = pending.filter(|f| budget.apply_at(*f) <= now) {
                assert!(
                    now - first <= INTERVAL,
                    "a change waited longer than the interval"
                );
                if let Some(last) = last_pass {
                    assert!(now > last);
                }
                passes.push(now);
                budget.spend(now);
                last_pass = Some(now);
                pending = None;
            }
        }
        passes
    }

    #[tokio::test(start_paused = true)]
    async fn steady_churn_is_batched() {
        // A change every 5 ms for 200 ms: after the first few, one pass per interval.
        let t0 = Instant::now();
        let arrivals: Vec<u64> = (0..200).step_by(5).collect();
        let p = passes(t0, &arrivals);
        assert_eq!(p[0], t0, "the first change goes at once");
        assert!(
            p.len() <= 200 / INTERVAL.as_millis() as usize + BURST as usize,
            "{p:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_slower_than_the_interval_each_go_at_once() {
        let t0 = Instant::now();
        let arrivals: Vec<u64> = (0..250).step_by(25).collect();
        let p = passes(t0, &arrivals);
        let expected: Vec<Instant> = arrivals.iter().map(|ms| at(t0, *ms)).collect();
        assert_eq!(p, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn churn_at_80_a_second_costs_at_most_50_passes_a_second() {
        let t0 = Instant::now();
        let arrivals: Vec<u64> = (0..80).map(|i| i * 1000 / 80).collect();
        let p = passes(t0, &arrivals);
        assert!(
            p.len() <= 50 + BURST as usize,
            "{} passes for 80 changes in a second",
            p.len()
        );
        assert!(
            p.len() >= 40,
            "{} passes: changes were held back more than needed",
            p.len()
        );
    }
}
