//! Ids for shared layer state, so that in-flight futures can hold a plain `u64` instead of an
//! `Arc` (whose reference count two threads would fight over on every call) and find the state
//! again on their slow paths.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

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
}
