//! [`ResponseFuture`]: one call's tries, waits and timeouts.

use super::error::into_error;
use super::replay::Replay;
use super::service::{find, Shared};
use super::TimedOut;
use crate::classify::{ClassifyRetry, RetryDecision};
use crate::error::{is_rejection_value, is_unsent_value};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tower::Service;

pin_project! {
    /// Response future of [`Retry`](super::Retry): the current try, or the wait before the
    /// next one.
    ///
    /// Small on purpose: what only a retry or a timeout needs lives behind one box, allocated
    /// when first needed, so a call that succeeds at once allocates nothing and reads no clock
    /// (unless a timeout or deadline is configured). Dropping the future cancels the current
    /// try and any retry.
    #[project = Projection]
    pub struct ResponseFuture<S, Req, C, K>
    where
        S: Service<Req>,
    {
        #[pin]
        call: Option<S::Future>,
        // The service retries are sent through, and the copy of the request they send.
        service: Option<S>,
        spare: Option<Req>,
        // The spare may be sent only if the try never was (`Replay::replay_unsent`).
        unsent_only: bool,
        classifier: C,
        replay: K,
        // The retry service's shared state, found again by id on the slow path.
        id: u64,
        // `None` while the first try runs without a timer: the fast path.
        slow: SlowState<Result<S::Response, S::Error>>,
    }
}

/// The box of [`Slow`] state, whose drop stays out of the way of calls that never made one.
struct SlowState<T>(Option<Box<Slow<T>>>);

impl<T> Drop for SlowState<T> {
    #[inline]
    fn drop(&mut self) {
        if let Some(slow) = self.0.take() {
            drop_slow(slow);
        }
    }
}

#[cold]
#[inline(never)]
fn drop_slow<T>(slow: Box<Slow<T>>) {
    drop(slow);
}

/// A timed call's state, made out of the fast path.
#[cold]
#[inline(never)]
fn start_slow<T>(timeouts: Timeouts) -> Box<Slow<T>> {
    Slow::new(timeouts)
}

/// The config a call's [`Slow`] state starts from.
pub(crate) struct Timeouts {
    pub(crate) per_try: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) max_attempts: u32,
    /// Whether a try can be cut short (the error type can carry [`TimedOut`]).
    pub(crate) cut: bool,
    /// The layer's state, held from here on (a slow call no longer relies on the keepalive
    /// cache).
    pub(crate) shared: Arc<Shared>,
}

/// A call's state once it waits, retries or keeps time.
struct Slow<T> {
    /// The result of the last try while a retry is on its way: what the caller gets if the
    /// retry cannot be sent after all (deadline reached while waiting for readiness).
    last: Option<T>,
    phase: Phase,
    /// The try in flight or last finished, from 1.
    attempt: u32,
    max_attempts: u32,
    /// Whether tries can be cut short; if not, the deadline only stops retries.
    cut: bool,
    shared: Arc<Shared>,
    /// The current try's timeout, or the wait before the next try.
    timer: Option<Pin<Box<Sleep>>>,
    /// What the timer means when it fires during a try.
    timer_error: Option<TimedOut>,
    per_try_timeout: Option<Duration>,
    deadline: Option<Duration>,
    deadline_at: Option<Instant>,
    previous_delay: Option<Duration>,
    /// The endpoints of the tries that failed, as a balancer under this layer reported them
    /// ([`crate::tried`]): the next try goes elsewhere when it can.
    tried: Vec<u64>,
}

impl<T> Slow<T> {
    fn new(timeouts: Timeouts) -> Box<Self> {
        let mut slow = Box::new(Self {
            last: None,
            phase: Phase::Calling,
            attempt: 1,
            max_attempts: timeouts.max_attempts,
            cut: timeouts.cut,
            shared: timeouts.shared,
            timer: None,
            timer_error: None,
            per_try_timeout: timeouts.per_try,
            deadline: timeouts.deadline,
            deadline_at: None,
            previous_delay: None,
            tried: Vec::new(),
        });
        if timeouts.per_try.is_some() || timeouts.deadline.is_some() {
            let now = Instant::now();
            slow.deadline_at = timeouts.deadline.map(|deadline| now + deadline);
            slow.arm_try(now);
        }
        slow
    }

    /// Arms the timer for a try starting at `now`: the per-try timeout or what is left of the
    /// deadline, whichever ends first.
    fn arm_try(&mut self, now: Instant) {
        if !self.cut {
            return;
        }
        let per_try = self
            .per_try_timeout
            .map(|timeout| (now + timeout, TimedOut::new(timeout, false)));
        let deadline = self
            .deadline_at
            .zip(self.deadline)
            .map(|(at, total)| (at, TimedOut::new(total, true)));
        let earliest = match (per_try, deadline) {
            (Some(a), Some(b)) => Some(if b.0 <= a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        self.timer = earliest.map(|(at, _)| Box::pin(sleep_until(at)));
        self.timer_error = earliest.map(|(_, error)| error);
    }

    /// Whether the try timer has fired; registers for a wake-up if not.
    fn try_timer_fired(&mut self, cx: &mut Context<'_>) -> Option<TimedOut> {
        let timer = self.timer.as_mut()?;
        timer.as_mut().poll(cx).is_ready().then(|| {
            self.timer = None;
            self.timer_error.take().expect("a try timer has an error")
        })
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
    /// The last try finished; its result is returned.
    Done,
}

impl<S, Req, C, K> ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    /// `timeouts` is `Some` only when a per-try timeout or a deadline is configured.
    #[inline]
    pub(crate) fn new(
        call: S::Future,
        service: Option<S>,
        (spare, unsent_only): (Option<Req>, bool),
        classifier: C,
        replay: K,
        id: u64,
        timeouts: Option<Timeouts>,
    ) -> Self {
        Self {
            call: Some(call),
            service,
            spare,
            unsent_only,
            classifier,
            replay,
            id,
            slow: SlowState(timeouts.map(start_slow)),
        }
    }
}

/// The least time a retry needs before the deadline: one tick of tokio's timer.
const MIN_TRY: Duration = Duration::from_millis(1);

/// Rounds a server's hint up to the timer's resolution, so the retry never comes early.
fn round_up_to_millis(hint: Duration) -> Duration {
    let millis = hint.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

impl<S, Req, C, K> Future for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
    S::Error: 'static,
    C: ClassifyRetry<S::Response, S::Error>,
    K: Replay<Req>,
{
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The first try with no timer: small enough to inline into the caller.
        if this.slow.0.is_none() {
            let mut slot = this.call.as_mut();
            let call = slot
                .as_mut()
                .as_pin_mut()
                .expect("retry future polled after completion");
            let result = ready!(call.poll(cx));
            slot.set(None);
            let decision = this.classifier.classify_retry(&result);
            if decision == RetryDecision::Stop {
                return Poll::Ready(result);
            }
            if let Some(result) = after_try(&mut this, result, decision) {
                return Poll::Ready(result);
            }
        }
        poll_slow(&mut this, cx)
    }
}

type Output<S, Req> = Result<<S as Service<Req>>::Response, <S as Service<Req>>::Error>;

/// After a try that the classifier would retry: schedules the retry (and returns `None`), or
/// hands `result` back to be returned.
#[inline(never)]
fn after_try<S, Req, C, K>(
    this: &mut Projection<'_, S, Req, C, K>,
    result: Output<S, Req>,
    decision: RetryDecision,
) -> Option<Output<S, Req>>
where
    S: Service<Req>,
    S::Error: 'static,
{
    let attempt = this.slow.0.as_ref().map_or(1, |slow| slow.attempt);
    let shared = match this.slow.0.as_ref() {
        Some(slow) => Some(slow.shared.clone()),
        None => find(*this.id),
    };
    let Some(shared) = shared else {
        tracing::warn!(
            attempt,
            "the retry layer's state is gone (its services were dropped and this thread's \
             keepalive cache evicted it); not retried"
        );
        return finish(this, result);
    };
    let service = &*shared.name;
    let rejected = matches!(&result, Err(error) if is_rejection_value(error));
    if rejected && !shared.limits.retry_rejections {
        return finish(this, result);
    }
    if attempt >= shared.limits.max_attempts {
        tracing::info!(service, attempt, "retries exhausted");
        shared.sink.publish(
            service,
            crate::events::system::SystemEvent::RetriesExhausted {
                service: service.to_string(),
                attempts: attempt,
            },
        );
        return finish(this, result);
    }
    if this.spare.is_none() {
        tracing::debug!(
            service,
            attempt = attempt + 1,
            "request cannot be replayed; not retried"
        );
        return finish(this, result);
    }
    if *this.unsent_only && !matches!(&result, Err(error) if is_unsent_value(error)) {
        tracing::debug!(
            service,
            attempt = attempt + 1,
            "request may have been sent and may be replayed only if not; not retried"
        );
        return finish(this, result);
    }
    let Some(delay) = schedule(decision, &shared, attempt, &mut this.slow.0) else {
        return finish(this, result);
    };
    let slow = this
        .slow
        .0
        .as_mut()
        .expect("schedule keeps a retry's state");
    // The try finished in this poll, on this thread: a balancer under this layer has just
    // recorded its endpoint.
    if let Some(endpoint) = crate::tried::last() {
        if !slow.tried.contains(&endpoint) {
            slow.tried.push(endpoint);
        }
    }
    slow.last = Some(result);
    slow.timer = (!delay.is_zero()).then(|| Box::pin(sleep(delay)));
    slow.phase = Phase::Waiting;
    None
}

/// Ends the call with `result`.
fn finish<S, Req, C, K>(
    this: &mut Projection<'_, S, Req, C, K>,
    result: Output<S, Req>,
) -> Option<Output<S, Req>>
where
    S: Service<Req>,
{
    if let Some(slow) = this.slow.0.as_mut() {
        slow.phase = Phase::Done;
    }
    Some(result)
}

/// Everything but a first try without timers: timeouts, waits, readiness and later tries.
#[inline(never)]
fn poll_slow<S, Req, C, K>(
    this: &mut Projection<'_, S, Req, C, K>,
    cx: &mut Context<'_>,
) -> Poll<Output<S, Req>>
where
    S: Service<Req>,
    S::Error: 'static,
    C: ClassifyRetry<S::Response, S::Error>,
    K: Replay<Req>,
{
    loop {
        let slow = this.slow.0.as_mut().expect("a slow call has its state");
        match slow.phase {
            Phase::Calling => {
                let mut slot = this.call.as_mut();
                let call = slot.as_mut().as_pin_mut().expect("a try is in flight");
                let result = match call.poll(cx) {
                    Poll::Ready(result) => {
                        slot.set(None);
                        result
                    }
                    Poll::Pending => match slow.try_timer_fired(cx) {
                        None => return Poll::Pending,
                        // Cut short: the breakers below count the try as failed.
                        Some(error) if error.is_deadline() => {
                            crate::cancel::timed_out(|| slot.set(None));
                            slow.phase = Phase::Done;
                            return Poll::Ready(Err(into_error(error)));
                        }
                        Some(error) => {
                            crate::cancel::timed_out(|| slot.set(None));
                            Err(into_error(error))
                        }
                    },
                };
                slow.timer = None;
                slow.phase = Phase::Done;
                let decision = this.classifier.classify_retry(&result);
                if decision == RetryDecision::Stop {
                    return Poll::Ready(result);
                }
                if let Some(result) = after_try(this, result, decision) {
                    return Poll::Ready(result);
                }
            }
            Phase::Waiting => {
                if let Some(timer) = slow.timer.as_mut() {
                    ready!(timer.as_mut().poll(cx));
                }
                // While the service gets ready, only the deadline can end the call.
                slow.timer = slow.deadline_at.map(|at| Box::pin(sleep_until(at)));
                slow.phase = Phase::Readying;
            }
            Phase::Readying => {
                let service = this.service.as_mut().expect("a retry has a service");
                let ready = service.poll_ready(cx);
                let past_deadline = match (&ready, slow.timer.as_mut()) {
                    (Poll::Pending, Some(timer)) => timer.as_mut().poll(cx).is_ready(),
                    (Poll::Pending, None) => false,
                    (Poll::Ready(_), _) => slow.deadline_at.is_some_and(|at| Instant::now() >= at),
                };
                match ready {
                    // As tower's `Retry` does: a readiness error ends the call.
                    Poll::Ready(Err(error)) => {
                        slow.phase = Phase::Done;
                        return Poll::Ready(Err(error));
                    }
                    _ if past_deadline => {
                        slow.phase = Phase::Done;
                        let last = slow.last.take().expect("a retry keeps the last result");
                        return Poll::Ready(last);
                    }
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                }
                slow.last = None;
                let request = this.spare.take().expect("a retry has a request");
                slow.attempt += 1;
                if slow.attempt < slow.max_attempts {
                    *this.spare = match *this.unsent_only {
                        false => this.replay.replay(&request),
                        true => this.replay.replay_unsent(&request),
                    };
                }
                // The retry's own span: whatever the service opens while sending it (an
                // endpoint's span, say) sits under it, with the try's number. The first try
                // has none, so a call that succeeds at once pays nothing for it.
                let span = tracing::debug_span!(
                    "meshkit.retry",
                    service = %slow.shared.name,
                    attempt = slow.attempt
                );
                let avoid = &slow.tried;
                let call =
                    span.in_scope(|| crate::tried::avoiding(avoid, || service.call(request)));
                this.call.set(Some(call));
                slow.timer = None;
                if slow.per_try_timeout.is_some() || slow.deadline_at.is_some() {
                    slow.arm_try(Instant::now());
                }
                slow.phase = Phase::Calling;
            }
            Phase::Done => panic!("retry future polled after completion"),
        }
    }
}

/// After try `attempt` finished with a result the classifier would retry (and a copy of the
/// request is at hand): the wait before the next try, or `None` to return the result. A retry
/// it allows has been withdrawn from the budget.
fn schedule<T>(
    decision: RetryDecision,
    shared: &Arc<Shared>,
    attempt: u32,
    slow: &mut Option<Box<Slow<T>>>,
) -> Option<Duration> {
    let hint = match decision {
        RetryDecision::Stop => return None,
        RetryDecision::Retry => None,
        RetryDecision::RetryAfter(hint) => Some(hint),
    };
    let service = &*shared.name;
    let previous_delay = slow.as_ref().and_then(|slow| slow.previous_delay);
    let deadline_at = slow.as_ref().and_then(|slow| slow.deadline_at);
    let mut delay = shared
        .config
        .backoff
        .delay(attempt, previous_delay, &*shared.random);
    if let Some(hint) = hint {
        if hint > shared.config.max_retry_after {
            tracing::info!(
                service,
                attempt = attempt + 1,
                ?hint,
                "server asked for a longer wait than max_retry_after (or, in a mesh, the call's timeout); not retried"
            );
            return None;
        }
        delay = delay.max(round_up_to_millis(hint));
    }
    if let Some(at) = crate::timer::call_deadline() {
        // A whole-call time limit above (a mesh client's `timeout`): a wait it would cut
        // short ends the call with a timeout, the last answer lost. Return that answer now.
        if delay + MIN_TRY >= at.saturating_duration_since(Instant::now()) {
            tracing::info!(
                service,
                attempt = attempt + 1,
                ?delay,
                "the call's timeout leaves no time for a retry"
            );
            return None;
        }
    }
    if let Some(at) = deadline_at {
        // The retry must start, and have at least a timer tick to run, before the deadline.
        if delay + MIN_TRY >= at.saturating_duration_since(Instant::now()) {
            tracing::info!(
                service,
                attempt = attempt + 1,
                ?delay,
                "deadline leaves no time for a retry"
            );
            return None;
        }
    }
    if !shared.budget.withdraw() {
        tracing::info!(
            service,
            attempt = attempt + 1,
            "retry budget refused a retry"
        );
        shared.sink.publish(
            service,
            crate::events::system::SystemEvent::BudgetRefused {
                service: service.to_string(),
                attempt: attempt + 1,
            },
        );
        return None;
    }
    tracing::debug!(service, attempt = attempt + 1, ?delay, "retrying");
    #[cfg(feature = "metrics")]
    crate::metrics::retry_scheduled(service);
    slow.get_or_insert_with(|| {
        Slow::new(Timeouts {
            per_try: None,
            deadline: None,
            max_attempts: shared.limits.max_attempts,
            cut: false,
            shared: shared.clone(),
        })
    })
    .previous_delay = Some(delay);
    Some(delay)
}

impl<S, Req, C, K> fmt::Debug for ResponseFuture<S, Req, C, K>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slow = self.slow.0.as_ref();
        f.debug_struct("ResponseFuture")
            .field("phase", &slow.map_or(Phase::Calling, |slow| slow.phase))
            .field("attempt", &slow.map_or(1, |slow| slow.attempt))
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
