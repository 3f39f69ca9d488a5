//! The rate limit's token bucket: one atomic word, GCRA-style, updated by compare-and-swap.
//!
//! A bucket of `burst` tokens refilling one token every `interval` is the same as remembering
//! a single time: when the bucket will be full again (the generic cell rate algorithm's
//! "theoretical arrival time"). A call at `now` may take a token once that time is at most
//! `tolerance = (burst - 1) × interval` away, and taking one pushes it `interval` further
//! (from `now` if the bucket was already full). So the next token frees at
//! `full_at - tolerance`, and a rejected call learns exactly how long that is.

use crate::padded::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The longest interval and tolerance, in nanoseconds: a century. Capping both keeps
/// `full_at` within two centuries of now, far from `u64::MAX` (584 years), so the arithmetic
/// never saturates (which would lose count of tokens taken). A rate below one per century
/// behaves as one per century.
const CENTURY: u64 = 100 * 365 * 86_400 * 1_000_000_000;

/// One rate limit's state, shared by every service its layer builds.
#[derive(Debug)]
pub(crate) struct Bucket {
    /// When the bucket will be full again, in nanoseconds since `epoch`; at or before `now`
    /// means full. Alone on its cache lines: every admitted call writes it.
    full_at: CachePadded<AtomicU64>,
    /// Nanoseconds per token.
    interval: u64,
    /// `(burst - 1) × interval`: how far ahead of `now` `full_at` may be for a call to pass.
    tolerance: u64,
    /// The origin of the bucket's times (tokio's clock, so that paused tests control it).
    epoch: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens (at least 1) refilling one every `interval`
    /// nanoseconds (at least 1, at most a century); times are counted from `epoch`.
    pub(crate) fn new(interval: u64, burst: u32, epoch: Instant) -> Self {
        debug_assert!(interval >= 1 && burst >= 1, "validated by the config");
        let interval = interval.min(CENTURY);
        Self {
            full_at: CachePadded(AtomicU64::new(0)),
            interval,
            tolerance: interval
                .saturating_mul(u64::from(burst.saturating_sub(1)))
                .min(CENTURY),
            epoch,
        }
    }

    /// Takes a token now, or says how long until one frees.
    pub(crate) fn take(&self) -> Result<(), Duration> {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        let now = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.take_at(now).map_err(Duration::from_nanos)
    }

    /// Takes a token at `now` (nanoseconds since the epoch), or returns the nanoseconds until
    /// one frees.
    pub(crate) fn take_at(&self, now: u64) -> Result<(), u64> {
        // Relaxed: the word publishes nothing else, and compare-and-swap alone keeps every
        // update applied to the value it was computed from.
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let free_at = full_at.saturating_sub(self.tolerance);
            if now < free_at {
                return Err(free_at - now);
            }
            let next = full_at.max(now).saturating_add(self.interval);
            match self.full_at.compare_exchange_weak(
                full_at,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    /// The textbook token bucket, in integer units of one nanosecond's refill so that it is
    /// exact: a token is worth `interval` units and the bucket holds `burst` of them.
    struct NaiveBucket {
        level: u64,
        capacity: u64,
        cost: u64,
        last: u64,
    }

    impl NaiveBucket {
        fn new(interval: u64, burst: u32) -> Self {
            let capacity = interval * u64::from(burst);
            Self {
                level: capacity,
                capacity,
                cost: interval,
                last: 0,
            }
        }

        fn take_at(&mut self, now: u64) -> Result<(), u64> {
            self.level = (self.level + (now - self.last)).min(self.capacity);
            self.last = now;
            if self.level >= self.cost {
                self.level -= self.cost;
                Ok(())
            } else {
                Err(self.cost - self.level)
            }
        }
    }

    fn bucket(interval: u64, burst: u32) -> Bucket {
        Bucket::new(interval, burst, Instant::now())
    }

    proptest! {
        #[test]
        fn agrees_with_a_naive_token_bucket(
            interval in 1u64..2_000_000_000,
            burst in 1u32..20,
            gaps in prop::collection::vec(
                prop_oneof![Just(0.0), 0.0f64..0.5, 0.0f64..3.0],
                1..300,
            ),
        ) {
            let limiter = bucket(interval, burst);
            let mut model = NaiveBucket::new(interval, burst);
            let mut now = 0u64;
            for gap in gaps {
                // Calls at the same instant, within one interval, and after quiet spells.
                now += (gap * interval as f64) as u64;
                prop_assert_eq!(limiter.take_at(now), model.take_at(now), "at {}", now);
            }
        }
    }

    #[test]
    fn a_full_bucket_admits_its_burst_then_names_the_wait() {
        let limiter = bucket(100, 3);
        assert_eq!(limiter.take_at(1_000), Ok(()));
        assert_eq!(limiter.take_at(1_000), Ok(()));
        assert_eq!(limiter.take_at(1_000), Ok(()));
        assert_eq!(limiter.take_at(1_000), Err(100));
        assert_eq!(limiter.take_at(1_060), Err(40));
        assert_eq!(limiter.take_at(1_100), Ok(()));
        assert_eq!(limiter.take_at(1_100), Err(100));
    }

    #[test]
    fn intervals_and_tolerances_are_capped_at_a_century() {
        let limiter = bucket(u64::MAX, 2);
        assert_eq!(limiter.take_at(5), Ok(()));
        assert_eq!(limiter.take_at(5), Ok(()));
        assert_eq!(limiter.take_at(5), Err(CENTURY));
        assert_eq!(limiter.take_at(5 + CENTURY), Ok(()));
        assert_eq!(limiter.take_at(5 + CENTURY), Err(CENTURY));

        let limiter = bucket(CENTURY / 2, u32::MAX);
        for _ in 0..3 {
            assert_eq!(limiter.take_at(0), Ok(()));
        }
        assert_eq!(limiter.take_at(0), Err(CENTURY / 2));
    }

    #[test]
    fn racing_threads_take_exactly_the_burst() {
        let limiter = bucket(1_000_000, 1_000);
        let admitted = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        if limiter.take_at(7).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 1_000);
    }
}
