//! Every breaker transition is reported as a `tracing` event.

mod support;

use meshkit::breaker::{
    BreakerConfig, BreakerHandle, BreakerState, CircuitBreakerLayer, WindowConfig,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use support::{
    backend, describe_event, finishes_within, opens_on_second_failure, paused_runtime,
    resets_the_breaker_when_it_opens, runtime, send, send_n, Call, OnEvent,
};
use tower::Layer;
use tracing::{Event, Subscriber};

/// With `subscriber(cell)` as the thread's default, opens a breaker by two failures on a
/// runtime of its own, `cell` holding the breaker's handle from before the first call; returns
/// the state the breaker is left in.
fn open_watched_by<S>(subscriber: impl FnOnce(Arc<OnceLock<BreakerHandle>>) -> S) -> BreakerState
where
    S: Subscriber + Send + Sync + 'static,
{
    let cell = Arc::new(OnceLock::new());
    let _guard = tracing::subscriber::set_default(subscriber(cell.clone()));
    runtime().block_on(async {
        let layer = opens_on_second_failure();
        cell.set(layer.handle()).unwrap();
        let mut service = layer.layer(backend());
        send_n(&mut service, Call::Fail, 2).await;
        layer.handle().state()
    })
}

#[test]
fn every_transition_is_a_tracing_event_naming_the_breaker_and_states() {
    // Keeps every event's level and fields as text.
    let events = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(OnEvent({
        let events = events.clone();
        move |event: &Event<'_>| events.lock().unwrap().push(describe_event(event))
    }));
    let runtime = paused_runtime();
    runtime.block_on(async {
        let layer = CircuitBreakerLayer::new(BreakerConfig {
            window: WindowConfig::Count { size: 10 },
            minimum_calls: 5,
            half_open_calls: 1,
            open_for: Duration::from_secs(10),
            ..BreakerConfig::default()
        })
        .unwrap()
        .name("billing");
        let mut service = layer.layer(backend());
        send_n(&mut service, Call::Fail, 5).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        send(&mut service, Call::Succeed).await.unwrap();
    });
    let events = events.lock().unwrap();
    let transitions: Vec<&String> = events
        .iter()
        .filter(|e| e.contains("breaker=\"billing\""))
        .collect();
    assert_eq!(transitions.len(), 3, "{events:#?}");
    assert!(transitions[0].starts_with("WARN") && transitions[0].contains("from=closed to=open"));
    assert!(transitions[1].contains("from=open to=half-open"));
    assert!(transitions[2].contains("from=half-open to=closed"));
}

#[test]
fn a_subscriber_may_read_the_breaker_while_handling_its_event() {
    finishes_within(
        Duration::from_secs(10),
        "deadlock: the event was emitted under the breaker's lock",
        || {
            // Calls back into the breaker from inside the transition's tracing event.
            open_watched_by(|breaker| {
                OnEvent(move |_: &Event<'_>| {
                    if let Some(handle) = breaker.get() {
                        let _ = (handle.name(), handle.state(), handle.metrics());
                    }
                })
            })
        },
    );
}

#[test]
fn a_subscriber_may_change_the_breaker_while_handling_its_event() {
    let state = finishes_within(
        Duration::from_secs(10),
        "deadlock: a transition made while announcing another",
        || open_watched_by(resets_the_breaker_when_it_opens),
    );
    assert_eq!(state, BreakerState::Closed, "the subscriber reset it");
}
