//! Memory for a growing [`MemoryEventStore`](super::MemoryEventStore), prepared ahead of the
//! appends that fill it.
//!
//! A store that keeps growing writes into memory the process has never touched, and the first
//! write to each page is a fault the kernel serves. On bare metal that is a fraction of a
//! microsecond per 4 KiB page; on a virtual machine whose host backs guest memory lazily it
//! can be microseconds, which at a few hundred new bytes per event is most of an append.
//! So the store's growing parts are kept in fixed-size [`Segmented`] vectors, and once a store
//! is large enough for growth to matter, a helper thread ([`Reserve`]) prepares the next
//! segments and a batch of event allocations, touching every page, while the appends run:
//! an append then writes only into memory that is already there. Total work is the same; it
//! moves off the appending task, onto whichever core is idle.

use super::event::Event;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

/// Elements per segment of a [`Segmented`] vector (a power of two).
pub(super) const SEGMENT: usize = 1 << 16;

/// Prepared spares of each kind the helper keeps ready.
const KEEP: usize = 2;

/// Event allocations per prepared batch.
const BATCH: usize = 1_024;

/// The smallest page size of the targets we build for: touching one element every this many
/// bytes touches every page.
const PAGE: usize = 4_096;

/// A vector in segments of `SIZE` elements ([`SEGMENT`] but in tests): it grows by adding a
/// segment (prepared by a [`Reserve`], when there is one) instead of reallocating and copying
/// everything, and its first segment grows as a plain `Vec` does, so a small one costs what a
/// `Vec` costs.
pub(super) struct Segmented<T, const SIZE: usize = SEGMENT> {
    first: Vec<T>,
    /// Segments after the first; every segment but the last is full (none is empty).
    rest: Vec<Vec<T>>,
}

impl<T, const SIZE: usize> Default for Segmented<T, SIZE> {
    fn default() -> Self {
        Self {
            first: Vec::new(),
            rest: Vec::new(),
        }
    }
}

impl<T, const SIZE: usize> Segmented<T, SIZE> {
    pub(super) fn len(&self) -> usize {
        match self.rest.last() {
            Some(last) => SIZE * self.rest.len() + last.len(),
            None => self.first.len(),
        }
    }

    pub(super) fn get(&self, index: usize) -> Option<&T> {
        match index / SIZE {
            0 => self.first.get(index),
            segment => self.rest.get(segment - 1)?.get(index % SIZE),
        }
    }

    pub(super) fn last(&self) -> Option<&T> {
        match self.rest.last() {
            Some(last) => last.last(),
            None => self.first.last(),
        }
    }

    /// Adds `value` at the end; a new segment, when one is needed, comes from `spare`.
    #[inline]
    pub(super) fn push(&mut self, value: T, spare: impl FnOnce() -> Vec<T>) {
        const { assert!(SIZE > 0) };
        let last = match self.rest.last_mut() {
            Some(last) if last.len() < SIZE => last,
            None if self.first.len() < SIZE => &mut self.first,
            _ => {
                let spare = spare();
                debug_assert!(spare.is_empty(), "a new segment starts empty");
                self.rest.push(spare);
                self.rest.last_mut().expect("pushed above")
            }
        };
        last.push(value);
    }

    /// The segments in order, as slices.
    fn segments(&self) -> impl Iterator<Item = &[T]> {
        std::iter::once(self.first.as_slice()).chain(self.rest.iter().map(Vec::as_slice))
    }

    /// Every element from `start` on, in order.
    pub(super) fn iter_from(&self, start: usize) -> impl Iterator<Item = &T> {
        let (segment, offset) = (start / SIZE, start % SIZE);
        self.segments()
            .skip(segment)
            .enumerate()
            .flat_map(move |(n, slice)| {
                let from = if n == 0 { offset.min(slice.len()) } else { 0 };
                slice[from..].iter()
            })
    }

    /// Whether `value` is present, for a vector sorted in ascending order.
    pub(super) fn contains_sorted(&self, value: &T) -> bool
    where
        T: Ord,
    {
        // Only the first segment whose last element is not below `value` can hold it.
        if self.rest.is_empty() || self.first.last().is_some_and(|last| last >= value) {
            return self.first.binary_search(value).is_ok();
        }
        let at = self
            .rest
            .partition_point(|segment| segment.last().is_some_and(|last| last < value));
        self.rest
            .get(at)
            .is_some_and(|segment| segment.binary_search(value).is_ok())
    }
}

/// An empty vector with room for [`SEGMENT`] elements, every page of that room written once.
fn touched<T>() -> Vec<T> {
    let mut segment = Vec::<T>::with_capacity(SEGMENT);
    let stride = (PAGE / std::mem::size_of::<T>().max(1)).max(1);
    let room = segment.spare_capacity_mut();
    for slot in room.iter_mut().step_by(stride) {
        *slot = MaybeUninit::zeroed();
    }
    // The room need not start on a page: its last page may hold no slot of the stride.
    if let Some(last) = room.last_mut() {
        *last = MaybeUninit::zeroed();
    }
    // The writes are what this is for: keep the optimizer from judging them dead.
    std::hint::black_box(segment.spare_capacity_mut());
    segment
}

/// An empty vector with room for [`SEGMENT`] elements, its pages touched as it fills.
pub(super) fn untouched<T>() -> Vec<T> {
    Vec::with_capacity(SEGMENT)
}

/// An event allocation to be overwritten by a stored event (see [`Reserve::allocations`]).
fn placeholder() -> Arc<Event> {
    Arc::new(Event {
        id: uuid::Uuid::nil(),
        event_type: String::new(),
        aggregate_id: String::new(),
        data: serde_json::Value::Null,
        metadata: Default::default(),
        timestamp: SystemTime::UNIX_EPOCH,
        version: 0,
    })
}

/// Spares made ahead for a growing store by a helper thread of its own.
///
/// Takers never wait: when nothing is ready (the helper has fallen behind), they make what
/// they need themselves, as a store without a reserve does (its pages are then touched as
/// they are filled). The helper keeps [`KEEP`] spares of each kind ready, about 4.4 MiB in
/// all, segments before allocation batches (a segment is taken once per 65 536 events, a
/// batch every 1 024), and stops when the reserve is dropped.
pub(super) struct Reserve {
    shared: Arc<Shared>,
    /// The helper, detached when the reserve is dropped (dropping never waits for it); the
    /// tests join it.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    ready: Mutex<Ready>,
    /// Allocation batches in `ready`, read without the lock: a store whose appends outrun
    /// the helper asks for a batch on every append, and finds none without locking.
    batches: AtomicUsize,
    /// Signalled when a spare is taken, or the reserve closed.
    taken: Condvar,
    /// Signalled when the helper has stored a spare.
    made: Condvar,
}

#[derive(Default)]
struct Ready {
    events: Vec<Vec<Arc<Event>>>,
    ids: Vec<Vec<u128>>,
    positions: Vec<Vec<u64>>,
    /// Batches of [`BATCH`] unshared event allocations.
    allocations: Vec<Vec<Arc<Event>>>,
    closed: bool,
}

impl Ready {
    /// The first kind of spare with fewer than [`KEEP`] ready, if any.
    fn missing(&self) -> Option<Kind> {
        [
            (Kind::Events, self.events.len()),
            (Kind::Ids, self.ids.len()),
            (Kind::Positions, self.positions.len()),
            (Kind::Allocations, self.allocations.len()),
        ]
        .into_iter()
        .find(|&(_, count)| count < KEEP)
        .map(|(kind, _)| kind)
    }

    fn store(&mut self, spare: Spare) {
        match spare {
            Spare::Allocations(batch) => self.allocations.push(batch),
            Spare::Events(segment) => self.events.push(segment),
            Spare::Ids(segment) => self.ids.push(segment),
            Spare::Positions(segment) => self.positions.push(segment),
        }
    }
}

/// A kind of spare.
#[derive(Clone, Copy)]
enum Kind {
    Allocations,
    Events,
    Ids,
    Positions,
}

/// One prepared spare.
enum Spare {
    Allocations(Vec<Arc<Event>>),
    Events(Vec<Arc<Event>>),
    Ids(Vec<u128>),
    Positions(Vec<u64>),
}

impl Kind {
    fn make(self) -> Spare {
        match self {
            Self::Allocations => Spare::Allocations((0..BATCH).map(|_| placeholder()).collect()),
            Self::Events => Spare::Events(touched()),
            Self::Ids => Spare::Ids(touched()),
            Self::Positions => Spare::Positions(touched()),
        }
    }
}

impl Reserve {
    /// Starts the helper thread; `None` if the system refuses a thread (the store then makes
    /// its memory as it goes).
    pub(super) fn start() -> Option<Self> {
        let shared = Arc::new(Shared {
            ready: Mutex::new(Ready::default()),
            batches: AtomicUsize::new(0),
            taken: Condvar::new(),
            made: Condvar::new(),
        });
        let helper = shared.clone();
        let thread = std::thread::Builder::new()
            .name("meshkit-store-reserve".into())
            .spawn(move || helper.run())
            .ok()?;
        Some(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A segment for the store's events.
    pub(super) fn events(&self) -> Vec<Arc<Event>> {
        self.take(|ready| ready.events.pop())
            .unwrap_or_else(untouched)
    }

    /// A segment for the id index.
    pub(super) fn ids(&self) -> Vec<u128> {
        self.take(|ready| ready.ids.pop()).unwrap_or_else(untouched)
    }

    /// A segment for an aggregate's positions.
    pub(super) fn positions(&self) -> Vec<u64> {
        self.take(|ready| ready.positions.pop())
            .unwrap_or_else(untouched)
    }

    /// A batch of unshared event allocations, each to be overwritten with a stored event
    /// (empty if none is ready).
    pub(super) fn allocations(&self) -> Vec<Arc<Event>> {
        if self.shared.batches.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        self.take(|ready| {
            let batch = ready.allocations.pop();
            self.shared
                .batches
                .store(ready.allocations.len(), Ordering::Relaxed);
            batch
        })
        .unwrap_or_default()
    }

    /// Waits until the helper has every kind of spare ready.
    #[cfg(test)]
    fn wait_until_full(&self) {
        let mut ready = self.shared.lock();
        while ready.missing().is_some() {
            ready = self
                .shared
                .made
                .wait(ready)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn take<T>(&self, pick: impl FnOnce(&mut Ready) -> Option<T>) -> Option<T> {
        let spare = pick(&mut self.shared.lock());
        if spare.is_some() {
            self.shared.taken.notify_one();
        }
        spare
    }
}

impl Drop for Reserve {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.taken.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The helper: prepares what is missing, without the lock, until the reserve is dropped.
    fn run(&self) {
        let mut ready = self.lock();
        while !ready.closed {
            match ready.missing() {
                Some(kind) => {
                    drop(ready);
                    let spare = kind.make();
                    ready = self.lock();
                    ready.store(spare);
                    self.batches
                        .store(ready.allocations.len(), Ordering::Relaxed);
                    self.made.notify_all();
                }
                None => ready = self.taken.wait(ready).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Across segment boundaries, a segmented vector answers as a plain one does, whether
        /// its new segments come with room or without.
        #[test]
        fn a_segmented_vector_behaves_as_a_vec(
            values in prop::collection::vec(0u32..1_000, 0..40),
            probes in prop::collection::vec(0u32..1_100, 1..20),
            with_room in any::<bool>(),
        ) {
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let mut segmented = Segmented::<u32, 4>::default();
            for &value in &sorted {
                segmented.push(value, || if with_room { Vec::with_capacity(4) } else { Vec::new() });
            }
            prop_assert_eq!(segmented.len(), sorted.len());
            prop_assert_eq!(segmented.last(), sorted.last());
            for index in 0..sorted.len() + 2 {
                prop_assert_eq!(segmented.get(index), sorted.get(index));
                let tail: Vec<u32> = segmented.iter_from(index).copied().collect();
                prop_assert_eq!(&tail[..], sorted.get(index..).unwrap_or(&[]));
            }
            for probe in probes {
                prop_assert_eq!(segmented.contains_sorted(&probe), sorted.binary_search(&probe).is_ok());
            }
        }
    }

    #[test]
    fn the_reserve_hands_out_room_and_unshared_allocations_and_stops_when_dropped() {
        let mut reserve = Reserve::start().expect("a thread");
        reserve.wait_until_full();
        let segment = reserve.events();
        assert!(segment.is_empty() && segment.capacity() >= SEGMENT);
        assert!(reserve.ids().capacity() >= SEGMENT);
        assert!(reserve.positions().capacity() >= SEGMENT);
        let mut allocations = reserve.allocations();
        assert_eq!(allocations.len(), BATCH);
        assert!(allocations.iter_mut().all(|a| Arc::get_mut(a).is_some()));

        let helper = Arc::downgrade(&reserve.shared);
        let thread = reserve.thread.take().expect("started");
        drop(reserve);
        thread.join().expect("the helper ends cleanly");
        assert!(
            helper.upgrade().is_none(),
            "the helper let go of the reserve"
        );
    }
}
