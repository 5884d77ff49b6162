//! When to apply a change of plan: at once when it comes alone, batched when changes come
//! faster than HAProxy should be asked to change.
//!
//! A change that arrives when the last pass of runtime commands is at least `interval` old is
//! applied as soon as it arrives: one membership change reaches HAProxy in the time of one
//! pass. A change that arrives sooner (a rolling deploy, churn) waits until `interval` after
//! that pass, collecting every change that comes meanwhile into one pass. So HAProxy gets at
//! most one pass per `interval`, however fast the directory changes, and no change waits
//! longer than `interval`.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest time between two passes, and so the longest a change waits during a burst.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// When to apply changes pending since `first`, given when the last pass started.
pub fn apply_at(first: Instant, last_pass: Option<Instant>, interval: Duration) -> Instant {
    match last_pass {
        Some(pass) => first.max(pass + interval),
        None => first,
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
        assert_eq!(apply_at(at(t0, 100), None, INTERVAL), at(t0, 100));
        // The last pass is long past, or exactly one interval ago.
        assert_eq!(
            apply_at(at(t0, 100), Some(at(t0, 50)), INTERVAL),
            at(t0, 100)
        );
        assert_eq!(
            apply_at(at(t0, 100), Some(at(t0, 80)), INTERVAL),
            at(t0, 100)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_soon_after_a_pass_waits_for_the_interval() {
        let t0 = Instant::now();
        assert_eq!(
            apply_at(at(t0, 100), Some(at(t0, 95)), INTERVAL),
            at(t0, 115)
        );
    }

    /// Runs changes arriving at `arrivals` (ms) through the policy; returns the pass times.
    fn passes(t0: Instant, arrivals: &[u64]) -> Vec<Instant> {
        let mut last_pass = None;
        let mut pending: Option<Instant> = None;
        let mut passes = Vec::new();
        let end = arrivals.last().copied().unwrap_or(0) + 100;
        for ms in 0..=end {
            let now = at(t0, ms);
            if arrivals.contains(&ms) {
                pending.get_or_insert(now);
            }
            if let Some(first) = pending.filter(|f| apply_at(*f, last_pass, INTERVAL) <= now) {
                assert!(
                    now - first <= INTERVAL,
                    "a change waited longer than the interval"
                );
                passes.push(now);
                last_pass = Some(now);
                pending = None;
            }
        }
        passes
    }

    #[tokio::test(start_paused = true)]
    async fn steady_churn_is_batched() {
        // A change every 5 ms for 200 ms: one pass per interval, the first at once.
        let t0 = Instant::now();
        let arrivals: Vec<u64> = (0..200).step_by(5).collect();
        let p = passes(t0, &arrivals);
        assert_eq!(p[0], t0, "the first change goes at once");
        assert_eq!(p[1], at(t0, 20), "the next ones wait for the interval");
        assert!(p.len() <= 200 / INTERVAL.as_millis() as usize + 1, "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_slower_than_the_interval_each_go_at_once() {
        // Changes 25 ms apart, more than the interval: each is a pass of its own, at once.
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
            p.len() <= 51,
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
