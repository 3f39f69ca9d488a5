//! [`RetryLayer`]: validates a [`RetryConfig`] and wraps services in [`Retry`].

use super::budget::RetryBudget;
use super::config::RetryConfig;
use super::replay::{CloneRequest, OnlyIf};
use super::service::{Retry, Shared};
use crate::classify::DefaultRetryClassifier;
use crate::random::{RandomSource, SplitMix64};
use crate::ConfigError;
use std::fmt;
use std::sync::Arc;
use tower::Layer;

/// Wraps services in [`Retry`]; every service it builds (and every clone of those) draws on
/// one [`RetryBudget`].
///
/// ```
/// use meshkit::retry::{RetryConfig, RetryLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// let retry = RetryLayer::new(RetryConfig::default())?.name("users");
/// let budget = retry.budget().clone();
/// let service = ServiceBuilder::new()
///     .layer(retry)
///     .service_fn(|id: u64| async move { Ok::<_, std::io::Error>(id) });
/// # drop(service);
/// assert_eq!(budget.snapshot().withdrawals, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RetryLayer<C = DefaultRetryClassifier, K = CloneRequest> {
    config: RetryConfig,
    budget: RetryBudget,
    random: Arc<dyn RandomSource>,
    name: Arc<str>,
    retry_rejections: bool,
    classifier: C,
    replay: K,
    sink: crate::events::system::Sink,
}

impl RetryLayer {
    /// Validates `config` and creates the layer's budget.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field (`max_attempts`, `backoff.base`,
    /// `budget.ratio`, ...).
    pub fn new(config: RetryConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = RetryBudget::new(config.budget).map_err(|e| e.at("budget"))?;
        Ok(Self {
            config,
            budget,
            random: Arc::new(SplitMix64::from_entropy()),
            name: Arc::from("retry"),
            retry_rejections: false,
            classifier: DefaultRetryClassifier,
            replay: CloneRequest,
            sink: Default::default(),
        })
    }
}

impl<C, K> RetryLayer<C, K> {
    /// The budget every service built by this layer draws on.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// Draws on `budget` instead of the layer's own, to share one budget between layers (a
    /// retry and a hedge layer in front of the same dependency, say). The config's `budget`
    /// field is then unused.
    #[must_use]
    pub fn with_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Reports system events to `sink` (a mesh's own bus) as well as the process's.
    pub(crate) fn events(mut self, sink: crate::events::system::Sink) -> Self {
        self.sink = sink;
        self
    }

    /// Names the layer in tracing events (default `"retry"`).
    #[must_use]
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The source of jitter (default: seeded from the system). Tests pass a seeded one.
    #[must_use]
    pub fn random(mut self, random: Arc<dyn RandomSource>) -> Self {
        self.random = random;
        self
    }

    /// Whether meshkit's own rejections (an open breaker, a shed request) are retried like
    /// other errors. Default `false`: they mean "not now", and a retry would defeat them.
    #[must_use]
    pub fn retry_rejections(mut self, retry: bool) -> Self {
        self.retry_rejections = retry;
        self
    }

    /// Decides what is retried with `classifier`, a
    /// [`ClassifyRetry`](crate::classify::ClassifyRetry) such as a closure
    /// `Fn(&Result<Res, E>) -> RetryDecision`.
    pub fn classify<C2>(self, classifier: C2) -> RetryLayer<C2, K> {
        RetryLayer {
            config: self.config,
            budget: self.budget,
            random: self.random,
            name: self.name,
            retry_rejections: self.retry_rejections,
            classifier,
            replay: self.replay,
            sink: self.sink,
        }
    }

    /// Copies requests for retries with `replay` (a [`Replay`](super::Replay), or a closure
    /// `Fn(&Req) -> Option<Req>`), for requests that are not `Clone` or not always safe to
    /// send twice. A request it returns `None` for is sent once.
    pub fn replay<K2>(self, replay: K2) -> RetryLayer<C, K2> {
        RetryLayer {
            config: self.config,
            budget: self.budget,
            random: self.random,
            name: self.name,
            retry_rejections: self.retry_rejections,
            classifier: self.classifier,
            replay,
            sink: self.sink,
        }
    }

    /// Retries only the requests `predicate` accepts (idempotent ones, say); the others are
    /// sent once.
    pub fn retryable<F>(self, predicate: F) -> RetryLayer<C, OnlyIf<K, F>> {
        let replay = OnlyIf::new(self.replay, predicate);
        RetryLayer {
            config: self.config,
            budget: self.budget,
            random: self.random,
            name: self.name,
            retry_rejections: self.retry_rejections,
            classifier: self.classifier,
            replay,
            sink: self.sink,
        }
    }
}

impl<S, C: Clone, K: Clone> Layer<S> for RetryLayer<C, K> {
    type Service = Retry<S, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared::new(
            self.config.clone(),
            self.budget.clone(),
            self.random.clone(),
            self.name.clone(),
            self.retry_rejections,
            self.sink.clone(),
        );
        Retry::from_parts(inner, shared, self.classifier.clone(), self.replay.clone())
    }
}

impl<C, K> fmt::Debug for RetryLayer<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("budget", &self.budget)
            .field("retry_rejections", &self.retry_rejections)
            .finish_non_exhaustive()
    }
}
