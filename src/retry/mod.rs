//! Retries that never make an outage worse: backoff with jitter, a budget, server delay
//! hints, per-try timeouts and a deadline.
//!
//! ```
//! use meshkit::retry::{RetryConfig, RetryLayer};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let tries = Arc::new(AtomicU32::new(0));
//! let counter = tries.clone();
//! let flaky = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryConfig::default())?)
//!     .service_fn(move |id: u64| {
//!         let attempt = counter.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             if attempt == 0 {
//!                 Err(std::io::Error::other("connection reset"))
//!             } else {
//!                 Ok(id)
//!             }
//!         }
//!     });
//!
//! assert_eq!(flaky.oneshot(7).await?, 7);
//! assert_eq!(tries.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## What is retried
//!
//! A [`ClassifyRetry`](crate::classify::ClassifyRetry) decides: by default errors are retried
//! and responses are not. A classifier may return
//! [`RetryDecision::RetryAfter`](crate::classify::RetryDecision::RetryAfter) with the
//! server's hint: the wait is then at least the hint (rounded up to the millisecond), and a
//! hint beyond `max_retry_after` returns the response as is. meshkit's own rejections (an open
//! breaker, a shed request) are never retried unless
//! [`RetryLayer::retry_rejections`] says so.
//!
//! Each retry sends a copy of the request made by a [`Replay`] (by default, `Clone`). A
//! request it cannot copy, or that [`RetryLayer::retryable`] rejects, is sent once.
//!
//! Over a meshkit [`Balance`](crate::balance::Balance) (directly, or under other layers such
//! as a breaker), a retry goes to another endpoint than the tries of the call that failed,
//! while the balancer has one that is ready: the picker's choice is moved to the next
//! endpoint not tried yet (as Envoy's `previous_hosts` predicate does). With a single
//! endpoint, retries go to it.
//!
//! ## The budget
//!
//! A readiness error of the inner service before a retry ends the call with that error, as
//! tower's `Retry` does.
//!
//! All services built by one layer share a [`RetryBudget`]: retries within the last `ttl` may
//! number `ratio` × the first tries within it plus `min_per_sec` × `ttl`. A retry is taken
//! from the budget when it is *scheduled*, so retries still waiting out their backoff count.
//! When the budget refuses, the caller gets the last result. `"unlimited"` opts out.
//!
//! ## Time
//!
//! `per_try_timeout` cuts a slow try (its [`TimedOut`] is retried like other errors);
//! `deadline` bounds the whole call: no retry starts whose wait would reach it (or leave it
//! less than a millisecond), a retry whose service is still not ready at the deadline is
//! dropped in favour of the last result, and a try still running at the deadline ends with a
//! [`TimedOut`] whose `is_deadline()` is true. Cutting a
//! try needs an error type that can carry [`TimedOut`] (`tower::BoxError`,
//! `std::io::Error`); with others the deadline only stops retries.
//!
//! ## Tracing
//!
//! Every retry emits a `debug` event with the attempt number and the wait; refusals by the
//! budget, exhausted attempts, hints over `max_retry_after` and deadlines emit `info` events.
//! `attempt` is the number of the try the event is about: the retry made or not made (2 for
//! the first retry), or, when attempts are exhausted, the number of tries made.

mod budget;
mod config;
mod error;
mod future;
mod layer;
mod replay;
mod service;

pub use crate::backoff::{Backoff, BackoffKind, Jitter};
pub use budget::{BudgetSnapshot, RetryBudget};
pub use config::{BudgetConfig, RetryConfig};
pub use error::TimedOut;
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use replay::{CloneRequest, OnlyIf, Replay};
pub use service::Retry;
