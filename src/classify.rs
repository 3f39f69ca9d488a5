//! Classification of a call's result into an [`Outcome`] that resilience layers record.
//!
//! Every meshkit capability that reacts to success and failure (the circuit breaker today,
//! retries, hedging and outlier ejection) asks a [`Classify`] implementation what a result means.
//! Retry layers ask a [`ClassifyRetry`] implementation whether to try again. Closures implement
//! both traits, so a custom rule is one line:
//!
//! ```
//! use meshkit::classify::{Classify, Outcome};
//!
//! // A 404 is the caller's mistake, not the dependency's: do not count it.
//! let classifier = |result: &Result<u16, std::io::Error>| match result {
//!     Ok(404) => Outcome::Ignored,
//!     Ok(status) if *status >= 500 => Outcome::Failure,
//!     Ok(_) => Outcome::Success,
//!     Err(_) => Outcome::Failure,
//! };
//! assert_eq!(classifier.classify(&Ok(503)), Outcome::Failure);
//! assert_eq!(classifier.classify(&Ok(404)), Outcome::Ignored);
//! ```

/// What a finished call means for the layer that observed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The call worked; it counts towards the success side of any rate.
    Success,
    /// The call failed in a way that says something about the dependency's health.
    Failure,
    /// The call says nothing about the dependency: it is not counted at all.
    Ignored,
}

/// Decides the [`Outcome`] of a call from its result.
///
/// Implemented for every `Fn(&Result<Res, E>) -> Outcome`, so closures work directly.
pub trait Classify<Res, E> {
    /// Classifies one finished call.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        self(result)
    }
}

/// The classifier every layer uses unless told otherwise: `Ok` is a success, `Err` a failure.
///
/// Layers that sit beside other meshkit layers additionally ignore meshkit's own rejections
/// (see [`crate::error::is_rejection`]) before asking the classifier, so an open breaker
/// further down the stack does not count as a failure of the dependency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl<Res, E> Classify<Res, E> for DefaultClassifier {
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// The default classifier also answers retry layers, as [`DefaultRetryClassifier`] does:
/// errors are retried, responses are not.
impl<Res, E> ClassifyRetry<Res, E> for DefaultClassifier {
    #[inline]
    fn classify_retry(&self, result: &Result<Res, E>) -> RetryDecision {
        DefaultRetryClassifier.classify_retry(result)
    }
}

/// Whether a finished try should be tried again, as a retry layer asks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryDecision {
    /// Return this result to the caller.
    Stop,
    /// Try again after the layer's backoff.
    Retry,
    /// Try again, but not before this long: the server's delay hint (an HTTP `Retry-After`).
    /// The layer waits at least this, and returns the result as is when the hint exceeds its
    /// `max_retry_after`.
    RetryAfter(std::time::Duration),
}

/// Decides whether a finished try is worth repeating: the retry side of [`Classify`].
///
/// Implemented for every `Fn(&Result<Res, E>) -> RetryDecision`, so closures work directly:
///
/// ```
/// use meshkit::classify::{ClassifyRetry, RetryDecision};
/// use std::time::Duration;
///
/// // Retry a 503 after the hint the server sent, and nothing else.
/// let classifier = |result: &Result<(u16, Option<u64>), std::io::Error>| match result {
///     Ok((503, Some(secs))) => RetryDecision::RetryAfter(Duration::from_secs(*secs)),
///     Ok((503, None)) => RetryDecision::Retry,
///     _ => RetryDecision::Stop,
/// };
/// assert_eq!(classifier.classify_retry(&Ok((200, None))), RetryDecision::Stop);
/// ```
pub trait ClassifyRetry<Res, E> {
    /// Decides about one finished try.
    fn classify_retry(&self, result: &Result<Res, E>) -> RetryDecision;
}

impl<F, Res, E> ClassifyRetry<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> RetryDecision,
{
    fn classify_retry(&self, result: &Result<Res, E>) -> RetryDecision {
        self(result)
    }
}

/// The retry classifier every layer uses unless told otherwise: errors are retried, responses
/// are not.
///
/// Whatever a classifier says, retry layers never retry meshkit's own rejections (an open
/// breaker, a shed request) unless configured to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultRetryClassifier;

impl<Res, E> ClassifyRetry<Res, E> for DefaultRetryClassifier {
    fn classify_retry(&self, result: &Result<Res, E>) -> RetryDecision {
        match result {
            Ok(_) => RetryDecision::Stop,
            Err(_) => RetryDecision::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classifier_calls_ok_success_and_err_failure() {
        let ok: Result<(), ()> = Ok(());
        let err: Result<(), ()> = Err(());
        assert_eq!(DefaultClassifier.classify(&ok), Outcome::Success);
        assert_eq!(DefaultClassifier.classify(&err), Outcome::Failure);
    }

    #[test]
    fn default_retry_classifier_retries_errors_only() {
        let ok: Result<(), ()> = Ok(());
        let err: Result<(), ()> = Err(());
        assert_eq!(
            DefaultRetryClassifier.classify_retry(&ok),
            RetryDecision::Stop
        );
        assert_eq!(
            DefaultRetryClassifier.classify_retry(&err),
            RetryDecision::Retry
        );
    }

    #[test]
    fn closures_are_classifiers() {
        let always_ignored = |_: &Result<u8, ()>| Outcome::Ignored;
        assert_eq!(always_ignored.classify(&Ok(1)), Outcome::Ignored);
    }
}
