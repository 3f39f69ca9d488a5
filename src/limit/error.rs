//! [`RateLimited`] and [`Overloaded`]: the rejections the limit layers make.

use std::fmt;
use std::time::Duration;

/// The rate limit had no token for the call, so it failed at once without being sent.
///
/// Returned (inside a [`tower::BoxError`]) by [`RateLimit`](super::RateLimit). A meshkit
/// rejection: retry layers do not retry it and circuit breakers do not count it (see
/// [`crate::error::is_rejection`]). Detect it with `err.downcast_ref::<RateLimited>()` or,
/// through wrappers, [`crate::error::find`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
}

impl RateLimited {
    pub(crate) fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the next token frees: a call made then is admitted, unless another
    /// call takes the token first. A server can send it as an HTTP `Retry-After`.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limit exceeded; retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

/// The service had no room for the call, so it failed at once without being sent.
///
/// Returned (inside a [`tower::BoxError`]) by [`ConcurrencyLimit`](super::ConcurrencyLimit)
/// and [`LoadShed`](super::LoadShed); [`reason`](Self::reason) says which. A meshkit
/// rejection: retry layers do not retry it and circuit breakers do not count it (see
/// [`crate::error::is_rejection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overloaded {
    reason: OverloadReason,
}

/// Which limit rejected an [`Overloaded`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OverloadReason {
    /// `max` calls were already in flight through a
    /// [`ConcurrencyLimit`](super::ConcurrencyLimit).
    ConcurrencyLimit {
        /// The limit that was reached.
        max: usize,
    },
    /// The service under a [`LoadShed`](super::LoadShed) was not ready.
    LoadShed,
}

impl Overloaded {
    pub(crate) fn new(reason: OverloadReason) -> Self {
        Self { reason }
    }

    /// Which limit rejected the call.
    pub fn reason(&self) -> OverloadReason {
        self.reason
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            OverloadReason::ConcurrencyLimit { max } => {
                write!(f, "service overloaded: {max} requests already in flight")
            }
            OverloadReason::LoadShed => f.write_str("service overloaded: not ready (load shed)"),
        }
    }
}

impl std::error::Error for Overloaded {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_which_limit_rejected() {
        assert_eq!(
            RateLimited::new(Duration::from_millis(250)).to_string(),
            "rate limit exceeded; retry after 250ms"
        );
        assert_eq!(
            Overloaded::new(OverloadReason::ConcurrencyLimit { max: 8 }).to_string(),
            "service overloaded: 8 requests already in flight"
        );
        assert_eq!(
            Overloaded::new(OverloadReason::LoadShed).to_string(),
            "service overloaded: not ready (load shed)"
        );
    }
}
