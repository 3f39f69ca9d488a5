//! [`MemoryEventStore`]: the embedded event store.

use super::bus::EventBus;
use super::event::Event;
use super::reserve::{untouched, Reserve, Segmented, SEGMENT};
use super::store::{AppendError, EventStore, ExpectedVersion, StoredEvent};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// Live events kept for subscribers that are catching up; further behind, they re-read.
const LIVE_CAPACITY: usize = 4_096;

/// The embedded event store: every event in memory, in one global order. Cheap to clone
/// (clones share one store).
///
/// Appends take one lock; events are shared (`Arc`) between the store, readers and the bus.
/// With [`with_bus`](Self::with_bus), every appended event is also published on the bus.
///
/// The store grows in segments of 65 536 events rather than reallocating, so an append costs
/// the same at ten thousand events and at ten million. Once it holds 16 384 events it starts
/// a helper thread that prepares, ahead of the appends, the next segments and batches of
/// event allocations, writing every page once: where the first touch of memory is slow (a
/// virtual machine whose host backs its memory lazily can take several microseconds per
/// 4 KiB page) that cost leaves the appending task, as long as the helper keeps up (on the
/// virtual machines meshkit is benchmarked on it prepares about 5.7 M event allocations a
/// second; appends that outrun it allocate for themselves). The helper keeps about 4.4 MiB
/// ready and is told to stop when the store's last clone and subscription are dropped;
/// appends never wait for it (the one that starts it spawns the thread).
///
/// ```
/// use meshkit::events::{Event, EventStore, ExpectedVersion, MemoryEventStore};
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), meshkit::events::AppendError> {
/// let store = MemoryEventStore::new();
/// let created = Event::new("UserCreated", "user-7", json!({ "name": "Ada" }));
/// assert_eq!(store.append("user-7", ExpectedVersion::NoStream, vec![created.clone()]).await?, 1);
/// // The same event again is stored once.
/// assert_eq!(store.append("user-7", ExpectedVersion::Any, vec![created]).await?, 1);
/// let stream = store.read_stream("user-7", 1).await;
/// assert_eq!(stream[0].event.version, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    live: broadcast::Sender<StoredEvent>,
    /// Live receivers of `live` (see [`Follower`]): with none, an append skips the channel,
    /// whose receiver count sits behind a lock of its own.
    followers: AtomicUsize,
    bus: Option<EventBus>,
    max_event_size: usize,
}

/// A store this large starts a [`Reserve`] to prepare its memory ahead (the first new segment
/// is needed at [`SEGMENT`] events): smaller ones never start a thread.
const RESERVE_FROM: usize = SEGMENT / 4;

#[derive(Default)]
struct State {
    /// Every event, at index position - 1.
    all: Segmented<Arc<Event>>,
    /// Positions of each aggregate's events, in version order.
    streams: HashMap<String, Segmented<u64>>,
    ids: Ids,
    /// Event allocations the reserve made ahead, each unshared, to be overwritten.
    allocations: Vec<Arc<Event>>,
    reserve: Option<Reserve>,
    /// Whether the reserve was started (or refused: then the store does without).
    reserve_tried: bool,
}

/// Every stored event id, for idempotent appends.
///
/// UUID v7 ids grow with time, so nearly every new id is above every stored one: those are
/// kept in a sorted vector, where checking and adding one costs a comparison and a push
/// however large the store grows (a hash set would touch a random line of a table as large
/// as the store, and grow slower with it). Ids that arrive out of order (other versions,
/// clocks of other hosts) go to an ordered set beside it.
#[derive(Default)]
struct Ids {
    ascending: Segmented<u128>,
    others: BTreeSet<u128>,
}

impl Ids {
    fn contains(&self, id: u128) -> bool {
        match self.ascending.last() {
            Some(&last) if id <= last => {
                self.ascending.contains_sorted(&id) || self.others.contains(&id)
            }
            _ => false,
        }
    }

    /// Adds `id` (a new segment, if needed, from `spare`); false if it was already there.
    fn insert(&mut self, id: u128, spare: impl FnOnce() -> Vec<u128>) -> bool {
        match self.ascending.last() {
            Some(&last) if id <= last => {
                !self.ascending.contains_sorted(&id) && self.others.insert(id)
            }
            _ => {
                self.ascending.push(id, spare);
                true
            }
        }
    }
}

/// A new segment for a growing vector: from the reserve, if the store has one.
fn segment<T>(reserve: Option<&Reserve>, take: fn(&Reserve) -> Vec<T>) -> Vec<T> {
    reserve.map_or_else(untouched, take)
}

/// `event`, shared, in an allocation the reserve made ahead when there is one.
fn share(event: Event, allocations: &mut Vec<Arc<Event>>, reserve: Option<&Reserve>) -> Arc<Event> {
    if allocations.is_empty() {
        if let Some(reserve) = reserve {
            *allocations = reserve.allocations();
        }
    }
    // Prepared allocations are never shared, so `get_mut` always finds the place.
    if let Some(mut allocation) = allocations.pop() {
        if let Some(place) = Arc::get_mut(&mut allocation) {
            *place = event;
            return allocation;
        }
    }
    Arc::new(event)
}

impl State {
    /// The event at `position` (from 1), which must be stored.
    fn stored(&self, position: u64) -> StoredEvent {
        StoredEvent {
            position,
            event: self
                .all
                .get((position - 1) as usize)
                .expect("stored")
                .clone(),
        }
    }

    /// Events from `position` (from 1) on, in order.
    fn events_from(&self, position: u64) -> impl Iterator<Item = StoredEvent> + '_ {
        let start = position.max(1) - 1;
        self.all
            .iter_from(start as usize)
            .zip(start + 1..)
            .map(|(event, position)| StoredEvent {
                position,
                event: event.clone(),
            })
    }
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventStore {
    /// An empty store accepting events up to 1 MiB serialized.
    pub fn new() -> Self {
        Self::build(None, 1 << 20)
    }

    /// An empty store that also publishes every appended event on `bus`, with its position.
    /// One store per bus: subscribers drop a stored event whose position is not past the
    /// last one they saw (a duplicate of what they caught up on), so the events of a second
    /// store, numbered from 1 too, would be dropped.
    pub fn with_bus(bus: EventBus) -> Self {
        Self::build(Some(bus), 1 << 20)
    }

    /// An empty store (publishing on `bus`, if any; one store per bus, as for
    /// [`with_bus`](Self::with_bus)) that rejects events larger than `max_event_size` bytes
    /// serialized. The size counts the data, type, aggregate and metadata as serialized
    /// (escapes included), and the fixed fields (id, time, version, field names) as 192
    /// bytes, at least what they take.
    pub fn with_options(bus: Option<EventBus>, max_event_size: usize) -> Self {
        Self::build(bus, max_event_size)
    }

    fn build(bus: Option<EventBus>, max_event_size: usize) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                live,
                followers: AtomicUsize::new(0),
                bus,
                max_event_size,
            }),
        }
    }

    /// Events stored.
    pub fn len(&self) -> usize {
        self.inner.state().all.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append_now(
        &self,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> Result<u64, AppendError> {
        for event in &events {
            if event.aggregate_id != aggregate_id {
                return Err(AppendError::WrongAggregate { id: event.id });
            }
            // Sized before the lock, by serializing into a counter (no buffer).
            let size = serialized_size(event);
            if size > self.inner.max_event_size {
                return Err(AppendError::TooLarge {
                    id: event.id,
                    size,
                    limit: self.inner.max_event_size,
                });
            }
        }
        let mut guard = self.inner.state();
        if !guard.reserve_tried && guard.all.len() >= RESERVE_FROM {
            guard.reserve_tried = true;
            guard.reserve = Reserve::start();
        }
        let State {
            all,
            streams,
            ids,
            allocations,
            reserve,
            ..
        } = &mut *guard;
        let reserve = reserve.as_ref();
        let mut stream = streams.get_mut(aggregate_id);
        let actual = stream.as_ref().map_or(0, |s| s.len() as u64);
        let stored_before = events
            .iter()
            .filter(|event| ids.contains(event.id.as_u128()))
            .count();
        if stored_before == events.len() && !events.is_empty() {
            // Everything already stored (a retried append): idempotent.
            return Ok(actual);
        }
        if !expected.accepts(actual) {
            return Err(AppendError::Conflict { expected, actual });
        }
        let first = all.len() as u64 + 1;
        let mut version = actual;
        for mut event in events {
            // A duplicate within the batch is caught here too: the first copy is in `ids`.
            if !ids.insert(event.id.as_u128(), || segment(reserve, Reserve::ids)) {
                continue;
            }
            version += 1;
            event.version = version;
            all.push(share(event, allocations, reserve), || {
                segment(reserve, Reserve::events)
            });
        }
        let positions = first..all.len() as u64 + 1;
        let add = |stream: &mut Segmented<u64>| {
            for position in positions {
                stream.push(position, || segment(reserve, Reserve::positions));
            }
        };
        match stream.as_mut() {
            Some(stream) => add(stream),
            None => {
                let mut new = Segmented::default();
                add(&mut new);
                streams.insert(aggregate_id.to_string(), new);
            }
        }
        // Published under the lock, so live subscribers see positions in order.
        // Followers subscribe under this lock too, so the count is exact here.
        let live = self.inner.followers.load(Ordering::Relaxed) > 0;
        if live || self.inner.bus.is_some() {
            for stored in guard.events_from(first) {
                if let Some(bus) = &self.inner.bus {
                    bus.publish_stored(stored.event.clone(), stored.position);
                }
                if live {
                    let _ = self.inner.live.send(stored);
                }
            }
        }
        Ok(version)
    }
}

/// An event's size as JSON: its data serialized into a counter (no buffer), plus its strings
/// and the fixed-size fields (id, timestamp, version, punctuation) at their largest.
fn serialized_size(event: &Event) -> usize {
    /// Field names, the id, an RFC 3339 timestamp with nanoseconds and a 20-digit version:
    /// 173 bytes with a `Z` timestamp, with room for an offset.
    const FIXED: usize = 192;
    let strings = json_size(&event.event_type)
        + json_size(&event.aggregate_id)
        + event
            .metadata
            .iter()
            .map(|(k, v)| json_size(k) + json_size(v) + 2)
            .sum::<usize>();
    json_size(&event.data).saturating_add(strings + FIXED)
}

/// `value` serialized as JSON (quotes and escapes included), counted without building it.
fn json_size<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventStore for MemoryEventStore {
    fn append(
        &self,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<u64, AppendError>> {
        let result = self.append_now(aggregate_id, expected, events);
        Box::pin(async move { result })
    }

    fn read_stream(
        &self,
        aggregate_id: &str,
        from_version: u64,
    ) -> BoxFuture<'_, Vec<StoredEvent>> {
        let state = self.inner.state();
        let events = state
            .streams
            .get(aggregate_id)
            .map(|positions| {
                positions
                    .iter_from(from_version.saturating_sub(1) as usize)
                    .map(|&position| state.stored(position))
                    .collect()
            })
            .unwrap_or_default();
        drop(state);
        Box::pin(async move { events })
    }

    fn read_all(&self, from_position: u64, limit: usize) -> BoxFuture<'_, Vec<StoredEvent>> {
        let state = self.inner.state();
        let events = state.events_from(from_position).take(limit).collect();
        drop(state);
        Box::pin(async move { events })
    }

    fn subscribe(&self, from_position: u64) -> BoxStream<'static, StoredEvent> {
        let inner = self.inner.clone();
        let stream = futures::stream::unfold(
            (
                inner,
                from_position.max(1),
                None::<Follower>,
                Vec::<StoredEvent>::new(),
            ),
            |(inner, mut next, mut live, mut backlog)| async move {
                loop {
                    if let Some(stored) = backlog.pop() {
                        next = stored.position + 1;
                        return Some((stored, (inner, next, live, backlog)));
                    }
                    if let Some(follower) = live.as_mut() {
                        match follower.receiver.recv().await {
                            // Already delivered from the backlog: skip.
                            Ok(stored) if stored.position < next => continue,
                            Ok(stored) => {
                                next = stored.position + 1;
                                return Some((stored, (inner, next, live, backlog)));
                            }
                            // Fell behind the live channel: read the store again.
                            Err(broadcast::error::RecvError::Lagged(_)) => live = None,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        }
                        continue;
                    }
                    // Subscribe to live events and read the backlog under one lock: nothing
                    // is appended in between, so there is no gap and no duplicate.
                    let state = inner.state();
                    live = Some(Follower::new(&inner));
                    backlog = state.events_from(next).collect();
                    drop(state);
                    backlog.reverse();
                }
            },
        );
        Box::pin(stream)
    }
}

/// A subscriber's receiver of the store's live channel, counted in `Inner::followers` while
/// it exists. Made under the state lock.
struct Follower {
    receiver: broadcast::Receiver<StoredEvent>,
    inner: Arc<Inner>,
}

impl Follower {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.followers.fetch_add(1, Ordering::Relaxed);
        Self {
            receiver: inner.live.subscribe(),
            inner: inner.clone(),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.inner.followers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for MemoryEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryEventStore")
            .field("events", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{serialized_size, Ids};
    use crate::events::Event;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        /// The size an append checks is never below the event's JSON, escapes included, and
        /// above it by at most the fixed fields' allowance.
        #[test]
        fn the_checked_size_bounds_the_serialized_size(
            text in "[\"\\\\\\x00-\\x1f a-z\u{e9}]{0,40}",
            version in any::<u64>(),
        ) {
            let mut event = Event::new(text.clone(), text.clone(), serde_json::json!({ "t": text }));
            event.metadata.insert(text.clone(), text.clone());
            event.version = version;
            let exact = serde_json::to_vec(&event).unwrap().len();
            let checked = serialized_size(&event);
            prop_assert!(checked >= exact, "{checked} < {exact}");
            prop_assert!(checked <= exact + 192, "{checked} > {exact} + 192");
        }
    }

    proptest! {
        /// Mostly ascending ids with repeats and stragglers, as v7 ids from several hosts
        /// arrive: the index answers as a plain set does.
        #[test]
        fn the_id_index_behaves_as_a_set(steps in prop::collection::vec((0u8..4, 0u128..50), 1..300)) {
            let mut ids = Ids::default();
            let mut model = HashSet::new();
            let mut next = 100u128;
            for (kind, offset) in steps {
                let id = match kind {
                    0 | 1 => { next += offset + 1; next }      // newer than every id so far
                    2 => next.saturating_sub(offset),           // a repeat or a straggler
                    _ => offset,                                // far older
                };
                prop_assert_eq!(ids.contains(id), model.contains(&id));
                prop_assert_eq!(ids.insert(id, Vec::new), model.insert(id));
                prop_assert!(ids.contains(id));
            }
        }
    }
}
