//! HTTP for meshkit stacks: classifiers, `Retry-After`, replayable bodies and endpoint routing
//! (feature `http`).
//!
//! ```
//! use meshkit::http::{BufferBodyLayer, HttpClassifier, HttpReplay};
//! use meshkit::retry::{RetryConfig, RetryLayer};
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), meshkit::ConfigError> {
//! let retry = RetryLayer::new(RetryConfig::default())?
//!     .classify(HttpClassifier::default())
//!     .replay(HttpReplay::default());
//! let client = tower::service_fn(|request: http::Request<_>| async move {
//!     let _: &meshkit::http::ReplayBody<String> = request.body();
//!     Ok::<_, std::io::Error>(http::Response::new(()))
//! });
//! let stack = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(64 * 1024))
//!     .layer(retry)
//!     .service(client);
//! # let _ = stack;
//! # Ok(())
//! # }
//! ```
//!
//! ## What an HTTP result means
//!
//! [`HttpClassifier`] tells breakers that 5xx responses and transport errors are failures and
//! other responses (4xx included) successes, and tells retry layers to try 429 and 5xx again
//! (no other 4xx), no sooner than their [`retry_after`] hint.
//!
//! ## What may be sent again
//!
//! [`HttpReplay`] lets retries and hedges repeat only idempotent methods, and only bodies held
//! whole: [`BufferBodyLayer`] keeps bodies up to a size in memory ([`ReplayBody`]); larger ones
//! stream through once. A retry also sends a request of any other method again when its try
//! never left (a refused connection: [`crate::error::is_unsent`]), as Finagle requeues
//! requests that were never written.
//!
//! ## Where a request goes
//!
//! [`Endpoint`] wraps a client (a `reqwest::Client` with the `reqwest` feature, a hyper-util
//! client, any HTTP `Service`) for one discovered instance and rewrites each request's URI
//! authority to that instance's address: the balancer picks the endpoint, the URI follows.
//! A plain `http` HTTP/1 request without a `Host` header gets the instance's `host:port`
//! (on ports other than 80 and 443), the value hyper-util would derive from the new URI for
//! HTTP/1, made once per endpoint instead of per request.
//!
//! ## Errors as responses
//!
//! [`error_status`] maps meshkit's errors to statuses (an open breaker is a `503` with
//! `Retry-After`, a rate limit a `429`, a timeout a `504`). With the `axum` feature they
//! implement `IntoResponse`, and [`ErrorResponseLayer`] lets protection layers (rate and
//! concurrency limits, load shedding) stack onto an `axum::Router` with no
//! `HandleErrorLayer`. A handler that calls a [`MeshClient`](crate::MeshClient) returns its
//! errors as a [`MeshError`] (`?` converts a `BoxError`).

mod body;
mod classify;
mod endpoint;
mod intern;
mod replay;
mod response;
mod retry_after;

pub use body::{BufferBody, BufferBodyLayer, ReplayBody};
pub use classify::{HttpClassifier, HttpResponse};
pub use endpoint::{Endpoint, Routable};
pub use replay::{is_idempotent, HttpReplay, ReplayableBody};
pub use response::{error_status, retry_after_value};
#[cfg(feature = "axum")]
pub use response::{ErrorResponse, ErrorResponseLayer, MeshError};
pub use retry_after::{retry_after, retry_after_at};
