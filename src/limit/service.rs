//! [`RateLimit`], [`ConcurrencyLimit`] and [`LoadShed`]: the services the limit layers build.

use super::bucket::Bucket;
use super::error::{OverloadReason, Overloaded, RateLimited};
use super::future::ResponseFuture;
use super::permit::Permits;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{BoxError, Service};

/// A service whose calls are admitted by a token bucket; built by
/// [`RateLimitLayer`](super::RateLimitLayer).
///
/// Every clone, and every service built by the same layer, shares one bucket. `poll_ready` is
/// the inner service's; `call` takes a token or fails at once with
/// [`RateLimited`](super::RateLimited), without calling the inner service. The error type is
/// [`BoxError`]: the inner service's errors pass through unchanged inside it.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<Bucket>,
}

/// A service that refuses calls beyond a number in flight; built by
/// [`ConcurrencyLimitLayer`](super::ConcurrencyLimitLayer).
///
/// Every clone, and every service built by the same layer, counts against one limit. `call`
/// takes a permit, held by the response future until the inner call finishes or the future
/// is dropped, or fails at once with [`Overloaded`](super::Overloaded) without calling the
/// inner service. Unlike tower's `ConcurrencyLimit` it never waits: it protects a server,
/// whose callers are better told "no" than queued. The error type is [`BoxError`].
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Permits>,
}

/// A service that refuses calls while its inner service is not ready; built by
/// [`LoadShedLayer`](super::LoadShedLayer).
///
/// `poll_ready` is always ready (unless the inner service fails): when the inner service is
/// not, the next `call` fails at once with [`Overloaded`](super::Overloaded). Readiness counts
/// for one call, and a clone starts unready. The error type is [`BoxError`]; the inner
/// service's errors, readiness errors included, pass through unchanged inside it.
#[derive(Debug)]
pub struct LoadShed<S> {
    inner: S,
    /// Whether the inner service said it was ready for the next call.
    ready: bool,
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, bucket: Arc<Bucket>) -> Self {
        Self { inner, bucket }
    }
}

impl<S> ConcurrencyLimit<S> {
    pub(crate) fn new(inner: S, permits: Arc<Permits>) -> Self {
        Self { inner, permits }
    }
}

impl<S> LoadShed<S> {
    /// Wraps `inner`, shedding calls while it is not ready.
    pub const fn new(inner: S) -> Self {
        Self {
            inner,
            ready: false,
        }
    }
}

crate::macros::inner_accessors!(RateLimit, ConcurrencyLimit, LoadShed);

impl<S, Request> Service<Request> for RateLimit<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.bucket.take() {
            Ok(()) => ResponseFuture::called(self.inner.call(request), None),
            Err(retry_after) => ResponseFuture::rejected(RateLimited::new(retry_after)),
        }
    }
}

impl<S, Request> Service<Request> for ConcurrencyLimit<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The permit is taken by `call`, not here: a service that was made ready and then
        // left idle must not hold a place other callers could use.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.permits.try_acquire() {
            Some(permit) => ResponseFuture::called(self.inner.call(request), Some(permit)),
            None => ResponseFuture::rejected(Overloaded::new(OverloadReason::ConcurrencyLimit {
                max: self.permits.max(),
            })),
        }
    }
}

impl<S, Request> Service<Request> for LoadShed<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.ready = match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
            Poll::Pending => false,
        };
        // Ready either way, so that callers above never wait: that is the point.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if std::mem::take(&mut self.ready) {
            ResponseFuture::called(self.inner.call(request), None)
        } else {
            ResponseFuture::rejected(Overloaded::new(OverloadReason::LoadShed))
        }
    }
}

impl<S: Clone> Clone for LoadShed<S> {
    fn clone(&self) -> Self {
        // Readiness belongs to this service's inner service, not to the clone's.
        Self::new(self.inner.clone())
    }
}
