//! Hedged requests: when a try is slow, send another copy and take whichever answers first.
//!
//! ```
//! use meshkit::hedge::{HedgeConfig, HedgeDelay, HedgeLayer};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tokio::time::Instant;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), std::io::Error> {
//! let config = HedgeConfig {
//!     delay: HedgeDelay::Fixed(Duration::from_millis(50)),
//!     ..HedgeConfig::default()
//! };
//! let tries = Arc::new(AtomicU32::new(0));
//! let counter = tries.clone();
//! let search = ServiceBuilder::new()
//!     .layer(HedgeLayer::new(config).unwrap())
//!     .service_fn(move |query: &'static str| {
//!         // The first try is stuck behind a slow replica; the hedge is not.
//!         let slow = counter.fetch_add(1, Ordering::SeqCst) == 0;
//!         async move {
//!             let took = if slow { 5_000 } else { 10 };
//!             tokio::time::sleep(Duration::from_millis(took)).await;
//!             Ok::<_, std::io::Error>(query.len())
//!         }
//!     });
//!
//! let started = Instant::now();
//! assert_eq!(search.oneshot("meshkit").await?, 7);
//! assert_eq!(started.elapsed(), Duration::from_millis(60));
//! # Ok(())
//! # }
//! ```
//!
//! ## When to hedge
//!
//! [`HedgeDelay::Fixed`] waits a set time; [`HedgeDelay::Percentile`] waits a percentile of
//! the latencies of recent tries (recorded per layer, over `window`), and does not hedge until
//! `min_samples` have been recorded. Up to `max_hedges` copies are sent, one per delay.
//!
//! Over a meshkit [`Balance`](crate::balance::Balance) (directly, or under other layers), a
//! hedge goes to another endpoint than the tries still in flight, while the balancer has one
//! that is ready: a copy sent to the endpoint that is already slow would rarely help.
//!
//! ## What it costs
//!
//! A hedge is extra load on the dependency, so hedges draw on a
//! [`RetryBudget`](crate::retry::RetryBudget) like retries: every call deposits, every hedge
//! withdraws, and a refused hedge is not sent. Only requests the replay policy copies are
//! hedged; gate non-idempotent ones out with [`HedgeLayer::hedgeable`].
//!
//! ## Tracing
//!
//! Each hedge emits a `debug` event with its attempt number (2 for the first hedge); a hedge
//! the budget refuses emits an `info` event.

mod config;
mod future;
mod latency;
mod layer;
mod service;

pub use config::{HedgeConfig, HedgeDelay};
pub use future::ResponseFuture;
pub use layer::HedgeLayer;
pub use service::Hedge;
