//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Service, ServiceExt};

/// What the test backend does with a request.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    Succeed,
    Fail,
    /// Succeeds after this long (tokio time).
    Slow(Duration),
    /// Fails after this long (tokio time).
    SlowFail(Duration),
    /// Never finishes.
    Hang,
}

/// A backend that does what each request says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Backend;

pub fn backend() -> Backend {
    Backend
}

impl Service<Call> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Box::pin(async move {
            match call {
                Call::Succeed => Ok(()),
                Call::Fail => Err(BoxError::from("backend failed")),
                Call::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(())
                }
                Call::SlowFail(delay) => {
                    tokio::time::sleep(delay).await;
                    Err(BoxError::from("backend failed slowly"))
                }
                Call::Hang => std::future::pending().await,
            }
        })
    }
}

/// Waits for readiness, then sends one request.
pub async fn send<S>(service: &mut S, call: Call) -> Result<(), BoxError>
where
    S: Service<Call, Response = (), Error = BoxError>,
{
    service.ready().await?.call(call).await
}

/// Sends `n` identical requests one after another, ignoring their results.
pub async fn send_n<S>(service: &mut S, call: Call, n: usize)
where
    S: Service<Call, Response = (), Error = BoxError>,
{
    for _ in 0..n {
        let _ = send(service, call).await;
    }
}

/// Whether `result` is a rejection by a breaker.
pub fn is_open(result: &Result<(), BoxError>) -> bool {
    matches!(result, Err(err) if err.downcast_ref::<meshkit::breaker::CircuitOpen>().is_some())
}
