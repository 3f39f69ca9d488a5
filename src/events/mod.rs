//! Events: a typed event bus on `tokio::sync::broadcast`, and an event store that loses
//! nothing.
//!
//! ```
//! use meshkit::events::{Event, EventBus, EventStore, ExpectedVersion, MemoryEventStore};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = EventBus::new(1024);
//! let store = MemoryEventStore::with_bus(bus.clone());
//! let mut orders = bus.subscribe_to_type("OrderPlaced");
//!
//! let placed = Event::new("OrderPlaced", "order-1", json!({ "total": 42 }));
//! store.append("order-1", ExpectedVersion::NoStream, vec![placed]).await?;
//!
//! let event = orders.recv().await?;
//! assert_eq!(event.version, 1);
//! # Ok(())
//! # }
//! ```
//!
//! ## Lagging
//!
//! The bus never waits for a slow subscriber: one that falls more than the bus's capacity
//! behind gets [`RecvError::Lagged`] with the number of events it missed (never a silent
//! skip). The store is the source of truth: on a bus a store publishes to, the lagging
//! subscriber calls [`Subscription::catch_up`], which reads exactly the events it missed from
//! the store, and goes on receiving with no gap and no duplicate. A reader that works from
//! positions of its own uses [`EventStore::subscribe`], which replays the stored events from a
//! position and then follows live ones.
//!
//! ## System events
//!
//! Every meshkit component reports its lifecycle on [`system::bus()`]: breaker transitions,
//! instances registered, removed and changing health, retries exhausted, budget refusals,
//! endpoints ejected and re-admitted. The components a [`Mesh`](crate::Mesh) builds report
//! to that mesh's own bus too ([`Mesh::events`](crate::Mesh::events)), which carries
//! nothing from other meshes.
//!
//! ## Closing
//!
//! [`EventBus::shutdown`] stops intake, lets handlers finish what was published and waits for
//! them; subscribers then get [`RecvError::Closed`].

mod bus;
mod event;
mod memory;
mod reserve;
mod store;
pub mod system;

pub use bus::{BusClosed, BusStats, EventBus, EventHandler, RecvError, Subscription};
pub use event::Event;
pub use memory::MemoryEventStore;
pub use store::{AppendError, EventStore, ExpectedVersion, StoredEvent};
