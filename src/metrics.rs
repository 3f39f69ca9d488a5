//! Counters, gauges and histograms through the [`metrics`](https://docs.rs/metrics) facade
//! (feature `metrics`): install any recorder (Prometheus, StatsD, ...) and meshkit reports to
//! it under these stable names.
//!
//! ```
//! // Install a recorder first (here none: the facade then drops everything), then build the
//! // mesh: clients take their metric handles when they are built.
//! meshkit::metrics::describe();
//! assert_eq!(meshkit::metrics::REQUESTS_TOTAL, "meshkit_requests_total");
//! ```
//!
//! | Name | Type | Labels | What it counts |
//! |---|---|---|---|
//! | `meshkit_requests_total` | counter | `service`, `outcome` (`success`, `failure`, `rejected`, `ignored`) | Calls through a `MeshClient`, by how its classifier judged the result; `rejected` is a meshkit rejection (open breaker, no endpoints, ...) |
//! | `meshkit_request_duration_seconds` | histogram | `service` | Time from `call` to the result, retries and waits included |
//! | `meshkit_requests_in_flight` | gauge | `service` | Calls started and not finished |
//! | `meshkit_retries_total` | counter | `service` | Retries scheduled (withdrawn from the budget) |
//! | `meshkit_retries_exhausted_total` | counter | `service` | Calls that used all their attempts |
//! | `meshkit_retry_budget_refusals_total` | counter | `service` | Retries or hedges the budget refused |
//! | `meshkit_breaker_transitions_total` | counter | `breaker`, `to` (`closed`, `open`, `half-open`, `forced-open`, `disabled`) | Breaker state changes |
//! | `meshkit_breaker_state` | gauge | `breaker` | The breaker's state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled |
//! | `meshkit_endpoints_ejected_total` | counter | `service` | Endpoints taken out of rotation by outlier ejection |
//! | `meshkit_endpoints_readmitted_total` | counter | `service` | Ejected endpoints put back after a successful probe |
//! | `meshkit_instances_registered_total` | counter | `service` | Instances registered |
//! | `meshkit_instances_removed_total` | counter | `service`, `reason` | Instances deregistered, replaced or expired |
//! | `meshkit_instance_health_changes_total` | counter | `service`, `to` (`passing`, `warning`, `critical`, `unknown`) | Health transitions of instances |
//!
//! Breaker, ejection, registry and retry-exhaustion metrics are recorded where their system
//! events are published (see [`crate::events::system`]), on the publishing thread, whether
//! or not anyone subscribes to the bus: with or without a [`Mesh`](crate::Mesh), and with a
//! thread-local recorder (`metrics::set_default_local_recorder`) as well as a global one. A
//! mesh sets a service breaker's `meshkit_breaker_state` to 0 when it builds the breaker, so a
//! closed breaker has its series before its first transition.

use crate::breaker::BreakerState;
use crate::events::system::SystemEvent;

/// Calls through a `MeshClient`, by outcome.
pub const REQUESTS_TOTAL: &str = "meshkit_requests_total";
/// Time from `call` to the result, in seconds.
pub const REQUEST_DURATION_SECONDS: &str = "meshkit_request_duration_seconds";
/// Calls started and not finished.
pub const REQUESTS_IN_FLIGHT: &str = "meshkit_requests_in_flight";
/// Retries scheduled.
pub const RETRIES_TOTAL: &str = "meshkit_retries_total";
/// Calls that used all their attempts.
pub const RETRIES_EXHAUSTED_TOTAL: &str = "meshkit_retries_exhausted_total";
/// Retries or hedges a budget refused.
pub const RETRY_BUDGET_REFUSALS_TOTAL: &str = "meshkit_retry_budget_refusals_total";
/// Breaker state changes.
pub const BREAKER_TRANSITIONS_TOTAL: &str = "meshkit_breaker_transitions_total";
/// A breaker's current state.
pub const BREAKER_STATE: &str = "meshkit_breaker_state";
/// Endpoints ejected.
pub const ENDPOINTS_EJECTED_TOTAL: &str = "meshkit_endpoints_ejected_total";
/// Endpoints re-admitted.
pub const ENDPOINTS_READMITTED_TOTAL: &str = "meshkit_endpoints_readmitted_total";
/// Instances registered.
pub const INSTANCES_REGISTERED_TOTAL: &str = "meshkit_instances_registered_total";
/// Instances removed.
pub const INSTANCES_REMOVED_TOTAL: &str = "meshkit_instances_removed_total";
/// Instance health transitions.
pub const INSTANCE_HEALTH_CHANGES_TOTAL: &str = "meshkit_instance_health_changes_total";

/// Registers a description (and unit) of every metric with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_TOTAL, "Calls through a meshkit client, by outcome");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from call to result, retries included"
    );
    describe_gauge!(REQUESTS_IN_FLIGHT, "Calls started and not finished");
    describe_counter!(RETRIES_TOTAL, "Retries scheduled");
    describe_counter!(
        RETRIES_EXHAUSTED_TOTAL,
        "Calls that used all their attempts"
    );
    describe_counter!(RETRY_BUDGET_REFUSALS_TOTAL, "Retries refused by the budget");
    describe_counter!(BREAKER_TRANSITIONS_TOTAL, "Circuit breaker state changes");
    describe_gauge!(
        BREAKER_STATE,
        "0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled"
    );
    describe_counter!(ENDPOINTS_EJECTED_TOTAL, "Endpoints ejected as outliers");
    describe_counter!(ENDPOINTS_READMITTED_TOTAL, "Ejected endpoints re-admitted");
    describe_counter!(INSTANCES_REGISTERED_TOTAL, "Instances registered");
    describe_counter!(
        INSTANCES_REMOVED_TOTAL,
        "Instances deregistered, replaced or expired"
    );
    describe_counter!(INSTANCE_HEALTH_CHANGES_TOTAL, "Instance health transitions");
}

/// Kept for code written against earlier versions: system events are now recorded as they
/// are published, with no task to start. Returns `true`.
#[deprecated(note = "system events are recorded as they are published; nothing to start")]
pub fn record_system_events() -> bool {
    true
}

/// Records what a system event counts.
pub(crate) fn record(event: &SystemEvent) {
    match event {
        SystemEvent::BreakerTransition { breaker, to, .. } => {
            metrics::counter!(BREAKER_TRANSITIONS_TOTAL, "breaker" => breaker.clone(), "to" => to.to_string())
                .increment(1);
            metrics::gauge!(BREAKER_STATE, "breaker" => breaker.clone()).set(state_value(*to));
        }
        SystemEvent::EndpointEjected { service, .. } => {
            metrics::counter!(ENDPOINTS_EJECTED_TOTAL, "service" => service.clone()).increment(1);
        }
        SystemEvent::EndpointReadmitted { service, .. } => {
            metrics::counter!(ENDPOINTS_READMITTED_TOTAL, "service" => service.clone())
                .increment(1);
        }
        SystemEvent::InstanceRegistered { service, .. } => {
            metrics::counter!(INSTANCES_REGISTERED_TOTAL, "service" => service.clone())
                .increment(1);
        }
        SystemEvent::InstanceRemoved {
            service, reason, ..
        } => {
            metrics::counter!(INSTANCES_REMOVED_TOTAL, "service" => service.clone(), "reason" => reason.clone())
                .increment(1);
        }
        SystemEvent::HealthChanged { service, to, .. } => {
            metrics::counter!(INSTANCE_HEALTH_CHANGES_TOTAL, "service" => service.clone(), "to" => to.to_string())
                .increment(1);
        }
        SystemEvent::RetriesExhausted { service, .. } => {
            metrics::counter!(RETRIES_EXHAUSTED_TOTAL, "service" => service.clone()).increment(1);
        }
        SystemEvent::BudgetRefused { service, .. } => {
            metrics::counter!(RETRY_BUDGET_REFUSALS_TOTAL, "service" => service.clone())
                .increment(1);
        }
    }
}

fn state_value(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
        BreakerState::ForcedOpen => 3.0,
        BreakerState::Disabled => 4.0,
    }
}

/// A new breaker's state gauge: closed.
pub(crate) fn breaker_built(name: &str) {
    metrics::gauge!(BREAKER_STATE, "breaker" => name.to_string())
        .set(state_value(BreakerState::Closed));
}

/// Counts a scheduled retry (the retry layer's slow path: never on a first try).
pub(crate) fn retry_scheduled(service: &str) {
    metrics::counter!(RETRIES_TOTAL, "service" => service.to_string()).increment(1);
}

/// One client's request metrics, taken once when the client is built.
pub(crate) struct ClientMetrics {
    success: metrics::Counter,
    failure: metrics::Counter,
    rejected: metrics::Counter,
    ignored: metrics::Counter,
    duration: metrics::Histogram,
    in_flight: metrics::Gauge,
}

impl ClientMetrics {
    pub(crate) fn new(service: &str) -> Self {
        let counter = |outcome: &'static str| metrics::counter!(REQUESTS_TOTAL, "service" => service.to_string(), "outcome" => outcome);
        Self {
            success: counter("success"),
            failure: counter("failure"),
            rejected: counter("rejected"),
            ignored: counter("ignored"),
            duration: metrics::histogram!(REQUEST_DURATION_SECONDS, "service" => service.to_string()),
            in_flight: metrics::gauge!(REQUESTS_IN_FLIGHT, "service" => service.to_string()),
        }
    }

    pub(crate) fn started(&self) {
        self.in_flight.increment(1.0);
    }

    /// A call finished after `elapsed` (`None`: dropped before finishing), judged `outcome`
    /// (`None`: a meshkit rejection).
    pub(crate) fn finished(
        &self,
        elapsed: Option<std::time::Duration>,
        outcome: Option<crate::classify::Outcome>,
    ) {
        self.in_flight.decrement(1.0);
        let Some(elapsed) = elapsed else { return };
        self.duration.record(elapsed.as_secs_f64());
        match outcome {
            Some(crate::classify::Outcome::Success) => self.success.increment(1),
            Some(crate::classify::Outcome::Failure) => self.failure.increment(1),
            Some(crate::classify::Outcome::Ignored) => self.ignored.increment(1),
            None => self.rejected.increment(1),
        }
    }
}
