//! [`Picker`]: how a balancer chooses an endpoint, and the pickers meshkit ships.

use super::ring::{stable_hash, HashRing};
use super::stats::EndpointLoads;
use crate::random::SplitMix64;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Chooses an endpoint for each request.
///
/// A balancer calls [`prepare`](Picker::prepare) whenever its set of ready endpoints changes
/// (off the request path) and [`pick`](Picker::pick) for every request, with state that
/// belongs to one balancer handle (so picking needs no lock). `endpoints` is never empty.
pub trait Picker<Req>: Send + Sync + 'static {
    /// What the picker derives from an endpoint set (a consistent-hash table, a weighted
    /// schedule); `()` if nothing.
    type Prepared: Send + Sync + 'static;
    /// What one balancer handle keeps between picks (a cursor, a random source).
    type State: Send + 'static;

    /// Derives what picks need from the endpoints, in order: their `weights`, and in `keys`
    /// a stable hash of each endpoint's key.
    fn prepare(&self, weights: &[u32], keys: &[u64]) -> Self::Prepared;

    /// A new handle's state.
    fn state(&self) -> Self::State;

    /// The index of the endpoint for `request`.
    fn pick(
        &self,
        request: &Req,
        endpoints: &EndpointLoads,
        prepared: &Self::Prepared,
        state: &mut Self::State,
    ) -> usize;

    /// Where a call goes instead when the handle's copy of the endpoint picked for
    /// `request`, `picked`, cannot take it at once (at its concurrency limit, reconnecting):
    /// the `attempt`-th endpoint to try (from 0), or `None` for no more. The balancer asks
    /// for one after another until one is ready (passing over `picked` and repeats), at most
    /// [`FALLBACKS`] times, so a picker that moves on with each pick (a round robin) moves on
    /// only as far as the endpoints it skips. The default picks again for the first two, as
    /// the picker spreads calls, then takes the endpoints after `picked` in the set's order.
    /// [`ConsistentHash`] gives the key's next owners round the ring instead, so that the
    /// keys of an endpoint that is not ready go where they would go without it.
    fn fallback(
        &self,
        request: &Req,
        endpoints: &EndpointLoads,
        prepared: &Self::Prepared,
        state: &mut Self::State,
        picked: usize,
        attempt: usize,
    ) -> Option<usize> {
        match attempt {
            0 | 1 => Some(self.pick(request, endpoints, prepared, state)),
            _ => {
                let step = attempt - 1;
                (step < endpoints.len()).then(|| (picked + step) % endpoints.len())
            }
        }
    }

    /// Whether picks read in-flight counts (the balancer then maintains them; otherwise
    /// calls skip that bookkeeping). A snapshot of one endpoint leaves nothing to choose:
    /// its calls are not counted (a new snapshot starts its counts afresh anyway).
    fn tracks_load(&self) -> bool {
        false
    }

    /// Whether picks read latencies (the balancer then times every call of a snapshot of
    /// more than one endpoint; implies `tracks_load`).
    fn tracks_latency(&self) -> bool {
        false
    }
}

/// Most endpoints a call tries when the one picked for it is not ready at once (see
/// [`Picker::fallback`]): a bounded cost, whatever the endpoint count.
pub const FALLBACKS: usize = 10;

/// Gives handles different starting points and seeds.
fn next_handle() -> u64 {
    static HANDLES: AtomicU64 = AtomicU64::new(0);
    HANDLES.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// Each endpoint in turn: exactly even over the ready endpoints (per handle; handles start at
/// different points).
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundRobin;

impl<Req> Picker<Req> for RoundRobin {
    type Prepared = ();
    type State = Cursor;

    fn prepare(&self, _: &[u32], _: &[u64]) {}

    fn state(&self) -> Cursor {
        Cursor::new()
    }

    #[inline]
    fn pick(&self, _: &Req, endpoints: &EndpointLoads, _: &(), cursor: &mut Cursor) -> usize {
        cursor.step(endpoints.len())
    }
}

/// A round-robin handle's place in its cycle (of endpoints, or of a weighted schedule).
///
/// Each handle starts at its own point, and starts again from it (modulo the new length)
/// whenever the cycle's length changes, so handles never fall into step with each other;
/// between changes a step is a comparison, not a division.
#[derive(Clone, Debug)]
pub struct Cursor {
    at: usize,
    len: usize,
    start: usize,
}

impl Cursor {
    /// A cursor with a starting point of its own.
    pub fn new() -> Self {
        Self {
            at: 0,
            len: 0,
            start: (next_handle() >> 32) as usize,
        }
    }

    /// Moves to the next place in a cycle of `len` (at least 1) and returns it.
    #[inline]
    pub fn step(&mut self, len: usize) -> usize {
        if len != self.len {
            self.len = len;
            self.at = self.start % len.max(1);
        } else {
            self.at += 1;
            if self.at >= len {
                self.at = 0;
            }
        }
        self.at
    }
}

impl Default for Cursor {
    fn default() -> Self {
        Self::new()
    }
}

/// A uniformly random endpoint; seed it for reproducible tests.
#[derive(Clone, Debug)]
pub struct Random {
    /// The seed, and the handles made from this picker (and its clones) so far: the n-th
    /// derives its sequence from the seed and n, so a seeded balancer repeats itself from
    /// run to run.
    seed: Option<(u64, Arc<AtomicU64>)>,
}

impl Random {
    /// Seeded from the system (allocates nothing).
    pub fn new() -> Self {
        Self { seed: None }
    }

    /// Seeded with `seed`: each handle derives its own sequence from it and from how many
    /// handles this picker made before it, so the same program picks the same endpoints on
    /// every run.
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed: Some((seed, Arc::default())),
        }
    }

    fn source(&self) -> SplitMix64 {
        match &self.seed {
            Some((seed, handles)) => {
                let (seed, handle) = (*seed, handles.fetch_add(1, Ordering::Relaxed));
                SplitMix64::seeded(seed ^ handle.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => SplitMix64::from_entropy(),
        }
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

/// A uniform index below `n` (Lemire's multiply-shift; the bias is below 2⁻³² for any
/// endpoint count a balancer sees).
#[inline]
fn below(random: &mut SplitMix64, n: usize) -> usize {
    // The handle owns its generator: no atomic read-modify-write per pick.
    ((u128::from(random.next_u64_mut()) * n as u128) >> 64) as usize
}

impl<Req> Picker<Req> for Random {
    type Prepared = ();
    type State = SplitMix64;

    fn prepare(&self, _: &[u32], _: &[u64]) {}

    fn state(&self) -> SplitMix64 {
        self.source()
    }

    #[inline]
    fn pick(&self, _: &Req, endpoints: &EndpointLoads, _: &(), random: &mut SplitMix64) -> usize {
        below(random, endpoints.len())
    }
}

/// Smooth weighted round-robin, as nginx does: over a cycle each endpoint gets its share of
/// picks, spread out rather than in bursts. The cycle is computed once per endpoint set (at
/// most 65 536 picks long: larger total weights are scaled down), so a pick is one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedRoundRobin;

/// Longest precomputed weighted cycle.
const MAX_CYCLE: u64 = 65_536;

/// The greatest common divisor (`gcd(0, w)` is `w`).
fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl<Req> Picker<Req> for WeightedRoundRobin {
    type Prepared = Box<[u32]>;
    type State = Cursor;

    fn prepare(&self, weights: &[u32], _: &[u64]) -> Box<[u32]> {
        // Weights with a common divisor make the same shares over a shorter cycle: 100 and
        // 300 cycle as 1 and 3.
        let divisor = weights.iter().fold(0, |d, &w| gcd(d, w.max(1)));
        let weights: Vec<u32> = weights.iter().map(|&w| w.max(1) / divisor.max(1)).collect();
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let scale = if total > MAX_CYCLE {
            MAX_CYCLE as f64 / total as f64
        } else {
            1.0
        };
        let weights: Vec<i64> = weights
            .iter()
            .map(|&w| ((f64::from(w.max(1)) * scale).round() as i64).max(1))
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        (0..total)
            .map(|_| {
                for (c, w) in current.iter_mut().zip(&weights) {
                    *c += w;
                }
                let (best, _) = current
                    .iter()
                    .enumerate()
                    .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                    .expect("endpoints are not empty");
                current[best] -= total;
                best as u32
            })
            .collect()
    }

    fn state(&self) -> Cursor {
        Cursor::new()
    }

    #[inline]
    fn pick(&self, _: &Req, _: &EndpointLoads, cycle: &Box<[u32]>, cursor: &mut Cursor) -> usize {
        cycle[cursor.step(cycle.len())] as usize
    }
}

/// Power of two choices over requests in flight: of two random endpoints, the one with fewer
/// requests outstanding.
#[derive(Clone, Debug, Default)]
pub struct LeastRequests {
    random: Random,
}

impl LeastRequests {
    /// Seeded with `seed`, for reproducible tests.
    pub fn seeded(seed: u64) -> Self {
        Self {
            random: Random::seeded(seed),
        }
    }
}

/// Power of two choices: of two distinct random endpoints, the one with the lower `load`
/// (the only one when there is one).
#[inline]
fn power_of_two<L: PartialOrd>(
    random: &mut SplitMix64,
    n: usize,
    load: impl Fn(usize) -> L,
) -> usize {
    let a = below(random, n);
    if n < 2 {
        return a;
    }
    let b = below(random, n - 1);
    let b = if b >= a { b + 1 } else { b };
    if load(b) < load(a) {
        b
    } else {
        a
    }
}

impl<Req> Picker<Req> for LeastRequests {
    type Prepared = ();
    type State = SplitMix64;

    fn prepare(&self, _: &[u32], _: &[u64]) {}

    fn state(&self) -> SplitMix64 {
        self.random.source()
    }

    #[inline]
    fn pick(&self, _: &Req, endpoints: &EndpointLoads, _: &(), random: &mut SplitMix64) -> usize {
        power_of_two(random, endpoints.len(), |i| endpoints.in_flight(i))
    }

    fn tracks_load(&self) -> bool {
        true
    }
}

/// Power of two choices over peak-EWMA latency × requests in flight, as Finagle and linkerd
/// do: slow or busy endpoints get less traffic, and a latency spike counts at once.
///
/// A round trip runs from `call` to the response, on tokio's clock. A call whose future
/// answers on its first poll (an in-process service that answers synchronously) counts as
/// taking no time, which saves the second clock read. An endpoint that has not answered
/// yet scores zero while no call to it is out, and a penalty above any latency once calls
/// are (see [`EndpointLoads::peak_ewma_load`](super::EndpointLoads::peak_ewma_load)): it is
/// tried, but not flooded.
#[derive(Clone, Debug, Default)]
pub struct PeakEwma {
    random: Random,
}

impl PeakEwma {
    /// Seeded with `seed`, for reproducible tests.
    pub fn seeded(seed: u64) -> Self {
        Self {
            random: Random::seeded(seed),
        }
    }
}

impl<Req> Picker<Req> for PeakEwma {
    type Prepared = ();
    type State = SplitMix64;

    fn prepare(&self, _: &[u32], _: &[u64]) {}

    fn state(&self) -> SplitMix64 {
        self.random.source()
    }

    #[inline]
    fn pick(&self, _: &Req, endpoints: &EndpointLoads, _: &(), random: &mut SplitMix64) -> usize {
        power_of_two(random, endpoints.len(), |i| endpoints.peak_ewma_load(i))
    }

    fn tracks_load(&self) -> bool {
        true
    }

    fn tracks_latency(&self) -> bool {
        true
    }
}

/// The same request key to the same endpoint: a ring with 100 virtual nodes per endpoint,
/// flattened into a table (one lookup per request), over a key the user extracts from the
/// request. When one of N endpoints leaves, only its keys (about 1/N) move; while one is not
/// ready at once (at a concurrency limit, say), its keys go where they would go if it had
/// left (each to its next owner round the ring), and the others stay.
pub struct ConsistentHash<F> {
    key: F,
}

impl<F> ConsistentHash<F> {
    /// Hashes the key `key` extracts from each request (a user id, a session).
    pub fn new(key: F) -> Self {
        Self { key }
    }
}

impl<F> fmt::Debug for ConsistentHash<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash").finish_non_exhaustive()
    }
}

impl<F, K, Req> Picker<Req> for ConsistentHash<F>
where
    F: Fn(&Req) -> K + Send + Sync + 'static,
    K: Hash,
{
    type Prepared = HashRing;
    type State = ();

    fn prepare(&self, _: &[u32], keys: &[u64]) -> HashRing {
        HashRing::build(keys)
    }

    fn state(&self) {}

    #[inline]
    fn pick(&self, request: &Req, _: &EndpointLoads, ring: &HashRing, _: &mut ()) -> usize {
        ring.lookup(stable_hash(&(self.key)(request)))
            .expect("the ring of a non-empty set has owners")
    }

    /// The key's next owners round the ring, nearest first: the endpoint that would own it
    /// if its owner left, then the one after, and so on.
    fn fallback(
        &self,
        request: &Req,
        _: &EndpointLoads,
        ring: &HashRing,
        _: &mut (),
        _: usize,
        attempt: usize,
    ) -> Option<usize> {
        let mut successors = [0; FALLBACKS];
        let wanted = successors.get_mut(..=attempt)?;
        let found = ring.successors(stable_hash(&(self.key)(request)), wanted);
        (found > attempt).then(|| successors[attempt])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(weights: &[u32]) -> EndpointLoads {
        EndpointLoads::new(weights)
    }

    fn counts<P: Picker<()>>(picker: &P, set: &EndpointLoads, picks: usize) -> Vec<usize> {
        let keys: Vec<u64> = (0..set.len() as u64).collect();
        let weights: Vec<u32> = (0..set.len()).map(|i| set.weight(i)).collect();
        let prepared = picker.prepare(&weights, &keys);
        let mut state = picker.state();
        let mut counts = vec![0; set.len()];
        for _ in 0..picks {
            counts[picker.pick(&(), set, &prepared, &mut state)] += 1;
        }
        counts
    }

    /// Pearson's chi-square statistic of `observed` against `expected` shares.
    fn chi_square(observed: &[usize], expected_shares: &[f64]) -> f64 {
        let total: usize = observed.iter().sum();
        observed
            .iter()
            .zip(expected_shares)
            .map(|(&o, &share)| {
                let e = share * total as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    proptest::proptest! {
        /// From any starting point, `len` steps visit every place below `len` once, in
        /// order; when the length changes, the cursor starts again from its own point.
        #[test]
        fn a_round_visits_every_place_once_and_restarts_from_its_own_point(
            start in proptest::prelude::any::<usize>(),
            len in 1usize..2_000,
            next_len in 1usize..2_000,
        ) {
            let mut cursor = Cursor { at: 0, len: 0, start };
            let first = cursor.step(len);
            proptest::prop_assert_eq!(first, start % len);
            let mut seen = vec![false; len];
            seen[first] = true;
            let mut previous = first;
            for _ in 1..len {
                let next = cursor.step(len);
                proptest::prop_assert_eq!(next, (previous + 1) % len);
                proptest::prop_assert!(!seen[next]);
                seen[next] = true;
                previous = next;
            }
            if next_len != len {
                proptest::prop_assert_eq!(cursor.step(next_len), start % next_len);
            }
        }
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let set = endpoints(&[1; 7]);
        assert_eq!(counts(&RoundRobin, &set, 7 * 1_000), vec![1_000; 7]);
    }

    #[test]
    fn weights_with_a_common_divisor_cycle_as_their_quotients() {
        let cycle = <WeightedRoundRobin as Picker<()>>::prepare(
            &WeightedRoundRobin,
            &[3_000, 1_000],
            &[0, 1],
        );
        assert_eq!(&*cycle, &[0, 0, 1, 0], "3:1 over a cycle of 4, not 4 000");
    }

    #[test]
    fn a_seeded_random_picker_repeats_itself() {
        let draws = |picker: &Random| {
            let mut state = <Random as Picker<()>>::state(picker);
            (0..8).map(|_| state.next_u64_mut()).collect::<Vec<_>>()
        };
        let (first, second) = (Random::seeded(5), Random::seeded(5));
        let (first_handles, second_handles) = (
            [draws(&first), draws(&first)],
            [draws(&second), draws(&second)],
        );
        assert_eq!(
            first_handles, second_handles,
            "the same seed, the same picks"
        );
        assert_ne!(
            first_handles[0], first_handles[1],
            "each handle its own sequence"
        );
    }

    #[test]
    fn random_is_uniform_within_a_chi_square_bound() {
        let set = endpoints(&[1; 10]);
        let observed = counts(&Random::seeded(42), &set, 100_000);
        // 9 degrees of freedom: the 99.9th percentile is 27.88.
        assert!(chi_square(&observed, &[0.1; 10]) < 27.88, "{observed:?}");
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact_over_a_cycle() {
        let set = endpoints(&[5, 1, 1]);
        let prepared = <WeightedRoundRobin as Picker<()>>::prepare(
            &WeightedRoundRobin,
            &[5, 1, 1],
            &[0, 1, 2],
        );
        // nginx's example: a a b a c a a.
        assert_eq!(&*prepared, &[0, 0, 1, 0, 2, 0, 0]);
        let observed = counts(&WeightedRoundRobin, &set, 7 * 100);
        assert_eq!(observed, vec![500, 100, 100]);
    }

    #[test]
    fn least_requests_prefers_the_idle_endpoint() {
        let set = endpoints(&[1, 1]);
        for _ in 0..10 {
            set.start(0);
        }
        let observed = counts(&LeastRequests::seeded(1), &set, 1_000);
        assert_eq!(observed, vec![0, 1_000]);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_prefers_the_fast_endpoint() {
        let set = endpoints(&[1, 1, 1]);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let now = set.now();
        let ms = 1_000_000;
        set.observe(0, now - 50 * ms, now);
        set.observe(1, now - 5 * ms, now);
        set.observe(2, now - 50 * ms, now);
        let observed = counts(&PeakEwma::seeded(3), &set, 3_000);
        // The fast endpoint wins every pair it is in: two pairs of three.
        assert!(observed[1] > 1_800, "{observed:?}");
    }

    #[test]
    fn consistent_hash_sends_a_key_to_one_endpoint() {
        let set = endpoints(&[1; 5]);
        let picker = ConsistentHash::new(|user: &u64| *user);
        let keys: Vec<u64> = (0..5).map(|k| stable_hash(&k)).collect();
        let ring = picker.prepare(&[1; 5], &keys);
        for user in 0..100u64 {
            let first = picker.pick(&user, &set, &ring, &mut ());
            assert_eq!(picker.pick(&user, &set, &ring, &mut ()), first);
        }
    }
}
