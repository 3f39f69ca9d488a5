//! [`Deadlines`]: the whole-call timeouts of one client clone, kept by one timer.
//!
//! Every call of a clone has the same limit, so deadlines come in the order calls start: a
//! queue in start order is also in deadline order, and one driver task, sleeping until the
//! deadline at its front, times out every call. A call that waits costs a clock read, and a
//! push and a pop under a lock that only its own clone's calls and the driver take, where a
//! tokio `Sleep` per call takes the runtime's timer lock when it is registered and again when
//! it is cancelled: one lock that every task on every worker shares.
//!
//! The driver sleeps until the earliest deadline still waiting. With nothing waiting it
//! sleeps one more `limit` (a call that starts meanwhile has a later deadline, so it need not
//! wake the driver), then parks until a call wakes it. It holds only a `Weak`: it ends when
//! the clone and its calls are gone. If its runtime shuts down, the next call that waits
//! starts a new driver on its own runtime.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// One clone's queue of calls waiting for their deadlines.
pub(crate) struct Deadlines {
    limit: Duration,
    state: Mutex<State>,
}

struct State {
    /// Calls in start order, hence in deadline order; finished ones leave from the front.
    entries: VecDeque<Entry>,
    /// The sequence number of `entries[0]`.
    first: u64,
    driver: Driver,
}

struct Entry {
    deadline: Instant,
    /// `None` once the call has finished or been dropped.
    waker: Option<Waker>,
    expired: bool,
}

impl Entry {
    fn waiting(&self) -> bool {
        !self.expired && self.waker.is_some()
    }
}

enum Driver {
    /// No driver task: never started, or its runtime shut down.
    Stopped,
    /// Sleeping until a deadline, or for one last `limit` with nothing waiting.
    Sleeping,
    /// Nothing waiting: a call that registers wakes it.
    Parked(Waker),
}

/// A call's place in its clone's [`Deadlines`]; leaves the queue when dropped.
pub(crate) struct Registration {
    deadlines: Arc<Deadlines>,
    seq: u64,
}

impl Deadlines {
    pub(crate) fn new(limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit,
            state: Mutex::new(State {
                entries: VecDeque::new(),
                first: 0,
                driver: Driver::Stopped,
            }),
        })
    }

    /// Each call's limit.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a call that starts waiting now, to be woken through `waker` once its limit
    /// has passed.
    ///
    /// # Panics
    /// Outside a tokio runtime with timers enabled, as `tokio::time::sleep` does.
    pub(crate) fn register(self: &Arc<Self>, waker: &Waker) -> Registration {
        let deadline = Instant::now() + self.limit;
        let mut state = self.lock();
        match std::mem::replace(&mut state.driver, Driver::Sleeping) {
            Driver::Sleeping => {}
            Driver::Parked(driver) => driver.wake(),
            Driver::Stopped => {
                // Made here, not in the task: without a runtime or its timers this panics in
                // the caller, as a `Sleep` of the call's own would.
                let first = tokio::time::sleep_until(deadline);
                tokio::spawn(drive(Arc::downgrade(self), first));
            }
        }
        let seq = state.first + state.entries.len() as u64;
        state.entries.push_back(Entry {
            deadline,
            waker: Some(waker.clone()),
            expired: false,
        });
        drop(state);
        Registration {
            deadlines: self.clone(),
            seq,
        }
    }

    /// How many calls are in the queue, finished ones not yet removed included (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl std::fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlines")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        // A parked driver would otherwise wait forever: woken, it finds us gone and ends.
        if let Driver::Parked(driver) = &self.lock().driver {
            driver.wake_by_ref();
        }
    }
}

impl Registration {
    /// Whether the call's limit has passed; if not, `cx` is woken when it does.
    pub(crate) fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.deadlines.lock();
        let index = (self.seq - state.first) as usize;
        let entry = &mut state.entries[index];
        if entry.expired {
            return Poll::Ready(());
        }
        match &mut entry.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.deadlines.lock();
        let index = (self.seq - state.first) as usize;
        state.entries[index].waker = None;
        while state.entries.front().is_some_and(|e| e.waker.is_none()) {
            state.entries.pop_front();
            state.first += 1;
        }
    }
}

/// Marks the driver stopped when its task ends (its runtime shut down), so that the next
/// call that waits starts another.
struct Stopped(Weak<Deadlines>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(deadlines) = self.0.upgrade() {
            deadlines.lock().driver = Driver::Stopped;
        }
    }
}

/// The driver task: wakes each call whose limit has passed.
async fn drive(deadlines: Weak<Deadlines>, first: Sleep) {
    let _stopped = Stopped(deadlines.clone());
    first.await;
    // Whether the last pass found nothing waiting.
    let mut idle = false;
    loop {
        let Some((next, limit)) = expire(&deadlines) else {
            return;
        };
        match next {
            Some(deadline) => {
                idle = false;
                tokio::time::sleep_until(deadline).await;
            }
            None if !idle => {
                idle = true;
                tokio::time::sleep(limit).await;
            }
            None => {
                std::future::poll_fn(|cx| park(&deadlines, cx)).await;
                idle = false;
            }
        }
    }
}

/// Wakes the calls whose limit has passed; returns the earliest deadline still waiting, and
/// the limit. `None` once the clone is gone.
fn expire(deadlines: &Weak<Deadlines>) -> Option<(Option<Instant>, Duration)> {
    let strong = deadlines.upgrade()?;
    let now = Instant::now();
    let mut state = strong.lock();
    for entry in state.entries.iter_mut().filter(|e| e.waiting()) {
        if entry.deadline > now {
            return Some((Some(entry.deadline), strong.limit));
        }
        entry.expired = true;
        if let Some(waker) = &entry.waker {
            waker.wake_by_ref();
        }
    }
    Some((None, strong.limit))
}

/// Parks the driver until a call registers; `Ready` at once if one has since the driver
/// last looked, or if the clone is gone.
fn park(deadlines: &Weak<Deadlines>, cx: &mut Context<'_>) -> Poll<()> {
    let Some(strong) = deadlines.upgrade() else {
        return Poll::Ready(());
    };
    let mut state = strong.lock();
    // A call that registers sets `Sleeping` (waking us if we were parked).
    if matches!(state.driver, Driver::Sleeping) && state.entries.iter().any(Entry::waiting) {
        return Poll::Ready(());
    }
    state.driver = Driver::Parked(cx.waker().clone());
    Poll::Pending
}
