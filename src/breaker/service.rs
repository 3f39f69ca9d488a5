use super::future::ResponseFuture;
use super::probe::ProbePermit;
use super::shared::{generation_of, state_of, Admission, ModeCell, Shared, Waiter};
use super::{BreakerHandle, BreakerState, CircuitOpen};
use crate::classify::{Classify, DefaultClassifier};
use std::fmt;
use std::sync::atomic::Ordering;
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
    /// The breaker's mode word, held directly: one pointer hop on every `poll_ready`.
    mode: Arc<ModeCell>,
    classifier: C,
    options: Options,
    /// The mode word `poll_ready` admitted the next call under, or `UNDECIDED`/`HELD`.
    /// Kept apart from the rare cases below so that the hot path moves one `u64`.
    admitted: u64,
    /// A half-open probe slot reserved by `poll_ready`.
    probe: Option<ProbePermit>,
    /// Why `poll_ready` decided to reject the next call.
    rejection: Option<CircuitOpen>,
    /// This service's place among gate-mode waiters, once it has waited.
    waiter: Option<Waiter>,
}

/// `admitted` when `poll_ready` has not decided (or `call` consumed the decision).
const UNDECIDED: u64 = u64::MAX;
/// `admitted` when the next call is rejected (see `rejection`) or is a probe (see `probe`).
const HELD: u64 = u64::MAX - 1;

/// Whether `admitted` is a mode word under which calls pass (closed or disabled).
#[inline]
fn passes(admitted: u64) -> bool {
    admitted < HELD
        && matches!(
            state_of(admitted),
            BreakerState::Closed | BreakerState::Disabled
        )
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, classifier: C, options: Options) -> Self {
        Self {
            inner,
            mode: shared.mode_cell().clone(),
            shared,
            classifier,
            options,
            admitted: UNDECIDED,
            probe: None,
            rejection: None,
            waiter: None,
        }
    }

    /// The handle of the breaker this service shares.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.shared.clone())
    }

    crate::macros::inner_accessors!();
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        self.clone_with(self.classifier.clone())
    }
}

impl<S: Clone, C> CircuitBreaker<S, C> {
    /// A copy of this breaker whose calls are judged by `classifier` (the caller's copy of
    /// this breaker's classifier).
    pub(crate) fn clone_with(&self, classifier: C) -> Self {
        // A probe slot reserved by `poll_ready` belongs to this service only.
        Self::new(
            self.inner.clone(),
            self.shared.clone(),
            classifier,
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

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let word = self.mode.load(Ordering::Acquire);
        if self.admitted != HELD && passes(word) {
            // The common case: closed (or disabled), nothing reserved or decided before.
            self.admitted = word;
        } else if self.decide(word, cx).is_pending() {
            return Poll::Pending;
        }
        if self.admitted == HELD && self.rejection.is_some() {
            // `call` will fail fast; no need to reserve capacity in the inner service.
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline(always)]
    fn call(&mut self, request: Request) -> Self::Future {
        let admitted = std::mem::replace(&mut self.admitted, UNDECIDED);
        if passes(admitted) && state_of(admitted) == BreakerState::Closed {
            let future = self.inner.call(request);
            return ResponseFuture::closed(
                future,
                &self.shared,
                admitted,
                self.classifier.clone(),
                self.options.count_rejections,
            );
        }
        let admission = self.take_admission(admitted);
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

impl<S, C: Clone> CircuitBreaker<S, C> {
    /// Admits one call now if the breaker is closed, without this service's own readiness
    /// bookkeeping: for a caller that sends the call through a copy of the inner service
    /// (a balancer's endpoint), so the breaker itself need not be copied per call. Returns
    /// the mode word to pass to [`admitted`](Self::admitted); `None` when the breaker is not
    /// closed: go through `poll_ready` and `call`.
    #[inline]
    pub(crate) fn admit_closed(&self) -> Option<u64> {
        let word = self.mode.load(Ordering::Acquire);
        (passes(word) && state_of(word) == BreakerState::Closed).then_some(word)
    }

    /// Whether the next `call`, after a `poll_ready` that returned `Ready(Ok(()))`, fails fast
    /// (the breaker rejected it) rather than reaching the inner service.
    #[inline]
    pub(crate) fn rejects_next_call(&self) -> bool {
        self.admitted == HELD && self.rejection.is_some()
    }

    /// Whether the breaker is open (not half-open, forced open or disabled).
    #[inline]
    pub(crate) fn is_open(&self) -> bool {
        state_of(self.mode.load(Ordering::Acquire)) == BreakerState::Open
    }

    /// The future of a call [`admit_closed`](Self::admit_closed) admitted under `word`:
    /// records its outcome as `call`'s would, judged by `classifier` (the caller's copy of
    /// this breaker's classifier).
    #[inline]
    pub(crate) fn admitted<F>(&self, future: F, word: u64, classifier: C) -> ResponseFuture<F, C> {
        ResponseFuture::closed(
            future,
            &self.shared,
            word,
            classifier,
            self.options.count_rejections,
        )
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// `poll_ready` off the common path: a probe slot or rejection held from an earlier
    /// `poll_ready`, or a breaker that is not closed.
    #[cold]
    #[inline(never)]
    fn decide(&mut self, word: u64, cx: &mut Context<'_>) -> Poll<()> {
        // A reserved probe slot is kept until `call`, unless its half-open period is over.
        if let Some(probe) = &self.probe {
            if probe.generation() == generation_of(word) {
                return Poll::Ready(());
            }
            self.probe = None;
        }
        if passes(word) {
            // An earlier decision to reject no longer holds.
            self.rejection = None;
            self.admitted = word;
            return Poll::Ready(());
        }
        self.decide_held(cx)
    }

    /// The breaker is not closed or disabled: reject, wait (gate mode) or reserve a probe.
    #[cold]
    #[inline(never)]
    fn decide_held(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.rejection = None;
        let admission = if self.options.gate {
            match self.shared.poll_admit(cx, &mut self.waiter) {
                Poll::Ready(admission) => admission,
                Poll::Pending => {
                    self.admitted = UNDECIDED;
                    return Poll::Pending;
                }
            }
        } else {
            self.shared.admit()
        };
        match admission {
            Admission::Pass(word) => self.admitted = word,
            Admission::Probe(permit) => {
                self.admitted = HELD;
                self.probe = Some(permit);
            }
            Admission::Reject(error) => {
                self.admitted = HELD;
                self.rejection = Some(error);
            }
        }
        Poll::Ready(())
    }

    /// What `call` does when the decision is not a plain closed-state pass.
    #[cold]
    fn take_admission(&mut self, admitted: u64) -> Admission {
        if let Some(permit) = self.probe.take() {
            if permit.generation() == generation_of(self.shared.mode()) {
                self.shared.probe_sent(permit.generation(), permit.id());
                return Admission::Probe(permit);
            }
            // The half-open period it was reserved in is over: decide afresh.
            drop(permit);
            return self.shared.admit();
        }
        if let Some(error) = self.rejection.take() {
            return Admission::Reject(error);
        }
        if passes(admitted) {
            return Admission::Pass(admitted);
        }
        // `call` without `poll_ready`: decide now rather than panic.
        self.shared.admit()
    }
}

/// Turns an admission decision into the response future: a rejection, or the inner call with
/// a recorder for its outcome. Shared by the plain and the keyed breaker.
#[inline]
pub(crate) fn start<F, C>(
    shared: &Shared,
    admission: Admission,
    classifier: C,
    options: Options,
    call: impl FnOnce() -> F,
) -> ResponseFuture<F, C> {
    match admission {
        Admission::Pass(word) if state_of(word) == BreakerState::Closed => {
            ResponseFuture::closed(call(), shared, word, classifier, options.count_rejections)
        }
        Admission::Pass(_) => ResponseFuture::unrecorded(call(), classifier),
        Admission::Probe(permit) => {
            ResponseFuture::probe(call(), shared, permit, classifier, options.count_rejections)
        }
        Admission::Reject(error) => {
            shared.count_rejection();
            ResponseFuture::rejected(error, classifier)
        }
    }
}
