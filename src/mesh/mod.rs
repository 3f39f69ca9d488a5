//! The mesh runtime: one configuration, a registry, system events and a client stack per
//! service.
//!
//! ```
//! use meshkit::{Mesh, MeshConfig};
//!
//! # fn main() -> Result<(), meshkit::MeshConfigError> {
//! let config = MeshConfig::from_toml(r#"
//!     [defaults.retry]
//!     max_attempts = 3
//!
//!     [services.users]
//!     timeout = "2s"
//!     breaker = { failure_rate = 0.5, minimum_calls = 20 }
//!     balance = { picker = "round_robin" }
//! "#)?;
//! assert_eq!(config.service("users").retry.max_attempts, 3);
//! let mesh = Mesh::builder().config(config).build()?;
//! # let _ = mesh;
//! # Ok(())
//! # }
//! ```
//!
//! ## The client stack
//!
//! [`Mesh::client`] (HTTP, feature `http`) and [`Mesh::client_with`] (any endpoint service)
//! build, from the endpoints up:
//!
//! 1. **discovery**: the registry's instances of the service, one endpoint each;
//! 2. **balance**: the configured picker, outlier ejection and fail-fast `NoEndpoints`;
//! 3. **breaker**: one circuit breaker over the balanced service;
//! 4. **retry**: tries again what the classifier says, within the budget (a retry goes back
//!    through the breaker and the balancer, so it usually reaches another instance);
//! 5. **timeout**: the whole call's limit, tries and waits included.
//!
//! ## Reloading
//!
//! [`Mesh::reload`] (or a `watch` channel given to [`Mesh::reload_from`]) replaces the
//! policies at run time. A new config is checked first; each client of a service whose
//! settings changed switches at its next `poll_ready`. A client keeps each layer whose
//! settings did not change: its balancer with its endpoints, loads and ejections (unless the
//! `balance` section changed, or for an HTTP client the `http` one), its breaker with its
//! state (unless the `breaker` section changed) and its retry budget (unless its terms did).

mod client;
mod config;
#[cfg(feature = "http")]
mod http;
mod lazy;
mod observe;
mod runtime;
mod stack;
mod timeout;

pub use client::{MeshClient, MeshClosed, ResponseFuture};
pub use config::{HttpConfig, MeshConfig, MeshConfigError, ServiceConfig};
pub use runtime::{Mesh, MeshBuilder};
