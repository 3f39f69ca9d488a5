//! Tracing events of the registry. In their own binary: tracing caches each callsite's
//! interest process-wide, so tests without a subscriber running beside them would hide events.

mod support;

use meshkit::discovery::{HealthCheck, Instance, MemoryRegistry, Registry};
use std::time::Duration;

#[test]
fn registrations_health_changes_expiry_and_removals_are_traced() {
    let events = support::events_during(|| async {
        let registry = MemoryRegistry::new();
        let check = HealthCheck::Ttl {
            ttl: Duration::from_secs(5),
        };
        let expiring = registry
            .register(
                Instance::builder("users", "10.0.0.1", 80)
                    .check(check)
                    .deregister_after(Duration::from_secs(10))
                    .build()
                    .unwrap(),
            )
            .await
            .unwrap();
        let plain = registry
            .register(Instance::builder("users", "10.0.0.2", 80).build().unwrap())
            .await
            .unwrap();
        plain.deregister().await;
        tokio::time::sleep(Duration::from_secs(20)).await;
        expiring.forget();
    });
    let has = |words: &[&str]| events.iter().any(|e| words.iter().all(|w| e.contains(w)));
    assert!(
        has(&[
            "INFO",
            "instance registered",
            "service=\"users\"",
            "revision="
        ]),
        "{events:?}"
    );
    assert!(
        has(&["instance removed", "reason=\"deregistered\""]),
        "{events:?}"
    );
    assert!(
        has(&["instance health changed", "from=passing", "to=critical"]),
        "{events:?}"
    );
    assert!(
        has(&[
            "instance removed",
            "reason=\"expired after deregister_after\""
        ]),
        "{events:?}"
    );
}
