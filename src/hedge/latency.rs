//! Recent latencies as a small log-linear histogram, for percentile hedge delays.
//!
//! Values are bucketed by microseconds with eight buckets per power of two (at most 12.5 %
//! apart), from 1 µs to about 2.4 hours. Two generations rotate every half window, so a
//! percentile covers between half a window and a whole one. Recording is one atomic add; the
//! percentile is recomputed every few records (every record until there are enough) and read
//! as one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const BUCKETS: usize = 256;
/// Records between two recomputations of the cached percentile.
const REFRESH_EVERY: u64 = 16;
/// The cached percentile while there are too few samples.
const NOT_ENOUGH: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct Latencies {
    generations: [Generation; 2],
    /// Index of the generation being filled (the other is the previous one).
    current: AtomicU64,
    quantile: f64,
    min_samples: u64,
    half_window: Duration,
    rotation: Mutex<Instant>,
    /// When the next rotation is due, in nanoseconds since `epoch`: a read after it rotates
    /// first, so that latencies older than the window never decide a delay.
    rotation_due: AtomicU64,
    epoch: Instant,
    cached_nanos: AtomicU64,
    records: AtomicU64,
}

#[derive(Debug)]
struct Generation {
    buckets: Box<[AtomicU64; BUCKETS]>,
}

impl Generation {
    fn new() -> Self {
        Self {
            buckets: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    fn clear(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if micros < 8 {
        return micros as usize;
    }
    let octave = 63 - micros.leading_zeros() as usize;
    let mantissa = (micros >> (octave - 3)) as usize;
    ((octave - 3) * 8 + mantissa).min(BUCKETS - 1)
}

/// The largest latency a bucket holds.
fn upper_bound(bucket: usize) -> Duration {
    if bucket < 8 {
        return Duration::from_micros(bucket as u64 + 1);
    }
    let octave = bucket / 8 + 2;
    let mantissa = (bucket % 8 + 8) as u64;
    Duration::from_micros((mantissa + 1) << (octave - 3))
}

impl Latencies {
    pub(crate) fn new(quantile: f64, min_samples: u32, window: Duration) -> Self {
        let now = Instant::now();
        Self {
            generations: [Generation::new(), Generation::new()],
            current: AtomicU64::new(0),
            quantile,
            min_samples: u64::from(min_samples),
            half_window: window / 2,
            rotation: Mutex::new(now),
            rotation_due: AtomicU64::new(nanos(window / 2)),
            epoch: now,
            cached_nanos: AtomicU64::new(NOT_ENOUGH),
            records: AtomicU64::new(0),
        }
    }

    /// Records one finished try.
    pub(crate) fn record(&self, latency: Duration, now: Instant) {
        self.rotate_if_due(now);
        let current = self.current.load(Ordering::Acquire) as usize % 2;
        self.generations[current].buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
        let warming_up = self.cached_nanos.load(Ordering::Relaxed) == NOT_ENOUGH;
        if warming_up || self.records.fetch_add(1, Ordering::Relaxed) % REFRESH_EVERY == 0 {
            self.refresh();
        }
    }

    /// The configured percentile of the latencies recorded within the window (as of `now`);
    /// `None` while fewer than `min_samples` are.
    pub(crate) fn percentile(&self, now: Instant) -> Option<Duration> {
        self.rotate_if_due(now);
        match self.cached_nanos.load(Ordering::Relaxed) {
            NOT_ENOUGH => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// One atomic load when no rotation is due.
    fn rotate_if_due(&self, now: Instant) {
        let since_epoch = nanos(now.saturating_duration_since(self.epoch));
        if since_epoch < self.rotation_due.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut rotated) = self.rotation.try_lock() else {
            return;
        };
        let elapsed = now.saturating_duration_since(*rotated);
        if elapsed < self.half_window {
            return;
        }
        let current = self.current.load(Ordering::Acquire);
        // After a whole window of silence, both generations are stale.
        if elapsed >= self.half_window * 2 {
            self.generations[current as usize % 2].clear();
        }
        self.generations[(current as usize + 1) % 2].clear();
        self.current.store(current + 1, Ordering::Release);
        *rotated = now;
        let due = now.saturating_duration_since(self.epoch) + self.half_window;
        self.rotation_due.store(nanos(due), Ordering::Relaxed);
        drop(rotated);
        self.refresh();
    }

    fn refresh(&self) {
        let count = |i: usize| {
            self.generations[0].buckets[i].load(Ordering::Relaxed)
                + self.generations[1].buckets[i].load(Ordering::Relaxed)
        };
        // Two passes over the counters (no buffer): the total, then the rank's bucket.
        let total: u64 = (0..BUCKETS).map(count).sum();
        let value = if total < self.min_samples || total == 0 {
            NOT_ENOUGH
        } else {
            let rank = ((self.quantile * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            let bucket = (0..BUCKETS)
                .position(|i| {
                    seen += count(i);
                    seen >= rank
                })
                .unwrap_or(BUCKETS - 1);
            u64::try_from(upper_bound(bucket).as_nanos()).unwrap_or(NOT_ENOUGH - 1)
        };
        self.cached_nanos.store(value, Ordering::Relaxed);
    }
}

/// `duration` in whole nanoseconds, saturating.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test(start_paused = true)]
    async fn percentile_appears_after_min_samples_and_tracks_the_tail() {
        let latencies = Latencies::new(0.9, 100, Duration::from_secs(10));
        let now = Instant::now();
        for i in 0..99 {
            latencies.record(
                Duration::from_millis(if i % 10 == 0 { 500 } else { 10 }),
                now,
            );
        }
        assert_eq!(latencies.percentile(now), None);
        for _ in 0..17 {
            latencies.record(Duration::from_millis(10), now);
        }
        let p90 = latencies.percentile(now).expect("enough samples");
        assert!(
            p90 >= Duration::from_millis(10) && p90 <= Duration::from_micros(11_300),
            "{p90:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn old_latencies_leave_after_a_window() {
        let latencies = Latencies::new(0.5, 1, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..32 {
            latencies.record(Duration::from_secs(2), start);
        }
        let later = start + Duration::from_secs(21);
        for _ in 0..32 {
            latencies.record(Duration::from_millis(5), later);
        }
        assert!(latencies.percentile(later).unwrap() < Duration::from_millis(6));
    }

    #[tokio::test(start_paused = true)]
    async fn latencies_older_than_the_window_decide_nothing_even_unread_since() {
        let latencies = Latencies::new(0.5, 5, Duration::from_secs(2));
        let start = Instant::now();
        for _ in 0..40 {
            latencies.record(Duration::from_millis(20), start);
        }
        assert!(latencies.percentile(start).is_some());
        // Within the window: still there.
        assert!(latencies
            .percentile(start + Duration::from_millis(1_500))
            .is_some());
        // An hour with no record: too few recent samples, so no hedge.
        assert_eq!(
            latencies.percentile(start + Duration::from_secs(3_600)),
            None
        );
    }

    proptest! {
        #[test]
        fn every_latency_falls_in_a_bucket_that_bounds_it(micros in 0u64..(1 << 33)) {
            let latency = Duration::from_micros(micros);
            let bucket = bucket_of(latency);
            prop_assert!(upper_bound(bucket) > latency);
            if bucket > 0 {
                prop_assert!(upper_bound(bucket - 1) <= latency);
            }
            // Buckets are at most 12.5 % wide.
            prop_assert!(upper_bound(bucket).as_secs_f64() <= latency.as_secs_f64() * 1.125 + 1e-6);
        }
    }
}
