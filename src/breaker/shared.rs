//! The state every service, clone and handle of one breaker shares, and call admission.
//!
//! The closed-state hot path touches two things: the *mode word* (an atomic read by every
//! call, written only on transitions and re-arming) and the calling thread's own counter
//! (see [`super::local`]).
//! Everything else (failures, slow calls, probes, transitions) goes through the [`Machine`]
//! behind a mutex, which successes in the closed state never take while the mode word carries
//! the `FAST` flag. The flag is set only once the window holds `minimum_calls` calls, when a
//! success can only lower the rates (see `Shared::fast_allowed`).

use super::announce::{Announcement, Locked};
use super::config::Settings;
use super::local::{self, Cell, Cells};
use super::machine::Machine;
use super::probe::ProbePermit;
use super::{BreakerState, CircuitOpen, Transition};
use crate::padded::CachePadded;
use crate::random::RandomSource;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

/// Mode word layout: state in bits 0..3, `FAST` in bit 3, the generation from bit 8 up.
pub(crate) const STATE_MASK: u64 = 0b111;
pub(crate) const FAST: u64 = 0b1000;
const GENERATION_SHIFT: u32 = 8;

#[inline]
pub(crate) fn generation_of(word: u64) -> u64 {
    word >> GENERATION_SHIFT
}

#[inline]
pub(crate) fn state_of(word: u64) -> BreakerState {
    BreakerState::from_bits(word & STATE_MASK)
}

pub(crate) fn word(generation: u64, state: BreakerState, fast: bool) -> u64 {
    (generation << GENERATION_SHIFT) | state.bits() | if fast { FAST } else { 0 }
}

pub(crate) type ModeCell = CachePadded<AtomicU64>;

/// What admission decided for one call.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Closed or disabled: send the call. Carries the mode word seen.
    Pass(u64),
    /// Half-open: send the call as a probe.
    Probe(ProbePermit),
    /// Do not send the call.
    Reject(CircuitOpen),
}

/// One breaker's shared state.
#[derive(Debug)]
pub(crate) struct Shared {
    mode: Arc<ModeCell>,
    /// Names this breaker in the thread-local caches of [`super::local`].
    pub(crate) id: u64,
    cells: Mutex<Cells>,
    /// Calls recorded by threads whose thread-locals were already gone (exiting threads).
    orphan_calls: AtomicU64,
    pub(crate) settings: Settings,
    pub(crate) origin: Instant,
    /// End of the open period, in nanoseconds since `origin`; meaningful in `Open`.
    open_until: AtomicU64,
    machine: Mutex<Machine>,
    /// Transitions waiting to be announced, in the order they happened.
    pub(super) announcements: Mutex<VecDeque<Announcement>>,
    /// Set while a thread emits announcements.
    pub(super) announcing: AtomicBool,
    /// Gate-mode services waiting for the breaker to admit calls, by waiter id.
    waiters: Mutex<HashMap<u64, Waker>>,
    next_waiter: AtomicU64,
    pub(crate) transitions: broadcast::Sender<Transition>,
    pub(crate) driver: Arc<Notify>,
    pub(crate) driver_alive: AtomicBool,
    pub(crate) this: Weak<Shared>,
    /// Where transitions are reported besides the process's system bus (set by a mesh).
    pub(crate) sink: std::sync::OnceLock<crate::events::system::Sink>,
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        name: Arc<str>,
        random: Arc<dyn RandomSource>,
        transitions: broadcast::Sender<Transition>,
    ) -> Arc<Self> {
        let origin = Instant::now();
        let machine = Machine::new(&settings, name, random, origin);
        // Not armed: successes take the slow path until the window holds `minimum_calls`.
        let initial_mode = word(0, BreakerState::Closed, false);
        let mode = Arc::new(CachePadded(AtomicU64::new(initial_mode)));
        let id = local::REGISTRY.next_id();
        let shared = Arc::new_cyclic(|this| Shared {
            id,
            cells: Mutex::new(Cells::new(initial_mode)),
            orphan_calls: AtomicU64::new(0),
            mode,
            settings,
            origin,
            open_until: AtomicU64::new(0),
            machine: Mutex::new(machine),
            announcements: Mutex::new(VecDeque::new()),
            announcing: AtomicBool::new(false),
            waiters: Mutex::new(HashMap::new()),
            next_waiter: AtomicU64::new(0),
            transitions,
            driver: Arc::new(Notify::new()),
            driver_alive: AtomicBool::new(false),
            this: this.clone(),
            sink: std::sync::OnceLock::new(),
        });
        local::REGISTRY.insert(id, Arc::downgrade(&shared));
        shared
    }

    pub(crate) fn mode_cell(&self) -> &Arc<ModeCell> {
        &self.mode
    }

    /// The cell the thread holding `token` counts its calls in.
    pub(crate) fn cell_for(&self, token: &Arc<()>) -> Arc<Cell> {
        self.cells().for_thread(token)
    }

    pub(crate) fn count_orphan_call(&self) {
        self.orphan_calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn orphan_calls(&self) -> u64 {
        self.orphan_calls.load(Ordering::Relaxed)
    }

    pub(crate) fn cells(&self) -> MutexGuard<'_, Cells> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    pub(crate) fn mode(&self) -> u64 {
        self.mode.load(Ordering::Acquire)
    }

    /// Publishes a new mode word, to admission and to every thread's cell.
    pub(crate) fn store_mode(&self, word: u64) {
        if self.mode.load(Ordering::Acquire) == word {
            return;
        }
        let mut cells = self.cells();
        self.mode.store(word, Ordering::Release);
        cells.publish(word);
    }

    /// Drops the fast flag (used when the driver disappears, so possibly under the machine
    /// lock: it takes only the cells' lock, which nests inside it).
    pub(crate) fn clear_fast(&self) {
        let mut cells = self.cells();
        let word = self.mode.fetch_and(!FAST, Ordering::AcqRel) & !FAST;
        cells.publish(word);
    }

    /// Locks the state machine. Transitions made under the lock are announced, and gate
    /// waiters woken, when it is released.
    pub(crate) fn lock(&self) -> Locked<'_> {
        // A panic while holding the lock cannot leave the machine half-updated in a way that
        // matters more than refusing service would, so poisoning is ignored.
        let guard = self
            .machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Locked::new(self, guard)
    }

    pub(crate) fn set_open_until(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.origin).as_nanos();
        self.open_until.store(nanos as u64, Ordering::Release);
    }

    fn open_until(&self) -> Instant {
        self.origin + Duration::from_nanos(self.open_until.load(Ordering::Acquire))
    }

    /// Decides whether a call may be sent now.
    #[inline]
    pub(crate) fn admit(&self) -> Admission {
        let word = self.mode();
        match state_of(word) {
            BreakerState::Closed | BreakerState::Disabled => Admission::Pass(word),
            _ => self.admit_rejecting(word),
        }
    }

    #[cold]
    #[inline(never)]
    fn admit_rejecting(&self, word: u64) -> Admission {
        let state = state_of(word);
        if matches!(state, BreakerState::Open | BreakerState::HalfOpen) {
            // A driver ends the open period and times probes out, whether calls come or not;
            // the one that ran may have gone with its runtime: this call's runtime takes over.
            self.ensure_driver();
        }
        match state {
            BreakerState::ForcedOpen => Admission::Reject(CircuitOpen::new(
                BreakerState::ForcedOpen,
                self.settings.open_for,
            )),
            BreakerState::Open => {
                let now = Instant::now();
                let until = self.open_until();
                if now < until {
                    Admission::Reject(CircuitOpen::new(BreakerState::Open, until - now))
                } else {
                    self.admit_slow(now)
                }
            }
            _ => self.admit_slow(Instant::now()),
        }
    }

    fn admit_slow(&self, now: Instant) -> Admission {
        let mut machine = self.lock();
        self.refresh(&mut machine, now);
        match machine.state {
            BreakerState::Closed | BreakerState::Disabled => Admission::Pass(self.mode()),
            BreakerState::Open => Admission::Reject(CircuitOpen::new(
                BreakerState::Open,
                machine.open_until.saturating_duration_since(now),
            )),
            BreakerState::ForcedOpen => Admission::Reject(CircuitOpen::new(
                BreakerState::ForcedOpen,
                self.settings.open_for,
            )),
            BreakerState::HalfOpen => match machine.probes.admit(&self.settings, now) {
                Some(id) => {
                    // The driver times the probe out if it outlives `half_open_timeout`.
                    self.driver.notify_one();
                    Admission::Probe(ProbePermit::new(
                        self.this
                            .upgrade()
                            .expect("admitting through a live breaker"),
                        machine.generation,
                        id,
                    ))
                }
                None => {
                    // A decision is due by the time the oldest probe would time out.
                    let decided_by =
                        machine
                            .probes
                            .oldest_start()
                            .map_or(Duration::ZERO, |started| {
                                (started + self.settings.half_open_timeout)
                                    .saturating_duration_since(now)
                            });
                    Admission::Reject(CircuitOpen::new(BreakerState::HalfOpen, decided_by))
                }
            },
        }
    }

    /// Gate-mode admission: `Pending` (with the task registered for a wake-up) instead of a
    /// rejection, so that a balancer skips this endpoint until it may take traffic again.
    ///
    /// Without a tokio runtime nothing could wake the task, so it is rejected instead.
    pub(crate) fn poll_admit(
        &self,
        cx: &mut Context<'_>,
        waiter: &mut Option<Waiter>,
    ) -> Poll<Admission> {
        let rejection = match self.admit() {
            Admission::Reject(rejection) => rejection,
            admitted => return Poll::Ready(admitted),
        };
        // The driver turns the breaker half-open and wakes us; make sure one runs.
        if !self.ensure_driver() {
            return Poll::Ready(Admission::Reject(rejection));
        }
        let Some(this) = self.this.upgrade() else {
            return Poll::Ready(Admission::Reject(rejection));
        };
        let waiter = waiter.get_or_insert_with(|| Waiter {
            id: this.next_waiter.fetch_add(1, Ordering::Relaxed),
            shared: this,
        });
        self.waiters().insert(waiter.id, cx.waker().clone());
        match self.admit() {
            Admission::Reject(_) => Poll::Pending,
            admitted => Poll::Ready(admitted),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<u64, Waker>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters());
        for waker in waiters.into_values() {
            waker.wake();
        }
    }

    /// Starts the background driver if none is running and a tokio runtime is at hand.
    /// Returns whether a driver is running.
    pub(crate) fn ensure_driver(&self) -> bool {
        if self.driver_alive.load(Ordering::Acquire) {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if self
            .driver_alive
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            super::driver::spawn(&runtime, self.this.clone(), self.driver.clone());
        }
        true
    }

    pub(crate) fn count_rejection(&self) {
        local::with(self.id, Some(self), Cell::count_rejection);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the driver notice that the breaker is gone and exit.
        self.driver.notify_one();
        local::REGISTRY.remove(self.id);
    }
}

/// A gate-mode service's place among its breaker's waiters: one waker at most, removed when
/// the service is dropped, so tasks that give up leave nothing behind.
#[derive(Debug)]
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.shared.waiters().remove(&self.id);
    }
}
