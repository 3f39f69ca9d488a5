//! Half-open probes: the slots of the current half-open period and the permit a probe call
//! holds.

use super::config::Settings;
use super::shared::Shared;
use std::sync::Arc;
use tokio::time::Instant;

/// Half-open bookkeeping for the current half-open period.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    next_id: u64,
    /// Probes sent and not finished, with their start times.
    in_flight: Vec<(u64, Instant)>,
    pub(crate) completed: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Probes {
    pub(crate) fn admit(&mut self, settings: &Settings, now: Instant) -> Option<u64> {
        let used = self.in_flight.len() as u32 + self.completed;
        if used >= settings.half_open_calls {
            return None;
        }
        self.next_id += 1;
        self.in_flight.push((self.next_id, now));
        Some(self.next_id)
    }

    pub(crate) fn finish(&mut self, id: u64) -> bool {
        let before = self.in_flight.len();
        self.in_flight.retain(|&(probe, _)| probe != id);
        self.in_flight.len() != before
    }

    /// The probe `id`, reserved earlier, is being sent: its time counts from `now`.
    pub(crate) fn restart(&mut self, id: u64, now: Instant) {
        if let Some((_, started)) = self.in_flight.iter_mut().find(|(probe, _)| *probe == id) {
            *started = now;
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub(crate) fn oldest_start(&self) -> Option<Instant> {
        self.in_flight.iter().map(|&(_, started)| started).min()
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
    pub(crate) fn new(shared: Arc<Shared>, generation: u64, id: u64) -> Self {
        Self {
            shared,
            generation,
            id,
            settled: false,
        }
    }

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
