//! The balancer's background task: applies discovery changes, drives endpoints that are not
//! ready, and publishes the ready set, with or without traffic.

use super::eject::{EjectionClassifier, EjectionConfig, Guarded};
use super::picker::Picker;
use super::ring::stable_hash;
use super::service::{Shared, Snapshot};
use crate::breaker::{BreakerHandle, BreakerState, CircuitBreakerLayer};
use crate::events::system::Sink;
use futures::stream::{SelectAll, StreamExt};
use futures::FutureExt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tower::{BoxError, Layer, Service};

/// How long an endpoint whose readiness failed waits before it is polled again (tower's
/// balancer drops such an endpoint for good).
const RETRY_NOT_READY: Duration = Duration::from_secs(1);

/// An endpoint's weight from its key.
pub(crate) type WeightOf<K> = Arc<dyn Fn(&K) -> u32 + Send + Sync>;

/// An endpoint's zone, from its key.
pub(crate) type ZoneOf<K> = Arc<dyn Fn(&K) -> Option<String> + Send + Sync>;

/// Zone-aware routing: endpoints in the caller's zone are used while enough of them are.
pub(crate) struct Zones<K> {
    pub(crate) local: String,
    pub(crate) zone_of: ZoneOf<K>,
    /// Usable local endpoints needed to keep traffic in the zone.
    pub(crate) min_local: usize,
}

struct Endpoint<K, S> {
    key: K,
    hash: u64,
    service: Guarded<S>,
    weight: u32,
    /// In the caller's zone (always false without zone-aware routing).
    local: bool,
    ready: bool,
    /// After a readiness error: not polled again before this.
    retry_at: Option<Instant>,
    /// Its ejection breaker, when ejection is on.
    breaker: Option<BreakerHandle>,
    ejected: bool,
    /// Back in rotation after an ejection, its next call a probe.
    probing: bool,
}

/// Breaker transitions of every endpoint, tagged with the endpoint's key hash.
type Transitions = SelectAll<Pin<Box<dyn futures::Stream<Item = (u64, BreakerState)> + Send>>>;

enum Event<K, S> {
    Transition(u64, BreakerState),
    Change(Change<K, S>),
    DiscoveryFailed(BoxError),
    DiscoveryEnded,
    Ready(usize),
    NotReady(usize, BoxError),
}

/// How long the worker waits to poll discovery again after it reported an error.
const DISCOVER_AGAIN_AFTER: Duration = Duration::from_secs(1);

pub(crate) async fn run<D, Req, P>(
    mut discover: D,
    picker: Arc<P>,
    weight_of: Option<WeightOf<D::Key>>,
    zones: Option<Zones<D::Key>>,
    ejection: Option<(EjectionConfig, EjectionClassifier, Sink)>,
    shared: Weak<Shared<D::Service, P::Prepared>>,
    closed: Arc<Notify>,
) where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    <D::Service as Service<Req>>::Response: 'static,
    P: Picker<Req>,
{
    let Some(name) = shared.upgrade().map(|shared| shared.name.clone()) else {
        return;
    };
    let mut endpoints: Vec<Endpoint<D::Key, D::Service>> = Vec::new();
    let mut transitions: Transitions = SelectAll::new();
    let mut panicking = false;
    let mut discovering = true;
    // After a discovery error: when to poll discovery again (the endpoints known stay).
    let mut discover_again_at: Option<Instant> = None;
    // Changes applied since the last snapshot was published, and how many events in a row
    // were taken without waiting.
    let mut unpublished = false;
    let mut drained = 0;
    loop {
        let now = Instant::now();
        let next_retry = endpoints
            .iter()
            .filter_map(|e| e.retry_at)
            .chain(discover_again_at)
            .min();
        let discover_now = discovering && discover_again_at.is_none_or(|at| at <= now);
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(Some((hash, state))) = transitions.poll_next_unpin(cx) {
                return Poll::Ready(Event::Transition(hash, state));
            }
            if discover_now {
                match Pin::new(&mut discover).poll_discover(cx) {
                    Poll::Ready(Some(Ok(change))) => return Poll::Ready(Event::Change(change)),
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Event::DiscoveryFailed(error.into()))
                    }
                    Poll::Ready(None) => return Poll::Ready(Event::DiscoveryEnded),
                    Poll::Pending => {}
                }
            }
            for (index, endpoint) in endpoints.iter_mut().enumerate() {
                if endpoint.ready || endpoint.retry_at.is_some_and(|at| at > now) {
                    continue;
                }
                match endpoint.service.poll_ready::<Req>(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Ready(index)),
                    Poll::Ready(Err(error)) => return Poll::Ready(Event::NotReady(index, error)),
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        });
        // Events that are ready at once (discovery's initial set, several endpoints turning
        // ready together) are applied before one snapshot covers them all: handles re-read
        // each snapshot, and a handle must not be made ready by a snapshot holding only the
        // first of the endpoints discovery already knows.
        let event = if unpublished {
            let taken = if drained < MAX_UNPUBLISHED {
                event.now_or_never()
            } else {
                None
            };
            match taken {
                Some(event) => {
                    drained += 1;
                    event
                }
                None => {
                    // Nothing more at once: one snapshot for everything applied.
                    unpublished = false;
                    drained = 0;
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let panic_threshold =
                        ejection.as_ref().map_or(0.0, |(e, _, _)| e.panic_threshold);
                    shared.publish(snapshot(
                        &name,
                        &endpoints,
                        &*picker,
                        zones.as_ref().map(|zones| zones.min_local),
                        panic_threshold,
                        &mut panicking,
                    ));
                    continue;
                }
            }
        } else {
            tokio::select! {
                event = event => event,
                () = async {
                    match next_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    for endpoint in &mut endpoints {
                        if endpoint.retry_at.is_some_and(|at| at <= Instant::now()) {
                            endpoint.retry_at = None;
                        }
                    }
                    if discover_again_at.is_some_and(|at| at <= Instant::now()) {
                        discover_again_at = None;
                    }
                    continue;
                }
                () = closed.notified() => return,
            }
        };
        let changed = match event {
            Event::Change(Change::Insert(key, service)) => {
                if let Some(at) = endpoints.iter().position(|e| e.key == key) {
                    endpoints.swap_remove(at);
                }
                let weight = weight_of.as_ref().map_or(1, |weight| weight(&key).max(1));
                let local = zones
                    .as_ref()
                    .is_some_and(|zones| (zones.zone_of)(&key).as_deref() == Some(&*zones.local));
                let hash = stable_hash(&key);
                let (service, breaker) = match &ejection {
                    Some((ejection, classifier, sink)) => {
                        let (service, handle) =
                            guard(&name, hash, ejection, classifier.clone(), sink, service);
                        transitions.push(watch(hash, &handle));
                        (service, Some(handle))
                    }
                    None => (Guarded::plain(service), None),
                };
                endpoints.push(Endpoint {
                    hash,
                    key,
                    service,
                    weight,
                    local,
                    ready: false,
                    retry_at: None,
                    breaker,
                    ejected: false,
                    probing: false,
                });
                // The known count (in `NoEndpoints`) changed, and maybe the ready set.
                true
            }
            Event::Change(Change::Remove(key)) => {
                match endpoints.iter().position(|e| e.key == key) {
                    Some(at) => {
                        endpoints.swap_remove(at);
                        true
                    }
                    None => false,
                }
            }
            Event::DiscoveryFailed(error) => {
                tracing::warn!(service = &*name, %error, "discovery failed; keeping the endpoints known, asking again in 1s");
                discover_again_at = Some(Instant::now() + DISCOVER_AGAIN_AFTER);
                false
            }
            Event::DiscoveryEnded => {
                discovering = false;
                false
            }
            Event::Transition(hash, state) => match &ejection {
                Some((ejection, _, sink)) => {
                    let max_share = ejection.max_ejection_percent;
                    on_transition(&name, sink, &mut endpoints, hash, state, max_share)
                }
                // Only ejection breakers make transitions.
                None => false,
            },
            Event::Ready(index) => {
                // Calls go to copies of this service, never to it: a copy takes its place, so
                // that whatever its readiness reserved (a concurrency permit, a buffer slot, a
                // breaker's probe slot) goes back to the calls.
                let endpoint = &mut endpoints[index];
                endpoint.service = endpoint.service.clone();
                endpoint.ready = true;
                true
            }
            Event::NotReady(index, error) => {
                tracing::debug!(service = &*name, %error, "endpoint not ready; polling it again later");
                endpoints[index].retry_at = Some(Instant::now() + RETRY_NOT_READY);
                false
            }
        };
        if shared.strong_count() == 0 {
            return;
        }
        // Published once nothing more is ready at once (above). Unchanged, none is: a new
        // snapshot makes every handle re-read it and start its loads afresh.
        unpublished |= changed;
    }
}

/// Events applied in a row without waiting, at most, after the first, before a snapshot is
/// published anyway (a discovery stream that never waits must not hold every handle on the
/// old set).
const MAX_UNPUBLISHED: usize = 1_024;

/// Wraps an endpoint in its ejection breaker.
fn guard<S>(
    name: &str,
    hash: u64,
    ejection: &EjectionConfig,
    classifier: EjectionClassifier,
    sink: &Sink,
    service: S,
) -> (Guarded<S>, BreakerHandle) {
    let layer = CircuitBreakerLayer::new(ejection.breaker())
        .expect("an ejection config is validated before it reaches the worker")
        .name(format!("{name}/{hash:016x}"))
        .events(sink.clone())
        .classify(classifier);
    let handle = layer.handle();
    (Guarded::breaker(layer.layer(service)), handle)
}

/// The endpoint's breaker transitions, tagged with its key hash, until the breaker is gone.
fn watch(
    hash: u64,
    handle: &BreakerHandle,
) -> Pin<Box<dyn futures::Stream<Item = (u64, BreakerState)> + Send>> {
    let receiver = handle.subscribe();
    Box::pin(futures::stream::unfold(
        receiver,
        move |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(transition) => return Some(((hash, transition.to), receiver)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    ))
}

/// Ejects or re-admits an endpoint as its breaker says; returns whether the set changed.
fn on_transition<K, S>(
    name: &str,
    sink: &Sink,
    endpoints: &mut [Endpoint<K, S>],
    hash: u64,
    state: BreakerState,
    max_share: f64,
) -> bool {
    let ready = endpoints.iter().filter(|e| e.ready).count();
    let ejected = endpoints.iter().filter(|e| e.ready && e.ejected).count();
    let Some(endpoint) = endpoints.iter_mut().find(|e| e.hash == hash) else {
        return false; // removed since
    };
    match state {
        BreakerState::Open if !endpoint.ejected => {
            // Checked after the ejection it would cause.
            if ready == 0 || (ejected + 1) as f64 / ready as f64 > max_share {
                tracing::warn!(
                    service = name,
                    endpoint = format_args!("{hash:016x}"),
                    ejected,
                    ready,
                    "ejection capped by max_ejection_percent; endpoint stays in rotation"
                );
                if let Some(breaker) = &endpoint.breaker {
                    breaker.reset();
                }
                return false;
            }
            endpoint.ejected = true;
            tracing::warn!(
                service = name,
                endpoint = format_args!("{hash:016x}"),
                "endpoint ejected"
            );
            sink.publish(
                name,
                crate::events::system::SystemEvent::EndpointEjected {
                    service: name.to_string(),
                    endpoint: format!("{hash:016x}"),
                },
            );
            true
        }
        BreakerState::HalfOpen if endpoint.ejected => {
            endpoint.ejected = false;
            endpoint.probing = true;
            tracing::info!(
                service = name,
                endpoint = format_args!("{hash:016x}"),
                "endpoint back in rotation for a probe"
            );
            true
        }
        BreakerState::Closed if endpoint.ejected || endpoint.probing => {
            let changed = endpoint.ejected;
            endpoint.ejected = false;
            endpoint.probing = false;
            tracing::info!(
                service = name,
                endpoint = format_args!("{hash:016x}"),
                "endpoint re-admitted"
            );
            sink.publish(
                name,
                crate::events::system::SystemEvent::EndpointReadmitted {
                    service: name.to_string(),
                    endpoint: format!("{hash:016x}"),
                },
            );
            changed
        }
        _ => false,
    }
}

fn snapshot<K, S: Clone, Req, P: Picker<Req>>(
    name: &str,
    endpoints: &[Endpoint<K, S>],
    picker: &P,
    min_local: Option<usize>,
    panic_threshold: f64,
    panicking: &mut bool,
) -> Snapshot<S, P::Prepared> {
    // Ordered by key hash, so every handle and every rebuild sees the same order.
    let mut ready: Vec<&Endpoint<K, S>> = endpoints.iter().filter(|e| e.ready).collect();
    ready.sort_by_key(|e| e.hash);
    let healthy = ready.iter().filter(|e| !e.ejected).count();
    // Panic mode: too few healthy endpoints, so spread the load over all of them.
    let panic = !ready.is_empty() && (healthy as f64) < panic_threshold * ready.len() as f64;
    if panic != *panicking {
        *panicking = panic;
        if panic {
            tracing::warn!(
                service = name,
                healthy,
                ready = ready.len(),
                "panic mode: balancing over every endpoint, ejected or not"
            );
        } else {
            tracing::info!(
                service = name,
                healthy,
                ready = ready.len(),
                "panic mode over"
            );
        }
    }
    let ejected = if panic { 0 } else { ready.len() - healthy };
    if !panic {
        ready.retain(|e| !e.ejected);
    }
    // Zone-aware routing: stay in the caller's zone while enough of it is usable.
    if let Some(min_local) = min_local {
        let local = ready.iter().filter(|e| e.local).count();
        if local >= min_local {
            ready.retain(|e| e.local);
        }
    }
    let weights: Arc<[u32]> = ready.iter().map(|e| e.weight).collect();
    let keys: Box<[u64]> = ready.iter().map(|e| e.hash).collect();
    let prepared = (!ready.is_empty()).then(|| picker.prepare(&weights, &keys));
    Snapshot {
        services: ready.iter().map(|e| e.service.clone()).collect(),
        weights,
        keys,
        prepared,
        known: endpoints.len(),
        ejected,
        panic,
    }
}
