//! Load balancing over discovered endpoints: a `Clone` balancer with a lock-free hot path and
//! a choice of pickers.
//!
//! ```
//! use meshkit::balance::{Balance, LeastRequests};
//! use meshkit::discovery::{discover, Instance, MemoryRegistry, Registry};
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let registry = MemoryRegistry::new();
//! let _a = registry.register(Instance::builder("users", "10.0.0.1", 80).build()?).await?;
//! let _b = registry.register(Instance::builder("users", "10.0.0.2", 80).build()?).await?;
//! let endpoints = discover(&registry, "users", |instance: &Instance| {
//!     let host = instance.host.clone();
//!     tower::service_fn(move |()| {
//!         let host = host.clone();
//!         async move { Ok::<_, tower::BoxError>(host) }
//!     })
//! });
//! let mut users = Balance::new(endpoints, LeastRequests::default());
//! let host = users.ready().await?.call(()).await?;
//! assert!(host.starts_with("10.0.0."));
//! # Ok(())
//! # }
//! ```
//!
//! ## Pickers
//!
//! [`RoundRobin`] (exactly even), [`Random`] (uniform, seedable), [`WeightedRoundRobin`]
//! (smooth, as nginx), [`LeastRequests`] (power of two choices over requests in flight),
//! [`PeakEwma`] (power of two choices over peak-EWMA latency × requests in flight, as Finagle
//! and linkerd) and [`ConsistentHash`] (a hash ring with virtual nodes, flattened into a table, over a key taken
//! from the request). A
//! [`Picker`] of your own plugs in the same way.
//!
//! ## Loads
//!
//! In-flight counts and latencies are kept per handle ([`EndpointLoads`]), as Envoy keeps
//! them per worker thread: a call only touches counters of its own handle, so handles on
//! different cores never contend. Clone a handle per task. A snapshot of one endpoint leaves
//! nothing to choose: its calls are not counted (each snapshot starts its loads afresh).
//!
//! ## Outlier ejection
//!
//! With [`EjectionConfig`] (builder `.ejection(..)` or `BalanceConfig::ejection`), each
//! endpoint gets its own circuit breaker: failures eject it for a time that doubles with each
//! ejection in a row, and the first call after that is a probe whose success re-admits it.
//! Ejection never takes out more than `max_ejection_percent` of the ready endpoints, and below
//! `panic_threshold` healthy endpoints the balancer uses all of them, calling the ejected ones
//! past their breakers. Ejections, probes, re-admissions and panic mode emit `tracing` events.
//!
//! Ejection uses the breaker's state machine, but not its gate mode: the balancer's worker
//! follows each breaker's transitions and takes an open endpoint out of the set calls are
//! picked from (half-open puts it back for its probe), instead of the endpoint's `poll_ready`
//! holding calls back. Panic mode has to send calls to ejected endpoints, which a gate would
//! hold.
//!
//! ## Readiness and failing fast
//!
//! A background task applies discovery changes and drives endpoints that are not ready even
//! when no request arrives; an endpoint whose readiness fails is polled again a second later
//! rather than dropped. A call goes to an endpoint that is ready: when the picked one is not
//! (at its concurrency limit, reconnecting), the handle picks again ([`ConsistentHash`]: takes
//! the key's next owner round the ring, where the key would go without the endpoint), and the
//! call waits for its pick only when no other endpoint it looks at is ready. When no endpoint is ready for `failfast_after`, calls fail at once
//! with [`NoEndpoints`] instead of hanging, and resume as soon as one is ready.

mod config;
mod eject;
mod error;
mod picker;
mod ring;
mod service;
mod stats;
mod worker;

pub use config::{BalanceConfig, ConfiguredPicker, PickerKind};
pub use eject::EjectionConfig;
pub use error::{EndpointEjected, NoEndpoints};
pub use picker::{
    ConsistentHash, Cursor, LeastRequests, PeakEwma, Picker, Random, RoundRobin,
    WeightedRoundRobin, FALLBACKS,
};
pub use ring::HashRing;
pub use service::{Balance, BalanceBuilder, Endpoints, ResponseFuture};
pub use stats::EndpointLoads;
