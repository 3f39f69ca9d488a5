//! The balancer's background task: applies discovery changes, drives endpoints that are not
//! ready, and publishes the ready set, with or without traffic.

use super::picker::Picker;
use super::ring::stable_hash;
use super::service::{Shared, Snapshot};
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tower::{BoxError, Service};

/// How long an endpoint whose readiness failed waits before it is polled again (tower's
/// balancer drops such an endpoint for good).
const RETRY_NOT_READY: Duration = Duration::from_secs(1);

/// An endpoint's weight from its key.
pub(crate) type WeightOf<K> = Arc<dyn Fn(&K) -> u32 + Send + Sync>;

struct Endpoint<K, S> {
    key: K,
    hash: u64,
    service: S,
    weight: u32,
    ready: bool,
    /// After a readiness error: not polled again before this.
    retry_at: Option<Instant>,
}

enum Event<K, S> {
    Change(Change<K, S>),
    DiscoveryFailed(BoxError),
    DiscoveryEnded,
    Ready(usize),
    NotReady(usize, BoxError),
}

pub(crate) async fn run<D, Req, P>(
    mut discover: D,
    picker: Arc<P>,
    weight_of: Option<WeightOf<D::Key>>,
    shared: Weak<Shared<D::Service, P::Prepared>>,
    closed: Arc<Notify>,
) where
    D: Discover + Unpin,
    D::Key: Hash + Clone,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Clone,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    P: Picker<Req>,
{
    let Some(name) = shared.upgrade().map(|shared| shared.name.clone()) else {
        return;
    };
    let mut endpoints: Vec<Endpoint<D::Key, D::Service>> = Vec::new();
    let mut discovering = true;
    loop {
        let now = Instant::now();
        let next_retry = endpoints.iter().filter_map(|e| e.retry_at).min();
        let event = std::future::poll_fn(|cx| {
            if discovering {
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
                match endpoint.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Ready(index)),
                    Poll::Ready(Err(error)) => {
                        return Poll::Ready(Event::NotReady(index, error.into()))
                    }
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        });
        let event = tokio::select! {
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
                continue;
            }
            () = closed.notified() => return,
        };
        let changed = match event {
            Event::Change(Change::Insert(key, service)) => {
                let was_ready = endpoints
                    .iter()
                    .position(|e| e.key == key)
                    .map(|at| endpoints.swap_remove(at).ready)
                    .unwrap_or(false);
                let weight = weight_of.as_ref().map_or(1, |weight| weight(&key).max(1));
                endpoints.push(Endpoint {
                    hash: stable_hash(&key),
                    key,
                    service,
                    weight,
                    ready: false,
                    retry_at: None,
                });
                was_ready
            }
            Event::Change(Change::Remove(key)) => endpoints
                .iter()
                .position(|e| e.key == key)
                .map(|at| endpoints.swap_remove(at).ready)
                .unwrap_or(false),
            Event::DiscoveryFailed(error) => {
                tracing::warn!(service = &*name, %error, "discovery failed; keeping the endpoints known");
                discovering = false;
                false
            }
            Event::DiscoveryEnded => {
                discovering = false;
                false
            }
            Event::Ready(index) => {
                endpoints[index].ready = true;
                true
            }
            Event::NotReady(index, error) => {
                tracing::debug!(service = &*name, %error, "endpoint not ready; polling it again later");
                endpoints[index].retry_at = Some(Instant::now() + RETRY_NOT_READY);
                false
            }
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Every change of the known set is published (its count appears in `NoEndpoints`);
        // the ready set is what handles pick from.
        let _ = changed;
        shared.publish(snapshot(&endpoints, &*picker));
    }
}

fn snapshot<K, S: Clone, Req, P: Picker<Req>>(
    endpoints: &[Endpoint<K, S>],
    picker: &P,
) -> Snapshot<S, P::Prepared> {
    // Ordered by key hash, so every handle and every rebuild sees the same order.
    let mut ready: Vec<&Endpoint<K, S>> = endpoints.iter().filter(|e| e.ready).collect();
    ready.sort_by_key(|e| e.hash);
    let weights: Arc<[u32]> = ready.iter().map(|e| e.weight).collect();
    let keys: Vec<u64> = ready.iter().map(|e| e.hash).collect();
    let prepared = (!ready.is_empty()).then(|| picker.prepare(&weights, &keys));
    Snapshot {
        services: ready.iter().map(|e| e.service.clone()).collect(),
        weights,
        prepared,
        known: endpoints.len(),
    }
}
