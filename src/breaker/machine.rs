//! The breaker's state machine: what happens, under the lock, when calls finish, time passes
//! or an operator steps in.

use super::announce::Announcement;
use super::config::Settings;
use super::local::Cell;
use super::probe::{ProbePermit, Probes};
use super::shared::{generation_of, state_of, word, Shared};
use super::window::{CountWindow, TimeWindow, Totals, Window, WindowCounts};
use super::{BreakerState, Transition, WindowConfig};
use crate::random::RandomSource;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Buckets in a time window: 1 s buckets for the common 60 s window.
const TIME_BUCKETS: u32 = 60;

/// Everything behind the breaker's lock.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) state: BreakerState,
    /// Bumped on every transition, so outcomes of calls admitted before it are not counted.
    pub(crate) generation: u64,
    window: Window,
    failures: u64,
    slow: u64,
    /// Closed-state failures in a row (`consecutive_failures`), and the number of successes
    /// counted when the last of them was recorded: a failure extends the run only if no
    /// success was counted since, on any thread's cell.
    run: u64,
    successes_at_run: u64,
    /// Consecutive openings since the breaker last closed.
    pub(crate) openings: u32,
    pub(crate) open_until: Instant,
    pub(crate) probes: Probes,
    /// Whether the driver advances the time window every bucket (time windows only).
    ticking: bool,
    pub(crate) name: Arc<str>,
    pub(crate) random: Arc<dyn RandomSource>,
    /// Whether transitions were queued for announcement under this hold of the lock.
    pub(crate) announce: bool,
    /// Whether gate-mode waiters must be woken once the lock is released.
    pub(crate) wake: bool,
}

fn time_bucket_width(duration: Duration) -> Duration {
    duration / TIME_BUCKETS
}

impl Machine {
    pub(crate) fn new(
        settings: &Settings,
        name: Arc<str>,
        random: Arc<dyn RandomSource>,
        origin: Instant,
    ) -> Self {
        Self {
            state: BreakerState::Closed,
            generation: 0,
            window: new_window(settings, Totals::default(), 0),
            failures: 0,
            slow: 0,
            run: 0,
            successes_at_run: 0,
            openings: 0,
            open_until: origin,
            probes: Probes::default(),
            ticking: false,
            name,
            random,
            announce: false,
            wake: false,
        }
    }
}

fn new_window(settings: &Settings, totals: Totals, epoch: u64) -> Window {
    match settings.window {
        WindowConfig::Count { size } => Window::Count(CountWindow::new(u64::from(size), totals)),
        WindowConfig::Time { .. } => {
            Window::Time(TimeWindow::new(TIME_BUCKETS as usize, epoch, totals))
        }
    }
}

impl Shared {
    /// Totals since creation: calls from the per-thread cells, failures and slow calls from the machine.
    fn totals(&self, machine: &Machine) -> Totals {
        Totals {
            calls: self.cells().calls() + self.orphan_calls(),
            failures: machine.failures,
            slow: machine.slow,
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        match self.settings.window {
            WindowConfig::Time { duration } => {
                let width = time_bucket_width(duration).as_nanos().max(1);
                (now.saturating_duration_since(self.origin).as_nanos() / width) as u64
            }
            WindowConfig::Count { .. } => 0,
        }
    }

    fn next_epoch_start(&self, epoch: u64) -> Instant {
        match self.settings.window {
            WindowConfig::Time { duration } => {
                let width = time_bucket_width(duration).as_nanos();
                let nanos = width.saturating_mul(u128::from(epoch) + 1);
                self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            WindowConfig::Count { .. } => self.origin,
        }
    }

    /// Brings a time window up to `now` and returns the window's contents.
    pub(crate) fn current_counts(&self, machine: &mut Machine, now: Instant) -> WindowCounts {
        let totals = self.totals(machine);
        let epoch = self.epoch(now);
        if let Window::Time(window) = &mut machine.window {
            window.advance(epoch, totals);
        }
        machine.window.counts(totals)
    }

    /// Whether closed-state successes may skip the lock: only once the window holds
    /// `minimum_calls` calls (below that, the success that completes the minimum may trip
    /// the breaker and must be evaluated), and, for a time window, while a driver ticks it.
    ///
    /// Past the minimum a success can only lower the rates, so a success counted without the
    /// lock while another thread evaluates a failure is equivalent to it finishing just after
    /// that failure: no interleaving can keep a breaker closed that some serial order opens.
    fn fast_allowed(&self, machine: &Machine, counts: WindowCounts) -> bool {
        let ticking = match machine.window {
            Window::Count(_) => true,
            Window::Time(_) => machine.ticking && self.driver_alive.load(Ordering::Acquire),
        };
        ticking
            && counts.calls >= self.settings.minimum_calls
            && !self
                .settings
                .trips(counts.calls + 1, counts.failures, counts.slow)
    }

    fn publish(&self, machine: &Machine, fast: bool) {
        let fast = fast && machine.state == BreakerState::Closed;
        self.store_mode(word(machine.generation, machine.state, fast));
    }

    /// Records a finished closed-state call that could not take the fast path.
    pub(crate) fn record_closed(
        &self,
        cell: Option<&Cell>,
        admitted: u64,
        failed: bool,
        slow: bool,
    ) {
        let mut machine = self.lock();
        if machine.generation != generation_of(admitted) || machine.state != BreakerState::Closed {
            return;
        }
        let now = Instant::now();
        // Bring the window to now first, so that this call lands in the current bucket.
        self.current_counts(&mut machine, now);
        match cell {
            Some(cell) => cell.count_call(),
            None => self.count_orphan_call(),
        }
        machine.failures += u64::from(failed);
        machine.slow += u64::from(slow);
        let totals = self.totals(&machine);
        machine.window.record(totals.calls, failed, slow);
        let counts = machine.window.counts(totals);
        let run_trips = failed && self.extend_run(&mut machine, totals);
        if run_trips
            || self
                .settings
                .trips(counts.calls, counts.failures, counts.slow)
        {
            self.transition(&mut machine, BreakerState::Open, now);
            return;
        }
        if let Window::Time(_) = machine.window {
            if !machine.ticking || !self.driver_alive.load(Ordering::Acquire) {
                machine.ticking = self.ensure_driver();
                self.driver.notify_one();
            }
        }
        let fast = self.fast_allowed(&machine, counts);
        self.publish(&machine, fast);
    }

    /// Counts a closed-state failure into the run of failures in a row (only when
    /// `consecutive_failures` is set) and says whether the run is long enough to open.
    fn extend_run(&self, machine: &mut Machine, totals: Totals) -> bool {
        let Some(limit) = self.settings.consecutive_failures else {
            return false;
        };
        // Successes are counted on per-thread cells, failures under the lock: any success
        // since the run's last failure shows as a larger difference.
        let successes = totals.calls - totals.failures;
        machine.run = if machine.run > 0 && successes == machine.successes_at_run {
            machine.run + 1
        } else {
            1
        };
        machine.successes_at_run = successes;
        machine.run >= limit
    }

    /// Records a finished probe; the last one decides between closing and re-opening.
    pub(crate) fn record_probe(&self, permit: &mut ProbePermit, failed: Option<bool>, slow: bool) {
        let (generation, id) = (permit.generation(), permit.id());
        permit.settle();
        let mut machine = self.lock();
        if machine.generation != generation
            || machine.state != BreakerState::HalfOpen
            || !machine.probes.finish(id)
        {
            return;
        }
        let Some(failed) = failed else {
            // Ignored: the slot is free again for another probe.
            machine.wake = true;
            return;
        };
        let probes = &mut machine.probes;
        probes.completed += 1;
        probes.failures += u32::from(failed);
        probes.slow += u32::from(slow);
        // Judged against all `half_open_calls` probes: re-open as soon as the failures alone
        // reach a threshold, close once every probe has finished without reaching one.
        let planned = u64::from(self.settings.half_open_calls);
        let (completed, failures, slow) = (probes.completed, probes.failures, probes.slow);
        let now = Instant::now();
        let trips_failure = f64::from(failures) / planned as f64 >= self.settings.failure_rate;
        let trips_slow = self.settings.slow_call_duration.is_some()
            && f64::from(slow) / planned as f64 >= self.settings.slow_call_rate;
        if trips_failure || trips_slow {
            self.transition(&mut machine, BreakerState::Open, now);
        } else if u64::from(completed) >= planned {
            self.transition(&mut machine, BreakerState::Closed, now);
        }
    }

    /// A probe slot reserved by `poll_ready` is being used by its call: the probe's
    /// `half_open_timeout` counts from now, not from the reservation (which, left unused
    /// past the timeout, re-opens the breaker).
    pub(crate) fn probe_sent(&self, generation: u64, id: u64) {
        let mut machine = self.lock();
        if machine.generation == generation && machine.state == BreakerState::HalfOpen {
            machine.probes.restart(id, Instant::now());
        }
    }

    /// Gives back the slot of a probe that was cancelled or never sent.
    pub(crate) fn release_probe(&self, generation: u64, id: u64) {
        let mut machine = self.lock();
        if machine.generation == generation
            && machine.state == BreakerState::HalfOpen
            && machine.probes.finish(id)
        {
            machine.wake = true;
        }
    }

    /// Applies the transitions that time alone causes: the end of the open period, and probes
    /// that outlived `half_open_timeout`.
    pub(crate) fn refresh(&self, machine: &mut Machine, now: Instant) {
        if machine.state == BreakerState::Open && now >= machine.open_until {
            self.transition(machine, BreakerState::HalfOpen, now);
        }
        if machine.state == BreakerState::HalfOpen
            && machine
                .probes
                .oldest_start()
                .is_some_and(|started| now >= started + self.settings.half_open_timeout)
        {
            self.transition(machine, BreakerState::Open, now);
        }
    }

    /// One pass of the driver: applies due transitions, advances a time window and returns
    /// when it next needs to run (`None`: only when notified).
    pub(crate) fn drive(&self, now: Instant) -> Option<Instant> {
        let mut machine = self.lock();
        self.refresh(&mut machine, now);
        match machine.state {
            BreakerState::Open => Some(machine.open_until),
            BreakerState::HalfOpen => machine
                .probes
                .oldest_start()
                .map(|started| started + self.settings.half_open_timeout),
            BreakerState::Closed if machine.ticking => {
                let counts = self.current_counts(&mut machine, now);
                let totals = self.totals(&machine);
                let idle = matches!(&machine.window, Window::Time(w) if w.is_idle(totals));
                if idle {
                    // Nothing to age out: stop ticking until the next call, which will take
                    // the slow path (no fast flag) and restart us.
                    machine.ticking = false;
                    self.publish(&machine, false);
                    return None;
                }
                let fast = self.fast_allowed(&machine, counts);
                self.publish(&machine, fast);
                let epoch = match &machine.window {
                    Window::Time(window) => window.epoch(),
                    Window::Count(_) => 0,
                };
                Some(self.next_epoch_start(epoch))
            }
            _ => None,
        }
    }

    /// Moves the machine to `to`, announcing it unless it is already there.
    pub(crate) fn transition(&self, machine: &mut Machine, to: BreakerState, now: Instant) {
        let from = machine.state;
        machine.state = to;
        machine.generation += 1;
        match to {
            BreakerState::Open => {
                machine.openings = machine.openings.saturating_add(1);
                let jitter = crate::random::unit(&*machine.random);
                let period = self.settings.open_period(machine.openings, jitter);
                machine.open_until = now + period;
                self.set_open_until(machine.open_until);
                self.ensure_driver();
            }
            BreakerState::HalfOpen => {
                machine.probes = Probes::default();
            }
            BreakerState::Closed => {
                machine.openings = 0;
                machine.run = 0;
                let totals = self.totals(machine);
                machine.window = new_window(&self.settings, totals, self.epoch(now));
                machine.ticking = false;
                if let Window::Time(_) = machine.window {
                    machine.ticking = self.ensure_driver();
                }
            }
            BreakerState::ForcedOpen | BreakerState::Disabled => {}
        }
        // A fresh closed window holds fewer than `minimum_calls` calls, so no state starts
        // armed for the fast path; the slow path arms it once the window fills.
        self.publish(machine, false);
        self.driver.notify_one();
        // Announced and woken once the lock is released (see `Locked`): subscribers and
        // wakers are other people's code, which must be free to call back into the breaker.
        machine.wake = true;
        if from != to {
            machine.announce = true;
            self.queue_announcement(Announcement::new(
                Transition {
                    breaker: machine.name.clone(),
                    from,
                    to,
                    at: now,
                },
                machine.openings,
                machine.open_until.saturating_duration_since(now),
            ));
        }
    }

    /// The current state, applying any transition that time has made due.
    pub(crate) fn current_state(&self) -> BreakerState {
        let word = self.mode();
        match state_of(word) {
            BreakerState::Open | BreakerState::HalfOpen => {
                let mut machine = self.lock();
                self.refresh(&mut machine, Instant::now());
                machine.state
            }
            state => state,
        }
    }

    /// Operator action: move to `to` now.
    pub(crate) fn force(&self, to: BreakerState) {
        let mut machine = self.lock();
        if machine.state != to || to == BreakerState::Closed {
            self.transition(&mut machine, to, Instant::now());
        }
    }
}
