//! Latency samples and their summaries: percentiles by nearest rank, medians, ratios.

use std::time::Duration;

use serde::Serialize;

/// Latencies recorded in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    nanos: Vec<u64>,
}

impl Samples {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, d: Duration) {
        self.nanos
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn push_ms(&mut self, ms: f64) {
        self.nanos.push((ms.max(0.0) * 1e6) as u64);
    }

    pub fn extend(&mut self, other: Samples) {
        self.nanos.extend(other.nanos);
    }

    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nanos.is_empty()
    }

    /// Count, mean, p50, p99, p99.9 and max, in milliseconds.
    pub fn summary(&self) -> Summary {
        let mut sorted = self.nanos.clone();
        sorted.sort_unstable();
        let ms = |n: u64| n as f64 / 1e6;
        let mean = if sorted.is_empty() {
            0.0
        } else {
            sorted.iter().map(|&n| n as f64).sum::<f64>() / sorted.len() as f64 / 1e6
        };
        Summary {
            count: sorted.len() as u64,
            mean_ms: mean,
            p50_ms: ms(percentile(&sorted, 50.0)),
            p99_ms: ms(percentile(&sorted, 99.0)),
            p999_ms: ms(percentile(&sorted, 99.9)),
            max_ms: ms(sorted.last().copied().unwrap_or(0)),
        }
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The nearest-rank percentile `q` (0-100] of sorted values; 0 for no values.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // The small epsilon keeps float error (0.999 * 1000 = 999.0000000000001) off the rank.
    let rank = (q * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of values (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[7], 99.9), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2], 0.0), 1);
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut s = Samples::new();
        for ms in [1.0, 2.0, 3.0, 4.0] {
            s.push_ms(ms);
        }
        s.push(Duration::from_millis(10));
        let sum = s.summary();
        assert_eq!(sum.count, 5);
        assert_eq!(sum.p50_ms, 3.0);
        assert_eq!(sum.p99_ms, 10.0);
        assert_eq!(sum.max_ms, 10.0);
        assert!((sum.mean_ms - 4.0).abs() < 1e-9);
        assert_eq!(Samples::new().summary(), Summary::default());
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(ratio(9.0, 10.0), 0.9);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
