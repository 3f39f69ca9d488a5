//! The meshkit demo: a client survives a dependency's outage behind retries and a circuit
//! breaker.
//!
//! Run it with `cargo run --example mesh`. It needs no server and finishes in about 3 seconds.
//!
//! An in-process "users" backend fails every request for the first second (an outage), then
//! recovers, apart from a transient failure on every tenth request. A client sends a request
//! every 5 ms through a `RetryLayer` in front of a `CircuitBreakerLayer`. Retries hide the
//! transient failures; during the outage the retry budget stops them from multiplying the
//! load, and once the breaker opens its rejections are not retried at all. The breaker rejects
//! calls without touching the backend while open, probes with a few calls when the open period
//! ends, and closes once the backend is healthy again. Every transition is printed as it
//! happens, then a report.

use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer, CircuitOpen, WindowConfig};
use meshkit::retry::{Backoff, BackoffKind, BudgetConfig, Jitter, RetryConfig, RetryLayer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

const OUTAGE: Duration = Duration::from_millis(1000);
const RUN_FOR: Duration = Duration::from_millis(2500);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let started = Instant::now();
    let backend_hits = Arc::new(AtomicU64::new(0));

    // The dependency: down for the first second, then healthy but for a transient failure
    // on every tenth request.
    let backend = {
        let hits = backend_hits.clone();
        tower::service_fn(move |user: u64| {
            let hit = hits.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if started.elapsed() < OUTAGE {
                    Err::<String, BoxError>("503 from users: database unavailable".into())
                } else if hit % 10 == 9 {
                    Err("connection reset by peer".into())
                } else {
                    Ok(format!("user {user}"))
                }
            }
        })
    };

    let retry = RetryLayer::new(RetryConfig {
        max_attempts: 3,
        backoff: Backoff {
            kind: BackoffKind::Exponential,
            base: Duration::from_millis(2),
            multiplier: 2.0,
            max: Duration::from_millis(20),
            jitter: Jitter::Full,
        },
        budget: BudgetConfig::Limited {
            ratio: 0.2,
            min_per_sec: 5,
            ttl: Duration::from_secs(1),
        },
        ..RetryConfig::default()
    })?
    .name("users");
    let budget = retry.budget().clone();

    let breaker = CircuitBreakerLayer::new(BreakerConfig {
        failure_rate: 0.5,
        window: WindowConfig::Count { size: 20 },
        minimum_calls: 10,
        open_for: Duration::from_millis(300),
        open_backoff: 2.0,
        open_for_max: Duration::from_millis(600),
        half_open_calls: 3,
        ..BreakerConfig::default()
    })?
    .name("users");
    let handle = breaker.handle();

    let mut transitions = handle.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(t) = transitions.recv().await {
            println!(
                "[{:>5} ms] breaker {:<6} {:>10} -> {}",
                t.at.duration_since(started).as_millis(),
                t.breaker,
                t.from.to_string(),
                t.to
            );
        }
    });

    let mut client = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(backend);
    let (mut ok, mut failed, mut rejected) = (0u64, 0u64, 0u64);
    println!("meshkit demo: a users backend fails for {OUTAGE:?}, then recovers\n");
    while started.elapsed() < RUN_FOR {
        match client.ready().await?.call(7).await {
            Ok(_) => ok += 1,
            Err(err) if err.downcast_ref::<CircuitOpen>().is_some() => rejected += 1,
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(client);

    let metrics = handle.metrics();
    println!("\n{:<32} {:>8}", "report", "count");
    println!(
        "{:<32} {:>8}",
        "requests sent by the client",
        ok + failed + rejected
    );
    println!("{:<32} {:>8}", "  succeeded", ok);
    println!("{:<32} {:>8}", "  failed at the backend", failed);
    println!("{:<32} {:>8}", "  rejected by the open breaker", rejected);
    println!(
        "{:<32} {:>8}",
        "requests that reached backend",
        backend_hits.load(Ordering::Relaxed)
    );
    let retries = budget.snapshot();
    println!("{:<32} {:>8}", "retries sent", retries.withdrawals);
    println!(
        "{:<32} {:>8}",
        "retries refused by the budget", retries.refusals
    );
    println!(
        "{:<32} {:>8}",
        "breaker state at the end",
        metrics.state.to_string()
    );
    println!(
        "\nThe breaker spared the failing backend {rejected} requests and let traffic back in once it recovered;\n\
         retries hid the transient failures, and the budget refused {} retries that would only have added load.",
        retries.refusals
    );
    drop(handle);
    printer.abort();
    Ok(())
}
