//! [`RateLimitLayer`], [`ConcurrencyLimitLayer`] and [`LoadShedLayer`].

use super::bucket::Bucket;
use super::config::RateLimitConfig;
use super::permit::Permits;
use super::service::{ConcurrencyLimit, LoadShed, RateLimit};
use crate::config::int_in_range;
use crate::ConfigError;
use std::fmt;
use std::sync::Arc;
use tokio::time::Instant;
use tower::Layer;

/// The largest concurrency limit accepted.
const MAX_CONCURRENCY: usize = 1_000_000_000;

/// Wraps services in a [`RateLimit`]; all services it builds, and their clones, share one
/// token bucket.
///
/// ```
/// use meshkit::limit::{RateLimitConfig, RateLimitLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// let limit = RateLimitLayer::new(RateLimitConfig { rate: 50.0, burst: 10 })?;
/// let service = ServiceBuilder::new()
///     .layer(limit)
///     .service_fn(|name: String| async move { Ok::<_, std::io::Error>(name.len()) });
/// # drop(service);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    config: RateLimitConfig,
    bucket: Arc<Bucket>,
}

impl RateLimitLayer {
    /// Validates `config` and creates the bucket, full.
    ///
    /// Needs no runtime; time is read from tokio's clock.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field (`rate` or `burst`).
    pub fn new(config: RateLimitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let bucket = Bucket::new(config.interval_nanos(), config.burst, Instant::now());
        Ok(Self {
            config,
            bucket: Arc::new(bucket),
        })
    }

    /// The configuration the layer was built with.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("rate", &self.config.rate)
            .field("burst", &self.config.burst)
            .finish()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.bucket.clone())
    }
}

/// Wraps services in a [`ConcurrencyLimit`]; all services it builds, and their clones, count
/// against one limit.
///
/// ```
/// use meshkit::limit::ConcurrencyLimitLayer;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), meshkit::ConfigError> {
/// let service = ServiceBuilder::new()
///     .layer(ConcurrencyLimitLayer::new(64)?)
///     .service_fn(|id: u64| async move { Ok::<_, std::io::Error>(id) });
/// # drop(service);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Permits>,
}

impl ConcurrencyLimitLayer {
    /// At most `max` calls in flight at once.
    ///
    /// # Errors
    /// A [`ConfigError`] for `max` outside `[1, 1000000000]`.
    pub fn new(max: usize) -> Result<Self, ConfigError> {
        int_in_range("max", max, 1, MAX_CONCURRENCY)?;
        Ok(Self {
            permits: Arc::new(Permits::new(max)),
        })
    }

    /// The most calls allowed in flight.
    pub fn max(&self) -> usize {
        self.permits.max()
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::new(inner, self.permits.clone())
    }
}

/// Wraps services in a [`LoadShed`], which refuses calls while its inner service is not
/// ready instead of waiting.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadShedLayer {
    _private: (),
}

impl LoadShedLayer {
    /// The layer; it has nothing to configure.
    pub const fn new() -> Self {
        Self { _private: () }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed::new(inner)
    }
}
