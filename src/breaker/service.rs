use super::future::{Recorder, ResponseFuture};
use super::shared::{state_of, Admission, Shared};
use super::{BreakerHandle, BreakerState};
use crate::classify::{Classify, DefaultClassifier};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{BoxError, Service};

/// How a breaker sits in its stack; shared by the layer and its services.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Options {
    /// `poll_ready` waits while open instead of `call` failing fast.
    pub(crate) gate: bool,
    /// meshkit's own rejections count as failures instead of being ignored.
    pub(crate) count_rejections: bool,
}

/// A service guarded by a circuit breaker; built by [`CircuitBreakerLayer`].
///
/// Every clone, and every service built by the same layer, shares one breaker. The error type
/// is [`BoxError`]: the inner service's errors pass through unchanged inside it, and calls the
/// breaker refuses fail with [`CircuitOpen`](super::CircuitOpen).
///
/// [`CircuitBreakerLayer`]: super::CircuitBreakerLayer
pub struct CircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    options: Options,
    /// Decided in `poll_ready`, used by the next `call`.
    admission: Option<Admission>,
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, classifier: C, options: Options) -> Self {
        Self {
            inner,
            shared,
            classifier,
            options,
            admission: None,
        }
    }

    /// The handle of the breaker this service shares.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.shared.clone())
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the breaker, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        // A probe slot reserved by `poll_ready` belongs to this service only.
        Self::new(
            self.inner.clone(),
            self.shared.clone(),
            self.classifier.clone(),
            self.options,
        )
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &state_of(self.shared.mode()))
            .field("gate", &self.options.gate)
            .finish()
    }
}

impl<S, C, Request> Service<Request> for CircuitBreaker<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A reserved probe slot is kept until `call`; anything else is decided afresh.
        if !matches!(self.admission, Some(Admission::Probe(_))) {
            let admission = if self.options.gate {
                match self.shared.poll_admit(cx) {
                    Poll::Ready(admission) => admission,
                    Poll::Pending => {
                        self.admission = None;
                        return Poll::Pending;
                    }
                }
            } else {
                self.shared.admit()
            };
            self.admission = Some(admission);
        }
        if let Some(Admission::Reject(_)) = self.admission {
            // `call` will fail fast; no need to reserve capacity in the inner service.
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let admission = self.admission.take().unwrap_or_else(|| self.shared.admit());
        let inner = &mut self.inner;
        start(
            &self.shared,
            admission,
            self.classifier.clone(),
            self.options,
            || inner.call(request),
        )
    }
}

/// Turns an admission decision into the response future: a rejection, or the inner call with
/// a recorder for its outcome. Shared by the plain and the keyed breaker.
pub(crate) fn start<F, C>(
    shared: &Shared,
    admission: Admission,
    classifier: C,
    options: Options,
    call: impl FnOnce() -> F,
) -> ResponseFuture<F, C> {
    let recorder = match admission {
        Admission::Reject(error) => {
            shared.count_rejection();
            return ResponseFuture::rejected(error, classifier);
        }
        Admission::Pass(word) => (state_of(word) == BreakerState::Closed)
            .then(|| Recorder::new(shared.shard().clone(), word, None)),
        Admission::Probe(permit) => Some(Recorder::new(shared.shard().clone(), 0, Some(permit))),
    };
    ResponseFuture::called(call(), recorder, classifier, options.count_rejections)
}
