use super::config::BreakerConfig;
use super::service::{CircuitBreaker, Options};
use super::shared::Shared;
use super::BreakerHandle;
use crate::classify::DefaultClassifier;
use crate::random::{RandomSource, SplitMix64};
use crate::ConfigError;
use std::fmt;
use std::sync::Arc;
use tokio::sync::broadcast;
use tower::Layer;

/// Capacity of each breaker's transition channel; a subscriber this far behind sees `Lagged`.
pub(crate) const TRANSITION_CAPACITY: usize = 64;

/// Wraps services in a [`CircuitBreaker`]; all services it builds share one breaker.
///
/// ```
/// use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// let breaker = CircuitBreakerLayer::new(BreakerConfig::default())?.name("users");
/// let handle = breaker.handle();
/// let service = ServiceBuilder::new()
///     .layer(breaker)
///     .service_fn(|name: String| async move { Ok::<_, std::io::Error>(name.len()) });
/// # drop(service);
/// assert_eq!(handle.state(), meshkit::breaker::BreakerState::Closed);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    shared: Arc<Shared>,
    classifier: C,
    options: Options,
}

impl CircuitBreakerLayer {
    /// Validates `config` and creates the breaker.
    ///
    /// Needs no runtime; the breaker starts its small background driver on the tokio runtime
    /// of the first call that needs it.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field.
    pub fn new(config: BreakerConfig) -> Result<Self, ConfigError> {
        let settings = config.settings()?;
        let (transitions, _) = broadcast::channel(TRANSITION_CAPACITY);
        Ok(Self {
            shared: Shared::new(
                settings,
                Arc::from("circuit-breaker"),
                Arc::new(SplitMix64::from_entropy()),
                transitions,
            ),
            classifier: DefaultClassifier,
            options: Options::default(),
        })
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Uses `classifier` to decide what counts as a failure.
    ///
    /// It sees the call's result with the error already converted into a [`tower::BoxError`];
    /// meshkit's own rejections are ignored before it is asked (see
    /// [`count_rejections`](Self::count_rejections)).
    pub fn classify<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            shared: self.shared,
            classifier,
            options: self.options,
        }
    }

    /// Gate mode: while the breaker rejects calls, `poll_ready` returns `Poll::Pending` and
    /// wakes the task when the breaker turns half-open (or closes), instead of `call` failing
    /// fast. A load balancer then routes around the endpoint with no special case.
    #[must_use]
    pub fn gate(mut self) -> Self {
        self.options.gate = true;
        self
    }

    /// Whether rejections made by other meshkit layers (another breaker's
    /// [`CircuitOpen`](super::CircuitOpen), ...) and calls a meshkit balancer below did not
    /// send ([`EndpointEjected`](crate::balance::EndpointEjected)) count as failures.
    /// Default: `false`, they are ignored.
    #[must_use]
    pub fn count_rejections(mut self, count: bool) -> Self {
        self.options.count_rejections = count;
        self
    }

    /// Names the breaker in tracing events and [`Transition`](super::Transition)s.
    #[must_use]
    pub fn name(self, name: impl Into<Arc<str>>) -> Self {
        self.shared.lock().name = name.into();
        self
    }

    /// Reports transitions to `sink` (a mesh's own system bus) as well as the process's.
    /// The first sink set stays.
    pub(crate) fn events(self, sink: crate::events::system::Sink) -> Self {
        let _ = self.shared.sink.set(sink);
        self
    }

    /// Draws the open-period jitter from `source` (tests pass a seeded one).
    #[must_use]
    pub fn random(self, source: Arc<dyn RandomSource>) -> Self {
        self.shared.lock().random = source;
        self
    }

    /// The handle shared by every service this layer builds and all their clones.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.shared.clone())
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.handle())
            .field("gate", &self.options.gate)
            .finish()
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(
            inner,
            self.shared.clone(),
            self.classifier.clone(),
            self.options,
        )
    }
}
