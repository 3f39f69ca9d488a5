//! Which endpoint a try went to, handed from the balancer to the retry layer above it, so
//! that a retry goes to another endpoint than the tries that failed before it.
//!
//! The two layers are apart in the stack (a breaker and any user layer sit between them) and
//! share no type, so the hand-off goes through this thread's slots, and only within one
//! synchronous stretch:
//!
//! * A balancer's call, when its future is dropped, [`record`]s its endpoint (a key that also
//!   names the balancer). The retry layer's future drops the try it polls as soon as the try
//!   finishes or its timeout fires, and decides about a retry right after, in the same poll,
//!   on this thread: it takes the slot ([`last`]) before anything else can run here.
//! * The retry sends the next try inside [`avoiding`], with the endpoints of the failed tries;
//!   the balancer's `call` runs inside that closure, on this thread, sees it is
//!   [`steering`], and picks again while its pick is one the retry [`avoids`] (and it has
//!   another endpoint).
//!
//! A key read from the slot is a hint: if a layer between the two answered without calling
//! the balancer (an open breaker, a call that never reached an endpoint), the slot may hold
//! the endpoint of an earlier call on this thread, and the retry steers away from that
//! endpoint for nothing. Calls that are not retries pay one store when their balancer
//! future is dropped and one load when they pick.

use std::cell::{Cell, RefCell};

thread_local! {
    /// The endpoint of the last balanced call that ended on this thread.
    static LAST: Cell<Option<u64>> = const { Cell::new(None) };
    /// Whether a try is being sent by a layer that steers it (then `AVOID` holds the
    /// endpoints to avoid, and `SENT` gets the one the call goes to).
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static AVOID: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    static SENT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// A key for endpoint `endpoint` (a stable hash of its discovery key) of the balancer whose
/// shared state lives at `balancer`: equal for the same endpoint of the same balancer.
#[inline]
pub(crate) fn key(balancer: usize, endpoint: u64) -> u64 {
    endpoint ^ (balancer as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Notes that a call to the endpoint `key` ended (completed or cut short).
#[inline]
pub(crate) fn record(key: u64) {
    let _ = LAST.try_with(|last| last.set(Some(key)));
}

/// Takes the endpoint of the last balanced call that ended on this thread.
pub(crate) fn last() -> Option<u64> {
    LAST.try_with(Cell::take).ok().flatten()
}

/// Runs `send` (which sends a retry through a balancer, synchronously) with `avoid` as the
/// endpoints the balancer should not pick while it has others.
pub(crate) fn avoiding<R>(avoid: &[u64], send: impl FnOnce() -> R) -> R {
    if avoid.is_empty() {
        return send();
    }
    sending(avoid, send).0
}

/// Runs `send` (which sends a try through a balancer, synchronously) with `avoid` as the
/// endpoints the balancer should not pick while it has others; returns what `send` returns
/// and the endpoint the balancer sent the try to, if one did. A hedge sends its copies so,
/// away from the endpoints of the tries still in flight.
pub(crate) fn sending<R>(avoid: &[u64], send: impl FnOnce() -> R) -> (R, Option<u64>) {
    /// Puts the slots back as they were when `send` returns or unwinds (a steered call may
    /// run inside another one's `send`).
    struct Restore {
        active: bool,
        avoided: usize,
        sent: Option<u64>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = ACTIVE.try_with(|active| active.set(self.active));
            let _ = AVOID.try_with(|keys| keys.borrow_mut().truncate(self.avoided));
            let _ = SENT.try_with(|sent| sent.set(self.sent));
        }
    }
    let restore = Restore {
        active: ACTIVE.try_with(Cell::get).unwrap_or(false),
        avoided: AVOID.try_with(|keys| keys.borrow().len()).unwrap_or(0),
        sent: SENT.try_with(Cell::take).ok().flatten(),
    };
    let _ = AVOID.try_with(|keys| keys.borrow_mut().extend_from_slice(avoid));
    let _ = ACTIVE.try_with(|active| active.set(true));
    let output = send();
    let sent = SENT.try_with(Cell::take).ok().flatten();
    drop(restore);
    (output, sent)
}

/// Notes, for the layer steering the try being sent, the endpoint `key` it goes to.
pub(crate) fn report_sent(key: u64) {
    let _ = SENT.try_with(|sent| sent.set(Some(key)));
}

/// Whether a steered try is being sent on this thread (then [`avoids`] says where not to,
/// and [`report_sent`] takes where it goes).
#[inline]
pub(crate) fn steering() -> bool {
    ACTIVE.try_with(Cell::get).unwrap_or(false)
}

/// Whether the retry being sent avoids the endpoint `key`.
pub(crate) fn avoids(key: u64) -> bool {
    AVOID
        .try_with(|avoid| avoid.borrow().contains(&key))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_avoided_only_while_a_retry_is_sent() {
        assert!(!steering());
        avoiding(&[10, 11], || {
            assert!(steering());
            assert!(avoids(10) && avoids(11) && !avoids(12));
        });
        assert!(!steering() && !avoids(10), "the slots are cleared after");
        avoiding(&[], || assert!(!steering(), "nothing to avoid"));
    }

    #[test]
    fn a_steered_send_reports_where_it_went_and_restores_an_outer_one() {
        let ((), sent) = sending(&[10], || {
            let ((), inner) = sending(&[20], || {
                assert!(avoids(10) && avoids(20));
                report_sent(21);
            });
            assert_eq!(inner, Some(21));
            assert!(avoids(10) && !avoids(20), "the outer send's list is back");
            report_sent(11);
        });
        assert_eq!(sent, Some(11));
        assert!(!steering());
    }

    #[test]
    fn the_last_completed_call_is_read_back() {
        record(key(1, 5));
        assert_eq!(last(), Some(key(1, 5)));
        assert_eq!(last(), None, "taken");
        assert_ne!(key(1, 5), key(2, 5), "another balancer's endpoint");
    }
}
