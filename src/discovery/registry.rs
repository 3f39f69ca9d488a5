//! The [`Registry`] trait and what it deals in: [`Snapshot`], [`Update`], [`Registration`],
//! [`Filter`] and [`RegistryError`].

use super::instance::{Health, Instance, InstanceId};
use crate::ConfigError;
use futures::Stream;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, as [`Registry`] methods return (the trait stays object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The stream [`Registry::watch`] returns.
pub type Watch = Pin<Box<dyn Stream<Item = Update> + Send>>;

/// Where instances register and are found: the embedded [`MemoryRegistry`](super::MemoryRegistry),
/// later etcd or DNS.
///
/// Object safe: hold an `Arc<dyn Registry>`. Every change bumps the registry's revision;
/// watchers see changes in revision order.
pub trait Registry: Send + Sync + 'static {
    /// Registers `instance` (validated first); dropping the returned guard deregisters it.
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>>;

    /// Removes an instance.
    fn deregister(&self, id: &InstanceId) -> BoxFuture<'_, Result<(), RegistryError>>;

    /// Records a heartbeat for an instance with a TTL check: it is passing for another `ttl`.
    fn heartbeat(&self, id: &InstanceId) -> BoxFuture<'_, Result<(), RegistryError>>;

    /// The service's instances now, with the revision they were read at.
    fn instances(&self, service: &str) -> BoxFuture<'_, Result<Snapshot, RegistryError>>;

    /// The service's changes: a [`Update::Reset`] with the full state first, then every
    /// change in revision order. A watcher that falls behind gets a fresh `Reset` rather than
    /// an ever-growing queue. Ends when the registry is dropped.
    fn watch(&self, service: &str) -> Watch;
}

/// A service's instances at one revision. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Snapshot(Arc<SnapshotInner>);

struct SnapshotInner {
    service: Arc<str>,
    revision: u64,
    /// `None`: no instance of the service was ever registered.
    instances: Option<Arc<[Arc<Instance>]>>,
}

impl Snapshot {
    pub(crate) fn new(
        service: Arc<str>,
        revision: u64,
        instances: Option<Arc<[Arc<Instance>]>>,
    ) -> Self {
        Self(Arc::new(SnapshotInner {
            service,
            revision,
            instances,
        }))
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.0.service
    }

    /// The registry revision this snapshot reflects.
    pub fn revision(&self) -> u64 {
        self.0.revision
    }

    /// Whether the service exists: an instance of it was registered at some point (it may
    /// have none now).
    pub fn exists(&self) -> bool {
        self.0.instances.is_some()
    }

    /// Its instances (none if the service does not exist), ordered by id. Each is shared
    /// (`Arc`) with the registry and other snapshots: reading never copies an instance.
    pub fn instances(&self) -> &[Arc<Instance>] {
        self.0.instances.as_deref().unwrap_or(&[])
    }

    /// The instance with this id.
    pub fn get(&self, id: &InstanceId) -> Option<&Instance> {
        self.instances()
            .iter()
            .find(|instance| &instance.id == id)
            .map(|instance| &**instance)
    }

    /// The instances `filter` accepts.
    pub fn filtered<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances()
            .iter()
            .map(|instance| &**instance)
            .filter(move |instance| filter.accepts(instance))
    }

    /// A snapshot of only the instances `filter` accepts.
    pub fn filter(&self, filter: &Filter) -> Snapshot {
        let kept: Option<Arc<[Arc<Instance>]>> = self
            .0
            .instances
            .as_ref()
            .map(|all| all.iter().filter(|i| filter.accepts(i)).cloned().collect());
        Snapshot::new(self.0.service.clone(), self.0.revision, kept)
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("service", &self.service())
            .field("revision", &self.revision())
            .field("exists", &self.exists())
            .field("instances", &self.instances())
            .finish()
    }
}

/// One change to a watched service, with the registry revision it happened at.
#[derive(Clone, Debug)]
pub enum Update {
    /// The full state: always first, and again after a watcher fell behind.
    Reset(Snapshot),
    /// An instance was added, or changed (its health, say).
    Upsert {
        /// The registry revision of the change.
        revision: u64,
        /// The instance as it is now (shared with the registry's snapshot).
        instance: Arc<Instance>,
    },
    /// An instance was removed (deregistered, expired, or no longer matching a filter).
    Remove {
        /// The registry revision of the change.
        revision: u64,
        /// The instance removed.
        id: InstanceId,
    },
}

impl Update {
    /// The registry revision of this update.
    pub fn revision(&self) -> u64 {
        match self {
            Self::Reset(snapshot) => snapshot.revision(),
            Self::Upsert { revision, .. } | Self::Remove { revision, .. } => *revision,
        }
    }
}

/// Which instances a read or a watch wants: all conditions must hold.
///
/// ```
/// use meshkit::discovery::{Filter, Health};
///
/// let filter = Filter::new().tag("v2").zone("eu-west-1a").health(&[Health::Passing]);
/// # drop(filter);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[must_use]
pub struct Filter {
    tags: Vec<String>,
    metadata: BTreeMap<String, String>,
    zone: Option<String>,
    health: Option<Vec<Health>>,
}

impl Filter {
    /// Accepts every instance.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only instances carrying this tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Only instances whose metadata has this entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Only instances in this zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Only instances in one of these health states.
    pub fn health(mut self, health: &[Health]) -> Self {
        self.health = Some(health.to_vec());
        self
    }

    /// Whether `instance` passes.
    pub fn accepts(&self, instance: &Instance) -> bool {
        self.tags.iter().all(|tag| instance.tags.contains(tag))
            && self
                .metadata
                .iter()
                .all(|(k, v)| instance.metadata.get(k) == Some(v))
            && self
                .zone
                .as_ref()
                .is_none_or(|zone| instance.zone.as_ref() == Some(zone))
            && self
                .health
                .as_ref()
                .is_none_or(|health| health.contains(&instance.health))
    }
}

/// Narrows a watch to the instances `filter` accepts: a `Reset` carries only those, an
/// `Upsert` of an instance that does not pass becomes a `Remove` (it may have passed before).
pub fn filter_watch(watch: Watch, filter: Filter) -> Watch {
    use futures::StreamExt;
    Box::pin(watch.map(move |update| match update {
        Update::Reset(snapshot) => Update::Reset(snapshot.filter(&filter)),
        Update::Upsert { revision, instance } if !filter.accepts(&instance) => Update::Remove {
            revision,
            id: instance.id,
        },
        other => other,
    }))
}

/// A registered instance, deregistered when dropped (or by [`deregister`](Self::deregister)).
#[must_use = "dropping a Registration deregisters the instance"]
pub struct Registration {
    id: InstanceId,
    release: Option<Box<dyn FnOnce(InstanceId) + Send + Sync>>,
}

impl Registration {
    /// A guard for `id` that runs `release` once, when dropped or deregistered.
    pub fn new(id: InstanceId, release: impl FnOnce(InstanceId) + Send + Sync + 'static) -> Self {
        Self {
            id,
            release: Some(Box::new(release)),
        }
    }

    /// The registered instance's id.
    pub fn id(&self) -> InstanceId {
        self.id
    }

    /// Deregisters now.
    pub async fn deregister(mut self) {
        if let Some(release) = self.release.take() {
            release(self.id);
        }
    }

    /// Keeps the instance registered after this guard is dropped.
    pub fn forget(mut self) {
        self.release = None;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.id);
        }
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .finish()
    }
}

/// Why a registry call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegistryError {
    /// The instance is invalid.
    Invalid(ConfigError),
    /// No instance with this id is registered.
    NotFound(InstanceId),
    /// The instance has no TTL check, so a heartbeat means nothing.
    NotTtl(InstanceId),
    /// The backend failed (a network registry).
    Backend(tower::BoxError),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => write!(f, "invalid instance: {e}"),
            Self::NotFound(id) => write!(f, "no instance {id} is registered"),
            Self::NotTtl(id) => write!(f, "instance {id} has no TTL check"),
            Self::Backend(e) => write!(f, "registry backend failed: {e}"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Invalid(e) => Some(e),
            Self::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<ConfigError> for RegistryError {
    fn from(e: ConfigError) -> Self {
        Self::Invalid(e)
    }
}
