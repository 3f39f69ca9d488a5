//! meshkit gives a microservice an in-process service mesh built from tower layers.
//!
//! ```
//! use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let breaker = CircuitBreakerLayer::new(BreakerConfig::default())?.name("users");
//! let client = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service_fn(|id: u64| async move { Ok::<_, std::io::Error>(format!("user {id}")) });
//!
//! assert_eq!(client.oneshot(7).await?, "user 7");
//! # Ok(())
//! # }
//! ```
//!
//! Every capability is a tower [`Layer`](tower::Layer), so it stacks onto anything built on
//! tower: a `reqwest` or `hyper-util` client wrapped with `ServiceBuilder`, an `axum::Router`,
//! a `tonic` channel.
//!
//! | Module | What it gives you |
//! |---|---|
//! | [`breaker`] | Circuit breaking with true sliding windows, gate mode and per-key breakers |
//! | [`retry`] | Retries with backoff, a lock-free budget, server delay hints, per-try timeouts and a deadline |
//! | [`hedge`] | Hedged requests after a fixed or percentile delay, bounded by a budget |
//! | [`balance`] | A `Clone` balancer over any tower `Discover`, lock-free picks, six pickers, fail-fast `NoEndpoints` |
//! | [`limit`] | Server-side protection that refuses at once: rate limit, concurrency limit, load shedding |
//! | `http` | (feature `http`) HTTP classifiers, `Retry-After`, replayable bodies, endpoint routing, errors as responses |
//! | [`mesh`] | The runtime: [`Mesh`] and [`MeshConfig`] (TOML, environment overrides, reload) building each service's client stack |
//! | `metrics` | (feature `metrics`) Stable metric names through the `metrics` facade |
//! | [`events`] | A typed event bus on `tokio::sync::broadcast`, handlers with panic isolation, and an event store with optimistic concurrency and gap-free replay |
//! | [`discovery`] | An embedded registry with revisions, bounded watches, TTL and TCP health checks, and a tower `Discover` adapter |
//! | [`backoff`] | Constant, linear and exponential waits with jitter, shared by every layer that waits |
//! | [`classify`] | What counts as success, failure or neither, shared by every layer |
//! | [`error`] | Finding meshkit's errors in a `source()` chain |
//! | [`duration`] | Humantime durations (`"250ms"`) in configs |
//! | [`random`] | Injectable randomness for jitter |
//!
//! ## Cargo features
//!
//! | Name | Description | Default? |
//! |---|---|---|
//! | `http` | The `http` module, and HTTP health checks in [`discovery`] (a hyper client) | no |
//! | `axum` | meshkit's errors implement axum's `IntoResponse`; `http::ErrorResponseLayer` | no |
//! | `reqwest` | A `reqwest::Client` as the leaf of a stack: classifiers, replay and routing for its requests and responses | no |
//! | `metrics` | Counters, gauges and histograms through the `metrics` facade (`meshkit::metrics`) | no |
//!
//! ## Time
//!
//! All timing uses tokio's clock ([`tokio::time::Instant`]), so tests can pause time with
//! `#[tokio::test(start_paused = true)]` and never sleep for real.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod backoff;
pub mod balance;
pub mod breaker;
mod cancel;
pub mod classify;
pub mod config;
pub mod discovery;
pub mod duration;
pub mod error;
pub mod events;
pub mod hedge;
#[cfg(feature = "http")]
pub mod http;
mod keepalive;
pub mod limit;
mod macros;
pub mod mesh;
#[cfg(feature = "metrics")]
pub mod metrics;
mod padded;
pub mod random;
mod registry;
pub mod retry;
mod striped;
mod timer;
mod tried;

pub use config::ConfigError;
pub use mesh::{Mesh, MeshClient, MeshConfig, MeshConfigError};

/// Compiles the README's examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
