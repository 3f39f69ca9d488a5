//! Tracing events of the balancer's ejection. In their own binary: tracing caches each
//! callsite's interest process-wide, so tests without a subscriber beside them would hide events.

mod support;

use futures::channel::mpsc;
use meshkit::balance::{Balance, EjectionConfig, RoundRobin};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::discover::Change;
use tower::{BoxError, Service, ServiceExt};

type Endpoint = tower::util::BoxCloneSyncService<u64, &'static str, BoxError>;

fn endpoint(
    name: &'static str,
    failing: Arc<AtomicBool>,
) -> Result<Change<&'static str, Endpoint>, Infallible> {
    let service = tower::service_fn(move |_: u64| {
        let failing = failing.load(Ordering::SeqCst);
        async move {
            if failing {
                Err(BoxError::from("failed"))
            } else {
                Ok(name)
            }
        }
    });
    Ok(Change::Insert(
        name,
        tower::util::BoxCloneSyncService::new(service),
    ))
}

#[test]
fn ejections_and_readmissions_are_traced() {
    let events = support::events_during(|| async {
        let (tx, rx) = mpsc::unbounded();
        let bad = Arc::new(AtomicBool::new(true));
        tx.unbounded_send(endpoint("good", Arc::new(AtomicBool::new(false))))
            .unwrap();
        tx.unbounded_send(endpoint("bad", bad.clone())).unwrap();
        let config = EjectionConfig {
            failures: 2,
            base_ejection: Duration::from_secs(10),
            ..EjectionConfig::default()
        };
        let mut balance = Balance::builder(rx, RoundRobin)
            .name("users")
            .ejection(config)
            .unwrap()
            .build();
        for n in 0..10 {
            let _ = balance.ready().await.unwrap().call(n).await;
            tokio::task::yield_now().await;
        }
        bad.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(11)).await;
        for n in 0..10 {
            let _ = balance.ready().await.unwrap().call(n).await;
            tokio::task::yield_now().await;
        }
    });
    let has = |words: &[&str]| events.iter().any(|e| words.iter().all(|w| e.contains(w)));
    assert!(
        has(&["WARN", "endpoint ejected", "service=\"users\""]),
        "{events:?}"
    );
    assert!(
        has(&["endpoint back in rotation for a probe"]),
        "{events:?}"
    );
    assert!(has(&["INFO", "endpoint re-admitted"]), "{events:?}");
}
