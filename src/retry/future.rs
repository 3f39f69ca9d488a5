//! [`ResponseFuture`]: one call's tries, waits and timeouts.

use super::replay::Replay;
use super::service::{find, Limits};
use super::TimedOut;
use crate::classify::{ClassifyRetry, RetryDecision};
use crate::error::is_rejection_value;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{sleep, Instant, Sleep};
use tower::Service;

pin_project! {
    /// Response future of [`Retry`](super::Retry): the current try, or the wait before the
    /// next one.
    ///
    /// A call that succeeds at once allocates nothing and reads no clock unless a timeout or
    /// deadline is configured. Dropping the future cancels the current try and any retry.
    pub struct ResponseFuture<S, Req, C, K>
    where
        S: Service<Req>,
    {
        #[pin]
        call: Option<S::Future>,
        // The current try's timeout, or the wait before the next try.
        timer: Option<Pin<Box<Sleep>>>,
        // What the timer means when it fires during a try.
        timer_error: Option<TimedOut>,
        phase: Phase,
        // The service retries are sent through, and the copy of the request they send.
        service: Option<S>,
        spare: Option<Req>,
        classifier: C,
        replay: K,
        limits: Limits,
        attempt: u32,
        previous_delay: Option<Duration>,
        deadline_at: Option<Instant>,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A try is in flight.
    Calling,
    /// Waiting out the backoff before the next try.
    Waiting,
    /// Waiting for the service to be ready for the next try.
    Readying,
}

impl<S, Req, C, K> ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    pub(crate) fn new(
        call: S::Future,
        service: Option<S>,
        spare: Option<Req>,
        classifier: C,
        replay: K,
        limits: Limits,
    ) -> Self {
        let mut future = Self {
            call: Some(call),
            timer: None,
            timer_error: None,
            phase: Phase::Calling,
            service,
            spare,
            classifier,
            replay,
            limits,
            attempt: 1,
            previous_delay: None,
            deadline_at: None,
        };
        if limits.per_try_timeout.is_some() || limits.deadline.is_some() {
            let now = Instant::now();
            future.deadline_at = limits.deadline.map(|deadline| now + deadline);
            (future.timer, future.timer_error) = try_timer(&limits, future.deadline_at, now);
        }
        future
    }
}

/// The timer for a try starting at `now`: the per-try timeout or what is left of the deadline,
/// whichever ends first, with the error it stands for.
fn try_timer(
    limits: &Limits,
    deadline_at: Option<Instant>,
    now: Instant,
) -> (Option<Pin<Box<Sleep>>>, Option<TimedOut>) {
    let per_try = limits
        .per_try_timeout
        .map(|timeout| (now + timeout, TimedOut::new(timeout, false)));
    let deadline = deadline_at
        .zip(limits.deadline)
        .map(|(at, total)| (at, TimedOut::new(total, true)));
    let earliest = match (per_try, deadline) {
        (Some(a), Some(b)) => Some(if b.0 <= a.0 { b } else { a }),
        (a, b) => a.or(b),
    };
    match earliest {
        Some((at, error)) => (Some(Box::pin(tokio::time::sleep_until(at))), Some(error)),
        None => (None, None),
    }
}

/// Rounds a server's hint up to the timer's resolution, so the retry never comes early.
fn round_up_to_millis(hint: Duration) -> Duration {
    let nanos = hint.as_nanos();
    let millis = nanos.div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

impl<S, Req, C, K> Future for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: From<TimedOut> + 'static,
    C: ClassifyRetry<S::Response, S::Error>,
    K: Replay<Req>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match *this.phase {
                Phase::Calling => {
                    let call = this
                        .call
                        .as_mut()
                        .as_pin_mut()
                        .expect("retry future polled after completion");
                    let result = match call.poll(cx) {
                        Poll::Ready(result) => result,
                        Poll::Pending => {
                            let expired = this
                                .timer
                                .as_mut()
                                .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
                            if !expired {
                                return Poll::Pending;
                            }
                            let error = this.timer_error.expect("a try timer has an error");
                            if error.is_deadline() {
                                this.call.set(None);
                                *this.timer = None;
                                return Poll::Ready(Err(error.into()));
                            }
                            Err(error.into())
                        }
                    };
                    this.call.set(None);
                    *this.timer = None;
                    let Some(delay) = decide(
                        &result,
                        this.classifier,
                        this.limits,
                        *this.attempt,
                        this.previous_delay,
                        this.spare.is_some() && this.service.is_some(),
                        *this.deadline_at,
                    ) else {
                        return Poll::Ready(result);
                    };
                    drop(result);
                    *this.timer = (!delay.is_zero()).then(|| Box::pin(sleep(delay)));
                    *this.phase = Phase::Waiting;
                }
                Phase::Waiting => {
                    if let Some(timer) = this.timer.as_mut() {
                        ready!(timer.as_mut().poll(cx));
                    }
                    // While the service gets ready, only the deadline can end the call.
                    *this.timer = this
                        .deadline_at
                        .map(|at| Box::pin(tokio::time::sleep_until(at)));
                    *this.phase = Phase::Readying;
                }
                Phase::Readying => {
                    let service = this.service.as_mut().expect("a retry has a service");
                    match service.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Pending => {
                            if let Some(timer) = this.timer.as_mut() {
                                ready!(timer.as_mut().poll(cx));
                                let total = this.limits.deadline.unwrap_or_default();
                                return Poll::Ready(Err(TimedOut::new(total, true).into()));
                            }
                            return Poll::Pending;
                        }
                    }
                    let request = this.spare.take().expect("a retry has a request");
                    *this.attempt += 1;
                    if *this.attempt < this.limits.max_attempts {
                        *this.spare = this.replay.replay(&request);
                    }
                    this.call.set(Some(service.call(request)));
                    (*this.timer, *this.timer_error) =
                        if this.limits.per_try_timeout.is_some() || this.deadline_at.is_some() {
                            try_timer(this.limits, *this.deadline_at, Instant::now())
                        } else {
                            (None, None)
                        };
                    *this.phase = Phase::Calling;
                }
            }
        }
    }
}

/// After try `attempt` finished with `result`: the wait before the next try, or `None` to
/// return `result`. A retry it allows has been withdrawn from the budget.
fn decide<Res, E, C>(
    result: &Result<Res, E>,
    classifier: &C,
    limits: &Limits,
    attempt: u32,
    previous_delay: &mut Option<Duration>,
    replayable: bool,
    deadline_at: Option<Instant>,
) -> Option<Duration>
where
    E: 'static,
    C: ClassifyRetry<Res, E>,
{
    let decision = match result {
        Err(error) if !limits.retry_rejections && is_rejection_value(error) => RetryDecision::Stop,
        _ => classifier.classify_retry(result),
    };
    let hint = match decision {
        RetryDecision::Stop => return None,
        RetryDecision::Retry => None,
        RetryDecision::RetryAfter(hint) => Some(hint),
    };
    let shared = find(limits.id)?;
    let service = &*shared.name;
    if attempt >= limits.max_attempts {
        tracing::info!(service, attempt, "retries exhausted");
        return None;
    }
    if !replayable {
        tracing::debug!(service, attempt, "request cannot be replayed; not retried");
        return None;
    }
    let mut delay = shared
        .config
        .backoff
        .delay(attempt, *previous_delay, &*shared.random);
    if let Some(hint) = hint {
        if hint > shared.config.max_retry_after {
            tracing::info!(
                service,
                attempt,
                ?hint,
                "server asked for a longer wait than max_retry_after; not retried"
            );
            return None;
        }
        delay = delay.max(round_up_to_millis(hint));
    }
    if let Some(at) = deadline_at {
        if delay >= at.saturating_duration_since(Instant::now()) {
            tracing::info!(
                service,
                attempt,
                ?delay,
                "deadline leaves no time for a retry"
            );
            return None;
        }
    }
    if !shared.budget.withdraw() {
        tracing::info!(service, attempt, "retry budget refused a retry");
        return None;
    }
    tracing::debug!(service, attempt = attempt + 1, ?delay, "retrying");
    *previous_delay = Some(delay);
    Some(delay)
}

impl<S, Req, C, K> fmt::Debug for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("phase", &self.phase)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_up_to_whole_milliseconds() {
        let ms = Duration::from_millis;
        assert_eq!(round_up_to_millis(Duration::from_micros(1_500)), ms(2));
        assert_eq!(round_up_to_millis(ms(1_000)), ms(1_000));
        assert_eq!(round_up_to_millis(Duration::from_nanos(1)), ms(1));
    }
}
