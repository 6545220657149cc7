//! A moving average of events per second over the last minute, for gauges
//! such as images per second.
//!
//! Events are counted in one-second buckets (a minute of them at most), so
//! memory stays constant however many events arrive. The rate is the events of
//! the last `WINDOW_S` whole seconds plus the current one, over `WINDOW_S`:
//! a steady stream reads as its true rate, and the gauge falls back to 0 a
//! minute after the last event. In the first minute of a node's life it
//! under-reads (it always divides by the full window).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Length of the window, in seconds.
pub const WINDOW_S: u64 = 60;

pub struct RateWindow {
    start: Instant,
    /// (second since `start`, events in it), oldest first.
    buckets: Mutex<VecDeque<(u64, u64)>>,
}

impl Default for RateWindow {
    fn default() -> Self {
        RateWindow { start: Instant::now(), buckets: Mutex::new(VecDeque::new()) }
    }
}

impl RateWindow {
    /// Counts `n` events now.
    pub fn record(&self, n: u64) {
        self.record_at(self.start.elapsed().as_secs(), n);
    }

    /// Events per second over the window ending now.
    pub fn per_second(&self) -> f64 {
        self.per_second_at(self.start.elapsed().as_secs())
    }

    fn record_at(&self, second: u64, n: u64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.back_mut() {
            Some((s, count)) if *s == second => *count += n,
            _ => buckets.push_back((second, n)),
        }
        while buckets.front().is_some_and(|(s, _)| *s + WINDOW_S < second) {
            buckets.pop_front();
        }
    }

    fn per_second_at(&self, second: u64) -> f64 {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let events: u64 = buckets.iter().filter(|(s, _)| *s + WINDOW_S >= second).map(|(_, n)| n).sum();
        events as f64 / WINDOW_S as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_over_the_last_minute_and_forgets_older_events() {
        let r = RateWindow::default();
        assert_eq!(r.per_second_at(0), 0.0);
        // Two events a second for 60 seconds: 2/s.
        for s in 0..60 {
            r.record_at(s, 2);
        }
        assert_eq!(r.per_second_at(59), 2.0);
        // Nothing more: 60 s later, seconds 0..=59 have left the window.
        assert_eq!(r.per_second_at(119), 2.0 / 60.0, "only second 59 is within 60 s of 119");
        assert_eq!(r.per_second_at(120), 0.0);
        // Old buckets are dropped as new ones arrive.
        r.record_at(1_000, 6);
        assert_eq!(r.buckets.lock().unwrap().len(), 1);
        assert_eq!(r.per_second_at(1_000), 0.1);
    }
}
