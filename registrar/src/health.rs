//! The rise/fall state machine: how many probes in a row must pass before an app counts as up,
//! and fail before it counts as down. Pure: probes go in, transitions come out.

use std::fmt;

/// What the registrar believes about the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not enough probes yet to say.
    Starting,
    /// `rise` probes in a row passed: the app is registered.
    Up,
    /// `fall` probes in a row failed: the app is not registered.
    Down,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Starting => "starting",
            Status::Up => "up",
            Status::Down => "down",
        })
    }
}

/// A change of [`Status`], and after how many probes in a row it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Status,
    pub to: Status,
    /// The passes (to `Up`) or failures (to `Down`) in a row that caused it.
    pub after: u32,
}

/// Counts passes and failures in a row against the `rise` and `fall` thresholds.
#[derive(Debug, Clone)]
pub struct Health {
    rise: u32,
    fall: u32,
    status: Status,
    passes: u32,
    failures: u32,
}

impl Health {
    /// `rise` and `fall` are at least 1 (a 0 is taken as 1).
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            status: Status::Starting,
            passes: 0,
            failures: 0,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Records one probe's outcome; returns the transition it caused, if any.
    ///
    /// From `Starting`, the first threshold reached decides: `rise` passes make it `Up`,
    /// `fall` failures make it `Down`. A pass resets the failure count and the other way round.
    pub fn observe(&mut self, passed: bool) -> Option<Transition> {
        let from = self.status;
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if from != Status::Up && self.passes >= self.rise {
                self.status = Status::Up;
                return Some(Transition {
                    from,
                    to: Status::Up,
                    after: self.passes,
                });
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if from != Status::Down && self.failures >= self.fall {
                self.status = Status::Down;
                return Some(Transition {
                    from,
                    to: Status::Down,
                    after: self.failures,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &mut Health, probes: &str) -> Vec<(Status, u32)> {
        probes
            .chars()
            .filter_map(|c| h.observe(c == '+'))
            .map(|t| (t.to, t.after))
            .collect()
    }

    #[test]
    fn rises_after_rise_passes_and_falls_after_fall_failures() {
        let mut h = Health::new(2, 3);
        assert_eq!(h.status(), Status::Starting);
        assert_eq!(run(&mut h, "+"), []);
        assert_eq!(run(&mut h, "+"), [(Status::Up, 2)]);
        assert_eq!(run(&mut h, "++++"), [], "up is reported once");
        assert_eq!(run(&mut h, "--"), []);
        assert_eq!(h.status(), Status::Up);
        assert_eq!(run(&mut h, "-"), [(Status::Down, 3)]);
        assert_eq!(run(&mut h, "----"), [], "down is reported once");
        assert_eq!(run(&mut h, "++"), [(Status::Up, 2)]);
    }

    #[test]
    fn an_interruption_resets_the_streak() {
        let mut h = Health::new(3, 2);
        assert_eq!(run(&mut h, "++-++-++"), []);
        assert_eq!(h.status(), Status::Starting);
        assert_eq!(run(&mut h, "+"), [(Status::Up, 3)]);
        assert_eq!(run(&mut h, "-+-+-+-+"), [], "flapping never reaches fall=2");
        assert_eq!(h.status(), Status::Up);
    }

    #[test]
    fn starting_can_go_down_first() {
        let mut h = Health::new(2, 2);
        let t = h.observe(false);
        assert_eq!(t, None);
        let t = h.observe(false).unwrap();
        assert_eq!((t.from, t.to, t.after), (Status::Starting, Status::Down, 2));
        assert_eq!(run(&mut h, "+-++"), [(Status::Up, 2)]);
    }

    #[test]
    fn thresholds_of_one_react_to_every_probe() {
        let mut h = Health::new(0, 1);
        assert_eq!(
            run(&mut h, "+-+-"),
            [
                (Status::Up, 1),
                (Status::Down, 1),
                (Status::Up, 1),
                (Status::Down, 1)
            ]
        );
    }
}
