//! Server-side protection: refuse work at once, by rate, by calls in flight, or while busy.
//!
//! ```
//! use meshkit::limit::{
//!     ConcurrencyLimitLayer, LoadShedLayer, RateLimitConfig, RateLimitLayer, RateLimited,
//! };
//! use std::time::Duration;
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let server = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(RateLimitConfig { rate: 1.0, burst: 2 })?)
//!     .layer(ConcurrencyLimitLayer::new(100)?)
//!     .layer(LoadShedLayer::new())
//!     .service(tower::service_fn(|name: &'static str| async move {
//!         Ok::<_, BoxError>(format!("hello, {name}"))
//!     }));
//!
//! assert_eq!(server.clone().oneshot("ada").await?, "hello, ada");
//! assert_eq!(server.clone().oneshot("grace").await?, "hello, grace");
//!
//! // The burst is spent: the next call is refused without reaching the handler.
//! let error = server.oneshot("alan").await.unwrap_err();
//! let limited = error.downcast_ref::<RateLimited>().expect("over the rate");
//! assert!(limited.retry_after() <= Duration::from_secs(1));
//! assert!(meshkit::error::is_rejection(&*error));
//! # Ok(())
//! # }
//! ```
//!
//! None of these layers waits: a call over a limit fails as soon as it is made, so a server
//! under too much load answers "not now" quickly instead of queueing work its callers will
//! have given up on.
//!
//! ## Rate limit
//!
//! [`RateLimitLayer`] admits `rate` calls per second on average and up to `burst` at once
//! after a quiet spell: a token bucket of `burst` tokens refilling one every `1 / rate`
//! seconds (rounded to the nanosecond), starting full. A call takes a token or fails with
//! [`RateLimited`], whose [`retry_after`](RateLimited::retry_after) says when the next token
//! frees. The bucket is one atomic word updated by compare-and-swap (the generic cell rate
//! algorithm), shared by every service the layer builds and all their clones, with no lock
//! and no background task. `poll_ready` is the inner service's.
//!
//! ## Concurrency limit
//!
//! [`ConcurrencyLimitLayer`] allows `max` calls in flight across every service it builds and
//! their clones; one more fails with [`Overloaded`]. A call's permit is held by its response
//! future and freed when the inner call finishes or the future is dropped. For a response
//! that streams a body, that is when the head is ready, not when the body ends. Unlike tower's
//! `ConcurrencyLimit`, which waits for a permit in `poll_ready`, this one never waits.
//!
//! ## Load shedding
//!
//! [`LoadShedLayer`] turns backpressure into refusals, as tower's `LoadShed` does: when the
//! inner service's `poll_ready` is pending, `poll_ready` is ready anyway and the next call
//! fails with [`Overloaded`]. Readiness errors pass through. It only helps above a service
//! that applies backpressure through `poll_ready`: a `Buffer`, tower's waiting
//! `ConcurrencyLimit`, a gate-mode [`CircuitBreaker`](crate::breaker::CircuitBreaker), a
//! balancer. On an axum `Router`, that backpressure must be shared by every service the
//! layer builds: served without `with_state`, a `Router` applies its layers to each handler
//! again for each connection, so tower's `ConcurrencyLimitLayer` would give every connection
//! a semaphore of its own. Put tower's `GlobalConcurrencyLimitLayer` (one semaphore for all)
//! under `LoadShedLayer`, or use this module's [`ConcurrencyLimitLayer`], whose limit every
//! service it builds shares.
//!
//! ## Rejections
//!
//! [`RateLimited`] and [`Overloaded`] reach the caller inside a [`tower::BoxError`] (the
//! services' error type; the inner service's errors pass through unchanged inside it). They
//! are meshkit rejections ([`crate::error::is_rejection`]): a
//! [`RetryLayer`](crate::retry::RetryLayer) above never retries them, and a
//! [`CircuitBreakerLayer`](crate::breaker::CircuitBreakerLayer) above does not count them as
//! failures, unless told otherwise.
//!
//! ## Where they go in a stack
//!
//! Outermost the rate limit (the cheapest refusal, taking no permit), then the concurrency
//! limit, then load shedding right above whatever applies backpressure, as in the example.

mod bucket;
mod config;
mod error;
mod future;
mod layer;
mod permit;
mod service;

pub use config::RateLimitConfig;
pub use error::{OverloadReason, Overloaded, RateLimited};
pub use future::ResponseFuture;
pub use layer::{ConcurrencyLimitLayer, LoadShedLayer, RateLimitLayer};
pub use service::{ConcurrencyLimit, LoadShed, RateLimit};
