//! Consistent hashing: a ring with virtual nodes, flattened into a lookup table so a lookup is
//! one shift and one load.
//!
//! Each endpoint puts 100 points on a 64-bit ring; a key belongs to the first point at or after
//! its hash. The table has 2^k slots (at least 65 536, and one per ring point), each owned by
//! the point that owns the slot's start. A key therefore always maps to the same
//! endpoint for a given set, and when an endpoint leaves, only the slots it owned change
//! owner: about 1/N of keys move, and no others. The sorted points are kept too (12 bytes
//! each, 1.2 KB per endpoint), for the cold path that finds a key's next owners round the
//! ring when its owner cannot take a call.

use std::hash::{Hash, Hasher};

/// Ring points per endpoint.
const POINTS_PER_ENDPOINT: u64 = 100;

/// The flattened ring (slot → endpoint index) that [`ConsistentHash`](super::ConsistentHash)
/// prepares for each endpoint set.
#[derive(Debug, Clone)]
pub struct HashRing {
    slots: Box<[u32]>,
    /// `64 - log2(slots)`: a hash's top bits index its slot.
    shift: u32,
    /// The ring's points in order, and the endpoint of each: read only to find where a key
    /// goes when its owner cannot take it ([`successors`](Self::successors)).
    points: Box<[u64]>,
    owners: Box<[u32]>,
}

/// A stable 64-bit hash: the same in every process, on every platform and with every Rust
/// release, so that services agree on which endpoint owns a key. (The standard library's
/// `DefaultHasher` promises none of that.) FNV-1a over the value's bytes, integers written
/// little-endian and `usize` as 64 bits, then a SplitMix64 finalizer to spread the bits.
pub(crate) fn stable_hash<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = Fnv1a(0xcbf2_9ce4_8422_2325);
    value.hash(&mut hasher);
    hasher.finish()
}

struct Fnv1a(u64);

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.write(&n.to_le_bytes());
    }

    fn write_u32(&mut self, n: u32) {
        self.write(&n.to_le_bytes());
    }

    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_le_bytes());
    }

    fn write_u128(&mut self, n: u128) {
        self.write(&n.to_le_bytes());
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }

    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl HashRing {
    /// Builds the ring for endpoints whose stable key hashes are `keys`.
    pub(crate) fn build(keys: &[u64]) -> Self {
        let mut points: Vec<(u64, u32)> = keys
            .iter()
            .enumerate()
            .flat_map(|(endpoint, &key)| {
                (0..POINTS_PER_ENDPOINT).map(move |n| (stable_hash(&(key, n)), endpoint as u32))
            })
            .collect();
        points.sort_unstable();
        // One slot per ring point (at least 65 536): small enough to stay in cache at 10 000
        // endpoints (4 MiB), fine enough that each slot's start decides few keys wrongly.
        let wanted = points.len().max(1 << 16);
        let bits = wanted.next_power_of_two().trailing_zeros();
        let size = 1usize << bits;
        let shift = 64 - bits;
        let slots = if points.is_empty() {
            vec![u32::MAX; size]
        } else {
            // Sweep the slots in ring order, advancing through the points.
            let mut next = 0;
            (0..size as u64)
                .map(|slot| {
                    let start = slot << shift;
                    while next < points.len() && points[next].0 < start {
                        next += 1;
                    }
                    // Past the last point, the ring wraps to the first.
                    points[next % points.len()].1
                })
                .collect()
        };
        let (points, owners) = points.into_iter().unzip::<_, _, Vec<_>, Vec<_>>();
        Self {
            slots: slots.into_boxed_slice(),
            shift,
            points: points.into_boxed_slice(),
            owners: owners.into_boxed_slice(),
        }
    }

    /// The endpoint owning `hash`, if the ring has any.
    #[inline]
    pub(crate) fn lookup(&self, hash: u64) -> Option<usize> {
        let owner = self.slots[(hash >> self.shift) as usize];
        (owner != u32::MAX).then_some(owner as usize)
    }

    /// The endpoints that own `hash` in turn as its owners leave, nearest first, after its
    /// owner itself: the first is the owner the key would have in the ring built without its
    /// owner, the second in the ring without either, and so on. Writes at most `into.len()`
    /// and returns how many it wrote (fewer when the ring has fewer other endpoints).
    pub(crate) fn successors(&self, hash: u64, into: &mut [usize]) -> usize {
        if self.points.is_empty() {
            return 0;
        }
        // A key is decided at its slot's start, as `lookup` decides it.
        let start = (hash >> self.shift) << self.shift;
        let first = self.points.partition_point(|&point| point < start);
        let mut owners = (0..self.points.len())
            .map(|step| self.owners[(first + step) % self.points.len()] as usize);
        let Some(owner) = owners.next() else {
            return 0;
        };
        let mut written = 0;
        for endpoint in owners {
            if written == into.len() {
                break;
            }
            if endpoint != owner && !into[..written].contains(&endpoint) {
                into[written] = endpoint;
                written += 1;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stable_hash_is_fixed() {
        // Pinned values: a change here moves keys between endpoints across a fleet that
        // runs two versions, so it must be deliberate.
        assert_eq!(stable_hash("users"), 0x31f5_eb9b_609a_e11b);
        assert_eq!(stable_hash(&42u64), 0xe15f_07fe_f55b_9454);
        assert_eq!(
            stable_hash(&42usize),
            stable_hash(&42u64),
            "usize as 64 bits"
        );
        assert_eq!(stable_hash(&(7u64, 3u64)), 0x46bb_c8fc_a174_5b7f);
    }

    #[test]
    fn keys_are_shared_roughly_evenly() {
        let keys: Vec<u64> = (0..10u64).map(|k| stable_hash(&k)).collect();
        let ring = HashRing::build(&keys);
        let mut counts = [0usize; 10];
        for request in 0..100_000u64 {
            counts[ring.lookup(stable_hash(&request)).unwrap()] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 7_000 && *max < 13_000, "{counts:?}");
    }

    #[test]
    fn when_one_of_n_leaves_only_its_keys_move() {
        let n = 50u64;
        let keys: Vec<u64> = (0..n).map(|k| stable_hash(&k)).collect();
        let before = HashRing::build(&keys);
        let remaining: Vec<u64> = keys.iter().copied().filter(|&k| k != keys[17]).collect();
        let after = HashRing::build(&remaining);
        let lookups = 100_000u64;
        let mut moved = 0;
        for request in 0..lookups {
            let hash = stable_hash(&request);
            let was = keys[before.lookup(hash).unwrap()];
            let is = remaining[after.lookup(hash).unwrap()];
            if was != is {
                assert_eq!(was, keys[17], "only the departed endpoint's keys move");
                moved += 1;
            }
        }
        let share = moved as f64 / lookups as f64;
        assert!(
            share > 0.01 && share < 0.03,
            "moved {share}, about 1/50 expected"
        );
    }

    #[test]
    fn the_successors_of_a_key_are_its_owners_as_the_ring_loses_endpoints() {
        let keys: Vec<u64> = (0..6u64).map(|k| stable_hash(&k)).collect();
        let ring = HashRing::build(&keys);
        let mut rings = std::collections::HashMap::new();
        let mut differed = 0;
        for request in 0..2_000u64 {
            let hash = stable_hash(&request);
            let owner = ring.lookup(hash).unwrap();
            let mut successors = [0; 3];
            assert_eq!(ring.successors(hash, &mut successors), 3);
            // The ring without the owner, then without the first successor too, and so on.
            let mut gone = vec![owner];
            for successor in successors {
                let remaining: Vec<u64> = (0..keys.len())
                    .filter(|i| !gone.contains(i))
                    .map(|i| keys[i])
                    .collect();
                let mut set = gone.clone();
                set.sort_unstable();
                let next = rings
                    .entry(set)
                    .or_insert_with(|| HashRing::build(&remaining))
                    .lookup(hash)
                    .unwrap();
                assert_eq!(keys[successor], remaining[next], "request {request}");
                gone.push(successor);
            }
            differed += usize::from(successors[0] != (owner + 1) % keys.len());
        }
        assert!(
            differed > 1_000,
            "not the next endpoint by index: {differed}"
        );
        let alone = HashRing::build(&keys[..1]);
        assert_eq!(alone.successors(stable_hash(&1u64), &mut [0; 3]), 0);
        assert_eq!(HashRing::build(&[]).successors(1, &mut [0; 3]), 0);
    }

    #[test]
    fn when_one_joins_it_takes_about_one_nth_from_the_others() {
        let keys: Vec<u64> = (0..20u64).map(|k| stable_hash(&k)).collect();
        let before = HashRing::build(&keys[..19]);
        let after = HashRing::build(&keys);
        let lookups = 100_000u64;
        let moved = (0..lookups)
            .filter(|request| {
                let hash = stable_hash(request);
                keys[before.lookup(hash).unwrap()] != keys[after.lookup(hash).unwrap()]
            })
            .count() as f64;
        let share = moved / lookups as f64;
        assert!(
            share > 0.025 && share < 0.075,
            "moved {share}, about 1/20 expected"
        );
    }
}
