//! Sliding-window maths: how many calls, failures and slow calls the window holds.
//!
//! The breaker never stores an outcome per successful call. It keeps *cumulative* totals
//! ([`Totals`]: calls counted in per-thread shards, failures and slow calls under the lock) and
//! a window remembers just enough history to subtract what has aged out:
//! - [`CountWindow`] remembers the call position of each failure and slow call among the last
//!   `size` calls, so the window is exactly the last `size` recorded calls;
//! - [`TimeWindow`] remembers the totals at the start of each of its buckets, so the window is
//!   exactly the calls recorded in the current bucket and the `buckets - 1` before it.

use std::collections::VecDeque;
use std::ops::Sub;

/// Monotonic totals since the breaker was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Sub for Totals {
    type Output = WindowCounts;

    fn sub(self, earlier: Totals) -> WindowCounts {
        WindowCounts {
            calls: self.calls.saturating_sub(earlier.calls),
            failures: self.failures.saturating_sub(earlier.failures),
            slow: self.slow.saturating_sub(earlier.slow),
        }
    }
}

/// What a window currently holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowCounts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// The last `size` recorded calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    size: u64,
    /// `Totals::calls` when the window was last reset: earlier calls never count.
    base: u64,
    /// Call positions (1-based values of `Totals::calls`) of failures still in the window.
    failures: VecDeque<u64>,
    slow: VecDeque<u64>,
}

impl CountWindow {
    pub(crate) fn new(size: u64, totals: Totals) -> Self {
        Self {
            size,
            base: totals.calls,
            failures: VecDeque::new(),
            slow: VecDeque::new(),
        }
    }

    /// Notes a failed and/or slow call at `position`, the call total that includes it.
    pub(crate) fn record(&mut self, position: u64, failed: bool, slow: bool) {
        if failed {
            self.failures.push_back(position);
        }
        if slow {
            self.slow.push_back(position);
        }
    }

    /// The window's contents given the current totals; forgets what has aged out.
    pub(crate) fn counts(&mut self, totals: Totals) -> WindowCounts {
        let calls = totals.calls.saturating_sub(self.base).min(self.size);
        let oldest_out = totals.calls - calls;
        while self.failures.front().is_some_and(|&p| p <= oldest_out) {
            self.failures.pop_front();
        }
        while self.slow.front().is_some_and(|&p| p <= oldest_out) {
            self.slow.pop_front();
        }
        WindowCounts {
            calls,
            failures: self.failures.len() as u64,
            slow: self.slow.len() as u64,
        }
    }
}

/// The calls recorded in the current bucket and the `buckets - 1` buckets before it.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: usize,
    /// The bucket (epoch) the window was last advanced to.
    epoch: u64,
    /// Totals at the start of each epoch in the window, oldest first; the last is `epoch`'s.
    starts: VecDeque<Totals>,
}

impl TimeWindow {
    pub(crate) fn new(buckets: usize, epoch: u64, totals: Totals) -> Self {
        let mut starts = VecDeque::with_capacity(buckets);
        starts.push_back(totals);
        Self {
            buckets,
            epoch,
            starts,
        }
    }

    /// The epoch the window currently ends in.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves the window to `epoch`. Calls counted in `totals` but not yet in the window are
    /// placed in the bucket that was current; epochs skipped meanwhile start empty.
    pub(crate) fn advance(&mut self, epoch: u64, totals: Totals) {
        if epoch <= self.epoch {
            return;
        }
        let steps = (epoch - self.epoch).min(self.buckets as u64);
        for _ in 0..steps {
            self.starts.push_back(totals);
        }
        while self.starts.len() > self.buckets {
            self.starts.pop_front();
        }
        self.epoch = epoch;
    }

    /// Whether a window advanced to its current epoch holds nothing and nothing new is pending.
    pub(crate) fn is_idle(&self, totals: Totals) -> bool {
        self.starts.front() == Some(&totals)
    }

    /// The window's contents given the current totals.
    pub(crate) fn counts(&self, totals: Totals) -> WindowCounts {
        totals
            - *self
                .starts
                .front()
                .expect("a time window always holds its current bucket")
    }
}

/// Either kind of window, as configured.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn record(&mut self, position: u64, failed: bool, slow: bool) {
        if let Window::Count(window) = self {
            window.record(position, failed, slow);
        }
    }

    pub(crate) fn counts(&mut self, totals: Totals) -> WindowCounts {
        match self {
            Window::Count(window) => window.counts(totals),
            Window::Time(window) => window.counts(totals),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Replays a sequence of calls through a window and the obvious model side by side.
    #[derive(Clone, Debug)]
    enum Step {
        Call {
            failed: bool,
            slow: bool,
        },
        /// Moves time forward by this many buckets (time window only).
        Tick(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (any::<bool>(), any::<bool>()).prop_map(|(failed, slow)| Step::Call { failed, slow }),
            1 => (0u8..4).prop_map(Step::Tick),
        ]
    }

    fn counts_of<'a>(calls: impl Iterator<Item = &'a (u64, bool, bool)>) -> WindowCounts {
        let mut counts = WindowCounts::default();
        for &(_, failed, slow) in calls {
            counts.calls += 1;
            counts.failures += u64::from(failed);
            counts.slow += u64::from(slow);
        }
        counts
    }

    proptest! {
        #[test]
        fn count_window_matches_the_last_n_calls(size in 1u64..40, steps in proptest::collection::vec(step(), 0..300)) {
            let mut totals = Totals::default();
            let mut window = CountWindow::new(size, totals);
            let mut history: Vec<(u64, bool, bool)> = Vec::new();
            for step in steps {
                if let Step::Call { failed, slow } = step {
                    totals.calls += 1;
                    totals.failures += u64::from(failed);
                    totals.slow += u64::from(slow);
                    window.record(totals.calls, failed, slow);
                    history.push((0, failed, slow));
                }
                let start = history.len().saturating_sub(size as usize);
                prop_assert_eq!(window.counts(totals), counts_of(history[start..].iter()));
            }
        }

        #[test]
        fn time_window_matches_the_calls_of_the_last_buckets(buckets in 1usize..12, steps in proptest::collection::vec(step(), 0..300)) {
            let mut totals = Totals::default();
            let mut epoch = 0u64;
            let mut window = TimeWindow::new(buckets, epoch, totals);
            let mut history: Vec<(u64, bool, bool)> = Vec::new();
            for step in steps {
                match step {
                    Step::Call { failed, slow } => {
                        totals.calls += 1;
                        totals.failures += u64::from(failed);
                        totals.slow += u64::from(slow);
                        history.push((epoch, failed, slow));
                    }
                    Step::Tick(n) => {
                        epoch += u64::from(n);
                        window.advance(epoch, totals);
                    }
                }
                let oldest = (epoch + 1).saturating_sub(buckets as u64);
                let expected = counts_of(history.iter().filter(|(e, _, _)| *e >= oldest));
                prop_assert_eq!(window.counts(totals), expected);
            }
        }
    }

    #[test]
    fn count_window_ages_out_old_failures() {
        let mut totals = Totals::default();
        let mut window = CountWindow::new(3, totals);
        for failed in [true, false, false, false] {
            totals.calls += 1;
            totals.failures += u64::from(failed);
            window.record(totals.calls, failed, false);
        }
        assert_eq!(
            window.counts(totals),
            WindowCounts {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
    }

    #[test]
    fn count_window_ignores_calls_before_its_reset() {
        let totals = Totals {
            calls: 50,
            failures: 50,
            slow: 0,
        };
        let mut window = CountWindow::new(10, totals);
        assert_eq!(window.counts(totals), WindowCounts::default());
    }

    #[test]
    fn time_window_forgets_everything_after_a_long_gap() {
        let mut totals = Totals {
            calls: 10,
            failures: 4,
            slow: 1,
        };
        let mut window = TimeWindow::new(60, 0, Totals::default());
        assert_eq!(window.counts(totals).failures, 4);
        window.advance(1_000_000, totals);
        assert_eq!(window.counts(totals), WindowCounts::default());
        assert!(window.is_idle(totals));
        totals.calls += 1;
        assert!(!window.is_idle(totals));
    }
}
