//! [`TimedOut`]: the one failure the retry layer adds.

use std::fmt;
use std::time::Duration;

/// A try ran past the layer's `per_try_timeout`, or the call ran past its `deadline`.
///
/// The retry layer passes its inner service's errors through unchanged; this is the only error
/// it makes itself, converted into the inner error type with `From` (`tower::BoxError` and
/// `std::io::Error` convert already). A per-try timeout is retried like any other error the
/// classifier retries; a deadline ends the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut {
    after: Duration,
    deadline: bool,
}

impl TimedOut {
    pub(crate) fn new(after: Duration, deadline: bool) -> Self {
        Self { after, deadline }
    }

    /// The limit that ran out.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether the whole call's deadline ran out (otherwise one try's timeout did).
    pub fn is_deadline(&self) -> bool {
        self.deadline
    }
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.deadline { "deadline" } else { "try" };
        write!(
            f,
            "{what} timed out after {}",
            humantime::format_duration(self.after)
        )
    }
}

impl std::error::Error for TimedOut {}

impl From<TimedOut> for std::io::Error {
    fn from(timed_out: TimedOut) -> Self {
        std::io::Error::new(std::io::ErrorKind::TimedOut, timed_out)
    }
}
