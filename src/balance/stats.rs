//! [`EndpointLoads`]: what a picker knows about the endpoints: their weights, and one balancer
//! handle's requests in flight and peak-EWMA latencies.
//!
//! Loads are kept per handle (as Envoy keeps them per worker thread), not shared: a call
//! updates counters no other core writes, so handles on different cores do not contend.
//! Clone a handle per task; each one balances its own traffic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How fast a peak-EWMA forgets: the decay time constant (Finagle's default is 10 s).
const DECAY: Duration = Duration::from_secs(10);

/// The endpoints of one snapshot as one handle sees them.
#[derive(Debug)]
pub struct EndpointLoads {
    weights: Arc<[u32]>,
    in_flight: Box<[AtomicU64]>,
    /// Peak-EWMA round-trip time in nanoseconds (`f64` bits), and its last update.
    ewma: Box<[(AtomicU64, AtomicU64)]>,
    origin: Instant,
}

impl EndpointLoads {
    /// Endpoints with these weights, nothing in flight and no latency yet (for tests of a
    /// picker of your own; balancers make their own).
    pub fn new(weights: impl Into<Arc<[u32]>>) -> Self {
        Self::with_weights(weights.into(), Instant::now())
    }

    pub(crate) fn with_weights(weights: Arc<[u32]>, origin: Instant) -> Self {
        let n = weights.len();
        Self {
            in_flight: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ewma: (0..n).map(|_| Default::default()).collect(),
            weights,
            origin,
        }
    }

    /// Endpoints in the snapshot (never zero when a picker is asked).
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the snapshot has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Endpoint `i`'s weight (1 unless set).
    pub fn weight(&self, i: usize) -> u32 {
        self.weights[i]
    }

    /// This handle's requests to endpoint `i` not yet finished.
    #[inline]
    pub fn in_flight(&self, i: usize) -> u64 {
        self.in_flight[i].load(Ordering::Relaxed)
    }

    /// Endpoint `i`'s peak-EWMA round-trip time as this handle measured it (zero before its
    /// first response).
    pub fn latency(&self, i: usize) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma[i].0.load(Ordering::Relaxed)) as u64)
    }

    /// The load a peak-EWMA picker compares: latency × (in flight + 1), so an endpoint with
    /// no history scores zero and is tried first.
    #[inline]
    pub fn peak_ewma_load(&self, i: usize) -> f64 {
        f64::from_bits(self.ewma[i].0.load(Ordering::Relaxed)) * (self.in_flight(i) + 1) as f64
    }

    pub(crate) fn start(&self, i: usize) {
        // Written by this handle's calls only: no other core contends for it.
        self.in_flight[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, i: usize) {
        self.in_flight[i].fetch_sub(1, Ordering::Relaxed);
    }

    /// Records a round-trip time: a peak jumps the average up at once; lower times pull it
    /// down exponentially with the time since the last update.
    pub(crate) fn observe(&self, i: usize, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let now_nanos = now.saturating_duration_since(self.origin).as_nanos() as u64;
        let (average, stamp) = &self.ewma[i];
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
        let loads = EndpointLoads::new([1u32]);
        let ms = Duration::from_millis;
        loads.observe(0, ms(10), Instant::now());
        assert_eq!(loads.latency(0), ms(10));
        loads.observe(0, ms(100), Instant::now());
        assert_eq!(loads.latency(0), ms(100), "a peak is taken at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        loads.observe(0, ms(10), Instant::now());
        let decayed = loads.latency(0);
        assert!(
            decayed > ms(40) && decayed < ms(45),
            "one time constant: {decayed:?}"
        );
    }
}
