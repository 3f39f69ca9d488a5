use super::local;
use super::probe::ProbePermit;
use super::shared::{generation_of, Shared, FAST};
use super::CircuitOpen;
use crate::classify::{Classify, Outcome};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;
use tower::BoxError;

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker): the inner call, whose
    /// outcome is recorded when it finishes, or an immediate [`CircuitOpen`] rejection.
    ///
    /// Dropping it before it finishes records nothing (a probe's slot is given back), unless
    /// a meshkit timeout cut the call short (a retry's `per_try_timeout` or `deadline`, a
    /// mesh client's `timeout`): that counts as a failure, so that a backend that hangs
    /// trips the breaker. It holds no reference to the breaker in the closed state, only its
    /// id.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        classifier: C,
        count_rejections: bool,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            if crate::cancel::is_timing_out() {
                timed_out(this.project().kind.project());
            }
        }
    }
}

/// A call a timeout cut short: a failure (and slow, when slow calls are tracked).
#[cold]
#[inline(never)]
fn timed_out<F>(kind: KindProjection<'_, F>) {
    match kind {
        KindProjection::Closed {
            breaker, admitted, ..
        } => finish_closed(*breaker, *admitted, Outcome::Failure, false),
        KindProjection::ClosedTimed {
            breaker,
            admitted,
            slow_at,
            ..
        } => finish_closed(
            *breaker,
            *admitted,
            Outcome::Failure,
            Instant::now() >= *slow_at,
        ),
        KindProjection::Probe {
            permit, slow_at, ..
        } => {
            if let Some(permit) = permit.take() {
                permit.finish(Some(true), is_slow(*slow_at));
            }
        }
        KindProjection::Rejected { .. } | KindProjection::Unrecorded { .. } => {}
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F> {
        Rejected { error: Option<CircuitOpen> },
        /// Disabled breaker: nothing to record.
        Unrecorded { #[pin] future: F },
        /// A closed-state call admitted under mode word `admitted`.
        Closed {
            #[pin]
            future: F,
            breaker: u64,
            admitted: u64,
        },
        /// The same, when slow calls are tracked: the call is slow once `slow_at` passes.
        ClosedTimed {
            #[pin]
            future: F,
            breaker: u64,
            admitted: u64,
            slow_at: Instant,
        },
        Probe {
            #[pin]
            future: F,
            permit: Option<ProbePermit>,
            slow_at: Option<Instant>,
        },
    }
}

/// What a finished call looks like to the breaker.
enum Tracking {
    /// A closed-state call tracked for slowness (the untimed kind finishes in `poll`).
    Closed {
        breaker: u64,
        admitted: u64,
        slow_at: Instant,
    },
    Probe {
        permit: Option<ProbePermit>,
        slow_at: Option<Instant>,
    },
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn rejected(error: CircuitOpen, classifier: C) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
            classifier,
            count_rejections: false,
        }
    }

    pub(crate) fn unrecorded(future: F, classifier: C) -> Self {
        Self {
            kind: Kind::Unrecorded { future },
            classifier,
            count_rejections: false,
        }
    }

    #[inline]
    pub(crate) fn closed(
        future: F,
        shared: &Shared,
        admitted: u64,
        classifier: C,
        count_rejections: bool,
    ) -> Self {
        let breaker = shared.id;
        // One constructor per kind, each moving `future` once: a `kind` chosen by a `match`
        // and then moved into `Self` costs a copy of the inner future per step.
        match slow_at(shared) {
            None => Self {
                kind: Kind::Closed {
                    future,
                    breaker,
                    admitted,
                },
                classifier,
                count_rejections,
            },
            Some(slow_at) => Self {
                kind: Kind::ClosedTimed {
                    future,
                    breaker,
                    admitted,
                    slow_at,
                },
                classifier,
                count_rejections,
            },
        }
    }

    pub(crate) fn probe(
        future: F,
        shared: &Shared,
        permit: ProbePermit,
        classifier: C,
        count_rejections: bool,
    ) -> Self {
        Self {
            kind: Kind::Probe {
                future,
                permit: Some(permit),
                slow_at: slow_at(shared),
            },
            classifier,
            count_rejections,
        }
    }
}

/// Only slow-call tracking reads the clock; without it a call reads no time at all.
#[inline]
fn slow_at(shared: &Shared) -> Option<Instant> {
    shared
        .settings
        .slow_call_duration
        .map(|limit| Instant::now() + limit)
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Rejected { .. } => "rejected",
            Kind::Unrecorded { .. } => "unrecorded",
            Kind::Closed { .. } | Kind::ClosedTimed { .. } => "closed",
            Kind::Probe { .. } => "probe",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (result, tracking) = match this.kind.project() {
            KindProjection::Rejected { error } => {
                return Poll::Ready(Err(error
                    .take()
                    .expect("ResponseFuture polled after completion")
                    .into()))
            }
            KindProjection::Unrecorded { future } => {
                return future.poll(cx).map_err(Into::into);
            }
            KindProjection::Closed {
                future,
                breaker,
                admitted,
            } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                let outcome = classify(this.classifier, *this.count_rejections, &result);
                finish_closed(*breaker, *admitted, outcome, false);
                return Poll::Ready(result);
            }
            KindProjection::ClosedTimed {
                future,
                breaker,
                admitted,
                slow_at,
            } => (
                ready!(future.poll(cx)).map_err(Into::into),
                Tracking::Closed {
                    breaker: *breaker,
                    admitted: *admitted,
                    slow_at: *slow_at,
                },
            ),
            KindProjection::Probe {
                future,
                permit,
                slow_at,
            } => (
                ready!(future.poll(cx)).map_err(Into::into),
                Tracking::Probe {
                    permit: permit.take(),
                    slow_at: *slow_at,
                },
            ),
        };
        let outcome = classify(this.classifier, *this.count_rejections, &result);
        tracking.finish(outcome);
        Poll::Ready(result)
    }
}

/// The outcome of a finished call: meshkit's own rejections, and calls a balancer below did
/// not send ([`EndpointEjected`](crate::balance::EndpointEjected)), are ignored unless
/// counted; the classifier decides the rest.
#[inline]
fn classify<T, C: Classify<T, BoxError>>(
    classifier: &C,
    count_rejections: bool,
    result: &Result<T, BoxError>,
) -> Outcome {
    match result {
        Err(error) if !count_rejections && crate::error::is_refused(&**error) => Outcome::Ignored,
        _ => classifier.classify(result),
    }
}

impl Tracking {
    #[inline]
    fn finish(self, outcome: Outcome) {
        match self {
            Tracking::Closed {
                breaker,
                admitted,
                slow_at,
            } => finish_closed(breaker, admitted, outcome, Instant::now() >= slow_at),
            Tracking::Probe { permit, slow_at } => {
                if let Some(permit) = permit {
                    let failed = match outcome {
                        Outcome::Success => Some(false),
                        Outcome::Failure => Some(true),
                        Outcome::Ignored => None,
                    };
                    permit.finish(failed, is_slow(slow_at));
                }
            }
        }
    }
}

/// Records a finished closed-state call: a non-slow success on this thread's own cell when
/// the breaker is still armed for it (the hot path), anything else through the lock.
#[inline(always)]
fn finish_closed(breaker: u64, admitted: u64, outcome: Outcome, slow: bool) {
    let counted = outcome == Outcome::Success && !slow && count_fast_success(breaker, admitted);
    if !counted && outcome != Outcome::Ignored {
        record_closed(breaker, admitted, outcome, slow);
    }
}

/// Counts a success on this thread's cell if the breaker is still in the closed generation
/// that admitted it and armed for the fast path; returns false to ask for the slow path.
#[inline(always)]
fn count_fast_success(breaker: u64, admitted: u64) -> bool {
    if admitted & FAST == 0 {
        return false;
    }
    local::with(breaker, None, |cell| {
        let current = cell.mode();
        let fast = current & FAST != 0 && generation_of(current) == generation_of(admitted);
        if fast {
            cell.count_call();
        }
        fast
    })
    // `None`: the breaker is gone, or this thread is exiting; the slow path sorts it out.
    .unwrap_or(false)
}

fn is_slow(slow_at: Option<Instant>) -> bool {
    slow_at.is_some_and(|slow_at| Instant::now() >= slow_at)
}

/// The slow path: the lock, the window and possibly a transition.
#[cold]
#[inline(never)]
fn record_closed(breaker: u64, admitted: u64, outcome: Outcome, slow: bool) {
    let failed = outcome == Outcome::Failure;
    match local::owned(breaker) {
        Some((cell, shared)) => shared.record_closed(Some(&cell), admitted, failed, slow),
        // This thread's locals are gone (it is exiting): count without a cell.
        None => {
            if let Some(shared) = local::lookup(breaker) {
                shared.record_closed(None, admitted, failed, slow);
            }
        }
    }
}
