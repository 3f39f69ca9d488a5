//! Keeps a layer's shared state alive for its in-flight calls without a reference count per
//! call.
//!
//! A call future that holds an `Arc` pays an atomic increment and decrement (about 12 ns here,
//! and a contended cache line when two cores share the layer). Futures hold the state's id
//! instead and find the state again, on their slow path, through [`find`]. The state must then
//! outlive the service that made the call (`oneshot` drops the service while its future
//! runs): each thread that makes calls keeps a strong reference in a small direct-mapped
//! thread-local cache, filled by [`keep`] on the call path (a compare on a hit).
//!
//! A state therefore lives until every thread that called through it has evicted it (another
//! state with a colliding id) or exited. If a call's thread evicts the state and every service
//! is dropped before the call reaches its slow path, the state is gone and the slow path does
//! without it (a retry is not made); that takes more than [`SLOTS`] states in use on one
//! thread at once.

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
