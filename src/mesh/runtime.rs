//! [`Mesh`]: the registry, the system events and every service's client stack, from one
//! configuration.

use super::client::{BuildPolicy, MeshClient, Policy};
use super::lazy::LazyClone;
use super::stack::Stack;
use super::{HttpConfig, MeshConfig, MeshConfigError, ServiceConfig};
use crate::balance::{Balance, BalanceConfig, ConfiguredPicker};
use crate::breaker::{BreakerConfig, CircuitBreakerLayer};
use crate::classify::{Classify, ClassifyRetry};
use crate::discovery::{
    discover, weights, zones, Instance, InstanceId, MemoryRegistry, Registration, Registry,
    RegistryError,
};
use crate::events::system::{self, Sink, SystemEvent};
use crate::events::EventBus;
use crate::registry::{with_recent, Keyed, Recent, Registry as Ids};
use crate::retry::{Replay, RetryConfig, RetryLayer};
use crate::striped::StripedCounter;
use std::fmt;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tower::{BoxError, Layer, Service};

/// An in-process service mesh: a registry with health checks, the system event bus, and a
/// client stack per service built from a [`MeshConfig`] whose policies reload at run time.
///
/// ```
/// use meshkit::discovery::Instance;
/// use meshkit::{Mesh, MeshConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = MeshConfig::from_toml("[services.users.retry]\nmax_attempts = 2")?;
/// let mesh = Mesh::builder().config(config).build()?;
/// let registration = mesh.register(Instance::builder("users", "127.0.0.1", 8080).build()?).await?;
/// assert_eq!(mesh.registry().snapshot("users").instances().len(), 1);
/// mesh.shutdown().await; // deregisters, then waits for calls in flight
/// assert!(mesh.registry().snapshot("users").instances().is_empty());
/// # drop(registration);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    registry: MemoryRegistry,
    /// This mesh's own system bus; its components report to it and to the process's.
    events: Arc<EventBus<SystemEvent>>,
    config: watch::Sender<Arc<(u64, MeshConfig)>>,
    /// The channel given to [`Mesh::reload_from`], which clients built since check on their
    /// own `poll_ready`.
    source: Mutex<Option<watch::Receiver<MeshConfig>>>,
    registered: Mutex<Vec<InstanceId>>,
    lifecycle: Arc<Lifecycle>,
}

/// Builds a [`Mesh`].
#[derive(Debug, Default)]
#[must_use]
pub struct MeshBuilder {
    config: MeshConfig,
    registry: Option<MemoryRegistry>,
}

impl MeshBuilder {
    /// The policies (default: [`MeshConfig::default`]).
    pub fn config(mut self, config: MeshConfig) -> Self {
        self.config = config;
        self
    }

    /// A registry to share with other code (default: a new one).
    pub fn registry(mut self, registry: MemoryRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The mesh.
    ///
    /// # Errors
    /// The configuration is invalid.
    pub fn build(self) -> Result<Mesh, MeshConfigError> {
        self.config.validate()?;
        let (config, _) = watch::channel(Arc::new((1, self.config)));
        let events = Arc::new(EventBus::new(system::CAPACITY));
        let registry = self.registry.unwrap_or_default();
        registry.events(Sink::to(events.clone()));
        Ok(Mesh {
            inner: Arc::new(Inner {
                registry,
                events,
                config,
                source: Mutex::new(None),
                registered: Mutex::new(Vec::new()),
                lifecycle: Lifecycle::new(),
            }),
        })
    }
}

impl Mesh {
    /// Starts a mesh.
    pub fn builder() -> MeshBuilder {
        MeshBuilder::default()
    }

    /// The registry instances are registered in and discovered from.
    pub fn registry(&self) -> &MemoryRegistry {
        &self.inner.registry
    }

    /// This mesh's system event bus: what its own components report (its registry and
    /// health checks, and the breakers, balancers and retry layers of its clients: breaker
    /// transitions, ejections, registrations, retries exhausted, ...), and nothing from
    /// other meshes. Every event also goes to the process-wide bus,
    /// [`events::system::bus`](crate::events::system::bus). A registry given to
    /// [`MeshBuilder::registry`] reports to the first mesh built over it.
    pub fn events(&self) -> &EventBus<SystemEvent> {
        &self.inner.events
    }

    fn sink(&self) -> Sink {
        Sink::to(self.inner.events.clone())
    }

    /// The current policies.
    pub fn config(&self) -> MeshConfig {
        self.inner.config.borrow().1.clone()
    }

    /// Registers an instance (health checks start as its `check` says). Dropping the returned
    /// guard deregisters it; [`shutdown`](Self::shutdown) deregisters every instance still
    /// registered through the mesh.
    ///
    /// # Errors
    /// The registry refused the instance.
    pub async fn register(&self, instance: Instance) -> Result<Registration, RegistryError> {
        let registration = self.inner.registry.register(instance).await?;
        self.inner
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(registration.id());
        Ok(registration)
    }

    /// Replaces the policies: checked first, then each client whose service's settings
    /// changed switches to them at its next `poll_ready`, with no restart. A client keeps
    /// each layer whose settings did not change: its balancer (endpoints, loads, ejections)
    /// unless the `balance` section changed (or, for an HTTP client, the `http` section, which
    /// its endpoints are made from), its breaker (state and counts) unless the `breaker`
    /// section did, and its retry budget unless the budget's terms did. Clients of services
    /// whose settings did not change keep everything.
    ///
    /// # Errors
    /// The new configuration is invalid; the old one stays.
    pub fn reload(&self, config: MeshConfig) -> Result<(), MeshConfigError> {
        config.validate()?;
        self.inner.config.send_modify(|current| {
            *current = Arc::new((current.0 + 1, config));
        });
        tracing::info!("mesh policies reloaded");
        Ok(())
    }

    /// Applies the configuration `updates` holds now, then every one it receives until the
    /// sender is dropped, each after checking it (an invalid one is reported as a `warn`
    /// event and skipped; a configuration equal to the current one changes nothing).
    ///
    /// Clients built after this call check the channel themselves in `poll_ready`: once
    /// `send` has returned, their next call runs under the new policies. Clients built
    /// before get them from a task this call spawns, at its next turn.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn reload_from(&self, mut updates: watch::Receiver<MeshConfig>) {
        let mut watching = {
            let mut source = self.inner.source.lock().unwrap_or_else(|p| p.into_inner());
            let current = updates.borrow_and_update().clone();
            // Cloned under the lock: it has seen exactly what the mesh applies here, so a
            // value sent from now on wakes the task.
            let watching = updates.clone();
            *source = Some(updates);
            self.reload_if_new(current);
            watching
        };
        let mesh = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while watching.changed().await.is_ok() {
                watching.mark_unchanged();
                let Some(inner) = mesh.upgrade() else { return };
                Mesh { inner }.apply_latest();
            }
        });
    }

    /// Applies what the `reload_from` channel holds, if it changed since the mesh last
    /// applied it. Under the channel's lock: whoever sees a change first (the mesh's task, or
    /// any client's `poll_ready`) applies the newest value, once, and an older value can
    /// never follow a newer one.
    pub(crate) fn apply_latest(&self) {
        let mut source = self.inner.source.lock().unwrap_or_else(|p| p.into_inner());
        let Some(updates) = source.as_mut() else {
            return;
        };
        if !updates.has_changed().unwrap_or(false) {
            return;
        }
        let config = updates.borrow_and_update().clone();
        self.reload_if_new(config);
    }

    /// Reloads `config` unless it is the current one; an invalid one is logged and skipped.
    fn reload_if_new(&self, config: MeshConfig) {
        if self.inner.config.borrow().1 == config {
            return;
        }
        if let Err(error) = self.reload(config) {
            tracing::warn!(%error, "reloaded configuration refused");
        }
    }

    /// Stops the mesh: deregisters every instance registered through it, refuses new calls
    /// with [`MeshClosed`](super::MeshClosed), and waits up to `shutdown_timeout` for calls in
    /// flight to finish. Returns whether they all did.
    pub async fn shutdown(&self) -> bool {
        self.inner.lifecycle.closed.store(true, Ordering::SeqCst);
        // Between closing and counting what is in flight (see `LifecycleHold::enter`).
        fence(Ordering::SeqCst);
        let registered = std::mem::take(
            &mut *self
                .inner
                .registered
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for id in registered {
            // Already gone (its guard was dropped, or it expired): nothing to do.
            let _ = self.inner.registry.deregister(&id).await;
        }
        let timeout = self.inner.config.borrow().1.shutdown_timeout;
        let drained = tokio::time::timeout(timeout, self.inner.lifecycle.drained())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                in_flight = self.inner.lifecycle.in_flight(),
                "mesh shut down with calls still in flight"
            );
        }
        drained
    }

    /// The client stack for `service`, built as its policies say, over endpoints made by
    /// `make_endpoint` for each discovered instance, with `classifier` deciding what fails
    /// and what is retried and `replay` what may be sent again. For HTTP, see
    /// [`client`](Self::client).
    ///
    /// # Errors
    /// The service's policies are invalid (they were checked when set: not expected).
    pub fn client_with<S, Req, F, C, K>(
        &self,
        service: &str,
        make_endpoint: F,
        classifier: C,
        replay: K,
    ) -> Result<MeshClient<Req, S::Response>, MeshConfigError>
    where
        F: FnMut(&Instance) -> S + Send + 'static,
        S: Service<Req> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        S::Response: Send + 'static,
        Req: Send + 'static,
        C: Classify<S::Response, BoxError>
            + ClassifyRetry<S::Response, BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        K: Replay<Req> + Clone + Send + Sync + 'static,
    {
        // A balancer rebuilt by a reload makes its endpoints with the same function.
        let make_endpoint = Arc::new(Mutex::new(make_endpoint));
        self.client_from(service, false, move |_: &HttpConfig| {
            let make_endpoint = make_endpoint.clone();
            Parts {
                make_endpoint: move |instance: &Instance| {
                    (make_endpoint.lock().unwrap_or_else(|p| p.into_inner()))(instance)
                },
                classifier: classifier.clone(),
                replay: replay.clone(),
            }
        })
    }

    /// [`client_with`](Self::client_with), with the endpoints, classifier and replay made by
    /// `parts` from the service's `http` section: again whenever a reload changes that
    /// section, when `reads_http`.
    pub(crate) fn client_from<S, Req, F, C, K>(
        &self,
        service: &str,
        reads_http: bool,
        parts: impl Fn(&HttpConfig) -> Parts<F, C, K> + Send + Sync + 'static,
    ) -> Result<MeshClient<Req, S::Response>, MeshConfigError>
    where
        F: FnMut(&Instance) -> S + Send + 'static,
        S: Service<Req> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        S::Response: Send + 'static,
        Req: Send + 'static,
        C: Classify<S::Response, BoxError>
            + ClassifyRetry<S::Response, BoxError>
            + Clone
            + Send
            + Sync
            + 'static,
        K: Replay<Req> + Clone + Send + Sync + 'static,
    {
        // A value sent on the `reload_from` channel and not applied yet: this client starts
        // under it.
        self.apply_latest();
        let registry = self.inner.registry.clone();
        let name = service.to_string();
        let sink = self.sink();
        // What a call's outcome was (for the client's metrics and events), as the classifier
        // of the parts the client starts with says: those a reload makes differ only in what
        // they retry.
        let outcome_classifier = parts(&self.config().service(service).http).classifier;
        // The layers of the last policies built, with the settings they were built from: a
        // reload keeps each layer whose settings did not change (a balancer its endpoints, a
        // breaker its state, a retry layer its budget), and the whole policy when none did.
        let last: Mutex<Option<Built<S, Req, C, K>>> = Mutex::new(None);
        let build: BuildPolicy<Req, S::Response> = Box::new(move |config: &MeshConfig| {
            let settings = config.service(&name);
            let http = reads_http.then(|| settings.http.clone());
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            let last = &mut *last;
            if last
                .as_ref()
                .is_some_and(|last| last.builds(settings, &http))
            {
                return Ok(None);
            }
            let Parts {
                make_endpoint,
                classifier,
                replay,
            } = parts(&settings.http);
            let balance = match last.as_ref() {
                Some(last) if last.balance_settings == settings.balance && last.http == http => {
                    last.balance.clone()
                }
                _ => {
                    let endpoints = discover(&registry, &name, make_endpoint);
                    let mut balance = Balance::builder_from_config(endpoints, &settings.balance)
                        .map_err(|e| e.at("balance"))?
                        .name(name.clone())
                        .weights(weights(&registry, &name))
                        .events(sink.clone())
                        .classify::<Req, _>(classifier.clone());
                    if let Some(zone) = &settings.balance.zone {
                        balance = balance.zones(
                            zone.clone(),
                            settings.balance.min_local_endpoints as usize,
                            zones(&registry, &name),
                        );
                    }
                    balance.build()
                }
            };
            let breaker = match last.as_ref() {
                // Kept with the classifier it was built with: those a reload makes differ
                // only in what they retry, not in what fails.
                Some(last) if last.breaker_settings == settings.breaker => last.breaker.clone(),
                _ => {
                    // Its state gauge from the start (0, closed), not only from its first
                    // transition; set for a new breaker only (a kept one keeps its state).
                    #[cfg(feature = "metrics")]
                    crate::metrics::breaker_built(&name);
                    CircuitBreakerLayer::new(settings.breaker.clone())
                        .map_err(|e| e.at("breaker"))?
                        .name(name.clone())
                        .events(sink.clone())
                        .classify(classifier.clone())
                }
            };
            let retry = match last.as_ref() {
                Some(last)
                    if last.retry_settings == settings.retry
                        && last.timeout == settings.timeout
                        && last.http == http =>
                {
                    last.retry.clone()
                }
                _ => {
                    let retry = RetryLayer::new(within(&settings.retry, settings.timeout))
                        .map_err(|e| e.at("retry"))?
                        .name(name.clone())
                        .events(sink.clone())
                        .classify(classifier)
                        .replay(replay);
                    match last.as_ref() {
                        // Attempts, backoff or what is retried changed, the budget's terms did
                        // not: it keeps what it has counted.
                        Some(last) if last.retry_settings.budget == settings.retry.budget => {
                            retry.with_budget(last.retry.budget().clone())
                        }
                        _ => retry,
                    }
                }
            };
            let (handle, budget) = (breaker.handle(), retry.budget().clone());
            let timeout = settings.timeout;
            *last = Some(Built {
                balance_settings: settings.balance.clone(),
                http,
                balance: balance.clone(),
                breaker_settings: settings.breaker.clone(),
                breaker: breaker.clone(),
                retry_settings: settings.retry.clone(),
                retry: retry.clone(),
                timeout,
            });
            // The whole-call timeout is kept by the client's response future, above this stack
            // (`CallTimeout`): one future fewer for every call.
            let stack = move || -> Stack<Req, S::Response> {
                Stack::new(retry.layer(LazyClone::new(breaker.layer(balance.clone()))))
            };
            Ok(Some(Policy {
                stack: Box::new(stack),
                breaker: handle,
                budget,
                timeout,
            }))
        });
        let classify = Box::new(move |result: &Result<S::Response, BoxError>| {
            outcome_classifier.classify(result)
        });
        let source = self
            .inner
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|updates| {
                // A trigger only. A clone of the mesh's receiver has seen what the mesh
                // applied, so a value sent since is applied at this client's first poll.
                let mesh = Arc::downgrade(&self.inner);
                let apply: super::client::Apply = Arc::new(move || {
                    if let Some(inner) = mesh.upgrade() {
                        Mesh { inner }.apply_latest();
                    }
                });
                (updates, apply)
            });
        MeshClient::new(
            service.to_string(),
            build,
            self.inner.config.subscribe(),
            source,
            self.inner.lifecycle.clone(),
            classify,
        )
        .map_err(|e| MeshConfigError::Invalid(e.at(&format!("services.{service}"))))
    }
}

/// The retry settings a client's retry layer runs with under the whole-call `timeout`: a
/// server's `Retry-After` at least as long as the call may last is not waited for (the call
/// would end in a timeout, the server's answer lost), but returned at once. Once the call has
/// waited, the client's `CallTimeout` tells the retry layer its deadline
/// (`timer::call_deadline`), which then also refuses shorter waits that would outlast what is
/// left.
fn within(retry: &RetryConfig, timeout: Option<Duration>) -> RetryConfig {
    let mut retry = retry.clone();
    if let Some(timeout) = timeout {
        // The retry layer refuses hints over its limit: one of the timeout itself is refused.
        let limit = timeout.saturating_sub(Duration::from_millis(1));
        retry.max_retry_after = retry.max_retry_after.min(limit);
    }
    retry
}

/// The layers of a client's last policies and the settings they were built from.
struct Built<S, Req, C, K> {
    balance_settings: BalanceConfig,
    /// The `http` section the parts were made from, for a client that reads it.
    http: Option<HttpConfig>,
    balance: Balance<S, Req, ConfiguredPicker>,
    breaker_settings: BreakerConfig,
    breaker: CircuitBreakerLayer<C>,
    retry_settings: RetryConfig,
    retry: RetryLayer<C, K>,
    timeout: Option<Duration>,
}

impl<S, Req, C, K> Built<S, Req, C, K> {
    /// Whether `settings` (and `http`, the section the client reads) would build these same
    /// policies.
    fn builds(&self, settings: &ServiceConfig, http: &Option<HttpConfig>) -> bool {
        self.balance_settings == settings.balance
            && self.http == *http
            && self.breaker_settings == settings.breaker
            && self.retry_settings == settings.retry
            && self.timeout == settings.timeout
    }
}

/// What a client's stack is made of besides its policies: an endpoint for each instance, the
/// classifier of outcomes and what may be sent again.
pub(crate) struct Parts<F, C, K> {
    pub(crate) make_endpoint: F,
    pub(crate) classifier: C,
    pub(crate) replay: K,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("registry", &self.inner.registry)
            .field("in_flight", &self.inner.lifecycle.in_flight())
            .finish_non_exhaustive()
    }
}

/// Whether the mesh is open, and its calls in flight (counted on per-thread stripes: no line
/// shared between cores on the call path).
pub(crate) struct Lifecycle {
    /// In [`LIFECYCLES`]: a call's [`InFlight`] holds only this id.
    id: u64,
    closed: AtomicBool,
    started: StripedCounter,
    finished: StripedCounter,
    idle: Notify,
}

/// One client clone's reference to the mesh's [`Lifecycle`]: its calls count in through it
/// and hold only the lifecycle's id ([`InFlight`]).
pub(crate) struct LifecycleHold(Arc<Lifecycle>);

impl LifecycleHold {
    /// Counts a call in, unless the mesh is closed.
    ///
    /// Counted first, checked after, with a full fence between, as `shutdown` closes, fences,
    /// then counts: either this call sees the mesh closed (and counts itself out), or
    /// shutdown's count sees this call and waits for it. Checked first, a call could pass the
    /// check, then count in after shutdown had found nothing in flight.
    #[inline]
    pub(crate) fn enter(&self) -> Option<InFlight> {
        let lifecycle = self.lifecycle();
        lifecycle.started.increment();
        fence(Ordering::SeqCst);
        if lifecycle.closed.load(Ordering::Relaxed) {
            lifecycle.finish();
            return None;
        }
        Some(InFlight(lifecycle.id))
    }

    /// Whether the mesh was shut down.
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.lifecycle().closed.load(Ordering::Relaxed)
    }

    fn lifecycle(&self) -> &Lifecycle {
        &self.0
    }
}

/// Every live mesh's lifecycle, for calls in flight that hold only its id.
static LIFECYCLES: Ids<Lifecycle> = Ids::new();

thread_local! {
    /// The lifecycles this thread's calls counted out last: few meshes are used at once.
    static RECENT: Recent<Lifecycle> = const { Recent::new() };
}

impl Keyed for Lifecycle {
    fn key(&self) -> u64 {
        self.id
    }
}

impl Lifecycle {
    pub(crate) fn new() -> Arc<Self> {
        let id = LIFECYCLES.next_id();
        let lifecycle = Arc::new(Self {
            id,
            closed: AtomicBool::new(false),
            started: StripedCounter::default(),
            finished: StripedCounter::default(),
            idle: Notify::new(),
        });
        LIFECYCLES.insert(id, Arc::downgrade(&lifecycle));
        lifecycle
    }

    /// Counts a call out.
    #[inline]
    fn finish(&self) {
        self.finished.increment();
        if self.closed.load(Ordering::Relaxed) {
            self.idle.notify_waiters();
        }
    }

    /// A hold for one client clone.
    pub(crate) fn hold(self: &Arc<Self>) -> LifecycleHold {
        LifecycleHold(self.clone())
    }

    fn in_flight(&self) -> u64 {
        // Finished first: a call counted there was started before, so the difference never
        // goes below the truth.
        let finished = self.finished.sum();
        self.started.sum().saturating_sub(finished)
    }

    async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            // Woken by the last call out; re-checked in case of a race.
            let _ = tokio::time::timeout(Duration::from_millis(50), idle).await;
        }
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        LIFECYCLES.remove(self.id);
    }
}

/// A call in flight, counted out when dropped. It holds the lifecycle's id, not a reference:
/// a reference count written by every call would cost two locked instructions per call. The
/// dropping thread finds the lifecycle among those it counted out last or, the first time,
/// in the registry, where it is as long as the mesh or one of its clients lives (if neither
/// does, no one waits for the call).
pub(crate) struct InFlight(u64);

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        let _ = with_recent(&RECENT, &LIFECYCLES, self.0, Lifecycle::finish);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads keep entering while the mesh shuts down: once shutdown has found nothing in
    /// flight, no thread may hold a call it was let in for.
    #[test]
    fn no_call_is_let_in_after_shutdown_found_none_in_flight() {
        for _ in 0..200 {
            let lifecycle = Lifecycle::new();
            let drained = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (hold, drained) = (lifecycle.hold(), drained.clone());
                    std::thread::spawn(move || {
                        while !drained.load(Ordering::SeqCst) {
                            if let Some(call) = hold.enter() {
                                assert!(
                                    !drained.load(Ordering::SeqCst),
                                    "a call let in after shutdown found none in flight"
                                );
                                drop(call);
                            }
                        }
                    })
                })
                .collect();
            std::thread::yield_now();
            // As `Mesh::shutdown` does, without its wait.
            lifecycle.closed.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            while lifecycle.in_flight() != 0 {
                std::hint::spin_loop();
            }
            drained.store(true, Ordering::SeqCst);
            for thread in threads {
                thread.join().unwrap();
            }
            assert!(lifecycle.hold().enter().is_none(), "closed");
            assert_eq!(lifecycle.in_flight(), 0, "a refused call counts itself out");
        }
    }
}
