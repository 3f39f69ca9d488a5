use super::metrics::BreakerMetrics;
use super::shared::Shared;
use super::{BreakerState, Transition};
use std::fmt;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Observes and controls one breaker, shared by all the services built from its layer.
///
/// Cheap to clone. Operator actions take effect at once for every service and clone.
#[derive(Clone)]
pub struct BreakerHandle {
    shared: Arc<Shared>,
}

impl BreakerHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The breaker's current state (an open period that has ended reads as half-open).
    pub fn state(&self) -> BreakerState {
        self.shared.current_state()
    }

    /// Rejects every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.shared.force(BreakerState::ForcedOpen);
    }

    /// Lets every call pass and records nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.shared.force(BreakerState::Disabled);
    }

    /// Returns to a fresh `Closed` state: empty window, open-period backoff forgotten.
    pub fn reset(&self) {
        self.shared.force(BreakerState::Closed);
    }

    /// A snapshot of the window's counts, the rates and the rejections so far.
    pub fn metrics(&self) -> BreakerMetrics {
        self.shared.metrics()
    }

    /// A receiver of every state transition from now on.
    ///
    /// Transitions are few, so the channel (64 deep) rarely lags; a receiver that does gets
    /// [`broadcast::error::RecvError::Lagged`] and continues with the newest.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.shared.transitions.subscribe()
    }

    /// The breaker's name, as used in tracing events and transitions.
    pub fn name(&self) -> Arc<str> {
        self.shared.lock().name.clone()
    }
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("name", &self.name())
            .field("state", &super::shared::state_of(self.shared.mode()))
            .finish()
    }
}
