//! [`MeshClient`]: a service's whole client stack, rebuilt when its policies are reloaded.

use super::observe::{ClassifyResult, Observation, Observer};
use super::runtime::{Lifecycle, LifecycleHold};
use super::stack::Stack;
use super::timeout::CallTimeout;
use super::MeshConfig;
use crate::breaker::BreakerHandle;
use crate::config::ConfigError;
use crate::retry::RetryBudget;
use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tower::{BoxError, Service};
use tracing::instrument::{Instrument, Instrumented};

/// Builds the layers for one version of the service's policies; `None` when the service's
/// own policies are those of the last version built (another service's changed).
pub(crate) type BuildPolicy<Req, Res> =
    Box<dyn Fn(&MeshConfig) -> Result<Option<Policy<Req, Res>>, ConfigError> + Send + Sync>;

/// One version of a service's policies: a breaker and a retry budget shared by every clone,
/// and what stacks them over a clone of the balancer.
pub(crate) struct Policy<Req, Res> {
    pub(crate) stack: Box<dyn Fn() -> Stack<Req, Res> + Send + Sync>,
    pub(crate) breaker: BreakerHandle,
    pub(crate) budget: RetryBudget,
    /// The whole call's time limit, kept by each call's response future.
    pub(crate) timeout: Option<Duration>,
}

/// Has the mesh apply what the channel given to `Mesh::reload_from` holds, if it changed.
pub(crate) type Apply = Arc<dyn Fn() + Send + Sync>;

/// What every clone of one client shares.
struct Shared<Req, Res> {
    service: String,
    build: BuildPolicy<Req, Res>,
    /// The policies built for the newest config seen, and that config's version.
    current: Mutex<(u64, Arc<Policy<Req, Res>>)>,
    lifecycle: Arc<Lifecycle>,
    observer: Arc<Observer<Res>>,
    /// Applies what this client's copy of the `reload_from` channel receives.
    apply: Option<Apply>,
}

/// The client stack of one service, as the mesh's configuration describes it:
/// discovery → balance (with ejection) → breaker → retry → timeout, from the endpoints up.
///
/// Each call runs in a `meshkit.request` span (`service`, `attempt` 1: the first try runs in
/// it, `breaker` state); each retry in a `meshkit.retry` span under it (`service`, `attempt`,
/// from 2); HTTP endpoints open a
/// `meshkit.endpoint` span (`service`, `instance`) per try, under the retry's span when
/// there is one.
///
/// `Clone` (every clone shares the balancer, the breaker and the retry budget) and
/// `Send + Sync`: keep one in your application state. A clone is meant to live as long as
/// the task that uses it: it allocates its own counters (so that tasks on different cores
/// share no written cache line), and its first call makes its own copy of the stack below
/// the retry layer (a balancer handle with its own loads). Cloning per request works, at
/// that cost on each request. When the mesh's policies are reloaded
/// ([`Mesh::reload`](super::Mesh::reload)) with new settings for this service, the next
/// `poll_ready` of each clone switches to a stack built from the new values, keeping each
/// layer whose settings did not change. A balancer whose `balance` settings (or, for an HTTP
/// client, `http` settings) changed is made anew over the registry's instances, its loads and
/// ejections afresh; otherwise it keeps its endpoints. A breaker whose settings changed
/// starts afresh (closed) under the new thresholds; an unchanged one keeps its state and
/// counts. The retry budget is kept unless its own terms changed. Calls already sent finish
/// on the stack they started on. A reload that changes only other services' settings changes
/// nothing here. After
/// [`Mesh::shutdown`](super::Mesh::shutdown), `poll_ready` and calls fail at once with
/// [`MeshClosed`].
pub struct MeshClient<Req, Res> {
    shared: Arc<Shared<Req, Res>>,
    /// The mesh's lifecycle, which each call counts in to (and out of, by its id).
    lifecycle: LifecycleHold,
    config: watch::Receiver<Arc<(u64, MeshConfig)>>,
    /// This clone's receiver of the `reload_from` channel, if one was given before the
    /// client was built.
    source: Option<watch::Receiver<MeshConfig>>,
    version: u64,
    policy: Arc<Policy<Req, Res>>,
    stack: Stack<Req, Res>,
}

impl<Req, Res> MeshClient<Req, Res>
where
    Req: 'static,
    Res: 'static,
{
    pub(crate) fn new(
        service: String,
        build: BuildPolicy<Req, Res>,
        mut config: watch::Receiver<Arc<(u64, MeshConfig)>>,
        source: Option<(watch::Receiver<MeshConfig>, Apply)>,
        lifecycle: Arc<Lifecycle>,
        classify: ClassifyResult<Res>,
    ) -> Result<Self, ConfigError> {
        let current = config.borrow_and_update().clone();
        let policy = Arc::new(build(&current.1)?.expect("the first build makes a policy"));
        let stack = (policy.stack)();
        let (source, apply) = source.unzip();
        Ok(Self {
            lifecycle: lifecycle.hold(),
            shared: Arc::new(Shared {
                build,
                current: Mutex::new((current.0, policy.clone())),
                lifecycle,
                observer: Observer::new(&service, classify),
                service,
                apply,
            }),
            config,
            source,
            version: current.0,
            policy,
            stack,
        })
    }

    /// The service this client calls.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The breaker of the policies this clone uses (state, metrics, transitions, operator
    /// controls).
    pub fn breaker(&self) -> &BreakerHandle {
        &self.policy.breaker
    }

    /// The retry budget of the policies this clone uses: its snapshot counts retries
    /// (withdrawals) and refusals.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.policy.budget
    }

    /// The `reload_from` channel changed: the mesh applies its newest value, unless another
    /// clone (or the mesh's own task) already did.
    #[cold]
    #[inline(never)]
    fn apply_source(&mut self) {
        let (Some(source), Some(apply)) = (&mut self.source, &self.shared.apply) else {
            return;
        };
        source.mark_unchanged();
        apply();
    }

    /// Switches to the newest policies: built once per version, shared by every clone.
    fn reload(&mut self) {
        let newest = self.config.borrow_and_update().clone();
        let mut current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if current.0 < newest.0 {
            match (self.shared.build)(&newest.1) {
                Ok(Some(policy)) => *current = (newest.0, Arc::new(policy)),
                // This service's policies did not change: its stacks, breaker and budget
                // stay, and no clone rebuilds anything.
                Ok(None) => current.0 = newest.0,
                // The mesh validates a config before publishing it: not expected.
                Err(error) => {
                    tracing::error!(service = %self.shared.service, %error, "reloaded policies refused; keeping the previous ones");
                }
            }
        }
        self.version = current.0;
        if !Arc::ptr_eq(&current.1, &self.policy) {
            self.policy = current.1.clone();
            self.stack = (self.policy.stack)();
            tracing::info!(service = %self.shared.service, version = current.0, "client policies reloaded");
        }
    }
}

impl<Req, Res> Clone for MeshClient<Req, Res> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            lifecycle: self.shared.lifecycle.hold(),
            config: self.config.clone(),
            source: self.source.clone(),
            version: self.version,
            policy: self.policy.clone(),
            stack: self.stack.clone(),
        }
    }
}

impl<Req, Res> Service<Req> for MeshClient<Req, Res>
where
    Req: 'static,
    Res: 'static,
{
    type Response = Res;
    type Error = BoxError;
    type Future = ResponseFuture<Res>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // One atomic load when nothing changed.
        if let Some(source) = &mut self.source {
            if source.has_changed().unwrap_or(false) {
                self.apply_source();
            }
        }
        if self.config.has_changed().unwrap_or(false) {
            self.reload();
        }
        match self.stack.poll_ready(cx) {
            // After shutdown, at once: the balancer, its instances deregistered, would wait
            // for one. (A stack that is ready goes on to `call`, which refuses.)
            Poll::Pending if self.lifecycle.is_closed() => Poll::Ready(Err(MeshClosed.into())),
            polled => polled,
        }
    }

    #[inline]
    fn call(&mut self, request: Req) -> Self::Future {
        match self.lifecycle.enter() {
            Some(guard) => {
                // The level check inline (a static load): no call at all when nothing
                // records info spans.
                let span = if tracing::level_enabled!(tracing::Level::INFO) {
                    request_span(&self.shared.service, &self.policy.breaker)
                } else {
                    tracing::Span::none()
                };
                ResponseFuture {
                    inner: Some(self.stack.call(request).instrument(span)),
                    timeout: CallTimeout::new(self.policy.timeout),
                    observation: Some(self.shared.observer.start()),
                    _guard: Some(guard),
                }
            }
            None => ResponseFuture {
                inner: None,
                timeout: CallTimeout::new(None),
                observation: None,
                _guard: None,
            },
        }
    }
}

/// The `meshkit.request` span of one call. Out of line: a disabled span is a couple of loads,
/// but its expansion is long, and the call path is hot.
#[inline(never)]
fn request_span(service: &str, breaker: &BreakerHandle) -> tracing::Span {
    // Fields are evaluated only when a subscriber wants the span.
    tracing::info_span!("meshkit.request", service = %service, attempt = 1u32, breaker = ?breaker.state())
}

impl<Req, Res> fmt::Debug for MeshClient<Req, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClient")
            .field("service", &self.shared.service)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of a [`MeshClient`] call; counts as in flight until it completes
    /// or is dropped. It keeps the call's `timeout`: past it, the call fails with tower's
    /// `Elapsed`.
    pub struct ResponseFuture<Res> {
        #[pin]
        inner: Option<Instrumented<BoxFuture<'static, Result<Res, BoxError>>>>,
        timeout: CallTimeout,
        observation: Option<Observation<Res>>,
        _guard: Option<super::runtime::InFlight>,
    }
}

impl<Res> Future for ResponseFuture<Res> {
    type Output = Result<Res, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err(MeshClosed.into()));
        };
        let result = match std::task::ready!(this.timeout.poll(cx, |cx| inner.poll(cx))) {
            Ok(result) => result,
            Err(elapsed) => {
                // Cut short: the breakers below count the try in flight as failed.
                crate::cancel::timed_out(|| this.inner.set(None));
                Err(elapsed.into())
            }
        };
        if let Some(observation) = this.observation.as_mut() {
            observation.finish(&result);
        }
        Poll::Ready(result)
    }
}

impl<Res> fmt::Debug for ResponseFuture<Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

/// The mesh was shut down: the call was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshClosed;

impl fmt::Display for MeshClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the mesh is shut down")
    }
}

impl std::error::Error for MeshClosed {}
