use std::fmt;
use std::sync::Arc;
use tokio::time::Instant;

/// The state of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Calls pass and their outcomes are recorded in the sliding window.
    Closed,
    /// Calls fail fast with [`CircuitOpen`](super::CircuitOpen) until the open period ends;
    /// then the breaker turns half-open by itself.
    Open,
    /// A limited number of probe calls pass; their outcomes decide between closing and
    /// re-opening.
    HalfOpen,
    /// An operator forced the breaker open: every call is rejected until
    /// [`BreakerHandle::reset`](super::BreakerHandle::reset).
    ForcedOpen,
    /// An operator disabled the breaker: every call passes and nothing is recorded until
    /// [`BreakerHandle::reset`](super::BreakerHandle::reset).
    Disabled,
}

impl BreakerState {
    #[inline]
    pub(crate) const fn bits(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
            BreakerState::ForcedOpen => 3,
            BreakerState::Disabled => 4,
        }
    }

    #[inline]
    pub(crate) const fn from_bits(bits: u64) -> Self {
        match bits & 0b111 {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            3 => BreakerState::ForcedOpen,
            _ => BreakerState::Disabled,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
            BreakerState::ForcedOpen => "forced-open",
            BreakerState::Disabled => "disabled",
        })
    }
}

/// One change of a breaker's state, as delivered to
/// [`BreakerHandle::subscribe`](super::BreakerHandle::subscribe) receivers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The breaker's name (for a keyed breaker, the key).
    pub breaker: Arc<str>,
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// When the change happened, on tokio's clock.
    pub at: Instant,
}
