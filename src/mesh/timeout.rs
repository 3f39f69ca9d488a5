//! [`Timeout`]: the whole call's time limit, with no timer for a call that is ready at once.

use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tower::timeout::error::Elapsed;
use tower::{BoxError, Service};

/// Fails a call with tower's [`Elapsed`] when it takes longer than `limit`, counted from its
/// first poll (which follows `call` at once in a stack). Unlike `tower::timeout::Timeout`, the
/// timer is armed only when the call is not ready on its first poll: an in-process call that
/// completes at once costs no clock read and no timer.
#[derive(Clone, Debug)]
pub(crate) struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Timeout<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit }
    }
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline(always)]
    fn call(&mut self, request: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(request),
            limit: self.limit,
            sleep: None,
        }
    }
}

pin_project! {
    /// [`Timeout`]'s future.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        limit: Duration,
        // Armed only for calls that wait; in place (the whole future is boxed above it).
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        loop {
            if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
                return match sleep.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(Elapsed::new().into())),
                    Poll::Pending => Poll::Pending,
                };
            }
            this.sleep.set(Some(tokio::time::sleep(*this.limit)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_limit_fails_with_elapsed() {
        let slow = tower::service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, BoxError>(())
        });
        let started = tokio::time::Instant::now();
        let error = Timeout::new(slow, Duration::from_secs(1))
            .oneshot(())
            .await
            .unwrap_err();
        assert!(error.is::<Elapsed>());
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_its_limit_passes_through() {
        let quick = tower::service_fn(|n: u32| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, BoxError>(n)
        });
        let answer = Timeout::new(quick, Duration::from_secs(1))
            .oneshot(7)
            .await
            .unwrap();
        assert_eq!(answer, 7);
    }
}
