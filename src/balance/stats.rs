//! [`EndpointStats`]: what pickers know about an endpoint: its weight, its requests in flight
//! and its peak-EWMA latency.

use crate::padded::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How fast a peak-EWMA forgets: the decay time constant (Finagle's default is 10 s).
const DECAY: Duration = Duration::from_secs(10);

/// Per-endpoint load, shared by every handle of a balancer; updated with atomics only.
#[derive(Debug)]
pub struct EndpointStats {
    weight: u32,
    /// Requests sent and not yet finished (written by every call: its own cache lines).
    in_flight: CachePadded<AtomicU64>,
    /// Peak-EWMA round-trip time in nanoseconds, as `f64` bits, and when it was updated.
    ewma: CachePadded<(AtomicU64, AtomicU64)>,
    origin: Instant,
}

impl EndpointStats {
    pub(crate) fn new(weight: u32, origin: Instant) -> Self {
        Self {
            weight: weight.max(1),
            in_flight: CachePadded::default(),
            ewma: CachePadded::default(),
            origin,
        }
    }

    /// The endpoint's weight (1 unless discovery says otherwise).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Requests sent to it and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Its peak-EWMA round-trip time (zero before the first response).
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma.0 .0.load(Ordering::Relaxed)) as u64)
    }

    /// The load a peak-EWMA picker compares: latency × (in flight + 1), so an idle endpoint
    /// with no history scores zero and is tried first.
    pub fn peak_ewma_load(&self) -> f64 {
        let latency = f64::from_bits(self.ewma.0 .0.load(Ordering::Relaxed));
        latency * (self.in_flight() + 1) as f64
    }

    pub(crate) fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a round-trip time: a peak jumps the average up at once; lower times pull it
    /// down exponentially with the time since the last update.
    pub(crate) fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let now_nanos = now.saturating_duration_since(self.origin).as_nanos() as u64;
        let (average, stamp) = (&self.ewma.0 .0, &self.ewma.0 .1);
        // Plain loads and stores: two calls finishing at once may lose one sample, which an
        // average can afford; a read-modify-write on every call would cost more.
        let previous = f64::from_bits(average.load(Ordering::Relaxed));
        let elapsed = now_nanos.saturating_sub(stamp.load(Ordering::Relaxed)) as f64;
        stamp.store(now_nanos, Ordering::Relaxed);
        let next = if rtt > previous || previous == 0.0 {
            rtt
        } else {
            let weight = (-elapsed / DECAY.as_nanos() as f64).exp();
            previous * weight + rtt * (1.0 - weight)
        };
        average.store(next.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_up_and_decay_down() {
        let stats = EndpointStats::new(1, Instant::now());
        let ms = Duration::from_millis;
        stats.observe(ms(10), Instant::now());
        assert_eq!(stats.latency(), ms(10));
        stats.observe(ms(100), Instant::now());
        assert_eq!(stats.latency(), ms(100), "a peak is taken at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        stats.observe(ms(10), Instant::now());
        let decayed = stats.latency();
        assert!(
            decayed > ms(40) && decayed < ms(45),
            "one time constant: {decayed:?}"
        );
    }
}
