//! The metrics snapshot a [`BreakerHandle`](super::BreakerHandle) gives.

use super::shared::Shared;
use super::window::WindowCounts;
use super::BreakerState;
use std::time::Duration;
use tokio::time::Instant;

/// A snapshot of a breaker's counters.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BreakerMetrics {
    /// The state when the snapshot was taken.
    pub state: BreakerState,
    /// Calls in the sliding window (closed), or probes finished (half-open); 0 otherwise.
    pub calls: u64,
    /// Failed calls among `calls`.
    pub failures: u64,
    /// Slow calls among `calls` (0 unless `slow_call_duration` is set).
    pub slow_calls: u64,
    /// `failures / calls`, or `None` while `calls` is 0.
    pub failure_rate: Option<f64>,
    /// `slow_calls / calls`, or `None` while `calls` is 0.
    pub slow_call_rate: Option<f64>,
    /// Calls rejected with `CircuitOpen` since the breaker was created.
    pub rejected: u64,
    /// Consecutive openings since the breaker last closed.
    pub openings: u32,
    /// Time left in the open period, when open.
    pub open_remaining: Option<Duration>,
    /// Probes running now (half-open only).
    pub probes_in_flight: usize,
}

impl Shared {
    pub(crate) fn metrics(&self) -> BreakerMetrics {
        let now = Instant::now();
        let mut machine = self.lock();
        self.refresh(&mut machine, now);
        let counts = match machine.state {
            BreakerState::Closed => self.current_counts(&mut machine, now),
            BreakerState::HalfOpen => WindowCounts {
                calls: u64::from(machine.probes.completed),
                failures: u64::from(machine.probes.failures),
                slow: u64::from(machine.probes.slow),
            },
            _ => WindowCounts::default(),
        };
        let rate = |part: u64| (counts.calls > 0).then(|| part as f64 / counts.calls as f64);
        BreakerMetrics {
            state: machine.state,
            calls: counts.calls,
            failures: counts.failures,
            slow_calls: counts.slow,
            failure_rate: rate(counts.failures),
            slow_call_rate: rate(counts.slow),
            rejected: self.cells().rejected(),
            openings: machine.openings,
            open_remaining: (machine.state == BreakerState::Open)
                .then(|| machine.open_until.saturating_duration_since(now)),
            probes_in_flight: machine.probes.in_flight(),
        }
    }
}
