//! [`Stack`]: a service's client stack above its balancer, type-erased.

use futures::future::BoxFuture;
use std::task::{Context, Poll};
use tower::{BoxError, Service};

/// The layers of one version of a service's policies (retry over breaker over balancer),
/// behind one box: [`MeshClient`](super::MeshClient) is generic over the request and the
/// response only. Like tower's `BoxCloneSyncService`, but a call boxes the stack's own
/// future directly, with no mapping future between (each wrapper is one more move of a
/// future that holds the request's copy for retries).
pub(crate) struct Stack<Req, Res>(Box<dyn Erased<Req, Res>>);

trait Erased<Req, Res>: Send + Sync {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(&mut self, request: Req) -> BoxFuture<'static, Result<Res, BoxError>>;
    fn clone_box(&self) -> Box<dyn Erased<Req, Res>>;
}

impl<S, Req, Res> Erased<Req, Res> for S
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Service::poll_ready(self, cx)
    }

    fn call(&mut self, request: Req) -> BoxFuture<'static, Result<Res, BoxError>> {
        Box::pin(Service::call(self, request))
    }

    fn clone_box(&self) -> Box<dyn Erased<Req, Res>> {
        Box::new(self.clone())
    }
}

impl<Req, Res> Stack<Req, Res> {
    pub(crate) fn new<S>(service: S) -> Self
    where
        S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self(Box::new(service))
    }

    #[inline]
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    #[inline]
    pub(crate) fn call(&mut self, request: Req) -> BoxFuture<'static, Result<Res, BoxError>> {
        self.0.call(request)
    }
}

impl<Req, Res> Clone for Stack<Req, Res> {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}
