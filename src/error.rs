//! Helpers for the errors meshkit's layers add, and for finding them in an error chain.
//!
//! Layers that add a failure (an open circuit, no ready endpoint, a rate limit, a shed request)
//! return a small typed error that converts into [`tower::BoxError`]. Other layers may wrap it,
//! so ask the whole `source()` chain rather than only the outer error:
//!
//! ```
//! use meshkit::breaker::CircuitOpen;
//! use meshkit::error;
//! use tower::BoxError;
//!
//! fn is_open_circuit(err: &BoxError) -> bool {
//!     error::is::<CircuitOpen>(&**err)
//! }
//! # let _ = is_open_circuit;
//! ```

use std::any::Any;
use std::error::Error;
use tower::BoxError;

/// Returns the first error of type `E` in `err`'s `source()` chain, `err` itself included.
pub fn find<'a, E>(err: &'a (dyn Error + 'static)) -> Option<&'a E>
where
    E: Error + 'static,
{
    chain(err).find_map(|err| err.downcast_ref::<E>())
}

/// `err`, then each error it wraps. An `io::Error` made with `io::Error::other(e)` reports
/// `e`'s source as its own, skipping `e`: the chain visits `e` itself.
pub(crate) fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&err: &&'a (dyn Error + 'static)| {
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn Error + 'static)),
            None => err.source(),
        }
    })
}

/// Whether any error in `err`'s `source()` chain, `err` itself included, is an `E`.
pub fn is<E>(err: &(dyn Error + 'static)) -> bool
where
    E: Error + 'static,
{
    find::<E>(err).is_some()
}

/// Whether `err` (or an error in its chain) is a rejection made by a meshkit layer rather than
/// a failure of the dependency itself: [`CircuitOpen`](crate::breaker::CircuitOpen),
/// [`NoEndpoints`](crate::balance::NoEndpoints), [`RateLimited`](crate::limit::RateLimited)
/// or [`Overloaded`](crate::limit::Overloaded).
///
/// Resilience layers ignore these by default: an open breaker lower in the stack must not
/// count as a failure in the breaker above it, nor be retried.
pub fn is_rejection(err: &(dyn Error + 'static)) -> bool {
    chain(err).any(is_rejection_type)
}

/// [`is_rejection`] for an error of any type: recognises meshkit's rejections when `err` is a
/// boxed error (as tower stacks pass them) or one of meshkit's error types itself.
///
/// Layers that pass their inner error type through unchanged (retries, hedging) use this, as
/// they cannot ask an arbitrary `E` for its `source()` chain.
pub fn is_rejection_value<E: 'static>(err: &E) -> bool {
    let any: &dyn Any = err;
    as_error(any).map_or_else(|| is_rejection_type(any), is_rejection)
}

/// Whether `err` (or an error in its chain) says that the request was never sent, so that
/// sending it again cannot repeat its effect, whatever its method: a connection that could
/// not be made (refused, host or network unreachable, no local address; with the `reqwest`
/// feature, any of reqwest's connect errors, DNS and connect timeouts included), an endpoint
/// ejected, or a meshkit rejection (see [`is_rejection`]).
///
/// A retry layer sends a request its [`Replay`](crate::retry::Replay) would not copy (a
/// `POST`) again after such an error, as Finagle requeues requests that were never written.
pub fn is_unsent(err: &(dyn Error + 'static)) -> bool {
    chain(err).any(|err| is_refusal_type(err) || is_connect(err))
}

/// [`is_unsent`] for an error of any type, as [`is_rejection_value`] is for `is_rejection`.
pub fn is_unsent_value<E: 'static>(err: &E) -> bool {
    let any: &dyn Any = err;
    match as_error(any) {
        Some(err) => is_unsent(err),
        None => is_refusal_type(any),
    }
}

/// Whether `err` (or an error in its chain) says that a meshkit layer refused the call before
/// it reached the service: a rejection (see [`is_rejection`]) or an ejected endpoint.
pub(crate) fn is_refused(err: &(dyn Error + 'static)) -> bool {
    chain(err).any(is_refusal_type)
}

/// A connection that was never made.
fn is_connect(err: &(dyn Error + 'static)) -> bool {
    use std::io::ErrorKind;
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return matches!(
            io.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable
        );
    }
    #[cfg(feature = "reqwest")]
    if let Some(reqwest) = err.downcast_ref::<reqwest::Error>() {
        return reqwest.is_connect();
    }
    false
}

/// `any` as an error whose chain can be walked, when it is a boxed error or an `io::Error`
/// (as tower stacks pass them); `None` for any other type.
fn as_error(any: &dyn Any) -> Option<&(dyn Error + 'static)> {
    if let Some(boxed) = any.downcast_ref::<BoxError>() {
        return Some(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + Send + 'static>>() {
        return Some(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + 'static>>() {
        return Some(&**boxed);
    }
    any.downcast_ref::<std::io::Error>()
        .map(|io| io as &(dyn Error + 'static))
}

/// Whether `value` itself (not its chain) is a call meshkit refused: a rejection, or an
/// endpoint ejected by a balancer below.
fn is_refusal_type(value: &(impl IsType + ?Sized)) -> bool {
    is_rejection_type(value) || value.is_type::<crate::balance::EndpointEjected>()
}

/// Whether `value` itself (not its chain) is one of meshkit's rejection errors. The one list
/// of them, asked of an error by [`is_rejection`] and of any value by [`is_rejection_value`].
fn is_rejection_type(value: &(impl IsType + ?Sized)) -> bool {
    value.is_type::<crate::breaker::CircuitOpen>()
        || value.is_type::<crate::balance::NoEndpoints>()
        || value.is_type::<crate::limit::RateLimited>()
        || value.is_type::<crate::limit::Overloaded>()
}

/// The concrete-type test of `dyn Error` and of `dyn Any`, which are separate methods.
trait IsType {
    fn is_type<E: Error + 'static>(&self) -> bool;
}

impl IsType for dyn Error + 'static {
    fn is_type<E: Error + 'static>(&self) -> bool {
        self.is::<E>()
    }
}

impl IsType for dyn Any {
    fn is_type<E: Error + 'static>(&self) -> bool {
        self.is::<E>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;
    use std::time::Duration;

    #[derive(Debug)]
    struct Wrapper(tower::BoxError);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn finds_a_meshkit_error_behind_a_wrapper() {
        let open = crate::breaker::CircuitOpen::new(
            crate::breaker::BreakerState::Open,
            Duration::from_secs(3),
        );
        let wrapped = Wrapper(Box::new(open));
        let found = find::<crate::breaker::CircuitOpen>(&wrapped).expect("in the chain");
        assert_eq!(found.retry_after(), Duration::from_secs(3));
        assert!(is_rejection(&wrapped));
    }

    #[test]
    fn rejections_are_found_in_boxed_and_bare_values() {
        let open =
            || crate::breaker::CircuitOpen::new(crate::breaker::BreakerState::Open, Duration::ZERO);
        let boxed: BoxError = Box::new(Wrapper(Box::new(open())));
        assert!(is_rejection_value(&boxed));
        assert!(is_rejection_value(&open()));
        assert!(!is_rejection_value(&std::io::Error::other("reset")));
        assert!(is_rejection_value(&std::io::Error::other(open())));
        let io: BoxError = Box::new(std::io::Error::other("reset"));
        assert!(!is_rejection_value(&io));
    }

    #[test]
    fn limit_rejections_are_rejections() {
        use crate::limit::{OverloadReason, Overloaded, RateLimited};
        let limited = RateLimited::new(Duration::from_millis(10));
        let shed = Overloaded::new(OverloadReason::LoadShed);
        let full = Overloaded::new(OverloadReason::ConcurrencyLimit { max: 4 });
        assert!(is_rejection(&limited));
        assert!(is_rejection(&Wrapper(Box::new(shed))));
        assert!(is_rejection_value(&limited));
        assert!(is_rejection_value(&full));
        let boxed: BoxError = Box::new(full);
        assert!(is_rejection_value(&boxed));
        let wrapped: BoxError = Box::new(Wrapper(Box::new(limited)));
        assert!(is_rejection_value(&wrapped));
        assert!(is_rejection_value(&std::io::Error::other(shed)));
    }

    #[test]
    fn other_errors_are_not_rejections() {
        let io = std::io::Error::other("connection reset");
        assert!(!is_rejection(&io));
        assert!(!is::<crate::breaker::CircuitOpen>(&io));
    }
}
