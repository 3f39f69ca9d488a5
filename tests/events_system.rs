//! System events reach the process-wide bus from the components that exist. In their own
//! binary: the system bus is process-wide.

use futures::FutureExt;
use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer, WindowConfig};
use meshkit::discovery::{HealthCheck, Instance, MemoryRegistry, Registry};
use meshkit::events::system::{self, SystemEvent};
use meshkit::retry::{Backoff, BackoffKind, Jitter, RetryConfig, RetryLayer};
use std::time::Duration;
use tower::{BoxError, Layer, ServiceExt};

#[tokio::test(start_paused = true)]
async fn breakers_registries_and_retries_report_on_the_system_bus() {
    let mut events = system::bus().subscribe();

    // A breaker that opens on its second failure.
    let breaker = CircuitBreakerLayer::new(BreakerConfig {
        window: WindowConfig::Count { size: 2 },
        minimum_calls: 2,
        failure_rate: 0.5,
        ..BreakerConfig::default()
    })
    .unwrap()
    .name("payments");
    let failing = breaker.layer(tower::service_fn(|()| async {
        Err::<(), _>(BoxError::from("down"))
    }));
    for _ in 0..2 {
        let _ = failing.clone().oneshot(()).await;
    }

    // An instance that registers, misses its heartbeat, and goes.
    let registry = MemoryRegistry::new();
    let users = registry
        .register(
            Instance::builder("users", "10.0.0.1", 80)
                .check(HealthCheck::Ttl {
                    ttl: Duration::from_secs(5),
                })
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(users);

    // Retries that run out.
    let retry = RetryLayer::new(RetryConfig {
        max_attempts: 2,
        backoff: Backoff {
            kind: BackoffKind::Constant,
            base: Duration::from_millis(1),
            multiplier: 2.0,
            max: Duration::from_millis(1),
            jitter: Jitter::None,
        },
        ..RetryConfig::default()
    })
    .unwrap()
    .name("orders");
    let _ = retry
        .layer(tower::service_fn(|()| async {
            Err::<(), _>(BoxError::from("down"))
        }))
        .oneshot(())
        .await;

    let mut kinds = Vec::new();
    while let Some(Ok(event)) = events.recv().now_or_never() {
        kinds.push((event.event_type.clone(), event.aggregate_id.clone()));
        if let SystemEvent::HealthChanged { to, .. } = &event.data {
            assert_eq!(*to, meshkit::discovery::Health::Critical);
        }
    }
    let has = |kind: &str, component: &str| kinds.iter().any(|(k, c)| k == kind && c == component);
    assert!(has("BreakerTransition", "payments"), "{kinds:?}");
    assert!(has("InstanceRegistered", "users"), "{kinds:?}");
    assert!(has("HealthChanged", "users"), "{kinds:?}");
    assert!(has("InstanceRemoved", "users"), "{kinds:?}");
    assert!(has("RetriesExhausted", "orders"), "{kinds:?}");
}
