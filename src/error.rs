//! Helpers for the errors meshkit's layers add, and for finding them in an error chain.
//!
//! Layers that add a failure (an open circuit, later a refused retry or a shed request) return
//! a small typed error that converts into [`tower::BoxError`]. Other layers may wrap it, so ask
//! the whole `source()` chain rather than only the outer error:
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
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Whether any error in `err`'s `source()` chain, `err` itself included, is an `E`.
pub fn is<E>(err: &(dyn Error + 'static)) -> bool
where
    E: Error + 'static,
{
    find::<E>(err).is_some()
}

/// Whether `err` (or an error in its chain) is a rejection made by a meshkit layer rather than
/// a failure of the dependency itself.
///
/// Resilience layers ignore these by default: an open breaker lower in the stack must not
/// count as a failure in the breaker above it, nor be retried.
pub fn is_rejection(err: &(dyn Error + 'static)) -> bool {
    is::<crate::breaker::CircuitOpen>(err) || is::<crate::balance::NoEndpoints>(err)
}

/// [`is_rejection`] for an error of any type: recognises meshkit's rejections when `err` is a
/// boxed error (as tower stacks pass them) or one of meshkit's error types itself.
///
/// Layers that pass their inner error type through unchanged (retries, hedging) use this, as
/// they cannot ask an arbitrary `E` for its `source()` chain.
pub fn is_rejection_value<E: 'static>(err: &E) -> bool {
    let any: &dyn Any = err;
    if let Some(boxed) = any.downcast_ref::<BoxError>() {
        return is_rejection(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + Send + 'static>>() {
        return is_rejection(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + 'static>>() {
        return is_rejection(&**boxed);
    }
    if let Some(io) = any.downcast_ref::<std::io::Error>() {
        return io.get_ref().is_some_and(|inner| is_rejection(inner));
    }
    any.is::<crate::breaker::CircuitOpen>() || any.is::<crate::balance::NoEndpoints>()
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
    fn other_errors_are_not_rejections() {
        let io = std::io::Error::other("connection reset");
        assert!(!is_rejection(&io));
        assert!(!is::<crate::breaker::CircuitOpen>(&io));
    }
}
