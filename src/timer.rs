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
//! futures tolerate. A task's calls one after another take back the timer the last one
//! returned: still registered with that task's waker and not fired, it is not even polled.
//!
//! Pooled timers belong to the runtime that made them. When a thread takes a timer while
//! running another runtime, every pooled timer of other runtimes is dropped, so a service
//! moved between runtimes keeps timing out; until then, up to [`POOL`] timers per thread keep
//! their runtime's timer driver (and the waker of the task that last waited) alive.
//!
//! With tokio's paused clock (tests), a pooled timer is a pending timer like any other: a
//! runtime that idles auto-advances to it, up to one time limit after the last call started,
//! and the task that last waited is woken once.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::runtime::{Handle, Id};
use tokio::task;
use tokio::time::{sleep_until, Instant, Sleep};

/// Pooled timers kept per thread: enough for the calls one thread has waiting at once in a
/// busy client; more are dropped.
const POOL: usize = 32;

/// A timer and the runtime whose timer wheel it is registered with.
struct Armed {
    runtime: Id,
    sleep: Pin<Box<Sleep>>,
    /// The waker the `Sleep` was last polled with, while that registration stands (cleared
    /// when it fires or is moved): a call polled with the same waker finds itself already
    /// registered.
    waker: Option<Waker>,
}

impl Armed {
    /// Whether the `Sleep`'s standing registration is with `waker`.
    #[inline]
    fn registered_with(&self, waker: &Waker) -> bool {
        self.waker
            .as_ref()
            .is_some_and(|kept| kept.will_wake(waker))
    }
}

thread_local! {
    static IDLE: RefCell<Vec<Armed>> = const { RefCell::new(Vec::new()) };
    /// The deadline of the whole call being polled on this thread, if a time limit above it
    /// has one armed (see [`within_deadline`]).
    static CALL_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Runs `poll` (a call's inner future being polled) with `deadline` as the call's deadline
/// on this thread, so that layers below (a retry deciding whether to wait for another try)
/// can see how long the call has left; under an enclosing call's earlier deadline (a mesh
/// client called from another's leaf), that one stays. The previous deadline is restored
/// afterwards, also on unwind.
pub(crate) fn within_deadline<R>(deadline: Instant, poll: impl FnOnce() -> R) -> R {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = CALL_DEADLINE.try_with(|slot| slot.set(self.0));
        }
    }
    let _restore = Restore(
        CALL_DEADLINE
            .try_with(|slot| {
                let outer = slot.get();
                slot.set(Some(outer.map_or(deadline, |outer| outer.min(deadline))));
                outer
            })
            .ok()
            .flatten(),
    );
    poll()
}

/// The deadline of the whole call being polled on this thread, if one is known.
pub(crate) fn call_deadline() -> Option<Instant> {
    CALL_DEADLINE.try_with(std::cell::Cell::get).ok().flatten()
}

/// A deadline for one waiting call, on a pooled tokio [`Sleep`]. Must be made inside a tokio
/// runtime with time enabled (as `tokio::time::sleep_until`).
pub(crate) struct Timer {
    deadline: Instant,
    /// Taken only by `drop`, to return it to the pool.
    armed: Option<Armed>,
}

impl Timer {
    /// A timer that fires at `deadline`.
    #[inline]
    pub(crate) fn at(deadline: Instant) -> Self {
        let mut armed = pooled_or_new(deadline);
        // A pooled timer set to fire before `deadline` is left as it is: when it fires,
        // `poll_elapsed` moves it on to `deadline`. Most calls answer long before that, and
        // pay nothing for it.
        if armed.sleep.deadline() > deadline {
            armed.sleep.as_mut().reset(deadline);
            armed.waker = None;
        }
        Self {
            deadline,
            armed: Some(armed),
        }
    }

    /// When it fires.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the deadline has passed; registers `cx`'s waker if not.
    #[inline]
    pub(crate) fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let armed = self.armed.as_mut().expect("a timer is armed until dropped");
        // Registered with this very waker and not fired: it wakes this call when it fires
        // (no later than this call's deadline), so there is nothing to poll. A task's calls
        // one after another take back the timer the last one returned, as it is.
        if armed.registered_with(cx.waker()) && !armed.sleep.is_elapsed() {
            return Poll::Pending;
        }
        loop {
            // Outside the task's budget: once a task has used up its budget, tokio answers
            // `Pending` without registering the timer (it only asks for another poll), and a
            // call polled again with the same waker would then take the timer as registered.
            // A timer's poll ends a wait or registers one: it cannot keep a task busy.
            let polled = Pin::new(&mut task::coop::unconstrained(armed.sleep.as_mut())).poll(cx);
            if polled.is_pending() {
                if !armed.registered_with(cx.waker()) {
                    armed.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // Fired: its registration is spent.
            armed.waker = None;
            if armed.sleep.deadline() >= self.deadline {
                return Poll::Ready(());
            }
            // A pooled timer's earlier deadline: on to this call's own.
            armed.sleep.as_mut().reset(self.deadline);
        }
    }
}

/// A pooled timer of the current runtime, or a new one for `deadline`.
fn pooled_or_new(deadline: Instant) -> Armed {
    let runtime = Handle::current().id();
    let (pooled, stale) = IDLE
        .try_with(|idle| {
            let mut idle = idle.borrow_mut();
            match idle.last() {
                Some(armed) if armed.runtime == runtime => (idle.pop(), Vec::new()),
                None => (None, Vec::new()),
                // Timers of another runtime (one this thread ran before) are of no use here:
                // all of them go.
                Some(_) => {
                    let (mine, stale) = std::mem::take(&mut *idle)
                        .into_iter()
                        .partition(|armed: &Armed| armed.runtime == runtime);
                    *idle = mine;
                    (idle.pop(), stale)
                }
            }
        })
        .unwrap_or_default();
    // Dropped out of the pool's borrow: dropping a timer drops the waker it holds, which may
    // drop a future that returns a timer of its own to the pool.
    drop(stale);
    pooled.unwrap_or_else(|| Armed {
        runtime,
        sleep: Box::pin(sleep_until(deadline)),
        waker: None,
    })
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(armed) = self.armed.take() else {
            return;
        };
        // During the thread's teardown the pool is gone: the timer is dropped with it. So is
        // a timer the pool has no room for, once the pool's borrow has ended (see `at`).
        let _unpooled = IDLE.try_with(|idle| {
            let mut idle = idle.borrow_mut();
            if idle.len() < POOL {
                idle.push(armed);
                None
            } else {
                Some(armed)
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn idle_timers() -> usize {
        IDLE.with(|idle| idle.borrow().len())
    }

    /// Leaves in the pool a timer registered with the timer wheel for `deadline`.
    fn pool_registered(deadline: Instant) {
        let mut timer = Timer::at(deadline);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert!(timer.poll_elapsed(&mut cx).is_pending());
        drop(timer);
        assert_eq!(idle_timers(), 1);
    }

    /// A timer for `deadline` made from the one timer in the pool.
    fn take_pooled(deadline: Instant) -> Timer {
        let timer = Timer::at(deadline);
        assert_eq!(idle_timers(), 0, "the pooled timer is taken back");
        timer
    }

    async fn elapsed(timer: &mut Timer) {
        std::future::poll_fn(|cx| timer.poll_elapsed(cx)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_due_earlier_fires_at_the_new_deadline() {
        let start = Instant::now();
        pool_registered(start + Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(500)).await;
        elapsed(&mut take_pooled(Instant::now() + Duration::from_secs(1))).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_due_later_is_moved_to_the_earlier_deadline() {
        let start = Instant::now();
        pool_registered(start + Duration::from_secs(10));
        elapsed(&mut take_pooled(start + Duration::from_secs(1))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fired_timer_is_reused() {
        let start = Instant::now();
        let mut timer = Timer::at(start + Duration::from_secs(1));
        elapsed(&mut timer).await;
        drop(timer);
        assert_eq!(idle_timers(), 1);
        elapsed(&mut take_pooled(Instant::now() + Duration::from_secs(2))).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    /// Registers `timer` with the current task's waker, without waiting.
    async fn register(timer: &mut Timer) {
        std::future::poll_fn(|cx| {
            assert!(timer.poll_elapsed(cx).is_pending());
            Poll::Ready(())
        })
        .await;
    }

    /// Runs `body` as a spawned task (a task id: the pool's fast path), failing rather than
    /// hanging if a timer never wakes it.
    async fn in_task(body: impl Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(tokio::time::timeout(Duration::from_secs(60), body));
        task.await.unwrap().expect("a timer never woke its task");
    }

    /// In a task: a timer due in 1 s, registered with the task's waker and returned to the
    /// pool; `idle` later, a timer due 1 s from then, taken back from the pool and awaited,
    /// must fire `fires_at` after the start.
    async fn take_back_after(idle: Duration, fires_at: Duration) {
        in_task(async move {
            let start = Instant::now();
            let mut first = Timer::at(start + Duration::from_secs(1));
            register(&mut first).await;
            drop(first);
            tokio::time::sleep(idle).await;
            elapsed(&mut take_pooled(Instant::now() + Duration::from_secs(1))).await;
            assert_eq!(start.elapsed(), fires_at);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_takes_back_its_own_timer_is_woken_at_its_new_deadline() {
        // Still registered with this task's waker, due at 1 s: taken back as it is.
        take_back_after(Duration::from_millis(500), Duration::from_millis(1_500)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_first_polled_by_a_task_out_of_budget_still_wakes_it() {
        in_task(async {
            let start = Instant::now();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for n in 0..1_000 {
                tx.send(n).unwrap();
            }
            let mut timer = Timer::at(start + Duration::from_secs(1));
            std::future::poll_fn(|cx| {
                // A channel that always has a message uses up the task's budget.
                while rx.poll_recv(cx).is_ready() {}
                timer.poll_elapsed(cx)
            })
            .await;
            assert_eq!(start.elapsed(), Duration::from_secs(1));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_takes_another_tasks_timer_is_woken_itself() {
        let start = Instant::now();
        in_task(async move {
            let mut timer = Timer::at(start + Duration::from_secs(1));
            register(&mut timer).await;
        })
        .await;
        assert_eq!(idle_timers(), 1);
        // Registered with the first task's waker: the second registers its own.
        in_task(async move {
            elapsed(&mut take_pooled(start + Duration::from_secs(2))).await;
            assert_eq!(start.elapsed(), Duration::from_secs(2));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_whose_timer_fired_while_pooled_is_woken_at_its_new_deadline() {
        // The pooled timer fires (a spurious wake-up) while no call waits on it.
        take_back_after(Duration::from_secs(2), Duration::from_secs(3)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_keeps_a_bounded_number_of_timers() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let timers: Vec<_> = (0..POOL + 10).map(|_| Timer::at(deadline)).collect();
        drop(timers);
        assert_eq!(idle_timers(), POOL);
    }

    /// A current-thread runtime with tokio's clock paused (also for the timeout's tests).
    pub(crate) fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn timers_pooled_by_another_runtime_are_dropped_not_reused() {
        let first = paused_runtime();
        let first_id = first.handle().id();
        first.block_on(async {
            let _timers: Vec<_> = (0..3)
                .map(|_| Timer::at(Instant::now() + Duration::from_secs(1)))
                .collect();
        });
        assert_eq!(idle_timers(), 3);
        drop(first);
        paused_runtime().block_on(async {
            let start = Instant::now();
            let mut timer = Timer::at(start + Duration::from_secs(1));
            assert_ne!(timer.armed.as_ref().unwrap().runtime, first_id);
            assert_eq!(
                idle_timers(),
                0,
                "every timer of the first runtime is dropped"
            );
            elapsed(&mut timer).await;
            assert_eq!(start.elapsed(), Duration::from_secs(1));
        });
    }

    /// A waker that owns a timer: dropping the last copy of the waker returns that timer to
    /// the pool.
    struct OwnsTimer {
        _timer: Mutex<Timer>,
    }

    impl futures::task::ArcWake for OwnsTimer {
        fn wake_by_ref(_: &Arc<Self>) {}
    }

    #[test]
    fn dropping_a_stale_timer_may_return_another_to_the_pool() {
        // Both runtimes stay alive: the first one's timer, still registered, holds a waker
        // that owns a second timer. Dropping the stale timer on the second runtime drops that
        // waker, which returns its timer to the pool while the pool is being cleaned.
        let first = paused_runtime();
        let second = paused_runtime();
        {
            let _entered = first.enter();
            let deadline = Instant::now() + Duration::from_secs(1);
            let owner = Arc::new(OwnsTimer {
                _timer: Mutex::new(Timer::at(deadline)),
            });
            let waker = futures::task::waker(owner);
            let mut timer = Timer::at(deadline);
            let mut cx = Context::from_waker(&waker);
            assert!(timer.poll_elapsed(&mut cx).is_pending());
        }
        assert_eq!(idle_timers(), 1);
        second.block_on(async {
            let _timer = Timer::at(Instant::now() + Duration::from_secs(1));
        });
        assert_eq!(
            idle_timers(),
            2,
            "the second runtime's timer and the waker's one"
        );
    }
}
