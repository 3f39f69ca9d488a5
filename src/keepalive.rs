//! Keeps a layer's shared state alive for its in-flight calls without a reference count per
//! call.
//!
//! A call future that holds an `Arc` pays an atomic increment and decrement (about 12 ns here,
//! and a contended cache line when two cores share the layer). Futures hold the state's id
//! instead and find the state again, on their slow path, through [`find`] (or the state's
//! registry). The state must then outlive the services that made the calls: `oneshot` drops
//! its service while the call runs. So services hold the state through an [`Owner`], which on
//! drop hands its reference to a small direct-mapped thread-local cache ([`keep`]) instead of
//! releasing it: nothing is paid per call.
//!
//! A state therefore lives until the threads that dropped its services have evicted it (another
//! state with a colliding id dropped there) or exited; up to [`SLOTS`] states per thread stay
//! alive that way after their services are gone (with their budgets). A call takes a counted
//! reference as soon as it leaves the fast path (a timeout is armed, or its first try asks
//! for a retry). Only a call whose services are all dropped, and whose thread evicts the state
//! (more than [`SLOTS`] other services dropped there) before its first try finishes, finds the
//! state gone: it then returns that try's result without a retry, and says so in a `warn`
//! event.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// Cache slots per thread.
pub(crate) const SLOTS: usize = 64;

type Kept = Arc<dyn Any + Send + Sync>;

struct Slots {
    /// The id each slot holds, checked without touching the `RefCell`s (0: empty).
    ids: [Cell<u64>; SLOTS],
    values: [RefCell<Option<Kept>>; SLOTS],
}

thread_local! {
    static SLOTS_: Slots = const {
        Slots {
            ids: [const { Cell::new(0) }; SLOTS],
            values: [const { RefCell::new(None) }; SLOTS],
        }
    };
}

fn slot_of(id: u64) -> usize {
    (id % SLOTS as u64) as usize
}

/// Keeps `value` (whose id is `id`, never 0) alive on this thread.
#[inline]
pub(crate) fn keep<T: Any + Send + Sync>(id: u64, value: &Arc<T>) {
    let hit = SLOTS_
        .try_with(|slots| slots.ids[slot_of(id)].get() == id)
        .unwrap_or(true);
    if !hit {
        keep_after_miss(id, value.clone());
    }
}

#[cold]
#[inline(never)]
fn keep_after_miss(id: u64, value: Kept) {
    let evicted = SLOTS_.try_with(|slots| {
        let slot = slot_of(id);
        let mut kept = slots.values[slot].try_borrow_mut().ok()?;
        slots.ids[slot].set(id);
        kept.replace(value)
    });
    // Dropped outside the borrow: a state's drop may re-enter this module.
    drop(evicted);
}

/// Shared state with an id, whose last references survive in the dropping thread's cache.
#[derive(Debug)]
pub(crate) struct Owner<T: Any + Send + Sync> {
    id: u64,
    value: Arc<T>,
}

impl<T: Any + Send + Sync> Owner<T> {
    pub(crate) fn new(id: u64, value: Arc<T>) -> Self {
        Self { id, value }
    }

    /// A counted reference, for slow paths that may outlive every owner.
    pub(crate) fn arc(&self) -> Arc<T> {
        self.value.clone()
    }
}

impl<T: Any + Send + Sync> Clone for Owner<T> {
    fn clone(&self) -> Self {
        Self::new(self.id, self.value.clone())
    }
}

impl<T: Any + Send + Sync> std::ops::Deref for Owner<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Any + Send + Sync> Drop for Owner<T> {
    fn drop(&mut self) {
        keep(self.id, &self.value);
    }
}

/// The state with this id if this thread keeps it.
pub(crate) fn find<T: Any + Send + Sync>(id: u64) -> Option<Arc<T>> {
    SLOTS_
        .try_with(|slots| {
            let slot = slot_of(id);
            if slots.ids[slot].get() != id {
                return None;
            }
            slots.values[slot].try_borrow().ok()?.clone()
        })
        .ok()
        .flatten()
        .and_then(|kept| kept.downcast().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_last_owner_keeps_the_value_on_this_thread() {
        let owner = Owner::new(5, Arc::new(String::from("retry state")));
        let weak = Arc::downgrade(&owner.value);
        drop(owner.clone());
        drop(owner);
        assert!(weak.upgrade().is_some());
        assert!(find::<String>(5).is_some());
    }

    #[test]
    fn a_kept_value_outlives_its_other_owners_until_evicted() {
        let value = Arc::new(String::from("state"));
        let weak = Arc::downgrade(&value);
        keep(3, &value);
        drop(value);
        assert_eq!(
            find::<String>(3).as_deref().map(String::as_str),
            Some("state")
        );
        assert!(find::<u32>(3).is_none(), "a different type is not found");
        keep(3 + SLOTS as u64, &Arc::new(String::from("other")));
        assert!(weak.upgrade().is_none(), "evicted by a colliding id");
        assert!(find::<String>(3).is_none());
    }
}
