//! [`HttpClassifier`]: what an HTTP response means to a breaker and to a retry layer.

use super::retry_after::retry_after;
use crate::classify::ClassifyRetry;
use crate::classify::{Classify, Outcome, RetryDecision};
use http::{HeaderMap, StatusCode};
use std::sync::{Mutex, PoisonError};

/// A response whose status and headers a classifier can read: `http::Response<B>`, and
/// `reqwest::Response` with the `reqwest` feature.
pub trait HttpResponse {
    /// The response's status.
    fn status(&self) -> StatusCode;
    /// The response's headers.
    fn headers(&self) -> &HeaderMap;
}

impl<B> HttpResponse for http::Response<B> {
    fn status(&self) -> StatusCode {
        self.status()
    }

    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
}

#[cfg(feature = "reqwest")]
impl HttpResponse for reqwest::Response {
    fn status(&self) -> StatusCode {
        self.status()
    }

    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
}

/// Classifies HTTP results for breakers ([`Classify`]) and retry layers ([`ClassifyRetry`]).
///
/// * Breakers: a 5xx response and an error (connection refused, reset, timed out) are
///   failures; every other response, 4xx included, is a success (the client erred, the
///   server is fine).
/// * Retries: 429 and every 5xx (503 included) are tried again by default, waiting at least
///   the response's `Retry-After` when it has one; errors are tried again; other responses,
///   every other 4xx included, are returned as they are. [`retrying`](Self::retrying)
///   replaces that set (with one that also has 408, say, for servers that time idle
///   requests out).
///   Whether a *request* may be repeated at all (its method, its body) is the replay side's
///   decision: see [`HttpReplay`](super::HttpReplay).
///
/// ```
/// use meshkit::classify::{Classify, ClassifyRetry, Outcome, RetryDecision};
/// use meshkit::http::HttpClassifier;
/// use std::time::Duration;
///
/// let classifier = HttpClassifier::default();
/// let busy: Result<_, std::io::Error> = Ok(http::Response::builder()
///     .status(503)
///     .header("retry-after", "2")
///     .body(())
///     .unwrap());
/// assert_eq!(classifier.classify(&busy), Outcome::Failure);
/// assert_eq!(classifier.classify_retry(&busy), RetryDecision::RetryAfter(Duration::from_secs(2)));
///
/// let missing: Result<_, std::io::Error> = Ok(http::Response::builder().status(404).body(()).unwrap());
/// assert_eq!(classifier.classify(&missing), Outcome::Success);
/// assert_eq!(classifier.classify_retry(&missing), RetryDecision::Stop);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct HttpClassifier {
    /// The retried statuses, interned: classifiers with the same set share one, so the copy
    /// each call carries (in the breaker's and the retry's futures) is a pointer.
    retryable: &'static StatusSet,
}

/// Bit `n` set: status `n` (100..=999) is retried.
type StatusSet = [u64; 16];

/// Adds status `code` to `set`.
const fn insert(set: &mut StatusSet, code: u16) {
    set[code as usize / 64] |= 1 << (code % 64);
}

/// 429 and every 5xx.
static DEFAULT_SET: StatusSet = {
    let mut set = [0u64; 16];
    insert(&mut set, 429);
    let mut code = 500;
    while code < 600 {
        insert(&mut set, code);
        code += 1;
    }
    set
};

/// The one copy of `set`, made (and kept for the life of the process) the first time it is
/// seen. Programs build a handful of distinct sets, so what is kept stays small.
fn intern(set: StatusSet) -> &'static StatusSet {
    static SETS: Mutex<Vec<&'static StatusSet>> = Mutex::new(Vec::new());
    if set == DEFAULT_SET {
        return &DEFAULT_SET;
    }
    let mut sets = SETS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(found) = sets.iter().find(|kept| ***kept == set) {
        return found;
    }
    let kept: &'static StatusSet = Box::leak(Box::new(set));
    sets.push(kept);
    kept
}

impl Default for HttpClassifier {
    /// Retries 429 and every 5xx.
    fn default() -> Self {
        Self {
            retryable: &DEFAULT_SET,
        }
    }
}

impl HttpClassifier {
    /// Retries exactly `statuses` (and errors), in place of the default set: to add 408 to
    /// it, `retrying([408, 429].into_iter().chain(500..600).filter_map(|code|
    /// StatusCode::from_u16(code).ok()))`. Each distinct
    /// set is kept once for the life of the process and shared by every classifier built
    /// with it, so that copying a classifier (every call does) copies a pointer.
    pub fn retrying(statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let mut set = [0u64; 16];
        for status in statuses {
            insert(&mut set, status.as_u16());
        }
        Self {
            retryable: intern(set),
        }
    }

    /// Whether a response with `status` is tried again.
    pub fn retries(&self, status: StatusCode) -> bool {
        let code = status.as_u16() as usize;
        self.retryable[code / 64] & (1 << (code % 64)) != 0
    }
}

impl<R: HttpResponse, E> Classify<R, E> for HttpClassifier {
    #[inline]
    fn classify(&self, result: &Result<R, E>) -> Outcome {
        match result {
            Ok(response) if response.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

impl<R: HttpResponse, E> ClassifyRetry<R, E> for HttpClassifier {
    #[inline]
    fn classify_retry(&self, result: &Result<R, E>) -> RetryDecision {
        match result {
            Ok(response) if self.retries(response.status()) => {
                match retry_after(response.headers()) {
                    Some(delay) => RetryDecision::RetryAfter(delay),
                    None => RetryDecision::Retry,
                }
            }
            Ok(_) => RetryDecision::Stop,
            Err(_) => RetryDecision::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn response(status: u16, retry_after: Option<&str>) -> Result<http::Response<()>, ()> {
        let mut builder = http::Response::builder().status(status);
        if let Some(value) = retry_after {
            builder = builder.header("retry-after", value);
        }
        Ok(builder.body(()).unwrap())
    }

    #[test]
    fn server_errors_and_transport_errors_are_failures_client_errors_are_not() {
        let classifier = HttpClassifier::default();
        for (status, outcome) in [
            (200, Outcome::Success),
            (304, Outcome::Success),
            (400, Outcome::Success),
            (404, Outcome::Success),
            (429, Outcome::Success),
            (500, Outcome::Failure),
            (503, Outcome::Failure),
            (599, Outcome::Failure),
        ] {
            assert_eq!(
                classifier.classify(&response(status, None)),
                outcome,
                "{status}"
            );
        }
        let refused: Result<http::Response<()>, ()> = Err(());
        assert_eq!(classifier.classify(&refused), Outcome::Failure);
    }

    #[test]
    fn retryable_statuses_honour_retry_after_and_others_stop() {
        let classifier = HttpClassifier::default();
        let decide = |status, hint| classifier.classify_retry(&response(status, hint));
        assert_eq!(
            decide(429, Some("7")),
            RetryDecision::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(decide(503, None), RetryDecision::Retry);
        assert_eq!(decide(503, Some("garbage")), RetryDecision::Retry);
        assert_eq!(decide(502, None), RetryDecision::Retry);
        assert_eq!(decide(408, None), RetryDecision::Stop);
        assert_eq!(decide(404, Some("7")), RetryDecision::Stop);
        assert_eq!(decide(200, None), RetryDecision::Stop);
        let refused: Result<http::Response<()>, ()> = Err(());
        assert_eq!(classifier.classify_retry(&refused), RetryDecision::Retry);
    }

    #[test]
    fn the_retried_statuses_can_be_chosen() {
        let classifier = HttpClassifier::retrying([StatusCode::SERVICE_UNAVAILABLE]);
        assert!(classifier.retries(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!classifier.retries(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!classifier.retries(StatusCode::TOO_MANY_REQUESTS));
        let with_408 = HttpClassifier::retrying(
            [408, 429]
                .into_iter()
                .chain(500..600)
                .filter_map(|code| StatusCode::from_u16(code).ok()),
        );
        assert!(with_408.retries(StatusCode::REQUEST_TIMEOUT));
        assert!(with_408.retries(StatusCode::TOO_MANY_REQUESTS));
        assert!(with_408.retries(StatusCode::BAD_GATEWAY));
        assert!(!with_408.retries(StatusCode::NOT_FOUND));
    }

    #[test]
    fn the_default_set_is_429_and_every_5xx() {
        let classifier = HttpClassifier::default();
        for code in 100..=999u16 {
            let status = StatusCode::from_u16(code).unwrap();
            let expected = code == 429 || (500..600).contains(&code);
            assert_eq!(classifier.retries(status), expected, "{code}");
        }
    }

    #[test]
    fn classifiers_with_the_same_statuses_share_one_set() {
        let a = HttpClassifier::retrying([StatusCode::BAD_GATEWAY, StatusCode::GATEWAY_TIMEOUT]);
        let b = HttpClassifier::retrying([StatusCode::GATEWAY_TIMEOUT, StatusCode::BAD_GATEWAY]);
        assert!(std::ptr::eq(a.retryable, b.retryable));
        let c = HttpClassifier::retrying([StatusCode::BAD_GATEWAY]);
        assert!(!std::ptr::eq(a.retryable, c.retryable));
    }
}
