//! Tracing events of the retry and hedge layers. In their own binary: tracing caches each callsite's
//! interest process-wide, so tests without a subscriber running beside them would hide events.

mod support;

use meshkit::random::SplitMix64;
use meshkit::retry::{Backoff, BackoffKind, BudgetConfig, Jitter, RetryConfig, RetryLayer};
use std::sync::Arc;
use std::time::Duration;
use tower::{BoxError, Layer, ServiceExt};

fn config(max_attempts: u32, budget: BudgetConfig) -> RetryConfig {
    RetryConfig {
        max_attempts,
        backoff: Backoff {
            kind: BackoffKind::Constant,
            base: Duration::from_millis(5),
            multiplier: 2.0,
            max: Duration::from_millis(5),
            jitter: Jitter::None,
        },
        budget,
        ..RetryConfig::default()
    }
}

/// Runs `calls` failing calls through a retry layer built from `config`; returns the events.
fn events_of(config: RetryConfig, calls: usize) -> Vec<String> {
    support::events_during(|| async move {
        let service = RetryLayer::new(config)
            .unwrap()
            .name("users")
            .random(Arc::new(SplitMix64::seeded(1)))
            .layer(tower::service_fn(|()| async {
                Err::<(), _>(BoxError::from("down"))
            }));
        for _ in 0..calls {
            service.clone().oneshot(()).await.unwrap_err();
        }
    })
}

#[test]
fn retries_and_exhaustion_are_traced_with_the_attempt_number() {
    let events = events_of(config(2, BudgetConfig::default()), 1);
    assert!(
        events.iter().any(|e| e.starts_with("DEBUG")
            && e.contains("service=\"users\"")
            && e.contains("attempt=2")
            && e.contains("retrying")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("INFO")
            && e.contains("attempt=2")
            && e.contains("retries exhausted")),
        "{events:?}"
    );
}

#[test]
fn budget_refusals_are_traced_with_the_attempt_number() {
    let budget = BudgetConfig::Limited {
        ratio: 0.0,
        min_per_sec: 1,
        ttl: Duration::from_secs(1),
    };
    let events = events_of(config(3, budget), 1);
    assert!(
        events
            .iter()
            .any(|e| e.contains("attempt=3") && e.contains("retry budget refused")),
        "{events:?}"
    );
}

#[test]
fn hedges_and_their_refusals_are_traced_with_the_attempt_number() {
    use meshkit::hedge::{HedgeConfig, HedgeDelay, HedgeLayer};
    let events = support::events_during(|| async {
        let config = HedgeConfig {
            delay: HedgeDelay::Fixed(Duration::from_millis(10)),
            budget: BudgetConfig::Limited {
                ratio: 0.0,
                min_per_sec: 1,
                ttl: Duration::from_secs(1),
            },
            ..HedgeConfig::default()
        };
        let service = HedgeLayer::new(config)
            .unwrap()
            .name("search")
            .layer(tower::service_fn(|()| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, BoxError>(())
            }));
        service.clone().oneshot(()).await.unwrap();
        service.oneshot(()).await.unwrap();
    });
    assert!(
        events.iter().any(|e| e.starts_with("DEBUG")
            && e.contains("service=\"search\"")
            && e.contains("attempt=2")
            && e.contains("hedging")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("attempt=2") && e.contains("hedge budget refused")),
        "{events:?}"
    );
}
