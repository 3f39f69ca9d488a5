//! Injectable randomness for jitter, so that tests can make it deterministic.
//!
//! Layers that randomise (the breaker's open-period jitter, later retry jitter and random
//! balancing) draw from a [`RandomSource`]. The default, [`SplitMix64::from_entropy`], is seeded
//! from the operating system; tests pass [`SplitMix64::seeded`] or their own source.
//!
//! ```
//! use meshkit::random::{RandomSource, SplitMix64};
//!
//! let a = SplitMix64::seeded(7);
//! let b = SplitMix64::seeded(7);
//! assert_eq!(a.next_u64(), b.next_u64());
//! let unit = a.next_f64();
//! assert!((0.0..1.0).contains(&unit));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of uniformly distributed random numbers, shared between tasks.
pub trait RandomSource: Send + Sync + fmt::Debug {
    /// Returns the next uniformly distributed 64-bit value.
    fn next_u64(&self) -> u64;

    /// Returns a value uniformly distributed in `[0, 1)`.
    fn next_f64(&self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `random`'s next value in `[0, 1]`, whatever the source returns: a value outside is
/// clamped, NaN becomes 0, so that a wait computed from it cannot panic or run past its cap.
pub(crate) fn unit(random: &(impl RandomSource + ?Sized)) -> f64 {
    let unit = random.next_f64();
    if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    }
}

impl<T: RandomSource + ?Sized> RandomSource for std::sync::Arc<T> {
    fn next_u64(&self) -> u64 {
        (**self).next_u64()
    }

    // Forwarded too: a source that makes its floats its own way keeps them when shared.
    fn next_f64(&self) -> f64 {
        (**self).next_f64()
    }
}

impl<T: RandomSource + ?Sized> RandomSource for &T {
    fn next_u64(&self) -> u64 {
        (**self).next_u64()
    }

    // Forwarded too: a source that makes its floats its own way keeps them when shared.
    fn next_f64(&self) -> f64 {
        (**self).next_f64()
    }
}

/// A small, fast, lock-free generator (SplitMix64). Not for cryptography.
#[derive(Debug)]
pub struct SplitMix64 {
    state: AtomicU64,
}

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn seeded(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the operating system's random source: drawn once per
    /// process, then mixed with a counter, so each generator gets its own sequence without
    /// a system call (balancer handles make one per clone).
    pub fn from_entropy() -> Self {
        static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        static MADE: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
        let made = MADE.fetch_add(1, Ordering::Relaxed);
        // One step of the generator itself turns (base, n) into a well-mixed seed.
        Self::seeded(Self::seeded(base ^ made.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64())
    }
}

impl SplitMix64 {
    /// The next value, for a generator this caller owns: plain arithmetic, no atomic
    /// read-modify-write (the same sequence as [`next_u64`](RandomSource::next_u64)).
    #[inline]
    pub fn next_u64_mut(&mut self) -> u64 {
        let state = self.state.get_mut();
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(*state)
    }
}

/// SplitMix64's output function.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RandomSource for SplitMix64 {
    fn next_u64(&self) -> u64 {
        mix(self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_outside_the_unit_interval_is_brought_into_it() {
        /// A source whose `next_f64` returns `value`, whatever the contract says.
        #[derive(Debug)]
        struct Odd(f64);
        impl RandomSource for Odd {
            fn next_u64(&self) -> u64 {
                0
            }
            fn next_f64(&self) -> f64 {
                self.0
            }
        }
        for (value, expected) in [
            (f64::NAN, 0.0),
            (f64::INFINITY, 1.0),
            (-5.0, 0.0),
            (11.0, 1.0),
            (0.5, 0.5),
        ] {
            assert_eq!(unit(&Odd(value)), expected, "{value}");
        }
    }

    #[test]
    fn unit_values_stay_in_range_and_vary() {
        let source = SplitMix64::seeded(42);
        let values: Vec<f64> = (0..1000).map(|_| source.next_f64()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.45..0.55).contains(&mean), "mean {mean}");
    }

    #[test]
    fn the_owned_and_shared_paths_give_one_sequence() {
        let shared = SplitMix64::seeded(7);
        let mut owned = SplitMix64::seeded(7);
        for _ in 0..100 {
            assert_eq!(shared.next_u64(), owned.next_u64_mut());
        }
    }
}
