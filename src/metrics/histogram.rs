//! A fixed-bucket histogram of seconds, and the buckets job timings use.
//!
//! Plain data: the owner keeps it behind a lock. Counts are stored per bucket
//! and made cumulative only when exported, as Prometheus wants them.

/// Upper bounds (seconds) for job timings: from a tiny model on a GPU (tens of
/// milliseconds) to SD-1.5 at 512×512 on a CPU (minutes), 0.05 s to 600 s.
pub const JOB_SECONDS_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the `+Inf` bucket; not cumulative.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// `bounds` must be sorted ascending.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must ascend");
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    /// Records one value: it falls in the first bucket whose bound is at least
    /// the value (`le` is inclusive).
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// `(upper bound, values at or below it)`, ending with `(+∞, count)`.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let bounds = self.bounds.iter().copied().chain(std::iter::once(f64::INFINITY));
        bounds.zip(self.counts.iter().scan(0, |acc, n| {
            *acc += n;
            Some(*acc)
        }))
    }
}
