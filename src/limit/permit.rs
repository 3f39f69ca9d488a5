//! The concurrency limit's count of calls in flight, and the permit each call holds.

use crate::padded::CachePadded;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One concurrency limit's state, shared by every service its layer builds.
#[derive(Debug)]
pub(crate) struct Permits {
    /// Calls in flight. Alone on its cache lines: every call writes it twice.
    in_flight: CachePadded<AtomicUsize>,
    max: usize,
}

/// A call's place among the `max` in flight; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Permits>);

impl Permits {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            in_flight: CachePadded(AtomicUsize::new(0)),
            max,
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A permit, unless `max` calls are already in flight.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        // Compare-and-swap rather than add-then-undo: an add over the limit, however briefly
        // visible, would make a racing call see the service full when it is not.
        // Relaxed: only the count matters, the permit guards no data.
        let mut in_flight = self.in_flight.load(Ordering::Relaxed);
        loop {
            if in_flight >= self.max {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                in_flight,
                in_flight + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(current) => in_flight = current,
            }
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_permits_are_out_and_dropping_one_frees_it() {
        let permits = Arc::new(Permits::new(2));
        let first = permits.try_acquire().expect("room for two");
        let second = permits.try_acquire().expect("room for two");
        assert!(permits.try_acquire().is_none());
        drop(first);
        assert_eq!(permits.in_flight(), 1);
        let third = permits.try_acquire().expect("the first one's place");
        drop((second, third));
        assert_eq!(permits.in_flight(), 0);
    }
}
