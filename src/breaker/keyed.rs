//! One breaker per key computed from the request, so one bad host does not trip the others.

use super::config::{BreakerConfig, Settings};
use super::layer::TRANSITION_CAPACITY;
use super::service::{start, Options};
use super::shared::Shared;
use super::{BreakerHandle, ResponseFuture, Transition};
use crate::classify::{Classify, DefaultClassifier};
use crate::config::{duration_in_range, int_in_range};
use crate::random::{RandomSource, SplitMix64};
use crate::ConfigError;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

/// Keys kept at most, by default.
pub const DEFAULT_MAX_KEYS: usize = 1024;
/// A key unused for this long is forgotten, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Wraps services in a [`KeyedCircuitBreaker`]: a separate breaker, with the same config, for
/// each key that `key` extracts from a request (for example the HTTP authority).
///
/// The number of keys is bounded: a key unused for `idle_timeout` is forgotten, and when
/// `max_keys` are held the least recently used key makes room for a new one. A forgotten key
/// starts again closed.
///
/// ```
/// use meshkit::breaker::{BreakerConfig, KeyedCircuitBreakerLayer};
/// use std::time::Duration;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// // Requests are (host, path) pairs here; an HTTP client would key on the URI's authority.
/// let layer = KeyedCircuitBreakerLayer::new(BreakerConfig::default(), |req: &(String, String)| req.0.clone())?
///     .with_limits(256, Duration::from_secs(300))?;
/// let handle = layer.handle();
/// assert!(handle.is_empty());
/// # Ok(())
/// # }
/// ```
pub struct KeyedCircuitBreakerLayer<K, F, C = DefaultClassifier> {
    registry: Arc<Registry<K>>,
    key: F,
    classifier: C,
    options: Options,
}

impl<K, F> KeyedCircuitBreakerLayer<K, F>
where
    K: Hash + Eq + Clone + fmt::Debug,
{
    /// Validates `config` and creates an empty keyed breaker that keys requests with `key`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field of `config`.
    pub fn new<Request>(config: BreakerConfig, key: F) -> Result<Self, ConfigError>
    where
        F: Fn(&Request) -> K,
    {
        let settings = config.settings()?;
        Ok(Self {
            registry: Arc::new(Registry {
                settings,
                max_keys: DEFAULT_MAX_KEYS,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                random: Arc::new(SplitMix64::from_entropy()),
                transitions: broadcast::channel(TRANSITION_CAPACITY).0,
                entries: Mutex::new(Entries {
                    map: HashMap::new(),
                    last_sweep: None,
                }),
            }),
            key,
            classifier: DefaultClassifier,
            options: Options::default(),
        })
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    /// Holds at most `max_keys` keys (in `[1, 1000000]`; default [`DEFAULT_MAX_KEYS`]).
    ///
    /// # Errors
    /// A [`ConfigError`] naming `max_keys` when out of range.
    pub fn max_keys(self, max_keys: usize) -> Result<Self, ConfigError> {
        let idle_timeout = self.registry.idle_timeout;
        self.with_limits(max_keys, idle_timeout)
    }

    /// Forgets a key after `idle_timeout` without a call (in `[1s, 1day]`; default
    /// [`DEFAULT_IDLE_TIMEOUT`]).
    ///
    /// # Errors
    /// A [`ConfigError`] naming `idle_timeout` when out of range.
    pub fn idle_timeout(self, idle_timeout: Duration) -> Result<Self, ConfigError> {
        let max_keys = self.registry.max_keys;
        self.with_limits(max_keys, idle_timeout)
    }

    /// Bounds the keys held: at most `max_keys` (in `[1, 1000000]`), each forgotten after
    /// `idle_timeout` (in `[1s, 1day]`) without a call.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `max_keys` or `idle_timeout` when out of range.
    pub fn with_limits(self, max_keys: usize, idle_timeout: Duration) -> Result<Self, ConfigError> {
        int_in_range("max_keys", max_keys, 1, 1_000_000)?;
        duration_in_range(
            "idle_timeout",
            idle_timeout,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        let registry = Registry {
            settings: self.registry.settings.clone(),
            max_keys,
            idle_timeout,
            random: self.registry.random.clone(),
            transitions: self.registry.transitions.clone(),
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                last_sweep: None,
            }),
        };
        Ok(Self {
            registry: Arc::new(registry),
            ..self
        })
    }

    /// Uses `classifier` to decide what counts as a failure (see
    /// [`CircuitBreakerLayer::classify`](super::CircuitBreakerLayer::classify)).
    pub fn classify<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<K, F, C2> {
        KeyedCircuitBreakerLayer {
            registry: self.registry,
            key: self.key,
            classifier,
            options: self.options,
        }
    }

    /// Whether other meshkit layers' rejections count as failures. Default: `false`.
    #[must_use]
    pub fn count_rejections(mut self, count: bool) -> Self {
        self.options.count_rejections = count;
        self
    }

    /// The handle to every per-key breaker this layer's services create.
    pub fn handle(&self) -> KeyedBreakerHandle<K> {
        KeyedBreakerHandle {
            registry: self.registry.clone(),
        }
    }
}

impl<K, F: Clone, C: Clone> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
            key: self.key.clone(),
            classifier: self.classifier.clone(),
            options: self.options,
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("max_keys", &self.registry.max_keys)
            .field("idle_timeout", &self.registry.idle_timeout)
            .finish()
    }
}

impl<S, K, F: Clone, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            registry: self.registry.clone(),
            key: self.key.clone(),
            classifier: self.classifier.clone(),
            options: self.options,
        }
    }
}

/// A service with one circuit breaker per request key; built by [`KeyedCircuitBreakerLayer`].
///
/// It always fails fast from `call` (readiness cannot depend on a request not yet seen).
pub struct KeyedCircuitBreaker<S, K, F, C = DefaultClassifier> {
    inner: S,
    registry: Arc<Registry<K>>,
    key: F,
    classifier: C,
    options: Options,
}

impl<S, K, F, C> KeyedCircuitBreaker<S, K, F, C> {
    /// The handle to the per-key breakers.
    pub fn handle(&self) -> KeyedBreakerHandle<K> {
        KeyedBreakerHandle {
            registry: self.registry.clone(),
        }
    }

    crate::macros::inner_accessors!();
}

impl<S: Clone, K, F: Clone, C: Clone> Clone for KeyedCircuitBreaker<S, K, F, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            registry: self.registry.clone(),
            key: self.key.clone(),
            classifier: self.classifier.clone(),
            options: self.options,
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("keys", &self.registry.len())
            .finish()
    }
}

impl<S, K, F, C, Request> Service<Request> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + fmt::Debug,
    F: Fn(&Request) -> K,
    C: Classify<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let shared = self.registry.breaker((self.key)(&request));
        let admission = shared.admit();
        let inner = &mut self.inner;
        start(
            &shared,
            admission,
            self.classifier.clone(),
            self.options,
            || inner.call(request),
        )
    }
}

/// Observes the per-key breakers of a [`KeyedCircuitBreakerLayer`].
pub struct KeyedBreakerHandle<K> {
    registry: Arc<Registry<K>>,
}

impl<K: Hash + Eq + Clone> KeyedBreakerHandle<K> {
    /// The breaker of `key`, if the key is currently held.
    pub fn get(&self, key: &K) -> Option<BreakerHandle> {
        let now = Instant::now();
        let entries = self.registry.lock();
        entries
            .map
            .get(key)
            .filter(|entry| {
                now.saturating_duration_since(entry.last_used) < self.registry.idle_timeout
            })
            .map(|entry| BreakerHandle::new(entry.shared.clone()))
    }

    /// The keys currently held.
    pub fn keys(&self) -> Vec<K> {
        self.registry.lock().map.keys().cloned().collect()
    }
}

impl<K> KeyedBreakerHandle<K> {
    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver of every per-key transition from now on; [`Transition::breaker`] is the
    /// key's `Debug` form.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.registry.transitions.subscribe()
    }
}

impl<K> Clone for KeyedBreakerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyedBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBreakerHandle")
            .field("keys", &self.len())
            .finish()
    }
}

struct Registry<K> {
    settings: Settings,
    max_keys: usize,
    idle_timeout: Duration,
    random: Arc<dyn RandomSource>,
    transitions: broadcast::Sender<Transition>,
    entries: Mutex<Entries<K>>,
}

struct Entries<K> {
    map: HashMap<K, Entry>,
    last_sweep: Option<Instant>,
}

struct Entry {
    shared: Arc<Shared>,
    last_used: Instant,
}

impl<K> Registry<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<K>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl<K: Hash + Eq + Clone + fmt::Debug> Registry<K> {
    /// The breaker for `key`, created (and room made for it) if the key is new.
    fn breaker(&self, key: K) -> Arc<Shared> {
        let now = Instant::now();
        let mut entries = self.lock();
        if let Some(entry) = entries.map.get_mut(&key) {
            if now.saturating_duration_since(entry.last_used) < self.idle_timeout {
                entry.last_used = now;
                return entry.shared.clone();
            }
            // Idle too long: forgotten, and it starts again closed like any new key.
            entries.map.remove(&key);
        }
        let sweep_due = entries
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= self.idle_timeout / 4);
        if sweep_due || entries.map.len() >= self.max_keys {
            let idle_timeout = self.idle_timeout;
            entries
                .map
                .retain(|_, entry| now.saturating_duration_since(entry.last_used) < idle_timeout);
            entries.last_sweep = Some(now);
        }
        let mut evicted = None;
        if entries.map.len() >= self.max_keys {
            evicted = entries
                .map
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = &evicted {
                entries.map.remove(oldest);
            }
        }
        let shared = Shared::new(
            self.settings.clone(),
            Arc::from(format!("{key:?}")),
            self.random.clone(),
            self.transitions.clone(),
        );
        entries.map.insert(
            key,
            Entry {
                shared: shared.clone(),
                last_used: now,
            },
        );
        drop(entries);
        // Logged with the lock released: a subscriber may look at the handle.
        if let Some(oldest) = evicted {
            tracing::debug!(key = ?oldest, "keyed circuit breaker evicted least recently used key");
        }
        shared
    }
}
