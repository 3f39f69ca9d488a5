//! [`HedgeLayer`]: validates a [`HedgeConfig`] and wraps services in [`Hedge`].

use super::config::{HedgeConfig, HedgeDelay};
use super::latency::Latencies;
use super::service::{Hedge, Shared};
use crate::classify::DefaultClassifier;
use crate::retry::{CloneRequest, OnlyIf, RetryBudget};
use crate::ConfigError;
use std::fmt;
use std::sync::Arc;
use tower::Layer;

/// Wraps services in [`Hedge`]; every service it builds shares one budget and one record of
/// latencies.
///
/// ```
/// use meshkit::hedge::{HedgeConfig, HedgeDelay, HedgeLayer};
/// use std::time::Duration;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// let config = HedgeConfig {
///     delay: HedgeDelay::Fixed(Duration::from_millis(20)),
///     ..HedgeConfig::default()
/// };
/// let service = ServiceBuilder::new()
///     .layer(HedgeLayer::new(config)?.name("search"))
///     .service_fn(|query: String| async move { Ok::<_, std::io::Error>(query.len()) });
/// # drop(service);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HedgeLayer<C = DefaultClassifier, K = CloneRequest> {
    shared: Arc<Shared>,
    classifier: C,
    replay: K,
}

impl HedgeLayer {
    /// Validates `config` and creates the layer's budget.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field.
    pub fn new(config: HedgeConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = RetryBudget::new(config.budget).map_err(|e| e.at("budget"))?;
        Ok(Self {
            shared: shared(config, budget, Arc::from("hedge")),
            classifier: DefaultClassifier,
            replay: CloneRequest,
        })
    }
}

fn shared(config: HedgeConfig, budget: RetryBudget, name: Arc<str>) -> Arc<Shared> {
    let quantile = match config.delay {
        HedgeDelay::Percentile(p) => p,
        HedgeDelay::Fixed(_) => 0.5,
    };
    Arc::new(Shared {
        latencies: Latencies::new(quantile, config.min_samples, config.window),
        config,
        budget,
        name,
    })
}

impl<C, K> HedgeLayer<C, K> {
    /// The budget hedges draw on.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    /// Draws on `budget` (one shared with a retry layer, say) instead of the layer's own.
    #[must_use]
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        let shared = shared(self.shared.config.clone(), budget, self.shared.name.clone());
        Self { shared, ..self }
    }

    /// Names the layer in tracing events (default `"hedge"`).
    #[must_use]
    pub fn name(self, name: impl Into<Arc<str>>) -> Self {
        let shared = shared(
            self.shared.config.clone(),
            self.shared.budget.clone(),
            name.into(),
        );
        Self { shared, ..self }
    }

    /// Decides which results win with `classifier` (default: `Ok` is a success); a failure
    /// waits for the other tries.
    pub fn classify<C2>(self, classifier: C2) -> HedgeLayer<C2, K> {
        HedgeLayer {
            shared: self.shared,
            classifier,
            replay: self.replay,
        }
    }

    /// Copies requests for hedges with `replay` (a [`Replay`](crate::retry::Replay) or a
    /// closure `Fn(&Req) -> Option<Req>`); a request it returns `None` for is not hedged.
    pub fn replay<K2>(self, replay: K2) -> HedgeLayer<C, K2> {
        HedgeLayer {
            shared: self.shared,
            classifier: self.classifier,
            replay,
        }
    }

    /// Hedges only the requests `predicate` accepts (idempotent ones).
    pub fn hedgeable<F>(self, predicate: F) -> HedgeLayer<C, OnlyIf<K, F>> {
        HedgeLayer {
            shared: self.shared,
            classifier: self.classifier,
            replay: OnlyIf::new(self.replay, predicate),
        }
    }
}

impl<S, C: Clone, K: Clone> Layer<S> for HedgeLayer<C, K> {
    type Service = Hedge<S, C, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge::from_parts(
            inner,
            self.shared.clone(),
            self.classifier.clone(),
            self.replay.clone(),
        )
    }
}

impl<C, K> fmt::Debug for HedgeLayer<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeLayer")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .field("budget", &self.shared.budget)
            .finish_non_exhaustive()
    }
}
