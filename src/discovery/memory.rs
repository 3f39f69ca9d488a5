//! [`MemoryRegistry`]: the embedded registry, revisions and watches.

use super::health::{Checker, Job};
use super::instance::{Health, HealthCheck, Instance, InstanceId};
use super::registry::{BoxFuture, Registration, Registry, RegistryError, Snapshot, Update, Watch};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Updates a watcher may fall behind by before it is sent a fresh `Reset` instead.
const WATCH_CAPACITY: usize = 256;

/// The embedded registry: in memory, no server, cheap to clone (clones share one registry).
///
/// Reads return an `Arc` snapshot rebuilt on each change of the service (so a read never
/// copies the instances). Watches are bounded: each service keeps one broadcast channel of
/// 256 updates, and a watcher that falls further behind is sent a fresh `Reset`. TTL expiry,
/// `deregister_after` and active checks run on one background task per registry, started on
/// the tokio runtime of the first registration that needs it.
///
/// ```
/// use meshkit::discovery::{Instance, MemoryRegistry, Registry, Update};
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = MemoryRegistry::new();
/// let mut watch = registry.watch("users");
/// let Some(Update::Reset(empty)) = watch.next().await else { unreachable!() };
/// assert!(!empty.exists());
///
/// let registration = registry.register(Instance::builder("users", "10.0.0.7", 8080).build()?).await?;
/// let Some(Update::Upsert { instance, .. }) = watch.next().await else { unreachable!() };
/// assert_eq!(instance.id, registration.id());
///
/// drop(registration); // deregisters
/// assert!(matches!(watch.next().await, Some(Update::Remove { .. })));
/// assert!(registry.instances("users").await?.instances().is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

#[derive(Default)]
pub(crate) struct Inner {
    state: Mutex<State>,
    pub(crate) checker: Checker,
}

#[derive(Default)]
struct State {
    /// Where registrations, removals and health changes are reported (a mesh's own bus and
    /// the process's).
    sink: crate::events::system::Sink,
    revision: u64,
    services: HashMap<Arc<str>, Service>,
    /// Which service each instance belongs to.
    index: HashMap<InstanceId, Arc<str>>,
}

struct Service {
    name: Arc<str>,
    /// Whether an instance was ever registered (a watch alone does not create a service).
    exists: bool,
    entries: BTreeMap<InstanceId, Entry>,
    snapshot: Snapshot,
    updates: broadcast::Sender<Update>,
}

/// An instance and what the registry tracks about it.
pub(crate) struct Entry {
    /// The revision that registered it: jobs, probes and guards of an earlier registration of
    /// the same id carry another, and are ignored.
    pub(crate) generation: u64,
    pub(crate) instance: Arc<Instance>,
    /// A TTL instance is critical once this passes without a heartbeat.
    pub(crate) ttl_deadline: Option<Instant>,
    pub(crate) critical_since: Option<Instant>,
    pub(crate) successes: u32,
    pub(crate) failures: u32,
}

impl Service {
    fn new(name: Arc<str>, revision: u64) -> Self {
        let (updates, _) = broadcast::channel(WATCH_CAPACITY);
        Self {
            snapshot: Snapshot::new(name.clone(), revision, None),
            name,
            exists: false,
            entries: BTreeMap::new(),
            updates,
        }
    }

    fn rebuild(&mut self, revision: u64) {
        let instances: Arc<[Arc<Instance>]> =
            self.entries.values().map(|e| e.instance.clone()).collect();
        self.snapshot = Snapshot::new(
            self.name.clone(),
            revision,
            self.exists.then_some(instances),
        );
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports registrations, removals and health changes to `sink` (a mesh's own bus) as
    /// well as the process's.
    pub(crate) fn events(&self, sink: crate::events::system::Sink) {
        let mut state = self.inner.state();
        // A registry shared by meshes reports to the first built over it.
        if !state.sink.has_bus() {
            state.sink = sink;
        }
    }

    /// The snapshot of `service` now, without going through a future.
    pub fn snapshot(&self, service: &str) -> Snapshot {
        let state = self.inner.state();
        match state.services.get(service) {
            Some(service) => service.snapshot.clone(),
            None => Snapshot::new(Arc::from(service), state.revision, None),
        }
    }

    /// The registry's current revision.
    pub fn revision(&self) -> u64 {
        self.inner.state().revision
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    pub(crate) fn checker(&self) -> &Checker {
        &self.inner.checker
    }

    pub(crate) fn downgrade(&self) -> Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    fn register_now(&self, instance: Instance) -> Result<Registration, RegistryError> {
        instance.validate()?;
        #[cfg(not(feature = "http"))]
        if matches!(instance.check, HealthCheck::Http { .. }) {
            // Not silently unchecked: without the feature there is no HTTP checker.
            return Err(RegistryError::Invalid(crate::ConfigError::new(
                "check.kind",
                "none, ttl or tcp (http checks need the `http` feature)",
                "http",
            )));
        }
        let id = instance.id;
        let now = Instant::now();
        let check = instance.check.clone();
        let starts_critical = instance.health == Health::Critical;
        let deregister_after = instance.deregister_after;
        let generation = {
            let mut state = self.inner.state();
            if let Some(old) = state.index.get(&id).cloned() {
                // Re-registering an id replaces it: the old entry, its jobs and its probe go.
                state.remove(&old, &id, "replaced");
                self.inner.checker.cancel(&id);
            }
            state.revision += 1;
            let revision = state.revision;
            let name: Arc<str> = Arc::from(instance.service.as_str());
            state.index.insert(id, name.clone());
            let service = state
                .services
                .entry(name.clone())
                .or_insert_with(|| Service::new(name.clone(), revision));
            service.exists = true;
            let ttl_deadline = match check {
                HealthCheck::Ttl { ttl, .. } => Some(now + ttl),
                _ => None,
            };
            let instance = Arc::new(instance);
            service.entries.insert(
                id,
                Entry {
                    generation: revision,
                    instance: instance.clone(),
                    ttl_deadline,
                    critical_since: starts_critical.then_some(now),
                    successes: 0,
                    failures: 0,
                },
            );
            service.rebuild(revision);
            let _ = service.updates.send(Update::Upsert { revision, instance });
            tracing::info!(service = &*name, instance = %id, revision, "instance registered");
            state.sink.publish(
                &name,
                crate::events::system::SystemEvent::InstanceRegistered {
                    service: name.to_string(),
                    instance: id.to_string(),
                },
            );
            revision
        };
        let key = Key { id, generation };
        let checker = &self.inner.checker;
        match check {
            HealthCheck::None => {}
            HealthCheck::Ttl { ttl } => checker.schedule(self, now + ttl, key, Job::Ttl),
            HealthCheck::Tcp { .. } | HealthCheck::Http { .. } => {
                checker.schedule(self, now, key, Job::Probe)
            }
        }
        if let (true, Some(after)) = (starts_critical, deregister_after) {
            checker.schedule(self, now + after, key, Job::Expire);
        }
        let registry = Arc::downgrade(&self.inner);
        Ok(Registration::new(id, move |_| {
            if let Some(inner) = registry.upgrade() {
                inner.remove(key, "deregistered");
            }
        }))
    }

    fn deregister_now(&self, id: &InstanceId) -> Result<(), RegistryError> {
        let generation = self.inner.generation_of(id)?;
        self.inner.remove(
            Key {
                id: *id,
                generation,
            },
            "deregistered",
        );
        Ok(())
    }

    fn heartbeat_now(&self, id: &InstanceId) -> Result<(), RegistryError> {
        let now = Instant::now();
        let generation = self.inner.generation_of(id)?;
        let mut not_ttl = false;
        self.inner.transition(
            Key {
                id: *id,
                generation,
            },
            |entry| {
                let HealthCheck::Ttl { ttl, .. } = entry.instance.check else {
                    not_ttl = true;
                    return None;
                };
                entry.ttl_deadline = Some(now + ttl);
                Some((Health::Passing, "heartbeat"))
            },
        );
        if not_ttl {
            return Err(RegistryError::NotTtl(*id));
        }
        self.inner.checker.ensure_running(self);
        Ok(())
    }

    fn watch_now(&self, service: &str) -> Watch {
        self.inner.checker.ensure_running(self);
        let registry = Arc::downgrade(&self.inner);
        let service: Arc<str> = Arc::from(service);
        let stream = futures::stream::unfold(
            (
                registry,
                service,
                None::<(broadcast::Receiver<Update>, u64)>,
            ),
            |(registry, service, live)| async move {
                let (mut receiver, last) = match live {
                    Some(live) => live,
                    None => {
                        // Reset: the snapshot and the subscription are taken under one lock,
                        // so the receiver holds exactly the updates after the snapshot.
                        let inner = registry.upgrade()?;
                        let (snapshot, receiver) = inner.subscribe(&service);
                        let revision = snapshot.revision();
                        return Some((
                            Update::Reset(snapshot),
                            (registry, service, Some((receiver, revision))),
                        ));
                    }
                };
                loop {
                    match receiver.recv().await {
                        Ok(update) if update.revision() <= last => continue,
                        Ok(update) => {
                            let revision = update.revision();
                            return Some((update, (registry, service, Some((receiver, revision)))));
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::debug!(
                                service = &*service,
                                missed,
                                "watcher fell behind; sending a fresh reset"
                            );
                            let inner = registry.upgrade()?;
                            let (snapshot, receiver) = inner.subscribe(&service);
                            let revision = snapshot.revision();
                            return Some((
                                Update::Reset(snapshot),
                                (registry, service, Some((receiver, revision))),
                            ));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Box::pin(stream)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self, service: &str) -> (Snapshot, broadcast::Receiver<Update>) {
        let mut state = self.state();
        if !state.services.contains_key(service) {
            // Watches of services that do not exist keep an entry only while watched, so
            // watching arbitrary names cannot grow the registry.
            state
                .services
                .retain(|_, s| s.exists || s.updates.receiver_count() > 0);
        }
        let revision = state.revision;
        let name: Arc<str> = Arc::from(service);
        let service = state
            .services
            .entry(name.clone())
            .or_insert_with(|| Service::new(name, revision));
        (service.snapshot.clone(), service.updates.subscribe())
    }

    /// The generation of the entry registered under `id` now.
    fn generation_of(&self, id: &InstanceId) -> Result<u64, RegistryError> {
        let state = self.state();
        let service = state.index.get(id).ok_or(RegistryError::NotFound(*id))?;
        state
            .services
            .get(service)
            .and_then(|s| s.entries.get(id))
            .map(|entry| entry.generation)
            .ok_or(RegistryError::NotFound(*id))
    }

    /// Reads the entry `key` names (`None` if it was removed or replaced).
    pub(crate) fn read<R>(&self, key: Key, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        let state = self.state();
        let service = state.index.get(&key.id)?;
        let entry = state.services.get(service)?.entries.get(&key.id)?;
        (entry.generation == key.generation).then(|| f(entry))
    }

    /// Decides and applies a change to the entry `key` names, under one lock: `decide` may
    /// update the entry's bookkeeping and returns the health it should have (and why). A
    /// change of health bumps the revision and is sent to watchers. Returns the entry's
    /// health and `critical_since` afterwards (`None` if the entry is gone or replaced).
    pub(crate) fn transition(
        &self,
        key: Key,
        decide: impl FnOnce(&mut Entry) -> Option<(Health, &'static str)>,
    ) -> Option<(Health, Option<Instant>)> {
        let mut state = self.state();
        let service = state.index.get(&key.id)?.clone();
        let revision = state.revision + 1;
        let svc = state.services.get_mut(&service)?;
        let entry = svc.entries.get_mut(&key.id)?;
        if entry.generation != key.generation {
            return None;
        }
        let from = entry.instance.health;
        let Some((to, why)) = decide(entry).filter(|(to, _)| *to != from) else {
            return Some((from, entry.critical_since));
        };
        Arc::make_mut(&mut entry.instance).health = to;
        entry.critical_since = (to == Health::Critical).then(Instant::now);
        let after = (to, entry.critical_since);
        let instance = entry.instance.clone();
        svc.rebuild(revision);
        let _ = svc.updates.send(Update::Upsert { revision, instance });
        state.revision = revision;
        tracing::info!(service = &*service, instance = %key.id, %from, %to, reason = why, revision, "instance health changed");
        state.sink.publish(
            &service,
            crate::events::system::SystemEvent::HealthChanged {
                service: service.to_string(),
                instance: key.id.to_string(),
                from,
                to,
            },
        );
        Some(after)
    }

    /// Removes the entry `key` names (if it is still that registration) and cancels its
    /// probe.
    pub(crate) fn remove(&self, key: Key, why: &str) {
        let mut state = self.state();
        let current = state.index.get(&key.id).cloned().filter(|service| {
            state
                .services
                .get(service)
                .and_then(|s| s.entries.get(&key.id))
                .is_some_and(|entry| entry.generation == key.generation)
        });
        if let Some(service) = current {
            state.remove(&service, &key.id, why);
            // Under the state lock, so a re-registration cannot slip in between.
            self.checker.cancel(&key.id);
        }
    }

    /// Removes the entry `key` names if it has been critical for `after` by `now`.
    pub(crate) fn expire(&self, key: Key, after: std::time::Duration, now: Instant) {
        let due = self
            .read(key, |entry| {
                entry
                    .critical_since
                    .is_some_and(|since| now >= since + after)
            })
            .unwrap_or(false);
        if due {
            let mut state = self.state();
            // Checked again under the lock that removes: a heartbeat may have just revived it.
            let still = state.index.get(&key.id).cloned().filter(|service| {
                state
                    .services
                    .get(service)
                    .and_then(|s| s.entries.get(&key.id))
                    .is_some_and(|entry| {
                        entry.generation == key.generation
                            && entry
                                .critical_since
                                .is_some_and(|since| now >= since + after)
                    })
            });
            if let Some(service) = still {
                state.remove(&service, &key.id, "expired after deregister_after");
                self.checker.cancel(&key.id);
            }
        }
    }
}

/// One registration of an instance: its id and the revision that registered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) id: InstanceId,
    pub(crate) generation: u64,
}

impl State {
    fn remove(&mut self, service: &Arc<str>, id: &InstanceId, why: &str) {
        self.index.remove(id);
        let revision = self.revision + 1;
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if svc.entries.remove(id).is_none() {
            return;
        }
        self.revision = revision;
        svc.rebuild(revision);
        let _ = svc.updates.send(Update::Remove { revision, id: *id });
        tracing::info!(service = &**service, instance = %id, revision, reason = why, "instance removed");
        self.sink.publish(
            service,
            crate::events::system::SystemEvent::InstanceRemoved {
                service: service.to_string(),
                instance: id.to_string(),
                reason: why.to_string(),
            },
        );
    }
}

impl Registry for MemoryRegistry {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        let result = self.register_now(instance);
        Box::pin(async move { result })
    }

    fn deregister(&self, id: &InstanceId) -> BoxFuture<'_, Result<(), RegistryError>> {
        let result = self.deregister_now(id);
        Box::pin(async move { result })
    }

    fn heartbeat(&self, id: &InstanceId) -> BoxFuture<'_, Result<(), RegistryError>> {
        let result = self.heartbeat_now(id);
        Box::pin(async move { result })
    }

    fn instances(&self, service: &str) -> BoxFuture<'_, Result<Snapshot, RegistryError>> {
        let snapshot = self.snapshot(service);
        Box::pin(async move { Ok(snapshot) })
    }

    fn watch(&self, service: &str) -> Watch {
        self.watch_now(service)
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state();
        f.debug_struct("MemoryRegistry")
            .field("revision", &state.revision)
            .field("services", &state.services.len())
            .field("instances", &state.index.len())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the health task notice that the registry is gone and exit.
        self.checker.wake_for_shutdown();
    }
}
