//! [`discover`]: a registry watch as tower's `Discover`, over a service's passing instances.

use super::instance::{Health, Instance, InstanceId};
use super::registry::{Registry, Update, Watch};
use futures::{Stream, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tower::discover::Change;

/// Watches `service` in `registry` and yields tower [`Change`]s over its `Passing` instances
/// (a `Warning`, `Critical` or `Unknown` instance gets no new traffic),
/// building each endpoint with `make_endpoint` (for HTTP: a client bound to the instance's
/// `http://host:port`).
///
/// The result implements `tower::discover::Discover`, so it feeds
/// `tower::balance::p2c::Balance` or meshkit's own balancer. An instance that stops passing is
/// removed. One registered again (with another address, weight or metadata, say) is removed
/// and inserted anew, as the registry reports it; an update of an instance the stream already
/// yielded, such as the fresh state after a watcher fell behind, is an `Insert` of its known
/// key, which tower balancers take as a replacement. After a watcher falls behind, the fresh
/// state is diffed against what was yielded, so no change is lost or repeated.
///
/// ```
/// use meshkit::discovery::{discover, Instance, MemoryRegistry, Registry};
/// use futures::StreamExt;
/// use tower::discover::Change;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = MemoryRegistry::new();
/// let _users = registry.register(Instance::builder("users", "10.0.0.7", 8080).build()?).await?;
/// let mut endpoints = discover(&registry, "users", |instance: &Instance| instance.authority());
/// let Some(Ok(Change::Insert(_, authority))) = endpoints.next().await else { unreachable!() };
/// assert_eq!(authority, "10.0.0.7:8080");
/// # Ok(())
/// # }
/// ```
pub fn discover<R, F, S>(registry: &R, service: &str, make_endpoint: F) -> Discovered<F, S>
where
    R: Registry + ?Sized,
    F: FnMut(&Instance) -> S,
{
    Discovered {
        watch: registry.watch(service),
        make_endpoint,
        yielded: HashMap::new(),
        pending: VecDeque::new(),
    }
}

/// The weight of each instance of `service` as registered in `registry`, for a balancer built
/// over [`discover`]: `Balance::builder(..).weights(discovery::weights(&registry, "users"))`.
/// An instance the registry no longer knows weighs 1.
pub fn weights(
    registry: &super::MemoryRegistry,
    service: &str,
) -> impl Fn(&InstanceId) -> u32 + Send + Sync + 'static {
    let (registry, service) = (registry.clone(), service.to_string());
    move |id: &InstanceId| {
        registry
            .snapshot(&service)
            .get(id)
            .map_or(1, |instance| instance.weight)
    }
}

/// The zone of each instance of `service` as registered in `registry`, for a balancer built
/// over [`discover`]: `Balance::builder(..).zones("eu-1a", 1, discovery::zones(&registry,
/// "users"))`. An instance without a zone (or gone) has none.
pub fn zones(
    registry: &super::MemoryRegistry,
    service: &str,
) -> impl Fn(&InstanceId) -> Option<String> + Send + Sync + 'static {
    let (registry, service) = (registry.clone(), service.to_string());
    move |id: &InstanceId| {
        registry
            .snapshot(&service)
            .get(id)
            .and_then(|instance| instance.zone.clone())
    }
}

/// The stream [`discover`] returns: a `tower::discover::Discover`.
#[must_use = "streams do nothing unless polled"]
pub struct Discovered<F, S> {
    watch: Watch,
    make_endpoint: F,
    /// What was yielded: each passing instance as it was when its endpoint was made.
    yielded: HashMap<InstanceId, Arc<Instance>>,
    pending: VecDeque<Change<InstanceId, S>>,
}

impl<F, S> Discovered<F, S>
where
    F: FnMut(&Instance) -> S,
{
    fn upsert(&mut self, instance: &Arc<Instance>) {
        let passing = instance.health == Health::Passing;
        match (passing, self.yielded.get(&instance.id)) {
            // The same registry object: nothing changed since its endpoint was made.
            (true, Some(known)) if Arc::ptr_eq(known, instance) => {}
            // New, back to passing, or changed (address, weight, metadata): a fresh endpoint
            // replaces any old one (balancers treat an `Insert` of a known key so).
            (true, _) => {
                let known = self.yielded.insert(instance.id, instance.clone()).is_some();
                hold(instance, known);
                let endpoint = (self.make_endpoint)(instance);
                self.pending
                    .push_back(Change::Insert(instance.id, endpoint));
            }
            (false, Some(_)) => self.remove(&instance.id),
            (false, None) => {}
        }
    }

    fn remove(&mut self, id: &InstanceId) {
        if self.yielded.remove(id).is_some() {
            release(id);
            self.pending.push_back(Change::Remove(*id));
        }
    }

    fn apply(&mut self, update: &Update) {
        match update {
            Update::Reset(snapshot) => {
                // Snapshots are ordered by id: a binary search per yielded endpoint.
                let instances = snapshot.instances();
                let gone: Vec<InstanceId> = self
                    .yielded
                    .keys()
                    .filter(|id| {
                        instances
                            .binary_search_by(|instance| instance.id.cmp(id))
                            .map_or(true, |at| instances[at].health != Health::Passing)
                    })
                    .copied()
                    .collect();
                for id in gone {
                    self.remove(&id);
                }
                for instance in snapshot.instances() {
                    self.upsert(instance);
                }
            }
            Update::Upsert { instance, .. } => self.upsert(instance),
            Update::Remove { id, .. } => self.remove(id),
        }
    }
}

impl<F, S> Drop for Discovered<F, S> {
    fn drop(&mut self) {
        for id in self.yielded.keys() {
            release(id);
        }
    }
}

/// The instances that `discover` streams have yielded and not removed, by id, each with the
/// number of streams that hold it: a balancer over such a stream reads an endpoint's weight
/// and zone here when it is not told how ([`yielded`]). Ids are unique in the process.
static YIELDED: std::sync::LazyLock<Mutex<Held>> = std::sync::LazyLock::new(Mutex::default);

/// Each yielded instance, and how many streams hold it.
type Held = HashMap<InstanceId, (Arc<Instance>, usize)>;

fn held() -> std::sync::MutexGuard<'static, Held> {
    YIELDED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream yields `instance`: anew, or changed when the stream already holds it (`known`).
fn hold(instance: &Arc<Instance>, known: bool) {
    let mut held = held();
    let entry = held
        .entry(instance.id)
        .or_insert_with(|| (instance.clone(), 0));
    entry.0 = instance.clone();
    entry.1 += usize::from(!known);
}

/// A stream no longer holds instance `id`.
fn release(id: &InstanceId) {
    let mut held = held();
    if let Some(entry) = held.get_mut(id) {
        entry.1 -= 1;
        if entry.1 == 0 {
            held.remove(id);
        }
    }
}

/// The instance a `discover` stream yielded under the discovery key `key`, if `key` is an
/// [`InstanceId`] such a stream holds: where a balancer built over the stream finds each
/// endpoint's weight and zone by default.
pub(crate) fn yielded<K: 'static>(key: &K) -> Option<Arc<Instance>> {
    let id = (key as &dyn std::any::Any).downcast_ref::<InstanceId>()?;
    held().get(id).map(|(instance, _)| instance.clone())
}

// Nothing in it is ever pinned in place: endpoints are only moved into `Change`s.
impl<F, S> Unpin for Discovered<F, S> {}

impl<F, S> Stream for Discovered<F, S>
where
    F: FnMut(&Instance) -> S,
{
    type Item = Result<Change<InstanceId, S>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.watch.poll_next_unpin(cx) {
                Poll::Ready(Some(update)) => self.apply(&update),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<F, S> fmt::Debug for Discovered<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovered")
            .field("endpoints", &self.yielded.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}
