//! The state every service, clone and handle of one breaker shares, and call admission.
//!
//! The closed-state hot path touches two things: the *mode word* (an atomic read by every
//! call, written only on transitions and re-arming) and the calling thread's own counter
//! (see [`super::local`]).
//! Everything else (failures, slow calls, probes, transitions) goes through the [`Machine`]
//! behind a mutex, which successes in the closed state never take while the mode word carries
//! the `FAST` flag. The flag is set only when no success could trip the breaker before the
//! next failure, tick or transition re-evaluates it (see `Shared::fast_allowed`).

use super::config::Settings;
use super::local::{self, Cell, Cells};
use super::machine::Machine;
use super::{BreakerState, CircuitOpen, Transition};
use crate::padded::CachePadded;
use crate::random::RandomSource;
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

/// Ids that name breakers in thread-local caches; never reused.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

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
    pub(crate) settings: Settings,
    pub(crate) origin: Instant,
    /// End of the open period, in nanoseconds since `origin`; meaningful in `Open`.
    open_until: AtomicU64,
    machine: Mutex<Machine>,
    waiters: Mutex<Vec<Waker>>,
    pub(crate) transitions: broadcast::Sender<Transition>,
    pub(crate) driver: Arc<Notify>,
    pub(crate) driver_alive: AtomicBool,
    pub(crate) this: Weak<Shared>,
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
        let fast = machine.initially_fast(&settings);
        let mode = Arc::new(CachePadded(AtomicU64::new(word(
            0,
            BreakerState::Closed,
            fast,
        ))));
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new_cyclic(|this| Shared {
            id,
            cells: Mutex::new(Cells::default()),
            mode,
            settings,
            origin,
            open_until: AtomicU64::new(0),
            machine: Mutex::new(machine),
            waiters: Mutex::new(Vec::new()),
            transitions,
            driver: Arc::new(Notify::new()),
            driver_alive: AtomicBool::new(false),
            this: this.clone(),
        });
        local::register(id, Arc::downgrade(&shared));
        shared
    }

    pub(crate) fn mode_cell(&self) -> &Arc<ModeCell> {
        &self.mode
    }

    /// The cell the thread holding `token` counts its calls in.
    pub(crate) fn cell_for(&self, token: &Arc<()>) -> Arc<Cell> {
        self.cells().for_thread(token)
    }

    pub(crate) fn cells(&self) -> MutexGuard<'_, Cells> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    pub(crate) fn mode(&self) -> u64 {
        self.mode.load(Ordering::Acquire)
    }

    pub(crate) fn store_mode(&self, word: u64) {
        self.mode.store(word, Ordering::Release);
    }

    /// Drops the fast flag without the lock (used when the driver disappears).
    pub(crate) fn clear_fast(&self) {
        self.mode.fetch_and(!FAST, Ordering::AcqRel);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock cannot leave the machine half-updated in a way that
        // matters more than refusing service would, so poisoning is ignored.
        self.machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        match state_of(word) {
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
                    Admission::Probe(ProbePermit {
                        shared: self
                            .this
                            .upgrade()
                            .expect("admitting through a live breaker"),
                        generation: machine.generation,
                        id,
                        settled: false,
                    })
                }
                None => Admission::Reject(CircuitOpen::new(BreakerState::HalfOpen, Duration::ZERO)),
            },
        }
    }

    /// Gate-mode admission: `Pending` (with the task registered for a wake-up) instead of a
    /// rejection, so that a balancer skips this endpoint until it may take traffic again.
    pub(crate) fn poll_admit(&self, cx: &mut Context<'_>) -> Poll<Admission> {
        if let admitted @ (Admission::Pass(_) | Admission::Probe(_)) = self.admit() {
            return Poll::Ready(admitted);
        }
        self.register(cx.waker());
        // The driver turns the breaker half-open and wakes us; make sure one runs.
        self.ensure_driver();
        match self.admit() {
            Admission::Reject(_) => Poll::Pending,
            admitted => Poll::Ready(admitted),
        }
    }

    fn register(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    pub(crate) fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiters {
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
        local::unregister(self.id);
    }
}

/// A half-open probe slot. Dropping it unsettled (the call was cancelled, or never sent)
/// gives the slot back without counting anything.
#[derive(Debug)]
pub(crate) struct ProbePermit {
    shared: Arc<Shared>,
    generation: u64,
    id: u64,
    settled: bool,
}

impl ProbePermit {
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Marks the probe as accounted for, so dropping the permit does not release it again.
    pub(crate) fn settle(&mut self) {
        self.settled = true;
    }

    /// Records the probe's outcome (`None`: ignored) and settles the permit.
    pub(crate) fn finish(mut self, failed: Option<bool>, slow: bool) {
        let shared = self.shared.clone();
        shared.record_probe(&mut self, failed, slow);
    }
}

impl Drop for ProbePermit {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.release_probe(self.generation, self.id);
        }
    }
}
