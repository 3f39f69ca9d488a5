//! A circuit breaker with true sliding windows, lock-free closed-state calls and a gate mode.
//!
//! ```
//! use meshkit::breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer, CircuitOpen, WindowConfig};
//! use std::time::Duration;
//! use tower::{BoxError, Layer, Service, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::new(BreakerConfig {
//!     window: WindowConfig::Count { size: 10 },
//!     minimum_calls: 4,
//!     open_for: Duration::from_secs(5),
//!     ..BreakerConfig::default()
//! })?;
//! let handle = layer.handle();
//! let mut service = layer.layer(tower::service_fn(|fail: bool| async move {
//!     if fail { Err::<(), BoxError>("upstream failed".into()) } else { Ok(()) }
//! }));
//!
//! for _ in 0..4 {
//!     let _ = service.ready().await?.call(true).await;
//! }
//! assert_eq!(handle.state(), BreakerState::Open);
//!
//! let err = service.ready().await?.call(false).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().expect("rejected by the breaker");
//! assert!(open.retry_after() <= Duration::from_secs(5));
//! # Ok(())
//! # }
//! ```
//!
//! ## Windows
//!
//! Rates are computed over a true sliding window: the last `size` calls
//! ([`WindowConfig::Count`]) or the calls of the last `duration` ([`WindowConfig::Time`], kept
//! in 60 buckets). Old outcomes age out; a long run of successes does not have to be "paid
//! back" with as many failures. Rates are evaluated as soon as the window holds
//! `minimum_calls` calls, and the breaker opens when the failure rate, or the slow-call rate if
//! `slow_call_duration` is set, is at or above its threshold.
//!
//! ## States
//!
//! - **Closed**: calls pass and are recorded. Once the window holds `minimum_calls` calls, a
//!   success costs two plain atomic reads and an increment of a counter only the calling
//!   thread writes: no lock, no read-modify-write, no clock read, no allocation. Failures,
//!   slow calls and the first `minimum_calls` calls of a window take a short lock.
//! - **Open**: calls fail fast with [`CircuitOpen`], which carries the time left. When the
//!   period ends the breaker turns half-open by itself (a background task on the tokio runtime
//!   drives time, even without calls). Each opening that follows a failed half-open test lasts
//!   `open_backoff` times longer, with jitter, up to `open_for_max`; closing resets it.
//! - **HalfOpen**: up to `half_open_calls` probes are admitted, all of which may run at once;
//!   others are rejected. Once the probes' failures (or slow calls) reach a threshold of
//!   `half_open_calls` the breaker re-opens; when every probe has finished below it, it closes.
//!   A probe still running after `half_open_timeout` re-opens it. A probe that is cancelled
//!   (its future dropped) gives its slot back and is not counted, unless a meshkit timeout cut
//!   it short (see below): then it failed.
//! - **ForcedOpen** and **Disabled**: set by an operator through [`BreakerHandle`]; the first
//!   rejects everything, the second passes everything and records nothing.
//!   [`BreakerHandle::reset`] returns to a fresh `Closed`.
//!
//! Calls classified [`Outcome::Ignored`](crate::classify::Outcome::Ignored) and cancelled calls
//! are never counted, except calls that one of meshkit's timeouts cut short (see below). Errors made by meshkit's own layers (another breaker's [`CircuitOpen`])
//! are ignored unless [`CircuitBreakerLayer::count_rejections`] says otherwise. Failures and
//! probes admitted before a transition do not count after it.
//!
//! Every transition is logged as a `tracing` event and sent to
//! [`BreakerHandle::subscribe`] receivers.
//!
//! ## Fail fast or gate
//!
//! By default the breaker sits at the top of a client stack and `call` fails fast. In gate
//! mode ([`CircuitBreakerLayer::gate`]) `poll_ready` returns `Poll::Pending` while the breaker
//! rejects and wakes the task when it turns half-open, so that a balancer routes around the
//! endpoint with no special case.
//!
//! ## Where it goes in a stack
//!
//! A call that times out is a failure, as a Resilience4j `TimeLimiter` inside a breaker makes
//! it, so that a backend that hangs trips the breaker. Timeouts inside the breaker return an
//! error it sees: `ServiceBuilder::new().layer(breaker).timeout(limit).service(client)`.
//! meshkit's own timeouts above it (a [`RetryLayer`](crate::retry::RetryLayer)'s
//! `per_try_timeout` and `deadline`, a mesh client's `timeout`) drop the call they cut short
//! in a way the breaker recognises, and it counts the call as failed (and slow, when slow
//! calls are tracked). Any other timeout outside it, tower's `Timeout` say, only cancels the
//! call, which is not counted.
//!
//! ## Runtime
//!
//! The breaker needs no runtime to be built. Its driver (one small task per breaker) is
//! spawned on the tokio runtime of the first call that needs it; that runtime must have time
//! enabled. Without any runtime the breaker still works, applying time-driven transitions on
//! the next call, and gate mode fails fast instead of waiting for a wake-up nobody would send.
//! A breaker used from several runtimes at once (a `static` shared by parallel tests) follows
//! the clock of the runtime its driver runs on; when that runtime shuts down, the next runtime
//! to use the breaker takes over.
//!
//! ## One breaker per host
//!
//! [`KeyedCircuitBreakerLayer`] keeps a breaker per key computed from the request, bounded in
//! number, so one bad host does not trip the breaker for the others.

mod announce;
mod config;
mod driver;
mod error;
mod future;
mod handle;
mod keyed;
mod layer;
mod local;
mod machine;
mod metrics;
mod probe;
mod service;
mod shared;
mod state;
mod window;

pub use config::{BreakerConfig, WindowConfig};
pub use error::CircuitOpen;
pub use future::ResponseFuture;
pub use handle::BreakerHandle;
pub use keyed::{
    KeyedBreakerHandle, KeyedCircuitBreaker, KeyedCircuitBreakerLayer, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_KEYS,
};
pub use layer::CircuitBreakerLayer;
pub use metrics::BreakerMetrics;
pub use service::CircuitBreaker;
pub use state::{BreakerState, Transition};
