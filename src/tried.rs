//! Which endpoint a try went to, handed from the balancer to the retry layer above it, so
//! that a retry goes to another endpoint than the tries that failed before it.
//!
//! The two layers are apart in the stack (a breaker and any user layer sit between them) and
//! share no type, so the hand-off goes through this thread's slots, and only within one
//! synchronous stretch:
//!
//! * A balancer's call, when it completes, [`record`]s its endpoint (a key that also names
//!   the balancer). The retry layer's future polls the futures under it, so when it sees a
//!   try finish, the balancer's future finished in the same poll, on this thread: the
//!   retry reads the slot ([`last`]) before anything else can run here.
//! * The retry sends the next try inside [`avoiding`], with the endpoints of the failed tries;
//!   the balancer's `call` runs inside that closure, on this thread, and steers its pick away
//!   from them ([`steer`]) when it has another endpoint.
//!
//! A key read from the slot is a hint: if a layer between the two answered without calling
//! the balancer (an open breaker), the slot holds the endpoint of an earlier call on this
//! thread, and the retry steers away from that endpoint for nothing. Calls that are not
//! retries pay one store when they complete and one load when they pick.

use std::cell::{Cell, RefCell};

thread_local! {
    /// The endpoint of the last balanced call that completed on this thread.
    static LAST: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether a retry is being sent (then `AVOID` holds its failed tries' endpoints).
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static AVOID: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// A key for endpoint `endpoint` (a stable hash of its discovery key) of the balancer whose
/// shared state lives at `balancer`: equal for the same endpoint of the same balancer.
#[inline]
pub(crate) fn key(balancer: usize, endpoint: u64) -> u64 {
    endpoint ^ (balancer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Notes that a call to the endpoint `key` completed.
#[inline]
pub(crate) fn record(key: u64) {
    let _ = LAST.try_with(|last| last.set(Some(key)));
}

/// The endpoint of the last balanced call that completed on this thread.
pub(crate) fn last() -> Option<u64> {
    LAST.try_with(Cell::get).ok().flatten()
}

/// Runs `send` (which sends a retry through a balancer, synchronously) with `avoid` as the
/// endpoints the balancer should not pick while it has others.
pub(crate) fn avoiding<R>(avoid: &[u64], send: impl FnOnce() -> R) -> R {
    if avoid.is_empty() {
        return send();
    }
    /// Clears the slots when `send` returns or unwinds.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = ACTIVE.try_with(|active| active.set(false));
            let _ = AVOID.try_with(|keys| keys.borrow_mut().clear());
        }
    }
    let _ = AVOID.try_with(|keys| keys.borrow_mut().extend_from_slice(avoid));
    let _ = ACTIVE.try_with(|active| active.set(true));
    let _reset = Reset;
    send()
}

/// The index to call instead of `picked` among endpoints whose keys `key_of` gives (by
/// index, `count` of them): `None` (keep `picked`) unless a retry is being sent that avoids
/// `picked` and another endpoint is not avoided; then the first such after `picked`.
#[inline]
pub(crate) fn steer(picked: usize, count: usize, key_of: impl Fn(usize) -> u64) -> Option<usize> {
    if !ACTIVE.try_with(Cell::get).unwrap_or(false) {
        return None;
    }
    steer_retry(picked, count, key_of)
}

#[cold]
#[inline(never)]
fn steer_retry(picked: usize, count: usize, key_of: impl Fn(usize) -> u64) -> Option<usize> {
    AVOID
        .try_with(|avoid| {
            let avoid = avoid.borrow();
            if !avoid.contains(&key_of(picked)) {
                return None;
            }
            (1..count)
                .map(|step| (picked + step) % count)
                .find(|&index| !avoid.contains(&key_of(index)))
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_is_steered_only_while_a_retry_avoids_it() {
        let keys = [10, 11, 12];
        let key_of = |index: usize| keys[index];
        assert_eq!(steer(0, 3, key_of), None, "no retry");
        avoiding(&[10], || {
            assert_eq!(steer(0, 3, key_of), Some(1));
            assert_eq!(steer(2, 3, key_of), None, "not avoided");
        });
        avoiding(&[10, 11], || assert_eq!(steer(0, 3, key_of), Some(2)));
        avoiding(&[10, 11, 12], || {
            assert_eq!(steer(1, 3, key_of), None, "nowhere else to go")
        });
        assert_eq!(steer(0, 3, key_of), None, "the slots are cleared after");
    }

    #[test]
    fn the_last_completed_call_is_read_back() {
        record(key(1, 5));
        assert_eq!(last(), Some(key(1, 5)));
        assert_ne!(key(1, 5), key(2, 5), "another balancer's endpoint");
    }
}
