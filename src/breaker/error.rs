use super::BreakerState;
use std::fmt;
use std::time::Duration;

/// The breaker rejected the call without sending it: the dependency is considered unhealthy.
///
/// Returned (inside a [`tower::BoxError`]) while the breaker is open or forced open, and in
/// the half-open state when every probe slot is taken. Detect it with
/// `err.downcast_ref::<CircuitOpen>()` or, through wrappers, [`crate::error::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitOpen {
    state: BreakerState,
    retry_after: Duration,
}

impl CircuitOpen {
    /// A rejection made in `state`, suggesting the caller retry after `retry_after`.
    pub fn new(state: BreakerState, retry_after: Duration) -> Self {
        Self { state, retry_after }
    }

    /// How long until the breaker admits calls again: the time left in the open period; in
    /// the half-open state, the time until the oldest probe would time out, by when the
    /// probes are decided (a slot may also free up sooner); for a breaker forced open, the
    /// configured `open_for` as a hint, since only an operator can close it.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The state the breaker was in when it rejected the call.
    pub fn state(&self) -> BreakerState {
        self.state
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self.state {
            BreakerState::HalfOpen => "circuit breaker is half-open and all probe slots are taken",
            BreakerState::ForcedOpen => "circuit breaker is forced open",
            _ => "circuit breaker is open",
        };
        write!(f, "{reason}; retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for CircuitOpen {}
