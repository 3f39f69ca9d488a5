//! meshkit's errors as HTTP responses: `503` for an open breaker, `429` for a rate limit, ...

use crate::balance::{EndpointEjected, NoEndpoints};
use crate::breaker::CircuitOpen;
use crate::limit::{Overloaded, RateLimited};
use crate::mesh::MeshClosed;
use crate::retry::TimedOut;
use http::StatusCode;
use std::error::Error;
use std::time::Duration;

/// The status (and `Retry-After` delay, when the error knows one) that the first meshkit
/// error in `error`'s `source()` chain stands for, or `None` if there is none:
///
/// | error | status | `Retry-After` |
/// |---|---|---|
/// | [`CircuitOpen`] | 503 Service Unavailable | the time until the breaker half-opens |
/// | [`NoEndpoints`], [`EndpointEjected`] | 503 Service Unavailable | – |
/// | [`Overloaded`] (concurrency limit, load shed) | 503 Service Unavailable | – |
/// | [`RateLimited`] | 429 Too Many Requests | the time until a request is admitted |
/// | [`TimedOut`], `tower::timeout::error::Elapsed` | 504 Gateway Timeout | – |
/// | [`MeshClosed`] (the mesh is shutting down) | 503 Service Unavailable | – |
///
/// ```
/// use meshkit::http::error_status;
/// use std::io;
///
/// assert_eq!(error_status(&io::Error::other("reset")), None);
/// ```
pub fn error_status(error: &(dyn Error + 'static)) -> Option<(StatusCode, Option<Duration>)> {
    for error in crate::error::chain(error) {
        if let Some(open) = error.downcast_ref::<CircuitOpen>() {
            return Some((StatusCode::SERVICE_UNAVAILABLE, Some(open.retry_after())));
        }
        if let Some(limited) = error.downcast_ref::<RateLimited>() {
            return Some((StatusCode::TOO_MANY_REQUESTS, Some(limited.retry_after())));
        }
        if error.is::<NoEndpoints>()
            || error.is::<EndpointEjected>()
            || error.is::<Overloaded>()
            || error.is::<MeshClosed>()
        {
            return Some((StatusCode::SERVICE_UNAVAILABLE, None));
        }
        if error.is::<TimedOut>() || error.is::<tower::timeout::error::Elapsed>() {
            return Some((StatusCode::GATEWAY_TIMEOUT, None));
        }
    }
    None
}

/// A `Retry-After` value in whole seconds, rounded up: a client that waits that long is
/// never early.
pub fn retry_after_value(delay: Duration) -> http::HeaderValue {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    http::HeaderValue::from(secs)
}

#[cfg(feature = "axum")]
pub use with_axum::{ErrorResponse, ErrorResponseLayer, MeshError};

#[cfg(feature = "axum")]
mod with_axum {
    use super::*;
    use axum_core::response::{IntoResponse, Response};
    use futures::future::BoxFuture;
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use tower::{BoxError, Layer, Service};

    /// The response for `error`: its [`error_status`] with the error's message, or
    /// `500 Internal Server Error` for an error meshkit did not raise (its details are logged,
    /// not sent).
    fn respond(error: &(dyn Error + 'static)) -> Response {
        match error_status(error) {
            Some((status, retry_after)) => {
                let mut response = (status, error.to_string()).into_response();
                if let Some(delay) = retry_after {
                    response
                        .headers_mut()
                        .insert(http::header::RETRY_AFTER, retry_after_value(delay));
                }
                response
            }
            None => {
                tracing::warn!(%error, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }

    macro_rules! into_response {
        ($($error:ty),*) => {$(
            impl IntoResponse for $error {
                /// See [`error_status`](crate::http::error_status) for the mapping.
                fn into_response(self) -> Response {
                    respond(&self)
                }
            }
        )*};
    }

    into_response!(
        CircuitOpen,
        NoEndpoints,
        EndpointEjected,
        Overloaded,
        RateLimited,
        TimedOut,
        MeshClosed
    );

    /// Any error of a meshkit stack (a [`MeshClient`](crate::MeshClient)'s `BoxError`), as an
    /// axum handler returns it: `?` converts, and the response is the one [`error_status`]
    /// names (an open breaker a `503` with `Retry-After`, the whole-call timeout a `504`, ...),
    /// or a `500` for an error meshkit did not raise, whose details are logged, not sent.
    ///
    /// ```
    /// use meshkit::http::MeshError;
    /// use tower::{Service, ServiceExt};
    ///
    /// async fn user(
    ///     mut users: meshkit::MeshClient<http::Request<()>, http::Response<()>>,
    /// ) -> Result<String, MeshError> {
    ///     let request = http::Request::get("http://users/7").body(()).unwrap();
    ///     let response = users.ready().await?.call(request).await?;
    ///     Ok(response.status().to_string())
    /// }
    /// ```
    #[derive(Debug)]
    pub struct MeshError(pub BoxError);

    impl From<BoxError> for MeshError {
        fn from(error: BoxError) -> Self {
            Self(error)
        }
    }

    impl std::fmt::Display for MeshError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fmt(f)
        }
    }

    /// Transparent: it shows as the error it wraps, and its source is that error's source
    /// (an error report does not print the same message twice).
    impl Error for MeshError {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.0.source()
        }
    }

    impl IntoResponse for MeshError {
        fn into_response(self) -> Response {
            respond(&*self.0)
        }
    }

    /// Turns a service's errors into responses, so meshkit's protection layers stack onto an
    /// `axum::Router` with no `HandleErrorLayer`: rejections become the responses
    /// [`error_status`] names, any other error a `500`.
    ///
    /// ```
    /// use meshkit::http::ErrorResponseLayer;
    /// use meshkit::limit::{ConcurrencyLimitLayer, RateLimitConfig, RateLimitLayer};
    /// use tower::ServiceBuilder;
    ///
    /// # fn main() -> Result<(), meshkit::ConfigError> {
    /// let protection = ServiceBuilder::new()
    ///     .layer(ErrorResponseLayer::new())
    ///     .layer(RateLimitLayer::new(RateLimitConfig { rate: 500.0, burst: 100 })?)
    ///     .layer(ConcurrencyLimitLayer::new(64)?);
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/users", axum::routing::get(|| async { "ok" }))
    ///     .layer(protection);
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Clone, Copy, Debug, Default)]
    pub struct ErrorResponseLayer {
        _private: (),
    }

    impl ErrorResponseLayer {
        /// The layer.
        pub const fn new() -> Self {
            Self { _private: () }
        }
    }

    impl<S> Layer<S> for ErrorResponseLayer {
        type Service = ErrorResponse<S>;

        fn layer(&self, inner: S) -> ErrorResponse<S> {
            ErrorResponse {
                inner,
                not_ready: None,
            }
        }
    }

    /// The service [`ErrorResponseLayer`] builds: never fails, answers errors. An error the
    /// inner service reports from `poll_ready` answers the next request, which the inner
    /// service never sees (tower's contract: no `call` after a failed `poll_ready`).
    #[derive(Debug)]
    pub struct ErrorResponse<S> {
        inner: S,
        not_ready: Option<BoxError>,
    }

    impl<S: Clone> Clone for ErrorResponse<S> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
                not_ready: None,
            }
        }
    }

    impl<S, Req> Service<Req> for ErrorResponse<S>
    where
        S: Service<Req>,
        S::Response: IntoResponse,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        type Response = Response;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Response, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.not_ready.is_some() {
                return Poll::Ready(Ok(()));
            }
            // A readiness error cannot be answered without a request: kept for the next one.
            match self.inner.poll_ready(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(error)) => {
                    self.not_ready = Some(error.into());
                    Poll::Ready(Ok(()))
                }
            }
        }

        fn call(&mut self, request: Req) -> Self::Future {
            if let Some(error) = self.not_ready.take() {
                let response = respond(&*error);
                return Box::pin(std::future::ready(Ok(response)));
            }
            let call = self.inner.call(request);
            Box::pin(async move {
                Ok(match call.await {
                    Ok(response) => response.into_response(),
                    Err(error) => respond(&*error.into()),
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerState;

    #[cfg(feature = "axum")]
    #[tokio::test]
    async fn a_readiness_error_answers_the_next_request_without_calling_the_service() {
        use crate::limit::OverloadReason;
        use tower::{Layer, Service, ServiceExt};

        /// Fails `poll_ready` once with `Overloaded`, then is ready; `call` panics unless the
        /// `poll_ready` before it succeeded.
        #[derive(Default)]
        struct FailsReadinessOnce {
            failed: bool,
            ready: bool,
        }

        impl Service<()> for FailsReadinessOnce {
            type Response = &'static str;
            type Error = tower::BoxError;
            type Future = std::future::Ready<Result<&'static str, tower::BoxError>>;

            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), tower::BoxError>> {
                if std::mem::replace(&mut self.failed, true) {
                    self.ready = true;
                    std::task::Poll::Ready(Ok(()))
                } else {
                    let overloaded = Overloaded::new(OverloadReason::LoadShed);
                    std::task::Poll::Ready(Err(overloaded.into()))
                }
            }

            fn call(&mut self, (): ()) -> Self::Future {
                assert!(std::mem::take(&mut self.ready), "called while not ready");
                std::future::ready(Ok("ok"))
            }
        }

        let mut service = ErrorResponseLayer::new().layer(FailsReadinessOnce::default());
        let refused = service.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let served = service.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(served.status(), StatusCode::OK);
    }

    #[cfg(feature = "axum")]
    #[test]
    fn a_mesh_error_shows_as_the_error_it_wraps() {
        /// An error of the user's, caused by the breaker's refusal.
        #[derive(Debug)]
        struct CallFailed(CircuitOpen);
        impl std::fmt::Display for CallFailed {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the call failed")
            }
        }
        impl Error for CallFailed {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let open = CircuitOpen::new(BreakerState::Open, Duration::from_secs(2));
        let wrapped: tower::BoxError = Box::new(CallFailed(open));
        let message = wrapped.to_string();
        let error = MeshError::from(wrapped);
        assert_eq!(error.to_string(), message);
        let source = error.source().expect("the wrapped error's source");
        assert!(source.is::<CircuitOpen>(), "{source}");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_value(Duration::ZERO), "0");
        assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(2_001)), "3");
    }

    #[test]
    fn meshkit_errors_map_to_their_status_through_wrappers() {
        let open = CircuitOpen::new(BreakerState::Open, Duration::from_millis(1_500));
        let boxed: tower::BoxError = Box::new(std::io::Error::other(open));
        assert_eq!(
            error_status(&*boxed),
            Some((
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_millis(1_500))
            ))
        );
        let elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(
            error_status(&elapsed),
            Some((StatusCode::GATEWAY_TIMEOUT, None))
        );
        for unavailable in [&EndpointEjected as &(dyn Error + 'static), &MeshClosed] {
            assert_eq!(
                error_status(unavailable),
                Some((StatusCode::SERVICE_UNAVAILABLE, None)),
                "{unavailable}"
            );
        }
    }
}
