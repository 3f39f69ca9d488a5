use super::shared::{ProbePermit, Shard};
use super::CircuitOpen;
use crate::classify::{Classify, Outcome};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;
use tower::BoxError;

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker): the inner call, whose
    /// outcome is recorded when it finishes, or an immediate [`CircuitOpen`] rejection.
    ///
    /// Dropping it before it finishes records nothing (a probe's slot is given back).
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        recorder: Option<Recorder>,
        classifier: C,
        count_rejections: bool,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F> {
        Rejected { error: Option<CircuitOpen> },
        Called { #[pin] future: F },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn rejected(error: CircuitOpen, classifier: C) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
            recorder: None,
            classifier,
            count_rejections: false,
        }
    }

    pub(crate) fn called(
        future: F,
        recorder: Option<Recorder>,
        classifier: C,
        count_rejections: bool,
    ) -> Self {
        Self {
            kind: Kind::Called { future },
            recorder,
            classifier,
            count_rejections,
        }
    }
}

impl<F, C> std::fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Rejected { .. } => "rejected",
            Kind::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .field("recorded", &self.recorder.is_some())
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProjection::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
            KindProjection::Called { future } => {
                let result = ready!(future.poll(cx)).map_err(Into::into);
                if let Some(recorder) = this.recorder.take() {
                    let outcome = match &result {
                        Err(error) if !*this.count_rejections && crate::error::is_rejection(&**error) => {
                            Outcome::Ignored
                        }
                        _ => this.classifier.classify(&result),
                    };
                    recorder.finish(outcome);
                }
                Poll::Ready(result)
            }
        }
    }
}

/// Records one call's outcome when it finishes.
#[derive(Debug)]
pub(crate) struct Recorder {
    shard: Arc<Shard>,
    admitted: u64,
    started: Option<Instant>,
    probe: Option<ProbePermit>,
}

impl Recorder {
    pub(crate) fn new(shard: Arc<Shard>, admitted: u64, probe: Option<ProbePermit>) -> Self {
        // Only slow-call tracking needs the clock; without it a success reads no time at all.
        let started = shard.slow_call_duration().map(|_| Instant::now());
        Self {
            shard,
            admitted,
            started,
            probe,
        }
    }

    fn finish(self, outcome: Outcome) {
        let slow = match (self.started, self.shard.slow_call_duration()) {
            (Some(started), Some(limit)) => started.elapsed() >= limit,
            _ => false,
        };
        if let Some(probe) = self.probe {
            let failed = match outcome {
                Outcome::Success => Some(false),
                Outcome::Failure => Some(true),
                Outcome::Ignored => None,
            };
            probe.finish(failed, slow);
            return;
        }
        match outcome {
            Outcome::Ignored => {}
            Outcome::Success if !slow && self.shard.try_record_success(self.admitted) => {}
            _ => {
                if let Some(shared) = self.shard.shared.upgrade() {
                    shared.record_closed(&self.shard, self.admitted, outcome == Outcome::Failure, slow);
                }
            }
        }
    }
}
