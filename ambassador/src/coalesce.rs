//! When to apply a change of plan: at once when it comes alone, batched when changes come in a
//! burst.
//!
//! A lone change (none came in the `window` before it) is applied as soon as it arrives: one
//! membership change reaches HAProxy in the time of one pass of runtime commands. A change that
//! follows another within `window` is part of a burst (a rolling deploy, churn): the owner
//! keeps collecting while changes keep arriving within `window` of each other, and applies
//! them in one pass once `window` passes without one, or `cap` after the first of them,
//! whichever comes first. So a burst costs HAProxy one pass per `cap` at most, and no change
//! waits longer than `cap`.

use std::time::Duration;

use tokio::time::Instant;

/// A lone change ends a quiet period this long; within a burst, this long without a change
/// ends the burst.
pub const WINDOW: Duration = Duration::from_millis(2);
/// The longest a change waits while a burst goes on.
pub const CAP: Duration = Duration::from_millis(20);

/// Changes received and not yet applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// When the first of them arrived.
    pub first: Instant,
    /// When the latest arrived.
    pub last: Instant,
}

impl Pending {
    pub fn new(at: Instant) -> Self {
        Pending {
            first: at,
            last: at,
        }
    }

    /// Another change arrived at `at`.
    pub fn add(&mut self, at: Instant) {
        self.last = self.last.max(at);
    }
}

/// When to apply `pending`, given when the change before it (already applied) arrived.
pub fn apply_at(
    pending: Pending,
    previous: Option<Instant>,
    window: Duration,
    cap: Duration,
) -> Instant {
    let alone = previous.is_none_or(|p| pending.first.saturating_duration_since(p) >= window);
    if alone && pending.last == pending.first {
        return pending.first;
    }
    (pending.last + window).min(pending.first + cap)
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
        let p = Pending::new(at(t0, 100));
        assert_eq!(apply_at(p, None, WINDOW, CAP), at(t0, 100));
        // The previous change is long past.
        assert_eq!(apply_at(p, Some(at(t0, 50)), WINDOW, CAP), at(t0, 100));
        assert_eq!(apply_at(p, Some(at(t0, 98)), WINDOW, CAP), at(t0, 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_right_after_another_waits_for_the_burst_to_end() {
        let t0 = Instant::now();
        let p = Pending::new(at(t0, 100));
        assert_eq!(apply_at(p, Some(at(t0, 99)), WINDOW, CAP), at(t0, 102));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_arriving_together_are_collected_until_quiet() {
        let t0 = Instant::now();
        let mut p = Pending::new(at(t0, 100));
        p.add(at(t0, 101));
        assert_eq!(apply_at(p, None, WINDOW, CAP), at(t0, 103));
        p.add(at(t0, 102));
        assert_eq!(apply_at(p, None, WINDOW, CAP), at(t0, 104));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_goes_on_is_applied_at_the_cap() {
        let t0 = Instant::now();
        let mut p = Pending::new(at(t0, 100));
        for ms in 101..=130 {
            p.add(at(t0, ms));
        }
        assert_eq!(apply_at(p, Some(at(t0, 99)), WINDOW, CAP), at(t0, 120));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_churn_is_batched() {
        // A change every millisecond for 100 ms: passes happen at most every CAP.
        let t0 = Instant::now();
        let mut previous = None;
        let mut pending: Option<Pending> = None;
        let mut passes = Vec::new();
        for ms in 0..100u64 {
            let now = at(t0, ms);
            match &mut pending {
                Some(p) => p.add(now),
                None => pending = Some(Pending::new(now)),
            }
            if let Some(p) = pending.filter(|p| apply_at(*p, previous, WINDOW, CAP) <= now) {
                passes.push(now);
                previous = Some(p.last);
                pending = None;
            }
        }
        assert!(
            passes.len() <= 100 / CAP.as_millis() as usize + 1,
            "{passes:?}"
        );
        assert_eq!(passes[0], t0, "the first change goes at once");
        assert_eq!(passes[1], at(t0, 21), "the next ones wait for the cap");
    }
}
