//! Every breaker transition is reported as a `tracing` event.

mod support;

use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer, WindowConfig};
use std::fmt::{Debug, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{backend, send, send_n, Call};
use tower::Layer;
use tracing::field::{Field, Visit};
use tracing::{span, Event, Metadata, Subscriber};

/// Keeps every event's level and fields as text.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Subscriber for Events {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(format!("{} ", event.metadata().level()));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[test]
fn every_transition_is_a_tracing_event_naming_the_breaker_and_states() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(events.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
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
    let events = events.0.lock().unwrap();
    let transitions: Vec<&String> = events
        .iter()
        .filter(|e| e.contains("breaker=\"billing\""))
        .collect();
    assert_eq!(transitions.len(), 3, "{events:#?}");
    assert!(transitions[0].starts_with("WARN") && transitions[0].contains("from=closed to=open"));
    assert!(transitions[1].contains("from=open to=half-open"));
    assert!(transitions[2].contains("from=half-open to=closed"));
}

/// Calls back into the breaker from inside the transition's tracing event.
struct ReadsTheBreaker(Arc<std::sync::OnceLock<meshkit::breaker::BreakerHandle>>);

impl Subscriber for ReadsTheBreaker {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, _: &Event<'_>) {
        if let Some(handle) = self.0.get() {
            let _ = (handle.name(), handle.state(), handle.metrics());
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[test]
fn a_subscriber_may_read_the_breaker_while_handling_its_event() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let handle = Arc::new(std::sync::OnceLock::new());
        let _guard = tracing::subscriber::set_default(ReadsTheBreaker(handle.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = CircuitBreakerLayer::new(BreakerConfig {
                window: WindowConfig::Count { size: 10 },
                minimum_calls: 2,
                ..BreakerConfig::default()
            })
            .unwrap();
            handle.set(layer.handle()).unwrap();
            let mut service = layer.layer(backend());
            send_n(&mut service, Call::Fail, 2).await;
        });
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("deadlock: the event was emitted under the breaker's lock");
}

/// Resets the breaker from inside the event announcing that it opened.
struct ResetsTheBreaker(Arc<std::sync::OnceLock<meshkit::breaker::BreakerHandle>>);

impl Subscriber for ResetsTheBreaker {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        if let Some(handle) = self.0.get() {
            if *event.metadata().level() == tracing::Level::WARN {
                handle.reset();
            }
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[test]
fn a_subscriber_may_change_the_breaker_while_handling_its_event() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let handle = Arc::new(std::sync::OnceLock::new());
        let _guard = tracing::subscriber::set_default(ResetsTheBreaker(handle.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let state = runtime.block_on(async {
            let layer = CircuitBreakerLayer::new(BreakerConfig {
                window: WindowConfig::Count { size: 10 },
                minimum_calls: 2,
                ..BreakerConfig::default()
            })
            .unwrap();
            handle.set(layer.handle()).unwrap();
            let mut service = layer.layer(backend());
            send_n(&mut service, Call::Fail, 2).await;
            layer.handle().state()
        });
        done.send(state).unwrap();
    });
    let state = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("deadlock: a transition made while announcing another");
    assert_eq!(
        state,
        meshkit::breaker::BreakerState::Closed,
        "the subscriber reset it"
    );
}
