//! Timers that are re-armed instead of made afresh: a tokio [`Sleep`] per waiting call, kept
//! on its thread between calls.
//!
//! A new `Sleep` costs a timer-wheel insertion under the runtime's timer lock when first
//! polled, and a removal under that lock again when dropped before it fires: a call that
//! waits on the network and then answers long before its time limit pays both, every time.
//! A [`Timer`] returns its `Sleep` to a small per-thread pool when dropped, still registered.
//! The next call on that thread takes it back as it is when it is set to fire before the
//! call's own deadline (the usual case: the same limit, counted from an earlier start), and
//! only when it fires while the call still waits is it moved on to the call's deadline: a
//! call that answers in time touches no timer state but its waker. A pooled timer that fires
//! while no call waits wakes the task that last waited on it, once: a spurious wake-up, which
//! futures tolerate.
//!
//! Pooled timers belong to the runtime that made them; a timer taken on another runtime's
//! thread is dropped and replaced, so a service moved between runtimes keeps timing out.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::runtime::{Handle, Id};
use tokio::time::{sleep_until, Instant, Sleep};

/// Pooled timers kept per thread: enough for the calls one thread has waiting at once in a
/// busy client; more are dropped.
const POOL: usize = 32;

/// A timer and the runtime whose timer wheel it is registered with.
struct Armed {
    runtime: Id,
    sleep: Pin<Box<Sleep>>,
}

thread_local! {
    static IDLE: RefCell<Vec<Armed>> = const { RefCell::new(Vec::new()) };
}

/// A deadline for one waiting call, on a pooled tokio [`Sleep`]. Must be made inside a tokio
/// runtime with time enabled (as `tokio::time::sleep_until`).
pub(crate) struct Timer {
    deadline: Instant,
    armed: Option<Armed>,
}

impl Timer {
    /// A timer that fires at `deadline`.
    pub(crate) fn at(deadline: Instant) -> Self {
        let runtime = Handle::current().id();
        let pooled = IDLE
            .try_with(|idle| {
                let mut idle = idle.borrow_mut();
                // Timers of another runtime (one this thread ran before) are of no use here.
                while let Some(armed) = idle.pop() {
                    if armed.runtime == runtime {
                        return Some(armed);
                    }
                }
                None
            })
            .ok()
            .flatten();
        let armed = match pooled {
            // A pooled timer set to fire before `deadline` is left as it is: when it fires,
            // `poll_elapsed` moves it on to `deadline`. Most calls answer long before that,
            // and pay nothing for it.
            Some(armed) if armed.sleep.deadline() <= deadline => armed,
            Some(mut armed) => {
                armed.sleep.as_mut().reset(deadline);
                armed
            }
            None => Armed {
                runtime,
                sleep: Box::pin(sleep_until(deadline)),
            },
        };
        Self {
            deadline,
            armed: Some(armed),
        }
    }

    /// Whether the deadline has passed; registers `cx`'s waker if not.
    #[inline]
    pub(crate) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(armed) = &mut self.armed else {
            return Poll::Ready(());
        };
        loop {
            std::task::ready!(armed.sleep.as_mut().poll(cx));
            if armed.sleep.deadline() >= self.deadline {
                return Poll::Ready(());
            }
            // A pooled timer's earlier deadline: on to this call's own.
            armed.sleep.as_mut().reset(self.deadline);
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(armed) = self.armed.take() else {
            return;
        };
        // During the thread's teardown the pool is gone: the timer is dropped with it.
        let _ = IDLE.try_with(|idle| {
            let mut idle = idle.borrow_mut();
            if idle.len() < POOL {
                idle.push(armed);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn idle_timers() -> usize {
        IDLE.with(|idle| idle.borrow().len())
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_fires_at_its_new_deadline() {
        let start = Instant::now();
        let first = Timer::at(start + Duration::from_secs(1));
        drop(first);
        assert_eq!(idle_timers(), 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut second = Timer::at(Instant::now() + Duration::from_secs(1));
        assert_eq!(idle_timers(), 0, "the pooled timer is taken back");
        std::future::poll_fn(|cx| second.poll_elapsed(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_reset_to_an_earlier_deadline_fires_then() {
        let start = Instant::now();
        drop(Timer::at(start + Duration::from_secs(10)));
        let mut timer = Timer::at(start + Duration::from_secs(1));
        std::future::poll_fn(|cx| timer.poll_elapsed(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fired_timer_is_reused() {
        let start = Instant::now();
        let mut timer = Timer::at(start + Duration::from_secs(1));
        std::future::poll_fn(|cx| timer.poll_elapsed(cx)).await;
        drop(timer);
        let mut timer = Timer::at(Instant::now() + Duration::from_secs(2));
        std::future::poll_fn(|cx| timer.poll_elapsed(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_keeps_a_bounded_number_of_timers() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let timers: Vec<_> = (0..POOL + 10).map(|_| Timer::at(deadline)).collect();
        drop(timers);
        assert_eq!(idle_timers(), POOL);
    }

    #[test]
    fn a_timer_pooled_by_another_runtime_is_not_reused() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let first = runtime();
        let first_id = first.handle().id();
        first.block_on(async { drop(Timer::at(Instant::now() + Duration::from_secs(1))) });
        drop(first);
        let second = runtime();
        second.block_on(async {
            let start = Instant::now();
            let mut timer = Timer::at(start + Duration::from_secs(1));
            let armed = timer.armed.as_ref().unwrap();
            assert_ne!(armed.runtime, first_id);
            std::future::poll_fn(|cx| timer.poll_elapsed(cx)).await;
            assert_eq!(start.elapsed(), Duration::from_secs(1));
        });
    }
}
