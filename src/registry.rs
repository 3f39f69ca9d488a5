//! Ids for shared layer state, so that in-flight futures can hold a plain `u64` instead of an
//! `Arc` (whose reference count two threads would fight over on every call) and find the state
//! again on their slow paths.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::LocalKey;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Every live `T` by id. Entries are weak: the owner unregisters on drop.
#[derive(Debug)]
pub(crate) struct Registry<T> {
    live: Mutex<BTreeMap<u64, Weak<T>>>,
}

impl<T> Registry<T> {
    pub(crate) const fn new() -> Self {
        Self {
            live: Mutex::new(BTreeMap::new()),
        }
    }

    /// A fresh id, never handed out before by any registry (ids key one thread-local cache
    /// shared by every kind of state, see [`crate::keepalive`]), never 0.
    pub(crate) fn next_id(&self) -> u64 {
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn insert(&self, id: u64, value: Weak<T>) {
        self.live().insert(id, value);
    }

    pub(crate) fn remove(&self, id: u64) {
        self.live().remove(&id);
    }

    /// The live value with this id.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<T>> {
        self.live().get(&id).and_then(Weak::upgrade)
    }

    fn live(&self) -> MutexGuard<'_, BTreeMap<u64, Weak<T>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A state that knows its id in its [`Registry`].
pub(crate) trait Keyed {
    fn key(&self) -> u64;
}

/// States of one kind a thread keeps.
const RECENT: usize = 4;

/// The last few states of one kind a thread had to look up in their registry, for calls that
/// hold only a state's id and find it again when they finish: no reference count is written
/// per call (an `Arc` cloned and dropped per call costs two locked instructions). Meant for
/// kinds of which a thread uses few at once (a mesh's lifecycle): a thread that uses more
/// in turn goes to the registry (a lock) each time. The states stay alive while a thread
/// keeps them, until later lookups replace them (the oldest first).
pub(crate) struct Recent<T>(RefCell<[Option<Arc<T>>; RECENT]>);

impl<T> Recent<T> {
    pub(crate) const fn new() -> Self {
        Self(RefCell::new([const { None }; RECENT]))
    }
}

/// Calls `f` with the state `id` of `registry`: one of those this thread (`recent`) used
/// last, or else the live one the registry has, which the thread keeps from then on. `None`
/// when the state is gone.
#[inline]
pub(crate) fn with_recent<T: Keyed, R>(
    recent: &'static LocalKey<Recent<T>>,
    registry: &Registry<T>,
    id: u64,
    f: impl FnOnce(&T) -> R,
) -> Option<R> {
    let mut f = Some(f);
    let found = recent
        .try_with(|recent| {
            let kept = recent.0.try_borrow().ok()?;
            let state = kept.iter().flatten().find(|state| state.key() == id)?;
            f.take().map(|f| f(state))
        })
        .ok()
        .flatten();
    match (found, f) {
        (Some(result), _) => Some(result),
        (None, Some(f)) => with_registered(recent, registry, id, f),
        (None, None) => None,
    }
}

#[cold]
#[inline(never)]
fn with_registered<T: Keyed, R>(
    recent: &'static LocalKey<Recent<T>>,
    registry: &Registry<T>,
    id: u64,
    f: impl FnOnce(&T) -> R,
) -> Option<R> {
    let state = registry.get(id)?;
    let result = f(&state);
    let replaced = recent.try_with(|recent| {
        let mut kept = recent.0.try_borrow_mut().ok()?;
        // The newest first; the oldest goes.
        kept.rotate_right(1);
        kept[0].replace(state)
    });
    // Dropped outside the borrow: a state's drop may use its kind's `Recent` again.
    drop(replaced);
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_live_values_and_forgets_removed_ones() {
        static NUMBERS: Registry<u32> = Registry::new();
        let value = Arc::new(7);
        let id = NUMBERS.next_id();
        NUMBERS.insert(id, Arc::downgrade(&value));
        assert_eq!(NUMBERS.get(id).as_deref(), Some(&7));
        NUMBERS.remove(id);
        assert!(NUMBERS.get(id).is_none());
        assert_ne!(NUMBERS.next_id(), id);
    }

    struct Numbered(u64);

    impl Keyed for Numbered {
        fn key(&self) -> u64 {
            self.0
        }
    }

    static NUMBERED: Registry<Numbered> = Registry::new();

    thread_local! {
        static RECENTLY: Recent<Numbered> = const { Recent::new() };
    }

    #[test]
    fn a_thread_finds_its_recent_states_and_keeps_them_alive() {
        let states: Vec<_> = (0..RECENT + 2)
            .map(|_| {
                let state = Arc::new(Numbered(NUMBERED.next_id()));
                NUMBERED.insert(state.0, Arc::downgrade(&state));
                state
            })
            .collect();
        let ids: Vec<u64> = states.iter().map(|state| state.0).collect();
        for &id in &ids {
            assert_eq!(
                with_recent(&RECENTLY, &NUMBERED, id, |state| state.0),
                Some(id)
            );
        }
        let weak: Vec<_> = states.iter().map(Arc::downgrade).collect();
        drop(states);
        // The last `RECENT` used stay alive on this thread; the older ones went with their
        // last owner, and are not found any more.
        let alive: Vec<bool> = weak.iter().map(|weak| weak.upgrade().is_some()).collect();
        assert_eq!(alive, [false, false, true, true, true, true]);
        assert_eq!(
            with_recent(&RECENTLY, &NUMBERED, ids[0], |state| state.0),
            None
        );
        assert_eq!(
            with_recent(&RECENTLY, &NUMBERED, ids[5], |state| state.0),
            Some(ids[5])
        );
    }
}
