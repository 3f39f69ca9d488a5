//! [`ResponseFuture`]: the first try, its hedges, and the timer between them.

use super::service::Shared;
use crate::classify::{Classify, Outcome};
use crate::retry::Replay;
use futures::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{sleep, Instant, Sleep};
use tower::Service;

pin_project! {
    /// Response future of [`Hedge`](super::Hedge): every try in flight, and the timer for the
    /// next hedge.
    ///
    /// Returns the first success (dropping, and so cancelling, the other tries), or the last
    /// failure once every try has failed.
    pub struct ResponseFuture<S, Req, C, K>
    where
        S: Service<Req>,
    {
        tries: FuturesUnordered<Timed<S::Future>>,
        #[pin]
        timer: Option<Sleep>,
        delay: Option<Duration>,
        // Waiting for the service's readiness to send a hedge.
        readying: bool,
        hedges: u32,
        service: Option<S>,
        spare: Option<Req>,
        shared: Arc<Shared>,
        classifier: C,
        replay: K,
        last_failure: Option<Result<S::Response, S::Error>>,
        // The endpoints the tries went to, as a balancer below reported them
        // (`crate::tried`): each hedge goes elsewhere when it can.
        sent: Vec<u64>,
    }
}

pin_project! {
    /// One try and when it was sent.
    struct Timed<F> {
        #[pin]
        future: F,
        sent: Instant,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.future.poll(cx));
        Poll::Ready((output, this.sent.elapsed()))
    }
}

impl<S, Req, C, K> ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        first: S::Future,
        sent: Option<u64>,
        started: Instant,
        delay: Option<Duration>,
        service: Option<S>,
        spare: Option<Req>,
        shared: Arc<Shared>,
        classifier: C,
        replay: K,
    ) -> Self {
        let tries = FuturesUnordered::new();
        tries.push(Timed {
            future: first,
            sent: started,
        });
        let timer = delay.filter(|_| spare.is_some()).map(sleep);
        Self {
            tries,
            timer,
            delay,
            readying: false,
            hedges: 0,
            service,
            spare,
            shared,
            classifier,
            replay,
            last_failure: None,
            sent: sent.into_iter().collect(),
        }
    }
}

impl<S, Req, C, K> Future for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: 'static,
    C: Classify<S::Response, S::Error>,
    K: Replay<Req>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.tries.poll_next_unpin(cx) {
                Poll::Ready(Some((result, latency))) => {
                    // A meshkit rejection (an open breaker below) returned without reaching
                    // the dependency: its latency says nothing of the dependency's, and
                    // would pull the hedge delay down.
                    let rejected = matches!(&result, Err(e) if crate::error::is_rejection_value(e));
                    if !rejected {
                        this.shared.latencies.record(latency, Instant::now());
                    }
                    let failed = this.classifier.classify(&result) == Outcome::Failure;
                    if !failed {
                        // The tries still running took at least this long: record that, or
                        // the slow tries that hedging cuts short would never count and the
                        // percentile would drift down.
                        let now = Instant::now();
                        for pending in Pin::new(&*this.tries).iter_pin_ref() {
                            this.shared.latencies.record(now - pending.sent, now);
                        }
                        // The winner: drop the other tries now, which cancels them.
                        this.tries.clear();
                        return Poll::Ready(result);
                    }
                    if this.tries.is_empty() {
                        return Poll::Ready(result);
                    }
                    *this.last_failure = Some(result);
                    continue;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(
                        this.last_failure
                            .take()
                            .expect("hedge future polled after completion"),
                    );
                }
                Poll::Pending => {}
            }
            if !*this.readying {
                match this.timer.as_mut().as_pin_mut() {
                    Some(timer) => {
                        if timer.poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        this.timer.set(None);
                        *this.readying = true;
                    }
                    None => return Poll::Pending,
                }
            }
            let Some(service) = this.service.as_mut() else {
                return Poll::Pending;
            };
            match service.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    tracing::debug!(
                        service = &*this.shared.name,
                        attempt = *this.hedges + 2,
                        "service not ready for a hedge (readiness error); no more hedges"
                    );
                    // The tries in flight may still answer; no more hedges.
                    *this.readying = false;
                    *this.service = None;
                    continue;
                }
                Poll::Ready(Ok(())) => {}
            }
            *this.readying = false;
            let shared = &**this.shared;
            let attempt = *this.hedges + 2;
            if !shared.budget.withdraw() {
                tracing::info!(
                    service = &*shared.name,
                    attempt,
                    "hedge budget refused a hedge"
                );
                crate::events::system::publish(
                    &shared.name,
                    crate::events::system::SystemEvent::BudgetRefused {
                        service: shared.name.to_string(),
                        attempt,
                    },
                );
                *this.service = None;
                continue;
            }
            let request = this.spare.take().expect("a hedge has a request");
            *this.hedges += 1;
            if *this.hedges < shared.config.max_hedges {
                *this.spare = this.replay.replay(&request);
            }
            tracing::debug!(service = &*shared.name, attempt, delay = ?*this.delay, "hedging");
            let (future, went_to) = crate::tried::sending(this.sent, || service.call(request));
            this.sent.extend(went_to);
            this.tries.push(Timed {
                future,
                sent: Instant::now(),
            });
            if this.spare.is_some() {
                if let Some(delay) = *this.delay {
                    this.timer.set(Some(sleep(delay)));
                }
            }
        }
    }
}

impl<S, Req, C, K> fmt::Debug for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("in_flight", &self.tries.len())
            .field("hedges", &self.hedges)
            .finish_non_exhaustive()
    }
}
