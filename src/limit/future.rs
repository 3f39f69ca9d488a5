//! [`ResponseFuture`]: the inner call, or a rejection made without calling.

use super::error::{Overloaded, RateLimited};
use super::permit::Permit;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower::BoxError;

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit),
    /// [`ConcurrencyLimit`](super::ConcurrencyLimit) and [`LoadShed`](super::LoadShed): the
    /// inner call, or a rejection that is ready at once.
    ///
    /// Under a concurrency limit it holds the call's permit, released as soon as the inner
    /// call finishes or the future is dropped.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F> {
        Called {
            #[pin]
            future: F,
            permit: Option<Permit>,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
    }
}

/// Why a call was refused; boxed only when the future is polled.
#[derive(Debug)]
pub(crate) enum Rejection {
    RateLimited(RateLimited),
    Overloaded(Overloaded),
}

impl From<RateLimited> for Rejection {
    fn from(error: RateLimited) -> Self {
        Rejection::RateLimited(error)
    }
}

impl From<Overloaded> for Rejection {
    fn from(error: Overloaded) -> Self {
        Rejection::Overloaded(error)
    }
}

impl Rejection {
    fn into_error(self) -> BoxError {
        match self {
            Rejection::RateLimited(error) => error.into(),
            Rejection::Overloaded(error) => error.into(),
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(future: F, permit: Option<Permit>) -> Self {
        Self {
            kind: Kind::Called { future, permit },
        }
    }

    pub(crate) fn rejected(rejection: impl Into<Rejection>) -> Self {
        Self {
            kind: Kind::Rejected {
                rejection: Some(rejection.into()),
            },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Called { future, permit } => {
                let result = ready!(future.poll(cx));
                // The call is over: free its place now, not when the caller drops the future.
                drop(permit.take());
                Poll::Ready(result.map_err(Into::into))
            }
            KindProjection::Rejected { rejection } => Poll::Ready(Err(rejection
                .take()
                .expect("ResponseFuture polled after completion")
                .into_error())),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Called { permit, .. } => f
                .debug_struct("ResponseFuture")
                .field("kind", &"called")
                .field("holds_permit", &permit.is_some())
                .finish(),
            Kind::Rejected { rejection } => f
                .debug_struct("ResponseFuture")
                .field("kind", &"rejected")
                .field("rejection", rejection)
                .finish(),
        }
    }
}
