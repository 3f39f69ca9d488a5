//! [`Balance`]: a `Clone` balancer whose handles pick from a shared, immutable snapshot.

use super::config::{BalanceConfig, ConfiguredPicker};
use super::eject::{EjectionClassifier, EjectionConfig, Guarded, GuardedCall, Readiness};
use super::error::NoEndpoints;
use super::picker::RoundRobin;
use super::picker::{Picker, FALLBACKS};
use super::stats::EndpointLoads;
use super::worker;
use crate::classify::Classify;
use crate::padded::CachePadded;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::discover::Discover;
use tower::{BoxError, Service};

/// The ready endpoints at one moment, and what the picker derived from them.
pub(crate) struct Snapshot<S, T> {
    pub(crate) services: Vec<Guarded<S>>,
    pub(crate) weights: Arc<[u32]>,
    /// A stable hash of each endpoint's discovery key, in `services`' order.
    pub(crate) keys: Box<[u64]>,
    pub(crate) prepared: Option<T>,
    /// Endpoints discovered, ready or not.
    pub(crate) known: usize,
    /// Ready endpoints left out as outliers.
    pub(crate) ejected: usize,
    /// Panic mode: ejected endpoints are in `services` too, and are called past their open
    /// breakers.
    pub(crate) panic: bool,
}

impl<S, T> Snapshot<S, T> {
    pub(crate) fn empty() -> Self {
        Self {
            services: Vec::new(),
            weights: Arc::from([]),
            keys: Box::new([]),
            prepared: None,
            known: 0,
            ejected: 0,
            panic: false,
        }
    }
}

/// Spawns the worker, given the handles' shared state.
pub(crate) type StartWorker<S, T> = Box<dyn FnOnce(std::sync::Weak<Shared<S, T>>) + Send>;

/// What every handle of one balancer shares with its worker.
pub(crate) struct Shared<S, T> {
    /// Bumped with every new snapshot; handles compare it on each `poll_ready`.
    pub(crate) version: CachePadded<AtomicU64>,
    pub(crate) current: Mutex<Arc<Snapshot<S, T>>>,
    /// Handles waiting for a ready endpoint.
    pub(crate) waiters: Mutex<Vec<Waker>>,
    pub(crate) name: Arc<str>,
    pub(crate) failfast_after: Duration,
    /// Since when the published snapshot has had no endpoint (`None` while it has some):
    /// a handle that starts waiting then counts its `failfast_after` from there, so that a
    /// handle made during an outage fails fast at once as the older ones do.
    pub(crate) empty_since: Mutex<Option<Instant>>,
    /// The worker's discovery stream and picker until the first `poll_ready` starts it on
    /// that task's runtime.
    pub(crate) start: Mutex<Option<StartWorker<S, T>>>,
    pub(crate) closed: Arc<tokio::sync::Notify>,
    /// The ejection classifier the handles fork their own copies from.
    pub(crate) classifier: EjectionClassifier,
}

impl<S, T> Shared<S, T> {
    pub(crate) fn current(&self) -> MutexGuard<'_, Arc<Snapshot<S, T>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn publish(&self, snapshot: Snapshot<S, T>) {
        {
            let mut empty_since = self.empty_since.lock().unwrap_or_else(|p| p.into_inner());
            match snapshot.services.is_empty() {
                true => _ = empty_since.get_or_insert_with(Instant::now),
                false => *empty_since = None,
            }
        }
        *self.current() = Arc::new(snapshot);
        self.version.fetch_add(1, Ordering::Release);
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for waiter in waiters {
            waiter.wake();
        }
    }
}

impl<S, T> Drop for Shared<S, T> {
    fn drop(&mut self) {
        // The last handle is gone: the worker stops.
        self.closed.notify_one();
    }
}

/// Balances requests over the endpoints a `tower::discover::Discover` yields, picking with
/// `P`; `Clone` and shareable across tasks without a `Buffer`.
///
/// A background task (started by the first `poll_ready`, on that task's runtime) applies
/// discovery changes and drives endpoints that are not ready, whether or not requests
/// arrive, and publishes the ready ones as an immutable snapshot. Handles pick from their
/// copy of the snapshot with no lock; each handle calls its own copy of the chosen endpoint's
/// service, made on first use (so endpoint services must be `Clone`, as hyper, reqwest and
/// tonic clients are). Calls go only to copies that are ready, as with tower's balancers:
/// when the picked endpoint's copy is not ready at once (a concurrency limit reached, a
/// channel reconnecting), the handle picks again, twice, then takes the first of the next
/// eight endpoints whose copy is ready (the picker decides: see [`Picker::fallback`];
/// [`ConsistentHash`](super::ConsistentHash) goes round its ring). Only when none is does
/// the call wait for the picked copy, readied as the call is polled (the handle makes a new
/// copy next time). The task stops when the last handle is dropped.
///
/// When no endpoint is ready for `failfast_after`, `poll_ready` stops waiting and calls fail
/// at once with [`NoEndpoints`]; they resume as soon as an endpoint is ready.
///
/// ```
/// use meshkit::balance::{Balance, RoundRobin};
/// use tower::discover::Change;
/// use tower::{Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let endpoint = |name: &'static str| tower::service_fn(move |()| async move { Ok::<_, tower::BoxError>(name) });
/// let changes = futures::stream::iter([
///     Ok::<_, std::convert::Infallible>(Change::Insert("a", endpoint("a"))),
///     Ok(Change::Insert("b", endpoint("b"))),
/// ]);
/// let mut balance = Balance::new(changes, RoundRobin);
/// let first = balance.ready().await?.call(()).await?;
/// let second = balance.ready().await?.call(()).await?;
/// assert_ne!(first, second);
/// # Ok(())
/// # }
/// ```
pub struct Balance<S, Req, P: Picker<Req>> {
    shared: Arc<Shared<S, P::Prepared>>,
    picker: Arc<P>,
    state: P::State,
    view: Arc<Snapshot<S, P::Prepared>>,
    /// This handle's loads on the snapshot's endpoints.
    loads: Loads,
    /// This handle's copies of the snapshot's endpoint services, made on first use: a call
    /// through a ready copy copies nothing.
    copies: Vec<Option<S>>,
    /// This handle's own copy of the ejection classifier (see [`EjectionClassifier::fork`]).
    classifier: EjectionClassifier,
    version: u64,
    /// Since when no endpoint has been ready, while waiting.
    waiting: Option<(Instant, Pin<Box<Sleep>>)>,
}

/// A discovery stream a balancer can run over: a tower [`Discover`] whose keys hash and
/// whose errors box, that its worker task can own. Every such stream implements it.
pub trait Endpoints:
    Discover<Key: std::hash::Hash + Clone + Send + 'static, Error: Into<BoxError>>
    + Send
    + Unpin
    + 'static
{
}

impl<D> Endpoints for D where
    D: Discover<Key: std::hash::Hash + Clone + Send + 'static, Error: Into<BoxError>>
        + Send
        + Unpin
        + 'static
{
}

impl<S, Req, P> Balance<S, Req, P>
where
    P: Picker<Req>,
    S: Clone + Send + 'static,
{
    /// Balances over `discover`'s endpoints with `picker`, failing fast after 3 s without a
    /// ready endpoint. Needs no runtime until the first `poll_ready`.
    pub fn new<D>(discover: D, picker: P) -> Self
    where
        D: Endpoints<Service = S>,
        S: Service<Req> + Sync,
        S::Error: Into<BoxError>,
        Req: 'static,
    {
        Balance::builder(discover, picker).build()
    }

    /// As [`new`](Self::new), naming the service (in [`NoEndpoints`] and events) and setting
    /// how long calls wait for a ready endpoint before failing fast.
    pub fn with_options<D>(
        discover: D,
        picker: P,
        name: impl Into<Arc<str>>,
        failfast_after: Duration,
    ) -> Self
    where
        D: Endpoints<Service = S>,
        S: Service<Req> + Sync,
        S::Error: Into<BoxError>,
        Req: 'static,
    {
        Balance::builder(discover, picker)
            .name(name)
            .failfast_after(failfast_after)
            .build()
    }
}

impl<S, Req> Balance<S, Req, ConfiguredPicker>
where
    S: Clone + Send + 'static,
{
    /// A balancer as `config` describes (picker, fail-fast, ejection and, with `zone` set,
    /// zone-aware routing over the zones of the instances a meshkit
    /// [`discover`](crate::discovery::discover) stream yields; for other streams, give each
    /// endpoint's zone with [`BalanceBuilder::zones`]).
    ///
    /// # Errors
    /// A [`ConfigError`](crate::ConfigError) naming an invalid field.
    pub fn from_config<D>(discover: D, config: &BalanceConfig) -> Result<Self, crate::ConfigError>
    where
        D: Endpoints<Service = S>,
        S: Service<Req> + Sync,
        S::Error: Into<BoxError>,
        Req: 'static,
    {
        Ok(Balance::builder_from_config(discover, config)?.build())
    }
}

impl Balance<(), (), RoundRobin> {
    /// Starts a balancer as `config` describes (picker, fail-fast and ejection), to be
    /// completed with weights, zones or a classifier before [`build`](BalanceBuilder::build).
    ///
    /// # Errors
    /// A [`ConfigError`](crate::ConfigError) naming an invalid field.
    pub fn builder_from_config<D>(
        discover: D,
        config: &BalanceConfig,
    ) -> Result<BalanceBuilder<D, ConfiguredPicker>, crate::ConfigError>
    where
        D: Discover<Key: 'static>,
    {
        config.validate()?;
        let mut builder = Balance::builder(discover, ConfiguredPicker::new(config.picker))
            .failfast_after(config.failfast_after);
        if let Some(ejection) = &config.ejection {
            builder = builder.ejection(ejection.clone())?;
        }
        if let Some(zone) = &config.zone {
            builder = builder.zones(
                zone.clone(),
                config.min_local_endpoints as usize,
                discovered_zone,
            );
        }
        Ok(builder)
    }
}

/// Sets up a [`Balance`]: its name, fail-fast delay and endpoint weights.
#[must_use]
pub struct BalanceBuilder<D: Discover, P> {
    discover: D,
    picker: P,
    name: Arc<str>,
    failfast_after: Duration,
    weight: Option<worker::WeightOf<D::Key>>,
    zones: Option<worker::Zones<D::Key>>,
    ejection: Option<EjectionConfig>,
    classifier: EjectionClassifier,
    sink: crate::events::system::Sink,
}

impl Balance<(), (), RoundRobin> {
    /// Starts a balancer over `discover`'s endpoints with `picker`.
    pub fn builder<D: Discover, P>(discover: D, picker: P) -> BalanceBuilder<D, P> {
        BalanceBuilder {
            discover,
            picker,
            name: Arc::from("balance"),
            failfast_after: Duration::from_secs(3),
            weight: None,
            zones: None,
            ejection: None,
            sink: Default::default(),
            classifier: EjectionClassifier::default(),
        }
    }
}

impl<D: Discover, P> BalanceBuilder<D, P> {
    /// Names the balanced service (in [`NoEndpoints`] and tracing events).
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// How long calls wait for a ready endpoint before failing fast (default 3 s).
    pub fn failfast_after(mut self, after: Duration) -> Self {
        self.failfast_after = after;
        self
    }

    /// Each endpoint's weight, from its key (read when it is inserted). Without this, an
    /// endpoint from a meshkit [`discover`](crate::discovery::discover) stream weighs what
    /// its instance was registered with, and any other 1.
    pub fn weights(mut self, weight: impl Fn(&D::Key) -> u32 + Send + Sync + 'static) -> Self {
        self.weight = Some(Arc::new(weight));
        self
    }

    /// Zone-aware routing: requests go only to endpoints in `local_zone` (each endpoint's
    /// zone read from its key by `zone_of` when it is inserted) while at least `min_local` of
    /// them are ready and not ejected; below that, to every endpoint. With meshkit discovery,
    /// [`zones`](crate::discovery::zones) reads each instance's `zone` from the registry
    /// (and [`Balance::from_config`] reads it from the instances the stream yields).
    pub fn zones(
        mut self,
        local_zone: impl Into<String>,
        min_local: usize,
        zone_of: impl Fn(&D::Key) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.zones = Some(worker::Zones {
            local: local_zone.into(),
            zone_of: Arc::new(zone_of),
            min_local: min_local.max(1),
        });
        self
    }

    /// Reports ejections and re-admissions (and its ejection breakers' transitions) to
    /// `sink` (a mesh's own bus) as well as the process's.
    pub(crate) fn events(mut self, sink: crate::events::system::Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Ejects outliers as `ejection` says (off by default).
    ///
    /// # Errors
    /// A [`ConfigError`](crate::ConfigError) naming an invalid field.
    pub fn ejection(mut self, ejection: EjectionConfig) -> Result<Self, crate::ConfigError> {
        ejection.validate().map_err(|e| e.at("ejection"))?;
        self.ejection = Some(ejection);
        Ok(self)
    }

    /// What ejection counts as an endpoint's failure (default: errors fail, responses
    /// succeed). For HTTP, [`HttpClassifier`](crate::http::HttpClassifier) makes 5xx
    /// responses count too. `Req` names the request type, which fixes the response type the
    /// classifier sees: `.classify::<reqwest::Request, _>(HttpClassifier::default())`.
    pub fn classify<Req, C>(mut self, classifier: C) -> Self
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Response: 'static,
        C: Classify<<D::Service as Service<Req>>::Response, BoxError> + Send + Sync + 'static,
    {
        self.classifier = EjectionClassifier::new(classifier);
        self
    }

    /// The balancer; its worker starts with the first `poll_ready`.
    pub fn build<Req>(self) -> Balance<D::Service, Req, P>
    where
        P: Picker<Req>,
        D: Endpoints,
        D::Service: Service<Req> + Clone + Send + Sync + 'static,
        <D::Service as Service<Req>>::Error: Into<BoxError>,
        Req: 'static,
    {
        let Self {
            discover,
            picker,
            name,
            failfast_after,
            weight,
            zones,
            ejection,
            classifier,
            sink,
        } = self;
        let weight = weight.or_else(|| Some(Arc::new(discovered_weight)));
        // Handles need the classifier only for the calls ejection breakers admit.
        let handles_classifier = match ejection {
            Some(_) => classifier.clone(),
            None => EjectionClassifier::default(),
        };
        let ejection = ejection.map(|ejection| (ejection, classifier, sink));
        let picker = Arc::new(picker);
        let worker_picker = picker.clone();
        let closed = Arc::new(tokio::sync::Notify::new());
        let worker_closed = closed.clone();
        let shared = Arc::new(Shared {
            version: CachePadded::default(),
            current: Mutex::new(Arc::new(Snapshot::empty())),
            waiters: Mutex::new(Vec::new()),
            name,
            failfast_after,
            empty_since: Mutex::new(None),
            start: Mutex::new(Some(Box::new(move |shared| {
                tokio::spawn(worker::run::<D, Req, P>(
                    discover,
                    worker_picker,
                    weight,
                    zones,
                    ejection,
                    shared,
                    worker_closed,
                ));
            }))),
            closed,
            classifier: handles_classifier,
        });
        let state = picker.state();
        let view = shared.current().clone();
        Balance {
            loads: fresh_loads(&view.weights),
            view,
            copies: Vec::new(),
            classifier: shared.classifier.fork(),
            version: 0,
            shared,
            picker,
            state,
            waiting: None,
        }
    }
}

/// The weight its instance was registered with, for an endpoint a meshkit `discover` stream
/// yielded; 1 for any other.
fn discovered_weight<K: 'static>(key: &K) -> u32 {
    crate::discovery::yielded(key).map_or(1, |instance| instance.weight)
}

/// The zone of its instance, for an endpoint a meshkit `discover` stream yielded.
fn discovered_zone<K: 'static>(key: &K) -> Option<String> {
    crate::discovery::yielded(key).and_then(|instance| instance.zone.clone())
}

impl<D: Discover, P> fmt::Debug for BalanceBuilder<D, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceBuilder")
            .field("name", &self.name)
            .field("failfast_after", &self.failfast_after)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P: Picker<Req>> Balance<S, Req, P> {
    /// Takes the newest snapshot if the worker published one since.
    #[inline]
    fn refresh(&mut self) {
        let version = self.shared.version.load(Ordering::Acquire);
        if version != self.version {
            self.view = self.shared.current().clone();
            self.loads = fresh_loads(&self.view.weights);
            self.copies.clear();
            self.copies.resize_with(self.view.services.len(), || None);
            self.version = version;
        }
    }

    #[cold]
    fn start_worker(&self) {
        let start = self
            .shared
            .start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(start) = start {
            start(Arc::downgrade(&self.shared));
        }
    }
}

impl<S, Req, P> Balance<S, Req, P>
where
    P: Picker<Req>,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: 'static,
{
    /// The handle's copy of endpoint `pending` is not ready: the call goes to another
    /// endpoint whose copy is, if there is one that a steered try does not avoid: the first
    /// ready one of the picker's [`fallback`](Picker::fallback)s, asked one at a time (two
    /// more picks, then the endpoints after `pending`, by default; at most [`FALLBACKS`]);
    /// else the call waits for `pending`'s copy. Returns the endpoint's index and the call.
    /// A copy passed over is dropped (with whatever place in a queue its readiness took); the
    /// next call that picks the endpoint makes a new one.
    #[cold]
    #[inline(never)]
    fn call_elsewhere(
        &mut self,
        pending: usize,
        mut request: Req,
        steered: bool,
        balancer: usize,
    ) -> (usize, GuardedCall<S, Req>) {
        // The snapshot's own reference: the picks below borrow it while calls borrow the handle.
        let view = self.view.clone();
        let prepared = view.prepared.as_ref().expect("checked by call");
        let count = view.services.len();
        let mut looked = [pending; FALLBACKS];
        for attempt in 0..FALLBACKS {
            let Some(index) = self.picker.fallback(
                &request,
                &self.loads,
                prepared,
                &mut self.state,
                pending,
                attempt,
            ) else {
                break;
            };
            let avoided =
                || crate::tried::avoids(crate::tried::key(balancer, self.view.keys[index]));
            // Named again (or, by a picker of one's own, past the set): passed over.
            if index >= count || looked[..attempt].contains(&index) || index == pending {
                continue;
            }
            looked[attempt] = index;
            if steered && avoided() {
                continue;
            }
            request = match self.try_endpoint(index, request, false) {
                Ok(call) => return (index, call),
                Err(request) => request,
            };
        }
        match self.try_endpoint(pending, request, true) {
            Ok(call) => (pending, call),
            Err(_) => unreachable!("a call that may wait is always made"),
        }
    }

    /// The picked endpoint `index` does not take the call at once. Its open or half-open
    /// ejection breaker decides when `decide` (a probe slot it grants takes the call);
    /// otherwise, or when it refuses, another endpoint whose copy is ready takes it, as
    /// tower's balancers dispatch only to ready services (see [`call_elsewhere`]).
    #[cold]
    #[inline(never)]
    fn call_slow(
        &mut self,
        index: usize,
        request: Req,
        decide: bool,
        steered: bool,
        balancer: usize,
    ) -> (usize, GuardedCall<S, Req>) {
        let request = if decide {
            match self.try_endpoint(index, request, false) {
                Ok(call) => return (index, call),
                Err(request) => request,
            }
        } else {
            request
        };
        self.call_elsewhere(index, request, steered, balancer)
    }

    /// The call to endpoint `index` through the handle's copy of it (see
    /// [`GuardedCall::new`]): `Err` gives the request back when the copy is not ready and
    /// the call may not `wait`.
    #[inline(always)]
    fn try_endpoint(
        &mut self,
        index: usize,
        request: Req,
        wait: bool,
    ) -> Result<GuardedCall<S, Req>, Req> {
        GuardedCall::new(
            &self.view.services[index],
            &mut self.copies[index],
            &self.classifier,
            self.view.panic,
            request,
            wait,
        )
    }
}

impl<S, Req, P> Service<Req> for Balance<S, Req, P>
where
    P: Picker<Req>,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.version == 0 {
            self.start_worker();
        }
        self.refresh();
        if !self.view.services.is_empty() {
            self.waiting = None;
            return Poll::Ready(Ok(()));
        }
        let failfast_after = self.shared.failfast_after;
        let shared = &self.shared;
        let (since, timer) = self.waiting.get_or_insert_with(|| {
            // From when the balancer lost its last endpoint, if it had one and another handle
            // saw it; else from now.
            let empty_since = *shared.empty_since.lock().unwrap_or_else(|p| p.into_inner());
            let since = empty_since.unwrap_or_else(Instant::now);
            (
                since,
                Box::pin(tokio::time::sleep_until(since + failfast_after)),
            )
        });
        if since.elapsed() >= failfast_after || timer.as_mut().poll(cx).is_ready() {
            // Fail fast: `call` returns `NoEndpoints` until an endpoint is ready again.
            return Poll::Ready(Ok(()));
        }
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cx.waker().clone());
        // An endpoint may have been published between the check and the registration.
        self.refresh();
        if self.view.services.is_empty() {
            Poll::Pending
        } else {
            self.waiting = None;
            Poll::Ready(Ok(()))
        }
    }

    #[inline(always)]
    fn call(&mut self, request: Req) -> Self::Future {
        let view = &self.view;
        let Some(prepared) = view.prepared.as_ref().filter(|_| !view.services.is_empty()) else {
            let error = NoEndpoints::new(self.shared.name.clone(), view.known, 0, view.ejected);
            return ResponseFuture::failed(error);
        };
        let mut index = self
            .picker
            .pick(&request, &self.loads, prepared, &mut self.state);
        let balancer = Arc::as_ptr(&self.shared) as *const () as usize;
        let steered = crate::tried::steering();
        if steered {
            // A retry or a hedge goes elsewhere than the tries before it, when there is
            // elsewhere; the layer steering it learns where it went.
            index = steer(
                index,
                balancer,
                &view.keys,
                |state| self.picker.pick(&request, &self.loads, prepared, state),
                &mut self.state,
            );
        }
        // Asked before the request moves: the request is moved once, into the call.
        let call = match GuardedCall::ready_now(&self.view.services[index], &mut self.copies[index])
        {
            Readiness::Ready(word) => GuardedCall::direct(
                &self.view.services[index],
                &mut self.copies[index],
                &self.classifier,
                word,
                request,
            ),
            readiness => {
                let decide = matches!(readiness, Readiness::Decide);
                let (called, call) = self.call_slow(index, request, decide, steered, balancer);
                index = called;
                call
            }
        };
        let tried = crate::tried::key(balancer, self.view.keys[index]);
        if steered {
            crate::tried::report_sent(tried);
        }
        // One endpoint: nothing to choose, nothing to count (each snapshot starts its loads
        // afresh, so a second endpoint finds them consistent).
        let tracks = self.picker.tracks_load() || self.picker.tracks_latency();
        if tracks && self.view.services.len() > 1 {
            self.loads.start(index);
            let sent = self.picker.tracks_latency().then(|| self.loads.now());
            ResponseFuture::tracked(call, tried, self.loads.clone(), index, sent)
        } else {
            ResponseFuture::plain(call, tried)
        }
    }
}

/// For a retry that avoids some endpoints (`crate::tried`): `picked`, or what the picker
/// picks again while its pick is avoided (three times at most, so that retries spread as
/// the picker spreads calls), or else the first endpoint after it not avoided. `picked` if
/// every endpoint is avoided.
#[cold]
#[inline(never)]
fn steer<T>(
    picked: usize,
    balancer: usize,
    keys: &[u64],
    mut pick: impl FnMut(&mut T) -> usize,
    state: &mut T,
) -> usize {
    let avoided = |index: usize| crate::tried::avoids(crate::tried::key(balancer, keys[index]));
    let mut index = picked;
    for _ in 0..3 {
        if !avoided(index) {
            return index;
        }
        index = pick(state);
    }
    (0..keys.len())
        .map(|step| (index + step) % keys.len())
        .find(|&index| !avoided(index))
        .unwrap_or(picked)
}

impl<S: Clone, Req, P: Picker<Req>> Clone for Balance<S, Req, P> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            picker: self.picker.clone(),
            state: self.picker.state(),
            view: self.view.clone(),
            // Each handle balances its own traffic: fresh loads.
            loads: fresh_loads(&self.view.weights),
            copies: (0..self.view.services.len()).map(|_| None).collect(),
            classifier: self.shared.classifier.fork(),
            version: self.version,
            waiting: None,
        }
    }
}

impl<S, Req, P: Picker<Req>> fmt::Debug for Balance<S, Req, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("service", &self.shared.name)
            .field("ready", &self.view.services.len())
            .field("known", &self.view.known)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of [`Balance`]: the chosen endpoint's call, or an immediate
    /// [`NoEndpoints`].
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        call: Option<GuardedCall<S, Req>>,
        // Boxed: the common future stays small enough to be built in place.
        failed: Option<Box<NoEndpoints>>,
        // Load bookkeeping for pickers that read it: finished on completion or drop.
        tracked: Option<Tracked>,
        // The endpoint's key (0 for none), handed to a retry layer above when this future
        // is dropped (`crate::tried`): after it completed, or cut short by a try timeout.
        tried: u64,
    }

    impl<S, Req> PinnedDrop for ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            if this.tried != 0 {
                crate::tried::record(this.tried);
            }
        }
    }
}

/// One handle's loads, shared with its calls' futures. Padded: each call clones and drops
/// the `Arc`, writing its count, so two handles' loads on two cores must not share a cache
/// line (allocated one after the other, as clones are, they otherwise would).
type Loads = Arc<CachePadded<EndpointLoads>>;

fn fresh_loads(weights: &Arc<[u32]>) -> Loads {
    Arc::new(CachePadded(EndpointLoads::with_weights(
        weights.clone(),
        Instant::now(),
    )))
}

/// An in-flight request counted against its endpoint (and timed, for latency pickers).
struct Tracked {
    loads: Loads,
    // `u32`: with `polled`, it fits the word `usize` took, and the future is 8 bytes
    // smaller (it is moved as each layer wraps it).
    index: u32,
    /// When it was sent, on the loads' clock.
    sent: Option<u64>,
    /// Polled at least once: a call that answers on its first poll answered synchronously,
    /// and its round trip is taken as zero without reading the clock again.
    polled: bool,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.loads.finish(self.index as usize);
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    fn failed(error: NoEndpoints) -> Self {
        Self {
            call: None,
            failed: Some(Box::new(error)),
            tracked: None,
            tried: 0,
        }
    }

    fn plain(call: GuardedCall<S, Req>, tried: u64) -> Self {
        Self {
            call: Some(call),
            tried,
            failed: None,
            tracked: None,
        }
    }

    fn tracked(
        call: GuardedCall<S, Req>,
        tried: u64,
        loads: Loads,
        index: usize,
        sent: Option<u64>,
    ) -> Self {
        Self {
            call: Some(call),
            failed: None,
            tracked: Some(Tracked {
                loads,
                // Endpoint indices are below the snapshot's length, far below 2³².
                index: index as u32,
                sent,
                polled: false,
            }),
            tried,
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: 'static,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(call) = this.call.as_pin_mut() else {
            let error = this
                .failed
                .take()
                .expect("balance future polled after completion");
            return Poll::Ready(Err(Box::new(*error)));
        };
        let first_poll = this
            .tracked
            .as_mut()
            .is_some_and(|tracked| !std::mem::replace(&mut tracked.polled, true));
        let result = std::task::ready!(call.poll(cx));
        if let Some(Tracked {
            loads,
            index,
            sent: Some(sent),
            ..
        }) = this.tracked.as_ref()
        {
            // Answered on the first poll, right after `call`: no time has passed that the
            // clock would show (one clock read per call instead of two).
            let now = if first_poll { *sent } else { loads.now() };
            loads.observe(*index as usize, *sent, now);
        }
        // Dropping the bookkeeping counts the request as finished.
        *this.tracked = None;
        Poll::Ready(result)
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}
