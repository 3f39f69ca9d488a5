//! Per-thread sharding for counters on hot paths.
//!
//! A counter that every core increments on every call bounces one cache line between cores and
//! caps throughput at a single core's. Hot-path counters are therefore split into shards, one
//! per small group of threads, each on its own cache line; readers on slow paths add them up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Aligns a value to its own pair of cache lines (adjacent-line prefetchers pull in two).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// How many shards a sharded structure should have: a power of two, at least twice the
/// number of cores so that threads rarely share one.
pub(crate) fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        (cores * 2).next_power_of_two().clamp(2, 64)
    })
}

/// The calling thread's shard index, in `0..count()`.
#[inline]
pub(crate) fn current() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) & (count() - 1);
    }
    INDEX.with(|index| *index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_a_power_of_two_and_current_is_in_range() {
        assert!(count().is_power_of_two());
        assert!(current() < count());
    }

    #[test]
    fn padding_keeps_values_apart() {
        assert_eq!(std::mem::align_of::<CachePadded<u64>>(), 128);
    }
}
