//! System events: every meshkit component reports its lifecycle as typed events on one
//! process-wide bus, [`bus()`].
//!
//! ```
//! use meshkit::events::system::{self, SystemEvent};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut events = system::bus().subscribe();
//! # system::publish("demo", SystemEvent::RetriesExhausted { service: "users".into(), attempts: 3 });
//! if let Ok(event) = events.recv().await {
//!     println!("{}: {:?}", event.event_type, event.data);
//! }
//! # }
//! ```
//!
//! Publishing costs nothing measurable on request paths: components publish only on state
//! changes (a breaker opening, an instance registering), and a bus with no subscriber drops
//! the event at once.

use super::bus::EventBus;
use super::event::Event;
use crate::breaker::BreakerState;
use crate::discovery::Health;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, LazyLock};

/// Events kept for subscribers that fall behind.
pub(crate) const CAPACITY: usize = 1_024;

/// What happened in a meshkit component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SystemEvent {
    /// A circuit breaker changed state.
    BreakerTransition {
        /// The breaker's name.
        breaker: String,
        /// The state left.
        from: BreakerState,
        /// The state entered.
        to: BreakerState,
    },
    /// A balancer took an endpoint out of rotation.
    EndpointEjected {
        /// The balanced service.
        service: String,
        /// The endpoint (its key's stable hash).
        endpoint: String,
    },
    /// A balancer put an endpoint back after a successful probe.
    EndpointReadmitted {
        /// The balanced service.
        service: String,
        /// The endpoint (its key's stable hash).
        endpoint: String,
    },
    /// An instance registered.
    InstanceRegistered {
        /// Its service.
        service: String,
        /// Its id.
        instance: String,
    },
    /// An instance was removed (deregistered, replaced or expired).
    InstanceRemoved {
        /// Its service.
        service: String,
        /// Its id.
        instance: String,
        /// Why.
        reason: String,
    },
    /// An instance's health changed.
    HealthChanged {
        /// Its service.
        service: String,
        /// Its id.
        instance: String,
        /// The health before.
        from: Health,
        /// The health now.
        to: Health,
    },
    /// A call used all its attempts.
    RetriesExhausted {
        /// The retry layer's name.
        service: String,
        /// Tries made.
        attempts: u32,
    },
    /// A retry budget refused a retry (or a hedge).
    BudgetRefused {
        /// The layer's name.
        service: String,
        /// The try refused.
        attempt: u32,
    },
}

impl SystemEvent {
    /// The event's type name, as `Event::event_type` carries it.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::BreakerTransition { .. } => "BreakerTransition",
            Self::EndpointEjected { .. } => "EndpointEjected",
            Self::EndpointReadmitted { .. } => "EndpointReadmitted",
            Self::InstanceRegistered { .. } => "InstanceRegistered",
            Self::InstanceRemoved { .. } => "InstanceRemoved",
            Self::HealthChanged { .. } => "HealthChanged",
            Self::RetriesExhausted { .. } => "RetriesExhausted",
            Self::BudgetRefused { .. } => "BudgetRefused",
        }
    }
}

static BUS: LazyLock<EventBus<SystemEvent>> = LazyLock::new(|| EventBus::new(CAPACITY));

/// The process-wide system bus. Its `shutdown` stops system events for the whole process
/// for good: subscribe to it, do not shut it down.
pub fn bus() -> &'static EventBus<SystemEvent> {
    &BUS
}

/// Publishes `event` from `component` (the aggregate id: a breaker's or a service's name) on
/// the process-wide system bus.
pub fn publish(component: &str, event: SystemEvent) {
    Sink::default().publish(component, event);
}

/// Where a component reports its system events: the process-wide system bus, and the bus of
/// the [`Mesh`](crate::Mesh) that built it, if any (so that a mesh's subscribers see its own
/// events only).
#[derive(Clone, Default)]
pub(crate) struct Sink(Option<Arc<EventBus<SystemEvent>>>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Sink(mesh and process buses)",
            None => "Sink(process bus)",
        })
    }
}

impl Sink {
    /// Also to `bus`.
    pub(crate) fn to(bus: Arc<EventBus<SystemEvent>>) -> Self {
        Self(Some(bus))
    }

    /// Whether it reports to a mesh's bus as well.
    pub(crate) fn has_bus(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn publish(&self, component: &str, event: SystemEvent) {
        // Metrics are recorded here, on the publishing thread and before any bus sees the
        // event: a task turning events into metrics would record late, miss events when it
        // lags, and die with the runtime it was spawned on.
        #[cfg(feature = "metrics")]
        crate::metrics::record(&event);
        // Nobody listening: skip making the event (a v7 id and a timestamp), which the buses
        // would drop at once.
        let own = self.0.as_deref().filter(|bus| bus.has_subscribers());
        let process = BUS.has_subscribers();
        if own.is_none() && !process {
            return;
        }
        let event = Arc::new(Event::new(event.event_type(), component, event));
        if let Some(bus) = own {
            let _ = bus.publish_shared(event.clone());
        }
        if process {
            let _ = BUS.publish_shared(event);
        }
    }
}
