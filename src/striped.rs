//! A counter that many threads increment without sharing a cache line or locking one.
//!
//! Each live thread owns one stripe (a slot handed out on first use and returned when the
//! thread exits), so an increment is a relaxed load and store on a line no other core writes:
//! no `lock`-prefixed instruction, no cache-line ping-pong. Reading sums every stripe.
//!
//! With more live threads than stripes, the extra threads share stripes through `fetch_add`;
//! an owner's plain store can then overwrite one of their increments. The count can only come
//! out low, never high, which callers must tolerate (the retry budget does: a lost deposit
//! makes it stricter, not looser).

use crate::padded::CachePadded;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Stripes per counter, a power of two; threads beyond this many share.
pub(crate) const STRIPES: usize = 64;

/// A monotonic counter striped by thread.
#[derive(Debug)]
pub(crate) struct StripedCounter {
    // Inline rather than boxed: an increment follows one pointer less. Keep the counter
    // itself behind an `Arc` or `Box` (it is 8 KiB).
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

impl Default for StripedCounter {
    fn default() -> Self {
        Self {
            stripes: std::array::from_fn(|_| CachePadded::default()),
        }
    }
}

impl StripedCounter {
    /// Adds one on the calling thread's stripe.
    #[inline]
    pub(crate) fn increment(&self) {
        let slot = thread_slot();
        let stripe = &self.stripes[slot.index & (STRIPES - 1)];
        if slot.exclusive {
            stripe.store(stripe.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            stripe.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sum of every stripe.
    pub(crate) fn sum(&self) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| stripe.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    index: usize,
    /// Whether no other live thread uses this stripe.
    exclusive: bool,
}

impl Slot {
    const SHARED_ZERO: Self = Self {
        index: 0,
        exclusive: false,
    };

    fn encode(self) -> u32 {
        (self.index as u32) << 1 | u32::from(self.exclusive)
    }

    fn decode(bits: u32) -> Self {
        Self {
            index: (bits >> 1) as usize,
            exclusive: bits & 1 == 1,
        }
    }
}

/// Stripe indexes handed out: `free` holds those returned by exited threads.
#[derive(Debug)]
struct Slots {
    next: usize,
    free: Vec<usize>,
}

static SLOTS: Mutex<Slots> = Mutex::new(Slots {
    next: 0,
    free: Vec::new(),
});

/// `SLOT` before the thread's first increment.
const UNASSIGNED: u32 = u32::MAX;

/// Returns the calling thread's slot to [`SLOTS`] when the thread exits.
struct SlotGuard(Cell<Option<Slot>>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        // Later thread-local destructors that still count share a stripe.
        let _ = SLOT.try_with(|slot| slot.set(Slot::SHARED_ZERO.encode()));
        if let Some(slot) = self.0.get().filter(|slot| slot.exclusive) {
            // The mutex orders this thread's last stores before the next owner's loads.
            let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
            slots.free.push(slot.index);
        }
    }
}

thread_local! {
    // Read on every increment: no destructor, so no registration check on access.
    static SLOT: Cell<u32> = const { Cell::new(UNASSIGNED) };
    // Touched once per thread, to give the slot back.
    static OWNER: SlotGuard = const { SlotGuard(Cell::new(None)) };
}

#[inline]
fn thread_slot() -> Slot {
    match SLOT.with(Cell::get) {
        UNASSIGNED => assign_slot(),
        bits => Slot::decode(bits),
    }
}

#[cold]
#[inline(never)]
fn assign_slot() -> Slot {
    let slot = {
        let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        match slots.free.pop() {
            Some(index) => Slot {
                index,
                exclusive: true,
            },
            None => {
                let index = slots.next;
                slots.next += 1;
                Slot {
                    index: index % STRIPES,
                    exclusive: index < STRIPES,
                }
            }
        }
    };
    match OWNER.try_with(|owner| owner.0.set(Some(slot))) {
        Ok(()) => {
            SLOT.with(|bits| bits.set(slot.encode()));
            slot
        }
        Err(_) => {
            // The thread is exiting and can no longer return a slot: give this one back now
            // and count through a shared stripe.
            if slot.exclusive {
                let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
                slots.free.push(slot.index);
            }
            Slot::SHARED_ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_every_increment_across_threads() {
        let counter = Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        counter.increment();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.sum(), 80_000);
    }

    #[test]
    fn exited_threads_hand_their_stripe_on_and_keep_their_counts() {
        let counter = Arc::new(StripedCounter::default());
        for _ in 0..3 * STRIPES {
            let counter = counter.clone();
            std::thread::spawn(move || counter.increment())
                .join()
                .unwrap();
        }
        assert_eq!(counter.sum(), 3 * STRIPES as u64);
    }
}
