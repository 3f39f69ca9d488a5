//! Announcing transitions (a `tracing` event and a broadcast) and waking gate waiters, in
//! order and with no lock held: subscribers and wakers are other people's code, free to call
//! back into the breaker.

use super::machine::Machine;
use super::shared::Shared;
use super::{BreakerState, Transition};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::MutexGuard;
use std::time::Duration;

/// A transition waiting to be logged and broadcast.
#[derive(Debug)]
pub(crate) struct Announcement {
    transition: Transition,
    openings: u32,
    open_for: Duration,
}

impl Announcement {
    pub(crate) fn new(transition: Transition, openings: u32, open_for: Duration) -> Self {
        Self {
            transition,
            openings,
            open_for,
        }
    }

    pub(crate) fn emit(
        self,
        subscribers: &tokio::sync::broadcast::Sender<Transition>,
        sink: Option<&crate::events::system::Sink>,
    ) {
        let Transition { from, to, .. } = self.transition;
        let name = &*self.transition.breaker;
        match to {
            BreakerState::Open | BreakerState::ForcedOpen => tracing::warn!(
                breaker = name, %from, %to, openings = self.openings, open_for = ?self.open_for,
                "circuit breaker opened"
            ),
            _ => tracing::info!(breaker = name, %from, %to, "circuit breaker changed state"),
        }
        sink.cloned().unwrap_or_default().publish(
            name,
            crate::events::system::SystemEvent::BreakerTransition {
                breaker: name.to_string(),
                from,
                to,
            },
        );
        // No receivers is fine: nobody subscribed.
        let _ = subscribers.send(self.transition);
    }
}

/// The locked state machine; on release, announces transitions and wakes gate waiters.
pub(crate) struct Locked<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, Machine>>,
}

impl<'a> Locked<'a> {
    pub(crate) fn new(shared: &'a Shared, guard: MutexGuard<'a, Machine>) -> Self {
        Self {
            shared,
            guard: Some(guard),
        }
    }
}

impl std::ops::Deref for Locked<'_> {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        self.guard.as_ref().expect("the guard is held until drop")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Machine {
        self.guard.as_mut().expect("the guard is held until drop")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut machine) = self.guard.take() else {
            return;
        };
        let announce = std::mem::replace(&mut machine.announce, false);
        let wake = std::mem::replace(&mut machine.wake, false);
        drop(machine);
        // Subscribers and wakers are other people's code: run them with no lock held, so
        // that they may call back into the breaker, even to change it.
        if wake {
            self.shared.wake_waiters();
        }
        if announce {
            self.shared.announce();
        }
    }
}

/// Clears the announcing flag even if a subscriber panics.
struct Announcing<'a>(&'a AtomicBool);

impl Drop for Announcing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Shared {
    /// Queues a transition for announcement; called under the machine lock, so the queue
    /// holds transitions in the order they happened.
    pub(crate) fn queue_announcement(&self, announcement: Announcement) {
        self.queue().push_back(announcement);
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Announcement>> {
        self.announcements.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Emits queued transitions in order. One thread emits at a time; a thread that finds
    /// another emitting leaves its transitions to it (including a transition made by a
    /// subscriber from inside an announcement, which is emitted right after that one).
    fn announce(&self) {
        loop {
            if self
                .announcing
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return;
            }
            let emitting = Announcing(&self.announcing);
            loop {
                let next = self.queue().pop_front();
                match next {
                    Some(announcement) => announcement.emit(&self.transitions, self.sink.get()),
                    None => break,
                }
            }
            drop(emitting);
            // A transition queued after our last look, by a thread that saw us emitting.
            if self.queue().is_empty() {
                return;
            }
        }
    }
}
