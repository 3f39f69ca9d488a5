//! Why a call in flight is dropped: a timeout that cut it short says so to the breakers below
//! it, which count the call as failed (a backend that hangs then trips them, as a Resilience4j
//! `TimeLimiter` inside a breaker does) rather than forgetting it, as they do a call dropped
//! for any other reason (a hedge's loser, a caller that gave up).
//!
//! The timeout drops the call inside [`timed_out`], on its own thread; a breaker's response
//! future asks [`is_timing_out`] when it is dropped before it finished.

use std::cell::Cell;

thread_local! {
    static TIMING_OUT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `drop_call` (which drops a call a timeout cut short) with the calls it drops known to
/// have timed out.
pub(crate) fn timed_out(drop_call: impl FnOnce()) {
    let before = TIMING_OUT.with(|flag| flag.replace(true));
    drop_call();
    TIMING_OUT.with(|flag| flag.set(before));
}

/// Whether the future being dropped was cut short by a timeout.
#[inline]
pub(crate) fn is_timing_out() -> bool {
    TIMING_OUT.try_with(Cell::get).unwrap_or(false)
}
