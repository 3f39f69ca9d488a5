//! Per-thread call counters that the closed-state success path updates without any atomic
//! read-modify-write, lock or reference count.
//!
//! Each thread that finishes calls through a breaker gets its own [`Cell`], written only by
//! that thread (a relaxed load and store, so no lost updates), read by the slow path, which
//! adds all cells up. A thread finds its cell through a small direct-mapped thread-local
//! cache keyed by the breaker's id; a miss goes through a global id → breaker registry, once
//! per thread and breaker. In-flight futures therefore hold just the breaker's id, not an
//! `Arc`, which would cost two contended atomic operations per call.
//!
//! Each cell also carries a copy of the breaker's mode word, rewritten (under the cells'
//! lock) whenever the breaker publishes a new one, so that a finishing call checks the
//! breaker's current generation and fast flag on the cache line it is about to write anyway.

use super::shared::Shared;
use crate::registry::Registry;
use std::cell::{OnceCell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Thread-local cache slots; breakers whose ids collide evict each other (correct, slower).
const SLOTS: usize = 64;

/// One thread's counters for one breaker.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Cell {
    calls: AtomicU64,
    rejected: AtomicU64,
    /// The breaker's current mode word (see `Shared::store_mode`).
    mode: AtomicU64,
    /// Dead once the owning thread has exited; its counts are then folded and the cell freed.
    owner: Weak<()>,
}

impl Cell {
    /// The breaker's current mode word.
    #[inline]
    pub(crate) fn mode(&self) -> u64 {
        self.mode.load(Ordering::Acquire)
    }

    /// Counts one recorded call. Only the owning thread may call this.
    #[inline]
    pub(crate) fn count_call(&self) {
        bump(&self.calls);
    }

    /// Counts one rejected call. Only the owning thread may call this.
    pub(crate) fn count_rejection(&self) {
        bump(&self.rejected);
    }
}

#[inline]
fn bump(counter: &AtomicU64) {
    // Single writer: a plain load and store cannot lose an update, and is far cheaper than
    // `fetch_add`, which locks the cache line.
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// All cells of one breaker, plus what exited threads counted.
#[derive(Debug, Default)]
pub(crate) struct Cells {
    live: Vec<Arc<Cell>>,
    /// The mode word new cells start with.
    mode: u64,
    retired_calls: u64,
    retired_rejected: u64,
}

impl Cells {
    pub(crate) fn new(mode: u64) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// Gives every cell the breaker's new mode word.
    pub(crate) fn publish(&mut self, mode: u64) {
        self.mode = mode;
        for cell in &self.live {
            cell.mode.store(mode, Ordering::Release);
        }
    }

    fn prune(&mut self) {
        let (mut calls, mut rejected) = (0, 0);
        self.live.retain(|cell| {
            if cell.owner.strong_count() > 0 {
                return true;
            }
            // The owner's last relaxed stores happen before its token's drop; see them.
            std::sync::atomic::fence(Ordering::Acquire);
            calls += cell.calls.load(Ordering::Relaxed);
            rejected += cell.rejected.load(Ordering::Relaxed);
            false
        });
        self.retired_calls += calls;
        self.retired_rejected += rejected;
    }

    /// Calls counted by every thread so far.
    pub(crate) fn calls(&mut self) -> u64 {
        self.prune();
        self.retired_calls + self.live_sum(|cell| &cell.calls)
    }

    /// Rejections counted by every thread so far.
    pub(crate) fn rejected(&mut self) -> u64 {
        self.prune();
        self.retired_rejected + self.live_sum(|cell| &cell.rejected)
    }

    fn live_sum(&self, counter: impl Fn(&Cell) -> &AtomicU64) -> u64 {
        self.live
            .iter()
            .map(|cell| counter(cell).load(Ordering::Relaxed))
            .sum()
    }

    /// The cell owned by the thread holding `token`, created on first use.
    pub(crate) fn for_thread(&mut self, token: &Arc<()>) -> Arc<Cell> {
        let owner = Arc::downgrade(token);
        if let Some(cell) = self.live.iter().find(|cell| cell.owner.ptr_eq(&owner)) {
            return cell.clone();
        }
        let cell = Arc::new(Cell {
            calls: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            mode: AtomicU64::new(self.mode),
            owner,
        });
        self.live.push(cell.clone());
        cell
    }
}

/// Every live breaker by id, for threads that meet a breaker's id before its cell.
pub(crate) static REGISTRY: Registry<Shared> = Registry::new();

/// The live breaker with this id.
pub(crate) fn lookup(id: u64) -> Option<Arc<Shared>> {
    REGISTRY.get(id)
}

struct Entry {
    breaker: u64,
    cell: Arc<Cell>,
    shared: Weak<Shared>,
}

struct Local {
    /// Lives as long as the thread: cells watch it to learn that their owner exited.
    token: OnceCell<Arc<()>>,
    slots: [RefCell<Option<Entry>>; SLOTS],
}

impl Local {
    fn token(&self) -> &Arc<()> {
        self.token.get_or_init(|| Arc::new(()))
    }
}

thread_local! {
    // `const`: no lazy-initialisation check on the hot path.
    static LOCAL: Local = const {
        Local {
            token: OnceCell::new(),
            slots: [const { RefCell::new(None) }; SLOTS],
        }
    };
}

/// Runs `f` with the calling thread's entry for breaker `id`, filling the cache slot on a
/// miss (through `known`, or the registry). `None` if the breaker is gone or the thread is
/// shutting down.
#[inline(always)]
fn with_entry<R>(id: u64, known: Option<&Shared>, f: impl FnOnce(&Entry) -> R) -> Option<R> {
    let mut f = Some(f);
    // The hit path alone, small enough to inline into every caller.
    let hit = LOCAL
        .try_with(|local| {
            let current = local.slots[slot_of(id)].try_borrow().ok()?;
            let entry = current.as_ref().filter(|entry| entry.breaker == id)?;
            f.take().map(|f| f(entry))
        })
        .ok()
        .flatten();
    match (hit, f) {
        (Some(result), _) => Some(result),
        (None, Some(f)) => with_entry_after_miss(id, known, f),
        (None, None) => None,
    }
}

fn slot_of(id: u64) -> usize {
    (id as usize) % SLOTS
}

/// Fills the cache slot, outside any borrow (it takes the breaker's locks), then runs `f`.
#[cold]
#[inline(never)]
fn with_entry_after_miss<R>(
    id: u64,
    known: Option<&Shared>,
    f: impl FnOnce(&Entry) -> R,
) -> Option<R> {
    LOCAL
        .try_with(|local| {
            let slot = &local.slots[slot_of(id)];
            let entry = fill(local.token(), id, known)?;
            *slot.try_borrow_mut().ok()? = Some(entry);
            let current = slot.try_borrow().ok()?;
            current.as_ref().map(f)
        })
        .ok()
        .flatten()
}

/// Runs `f` with the calling thread's cell for breaker `id`.
///
/// `f` must not re-enter this module; slow paths use [`owned`] instead.
#[inline(always)]
pub(crate) fn with<R>(id: u64, known: Option<&Shared>, f: impl FnOnce(&Cell) -> R) -> Option<R> {
    with_entry(id, known, |entry| f(&entry.cell))
}

/// The calling thread's cell and the breaker itself, for slow paths that take locks.
pub(crate) fn owned(id: u64) -> Option<(Arc<Cell>, Arc<Shared>)> {
    with_entry(id, None, |entry| {
        Some((entry.cell.clone(), entry.shared.upgrade()?))
    })
    .flatten()
}

fn fill(token: &Arc<()>, id: u64, known: Option<&Shared>) -> Option<Entry> {
    let found;
    let shared = match known {
        Some(shared) => shared,
        None => {
            found = lookup(id)?;
            &*found
        }
    };
    Some(Entry {
        breaker: id,
        cell: shared.cell_for(token),
        shared: shared.this.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_one_cell_and_exited_threads_are_folded() {
        let mut cells = Cells::default();
        let token = Arc::new(());
        let a = cells.for_thread(&token);
        let b = cells.for_thread(&token);
        assert!(Arc::ptr_eq(&a, &b));
        a.count_call();
        a.count_call();
        a.count_rejection();
        let other = Arc::new(());
        cells.for_thread(&other).count_call();
        drop(other);
        assert_eq!(cells.calls(), 3);
        assert_eq!(cells.rejected(), 1);
        assert_eq!(cells.live.len(), 1, "the exited thread's cell was folded");
    }
}
