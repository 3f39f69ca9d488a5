//! Service discovery: an embedded registry with health checking, and an adapter that feeds
//! any tower balancer.
//!
//! ```
//! use meshkit::discovery::{Health, HealthCheck, Instance, MemoryRegistry, Registry};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! let check = HealthCheck::Ttl { ttl: Duration::from_secs(10) };
//! let users = registry
//!     .register(Instance::builder("users", "10.0.0.7", 8080).check(check).build()?)
//!     .await?;
//!
//! registry.heartbeat(&users.id()).await?;
//! tokio::time::sleep(Duration::from_secs(11)).await; // no heartbeat for longer than the ttl
//! let snapshot = registry.instances("users").await?;
//! assert_eq!(snapshot.get(&users.id()).unwrap().health, Health::Critical);
//! # Ok(())
//! # }
//! ```
//!
//! ## The registry
//!
//! [`Registry`] is an object-safe trait (boxed futures): register, deregister, heartbeat, read
//! a [`Snapshot`] and [`watch`](Registry::watch) a service. Every change bumps a revision;
//! watchers see [`Update::Reset`] first and then every change in revision order, and a watcher
//! that falls behind gets a fresh `Reset` instead of an unbounded queue. Dropping a
//! [`Registration`] deregisters the instance. [`MemoryRegistry`] is the embedded
//! implementation; etcd and DNS backends implement the same trait.
//!
//! ## Health
//!
//! An instance's [`HealthCheck`]: none (passing while registered), a TTL kept alive by
//! heartbeats (a missed one turns it `Critical`), or an
//! active TCP connect (or HTTP GET, with the `http` feature) to the instance's own address,
//! with thresholds of consecutive failures and successes. An instance critical for its
//! `deregister_after` is removed, whatever its check. One background task per registry
//! runs every check; at most 64 probes are in flight at once.
//!
//! ## Balancing
//!
//! [`discover`] turns a watch into a `tower::discover::Discover` of the passing instances.
//!
//! ## Tracing
//!
//! Registrations, removals (deregistered, expired) and health changes each emit an `info`
//! event with the service, the instance and the revision.

mod discover;
mod health;
#[cfg(feature = "http")]
mod http_check;
mod instance;
mod memory;
mod registry;

pub(crate) use discover::yielded;
pub use discover::{discover, weights, zones, Discovered};
pub use instance::{Health, HealthCheck, Instance, InstanceBuilder, InstanceId};
pub use memory::MemoryRegistry;
pub use registry::{
    filter_watch, BoxFuture, Filter, Registration, Registry, RegistryError, Snapshot, Update, Watch,
};
