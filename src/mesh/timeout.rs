//! [`CallTimeout`]: the whole call's time limit, kept by the client's response future, with
//! no timer for a call that is ready at once.

use crate::timer::Timer;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::timeout::error::Elapsed;

/// The time limit of one call, counted from its first poll (which follows `call` at once in
/// a client). Unlike `tower::timeout::Timeout`, the timer is armed only when the call is not
/// ready on its first poll: an in-process call that completes at once costs no clock read
/// and no timer. A call that waits takes a pooled [`Timer`], re-armed rather than registered
/// afresh with the runtime's timer wheel. Kept by [`MeshClient`](super::MeshClient)'s
/// response future rather than as a layer of its own: one future fewer for every call.
pub(crate) struct CallTimeout {
    limit: Option<Duration>,
    // Armed only for calls that wait.
    timer: Option<Timer>,
}

impl CallTimeout {
    /// A call limited to `limit`, or not limited.
    #[inline]
    pub(crate) fn new(limit: Option<Duration>) -> Self {
        Self { limit, timer: None }
    }

    /// Polls the call with `poll`; `Elapsed` once the limit has passed and the call is still
    /// not ready. Once armed, the call is polled with its deadline in the thread's slot
    /// (`timer::within_deadline`): a retry below does not wait for a try it could not finish
    /// in time.
    #[inline]
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<Result<T, Elapsed>> {
        let polled = match &self.timer {
            Some(timer) => crate::timer::within_deadline(timer.deadline(), || poll(cx)),
            None => poll(cx),
        };
        if let Poll::Ready(output) = polled {
            return Poll::Ready(Ok(output));
        }
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Timer::at(Instant::now() + limit));
        match timer.poll_elapsed(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed::new())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pin_project_lite::pin_project;
    use std::future::Future;
    use std::pin::Pin;
    use tokio::time::{sleep, Instant};
    use tower::{BoxError, Service, ServiceExt};

    /// `CallTimeout` around each call of `inner`, as the client's response future keeps it.
    #[derive(Clone)]
    struct Timeout<S> {
        inner: S,
        limit: Duration,
    }

    impl<S> Timeout<S> {
        fn new(inner: S, limit: Duration) -> Self {
            Self { inner, limit }
        }
    }

    impl<S: Service<Req, Error = BoxError>, Req> Service<Req> for Timeout<S> {
        type Response = S::Response;
        type Error = BoxError;
        type Future = Limited<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: Req) -> Self::Future {
            Limited {
                inner: self.inner.call(request),
                timeout: CallTimeout::new(Some(self.limit)),
            }
        }
    }

    pin_project! {
        struct Limited<F> {
            #[pin]
            inner: F,
            timeout: CallTimeout,
        }
    }

    impl<F: Future<Output = Result<T, BoxError>>, T> Future for Limited<F> {
        type Output = Result<T, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.project();
            let inner = this.inner;
            this.timeout
                .poll(cx, |cx| inner.poll(cx))
                .map(|result| result.map_err(Into::into).and_then(|output| output))
        }
    }

    /// A call that answers `n` after `delay`, counted from its first poll.
    fn slow(
        delay: Duration,
    ) -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone {
        tower::service_fn(move |n: u32| async move {
            sleep(delay).await;
            Ok::<_, BoxError>(n)
        })
    }

    /// Awaits `call`, which must fail with `Elapsed`; returns how long it ran.
    async fn time_until_elapsed<T: std::fmt::Debug>(
        call: impl Future<Output = Result<T, BoxError>>,
    ) -> Duration {
        let started = Instant::now();
        let error = call.await.unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_limit_fails_with_elapsed() {
        let timeout = Timeout::new(slow(Duration::from_secs(5)), Duration::from_secs(1));
        let waited = time_until_elapsed(timeout.oneshot(0)).await;
        assert_eq!(waited, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_limit_passes_through() {
        let answer = Timeout::new(slow(Duration::from_millis(500)), Duration::from_secs(1))
            .oneshot(7)
            .await
            .unwrap();
        assert_eq!(answer, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_start_apart_each_time_out_at_their_own_limit() {
        let mut timeout = Timeout::new(slow(Duration::from_secs(5)), Duration::from_secs(1));
        let calls = [0u64, 300, 700, 1_000, 2_500].map(|offset| {
            let call = timeout.call(0);
            async move {
                sleep(Duration::from_millis(offset)).await;
                time_until_elapsed(call).await
            }
        });
        for waited in futures::future::join_all(calls).await {
            assert_eq!(waited, Duration::from_secs(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quick_calls_do_not_time_out_the_ones_after_them() {
        // A slow call after quick ones still gets its whole limit.
        let mut timeout = Timeout::new(
            tower::service_fn(|delay: u64| async move {
                sleep(Duration::from_millis(delay)).await;
                Ok::<_, BoxError>(delay)
            }),
            Duration::from_secs(1),
        );
        for delay in [10, 900, 10, 999] {
            let answer = timeout.ready().await.unwrap().call(delay).await.unwrap();
            assert_eq!(answer, delay);
        }
        let call = timeout.ready().await.unwrap().call(5_000);
        assert_eq!(time_until_elapsed(call).await, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_after_a_long_idle_time_still_times_out() {
        let mut timeout = Timeout::new(slow(Duration::from_secs(5)), Duration::from_secs(1));
        for idle in [0, 10, 3_600] {
            sleep(Duration::from_secs(idle)).await;
            let call = timeout.ready().await.unwrap().call(0);
            assert_eq!(time_until_elapsed(call).await, Duration::from_secs(1));
        }
    }

    #[test]
    fn a_service_moved_to_another_runtime_keeps_timing_out() {
        let mut timeout = Timeout::new(slow(Duration::from_secs(5)), Duration::from_secs(1));
        for _ in 0..2 {
            let error = crate::timer::tests::paused_runtime()
                .block_on(async { timeout.ready().await.unwrap().call(0).await })
                .unwrap_err();
            assert!(error.is::<Elapsed>());
        }
    }
}
