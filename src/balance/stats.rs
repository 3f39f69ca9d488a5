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
    /// Requests sent to each endpoint, written by the handle's `call` only (it takes
    /// `&mut self`), so a plain load and store, not a locked read-modify-write.
    started: Counters,
    /// Requests finished, counted by their futures (which may run anywhere).
    finished: Counters,
    /// Per endpoint `i`: at `2i`, the peak-EWMA round-trip time in nanoseconds (`f64` bits);
    /// at `2i + 1`, its last update.
    ewma: Counters,
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
            started: Counters::new(n),
            finished: Counters::new(n),
            ewma: Counters::new(2 * n),
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
        // Only the handle starts requests, and it is the one asking: nothing starts between
        // the two loads, so `finished` cannot pass `started`.
        let started = self.started.get(i).load(Ordering::Relaxed);
        started.saturating_sub(self.finished.get(i).load(Ordering::Relaxed))
    }

    /// Endpoint `i`'s peak-EWMA round-trip time as this handle measured it (zero before its
    /// first response).
    pub fn latency(&self, i: usize) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma.get(2 * i).load(Ordering::Relaxed)) as u64)
    }

    /// The load a peak-EWMA picker compares: latency × (in flight + 1). An endpoint with no
    /// history scores zero while no call to it is out, so it is tried first; with calls out
    /// and still no answer, it scores a penalty plus those calls (as Finagle's peak EWMA
    /// does), so that an endpoint that has not answered yet, or never will, is not flooded
    /// while endpoints with a history answer.
    #[inline]
    pub fn peak_ewma_load(&self, i: usize) -> f64 {
        /// Above any round trip in nanoseconds a service could have (about 11 days).
        const PENALTY: f64 = 1e15;
        let latency = f64::from_bits(self.ewma.get(2 * i).load(Ordering::Relaxed));
        let in_flight = self.in_flight(i);
        if latency == 0.0 && in_flight > 0 {
            PENALTY + in_flight as f64
        } else {
            latency * (in_flight + 1) as f64
        }
    }

    pub(crate) fn start(&self, i: usize) {
        // Written by this handle's calls only (one writer): no read-modify-write needed, and
        // no other core contends for it.
        let started = self.started.get(i);
        started.store(started.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    pub(crate) fn finish(&self, i: usize) {
        self.finished.get(i).fetch_add(1, Ordering::Relaxed);
    }

    /// Nanoseconds since this handle's origin: the clock latency pickers read.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64
    }

    /// Records a round trip from `sent` to `now` (both from [`now`](Self::now)): a peak jumps
    /// the average up at once; lower times pull it down exponentially with the time since the
    /// last update.
    #[inline]
    pub(crate) fn observe(&self, i: usize, sent: u64, now: u64) {
        // Integers until here: a `u128` of nanoseconds converts to `f64` in software.
        let rtt = now.saturating_sub(sent) as f64;
        let (average, stamp) = (self.ewma.get(2 * i), self.ewma.get(2 * i + 1));
        let previous = f64::from_bits(average.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(stamp.load(Ordering::Relaxed));
        stamp.store(now, Ordering::Relaxed);
        let next = if rtt > previous || previous == 0.0 {
            rtt
        } else {
            let weight = decay(elapsed as f64 / DECAY.as_nanos() as f64);
            previous * weight + rtt * (1.0 - weight)
        };
        average.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// Counters in one allocation with 128 bytes of padding at each end, so that no other
/// allocation shares their cache lines: two handles on two cores would otherwise slow each
/// other down through the heap neighbours their counters happen to get.
#[derive(Debug)]
struct Counters(Box<[AtomicU64]>);

/// Padding at each end, in counters (16 × 8 bytes: two cache lines).
const PAD: usize = 16;

impl Counters {
    fn new(n: usize) -> Self {
        Self((0..n + 2 * PAD).map(|_| AtomicU64::new(0)).collect())
    }

    #[inline]
    fn get(&self, i: usize) -> &AtomicU64 {
        &self.0[PAD + i]
    }
}

/// `e^-x` for `x >= 0`. Busy endpoints are updated microseconds apart, where `x` is tiny and
/// five terms of the series are exact to `f64` precision, without calling `exp`.
#[inline]
fn decay(x: f64) -> f64 {
    if x < 1.0 / 1024.0 {
        1.0 - x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x / 24.0)))
    } else {
        (-x).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records a call of `rtt` that ends now.
    fn round_trip(loads: &EndpointLoads, rtt: Duration) {
        let now = loads.now();
        loads.observe(0, now - rtt.as_nanos() as u64, now);
    }

    #[tokio::test(start_paused = true)]
    async fn peaks_jump_up_and_decay_down() {
        let loads = EndpointLoads::new([1u32]);
        let ms = Duration::from_millis;
        tokio::time::advance(Duration::from_secs(1)).await;
        round_trip(&loads, ms(10));
        assert_eq!(loads.latency(0), ms(10));
        round_trip(&loads, ms(100));
        assert_eq!(loads.latency(0), ms(100), "a peak is taken at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        round_trip(&loads, ms(10));
        let decayed = loads.latency(0);
        assert!(
            decayed > ms(40) && decayed < ms(45),
            "one time constant: {decayed:?}"
        );
    }

    #[test]
    fn the_decay_series_matches_exp_where_it_is_used() {
        for i in 0..=1_000 {
            let x = i as f64 / 1_024_000.0;
            assert!((decay(x) - (-x).exp()).abs() < 1e-15, "x = {x}");
        }
        assert_eq!(decay(2.0), (-2.0f64).exp());
    }
}
