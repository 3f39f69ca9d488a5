//! [`TimedOut`]: the one failure the retry layer adds.

use std::fmt;
use std::time::Duration;

/// A try ran past the layer's `per_try_timeout`, or the call ran past its `deadline`.
///
/// The retry layer passes its inner service's errors through unchanged; this is the only error
/// it makes itself, returned as the inner error type when that type can carry it:
/// `tower::BoxError` (and the other boxed `dyn Error` forms), `std::io::Error` (kind
/// `TimedOut`) or `TimedOut` itself. A per-try timeout is retried like any other error the
/// classifier retries; a deadline ends the call. With any other error type a try cannot be
/// cut short, so `per_try_timeout` is not applied and `deadline` only stops further retries
/// (the layer says so once, as a `warn` event).
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

/// Whether `E` can carry a [`TimedOut`] (see [`into_error`]).
pub(crate) fn carries<E: 'static>() -> bool {
    let mut slot: Option<E> = None;
    fill(&mut slot, TimedOut::new(std::time::Duration::ZERO, false))
}

/// `timed_out` as an `E`, for the error types [`carries`] accepts.
///
/// # Panics
/// If `E` cannot carry it; callers check [`carries`] first.
pub(crate) fn into_error<E: 'static>(timed_out: TimedOut) -> E {
    let mut slot: Option<E> = None;
    fill(&mut slot, timed_out);
    slot.expect("the error type was checked to carry TimedOut")
}

fn fill<E: 'static>(slot: &mut Option<E>, timed_out: TimedOut) -> bool {
    use std::any::Any;
    use std::error::Error;
    let slot: &mut dyn Any = slot;
    if let Some(slot) = slot.downcast_mut::<Option<tower::BoxError>>() {
        *slot = Some(Box::new(timed_out));
    } else if let Some(slot) = slot.downcast_mut::<Option<Box<dyn Error + Send>>>() {
        *slot = Some(Box::new(timed_out));
    } else if let Some(slot) = slot.downcast_mut::<Option<Box<dyn Error>>>() {
        *slot = Some(Box::new(timed_out));
    } else if let Some(slot) = slot.downcast_mut::<Option<std::io::Error>>() {
        *slot = Some(timed_out.into());
    } else if let Some(slot) = slot.downcast_mut::<Option<TimedOut>>() {
        *slot = Some(timed_out);
    } else {
        return false;
    }
    true
}

impl From<TimedOut> for std::io::Error {
    fn from(timed_out: TimedOut) -> Self {
        std::io::Error::new(std::io::ErrorKind::TimedOut, timed_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_io_and_itself_carry_timeouts_other_types_do_not() {
        assert!(carries::<tower::BoxError>());
        assert!(carries::<std::io::Error>());
        assert!(carries::<TimedOut>());
        assert!(!carries::<String>());
        let boxed: tower::BoxError = into_error(TimedOut::new(Duration::from_secs(1), true));
        assert_eq!(boxed.to_string(), "deadline timed out after 1s");
        let io: std::io::Error = into_error(TimedOut::new(Duration::from_secs(1), false));
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
    }
}
